"""Priors at equal training budgets (MAGVIT's Table 6 at CPU scale, with the prefix-vs-interior COMMIT ablation).

Three priors over the same tokenizer's codes, of one size (``--preset``), trained on the same token grids in the same
batch order with the same task / dropout / mask draws, interleaved step by step (the side with the least summed step
time steps next), each stopping at ``--budget`` seconds of its own summed step time:

- ``masked-prefix``: the masked transformer, condition tokens in a prefix (sequence ``2 + 2N``);
- ``masked-interior``: the masked transformer with MAGVIT's COMMIT conditioning, condition tokens in the masked
  slots of the condition region (``TransformerConfig.conditioning="interior"``, sequence ``2 + N``);
- ``autoregressive``: the causal prior of VQGAN (``AutoregressiveTransformer``, sequence ``2 + 2N``).

With a ``hierarchy=2`` tokenizer (VQ-VAE-2's two code grids, ``magvit.code_grids``) every sequence holds the top
grid's tokens, then the bottom grid's (``N = N_top + N_bottom``): ``masked-prefix`` / ``masked-interior`` train the
top stage and the bottom stage given the top and decode in two phases, ``autoregressive`` generates the top first in
raster order, and one more side is allowed:

- ``masked-joint``: the same masked prefix transformer over the same packed sequence with plain joint masking over
  both grids (one cosine-scheduled mask over all ``N`` tokens) and one decoding phase, the alternative to the two
  stages. Its held-out NLL is taken on the two-stage maskings of the other masked sides (the same masks).

Every side trains on frame prediction (first frame given) and unconditional generation (``TASKS``). The script
tokenizes the manifest's ``train`` clips (what the priors train on) and its ``val`` clips (from other source videos,
checked; what they are scored on) with the tokenizer export, caching the codes under ``--cache``. At each
``--report-at`` point every side is scored on the held-out clips: token NLL (nats per video token) and frame
prediction from the first frame (PSNR / SSIM of the generated future frames, ``magvit.evaluation.evaluators``),
next to the baselines (the first frame copied, in pixels and through the tokenizer) and the tokenizer's
reconstruction (the upper bound), and seconds per generated clip.

    .venv-bench/bin/python benchmarks/bench_priors.py --budget 180 --report-at 60 \\
        --markdown benchmarks/results/priors.md     # about 11 minutes on 2 idle cores
    .venv/bin/python benchmarks/bench_priors.py --quick        # checks that it runs (numbers meaningless)
    .venv-bench/bin/python benchmarks/bench_priors.py --tokenizer TWO_GRID_EXPORT \
        --sides masked-prefix,masked-joint --budget 120 --markdown benchmarks/results/priors_two_grids.md
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import common  # noqa: E402
from bench_reconstruction import CLOCKS, BatchOrder, BenchError, check_held_out, clock, load_clips  # noqa: E402
from magvit.masking import MaskingConfig  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
TASKS = ("frame_prediction", "unconditional")  # every side's task list and training mix
TASK = "frame_prediction"  # the evaluated task, one given frame
COND_KEY = f"cond.{TASK}"
# The masked sides' masking: the trainer's defaults (cosine, condition dropout 0.1, loss on every video token) with
# the two training stages over two grids, the states two-phase decoding visits; their held-out NLL masks alike.
STAGES = MaskingConfig(two_grid_masking="stages")
SIDES = ("masked-prefix", "masked-interior", "autoregressive", "masked-joint")  # masked-joint: two grids only
DEFAULT_SIDES = SIDES[:3]


# ------------------------------------------------------------------------------------------------------------------
# Data: token grids of the train and val splits, cached
# ------------------------------------------------------------------------------------------------------------------
def cache_key(args, tokenizer_dir: Path, manifest: Path) -> str:
    from magvit.prep.shards import file_digest

    parts = {"tokenizer": json.loads((tokenizer_dir / "config.json").read_text()),
             "weights": file_digest(tokenizer_dir / "model.safetensors"), "manifest": file_digest(manifest),
             "clips": [args.train_clips_per_video, args.train_epochs, args.val_clips_per_video, args.seed],
             "tasks": [TASK]}
    return hashlib.sha1(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:16]


@torch.inference_mode()
def encode_clips(tokenizer, clips: torch.Tensor, batch_size: int = 8) -> dict[str, torch.Tensor]:
    """``{"codes", "cond.frame_prediction"}`` int32 ``(N, t, h, w)`` of clips ``(N, 3, T, H, W)``, as
    ``data_prep.tokenize`` writes them (the condition video from ``build_condition_video``)."""
    from magvit.prep.tokenize import encode_batch

    parts = [encode_batch(tokenizer, clips[i:i + batch_size], [TASK], None, "cpu")
             for i in range(0, clips.shape[0], batch_size)]
    return {key: torch.cat([p[key] for p in parts]) for key in parts[0]}


def token_data(args, tokenizer) -> dict:
    """``{"train": {codes, cond}, "val": {codes, cond, video (N, 3, T, H, W)}, "train_sources", "val_sources"}``:
    the manifest's train clips (random starts / crops / flips over the epochs) and val clips (evenly spaced,
    centred) with their codes, read from ``--cache`` or tokenized and written there."""
    manifest, tokenizer_dir = Path(args.manifest), Path(args.tokenizer)
    if not manifest.is_file():
        raise BenchError(f"no manifest at {manifest}: build the sample data first (python -m data_prep.sample_data)")
    train_sources, val_sources = check_held_out(manifest)
    path = Path(args.cache) / f"tokens-{cache_key(args, tokenizer_dir, manifest)}.pt"
    if path.is_file():
        print(f"token grids from {path}", file=sys.stderr)
        data = torch.load(path, weights_only=True)  # tensors, lists and numbers only
    else:
        c = tokenizer.config
        t0 = time.perf_counter()
        train = load_clips(manifest, "train", c.num_frames, c.image_size, args.train_clips_per_video,
                           args.train_epochs, args.seed)
        val = load_clips(manifest, "val", c.num_frames, c.image_size, args.val_clips_per_video, 1, args.seed)
        data = {"train": encode_clips(tokenizer, train), "val": {**encode_clips(tokenizer, val), "video": val}}
        path.parent.mkdir(parents=True, exist_ok=True)
        torch.save(data, path)
        print(f"tokenized {train.shape[0]} train + {val.shape[0]} val clips in {time.perf_counter() - t0:.0f} s "
              f"-> {path}", file=sys.stderr)
    return {**data, "train_sources": train_sources, "val_sources": val_sources}


def grids(split: dict, index: torch.Tensor | slice) -> dict[str, torch.Tensor]:
    """A batch of token-shard items: ``{"codes", "cond.frame_prediction"}`` long ``(B, t, h, w)`` (two grids: and
    their ``top.`` grids), no labels."""
    keys = [k for k in split if k != "video"]
    return {key: split[key][index].long() for key in keys}


def packed_condition(val: dict, i: int) -> torch.Tensor:
    """Clip ``i``'s condition codes as a prior's prefix: ``(1, t, h, w)``, two grids packed ``(1, N_top + N)``."""
    from magvit.code_grids import pack_batch

    return pack_batch(grids(val, slice(i, i + 1)))[0][COND_KEY]


def as_one_grid(batch: dict) -> dict:
    """The ``masked-joint`` side's view of a two-grid batch: every grid packed ``(B, 1, 1, N_top + N)``, one grid
    whose plain masking covers both."""
    from magvit.code_grids import pack_batch

    packed, _ = pack_batch(batch)
    return {key: value.reshape(value.shape[0], 1, 1, -1) for key, value in packed.items()}


# ------------------------------------------------------------------------------------------------------------------
# Sides: one size, one task list; each with its training loss, held-out NLL and code sampler
# ------------------------------------------------------------------------------------------------------------------
@dataclass
class Side:
    name: str
    model: torch.nn.Module
    train_loss: Callable[[dict, torch.Generator], torch.Tensor]  # (batch, generator) -> scalar
    nll_kind: str  # what the NLL columns are
    generate: Callable[[torch.Tensor, int], torch.Tensor]  # (condition codes (1, t, h, w), seed) -> (1, t, h, w)
    generate_uncached: Callable[[torch.Tensor, int], torch.Tensor] | None = None
    layout: object = None  # the sequence its held-out NLL is scored on (None: its model's)

    @property
    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.model.parameters())

    @property
    def sequence_length(self) -> int:
        return self.model.config.layout.length


def joint_side(sizes: dict, steps: int) -> Side:
    """Two grids, one mask over both: the masked prefix transformer on the packed video as one ``(1, 1, N)`` grid."""
    from magvit.code_grids import video_codes

    grid, top = sizes.pop("token_grid"), sizes.pop("top_grid")
    n = math.prod(grid) + math.prod(top)
    side = masked_side("masked-joint", "prefix", {**sizes, "token_grid": (1, 1, n)}, None, steps)
    train_loss, generate = side.train_loss, side.generate
    side.train_loss = lambda batch, generator: train_loss(as_one_grid(batch), generator)
    side.generate = lambda condition, seed: video_codes(generate(condition.reshape(1, 1, 1, n), seed).reshape(1, n),
                                                        grid, top)
    side.layout = type(side.model.config.layout)(tuple(grid), "prefix", tuple(top))
    return side


def masked_side(name: str, conditioning: str, sizes: dict, region: torch.Tensor, steps: int) -> Side:
    from magvit.masking import make_training_batch, masked_token_loss
    from magvit.pipeline import generate_codes
    from magvit.transformer import MaskedVideoTransformer, TransformerConfig

    config = TransformerConfig.preset(sizes.pop("preset"), **sizes, conditioning=conditioning)
    model = MaskedVideoTransformer(config)
    vocab, regions = config.vocab, {TASK: region} if conditioning == "interior" else None

    def loss(batch: dict, generator: torch.Generator) -> torch.Tensor:
        tb = make_training_batch(batch, vocab, STAGES.replace(tasks=list(TASKS)), generator=generator,
                                 conditioning=conditioning, condition_regions=regions)
        return masked_token_loss(model(tb.input_ids), tb.labels, tb.loss_mask, vocab.codebook_size,
                                 STAGES.label_smoothing)

    def generate(condition: torch.Tensor, seed: int) -> torch.Tensor:
        return generate_codes(model, TASK, condition, steps=steps, seed=seed,
                              condition_region=region if conditioning == "interior" else None)

    return Side(name, model, loss, "masked", generate)


def autoregressive_side(name: str, sizes: dict) -> Side:
    from magvit.autoregressive import (AutoregressiveConfig, AutoregressiveObjectiveConfig, AutoregressiveTransformer,
                                       next_token_loss)
    from magvit.prior_training import training_sequence
    from magvit.pipeline import generate_codes_autoregressive

    config = AutoregressiveConfig.preset(sizes.pop("preset"), **sizes)
    model = AutoregressiveTransformer(config)
    vocab, layout = config.vocab, config.layout

    def loss(batch: dict, generator: torch.Generator) -> torch.Tensor:
        ids = training_sequence(batch, vocab, AutoregressiveObjectiveConfig(tasks=list(TASKS)), generator)
        return next_token_loss(model(ids), ids, layout, vocab.codebook_size)

    def sampler(use_cache: bool):
        return lambda condition, seed: generate_codes_autoregressive(model, TASK, condition, seed=seed,
                                                                     use_cache=use_cache)

    return Side(name, model, loss, "exact", sampler(True), sampler(False))


def build_sides(names: list[str], preset: str, tokenizer, region: torch.Tensor, steps: int, seed: int) -> list[Side]:
    c = tokenizer.config
    sizes = dict(preset=preset, codebook_size=c.codebook_size,
                 token_grid=c.token_grid(c.num_frames, c.image_size, c.image_size), tasks=TASKS,
                 top_grid=c.top_grid(c.num_frames, c.image_size, c.image_size) if c.hierarchy == 2 else None)
    if "masked-joint" in names and c.hierarchy != 2:
        raise BenchError("the masked-joint side needs a hierarchy 2 tokenizer (two code grids)")
    builders = {"masked-prefix": lambda: masked_side("masked-prefix", "prefix", dict(sizes), region, steps),
                "masked-interior": lambda: masked_side("masked-interior", "interior", dict(sizes), region, steps),
                "autoregressive": lambda: autoregressive_side("autoregressive", dict(sizes)),
                "masked-joint": lambda: joint_side(dict(sizes), steps)}
    sides = []
    for name in names:
        torch.manual_seed(seed)  # the same initial draws for every side
        sides.append(builders[name]())
    return sides


# ------------------------------------------------------------------------------------------------------------------
# Held-out evaluation
# ------------------------------------------------------------------------------------------------------------------
@torch.no_grad()
def masked_nll(model, val: dict, region: torch.Tensor, seed: int, passes: int, layout=None) -> dict[str, float]:
    """Masked-token NLL of the held-out grids as ``MaskedTokenEvaluation`` computes it (frame prediction, no
    condition dropout, the cosine schedule's ratios from a generator seeded ``seed``, ``passes`` maskings of the
    whole set), for either conditioning, also over the masked tokens outside ``region`` (the predicted frames'
    tokens), which that class does not report. ``layout``: the sequence the maskings are drawn for, when it is not
    the model's (the ``masked-joint`` side: the two-stage sequence, positions alike)."""
    from magvit.sequence import code_nll
    from magvit.masking import make_training_batch

    config, layout = model.config, layout or model.config.layout
    scoring = STAGES.replace(tasks=[TASK], cond_dropout_prob=0.0, unmasked_weight=0.0)
    generator = torch.Generator().manual_seed(seed)
    regions = {TASK: region} if layout.interior else None
    outside = ~region.reshape(-1)  # (N,)
    nll, count, future, future_count = 0.0, 0, 0.0, 0
    for _ in range(passes):
        tb = make_training_batch(val, config.vocab, scoring, generator=generator, conditioning=layout.conditioning,
                                 condition_regions=regions)
        logits = model(tb.input_ids).float()  # (B, L, V)
        scored = tb.loss_mask > 0  # (B, L): the masked video positions
        per_token = code_nll(logits[scored], tb.labels[scored], config.codebook_size)  # (M,)
        in_future = outside[None].expand(scored.shape[0], -1)[scored[:, layout.video]]  # (M,)
        nll, count = nll + float(per_token.sum()), count + per_token.numel()
        future, future_count = future + float(per_token[in_future].sum()), future_count + int(in_future.sum())
    return {"nll": nll / count, "nll_future": future / max(future_count, 1)}


