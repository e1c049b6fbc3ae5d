"""Quantizer speed against vector-quantize-pytorch at the same codebook size, latent size and batch.

VQ: this project's ``VectorQuantizer`` (EMA codebook, decay 0.99, commitment 0.25) vs ``VectorQuantize`` with the
same settings, both on ``(B, D, t, h, w)`` latents. LFQ: ``LookupFreeQuantizer`` vs ``LFQ`` (entropy loss 0.1,
commitment 0.25, temperature 0.01 / inverse temperature 100). Training = forward + backward through the
straight-through output and the auxiliary loss (EMA updates included); inference = latents to codes and quantized
latents, no grad (ours: ``latents_to_codes`` + ``codes_to_latents``, the path of ``VideoTokenizer.encode``/``decode``;
theirs: eval-mode forward).

    .venv-bench/bin/python benchmarks/bench_quantizer.py [--threads 2] [--markdown benchmarks/results/quantizer.md]
"""

from __future__ import annotations

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


def ours_step(q, z):
    out = q(z)
    return out.quantized, out.loss


def theirs_step(q, z):
    out = q(z)
    if len(out) == 3:  # VectorQuantize: (quantized, indices, commit_loss); LFQ: (quantized, indices, aux_loss)
        quantized, _, loss = out
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


def main() -> None:
    p = common.parser(__doc__.splitlines()[0])
    p.add_argument("--max-seconds", type=float, default=6.0, help="timed seconds per cell, both sides together")
    args = p.parse_args()
    common.setup_threads(args.threads)
    header = common.machine_description(args.threads)
    grid = (2, 4, 4, 4) if args.quick else (8, 4, 16, 16)  # (B, t, h, w): 8 clips of 4x16x16 tokens
    n = grid[0] * grid[1] * grid[2] * grid[3]
    table = common.Table(
        f"Quantizer, {n} latent vectors (batch {grid[0]} x {grid[1]}x{grid[2]}x{grid[3]}): milliseconds per call, "
        "median",
        ["quantizer", "codebook", "dim", "mode", "magvit (ours)", "vector-quantize-pytorch", "ours faster by"],
    )
    cases = [("VQ (EMA)", 1024, 256, 0.0), ("VQ (EMA)", 8192, 64, 0.0), ("VQ (EMA) + MAGVIT entropy loss", 1024, 256, 0.1),
             ("LFQ", 2**10, 10, None), ("LFQ", 2**14, 14, None)]
    if args.quick:
        cases = [("VQ (EMA)", 64, 16, 0.0), ("LFQ", 2**6, 6, None)]
    for name, k, d, entropy in cases:
        torch.manual_seed(0)
        ours, theirs = lfq_pair(k) if name == "LFQ" else vq_pair(k, d, entropy)
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
