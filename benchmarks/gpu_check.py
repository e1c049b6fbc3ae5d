"""The project's GPU check: one command, at most ~10 minutes on one CUDA machine, one markdown table.

    bash benchmarks/gpu_check.sh [--out benchmarks/results/gpu_check.md] [--parts demo,resume,throughput,peer]
                                 [--steps 8] [--time-limit 540] [--work DIR]

Each part runs in its own process with its own share of ``--time-limit`` (shares below; what a part leaves unused
goes to the later ones). A part that fails or runs out of time is a row of the table and the next part runs; the exit
status is 1 when any row failed, else 0.

- ``demo``: the demo's training path (``launch/demo.sh``) for ``--steps`` steps each: the deepspeed launcher with one
  rank per GPU (NCCL, ``DS_ACCELERATOR=cuda``), ZeRO-2, ``configs/tokenizer/demo.yaml`` (the discriminator on from
  step ``steps / 4``), ``python -m data_prep.tokenize`` of the train and val splits, ``configs/transformer/demo.yaml``
  on those token shards with held-out scoring. The clips are synthetic (a textured square moving over a gradient,
  written as mp4 in the scratch folder): nothing is downloaded.
- ``resume``: both runs again, stopped at ``steps / 2`` and resumed with ``--resume auto`` to ``steps``, against the
  uninterrupted runs of the demo part (made here when that part did not run): the largest absolute difference of the
  logged losses after the stop, of every weight in DeepSpeed's model states of the last checkpoint, and of the EMA.
  Every training launch of the check runs under deterministic algorithms (``torch.use_deterministic_algorithms``,
  cuDNN deterministic, ``CUBLAS_WORKSPACE_CONFIG``) and keeps the LR constant after the warm-up, so that the two
  runs can agree bit for bit (the cosine's end follows ``train.max_steps``, which the cut run changes). Ops that
  have no deterministic CUDA kernel are named in the row; a difference with none named is a failure.
- ``throughput``: training steps of ``configs/tokenizer/B.yaml``, ``B2.yaml`` (generator + discriminator step with
  R1, as ``train_tokenizer`` after ``disc_start``) and ``configs/transformer/B.yaml`` (on the B tokenizer's token
  grid) with ``train.precision=autocast-bf16`` on one GPU: the training scripts' own step functions on the plain
  module with its torch Adam (no DeepSpeed), warm-up steps, then timed steps (``torch.cuda.synchronize``). FLOPs of
  one step from ``torch.utils.flop_counter.FlopCounterMode`` (matmuls, convolutions and attention, forward and
  backward; elementwise work uncounted, so the fraction of peak is a lower bound), against the GPU's datasheet dense
  bf16 peak (:data:`PEAK_BF16_TFLOPS`); peak memory from the CUDA allocator.
- ``peer``: ``magvit2-pytorch`` at our tokenizer's parameter count (``benchmarks/peers.py``) on the same GPU, same
  clips, same bf16 autocast: step time and TFLOP/s beside ours. Runs with ``.venv-bench/bin/python`` when that
  exists; without the package the row says so and does not fail.

Without a CUDA device it checks its arguments and prints one line. ``--device cpu`` (not in ``--help``) runs the
same code on the CPU with tiny sizes, for the tests.
"""

from __future__ import annotations

import dataclasses
import datetime as _dt
import importlib.util
import json
import math
import os
import platform
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Sequence

ROOT = Path(__file__).resolve().parents[1]
for _path in (ROOT / "benchmarks", ROOT):  # run by path (and by the deepspeed launcher): the checkout's modules
    if str(_path) not in sys.path:
        sys.path.insert(0, str(_path))

PROG = "gpu_check"
PARTS = ("demo", "resume", "throughput", "peer")
#: relative shares of the time left when a part starts (the parts not selected take none): demo and resume are
#: mostly launcher and import start-up (~10-20 s per launch on a GPU machine), 2 and 4 launches
SHARES = {"demo": 4.0, "resume": 4.0, "throughput": 2.5, "peer": 1.5}
RESERVE_S = 10.0  # kept back from the parts for writing the table
#: datasheet dense (no sparsity) bf16 tensor-core peaks in TFLOP/s, first matching pattern of the device name wins
PEAK_BF16_TFLOPS = ((r"H100.*PCIe", 756.0), (r"H100", 989.0), (r"H200", 989.0), (r"A100", 312.0),
                    (r"L40S", 362.0), (r"\bA10\b", 125.0))
NOT_INSTALLED = "not installed (run benchmarks/setup_env.sh first and carry .venv-bench)"
EXEC_DETERMINISTIC = "--exec-deterministic"  # internal: run a training script under deterministic algorithms
RUN_PART = "--run-part"  # internal: run one part (a JSON spec) in this process
DETERMINISTIC_ENV = {"CUBLAS_WORKSPACE_CONFIG": ":4096:8"}  # cuBLAS reads it at its first handle
_NONDETERMINISTIC = re.compile(r"(\S+) does not have a deterministic implementation")


# ------------------------------------------------------------------------------------------------------------------
# What the parts run on a device: real sizes on CUDA, tiny ones for the CPU dry run
# ------------------------------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class Model:
    """One training step of the throughput part."""

    label: str
    kind: str  # "tokenizer" | "transformer"
    config: str
    tokens_of: str = ""  # transformer: the tokenizer config whose token grid and codebook it models
    overrides: tuple[str, ...] = ()


@dataclasses.dataclass(frozen=True)
class Profile:
    device: str
    accelerator: str  # DS_ACCELERATOR of the training launches
    videos: tuple[int, int]  # synthetic train / val videos
    video_shape: tuple[int, int]  # frames, size of each
    tokenizer_overrides: tuple[str, ...]  # on top of configs/tokenizer/demo.yaml
    transformer_overrides: tuple[str, ...]  # on top of configs/transformer/demo.yaml
    models: tuple[Model, ...]
    precision: str  # of the throughput and peer steps
    warmup: int  # untimed steps before the timed ones
    timed: int  # at most this many timed steps (fewer when the part's time runs short, at least 2)
    peer_clip: tuple[int, int, int, int]  # frames, size, batch, our base width