def check_against_library(model, val: dict, region: torch.Tensor, seed: int, passes: int, ours: float) -> None:
    """The model's NLL from ``MaskedTokenEvaluation`` itself (an interior model's in ``region``): :func:`masked_nll`
    must repeat it."""
    from magvit.evaluation.evaluators import MaskedTokenEvaluation

    regions = {TASK: region} if model.config.layout.interior else None
    evaluation = MaskedTokenEvaluation(model, [TASK], seed, regions, STAGES)
    for _ in range(passes):
        evaluation.update(val)
    theirs = evaluation.summary()["masked_token_nll"]
    if not math.isclose(theirs, ours, rel_tol=1e-4, abs_tol=1e-5):
        raise BenchError(f"masked NLL {ours:.6f} differs from MaskedTokenEvaluation's {theirs:.6f}")


@torch.no_grad()
def autoregressive_nll(model, val: dict, region: torch.Tensor) -> dict[str, float]:
    """Exact NLL of every held-out video code given the frame-prediction condition and the codes before it."""
    from magvit.autoregressive import video_logits
    from magvit.code_grids import pack_batch
    from magvit.sequence import build_sequence, code_nll

    val = pack_batch(val)[0]  # two grids: packed, top first
    config, codes = model.config, val["codes"]
    vocab, layout, b = config.vocab, config.layout, codes.shape[0]
    ids = build_sequence(vocab, layout, torch.full((b,), vocab.task_token(TASK)),
                         torch.full((b,), vocab.unconditional_token), val[COND_KEY], codes)
    logits = video_logits(model(ids), layout, config.codebook_size).float()  # (B, N, K)
    per_token = code_nll(logits.reshape(-1, config.codebook_size), codes.reshape(-1), config.codebook_size)
    future = per_token.view(b, -1)[:, ~region.reshape(-1)]
    return {"nll": float(per_token.mean()), "nll_future": float(future.mean())}


