"""``python -m data_prep.extract`` from a checkout: the ``magvit.prep.extract`` step (installed: ``magvit-extract``)."""

import sys

from magvit.prep.extract import cli

if __name__ == "__main__":
    sys.exit(cli())