PROFILES = {
    "cuda": Profile(
        "cuda", "cuda", videos=(12, 4), video_shape=(12, 64), tokenizer_overrides=(), transformer_overrides=(),
        models=(Model("tokenizer B", "tokenizer", "configs/tokenizer/B.yaml"),
                Model("tokenizer B2", "tokenizer", "configs/tokenizer/B2.yaml"),
                Model("transformer B", "transformer", "configs/transformer/B.yaml",
                      tokens_of="configs/tokenizer/B.yaml")),
        precision="autocast-bf16", warmup=3, timed=20, peer_clip=(17, 128, 4, 64)),
    # the CPU dry run: the same code at sizes that run in seconds on 2 cores (fp32: most CPUs emulate bf16)
    "cpu": Profile(
        "cpu", "cpu", videos=(4, 2), video_shape=(8, 32),
        tokenizer_overrides=("data.num_frames=5", "data.image_size=32", "data.batch_size=1", "data.num_workers=0",
                             "data.clips_per_video=1"),
        transformer_overrides=("data.batch_size=2", "data.val_clips=2"),
        models=(Model("tokenizer tiny", "tokenizer", "configs/tokenizer/tiny.yaml",
                      overrides=("data.num_frames=4", "data.image_size=16", "data.batch_size=1")),
                Model("transformer tiny", "transformer", "configs/transformer/tiny.yaml",
                      tokens_of="configs/tokenizer/tiny.yaml", overrides=("data.batch_size=2",))),
        precision="fp32", warmup=0, timed=2, peer_clip=(9, 32, 1, 16)),  # the counted step warms up
}


# ------------------------------------------------------------------------------------------------------------------
# Rows, arithmetic and the table
# ------------------------------------------------------------------------------------------------------------------
@dataclasses.dataclass
class Row:
    part: str  # what was checked, e.g. "demo: tokenizer (configs/tokenizer/demo.yaml)"
    status: str  # "ok" | "fail" | "skip" (not run, not a failure) | "note" (ran, with a caveat; not a failure)
    result: str
    numbers: str = ""

    @property
    def cell(self) -> str:
        return f"FAIL: {self.result}" if self.status == "fail" else self.result


def peak_bf16_tflops(device_name: str) -> float | None:
    """Datasheet dense bf16 peak of a GPU by its name (``torch.cuda.get_device_name``), None when unknown."""
    for pattern, peak in PEAK_BF16_TFLOPS:
        if re.search(pattern, device_name):
            return peak
    return None


def tflops(flops: float, seconds: float) -> float:
    return flops / seconds / 1e12 if seconds > 0 else math.nan


def throughput_numbers(flops: float, seconds: float, items: int, item: str, peak: float | None,
                       peak_bytes: int | None) -> str:
    """``"123.4 ms/step, 64.8 clips/s; 12.35 TFLOP/step -> 100.1 TFLOP/s = 10.1% of 989; peak 20.1 GiB"``."""
    achieved = tflops(flops, seconds)
    share = f" = {achieved / peak:.1%} of {peak:.0f}" if peak else " (peak n/a)"
    memory = f"; peak {peak_bytes / 2**30:.1f} GiB" if peak_bytes is not None else ""
    return (f"{seconds * 1e3:.1f} ms/step, {items / seconds:.1f} {item}/s; {flops / 1e12:.3g} TFLOP/step -> "
            f"{achieved:.1f} TFLOP/s{share}{memory}")


def render_markdown(title: str, header: Sequence[str], rows: Sequence[Row], notes: Sequence[str]) -> str:
    def clean(text: str) -> str:  # a cell stays one cell
        return " ".join(str(text).replace("|", "\\|").split())

    lines = [f"### {title}", ""] + [f"- {h}" for h in header] + ["", "| part | result | numbers |", "|---|---|---|"]
    lines += [f"| {clean(r.part)} | {clean(r.cell)} | {clean(r.numbers)} |" for r in rows]
    return "\n".join(lines + ([""] + list(notes) if notes else [])) + "\n"


def part_budgets(selected: Sequence[str], remaining: float) -> dict[str, float]:
    """Seconds for each selected part if none leaves time unused (the orchestrator recomputes before each part)."""
    total = sum(SHARES[p] for p in selected)
    return {p: remaining * SHARES[p] / total for p in selected}


# ------------------------------------------------------------------------------------------------------------------
# Command line
# ------------------------------------------------------------------------------------------------------------------
def build_parser():
    import argparse

    from magvit.cli import ArgumentParser

    p = ArgumentParser(prog=PROG, description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "gpu_check.md"),
                   help="markdown file of the table (default: %(default)s)")
    p.add_argument("--parts", default=",".join(PARTS), help=f"comma-separated subset of {','.join(PARTS)} "
                                                            "(default: all)")
    p.add_argument("--steps", type=int, default=8, help="training steps of each demo / resume run (default 8; "
                                                        "the resume runs stop at half)")
    p.add_argument("--time-limit", type=float, default=540.0,
                   help="seconds for the whole check, launches included (default 540)")
    p.add_argument("--work", default=None, help="scratch folder (default: a new temporary folder, removed after)")
    p.add_argument("--device", choices=sorted(PROFILES), default="cuda", help=argparse.SUPPRESS)
    return p


def check_args(args) -> None:
    """``UsageError`` for a bad argument, before anything runs."""
    from magvit.cli import UsageError
    from magvit.fileio import check_writable_dir, check_writable_file

    names = [p.strip() for p in args.parts.split(",") if p.strip()]
    unknown = [p for p in names if p not in PARTS]
    if unknown or not names or len(set(names)) != len(names):
        raise UsageError(f"--parts: a comma-separated subset of {','.join(PARTS)} without repeats, got "
                         f"{args.parts!r}")
    args.parts = [p for p in PARTS if p in names]  # always run in dependency order
    if args.steps < 2:
        raise UsageError(f"--steps must be >= 2 (the resume runs stop at half), got {args.steps}")
    if not math.isfinite(args.time_limit) or args.time_limit < 60:
        raise UsageError(f"--time-limit must be at least 60 seconds, got {args.time_limit}")
    for option, value, check in (("--out", args.out, check_writable_file), ("--work", args.work, check_writable_dir)):
        try:
            if value:
                check(value)
        except ValueError as err:
            raise UsageError(f"{option}: {err}") from None


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    check_args(args)
    import torch

    if args.device == "cuda" and not torch.cuda.is_available():
        print(f"{PROG}: no CUDA device is available (torch {torch.__version__}): nothing to check")
        return 0
    start = time.monotonic()
    args.check = f"{os.getpid()}-{time.time()}"  # this check's id: what it started and did not finish stays so
    work = Path(args.work) if args.work else Path(tempfile.mkdtemp(prefix="gpu_check_"))
    rows = run_parts(args, work, start)
    failed = any(r.status == "fail" for r in rows)
    if not args.work and not failed:
        shutil.rmtree(work, ignore_errors=True)
    header = environment(args.device) + [f"wall time {time.monotonic() - start:.0f} s of {args.time_limit:.0f}; "
                                         f"command: `{' '.join(['gpu_check', *(argv or sys.argv[1:])])}`"
                                         + (f"; logs in {work / 'logs'}" if failed or args.work else "")]
    text = render_markdown("GPU check", header, rows, notes(PROFILES[args.device]))
    from magvit.fileio import write_text_atomic

    out = write_text_atomic(args.out, text)
    print(text + f"\nwritten to {out}")
    return 1 if failed else 0