def clip_scores(videos: torch.Tensor, real: torch.Tensor, n: int) -> tuple[list[float], list[float]]:
    """Per clip PSNR / SSIM of the frames after the ``n`` given ones (``frame_scores``, means over frames)."""
    from magvit.evaluation.evaluators import frame_scores

    scores = frame_scores(videos[:, :, n:].float(), real[:, :, n:].float())
    return scores["psnr"].mean(1).tolist(), scores["ssim"].mean(1).tolist()


def summarise(psnr: list[float], ssim: list[float]) -> dict[str, float]:
    from magvit.evaluation.evaluators import mean_finite

    return {"psnr": mean_finite(psnr), "ssim": sum(ssim) / len(ssim)}


@torch.no_grad()
def baselines(tokenizer, val: dict) -> dict[str, dict[str, float]]:
    """Frame prediction that needs no prior: the first frame copied (in pixels, and its condition codes decoded) and
    the tokenizer's reconstruction of the truth (the upper bound of any prior over its codes)."""
    from magvit.code_grids import TOP
    from magvit.evaluation.evaluators import frame_prediction_baselines

    real = val["video"]
    codes = lambda key: (val[TOP + key].long(), val[key].long()) if TOP + key in val else val[key].long()
    entries = {"copy the first frame": frame_prediction_baselines(real, 1)["copy_baseline"],
               "copy the first frame through the tokenizer": tokenizer.decode(codes(COND_KEY)).clamp(-1, 1),
               "tokenizer reconstruction (upper bound)": tokenizer.decode(codes("codes")).clamp(-1, 1)}
    return {name: summarise(*clip_scores(video, real, 1)) for name, video in entries.items()}


