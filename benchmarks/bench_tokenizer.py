"""Tokenizer speed against magvit2-pytorch: training step (forward + backward), encode and decode, fp32 and bf16.

Ours is the recommended configuration (``peers.RECOMMENDED``, built by ``peers.build_ours``), magvit2-pytorch an LFQ
tokenizer with a 2**10 codebook; both compress 4x in time / 8x in space at a matched parameter count (see peers.py).
The two sides are timed interleaved (a b, b a, ...). Run in the benchmark environment:

    .venv-bench/bin/python benchmarks/bench_tokenizer.py [--threads 2] [--markdown benchmarks/results/tokenizer.md]
"""

from __future__ import annotations

import contextlib
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402
import peers  # noqa: E402


def autocast(dtype: str):
    if dtype == "bf16":
        return torch.autocast("cpu", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def main() -> None:
    p = common.parser(__doc__.splitlines()[0])
    p.add_argument("--sizes", default="17x64x64,16x128x128", help="TxHxW inputs (default: %(default)s)")
    p.add_argument("--batch-size", type=int, default=1)
    p.add_argument("--base-channels", type=int, default=32, help="width of our tokenizer (default: %(default)s)")
    p.add_argument("--peer-base-channels", type=int, default=32,
                   help="magvit2-pytorch's init_dim; its depth is matched to our parameter count")
    p.add_argument("--max-seconds", type=float, default=16.0,
                   help="timed seconds per cell, both sides together (at least 2 interleaved rounds)")
    args = p.parse_args()
    common.setup_threads(args.threads)
    header = common.machine_description(args.threads)
    sizes = ["9x32x32"] if args.quick else args.sizes.split(",")
    tables = []
    # bf16 rows only where the CPU computes bf16 natively: emulated, one step takes ~47x the fp32 time
    dtypes = ("fp32", "bf16") if common.native_bf16() else ("fp32",)
    for size in sizes:
        t, h, w = (int(x) for x in size.split("x"))
        torch.manual_seed(0)
        ours = peers.build_ours(t, h, args.base_channels)
        n_ours = peers.count_parameters(ours)
        theirs, layers = peers.build_magvit2(h, n_ours, args.peer_base_channels)
        n_theirs = peers.count_parameters(theirs, peers.MAGVIT2_SKIP)
        sides = [peers.OursSide(ours), peers.Magvit2Side(theirs)]
        video = torch.rand(args.batch_size, 3, t, h, w) * 2 - 1
        grid = ours.config.token_grid(t, h, w)
        table = common.Table(
            f"Tokenizer {size} (batch {args.batch_size}): milliseconds per call, median",
            ["step", "dtype", "magvit (ours)", "magvit2-pytorch", "ours faster by", "reps (spread ours / theirs)"],
            notes=[f"Ours: {peers.RECOMMENDED} at base width {args.base_channels}. "
                   f"Parameters (encoder + quantizer + decoder): ours {n_ours / 1e6:.2f} M, magvit2-pytorch "
                   f"{n_theirs / 1e6:.2f} M (its unused discriminator excluded); token grid {grid}; "
                   f"magvit2-pytorch layers: {layers}."],
        )
        for dtype in dtypes:
            def train_step(side):
                side.model.zero_grad(set_to_none=True)
                with autocast(dtype):
                    loss = side.train_loss(video)
                loss.backward()

            results = {}
            for side in sides:
                side.model.train()
            results["train"] = common.time_pair(lambda: train_step(sides[0]), lambda: train_step(sides[1]),
                                                max_seconds=args.max_seconds)
            for side in sides:
                side.model.eval()
            with torch.no_grad(), autocast(dtype):
                codes = [side.encode(video) for side in sides]
                results["encode"] = common.time_pair(lambda: sides[0].encode(video), lambda: sides[1].encode(video),
                                                     max_seconds=args.max_seconds)
                results["decode"] = common.time_pair(lambda: sides[0].decode(codes[0]),
                                                     lambda: sides[1].decode(codes[1]), max_seconds=args.max_seconds)
            for step in ("train", "encode", "decode"):
                a, b = results[step]
                label = {"train": "train step (fwd+bwd)", "encode": "encode", "decode": "decode"}[step]
                table.add(label, dtype, f"{a.median * 1000:.0f}", f"{b.median * 1000:.0f}",
                          common.ratio(a.median, b.median), f"{a.reps} ({a.spread:.0%} / {b.spread:.0%})")
        tables.append(table)
        del ours, theirs, sides
    if len(dtypes) == 1:
        tables[-1].notes.append("No bf16 rows: this CPU has no native bf16 (AMX / AVX512-BF16), it would emulate it.")
    tables[-1].notes.append(f"Load average at the end: {common.load_average()}.")
    common.emit(tables, header, args.markdown)


if __name__ == "__main__":
    main()
