"""``python -m launch.submit`` from a checkout: runs ``magvit.launch.submit`` (installed: ``magvit-submit``)."""

import sys

from magvit.launch.submit import cli

if __name__ == "__main__":
    sys.exit(cli())