@torch.no_grad()
def frame_prediction(side: Side, tokenizer, val: dict, seed: int, uncached_clips: int) -> dict[str, float]:
    """Generate every held-out clip's codes from its first frame's condition codes (clip ``i``: seed ``seed + i``),
    decode and score them; seconds per clip of the code sampling (median), with and without the KV cache."""
    real, times, uncached, videos = val["video"], [], [], []
    for i in range(real.shape[0]):
        condition = packed_condition(val, i)
        t0 = time.perf_counter()
        codes = side.generate(condition, seed + i)
        times.append(time.perf_counter() - t0)
        if side.generate_uncached is not None and i < uncached_clips:
            t0 = time.perf_counter()
            side.generate_uncached(condition, seed + i)
            uncached.append(time.perf_counter() - t0)
        videos.append(tokenizer.decode(codes).clamp(-1, 1))
    out = summarise(*clip_scores(torch.cat(videos), real, 1))
    return {**out, "clip_seconds": statistics.median(times),
            "clip_seconds_uncached": statistics.median(uncached) if uncached else None}


def evaluate(side: Side, tokenizer, val: dict, region: torch.Tensor, args) -> dict:
    side.model.eval()
    batch = grids(val, slice(None))
    if side.nll_kind == "masked":
        nll = masked_nll(side.model, batch, region, args.seed, args.nll_passes, side.layout)
        if side.layout is None:  # the model's own sequences: the library scores them too
            check_against_library(side.model, batch, region, args.seed, args.nll_passes, nll["nll"])
    else:
        nll = autoregressive_nll(side.model, batch, region)
    with torch.random.fork_rng(devices=[]):  # sampling leaves the global RNG alone
        out = {**nll, **frame_prediction(side, tokenizer, val, args.seed, args.uncached_clips)}
    side.model.train()
    return out


