"""Achieved FLOP/s of the tokenizer and transformer training steps as a fraction of this machine's measured bf16
matmul peak (measured in the same run, same threads).

FLOPs are counted by ``torch.utils.flop_counter.FlopCounterMode`` (matmuls and convolutions, forward and backward;
elementwise work is not counted, so the fraction is a lower bound on how busy the cores are).

    .venv-bench/bin/python benchmarks/bench_flops.py [--threads 2] [--markdown benchmarks/results/flops.md]
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402
import peers  # noqa: E402


def matmul_peak(dtype: torch.dtype, n: int, max_seconds: float) -> float:
    """FLOP/s of an ``n x n @ n x n`` matmul in ``dtype`` (median over repetitions)."""
    a, b = torch.randn(n, n).to(dtype), torch.randn(n, n).to(dtype)
    timing = common.time_call(lambda: torch.mm(a, b), warmup=2, min_reps=5, max_seconds=max_seconds)
    return 2 * n**3 / timing.median


def count_flops(step) -> int:
    with FlopCounterMode(display=False) as counter:
        step()
    return counter.get_total_flops()


def tokenizer_step(frames: int, size: int, base_channels: int, batch: int):
    model = peers.build_ours(frames, size, base_channels).train()
    side = peers.OursSide(model)
    video = torch.rand(batch, 3, frames, size, size) * 2 - 1

    def step():
        model.zero_grad(set_to_none=True)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = side.train_loss(video)
        loss.backward()

    params = peers.count_parameters(model)
    return step, f"tokenizer ({params / 1e6:.1f} M params, LFQ 2^10), {frames}x{size}x{size}, batch {batch}"


def transformer_step(preset: str, grid: tuple[int, int, int], batch: int):
    from magvit.masking import make_training_batch, masked_token_loss
    from magvit.transformer import MaskedVideoTransformer, TransformerConfig

    config = TransformerConfig.preset(preset, token_grid=grid, codebook_size=1024)
    model = MaskedVideoTransformer(config).train()
    codes = torch.randint(0, config.codebook_size, (batch, *grid))
    generator = torch.Generator().manual_seed(0)

    def step():
        model.zero_grad(set_to_none=True)
        tb = make_training_batch({"codes": codes, "cond.frame_prediction": codes}, config.vocab, generator=generator)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            logits = model(tb.input_ids)
        loss = masked_token_loss(logits, tb.labels, tb.loss_mask, config.codebook_size)
        loss.backward()

    params = sum(p.numel() for p in model.parameters())
    return step, (f"transformer {preset} ({params / 1e6:.0f} M params), tokens {grid[0]}x{grid[1]}x{grid[2]} "
                  f"(sequence {config.max_length}), batch {batch}")


def main() -> None:
    p = common.parser(__doc__.splitlines()[0])
    p.add_argument("--max-seconds", type=float, default=20.0, help="timed seconds per step (at least 2 reps)")
    args = p.parse_args()
    common.setup_threads(args.threads)
    header = common.machine_description(args.threads)
    n = 512 if args.quick else 2048
    peak_bf16 = matmul_peak(torch.bfloat16, n, 3.0 if args.quick else 10.0)
    peak_fp32 = matmul_peak(torch.float32, n, 3.0 if args.quick else 10.0)
    steps = ([tokenizer_step(9, 32, 16, 1), transformer_step("tiny", (2, 4, 4), 2)] if args.quick else
             [tokenizer_step(17, 64, 32, 1), tokenizer_step(16, 128, 32, 1), transformer_step("B", (4, 16, 16), 1)])
    table = common.Table(
        "Achieved FLOP/s of training steps (bf16 autocast, forward + backward)",
        ["training step", "GFLOP / step", "seconds / step", "achieved GFLOP/s", "fraction of bf16 matmul peak"],
        notes=[f"Measured peak ({n}x{n} matmul, {args.threads} threads): bf16 {peak_bf16 / 1e9:.0f} GFLOP/s, "
               f"fp32 {peak_fp32 / 1e9:.0f} GFLOP/s."],
    )
    for step, label in steps:
        flops = count_flops(step)  # also the warm-up call
        timing = common.time_call(step, warmup=0, min_reps=2, max_seconds=args.max_seconds)
        achieved = flops / timing.median
        table.add(label, f"{flops / 1e9:.0f}", f"{timing.median:.2f}", f"{achieved / 1e9:.0f}",
                  f"{achieved / peak_bf16:.1%}")
    table.notes.append(f"Load average at the end: {common.load_average()}.")
    common.emit([table], header, args.markdown)


if __name__ == "__main__":
    main()