def notes(profile: Profile) -> list[str]:
    return ["Training runs: `deepspeed --num_accelerators <devices>` (one rank per GPU), ZeRO-2, on synthetic clips; "
            "LR constant after the warm-up and deterministic algorithms, so the resume part can compare bit for bit.",
            f"Throughput: the training scripts' step functions on one {profile.device} device without DeepSpeed, "
            f"{profile.precision} over fp32 weights; median of the timed steps after {profile.warmup} warm-up "
            "step(s) and the counted one; FLOPs counted by FlopCounterMode (no elementwise work: the fraction of "
            "the datasheet dense bf16 peak is a lower bound)."]


def environment(device: str) -> list[str]:
    """Lines of the table's header: date, device, versions, code."""
    import importlib.metadata as md

    import torch

    import common

    versions = [f"torch {torch.__version__}", f"Python {platform.python_version()}"]
    try:
        versions.append(f"deepspeed {md.version('deepspeed')}")
    except md.PackageNotFoundError:
        versions.append("deepspeed not installed")
    if device == "cuda":
        names = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
        peak = peak_bf16_tflops(names[0])
        what = (f"{names[0]} x{len(names)} (dense bf16 peak {peak:.0f} TFLOP/s, datasheet)" if peak else
                f"{names[0]} x{len(names)} (dense bf16 peak n/a)")
        versions.insert(1, f"CUDA {torch.version.cuda}, cuDNN {torch.backends.cudnn.version()}")
    else:
        what = f"no GPU: CPU dry run on {common.cpu_name()} ({os.cpu_count()} cores)"
    now = _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    return [f"{now}; {what}", "; ".join(versions), f"code {common.code_version()}"]


# ------------------------------------------------------------------------------------------------------------------
# Orchestration: each part in its own process group, killed when its time is up
# ------------------------------------------------------------------------------------------------------------------
_LIVE: set[subprocess.Popen] = set()


def _kill(proc: subprocess.Popen, grace: float) -> None:
    """SIGTERM to the process group (a part ends its launches, the deepspeed launcher its ranks), SIGKILL after
    ``grace`` seconds."""
    for sig, wait in ((signal.SIGTERM, grace), (signal.SIGKILL, 5.0)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(timeout=wait)
            return
        except subprocess.TimeoutExpired:
            continue


def _end_live(signum, frame) -> None:
    """SIGTERM: end what this process started (quickly: whoever sent it waits only a few seconds)."""
    for proc in list(_LIVE):
        _kill(proc, grace=3.0)
    raise SystemExit(128 + signum)


def run_command(cmd: Sequence[str], env: dict[str, str], timeout: float, log: Path, grace: float = 5.0
                ) -> int | None:
    """Run ``cmd`` in its own process group with its output in ``log``; its exit status, or None when it ran past
    ``timeout`` seconds (the whole group is then ended, :func:`_kill`)."""
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "w") as out:
        proc = subprocess.Popen(list(cmd), cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT,
                                start_new_session=True)
        _LIVE.add(proc)
        try:
            return proc.wait(timeout=max(1.0, timeout))
        except subprocess.TimeoutExpired:
            _kill(proc, grace)
            return None
        finally:
            _LIVE.discard(proc)


def last_error(log: Path, limit: int = 200) -> str:
    """The last exception line of a log (a rank's, not the launcher's report that a rank failed), else the last
    line naming an error, else the last line; shortened."""
    try:
        lines = [l.strip() for l in log.read_text(errors="replace").splitlines() if l.strip()]
    except OSError:
        return "no log"
    lines = [l for l in lines if "CalledProcessError" not in l and "exits with return code" not in l]
    exceptions = [l for l in lines if re.match(r"[\w.]*(Error|Exception|Interrupt)\b", l)]
    errors = exceptions or [l for l in lines if re.search(r"error|Error|Killed|FAILED", l)]
    text = (errors or lines or ["no output"])[-1]
    return text if len(text) <= limit else text[:limit - 3] + "..."


def part_python(part: str) -> tuple[str, str]:
    """(interpreter, PYTHONPATH) of a part: this one, except for the peer when only the benchmark environment has
    it (then without this one's PYTHONPATH, whose wheels may be built for another Python)."""
    here = os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    bench = ROOT / ".venv-bench" / "bin" / "python"
    if part == "peer" and importlib.util.find_spec("magvit2_pytorch") is None and bench.is_file():
        return str(bench), str(ROOT)
    return sys.executable, here


def run_parts(args, work: Path, start: float) -> list[Row]:
    signal.signal(signal.SIGTERM, _end_live)
    rows: list[Row] = []
    for i, part in enumerate(args.parts):
        remaining = args.time_limit - RESERVE_S - (time.monotonic() - start)
        budget = part_budgets(args.parts[i:], remaining)[part]
        if budget < 15:
            rows.append(Row(part, "fail", f"not run: {max(0.0, remaining):.0f} s left of --time-limit"))
            continue
        print(f"{PROG}: {part} ({budget:.0f} s) ...", file=sys.stderr, flush=True)
        found = run_part_process(part, args, work, budget)
        for row in found:
            print(f"  {row.part} | {row.cell} | {row.numbers}", file=sys.stderr, flush=True)
        rows += found
    return rows


def run_part_process(part: str, args, work: Path, budget: float) -> list[Row]:
    spec = {"part": part, "work": str(work), "steps": args.steps, "device": args.device, "check": args.check,
            "deadline": time.time() + budget, "rows": str(work / "rows" / f"{part}.json")}
    spec_path = work / "rows" / f"{part}.spec.json"
    spec_path.parent.mkdir(parents=True, exist_ok=True)
    spec_path.write_text(json.dumps(spec))
    Path(spec["rows"]).unlink(missing_ok=True)
    log = work / "logs" / f"part-{part}.log"
    python, pythonpath = part_python(part)
    env = {**os.environ, "PYTHONPATH": pythonpath, "PYTHONUNBUFFERED": "1"}
    status = run_command([python, str(Path(__file__).resolve()), RUN_PART, str(spec_path)], env,
                         budget + 20, log, grace=10.0)  # the part watches its own deadline; 20 s to stop
    rows = read_rows(Path(spec["rows"]))
    if status is None:
        rows.append(Row(part, "fail", f"timed out after {budget:.0f} s", f"log: {log}"))
    elif status != 0 and not any(r.status == "fail" for r in rows):
        rows.append(Row(part, "fail", f"exit status {status}: {last_error(log)}"))
    return rows