# ------------------------------------------------------------------------------------------------------------------
# Interleaved training
# ------------------------------------------------------------------------------------------------------------------
@dataclass
class Run:
    side: Side
    optimizer: torch.optim.Optimizer
    steps: int = 0
    seconds: float = 0.0  # summed step time on the budget clock
    wall: float = 0.0
    losses: list[float] = field(default_factory=list)
    points: list[dict] = field(default_factory=list)  # evaluations: {"seconds", "steps", "wall", "nll", ...}
    diverged: bool = False


def precision(bf16: bool):
    return torch.autocast("cpu", dtype=torch.bfloat16) if bf16 else contextlib.nullcontext()


def optimizer_for(model: torch.nn.Module, lr: float):
    """MAGVIT's AdamW (beta2 0.96, weight decay 0.045 on matrices), as ``configs/transformer/tiny.yaml``."""
    from magvit.optim import OptimConfig, build_adam

    return build_adam(model, OptimConfig(lr=lr, beta1=0.9, beta2=0.96, weight_decay=0.045))


def warm_up(side: Side, batch: dict, bf16: bool) -> None:
    """One forward + backward (its gradients discarded), so one-time kernel set-up is not charged to the budget."""
    with precision(bf16):
        loss = side.train_loss(batch, torch.Generator().manual_seed(0))
    loss.backward()
    side.model.zero_grad(set_to_none=True)


def step_generator(seed: int, step: int) -> torch.Generator:
    """The task / dropout / mask draws of step ``step``: the same for every side (the masked sides also draw mask
    ratios, the autoregressive one does not, so one stream per run would drift apart)."""
    return torch.Generator().manual_seed(seed * 1_000_003 + step)


