"""Command-line plumbing shared by every command (``magvit.prep.*``, ``magvit.launch.*``, ``magvit.generate``,
``magvit.evaluate``): the one user-error class, the one argument parser, the one way a command exits.

A user mistake (bad argument, missing input, a config that does not fit, a checkpoint that cannot be written or
read) is one line on stderr and exit status 2, never a traceback; Ctrl-C is one line and status 130.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any, Callable, NoReturn, Sequence
from .config import ConfigError
from .fileio import write_text_atomic

EXIT_USAGE = 2
EXIT_INTERRUPTED = 130


class UsageError(ValueError):
    """A user mistake (bad argument, missing input, models that do not fit together): one line, exit status 2."""


class ArgumentParser(argparse.ArgumentParser):
    """``argparse`` whose errors are one line on stderr (no usage dump) and exit status 2."""

    def error(self, message: str) -> NoReturn:
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message} (see --help)\n")


def command_name(module_command: str) -> str:
    """What a command calls itself in its help and errors: an installed console script its own name
    (``magvit-index``), ``python -m ...`` the given ``module_command`` (``python -m data_prep.index``)."""
    name = Path(sys.argv[0]).name
    return name if name.startswith("magvit-") else module_command


def _user_errors() -> tuple[type[BaseException], ...]:
    from .checkpoint import CheckpointError  # lazy: keeps `import magvit.cli` free of torch

    return UsageError, ConfigError, CheckpointError


def run_main(prog: str | None, main: Callable[[Sequence[str] | None], Any], argv: Sequence[str] | None = None,
             interrupted: str = "interrupted") -> int:
    """Call ``main(argv)``; a user error (``UsageError``, ``ConfigError``, ``CheckpointError``) or an OS error on
    a path (unwritable output, full disk) becomes one line and exit 2, Ctrl-C one line (``interrupted``) and 130.
    Lines start with ``prog: error:`` (``None``: just ``error:``, the trainers' and generate's format)."""
    prefix = f"{prog}: " if prog else ""
    try:
        return int(main(argv) or 0)
    except KeyboardInterrupt:
        print(f"{prefix}{interrupted}", file=sys.stderr)
        return EXIT_INTERRUPTED
    except OSError as err:
        where = f": {err.filename}" if err.filename else ""
        print(f"{prefix}error: {err.strerror or err}{where}", file=sys.stderr)
        return EXIT_USAGE
    except Exception as err:
        if not isinstance(err, _user_errors()):
            raise
        print(f"{prefix}error: {err}", file=sys.stderr)
        return EXIT_USAGE


def write_json(path: str | os.PathLike, data: Any) -> Path:
    """Write JSON atomically (temp file, then rename)."""

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
