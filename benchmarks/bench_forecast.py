"""How predictable are a tokenizer's future codes? A small conv forecaster in its latent space, scored in pixels.

A masked prior can only predict the future of a video if the tokenizer's codes of that future follow from the codes
of the given frames in a way a network can learn. This measures that directly, in minutes, for a trained tokenizer
export on Moving MNIST (5 given frames, 12 predicted, as ``bench_mnist.py`` and ``magvit.evaluate``):

- Each code is split into its quantizer's channels (FSQ: one level index per channel, LFQ: one bit per channel;
  mixed radix, channel 0 least significant, as ``magvit.quantizers`` numbers codes).
- A residual conv net (``--width`` channels, ``--blocks`` blocks of two 3x3 convs, a coordinate input) reads the
  channels of the given latent frames (the tokenizer's condition region: latent frames 0-1 of a causal 17-frame
  tokenizer with temporal factor 4) and predicts each channel of each future latent frame with one softmax over
  its levels (cross-entropy), trained ``--budget`` CPU seconds on ``--train-sequences`` train-digit sequences.
- Its argmax codes, after the true codes of the given latent frames, are decoded by the tokenizer and scored on the
  12 predicted frames of ``--test-sequences`` test-digit sequences (disjoint digits) against the trivial baselines
  and the tokenizer's reconstruction (the bound of any prior in this latent space).
- ``--prior EXPORT``: also a masked prior's first decoding step (every future slot masked, one argmax), with the
  clips' own condition and with the condition of another clip (if the two score alike, the prior ignores it).

Level MAE is the mean absolute difference of the channel level indices on future slots whose true code is not the
most common (background) code: the background-everywhere prediction is the row to beat.

    .venv-bench/bin/python benchmarks/bench_forecast.py --tokenizer runs/mnist/tokenizer/export --budget 600
    .venv-bench/bin/python benchmarks/bench_forecast.py --quick --tokenizer DIR   # checks that it runs
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import common  # noqa: E402
from bench_mnist import (COND_KEY, NUM_GIVEN, TASK, encode_ours, moving_mnist, scores, summary,  # noqa: E402
                         to_video)
from bench_reconstruction import BenchError  # noqa: E402


def code_radices(tokenizer) -> tuple[int, ...]:
    """Levels per channel of the tokenizer's codes, channel 0 least significant (FSQ levels, LFQ 2 per bit)."""
    config = tokenizer.config
    if config.quantizer == "fsq":
        return tuple(int(n) for n in tokenizer.quantizer.levels)
    if config.quantizer == "lfq":
        return (2,) * tokenizer.quantizer.dim
    raise BenchError(f"a {config.quantizer!r} tokenizer: codes without channels (use an FSQ or LFQ tokenizer)")


def split_codes(codes: torch.Tensor, radices: tuple[int, ...]) -> torch.Tensor:
    """Codes ``(B, t, h, w)`` -> channel levels ``(B, D, t, h, w)`` long."""
    out, rest = [], codes.long()
    for radix in radices:
        out.append(rest % radix)
        rest = torch.div(rest, radix, rounding_mode="floor")
    return torch.stack(out, dim=1)


def merge_codes(levels: torch.Tensor, radices: tuple[int, ...]) -> torch.Tensor:
    """Channel levels ``(B, D, t, h, w)`` -> codes ``(B, t, h, w)``: the inverse of :func:`split_codes`."""
    code, weight = torch.zeros_like(levels[:, 0]), 1
    for i, radix in enumerate(radices):
        code, weight = code + levels[:, i] * weight, weight * radix
    return code


class Forecaster(nn.Module):
    """Channel levels of the given latent frames ``(B, D, g, h, w)`` -> logits ``(B, D, f, L, h, w)`` of the
    ``f`` future latent frames (``L``: the most levels of any channel; a channel's extra levels are masked)."""

    def __init__(self, radices: tuple[int, ...], given: int, future: int, width: int, blocks: int):
        super().__init__()
        self.radices, self.given, self.future, self.levels = radices, given, future, max(radices)
        d = len(radices)
        self.stem = nn.Conv2d(d * given + 2, width, 3, padding=1)
        self.blocks = nn.ModuleList(nn.Sequential(nn.Conv2d(width, width, 3, padding=1), nn.GELU(),
                                                  nn.Conv2d(width, width, 3, padding=1)) for _ in range(blocks))
        self.head = nn.Conv2d(width, d * future * self.levels, 1)
        invalid = torch.arange(self.levels)[None, :] >= torch.tensor(radices)[:, None]  # (D, L)
        self.register_buffer("invalid", invalid[:, None, :, None, None], persistent=False)  # (D, 1, L, 1, 1)

    def forward(self, given_levels: torch.Tensor) -> torch.Tensor:
        b, d, g, h, w = given_levels.shape
        scale = (torch.tensor(self.radices, device=given_levels.device) - 1).clamp_min(1).view(1, d, 1, 1, 1)
        x = (given_levels.float() / scale * 2 - 1).flatten(1, 2)  # (B, D*g, h, w) in [-1, 1]
        ys, xs = torch.meshgrid(torch.linspace(-1, 1, h), torch.linspace(-1, 1, w), indexing="ij")
        x = torch.cat([x, ys.expand(b, 1, h, w), xs.expand(b, 1, h, w)], dim=1)  # where a slot is matters (walls)
        hidden = self.stem(x)
        for block in self.blocks:
            hidden = hidden + block(hidden)
        logits = self.head(hidden).view(b, d, self.future, self.levels, h, w)
        return logits.masked_fill(self.invalid, float("-inf"))