def read_rows(path: Path) -> list[Row]:
    try:
        return [Row(**r) for r in json.loads(path.read_text())]
    except (OSError, ValueError, TypeError):
        return []


# ------------------------------------------------------------------------------------------------------------------
# Inside a part's process
# ------------------------------------------------------------------------------------------------------------------
class Part:
    """A running part: its settings, deadline, scratch folder, and the rows it has reported so far (written after
    each one, so the orchestrator has them even when the part is killed)."""

    def __init__(self, spec: dict[str, Any]):
        self.name, self.steps = spec["part"], int(spec["steps"])
        self.profile = PROFILES[spec["device"]]
        self.work, self.deadline = Path(spec["work"]), float(spec["deadline"])
        self.rows_path, self.check = Path(spec["rows"]), spec.get("check", "")
        self.rows: list[Row] = []

    def left(self) -> float:
        return self.deadline - time.time()

    def report(self, part: str, status: str, result: str, numbers: str = "") -> None:
        self.rows.append(Row(part, status, result, numbers))
        tmp = self.rows_path.with_suffix(".tmp")
        tmp.write_text(json.dumps([dataclasses.asdict(r) for r in self.rows]))
        os.replace(tmp, self.rows_path)

    def attempt(self, part: str, check: Callable[[], tuple[str, str, str]]) -> bool:
        """Run one check (returning ``(status, result, numbers)``); an exception is its failed row."""
        if self.left() < 5:
            self.report(part, "fail", "not run: the part's time is up")
            return False
        try:
            status, result, numbers = check()
        except Exception as err:  # one row per failed check; the part goes on with the next
            status, result, numbers = "fail", f"{type(err).__name__}: {' '.join(str(err).split())[:300]}", ""
        self.report(part, status, result, numbers)
        return status != "fail"


def part_main(spec_path: str) -> int:
    part = Part(json.loads(Path(spec_path).read_text()))
    signal.signal(signal.SIGTERM, _end_live)
    {"demo": demo_part, "resume": resume_part, "throughput": throughput_part, "peer": peer_part}[part.name](part)
    return 0


def exec_deterministic(argv: Sequence[str]) -> None:
    """Run the training script ``argv[0]`` with its arguments under deterministic algorithms (each rank of a
    launch): two runs of the same steps then differ only if the resume does. ``warn_only``: an op without a
    deterministic kernel warns (the resume row names it) instead of stopping the run."""
    import runpy

    import torch

    torch.use_deterministic_algorithms(True, warn_only=True)
    torch.backends.cudnn.benchmark = False
    torch.backends.cudnn.deterministic = True
    sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != ROOT / "benchmarks"]  # the script's own path
    sys.argv = list(argv)
    runpy.run_path(argv[0], run_name="__main__")


# ------------------------------------------------------------------------------------------------------------------
# Data and training launches (demo and resume parts)
# ------------------------------------------------------------------------------------------------------------------
def write_videos(folder: Path, train: int, val: int, frames: int, size: int) -> Path:
    """``train + val`` synthetic clips, written with the project's mp4 writer, and their manifest (the last ``val``
    held out): a textured square moving over a colour gradient; the label is its direction."""
    import numpy as np

    from magvit.data import write_manifest
    from magvit.video_io import write_video

    folder.mkdir(parents=True, exist_ok=True)
    yy, xx = np.mgrid[0:size, 0:size] / size  # (S, S) in [0, 1)
    records = []
    for i in range(train + val):
        rng = np.random.default_rng(i)
        colour, direction = rng.uniform(0.2, 0.8, 3), 1 if i % 2 else -1
        side, y0, x0 = size // 4, int(rng.integers(0, size - size // 4)), int(rng.integers(0, size))
        video = np.empty((frames, size, size, 3), np.float32)
        for t in range(frames):
            video[t] = colour * (0.5 + 0.5 * yy)[..., None] + 0.1 * np.sin(20 * xx + 0.7 * t)[..., None]
            x = (x0 + 2 * direction * t) % (size - side)  # 2 pixels a frame, wrapping around
            video[t, y0:y0 + side, x:x + side] = 1.0 - colour
        path = folder / f"clip{i:03d}.mp4"
        write_video(path, (video.clip(0, 1) * 255).astype(np.uint8), fps=25.0)
        records.append({"path": path.name, "frames": frames, "fps": 25.0, "width": size, "height": size,
                        "duration": frames / 25.0, "codec": "h264", "split": "val" if i >= train else "train",
                        "label": "right" if direction > 0 else "left"})
    return write_manifest(folder / "manifest.jsonl", records)


def launch_env(accelerator: str, ranks: int) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR",
                                                              "MASTER_PORT")}
    env.update(DETERMINISTIC_ENV, DS_ACCELERATOR=accelerator, PYTHONUNBUFFERED="1",
               OMP_NUM_THREADS=str(max(1, (os.cpu_count() or 1) // ranks)),
               PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]).rstrip(":"))
    return env


def ranks_for(device: str) -> int:
    import torch

    return max(1, torch.cuda.device_count()) if device == "cuda" else 1


def train_command(kind: str, run_dir: Path, overrides: Sequence[str], ranks: int, resume: bool) -> list[str]:
    """The deepspeed launcher over ``launch/train_<kind>.py`` with the demo config, each rank under
    :func:`exec_deterministic` (``--no_local_rank``: the ranks read LOCAL_RANK from the environment)."""
    from magvit.distributed import free_port

    return [sys.executable, "-m", "deepspeed.launcher.runner", "--num_accelerators", str(ranks), "--master_port",
            str(free_port()), "--no_local_rank", str(Path(__file__).resolve()), EXEC_DETERMINISTIC,
            str(ROOT / "launch" / f"train_{kind}.py"), "--config", f"configs/{kind}/demo.yaml", "--run-dir",
            str(run_dir), *(["--resume", "auto"] if resume else ["--resume", "never", "--overwrite"]),
            "train.zero_stage=2", *overrides]


