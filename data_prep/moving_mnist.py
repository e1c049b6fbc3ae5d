"""``python -m data_prep.moving_mnist`` from a checkout: the ``magvit.prep.moving_mnist`` step (installed: ``magvit-moving-mnist``)."""

import sys

from magvit.prep.moving_mnist import cli

if __name__ == "__main__":
    sys.exit(cli())
