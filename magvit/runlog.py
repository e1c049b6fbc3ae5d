"""A run directory and what a run writes into it as it goes: the layout (``RUN_SUBDIRS``, ``RUN_FILES``), the
guard against starting over a previous run, the recorded config / command / versions, and the metrics
(``metrics.jsonl`` + TensorBoard, :class:`MetricsLogger`; read back by :func:`read_metrics`) with the progress bar.
"""

from __future__ import annotations

import json
import math
import os
import platform
import shlex
import shutil
import sys
import time
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import torch
import yaml

from . import __version__
from . import distributed as dist
from .config import Config
from .fileio import write_text_atomic
from .progress import progress

RUN_SUBDIRS = ("checkpoints", "export", "samples", "tb", "logs")
# wandb/ and wandb_run_id: Weights & Biases' offline runs and the id a resume continues (magvit.tracking)
RUN_FILES = ("metrics.jsonl", "config.yaml", "deepspeed_config.json", "command.txt", "version.txt", "wandb_run_id",
             "wandb")


def previous_run(run_dir: str | os.PathLike) -> str | None:
    """What shows that ``run_dir`` already holds a run (its ``config.yaml``, a checkpoint, logged metrics or an
    export), or None for a new or empty run dir."""
    run_dir = Path(run_dir)
    if (run_dir / "config.yaml").is_file():
        return "config.yaml"
    if (run_dir / "checkpoints").is_dir() and any((run_dir / "checkpoints").iterdir()):
        return "checkpoints/"
    if (run_dir / "metrics.jsonl").is_file() and (run_dir / "metrics.jsonl").stat().st_size > 0:
        return "metrics.jsonl"
    if (run_dir / "export" / "config.json").is_file():
        return "export/"
    return None


def clear_run_dir(run_dir: str | os.PathLike) -> None:
    """Delete the previous run of ``run_dir`` (``--overwrite``): the run folders and files the training scripts
    write (``RUN_SUBDIRS``, ``RUN_FILES``, an interrupted export's ``.export.*`` folders); nothing else. In a SLURM
    job the running job's own files in ``logs/`` (``*-<SLURM_JOB_ID>*``, open for its output) stay."""
    run_dir = Path(run_dir)
    job = os.environ.get("SLURM_JOB_ID")
    logs = [p for p in (run_dir / "logs").iterdir() if not (job and f"-{job}" in p.name)] \
        if (run_dir / "logs").is_dir() and not (run_dir / "logs").is_symlink() else []
    subs = [run_dir / sub for sub in RUN_SUBDIRS if sub != "logs" or (run_dir / sub).is_symlink()]
    for path in [*subs, *logs, *(run_dir / name for name in RUN_FILES), *run_dir.glob(".export.*")]:
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        elif path.exists() or path.is_symlink():
            path.unlink()


class RunLock:
    """An exclusive lock on a run dir for the life of this process (``flock`` on the folder itself, so nothing is
    written into it): a second training in the same folder is refused instead of interleaving its metrics and
    checkpoints with the first. The kernel drops the lock when the holder dies, so a crashed run never leaves a
    stale lock; the refusal names the holder's pid (from ``/proc/locks``) where the OS tells it, what holds it
    (``holder``: "run", "tokenize run") and the option to change (``option``: "--run-dir", "--out")."""

    def __init__(self, run_dir: str | os.PathLike, option: str = "--run-dir", holder: str = "run"):
        self.run_dir = Path(run_dir)
        self.option, self.holder = option, holder
        self.fd: int | None = None

    def acquire(self) -> str | None:
        """Take the lock: None (also where the filesystem has no ``flock``: nothing to hold), or the one-line
        reason it is held elsewhere. ``OSError`` if the folder cannot be created."""
        import errno
        import fcntl

        self.run_dir.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.run_dir, os.O_RDONLY)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as err:
            os.close(fd)
            if err.errno not in (errno.EWOULDBLOCK, errno.EAGAIN):
                return None  # e.g. a network filesystem without flock: run unlocked, as before
            pid = lock_holder(self.run_dir)
            return (f"{self.run_dir} is in use by another {self.holder}{f' (pid {pid})' if pid else ''}: wait for "
                    f"it to finish, stop it, or use another {self.option}")
        self.fd = fd  # held open: the lock lasts as long as this process (or release())
        return None

    def release(self) -> None:
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None


def lock_holder(path: str | os.PathLike) -> int | None:
    """The pid holding a ``flock`` on ``path``, from ``/proc/locks`` (Linux), else None."""
    try:
        inode = Path(path).stat().st_ino
        with open("/proc/locks", encoding="ascii") as f:
            for line in f:
                fields = line.split()  # "1: FLOCK ADVISORY WRITE 1234 08:01:5678 0 EOF"
                if len(fields) >= 6 and fields[1] == "FLOCK" and fields[5].rsplit(":", 1)[-1] == str(inode):
                    return int(fields[4])
    except (OSError, ValueError):
        pass
    return None


def rerun_problem(run_dir: Path, resume: bool, overwrite: bool) -> str | None:
    """The one-line refusal of a fresh start (no resume, no overwrite) in a run dir that already holds a run."""
    found = None if resume or overwrite else previous_run(run_dir)
    if found is None:
        return None
    return (f"{run_dir} already holds a run ({found}): pass --resume auto to continue it, --overwrite to delete it "
            "and start over, or another --run-dir")


def version_info() -> dict[str, str]:
    info = {"magvit": __version__, "torch": torch.__version__, "python": platform.python_version()}
    try:
        import deepspeed

        info["deepspeed"] = deepspeed.__version__
    except ImportError:
        pass
    return info


