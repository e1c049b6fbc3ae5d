"""Shared pieces of the benchmark scripts: timing, machine description, tables (terminal and markdown).

The scripts run in the separate benchmark environment (``bash benchmarks/setup_env.sh`` -> ``.venv-bench``), where
the project and its peers share one torch, and time both sides of a comparison in the same process, one after the
other, with the same number of threads.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import os
import platform
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import torch


@dataclass
class Timing:
    """Seconds per call over the timed repetitions (after warm-up)."""

    times: list[float]

    @property
    def median(self) -> float:
        return statistics.median(self.times)

    @property
    def spread(self) -> float:
        """(max - min) / median: how noisy the repetitions were."""
        return (max(self.times) - min(self.times)) / self.median if self.median > 0 else 0.0

    @property
    def reps(self) -> int:
        return len(self.times)


def time_call(fn: Callable[[], object], warmup: int = 1, min_reps: int = 3, max_reps: int = 20,
              max_seconds: float = 20.0) -> Timing:
    """Time ``fn`` (wall clock): ``warmup`` untimed calls, then at least ``min_reps`` timed calls, more until
    ``max_reps`` or until ``max_seconds`` of timed calls have passed."""
    for _ in range(warmup):
        fn()
    times: list[float] = []
    start = time.perf_counter()
    while len(times) < max_reps and (len(times) < min_reps or time.perf_counter() - start < max_seconds):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return Timing(times)


def time_pair(fn_a: Callable[[], object], fn_b: Callable[[], object], warmup: int = 1, min_reps: int = 2,
              max_reps: int = 20, max_seconds: float = 20.0) -> tuple[Timing, Timing]:
    """Time two functions interleaved (a b, b a, a b, ...) so that a change of machine load during the measurement
    hits both sides alike. Stops after ``max_reps`` rounds, or once both have ``min_reps`` and ``max_seconds`` of
    timed calls (both sides together) have passed."""
    for _ in range(warmup):
        fn_a()
        fn_b()
    times: tuple[list[float], list[float]] = ([], [])
    start = time.perf_counter()
    rounds = 0
    while rounds < max_reps and (rounds < min_reps or time.perf_counter() - start < max_seconds):
        order = (0, 1) if rounds % 2 == 0 else (1, 0)
        for which in order:
            fn = fn_a if which == 0 else fn_b
            t0 = time.perf_counter()
            fn()
            times[which].append(time.perf_counter() - t0)
        rounds += 1
    return Timing(times[0]), Timing(times[1])


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def load_average() -> str:
    try:
        one, five, fifteen = os.getloadavg()
        return f"{one:.2f} / {five:.2f} / {fifteen:.2f}"
    except OSError:
        return "n/a"


def machine_description(threads: int) -> str:
    """One paragraph: date, CPU, cores, torch build, threads and load average (1 / 5 / 15 min)."""
    import importlib.metadata as md

    versions = []
    for package in ("magvit2-pytorch", "vector-quantize-pytorch", "phenaki-pytorch", "transformers"):
        try:
            versions.append(f"{package} {md.version(package)}")
        except md.PackageNotFoundError:
            pass
    now = _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    return (f"{now}; {cpu_name()}, {os.cpu_count()} logical cores; Python {platform.python_version()}, "
            f"torch {torch.__version__}{', ' + ', '.join(versions) if versions else ''}; "
            f"torch threads {threads}; code {code_version()}; load average at start {load_average()}")


def code_version() -> str:
    """The commit of the code under test: ``$MAGVIT_CODE_VERSION`` if set (a run from an exported snapshot), else
    ``git describe --always --dirty`` of the checkout the benchmarks live in."""
    import subprocess

    if os.environ.get("MAGVIT_CODE_VERSION"):
        return os.environ["MAGVIT_CODE_VERSION"]
    try:
        out = subprocess.run(["git", "describe", "--always", "--dirty"], cwd=Path(__file__).resolve().parent,
                             capture_output=True, text=True, timeout=10)
        return out.stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def setup_threads(threads: int) -> None:
    """Same intra-op thread count for both sides of every comparison."""
    torch.set_num_threads(threads)
    try:
        torch.set_num_interop_threads(1)
    except RuntimeError:  # already set in this process
        pass


def add_precision_arguments(p: argparse.ArgumentParser) -> None:
    """``--precision auto|fp32|bf16`` (default auto: bf16 autocast only where the CPU computes bf16 natively, so no
    side ever runs emulated bf16 by default; ``magvit.precision``), with ``--fp32`` / ``--bf16`` as short forms."""
    p.add_argument("--precision", choices=("auto", "fp32", "bf16"), default="auto",
                   help="auto (default): bf16 autocast where the hardware does bf16 natively (AMX, AVX512-BF16, "
                        "CUDA sm_80+), else fp32; bf16: bf16 autocast on every side")
    p.add_argument("--fp32", dest="precision", action="store_const", const="fp32", help="--precision fp32")
    p.add_argument("--bf16", dest="precision", action="store_const", const="bf16", help="--precision bf16")


def use_bf16(choice: str, device: str = "cpu") -> bool:
    """Resolve ``--precision`` for ``device``: True for bf16 autocast. Prints the choice and why on stderr, and
    warns when bf16 was asked for on hardware that emulates it."""
    from magvit.precision import describe, emulation_warning, resolve_precision, warn_once

    requested = "autocast-bf16" if choice == "bf16" else choice
    resolved, support = resolve_precision(requested, device)
    print(f"precision: {describe(requested, resolved, support)}", file=sys.stderr)
    warn_once(emulation_warning(resolved, support))
    return resolved == "autocast-bf16"


def native_bf16(device: str = "cpu") -> bool:
    """Whether ``device`` computes bf16 natively (comparisons that time bf16 itself skip it where it is emulated)."""
    from magvit.precision import bf16_support

    return bf16_support(device).native


def parser(description: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--threads", type=int, default=2, help="torch threads for both sides (default: %(default)s)")
    p.add_argument("--markdown", metavar="PATH", help="also write the table(s) as markdown to PATH")
    p.add_argument("--quick", action="store_true", help="smallest settings, for checking that the script runs")
    return p


class Table:
    """Rows of strings printed as an aligned terminal table and as markdown."""

    def __init__(self, title: str, columns: Sequence[str], notes: Sequence[str] = ()):
        self.title = title
        self.columns = list(columns)
        self.rows: list[list[str]] = []
        self.notes = list(notes)

    def add(self, *cells: object) -> None:
        if len(cells) != len(self.columns):
            raise ValueError(f"expected {len(self.columns)} cells, got {len(cells)}")
        self.rows.append([str(c) for c in cells])
        print("  " + " | ".join(self.rows[-1]), file=sys.stderr, flush=True)  # progress while it runs

    def text(self) -> str:
        widths = [max(len(c), *(len(r[i]) for r in self.rows)) if self.rows else len(c)
                  for i, c in enumerate(self.columns)]
        line = lambda cells: "  ".join(c.ljust(w) for c, w in zip(cells, widths))
        out = [self.title, line(self.columns), line(["-" * w for w in widths])] + [line(r) for r in self.rows]
        return "\n".join(out + self.notes)

    def markdown(self) -> str:
        out = [f"### {self.title}", "", "| " + " | ".join(self.columns) + " |",
               "|" + "|".join("---" for _ in self.columns) + "|"]
        out += ["| " + " | ".join(r) + " |" for r in self.rows]
        if self.notes:
            out += [""] + self.notes
        return "\n".join(out) + "\n"


def emit(tables: Sequence[Table], header: str, markdown_path: str | None) -> None:
    """Print the tables; write them (with the machine header) to ``markdown_path`` when given."""
    print()
    print(header)
    for table in tables:
        print()
        print(table.text())
    if markdown_path:
        path = Path(markdown_path)
        path.parent.mkdir(parents=True, exist_ok=True)
        body = f"_{header}_\n\n" + "\n".join(t.markdown() for t in tables)
        path.write_text(body)
        print(f"\nmarkdown written to {path}")


def fmt_seconds(seconds: float) -> str:
    return f"{seconds * 1000:.0f} ms" if seconds < 10 else f"{seconds:.1f} s"


def ratio(ours: float, theirs: float) -> str:
    """``theirs / ours`` for times: > 1 means this project is faster."""
    return f"{theirs / ours:.2f}x" if ours > 0 else "n/a"
