"""``python -m data_prep.index`` from a checkout: the ``magvit.prep.index`` step (installed: ``magvit-index``)."""

import sys

from magvit.prep.index import cli

if __name__ == "__main__":
    sys.exit(cli())
