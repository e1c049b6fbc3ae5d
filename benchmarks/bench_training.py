"""Training throughput of the real training scripts: step time, clips/s and peak memory per rank for 1 vs 2 ranks,
ZeRO stages 0/1/2/3 and fp32 vs bf16, for the tiny and a mid-size tokenizer at 16x64x64 clips (and optionally the
transformer on the tokens of such clips).

Every cell is one launch of ``launch/train_tokenizer.py`` (or ``train_transformer.py``) with the deepspeed launcher
on the sample data; the step time is the median of the logged per-step times after ``--warmup`` steps, and memory
is the peak resident set size (CPU) or CUDA allocator peak (GPU) of each rank. Run in the project environment
(deepspeed is needed), on a quiet machine:

    .venv/bin/python benchmarks/bench_training.py [--markdown benchmarks/results/training.md] [--quick]
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
sys.path.insert(0, str(ROOT))
import common  # noqa: E402
from magvit.runlog import read_metrics  # noqa: E402

# Overrides of configs/tokenizer/tiny.yaml. Mid-size: the tiny layout made wider and deeper (between tiny and B).
MODELS = {
    "tiny": {},
    "mid": {"model.base_channels": 32, "model.channel_multipliers": "[1,2,2,4]",
            "model.temporal_downsample": "[true,true,false]", "model.num_res_blocks": 2,
            "model.embedding_dim": 64, "model.codebook_size": 1024, "model.norm_groups": 16,
            "discriminator.base_channels": 32},
}


@dataclass
class Cell:
    model: str
    ranks: int
    zero: int
    precision: str


@dataclass
class Result:
    step_s: float | None
    clips_per_s: float | None
    peak_mb_max: float | None
    peak_mb_min: float | None
    error: str = ""


def launch(script: str, ranks: int, args: list[str], env: dict[str, str], timeout: float) -> subprocess.CompletedProcess:
    if ranks == 1:
        cmd = [sys.executable, str(ROOT / "launch" / script), *args]
    else:
        from magvit.distributed import free_port

        cmd = [str(Path(sys.executable).parent / "deepspeed"), "--num_accelerators", str(ranks), "--master_port",
               str(free_port()), str(ROOT / "launch" / script), *args]
    return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)


def summarize(run_dir: Path, warmup: int, per_step_key: str, batch_per_step: int, error: str) -> Result:
    path = run_dir / "metrics.jsonl"
    records = read_metrics(path) if path.is_file() else []
    steps = [r for r in records if "perf/step_s" in r and r["step"] > warmup]
    if not steps:
        return Result(None, None, None, None, error or "no timed steps")
    step_s = statistics.median(r["perf/step_s"] for r in steps)
    last = steps[-1]
    return Result(step_s, batch_per_step / step_s, last.get("mem/peak_mb_max"), last.get("mem/peak_mb_min"), error)


def run_tokenizer(cell: Cell, manifest: Path, work: Path, steps: int, warmup: int, batch: int, threads: int,
                  timeout: float) -> tuple[Result, Path]:
    run_dir = work / f"tok-{cell.model}-r{cell.ranks}-z{cell.zero}-{cell.precision}"
    overrides = [f"{k}={v}" for k, v in MODELS[cell.model].items()]
    args = ["--config", "configs/tokenizer/tiny.yaml", "--run-dir", str(run_dir), f"data.manifest={manifest}",
            "data.num_frames=16", "data.image_size=64", "data.frame_stride=1", f"data.batch_size={batch}",
            "data.num_workers=1", "data.val_clips=1", f"train.max_steps={steps}", "train.warmup_steps=1",
            f"train.zero_stage={cell.zero}", f"train.precision={cell.precision}",
            "loss.disc_start=0", "logging.log_every=1", "logging.sample_every=0", "logging.tensorboard=false",
            "logging.progress=false", f"checkpoint.every={10 * steps}", *overrides]
    env = {**os.environ, "DS_ACCELERATOR": os.environ.get("DS_ACCELERATOR", "cpu"),
           "OMP_NUM_THREADS": str(threads), "PYTHONPATH": str(ROOT)}
    proc = launch("train_tokenizer.py", cell.ranks, args, env, timeout)
    error = "" if proc.returncode == 0 else _last_error(proc)
    return summarize(run_dir, warmup, "perf/step_s", batch * cell.ranks, error), run_dir


def run_transformer(cell: Cell, tokens: Path, work: Path, steps: int, warmup: int, batch: int, threads: int,
                    timeout: float) -> Result:
    run_dir = work / f"tr-{cell.model}-r{cell.ranks}-z{cell.zero}-{cell.precision}"
    size = {"tiny": [], "mid": ["model.hidden_size=256", "model.num_layers=4", "model.num_heads=4",
                               "model.intermediate_size=1024"]}[cell.model]
    args = ["--config", "configs/transformer/tiny.yaml", "--run-dir", str(run_dir), f"data.tokens={tokens}",
            f"data.batch_size={batch}", f"train.max_steps={steps}", "train.warmup_steps=1",
            f"train.zero_stage={cell.zero}", f"train.precision={cell.precision}", "logging.log_every=1",
            "logging.tensorboard=false", "logging.progress=false", f"checkpoint.every={10 * steps}", *size]
    env = {**os.environ, "DS_ACCELERATOR": os.environ.get("DS_ACCELERATOR", "cpu"),
           "OMP_NUM_THREADS": str(threads), "PYTHONPATH": str(ROOT)}
    proc = launch("train_transformer.py", cell.ranks, args, env, timeout)
    error = "" if proc.returncode == 0 else _last_error(proc)
    return summarize(run_dir, warmup, "perf/step_s", batch * cell.ranks, error)


def _last_error(proc: subprocess.CompletedProcess) -> str:
    lines = [l for l in (proc.stderr + proc.stdout).splitlines() if "Error" in l or "error:" in l]
    return (lines[-1].strip() if lines else f"exit status {proc.returncode}")[-120:]


# bf16: DeepSpeed bf16 (bf16 weights, fp32 master copy); autocast-bf16: fp32 weights, bf16 matmuls/convs.
PRECISIONS = ("fp32", "bf16", "autocast-bf16")


def cells(models: list[str], full: bool, bf16: bool = True) -> list[Cell]:
    """Default: ranks 1 vs 2 (ZeRO-2 fp32), ZeRO 0/1/2/3 (2 ranks fp32), fp32 vs bf16 vs autocast-bf16 (2 ranks
    ZeRO-2).
    ``full``: every combination. ``bf16`` False: no bf16 cells (a CPU without native bf16 would emulate them)."""
    precisions = PRECISIONS if bf16 else ("fp32",)
    out: list[Cell] = []
    for m in models:
        if full:
            out += [Cell(m, r, z, p) for r in (1, 2) for z in (0, 1, 2, 3) for p in precisions]
            continue
        wanted = [Cell(m, 1, 2, "fp32"), Cell(m, 2, 2, "fp32"), Cell(m, 2, 0, "fp32"), Cell(m, 2, 1, "fp32"),
                  Cell(m, 2, 3, "fp32"), Cell(m, 2, 2, "bf16"), Cell(m, 2, 2, "autocast-bf16")]
        out += [c for c in wanted if c.precision in precisions]
    return out


def fmt(value: float | None, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", default="tiny,mid", help="tokenizer sizes (default: %(default)s)")
    p.add_argument("--transformer", action="store_true", help="also time the transformer on 16x64x64-clip tokens")
    p.add_argument("--steps", type=int, default=8, help="optimizer steps per run (default: %(default)s)")
    p.add_argument("--warmup", type=int, default=2, help="steps left out of the median (default: %(default)s)")
    p.add_argument("--batch-size", type=int, default=2, help="clips per rank per step (default: %(default)s)")
    p.add_argument("--threads", type=int, default=0,
                   help="OMP threads per rank (default: cores / ranks, so 1 and 2 ranks use the same cores)")
    p.add_argument("--full", action="store_true", help="every ranks x ZeRO x precision combination")
    p.add_argument("--emulated-bf16", action="store_true",
                   help="also the bf16 cells on a CPU without native bf16 (skipped by default: emulated, ~47x slower)")
    p.add_argument("--timeout", type=float, default=900.0, help="seconds per launch")
    p.add_argument("--work-dir", default=None, help="where runs go (default: a temporary folder)")
    p.add_argument("--markdown", metavar="PATH", help="also write the tables as markdown to PATH")
    p.add_argument("--quick", action="store_true", help="tiny model, 4 steps, 2 cells: checks that the script runs")
    args = p.parse_args()
    models = ["tiny"] if args.quick else args.models.split(",")
    steps, warmup = (4, 1) if args.quick else (args.steps, args.warmup)
    cores = os.cpu_count() or 1
    work = Path(args.work_dir or tempfile.mkdtemp(prefix="bench_training_"))
    work.mkdir(parents=True, exist_ok=True)
    manifest = work / "sample" / "manifest.jsonl"
    if not manifest.is_file():
        subprocess.run([sys.executable, "-m", "data_prep.sample_data", "--out", str(manifest.parent)], cwd=ROOT,
                       check=True, capture_output=True)
    header = common.machine_description(args.threads or max(1, cores // 2))
    # bf16 cells only where the CPU computes bf16 natively (or when asked): emulated, a step takes ~47x fp32's time
    bf16 = args.emulated_bf16 or common.native_bf16()
    todo = cells(models, args.full, bf16)
    if args.quick:
        todo = [Cell("tiny", 1, 2, "fp32"), Cell("tiny", 2, 3, "fp32")]
    columns = ["model", "ranks", "ZeRO", "precision", "step time", "clips/s", "peak MB/rank (max)",
               "peak MB/rank (min)", "note"]
    notes = [f"Tokenizer + discriminator step (discriminator on from step 0), 16x64x64 clips, {args.batch_size} clips "
             f"per rank, {steps} steps, median of steps > {warmup}; OMP threads per rank = cores / ranks unless "
             "--threads; memory = peak RSS of each rank (CPU) or CUDA peak allocation (GPU).",
             "mid = tiny layout with base 32 channels, multipliers (1, 2, 2, 4), 2 res blocks, codebook 1024."]
    if not bf16:
        notes.append("No bf16 cells: this CPU has no native bf16 (AMX / AVX512-BF16); --emulated-bf16 adds them.")
    table = common.Table("Tokenizer training (train_tokenizer.py)", columns, notes)
    export_for_tokens: Path | None = None
    for cell in todo:
        threads = args.threads or max(1, cores // cell.ranks)
        result, run_dir = run_tokenizer(cell, manifest, work, steps, warmup, args.batch_size, threads, args.timeout)
        if export_for_tokens is None and cell.model == "tiny" and not result.error:
            export_for_tokens = run_dir / "export"
        table.add(cell.model, cell.ranks, cell.zero, cell.precision, fmt(result.step_s, ".3f") + " s",
                  fmt(result.clips_per_s, ".2f"), fmt(result.peak_mb_max, ".0f"), fmt(result.peak_mb_min, ".0f"),
                  result.error)
    tables = [table]
    if args.transformer and export_for_tokens is not None:
        tokens = work / "tokens"
        subprocess.run([sys.executable, "-m", "data_prep.tokenize", "--tokenizer", str(export_for_tokens),
                        "--manifest", str(manifest), "--out", str(tokens), "--split", "all", "--workers", "0"],
                       cwd=ROOT, check=True, capture_output=True)
        tr = common.Table("Transformer training (train_transformer.py)", columns[:5] + ["examples/s"] + columns[6:],
                          ["Tokens of 16x64x64 clips from the tiny tokenizer; mid = 4 layers x 256 wide."])
        for cell in cells(models, args.full, bf16):
            threads = args.threads or max(1, cores // cell.ranks)
            result = run_transformer(cell, tokens, work, steps, warmup, args.batch_size, threads, args.timeout)
            tr.add(cell.model, cell.ranks, cell.zero, cell.precision, fmt(result.step_s, ".3f") + " s",
                   fmt(result.clips_per_s, ".2f"), fmt(result.peak_mb_max, ".0f"), fmt(result.peak_mb_min, ".0f"),
                   result.error)
        tables.append(tr)
    common.emit(tables, header, args.markdown)


if __name__ == "__main__":
    main()