def train_step(run: Run, batch: dict, args) -> tuple[float, float]:
    """One optimiser step (linear warm-up, then the constant LR; grad clip 1.0); (wall, budget-clock) seconds."""
    wall, budget = clock("wall"), clock(args.clock)
    for group in run.optimizer.param_groups:
        group["lr"] = args.lr * min(1.0, (run.steps + 1) / args.warmup_steps)
    run.optimizer.zero_grad(set_to_none=True)
    with precision(args.bf16):
        loss = run.side.train_loss(batch, step_generator(args.seed, run.steps))
    loss.backward()
    torch.nn.utils.clip_grad_norm_(run.side.model.parameters(), 1.0)
    run.optimizer.step()
    value = loss.detach().item()
    run.losses.append(value)
    run.diverged = not math.isfinite(value)
    return clock("wall") - wall, clock(args.clock) - budget


def record(run: Run, tokenizer, val: dict, region: torch.Tensor, args) -> None:
    point = {"seconds": run.seconds, "wall": run.wall, "steps": run.steps,
             "train_loss": sum(run.losses[-10:]) / max(len(run.losses[-10:]), 1),
             **evaluate(run.side, tokenizer, val, region, args), "load": common.load_average()}
    run.points.append(point)
    print(f"  {run.side.name}: {run.seconds:.0f} s, {run.steps} steps: NLL {point['nll']:.3f}, PSNR "
          f"{point['psnr']:.2f} dB, SSIM {point['ssim']:.4f} (load {point['load']})", file=sys.stderr, flush=True)


def train_interleaved(sides: list[Side], data: dict, tokenizer, region: torch.Tensor, report_at: list[float],
                      args) -> list[Run]:
    """Single steps, always of the side whose clock is furthest behind, until each has spent ``args.budget``
    seconds; a side is evaluated the first time its clock passes each point of ``report_at``."""
    train, val = data["train"], data["val"]
    order = BatchOrder(train["codes"].shape[0], args.batch_size, args.seed)
    runs = [Run(s, optimizer_for(s.model, args.lr)) for s in sides]
    for run in runs:
        run.side.model.train()
        warm_up(run.side, grids(train, order[0]), args.bf16)
    pending = {id(run): [p for p in report_at if p < args.budget] + [args.budget] for run in runs}
    while True:
        active = [run for run in runs if run.seconds < args.budget and not run.diverged]
        if not active:
            break
        run = min(active, key=lambda r: r.seconds)
        wall, budget = train_step(run, grids(train, order[run.steps]), args)
        run.seconds, run.wall, run.steps = run.seconds + budget, run.wall + wall, run.steps + 1
        points = pending[id(run)]
        if (points and run.seconds >= points[0]) or run.diverged:
            while points and run.seconds >= points[0]:
                points.pop(0)
            record(run, tokenizer, val, region, args)
    return runs


# ------------------------------------------------------------------------------------------------------------------
# Report
# ------------------------------------------------------------------------------------------------------------------
COLUMNS = ["prior", "parameters", "sequence", "budget", "steps", "s / step", "held-out NLL (nats / token)",
           "NLL, predicted frames' tokens", "NLL kind", "frame prediction PSNR (dB)", "SSIM", "s / clip",
           "s / clip, no KV cache"]


def results_table(runs: list[Run], report_at: list[float], base: dict, title: str) -> common.Table:
    table = common.Table(title, COLUMNS)
    for seconds in report_at:
        for run in runs:
            side = run.side
            head = [side.name, f"{side.num_parameters / 1e6:.2f} M", side.sequence_length, f"{seconds:g} s"]
            p = next((p for p in run.points if p["seconds"] >= seconds), None)
            if p is None:
                table.add(*head, f"diverged at step {run.steps}" if run.diverged else "not reached",
                          *[""] * (len(COLUMNS) - 5))
                continue
            uncached = p["clip_seconds_uncached"]
            table.add(*head, p["steps"], f"{p['wall'] / max(p['steps'], 1):.3f}", f"{p['nll']:.3f}",
                      f"{p['nll_future']:.3f}", side.nll_kind, f"{p['psnr']:.2f}", f"{p['ssim']:.4f}",
                      f"{p['clip_seconds']:.3f}", f"{uncached:.3f}" if uncached is not None else "")
    for name, scores in base.items():
        table.add(name, "", "", "", "", "", "", "", "", f"{scores['psnr']:.2f}", f"{scores['ssim']:.4f}", "", "")
    return table