def train_forecaster(model: Forecaster, levels: torch.Tensor, budget: float, batch_size: int, lr: float,
                     seed: int) -> tuple[int, float]:
    """Train on channel levels ``(N, D, t, h, w)`` for ``budget`` CPU seconds; ``(steps, last loss)``."""
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01)
    generator = torch.Generator().manual_seed(seed)
    steps, loss, start = 0, float("nan"), time.process_time()
    while time.process_time() - start < budget:
        batch = levels[torch.randint(0, levels.shape[0], (batch_size,), generator=generator)]
        logits = model(batch[:, :, :model.given])  # (B, D, f, L, h, w)
        target = batch[:, :, model.given:]  # (B, D, f, h, w)
        loss_t = F.cross_entropy(logits.movedim(3, 1), target)
        optimizer.zero_grad(set_to_none=True)
        loss_t.backward()
        optimizer.step()
        steps, loss = steps + 1, float(loss_t.detach())
    return steps, loss


@torch.inference_mode()
def decode_frames(tokenizer, codes: torch.Tensor) -> torch.Tensor:
    """Codes ``(N, t, h, w)`` -> frames ``(N, 3, T, H, W)`` in [-1, 1], 16 clips at a time."""
    return torch.cat([tokenizer.decode(codes[i:i + 16]).float().clamp(-1, 1) for i in range(0, len(codes), 16)])


