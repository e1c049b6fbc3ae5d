"""``python -m data_prep.sample_data`` from a checkout: the ``magvit.prep.sample_data`` step (installed: ``magvit-sample-data``)."""

import sys

from magvit.prep.sample_data import cli

if __name__ == "__main__":
    sys.exit(cli())