def run_overrides(max_steps: int, steps: int) -> list[str]:
    """Overrides of every check run stopping at ``max_steps`` of a ``steps``-step check: a constant LR after the
    warm-up (the cosine's end follows ``max_steps``), a log line each step, validation and a checkpoint at half and
    at the end in every run (so the cut and the whole run do the same work at the stop)."""
    half = steps // 2
    return [f"train.max_steps={max_steps}", "train.min_lr_ratio=1.0", "logging.log_every=1",
            f"logging.sample_every={half}", f"checkpoint.every={half}", "logging.progress=false"]


@dataclasses.dataclass
class Launch:
    status: int | None  # exit status, None: timed out
    seconds: float
    log: Path

    @property
    def ok(self) -> bool:
        return self.status == 0

    def problem(self) -> str:
        what = "timed out" if self.status is None else f"exit status {self.status}"
        return f"{what} after {self.seconds:.0f} s: {last_error(self.log)}"


def launch(part: Part, kind: str, run_dir: Path, overrides: Sequence[str], resume: bool = False) -> Launch:
    ranks = ranks_for(part.profile.device)
    log = part.work / "logs" / f"{run_dir.name}{'-resumed' if resume else ''}.log"
    start = time.monotonic()
    status = run_command(train_command(kind, run_dir, overrides, ranks, resume),
                         launch_env(part.profile.accelerator, ranks), part.left(), log)
    return Launch(status, time.monotonic() - start, log)


class Pipeline:
    """The demo's artefacts in the scratch folder, made once: data, the two uninterrupted runs and the token
    shards. A finished step leaves a marker with its settings, so the resume part reuses the demo part's runs."""

    def __init__(self, part: Part):
        self.part, self.steps, self.profile = part, part.steps, part.profile
        self.root = part.work / "demo"
        self.manifest = self.root / "data" / "manifest.jsonl"
        self.tokens = self.root / "tokens"
        self.runs = {"tokenizer": self.root / "tokenizer", "transformer": self.root / "transformer"}

    def _marker(self, name: str, state: str = "done") -> Path:
        return self.root / f"{name}.{state}.json"

    def _settings(self) -> dict[str, Any]:
        return json.loads(json.dumps({"steps": self.steps, "profile": dataclasses.asdict(self.profile)}))

    def done(self, name: str, state: str = "done") -> bool:
        """Whether step ``name`` reached ``state`` with these settings: ``done`` in any check that used this
        scratch folder, ``started`` in this one."""
        expected = {**self._settings(), **({"check": self.part.check} if state == "started" else {})}
        try:
            return json.loads(self._marker(name, state).read_text()) == expected
        except (OSError, ValueError):
            return False

    def mark(self, name: str, state: str = "done") -> None:
        self._marker(name, state).parent.mkdir(parents=True, exist_ok=True)
        extra = {"check": self.part.check} if state == "started" else {}
        self._marker(name, state).write_text(json.dumps({**self._settings(), **extra}))

    def overrides(self, kind: str, max_steps: int) -> list[str]:
        if kind == "tokenizer":
            own = [f"data.manifest={self.manifest}", f"loss.disc_start={self.steps // 4}", "data.val_clips=2",
                   *self.profile.tokenizer_overrides]
        else:
            own = [f"data.tokens={self.tokens / 'train'}", f"data.val_tokens={self.tokens / 'val'}",
                   *self.profile.transformer_overrides]
        return own + run_overrides(max_steps, self.steps)

    def data(self) -> tuple[str, str, str]:
        train, val = self.profile.videos
        start = time.monotonic()
        write_videos(self.manifest.parent, train, val, *self.profile.video_shape)
        self.mark("data")
        frames, size = self.profile.video_shape
        return "ok", "ok", (f"{train} train + {val} val synthetic clips of {frames}x{size}x{size} (mp4) in "
                            f"{time.monotonic() - start:.1f} s")

    def train(self, kind: str) -> tuple[str, str, str]:
        run = launch(self.part, kind, self.runs[kind], self.overrides(kind, self.steps))
        if not run.ok:
            return "fail", run.problem(), f"log: {run.log}"
        self.mark(kind)
        return "ok", "ok", run_numbers(self.runs[kind], kind, run.seconds)

    def tokenize(self) -> tuple[str, str, str]:
        start, counts = time.monotonic(), {}
        for split in ("train", "val"):
            log = self.part.work / "logs" / f"tokenize-{split}.log"
            cmd = [sys.executable, "-m", "data_prep.tokenize", "--tokenizer", str(self.runs["tokenizer"] / "export"),
                   "--manifest", str(self.manifest), "--out", str(self.tokens / split), "--split", split,
                   "--overwrite"]
            status = run_command(cmd, launch_env(self.profile.accelerator, 1), self.part.left(), log)
            if status != 0:
                what = "timed out" if status is None else f"exit status {status}"
                return "fail", f"{split}: {what}: {last_error(log)}", f"log: {log}"
            counts[split] = json.loads((self.tokens / split / "meta.json").read_text())
        self.mark("tokens")
        meta = counts["train"]
        return "ok", "ok", (f"{meta['num_examples']} train + {counts['val']['num_examples']} val clips -> tokens "
                            f"{'x'.join(map(str, meta['token_grid']))} (codebook {meta['codebook_size']}, "
                            f"{len(meta['condition_tasks'])} condition tasks) in {time.monotonic() - start:.0f} s")

    def ensure(self, label: Callable[[str], str]) -> bool:
        """Every artefact, made where missing; each made one is a row (``label(step)`` names it). A step that
        started and did not finish earlier in this check (it failed, or its part ran out of time) is not tried
        again: a hang would cost its time twice."""
        missing = [m for m in REQUIRED if importlib.util.find_spec(m) is None]
        if missing:
            self.part.report(label("data"), "fail", f"{', '.join(missing)} not importable by {sys.executable} "
                             "(an offline machine: carry .whl/ from `bash benchmarks/gpu_check.sh --fetch-wheels`)")
            return False
        steps = (("data", self.data), ("tokenizer", lambda: self.train("tokenizer")), ("tokens", self.tokenize),
                 ("transformer", lambda: self.train("transformer")))
        for name, make in steps:
            if self.done(name):
                continue
            if self.done(name, "started"):
                self.part.report(label(name), "fail", "not run: it did not finish earlier in this check (above)")
                return False
            self.mark(name, "started")
            if not self.part.attempt(label(name), make):
                return False
        return True