@torch.inference_mode()
def prior_first_step(prior, region: torch.Tensor, codes: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
    """An interior masked prior's one-step argmax codes ``(N, t, h, w)``: every video slot masked, the condition codes
    ``cond`` shown in the condition ``region`` ``(t, h, w)``, as decoding's first step sees it; the region's slots
    are then set to the true ``codes``, as decoding keeps them."""
    from magvit.sequence import build_sequence, interior_condition_tokens, predicted_codes

    vocab, layout, n = prior.vocab, prior.config.layout, codes.shape[0]
    masked = build_sequence(vocab, layout, torch.full((n,), vocab.task_token(TASK)),
                            torch.full((n,), vocab.unconditional_token), None, None)  # (N, L)
    ids = interior_condition_tokens(vocab, layout, masked, cond, region)
    out = torch.cat([predicted_codes(prior(ids[i:i + 16]), vocab.codebook_size) for i in range(0, n, 16)])
    prediction = out[:, layout.video].reshape(codes.shape)
    prediction[:, region] = codes[:, region]
    return prediction


def level_mae(prediction: torch.Tensor, truth: torch.Tensor, given: int, radices: tuple[int, ...],
              background: int) -> float:
    """Mean absolute level difference on the future slots whose true code is not ``background``."""
    fut_pred, fut_true = prediction[:, given:], truth[:, given:]
    keep = fut_true != background  # (N, f, h, w)
    diff = (split_codes(fut_pred, radices) - split_codes(fut_true, radices)).abs().float()  # (N, D, f, h, w)
    return float(diff.mean(dim=1)[keep].mean()) if bool(keep.any()) else float("nan")


def arguments():
    p = common.parser(__doc__.splitlines()[0])
    p.add_argument("--tokenizer", required=True, help="a trained Moving MNIST tokenizer export (FSQ or LFQ)")
    p.add_argument("--prior", help="also score this masked prior's first decoding step (interior, on the same codes)")
    p.add_argument("--budget", type=float, default=600.0, help="CPU seconds of forecaster training")
    p.add_argument("--train-sequences", type=int, default=2000)
    p.add_argument("--test-sequences", type=int, default=100)
    p.add_argument("--width", type=int, default=128)
    p.add_argument("--blocks", type=int, default=6)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--offline", action="store_true", help="the MNIST wheel from the cache only")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(threads=1)
    args = p.parse_args()
    if args.quick:
        args.budget, args.train_sequences, args.test_sequences, args.width, args.blocks = 5.0, 16, 4, 16, 1
    if min(args.train_sequences, args.test_sequences, args.width, args.blocks, args.batch_size) < 1 \
            or args.budget <= 0 or args.lr <= 0:
        raise BenchError("sequence counts, --width, --blocks, --batch-size must be >= 1; --budget, --lr > 0")
    return args


def run(args) -> None:
    from magvit.conditions import latent_condition_region
    from magvit.evaluation.evaluators import frame_prediction_baselines
    from magvit.tokenizer import VideoTokenizer

    common.setup_threads(args.threads)
    header, load_start = common.machine_description(args.threads), common.load_average()
    tokenizer = VideoTokenizer.from_pretrained(args.tokenizer).eval()
    radices = code_radices(tokenizer)
    config = tokenizer.config
    train = moving_mnist("train", 0, args.train_sequences, args.seed, args.offline)
    test = moving_mnist("test", 0, args.test_sequences, args.seed, args.offline)
    print(f"bench_forecast: encoding {len(train)} + {len(test)} sequences", file=sys.stderr, flush=True)
    train_codes = encode_ours(tokenizer, train, False, keys=("codes",))["codes"].long()
    test_enc = encode_ours(tokenizer, test, False, keys=("codes", COND_KEY) if args.prior else ("codes",))
    test_codes = test_enc["codes"].long()
    grid = tuple(train_codes.shape[1:])
    region = latent_condition_region(TASK, grid, (config.num_frames, config.image_size, config.image_size),
                                     config.causal, NUM_GIVEN)  # (t, h, w)
    given = int(region.all(dim=(1, 2)).sum())
    if given < 1 or given >= grid[0] or not bool(region[:given].all()) or bool(region[given:].any()):
        raise BenchError(f"the {NUM_GIVEN} given frames are not whole latent frames of this tokenizer's grid {grid}")
    background = int(torch.mode(train_codes[:, given:].flatten()).values)

    model = Forecaster(radices, given, grid[0] - given, args.width, args.blocks)
    print(f"bench_forecast: training the forecaster ({sum(p.numel() for p in model.parameters()) / 1e6:.2f}M "
          f"parameters) for {args.budget:g} CPU s", file=sys.stderr, flush=True)
    steps, loss = train_forecaster(model, split_codes(train_codes, radices), args.budget, args.batch_size, args.lr,
                                   args.seed)
    model.eval()
    with torch.inference_mode():
        future = model(split_codes(test_codes, radices)[:, :, :given]).argmax(dim=3)  # (N, D, f, h, w)
    forecast = test_codes.clone()
    forecast[:, given:] = merge_codes(future, radices)
    background_codes = torch.full_like(test_codes, background)  # the given latent frames kept, as every row
    background_codes[:, :given] = test_codes[:, :given]

    real = to_video(test)  # (N, 3, T, H, W)
    baselines = frame_prediction_baselines(real, NUM_GIVEN)
    rows = {"all black": baselines["black_baseline"], "last given frame copied": baselines["copy_baseline"]}
    codes_rows = {"background code everywhere (decoded)": background_codes,
                  f"conv forecaster, {steps} steps, argmax": forecast,
                  "tokenizer reconstruction (bound)": test_codes}
    if args.prior:
        from magvit.transformer import MaskedVideoTransformer

        prior = MaskedVideoTransformer.from_pretrained(args.prior).eval()
        if tuple(prior.config.token_grid) != grid or prior.config.codebook_size != config.codebook_size \
                or prior.config.top_grid is not None or prior.config.conditioning != "interior":
            raise BenchError(f"--prior: an interior prior over one {grid} grid of {config.codebook_size} codes is "
                             f"needed; this one is {prior.config.conditioning}, grid {tuple(prior.config.token_grid)}, "
                             f"{prior.config.codebook_size} codes")
        test_cond = test_enc[COND_KEY].long()
        codes_rows["prior, first decoding step"] = prior_first_step(prior, region, test_codes, test_cond)
        codes_rows["prior, first step, another clip's condition"] = prior_first_step(
            prior, region, test_codes, test_cond.roll(1, dims=0))

    table = common.Table(f"Forecasting a tokenizer's future codes: {len(test)} test sequences, {NUM_GIVEN} given "
                         f"frames, {real.shape[2] - NUM_GIVEN} predicted",
                         ["prediction", "PSNR (dB)", "SSIM", "MSE / frame", "level MAE (non-background slots)"])
    for name, video in rows.items():
        s = summary(scores(video, real))
        table.add(name, f"{s['psnr']:.2f}", f"{s['ssim']:.3f}", f"{s['mse_per_frame']:.1f}", "-")
    for name, codes in codes_rows.items():
        s = summary(scores(decode_frames(tokenizer, codes), real))
        mae = level_mae(codes, test_codes, given, radices, background)
        table.add(name, f"{s['psnr']:.2f}", f"{s['ssim']:.3f}", f"{s['mse_per_frame']:.1f}", f"{mae:.3f}")
    table.notes += [
        "",
        f"Tokenizer {args.tokenizer}: {config.quantizer} codes of {config.codebook_size} "
        f"({len(radices)} channels of {'-'.join(map(str, radices))} levels), grid {grid}, {given} given latent "
        f"frames. Forecaster: {args.width} wide, {args.blocks} residual blocks, batch {args.batch_size}, AdamW lr "
        f"{args.lr:g}, {args.budget:g} CPU s ({steps} steps, last loss {loss:.3f}) on {len(train)} train-digit "
        f"sequences; scored on test digits. Load average at start {load_start}, at end {common.load_average()}.",
    ]
    common.emit([table], header, args.markdown)


def main() -> None:
    try:
        run(arguments())
    except BenchError as err:
        print(f"bench_forecast: {err}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
