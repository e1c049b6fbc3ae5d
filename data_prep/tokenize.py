"""``python -m data_prep.tokenize`` from a checkout: the ``magvit.prep.tokenize`` step (installed: ``magvit-tokenize``)."""

import sys

from magvit.prep.tokenize import cli

if __name__ == "__main__":
    sys.exit(cli())