def setup_run_dir(run_dir: str | os.PathLike, config: Config, deepspeed_config: Mapping[str, Any] | None,
                  argv: Sequence[str]) -> Path:
    """Create the run layout and record the resolved config, DeepSpeed config, command line (appended, one line
    per launch) and package versions. Call on rank 0 only."""
    run_dir = Path(run_dir)
    for sub in RUN_SUBDIRS:
        (run_dir / sub).mkdir(parents=True, exist_ok=True)
        probe = run_dir / sub / f".write-test-{os.getpid()}"  # a read-only checkpoints/ fails now, not at step N
        probe.write_text("")
        probe.unlink()
    # a crash mid-write must not leave a torn config.yaml: resume compares against it
    write_text_atomic(run_dir / "config.yaml", yaml.safe_dump(config.to_dict(), sort_keys=False))
    if deepspeed_config is not None:
        write_text_atomic(run_dir / "deepspeed_config.json", json.dumps(deepspeed_config, indent=2) + "\n")
    launcher = {k: os.environ[k] for k in ("WORLD_SIZE", "SLURM_JOB_ID") if k in os.environ}
    line = f"{time.strftime('%Y-%m-%dT%H:%M:%S')} {json.dumps(launcher)} {shlex.join([sys.executable, *argv])}\n"
    with open(run_dir / "command.txt", "a") as f:
        f.write(line)
    write_text_atomic(run_dir / "version.txt", "".join(f"{k} {v}\n" for k, v in version_info().items()))
    return run_dir


class MetricsLogger:
    """Scalars to ``RUN_DIR/metrics.jsonl`` (one JSON object per line, flushed) and to ``tracker``
    (``magvit.tracking.Tracker``: TensorBoard, Weights & Biases), which the caller closes. Disabled (no-op) on ranks
    other than 0."""

    def __init__(self, run_dir: str | os.PathLike, enabled: bool = True, tracker: Any = None):
        self.enabled = enabled
        self._file = None
        self._tracker = tracker
        if not enabled:
            return
        self._file = open(Path(run_dir) / "metrics.jsonl", "a")

    def log(self, step: int, metrics: Mapping[str, float], **extra: Any) -> None:
        if not self.enabled:
            return
        clean = {k: float(v) for k, v in metrics.items()}
        record = {"step": int(step), "time": round(time.time(), 3), **extra, **clean}
        self._file.write(json.dumps(record) + "\n")
        self._file.flush()
        if self._tracker is not None:
            self._tracker.log_scalars(step, clean)

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None


def read_metrics(path: str | os.PathLike) -> list[dict[str, Any]]:
    """All records of a ``metrics.jsonl`` (the one reader: a torn last line from a killed run, or any line that is
    not a JSON object, is ignored)."""
    records = []
    for line in Path(path).read_text().splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(record, dict):
            records.append(record)
    return records


def progress_bar(max_steps: int, step: int, enabled: bool) -> Any:
    """The progress of optimizer steps on stderr: a tqdm bar on a terminal, a plain line every ~30 s in a log
    (``magvit.progress``); disabled: nothing is written."""
    return progress(total=max_steps, initial=step, disable=not enabled, unit="step")


class MetricsWindow:
    """The metrics of the micro-steps since the last log line, and the optimizer steps and time they took.

    ``log`` writes the means over the window, averaged over ranks (a collective: every rank calls it at the same
    step), then ``extra`` (e.g. learning rates), the throughput ``rate_key`` (``items_per_step`` per optimizer
    step), ``perf/step_s``, ``epoch`` and the peak memory of the busiest and the idlest rank; shows ``loss_key``
    and the throughput (as ``rate_label``) on the progress bar, and starts a new window.
    """

    def __init__(self, metrics_log: MetricsLogger, bar: Any, items_per_step: int, rate_key: str, loss_key: str,
                 rate_label: str, clock: Callable[[], float] = time.perf_counter):
        self.metrics_log, self.bar, self.items_per_step = metrics_log, bar, items_per_step
        self.rate_key, self.loss_key, self.rate_label, self.clock = rate_key, loss_key, rate_label, clock
        self.values: dict[str, list[float]] = {}
        self.steps = 0
        self.start = clock()

    def add(self, metrics: Mapping[str, float]) -> None:
        """One micro-step's metrics."""
        for key, value in metrics.items():
            self.values.setdefault(key, []).append(value)

    def end_step(self) -> None:
        """An optimizer step is complete."""
        self.steps += 1
        self.bar.update(1)

    def log(self, step: int, extra: Mapping[str, float], epoch: int) -> dict[str, float]:
        keys = sorted(self.values)
        means = dict(zip(keys, dist.all_reduce_mean([sum(self.values[k]) / len(self.values[k]) for k in keys])))
        elapsed = self.clock() - self.start
        means.update({**extra, self.rate_key: self.items_per_step * self.steps / elapsed,
                      "perf/step_s": elapsed / self.steps, "epoch": epoch})
        peaks = dist.all_gather_scalar(dist.peak_memory_mb())
        means.update({"mem/peak_mb_max": max(peaks), "mem/peak_mb_min": min(peaks)})
        self.metrics_log.log(step, means)
        self.bar.set_postfix(**{"loss": f"{means.get(self.loss_key, math.nan):.4f}",
                                self.rate_label: f"{means[self.rate_key]:.1f}"})
        self.values, self.steps, self.start = {}, 0, self.clock()
        return means
