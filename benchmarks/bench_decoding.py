"""Parallel decoding (MaskGIT / COMMIT, K steps) against token-by-token decoding with the same transformer.

Both decoders fill the same frame-prediction sequence (the prefix is fixed, the video tokens are generated) with the
same randomly initialised ``MaskedVideoTransformer``; only the transformer's forward passes are timed (decoding the
codes to pixels costs the same for both). Run:

    .venv/bin/python benchmarks/bench_decoding.py [--preset tiny] [--grid 4x8x8] [--steps 12] [--threads 2]
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import common  # noqa: E402

from magvit.sequence import build_sequence  # noqa: E402
from magvit.sampling import iterative_decode, sequential_decode  # noqa: E402
from magvit.transformer import MaskedVideoTransformer, TransformerConfig  # noqa: E402


class CountingModel:
    """``tokens -> logits`` callable that counts forward passes."""

    def __init__(self, model: MaskedVideoTransformer):
        self.model = model
        self.calls = 0

    def __call__(self, tokens: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        return self.model(tokens)


def main() -> None:
    p = common.parser(__doc__.splitlines()[0])
    p.add_argument("--preset", default="tiny", help="TransformerConfig preset (default: %(default)s)")
    p.add_argument("--grid", default="4x8x8", help="token grid t x h x w (default: %(default)s)")
    p.add_argument("--steps", type=int, default=12, help="parallel decoding steps (default: %(default)s)")
    p.add_argument("--max-seconds", type=float, default=20.0, help="timed seconds per decoder (at least 1 clip)")
    args = p.parse_args()
    common.setup_threads(args.threads)
    header = common.machine_description(args.threads)
    grid = (2, 4, 4) if args.quick else tuple(int(x) for x in args.grid.split("x"))
    torch.manual_seed(0)
    config = TransformerConfig.preset(args.preset, token_grid=grid)
    model = MaskedVideoTransformer(config).eval()
    vocab, layout = config.vocab, config.layout
    prefix = torch.randint(0, config.codebook_size, (1, *grid))
    tokens = build_sequence(vocab, layout, torch.tensor([vocab.task_token("frame_prediction")]),
                            torch.tensor([vocab.unconditional_token]), prefix, None)  # (1, L)
    kwargs = dict(mask_token=vocab.mask_token, codebook_size=config.codebook_size)
    decoders = {
        f"parallel, {args.steps} steps": lambda fn: iterative_decode(
            fn, tokens, steps=args.steps, generator=torch.Generator().manual_seed(0), **kwargs),
        "token by token": lambda fn: sequential_decode(fn, tokens, generator=torch.Generator().manual_seed(0),
                                                       **kwargs),
    }
    params = sum(p.numel() for p in model.parameters())
    table = common.Table(
        f"Decoding one clip: {layout.num_video_tokens} video tokens ({'x'.join(map(str, grid))}), "
        f"sequence {layout.length}, transformer '{args.preset}' ({params / 1e6:.2f}M parameters)",
        ["decoder", "forward passes / clip", "seconds / clip (median)", "clips timed", "spread", "speed-up"],
        notes=["Random weights; the transformer's forward passes only (pixel decoding is the same for both)."],
    )
    results = {}
    with torch.inference_mode():
        for name, decode in decoders.items():
            counter = CountingModel(model)
            decode(counter)
            passes = counter.calls
            timing = common.time_call(lambda: decode(model), warmup=0, min_reps=1, max_reps=5,
                                      max_seconds=args.max_seconds)
            results[name] = (passes, timing)
    fastest = min(t.median for _, t in results.values())
    for name, (passes, timing) in results.items():
        table.add(name, passes, common.fmt_seconds(timing.median), timing.reps, f"{timing.spread:.0%}",
                  f"{timing.median / fastest:.1f}x slower" if timing.median > fastest else "1.0x")
    common.emit([table], header, args.markdown)


if __name__ == "__main__":
    main()
