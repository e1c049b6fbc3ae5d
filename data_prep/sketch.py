"""``python -m data_prep.sketch`` from a checkout: the ``magvit.prep.sketch`` step (installed: ``magvit-sketch``)."""

import sys

from magvit.prep.sketch import cli

if __name__ == "__main__":
    sys.exit(cli())