def notes(runs: list[Run], data: dict, tokenizer, region: torch.Tensor, args, load_start: str) -> list[str]:
    c = tokenizer.config
    grid = c.token_grid(c.num_frames, c.image_size, c.image_size)
    top = c.top_grid(c.num_frames, c.image_size, c.image_size) if c.hierarchy == 2 else None
    n_video = math.prod(grid) + (math.prod(top) if top else 0)
    two_grids = [] if top is None else [
        f"Two code grids (hierarchy 2): a {'x'.join(map(str, top))} top grid and the {'x'.join(map(str, grid))} "
        f"bottom grid, {n_video} video tokens packed top first (magvit.code_grids). masked-prefix: the top stage "
        "(bottom all masked, unscored) or the bottom stage (top given, unscored) per example, decoded in two "
        f"phases of {args.steps} steps; masked-joint: one mask over both grids, one phase of {args.steps} steps, "
        "its NLL on masked-prefix's two-stage maskings (the same masks); autoregressive: raster order, top first."]
    return two_grids + [
        f"Data: {data['train']['codes'].shape[0]} training clips ({args.train_clips_per_video} per video x "
        f"{args.train_epochs} epoch(s) of random starts / crops / flips) from {len(data['train_sources'])} source "
        "videos; "
        f"{data['val']['codes'].shape[0]} held-out clips from {len(data['val_sources'])} other source videos (checked "
        f"by the script). Tokenizer {args.tokenizer}: {c.num_frames}x{c.image_size}x{c.image_size} clips -> "
        f"{'x'.join(map(str, grid))}{' + ' + 'x'.join(map(str, top)) if top else ''} = {n_video} codes of "
        f"{c.codebook_size}.",
        f"Training: every side has the tasks {', '.join(TASKS)} (drawn uniformly per example, condition dropout 0.1; "
        "the same draws for every side), preset "
        f"'{args.preset}', the same initial seed, AdamW (lr {args.lr:g}, betas (0.9, 0.96), weight decay 0.045, "
        f"grad clip 1.0, {args.warmup_steps} warm-up steps then constant), batch {args.batch_size} in the same order; "
        "interleaved single steps (the side with the least summed step time steps next), each stopped when its own "
        f"summed step time reached {args.budget:g} s on the {CLOCKS[args.clock]}; "
        f"{'bf16 autocast' if args.bf16 else 'fp32'}; no EMA (the raw weights are scored). Masked sides: the "
        "cosine schedule, loss on every video token (visible ones weigh 1); autoregressive: next-token loss on the "
        "video codes. Evaluation time is excluded from the budget.",
        "NLL (nats per video token, frame prediction, first frame given) is not the same quantity on both kinds: "
        "'exact' (autoregressive) is the NLL of every video code given the condition and the codes before it, the "
        f"sequence's exact NLL / {n_video}; 'masked' is MaskedTokenEvaluation's: the NLL of the masked tokens given "
        f"the visible ones, at the cosine schedule's mask ratios drawn with seed {args.seed} ({args.nll_passes} "
        "masking(s) of the held-out set, the same masks for both masked sides); it is not a likelihood of the video. "
        "MaskedTokenEvaluation builds prefix sequences only, so the script repeats its computation with the "
        "interior layout (checked to equal the library's on the prefix side). 'Predicted frames' tokens': the "
        f"tokens outside the condition region (latent frames 1..{grid[0] - 1}; latent frame 0 is the given frame's).",
        f"Frame prediction: every held-out clip from its first frame (condition codes of the tokenizer's condition "
        f"video), one sample per clip (clip i: seed {args.seed} + i), scored on frames 2..{c.num_frames} against the "
        "truth (magvit.evaluation.evaluators.frame_scores: PSNR / SSIM on RGB, means over frames, then clips). "
        f"Masked: {args.steps} parallel steps (temperature 1, choice temperature 4.5, cosine); autoregressive: one "
        "code at a time in raster order, temperature 1, no top-k / top-p; no guidance on any side. 's / clip': "
        "median seconds of sampling one clip's codes (pixel decoding, the same for all, excluded); 'no KV cache': "
        f"the same sampler re-reading the whole sequence at every step, on the first {args.uncached_clips} clip(s).",
        f"Load average (1 / 5 / 15 min) at the start: {load_start}; at the end: {common.load_average()}. Torch "
        f"threads: {args.threads}.",
    ]


