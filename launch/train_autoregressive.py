"""``deepspeed launch/train_autoregressive.py`` from a checkout: runs ``magvit.launch.train_autoregressive`` (see its
docstring)."""

import sys
from pathlib import Path

if __package__ in (None, ""):  # run by path (the deepspeed launcher): make the checkout's magvit importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from magvit.launch.train_autoregressive import cli  # noqa: E402

if __name__ == "__main__":
    sys.exit(cli())