#: what the training launches import beyond torch and the repository (the clips are mp4, written with PyAV)
REQUIRED = ("deepspeed", "av")
LOSS_KEYS = {"tokenizer": ("g/loss", "d/loss"), "transformer": ("loss",)}
ITEMS = {"tokenizer": ("clips", "perf/clips_per_s"), "transformer": ("examples", "perf/examples_per_s")}


def logged(run_dir: Path, key: str) -> dict[int, float]:
    """The last logged value of ``key`` at each step (a resumed run logs the steps after its checkpoint again)."""
    from magvit.runlog import read_metrics

    return {r["step"]: r[key] for r in read_metrics(run_dir / "metrics.jsonl") if key in r}


def run_numbers(run_dir: Path, kind: str, seconds: float) -> str:
    """One cell from a run's metrics: steps, loss first -> last, median step time after the first, rate, memory."""
    loss = logged(run_dir, LOSS_KEYS[kind][0])
    step_s = logged(run_dir, "perf/step_s")
    item, rate_key = ITEMS[kind]
    rate, peak = logged(run_dir, rate_key), logged(run_dir, "mem/peak_mb_max")
    later = [s for s in sorted(step_s) if s > 1] or sorted(step_s)
    parts = [f"{len(loss)} steps, {LOSS_KEYS[kind][0]} {loss[min(loss)]:.4g} -> {loss[max(loss)]:.4g}"]
    if later:
        rates = [rate[s] for s in later if s in rate]
        parts.append(f"{statistics.median(step_s[s] for s in later):.3f} s/step (median of steps {later[0]}-"
                     f"{later[-1]})" + (f", {statistics.median(rates):.1f} {item}/s" if rates else ""))
    if peak:
        parts.append(f"peak {max(peak.values()) / 1024:.2f} GiB/rank")
    extra = {k: v for k, v in ((k, logged(run_dir, k)) for k in ("val/psnr", "val/nll")) if v}
    parts += [f"{k} {v[max(v)]:.3g}" for k, v in extra.items()]
    return "; ".join(parts) + f"; launch {seconds:.0f} s"


def demo_part(part: Part) -> None:
    pipeline = Pipeline(part)
    labels = {"data": "demo: synthetic clips", "tokenizer": "demo: tokenizer (configs/tokenizer/demo.yaml, ZeRO-2)",
              "tokens": "demo: token shards (python -m data_prep.tokenize)",
              "transformer": "demo: transformer (configs/transformer/demo.yaml, ZeRO-2)"}
    pipeline.ensure(labels.get)


# ------------------------------------------------------------------------------------------------------------------
# Resume part
# ------------------------------------------------------------------------------------------------------------------
def model_states(checkpoint: Path) -> dict[str, Any]:
    """``engine/name -> tensor`` of every engine's DeepSpeed model states and ``ema/name`` of the EMA in one
    checkpoint folder (loaded without executing code)."""
    from safetensors.torch import load_file

    from magvit.distributed import safe_torch_load

    tensors = {}
    for states in sorted(checkpoint.glob("*/mp_rank_00_model_states.pt")):
        module = safe_torch_load(states, map_location="cpu")["module"]
        tensors.update({f"{states.parent.name}/{k}": v for k, v in module.items()})
    tensors.update({f"ema/{k}": v for k, v in load_file(str(checkpoint / "ema.safetensors")).items()})
    return tensors


def compare_runs(reference: Path, resumed: Path, step: int, after: int, loss_keys: Sequence[str]) -> dict[str, Any]:
    """Largest absolute differences between two runs: every tensor of their checkpoints at ``step``
    (``weights``: the engines' model states, ``ema``) and each logged loss at the steps after ``after``.
    ``ValueError`` when the checkpoints hold different tensors or a run lacks a step the other logged."""
    from magvit.checkpoint import step_tag

    ref, res = (model_states(run / "checkpoints" / step_tag(step)) for run in (reference, resumed))
    if ref.keys() != res.keys() or any(ref[k].shape != res[k].shape for k in ref):
        raise ValueError(f"the checkpoints at step {step} hold different tensors")
    diff = {"weights": 0.0, "ema": 0.0}
    for name, tensor in ref.items():
        key = "ema" if name.startswith("ema/") else "weights"
        if tensor.is_floating_point():
            delta = (tensor.double() - res[name].double()).abs().max().item() if tensor.numel() else 0.0
        else:
            delta = 0.0 if bool((tensor == res[name]).all()) else math.inf
        diff[key] = max(diff[key], delta)
    losses = {}
    for key in loss_keys:
        a, b = logged(reference, key), logged(resumed, key)
        steps = [s for s in a if s > after]
        if not steps or any(s not in b for s in steps):
            raise ValueError(f"{key}: steps {steps or 'none'} after {after} not logged by both runs")
        losses[key] = max(abs(a[s] - b[s]) for s in steps)
    return {"weights": diff["weights"], "ema": diff["ema"], "losses": losses, "tensors": len(ref)}


def nondeterministic_ops(logs: Sequence[Path]) -> list[str]:
    found = set()
    for log in logs:
        try:
            found.update(_NONDETERMINISTIC.findall(log.read_text(errors="replace")))
        except OSError:
            pass
    return sorted(found)


def resume_verdict(diff: dict[str, Any], ops: Sequence[str]) -> tuple[str, str]:
    """(status, result) of a comparison: exact is ok; a difference is a failure unless ops without a
    deterministic kernel ran (then it is reported, not failed)."""
    largest = max([diff["weights"], diff["ema"], *diff["losses"].values()])
    if largest == 0:
        return "ok", "exact (all differences 0)"
    if ops:
        return "note", f"not bit-exact (max abs diff {largest:.3g}), with ops lacking a deterministic kernel"
    return "fail", f"not exact: max abs diff {largest:.3g} under deterministic algorithms"


