"""Files that ship inside the package: the run configs (``magvit/configs/``) and the SLURM batch templates
(``magvit/launch/slurm/``). A checkout reaches the same files through its top-level ``configs/`` and
``launch/slurm/`` links; an installed wheel only through here.
"""

from __future__ import annotations

import os
from pathlib import Path

PACKAGE_DIR = Path(__file__).resolve().parent
CONFIG_DIR = PACKAGE_DIR / "configs"
SLURM_DIR = PACKAGE_DIR / "launch" / "slurm"


def find_config(path: str | os.PathLike) -> Path:
    """``path`` as given when it exists (a user's own file, or ``configs/...`` in a checkout); otherwise a
    ``configs/<kind>/<name>`` path is looked up among the packaged configs, so the defaults work from any
    directory once installed. A path found in neither place comes back unchanged (the caller reports it)."""
    given = Path(path)
    if given.exists() or given.is_absolute():
        return given
    parts = given.parts
    if parts and parts[0] == "configs" and (CONFIG_DIR.joinpath(*parts[1:])).is_file():
        return CONFIG_DIR.joinpath(*parts[1:])
    return given
