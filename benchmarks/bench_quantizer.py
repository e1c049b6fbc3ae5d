"""Quantizer speed against vector-quantize-pytorch at the same codebook size, latent size and batch.

VQ: this project's ``VectorQuantizer`` (EMA codebook, decay 0.99, commitment 0.25) vs ``VectorQuantize`` with the
same settings, both on ``(B, D, t, h, w)`` latents. LFQ: ``LookupFreeQuantizer`` vs ``LFQ`` (entropy loss 0.1,
commitment 0.25, temperature 0.01 / inverse temperature 100). Training = forward + backward through the
straight-through output and the auxiliary loss (EMA updates included); inference = latents to codes and quantized
latents, no grad (ours: ``latents_to_codes`` + ``codes_to_latents``, the path of ``VideoTokenizer.encode``/``decode``;
theirs: eval-mode forward). FSQ: ``FiniteScalarQuantizer`` vs ``FSQ`` with the same levels (no auxiliary loss).

    .venv-bench/bin/python benchmarks/bench_quantizer.py [--threads 2] [--markdown benchmarks/results/quantizer.md]

``--memory``: instead, peak memory and time of one LFQ training step (forward + backward, entropy loss on) at
K = 2^10, 2^14, 2^18 codes for the latents of a 17x64x64 and a 17x128x128 clip batch of 2, before (the codebook
entropy from the (N, K) softmax, kept here as the reference) and after (the exact half-code GEMM of
``LookupFreeQuantizer``). Each configuration runs in a fresh subprocess; peak = growth of ``ru_maxrss`` over the
step (so it does not count torch itself or the input latents).

    .venv-bench/bin/python benchmarks/bench_quantizer.py --memory [--markdown benchmarks/results/quantizer_memory.md]
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402


def vq_pair(codebook_size: int, dim: int, entropy_loss_weight: float):
    from vector_quantize_pytorch import VectorQuantize

    from magvit.quantizers import QuantizerConfig, VectorQuantizer

    ours = VectorQuantizer(codebook_size, dim, QuantizerConfig(use_ema=True, ema_decay=0.99, commitment_beta=0.25,
                                                               entropy_loss_weight=entropy_loss_weight))
    theirs = VectorQuantize(dim=dim, codebook_size=codebook_size, decay=0.99, commitment_weight=0.25,
                            accept_3d_fmap=True, channel_last=False)
    return ours, theirs


def lfq_pair(codebook_size: int):
    from vector_quantize_pytorch import LFQ

    from magvit.quantizers import LookupFreeQuantizer, QuantizerConfig

    ours = LookupFreeQuantizer(codebook_size, QuantizerConfig(entropy_loss_weight=0.1, lfq_commitment_weight=0.25,
                                                              entropy_temperature=0.01))
    theirs = LFQ(dim=codebook_size.bit_length() - 1, codebook_size=codebook_size, entropy_loss_weight=0.1,
                 commitment_loss_weight=0.25, diversity_gamma=1.0)
    return ours, theirs


def fsq_pair(levels: tuple[int, ...]):
    from vector_quantize_pytorch import FSQ

    from magvit.quantizers import FiniteScalarQuantizer

    return FiniteScalarQuantizer(levels), FSQ(levels=list(levels), channel_first=True)


def ours_step(q, z):
    out = q(z)
    return out.quantized, out.loss


def theirs_step(q, z):
    out = q(z)
    if len(out) == 3:  # VectorQuantize: (quantized, indices, commit_loss); LFQ: (quantized, indices, aux_loss)
        quantized, _, loss = out
    elif len(out) == 2 and not out[1].is_floating_point():  # FSQ: (quantized, indices), no loss
        quantized, loss = out[0], out[0].new_zeros(())
    else:
        quantized, loss = out[0], out[-1]
    return quantized, loss.sum()


def measure(ours, theirs, z, max_seconds):
    """Interleaved timings ``(train, inference)`` of both quantizers on the same latents ``z``."""

    def train(q, step):
        x = z.detach().requires_grad_(True)
        quantized, loss = step(q, x)
        (quantized.float().square().mean() + loss).backward()

    ours.train()
    theirs.train()
    t_train = common.time_pair(lambda: train(ours, ours_step), lambda: train(theirs, theirs_step),
                               max_seconds=max_seconds, min_reps=3)
    ours.eval()
    theirs.eval()
    with torch.no_grad():
        t_infer = common.time_pair(lambda: ours.codes_to_latents(ours.latents_to_codes(z)),
                                   lambda: theirs_step(theirs, z),
                                   max_seconds=max_seconds, min_reps=3)
    return t_train, t_infer


# --- --memory: LFQ's entropy terms at large codebooks, before and after -------------------------------------------
MEMORY_CODEBOOKS = (2**10, 2**14, 2**18)
MEMORY_GRIDS = {"17x64x64": (2, 5, 8, 8), "17x128x128": (2, 5, 16, 16)}  # (B, t, h, w) latents, batch 2


def dense_lfq(codebook_size: int, config):
    """The LFQ as it was before the factorised codebook entropy: H[E q] from the (N, K) softmax (reference only)."""
    import torch.nn.functional as F

    from magvit.quantizers import LookupFreeQuantizer, _entropy_of_mean

    class DenseCodebookEntropyLFQ(LookupFreeQuantizer):
        def _entropies(self, flat):
            temperature = self.config.entropy_temperature
            bit_logits = 4.0 * flat / temperature  # (N, D)
            sample_entropy = (F.softplus(bit_logits) - bit_logits * torch.sigmoid(bit_logits)).sum(dim=1).mean()
            logits = 2.0 * flat @ self.code_vectors(flat.device).t() / temperature  # (N, K)
            return sample_entropy, _entropy_of_mean(logits.softmax(dim=1))

    return DenseCodebookEntropyLFQ(codebook_size, config)


def memory_case(impl: str, codebook_size: int, grid: tuple[int, ...], max_seconds: float) -> dict:
    """One configuration, in this (fresh) process: peak RSS growth (MiB) and seconds of an LFQ training step."""
    from magvit.quantizers import LookupFreeQuantizer, QuantizerConfig

    config = QuantizerConfig(entropy_loss_weight=0.1, lfq_commitment_weight=0.25, entropy_temperature=0.01)
    q = dense_lfq(codebook_size, config) if impl == "before" else LookupFreeQuantizer(codebook_size, config)
    torch.manual_seed(0)
    z = torch.randn(grid[0], q.dim, *grid[1:])

    def step(latents: torch.Tensor = z) -> None:
        x = latents.detach().requires_grad_(True)
        out = q(x)
        (out.quantized.square().mean() + out.loss).backward()

    step(z[:1, :, :1, :1, :2])  # two latents: one-time set-up (autograd engine, thread pool) outside the peak
    baseline = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
    timing = common.time_call(step, warmup=0, min_reps=1, max_reps=5, max_seconds=max_seconds)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - baseline
    return {"peak_mib": peak / 1024, "seconds": timing.median, "reps": timing.reps}


def _available_bytes() -> int:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) * 1024
    return 0


def run_memory_case(impl: str, k: int, grid: tuple[int, ...], threads: int, max_seconds: float) -> dict | str:
    """``memory_case`` in a subprocess (a fresh peak RSS per configuration); a string says why it did not run."""
    n = grid[0] * grid[1] * grid[2] * grid[3]
    needed = 4 * n * k * 4 if impl == "before" else 0  # ~4 (N, K) fp32 tensors alive at once (measured: 3-4)
    if needed and needed + 4 * 2**30 > _available_bytes():
        return f"skipped: needs ~{needed / 2**30:.0f} GiB, {_available_bytes() / 2**30:.0f} GiB available"
    cmd = [sys.executable, str(Path(__file__).resolve()), "--memory-case", impl, str(k), "x".join(map(str, grid)),
           "--threads", str(threads), "--max-seconds", str(max_seconds)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    if proc.returncode != 0:
        return f"failed: {proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else proc.returncode}"
    return json.loads(proc.stdout.strip().splitlines()[-1])


def memory_main(args) -> None:
    header = common.machine_description(args.threads)
    grids = {"17x32x32": (2, 5, 4, 4)} if args.quick else MEMORY_GRIDS
    codebooks = (2**6, 2**10) if args.quick else MEMORY_CODEBOOKS
    table = common.Table(
        "LFQ training step (forward + backward, entropy loss on): peak memory growth and time, before (H[E q] from "
        "the (N, K) softmax) and after (exact half-code GEMM)",
        ["clip (batch 2)", "latents N", "codebook K", "(N, K) fp32", "before: peak", "before: time",
         "after: peak", "after: time", "memory / time saved"],
    )
    for clip, grid in grids.items():
        n = grid[0] * grid[1] * grid[2] * grid[3]
        for k in codebooks:
            before, after = (run_memory_case(impl, k, grid, args.threads, args.max_seconds)
                             for impl in ("before", "after"))
            cells = []
            for result in (before, after):
                if isinstance(result, str):
                    cells += [result, "-"]
                else:
                    cells += [f"{result['peak_mib']:.1f} MiB", common.fmt_seconds(result["seconds"])]
            saved = "-"
            if not isinstance(before, str) and not isinstance(after, str):
                # Growth under 1 MiB is at the resolution of ru_maxrss: compare against 1 MiB then (a lower bound).
                floor = "" if after["peak_mib"] >= 1.0 else ">= "
                saved = (f"{floor}{before['peak_mib'] / max(after['peak_mib'], 1.0):.1f}x / "
                         f"{common.ratio(after['seconds'], before['seconds'])}")
            table.add(clip, n, f"2^{k.bit_length() - 1}", f"{n * k * 4 / 2**20:.0f} MiB", *cells, saved)
    table.notes.append(
        "Peak = growth of the process's maximum resident set over the step, in a fresh process per configuration "
        "after a two-latent warm-up step (so it counts neither torch, its one-time set-up nor the input latents). "
        f"Time = median of up to 5 steps within {args.max_seconds:.0f} s. Load average at the end: "
        f"{common.load_average()}."
    )
    table.notes.append(f"Command: `OMP_NUM_THREADS={args.threads} .venv-bench/bin/python benchmarks/bench_quantizer.py "
                       f"{' '.join(sys.argv[1:])}`")
    common.emit([table], header, args.markdown)


def main() -> None:
    p = common.parser(__doc__.splitlines()[0])
    p.add_argument("--max-seconds", type=float, default=6.0, help="timed seconds per cell, both sides together")
    p.add_argument("--memory", action="store_true", help="LFQ peak memory and time before/after, K = 2^10..2^18")
    p.add_argument("--memory-case", nargs=3, metavar=("IMPL", "K", "GRID"), help=argparse.SUPPRESS)
    args = p.parse_args()
    common.setup_threads(args.threads)
    if args.memory_case:
        impl, k, grid = args.memory_case
        print(json.dumps(memory_case(impl, int(k), tuple(int(v) for v in grid.split("x")), args.max_seconds)))
        return
    if args.memory:
        memory_main(args)
        return
    header = common.machine_description(args.threads)
    grid = (2, 4, 4, 4) if args.quick else (8, 4, 16, 16)  # (B, t, h, w): 8 clips of 4x16x16 tokens
    n = grid[0] * grid[1] * grid[2] * grid[3]
    table = common.Table(
        f"Quantizer, {n} latent vectors (batch {grid[0]} x {grid[1]}x{grid[2]}x{grid[3]}): milliseconds per call, "
        "median",
        ["quantizer", "codebook", "dim", "mode", "magvit (ours)", "vector-quantize-pytorch", "ours faster by"],
    )
    cases = [("VQ (EMA)", 1024, 256, 0.0), ("VQ (EMA)", 8192, 64, 0.0), ("VQ (EMA) + MAGVIT entropy loss", 1024, 256, 0.1),
             ("LFQ", 2**10, 10, None), ("LFQ", 2**14, 14, None), ("FSQ", 1000, 4, (8, 5, 5, 5)),
             ("FSQ", 64000, 6, (8, 8, 8, 5, 5, 5))]
    if args.quick:
        cases = [("VQ (EMA)", 64, 16, 0.0), ("LFQ", 2**6, 6, None), ("FSQ", 240, 3, (8, 6, 5))]
    for name, k, d, option in cases:
        torch.manual_seed(0)
        if name == "LFQ":
            ours, theirs = lfq_pair(k)
        elif name == "FSQ":
            ours, theirs = fsq_pair(option)
        else:
            ours, theirs = vq_pair(k, d, option)
        z = torch.randn(grid[0], d, *grid[1:])
        (o_train, t_train), (o_infer, t_infer) = measure(ours, theirs, z, args.max_seconds)
        for mode, a, b in (("train (fwd+bwd)", o_train, t_train), ("inference", o_infer, t_infer)):
            table.add(name, k, d, mode, f"{a.median * 1000:.1f}", f"{b.median * 1000:.1f}",
                      common.ratio(a.median, b.median))
    table.notes.append("The entropy-loss row of ours does more work than the peer's VectorQuantize (which has no "
                       "entropy loss); it shows the cost of MAGVIT's default. Load average at the end: "
                       f"{common.load_average()}.")
    common.emit([table], header, args.markdown)


if __name__ == "__main__":
    main()