def check_resume(pipeline: Pipeline, kind: str) -> tuple[str, str, str]:
    part, steps, half = pipeline.part, pipeline.steps, pipeline.steps // 2
    cut_dir = pipeline.root / f"{kind}-cut"
    first = launch(part, kind, cut_dir, pipeline.overrides(kind, half))
    if not first.ok:
        return "fail", f"run to step {half}: {first.problem()}", f"log: {first.log}"
    second = launch(part, kind, cut_dir, pipeline.overrides(kind, steps), resume=True)
    if not second.ok:
        return "fail", f"resume to step {steps}: {second.problem()}", f"log: {second.log}"
    if f"resumed from {cut_dir / 'checkpoints'}" not in second.log.read_text(errors="replace"):
        return "fail", f"the second run did not resume from {cut_dir / 'checkpoints'}", f"log: {second.log}"
    diff = compare_runs(pipeline.runs[kind], cut_dir, steps, half, LOSS_KEYS[kind])
    ops = nondeterministic_ops([first.log, second.log, part.work / "logs" / f"{kind}.log"])
    status, result = resume_verdict(diff, ops)
    losses = ", ".join(f"{k} {v:.3g}" for k, v in diff["losses"].items())
    numbers = (f"{steps} steps straight vs {half} + resumed to {steps}: max abs diff weights {diff['weights']:.3g}, "
               f"EMA {diff['ema']:.3g} ({diff['tensors']} tensors), losses of steps {half + 1}-{steps}: {losses}; "
               f"launches {first.seconds:.0f} + {second.seconds:.0f} s")
    if ops:
        numbers += f"; no deterministic kernel: {', '.join(ops)}"
    return status, result, numbers


def resume_part(part: Part) -> None:
    pipeline = Pipeline(part)
    if not pipeline.ensure(lambda name: f"resume: needs the demo's {name}"):
        return
    for kind in ("tokenizer", "transformer"):
        part.attempt(f"resume: {kind} (stop at {part.steps // 2}, --resume auto to {part.steps})",
                     lambda: check_resume(pipeline, kind))


# ------------------------------------------------------------------------------------------------------------------
# Throughput and peer parts (one process, one GPU)
# ------------------------------------------------------------------------------------------------------------------
UCF101_CLASSES = 101  # the B configs' data set (its class slot sizes the transformer's vocabulary)


class PlainEngine:
    """What the training scripts' step functions call on a DeepSpeed engine, over a plain module and its torch
    optimizer (one device, no ZeRO): the forward, ``backward``, and ``step`` with the engine's gradient clipping."""

    def __init__(self, module, optimizer, grad_clip: float):
        self.module, self.optimizer, self.grad_clip = module, optimizer, grad_clip

    def __call__(self, *inputs):
        return self.module(*inputs)

    def backward(self, loss) -> None:
        loss.backward()

    def step(self) -> None:
        import torch

        if self.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(self.module.parameters(), self.grad_clip)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)


def autocast_for(precision: str, device: str):
    import contextlib

    import torch

    return torch.autocast(device, dtype=torch.bfloat16) if precision == "autocast-bf16" else contextlib.nullcontext()


def tokenizer_step(model: Model, precision: str, device: str) -> tuple[Callable[[], None], str, int]:
    """``train_tokenizer``'s generator and discriminator steps (the discriminator's phase, where a run spends
    most of its steps) on a batch of random clips: (step, description, clips per step)."""
    import torch

    from magvit import losses
    from magvit.discriminator import Discriminator
    from magvit.launch import train_tokenizer as tt
    from magvit.optim import build_adam
    from magvit.tokenizer import VideoTokenizer
    from magvit.trainloop import NonFiniteGuard

    cfg = tt.load_config(str(ROOT / model.config), [f"train.precision={precision}", *model.overrides])
    torch.manual_seed(0)
    generator, discriminator = VideoTokenizer(cfg.model).to(device), Discriminator(cfg.discriminator).to(device)
    g = PlainEngine(generator, build_adam(generator, cfg.optim), cfg.optim.grad_clip)
    d = PlainEngine(discriminator, build_adam(discriminator, cfg.disc_optim), cfg.disc_optim.grad_clip)
    lecam, perceptual = losses.LeCamRegularizer(cfg.loss.lecam_decay).to(device), None
    if cfg.loss.perceptual_weight > 0:
        raise ValueError(f"{model.config}: a perceptual loss needs local weights; the check runs without")
    guard, autocast = NonFiniteGuard(cfg.train.max_nonfinite_steps), autocast_for(precision, device)
    last_input = tt.LastLayerInput(generator.decoder.conv_out) if cfg.loss.adaptive_gan_weight else None
    d_data = cfg.data
    video = torch.rand(d_data.batch_size, 3, d_data.num_frames, d_data.image_size, d_data.image_size,
                       device=device) * 2 - 1
    step_index = max(cfg.loss.disc_start, 0)

    def step() -> None:
        out = tt.generator_step(g, discriminator, video, step_index, cfg, perceptual, guard, autocast, last_input)
        if out is None:
            raise FloatingPointError("non-finite generator loss")
        tt.discriminator_step(d, video, out[1], step_index, cfg, lecam, guard, autocast)

    params = sum(p.numel() for p in generator.parameters()) / 1e6
    clip = f"{d_data.num_frames}x{d_data.image_size}x{d_data.image_size}"
    return step, f"{params:.1f} M params, {clip}, batch {d_data.batch_size}, G + D step", d_data.batch_size


def transformer_step(model: Model, precision: str, device: str) -> tuple[Callable[[], None], str, int]:
    """``train_transformer``'s step on random token grids of the tokenizer config ``model.tokens_of`` (its grid,
    codebook and clip; UCF-101's 101 classes), with every condition the model's tasks read."""
    import torch

    from magvit.launch import train_tokenizer as tt
    from magvit.launch import train_transformer as tr
    from magvit.shard_meta import TokenShardMeta
    from magvit.optim import build_adam
    from magvit.tasks import task as task_row
    from magvit.trainloop import NonFiniteGuard
    from magvit.transformer import MaskedVideoTransformer

    tok = tt.load_config(str(ROOT / model.tokens_of), [])
    clip = (tok.data.num_frames, tok.data.image_size)
    grid = tok.model.token_grid(clip[0], clip[1], clip[1])
    cfg = tr.load_config(str(ROOT / model.config), [f"train.precision={precision}", *model.overrides])
    cfg = cfg.replace(model=cfg.model.replace(codebook_size=tok.model.codebook_size, token_grid=tuple(grid),
                                              num_classes=UCF101_CLASSES))
    torch.manual_seed(0)
    network = MaskedVideoTransformer(cfg.model).to(device)
    engine = PlainEngine(network, build_adam(network, cfg.optim), cfg.optim.grad_clip)
    batch_size, codebook = cfg.data.batch_size, cfg.model.codebook_size
    keys = {task_row(name).shard_key for name in cfg.model.tasks} - {None}
    batch = {key: torch.randint(0, codebook, (batch_size, *grid), device=device) for key in sorted({"codes", *keys})}
    batch["label"] = torch.randint(0, UCF101_CLASSES, (batch_size,), device=device)
    meta = {"num_frames": clip[0], "image_size": clip[1], "tokenizer": {"causal": tok.model.causal},
            "token_grid": list(grid)}
    regions = TokenShardMeta.from_dict({**meta, "codebook_size": codebook}).condition_regions(cfg.model.tasks) \
        if cfg.model.conditioning == "interior" else None
    guard, autocast = NonFiniteGuard(cfg.train.max_nonfinite_steps), autocast_for(precision, device)

    def step() -> None:
        if tr.transformer_step(engine, batch, 0, cfg, cfg.model.vocab, guard, autocast, regions) is None:
            raise FloatingPointError("non-finite loss")

    params = sum(p.numel() for p in network.parameters()) / 1e6
    described = (f"{params:.1f} M params, {cfg.model.conditioning} on {'x'.join(map(str, grid))} tokens of "
                 f"{model.tokens_of} (codebook {codebook}), batch {batch_size}")
    return step, described, batch_size


