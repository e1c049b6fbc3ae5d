"""Progress on long work that suits where it goes: a tqdm bar on a terminal; in a log file (stderr redirected, SLURM's
output file, CI) one plain line every ``interval`` seconds instead of carriage-return redraws (a 150-step run
otherwise leaves a single ~20 kB line of redraws in its log).
"""

from __future__ import annotations

import sys
import time
from typing import Any, Callable, Iterable, Iterator, TextIO

LOG_INTERVAL = 30.0  # seconds between progress lines in a log


def is_terminal(stream: TextIO) -> bool:
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):  # no isatty, or a closed stream
        return False


class LogProgress:
    """The part of tqdm's interface this project uses (iterate, ``update``, ``set_postfix``, ``close``), written as
    one line per ``interval`` seconds: ``desc: n/total (pct) elapsed, rate[, postfix]``; a line at the start and one
    at the end."""

    def __init__(self, iterable: Iterable | None = None, total: int | None = None, initial: int = 0,
                 desc: str = "", unit: str = "it", disable: bool = False, file: TextIO | None = None,
                 interval: float = LOG_INTERVAL, clock: Callable[[], float] = time.monotonic, **_ignored: Any):
        if total is None and iterable is not None and hasattr(iterable, "__len__"):
            total = len(iterable)  # type: ignore[arg-type]
        self.iterable, self.total, self.n, self.initial = iterable, total, initial, initial
        self.desc, self.unit, self.disable, self.interval, self.clock = desc, unit, disable, interval, clock
        self.file = file if file is not None else sys.stderr
        self.postfix = ""
        self.start = self.last = clock()
        self.closed = False
        self.written = None  # the count of the last line written
        self._write()

    def __iter__(self) -> Iterator:
        if self.iterable is None:
            raise TypeError("LogProgress: nothing to iterate")
        try:
            for item in self.iterable:
                yield item
                self.update(1)
        finally:
            self.close()

    def __enter__(self) -> "LogProgress":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def update(self, n: int = 1) -> None:
        self.n += n
        if self.clock() - self.last >= self.interval:
            self._write()

    def set_postfix(self, ordered_dict: dict | None = None, refresh: bool = True, **kwargs: Any) -> None:
        items = {**(ordered_dict or {}), **kwargs}
        self.postfix = ", ".join(f"{k}={v}" for k, v in items.items())

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            if self.written != self.n:  # the last count not yet reported
                self._write()

    def line(self) -> str:
        elapsed = self.clock() - self.start
        done = f"{self.n}/{self.total}" if self.total else f"{self.n}"
        pct = f" ({100.0 * self.n / self.total:.0f}%)" if self.total else ""
        rate = (self.n - self.initial) / elapsed if elapsed > 0 else 0.0
        text = f"{self.desc + ': ' if self.desc else ''}{done} {self.unit}{pct}, {_clock(elapsed)} elapsed, " \
               f"{rate:.3g} {self.unit}/s"
        if self.total and rate > 0 and self.n < self.total:
            text += f", {_clock((self.total - self.n) / rate)} left"
        return text + (f", {self.postfix}" if self.postfix else "")

    def _write(self) -> None:
        self.last, self.written = self.clock(), self.n
        if self.disable:
            return
        try:
            self.file.write(self.line() + "\n")
            self.file.flush()
        except (OSError, ValueError):  # a closed or full log must not stop the work
            pass


def _clock(seconds: float) -> str:
    seconds = int(seconds)
    h, rest = divmod(seconds, 3600)
    return f"{h}:{rest // 60:02d}:{rest % 60:02d}" if h else f"{rest // 60:02d}:{rest % 60:02d}"


def progress(iterable: Iterable | None = None, file: TextIO | None = None, terminal_only: bool = False,
             **kwargs: Any):
    """A progress bar on ``file`` (default stderr): tqdm under a terminal, :class:`LogProgress` lines otherwise.
    Takes tqdm's keyword arguments (``total``, ``initial``, ``desc``, ``unit``, ``disable``). ``terminal_only``:
    nothing in a log (a few seconds' inner loop, e.g. one video's decoding steps)."""
    file = file if file is not None else sys.stderr
    if not is_terminal(file):
        if terminal_only:
            kwargs["disable"] = True
        return LogProgress(iterable, file=file, **kwargs)
    from tqdm import tqdm

    kwargs.setdefault("dynamic_ncols", True)
    return tqdm(iterable, file=file, **kwargs)