# ------------------------------------------------------------------------------------------------------------------
# CLI
# ------------------------------------------------------------------------------------------------------------------
def arguments():
    p = common.parser(__doc__.splitlines()[0])
    p.add_argument("--sides", default=",".join(DEFAULT_SIDES),
                   help=f"comma-separated sides of {', '.join(SIDES)} (default: %(default)s)")
    p.add_argument("--tokenizer", default=str(ROOT / "runs/demo/tokenizer/export"), help="tokenizer export folder")
    p.add_argument("--manifest", default=str(ROOT / "data/sample/manifest.jsonl"))
    p.add_argument("--cache", default=str(ROOT / "runs/bench/priors"), help="where the token grids are cached")
    p.add_argument("--preset", default="tiny", help="size preset of every side (default: %(default)s)")
    p.add_argument("--budget", type=float, default=180.0, help="training seconds per side (default: %(default)s)")
    p.add_argument("--report-at", default="", help="more budgets (s) reported in the table (default: the budget)")
    p.add_argument("--clock", choices=("wall", "cpu"), default="wall", help="budget clock (default: %(default)s)")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--warmup-steps", type=int, default=30)
    p.add_argument("--train-clips-per-video", type=int, default=4)
    p.add_argument("--train-epochs", type=int, default=2, help="passes of random clips cut for the training pool")
    p.add_argument("--val-clips-per-video", type=int, default=2, help="clips per held-out video (evenly spaced)")
    p.add_argument("--steps", type=int, default=12, help="parallel decoding steps of the masked sides")
    p.add_argument("--nll-passes", type=int, default=4, help="seeded maskings of the held-out set (masked NLL)")
    p.add_argument("--uncached-clips", type=int, default=2,
                   help="clips also sampled without the KV cache (autoregressive; 0: none)")
    common.add_precision_arguments(p)
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(threads=1)  # one thread: on shared cores, OpenMP threads wait for each other (bench_reconstruction)
    args = p.parse_args()
    args.bf16 = common.use_bf16(args.precision)
    return args


def run(args) -> None:
    from magvit.conditions import two_grid_condition_region
    from magvit.prep.tokenize import load_tokenizer

    common.setup_threads(args.threads)
    header, load_start = common.machine_description(args.threads), common.load_average()
    if args.quick:
        args.budget, args.report_at, args.train_clips_per_video, args.train_epochs = 3.0, "", 1, 1
        args.val_clips_per_video, args.nll_passes, args.uncached_clips, args.warmup_steps = 1, 1, 1, 5
    if args.warmup_steps < 1 or args.batch_size < 1 or args.nll_passes < 1:
        raise BenchError("--warmup-steps, --batch-size and --nll-passes must be >= 1")
    names = [s for s in args.sides.split(",") if s]
    unknown = [s for s in names if s not in SIDES]
    if unknown or not names:
        raise BenchError(f"unknown side {unknown[0]!r}: use {', '.join(SIDES)}" if unknown else "--sides is empty")
    if not (Path(args.tokenizer) / "config.json").is_file():
        raise BenchError(f"no tokenizer export at {args.tokenizer}: train the demo tokenizer first (make demo)")
    tokenizer = load_tokenizer(args.tokenizer, "cpu").eval()
    data = token_data(args, tokenizer)
    if args.quick:  # a few held-out clips
        data["val"] = {key: value[:3] for key, value in data["val"].items()}
    c = tokenizer.config
    grid = c.token_grid(c.num_frames, c.image_size, c.image_size)
    top = c.top_grid(c.num_frames, c.image_size, c.image_size) if c.hierarchy == 2 else None
    # (t, h, w); two grids: both packed (N_top + N,)
    region = two_grid_condition_region(TASK, grid, top, (c.num_frames, c.image_size, c.image_size), c.causal)
    sides = build_sides(names, args.preset, tokenizer, region, args.steps, args.seed)
    report_at = sorted({float(x) for x in args.report_at.split(",") if x and float(x) < args.budget}
                       | {args.budget})
    runs = train_interleaved(sides, data, tokenizer, region, report_at, args)
    title = (f"Priors at equal training budgets: {args.preset} preset, frame prediction from the first frame on "
             f"held-out clips, {len(runs)} sides interleaved")
    table = results_table(runs, report_at, baselines(tokenizer, data["val"]), title)
    table.notes += notes(runs, data, tokenizer, region, args, load_start)
    common.emit([table], header, args.markdown)


def main() -> None:
    args = arguments()
    try:
        run(args)
    except BenchError as err:
        print(f"bench_priors.py: error: {err}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
