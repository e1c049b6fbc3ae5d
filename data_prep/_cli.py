"""Shared command-line plumbing: one-line errors with exit status 2, progress bars, atomic JSON writes."""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any, NoReturn

EXIT_USAGE = 2


class UsageError(Exception):
    """A user mistake (bad argument, missing input): printed as one line, exit status 2."""


class ArgumentParser(argparse.ArgumentParser):
    """``argparse`` whose errors are one line on stderr (no usage dump) and exit status 2."""

    def error(self, message: str) -> NoReturn:
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message} (see --help)\n")


def run_main(prog: str, main, argv=None) -> int:
    """Call ``main(argv)``; turn ``UsageError`` (and a bad value from the library) into one line + exit 2."""
    try:
        return int(main(argv) or 0)
    except UsageError as err:
        print(f"{prog}: error: {err}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print(f"{prog}: interrupted (finished outputs are kept; rerun to resume)", file=sys.stderr)
        return 130


def progress(iterable=None, **kwargs):
    """A tqdm bar on stderr."""
    from tqdm import tqdm

    kwargs.setdefault("dynamic_ncols", True)
    kwargs.setdefault("file", sys.stderr)
    return tqdm(iterable, **kwargs)


def write_json(path: str | os.PathLike, data: Any) -> Path:
    """Write JSON atomically (temp file, then rename)."""
    from magvit.fileio import write_text_atomic

    return write_text_atomic(path, json.dumps(data, indent=2, ensure_ascii=False) + "\n")


def quiet_decoders() -> None:
    """Silence decord's FFmpeg chatter (reasons are reported by the tools themselves).

    PyAV's own logging is left off (its default): routing FFmpeg logs to Python from decoder threads can deadlock
    threaded decoding.
    """
    try:
        import decord

        decord.logging.set_level(decord.logging.QUIET)
    except Exception:
        pass