@dataclasses.dataclass
class Measured:
    seconds: float  # median per step
    flops: float  # of one step
    peak_bytes: int | None  # CUDA allocator peak over warm-up and timed steps
    timed: int


class _GlobalOnly:
    """In place of ``FlopCounterMode``'s module tracker (every count goes to its total): the tracker's hooks on
    module inputs break ``torch.autograd.grad`` on a leaf, which the tokenizer's generator step calls."""

    parents = {"Global"}

    def __enter__(self):
        return self

    def __exit__(self, *args) -> None:
        return None


def count_flops(step: Callable[[], None]) -> float:
    """FLOPs of one call of ``step`` by ``torch.utils.flop_counter.FlopCounterMode`` (its formulas, no modules)."""
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    counter.mod_tracker = _GlobalOnly()
    with counter:
        step()
    return float(counter.get_total_flops())


def measure(step: Callable[[], None], device: str, warmup: int, timed: int, seconds: float) -> Measured:
    """Warm-up steps, one step under the FLOP counter, then up to ``timed`` steps (at least 2, fewer when
    ``seconds`` have passed), each between two synchronizations."""
    import torch

    cuda = device == "cuda"
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    for _ in range(warmup):
        step()
    flops = count_flops(step)
    times: list[float] = []
    start = time.monotonic()
    while len(times) < timed and (len(times) < 2 or time.monotonic() - start < seconds):
        sync()
        t0 = time.perf_counter()
        step()
        sync()
        times.append(time.perf_counter() - t0)
    peak = torch.cuda.max_memory_allocated() if cuda else None
    return Measured(statistics.median(times), flops, peak, len(times))


def device_peak(device: str) -> float | None:
    import torch

    return peak_bf16_tflops(torch.cuda.get_device_name()) if device == "cuda" else None


def free_memory() -> None:
    import gc

    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def throughput_part(part: Part) -> None:
    profile = part.profile
    builders = {"tokenizer": (tokenizer_step, "clips"), "transformer": (transformer_step, "examples")}
    peak = device_peak(profile.device)
    for i, model in enumerate(profile.models):
        build, item = builders[model.kind]

        def check(model=model, build=build, item=item, left=len(profile.models) - i) -> tuple[str, str, str]:
            step, described, items = build(model, profile.precision, profile.device)
            share = max(5.0, (part.left() - 10) / left) / 2  # half for the warm-up and the counted step
            m = measure(step, profile.device, profile.warmup, profile.timed, share)
            cell = throughput_numbers(m.flops, m.seconds, items, item, peak, m.peak_bytes)
            return "ok", "ok", f"{described}; {cell} (median of {m.timed})"

        try:
            part.attempt(f"throughput: {model.label} ({model.config}, {profile.precision})", check)
        finally:
            free_memory()


def peer_part(part: Part) -> None:
    try:
        import magvit2_pytorch  # noqa: F401
    except ImportError as err:  # the package, or one of its own imports (named: that is what to carry)
        missing = "" if getattr(err, "name", None) == "magvit2_pytorch" else f": {err}"
        part.report("peer: magvit2-pytorch", "skip", NOT_INSTALLED + missing)
        return
    part.attempt("peer: magvit2-pytorch vs ours (matched parameters)", lambda: check_peer(part))


def check_peer(part: Part) -> tuple[str, str, str]:
    """Our recommended tokenizer and magvit2-pytorch at its parameter count: one training step each (MSE +
    quantizer loss, backward, each side's own optimizer) under the profile's precision."""
    import torch

    import peers

    profile = part.profile
    frames, size, batch, base = profile.peer_clip
    torch.manual_seed(0)
    ours = peers.build_ours(frames, size, base)
    theirs, _ = peers.build_magvit2(size, peers.count_parameters(ours), base)
    video = torch.rand(batch, 3, frames, size, size, device=profile.device) * 2 - 1
    peak, cells, timings = device_peak(profile.device), [], []
    for side in (peers.OursSide(ours.to(profile.device)), peers.Magvit2Side(theirs.to(profile.device))):
        optimizer = side.recipe.optimizer(side.parameters())
        autocast = autocast_for(profile.precision, profile.device)

        def step(side=side, optimizer=optimizer, autocast=autocast) -> None:
            optimizer.zero_grad(set_to_none=True)
            with autocast:
                loss = side.train_loss(video)
            loss.backward()
            if side.recipe.grad_clip:
                torch.nn.utils.clip_grad_norm_(side.parameters(), side.recipe.grad_clip)
            optimizer.step()

        m = measure(step, profile.device, profile.warmup, profile.timed, max(5.0, (part.left() - 10) / 4))
        timings.append(m.seconds)
        cells.append(f"{side.name} ({side.num_parameters() / 1e6:.1f} M): "
                     f"{throughput_numbers(m.flops, m.seconds, batch, 'clips', peak, m.peak_bytes)}")
        free_memory()
    import importlib.metadata as md

    numbers = (f"magvit2-pytorch {md.version('magvit2-pytorch')} (torch {torch.__version__}, {sys.executable}); "
               f"{frames}x{size}x{size}, batch {batch}, {profile.precision}; " + "; ".join(cells)
               + f"; ours faster by {timings[1] / timings[0]:.2f}x")
    return "ok", "ok", numbers


# ------------------------------------------------------------------------------------------------------------------
def cli() -> int:
    if len(sys.argv) > 1 and sys.argv[1] == EXEC_DETERMINISTIC:
        exec_deterministic(sys.argv[2:])
        return 0
    if len(sys.argv) > 1 and sys.argv[1] == RUN_PART:
        return part_main(sys.argv[2])
    from magvit.cli import run_main

    return run_main(PROG, main)


if __name__ == "__main__":
    sys.exit(cli())
