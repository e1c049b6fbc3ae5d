"""The evaluations of ``python -m magvit.evaluate``, each accumulating over batches and summarised once.

- :class:`TokenizerEvaluation`: reconstruction PSNR / SSIM, codebook usage and perplexity, bits per pixel;
- :class:`MaskedTokenEvaluation`: masked-token NLL (nats per code) and accuracy per task on a seeded masking;
- :class:`FramePredictionEvaluation`: generated future frames against the real ones, next to the baselines (the last
  given frame copied, in pixels and through the tokenizer; all black; the mean given frame) and the tokenizer's
  reconstruction (an upper bound), in PSNR, SSIM and Moving MNIST's per-frame MSE, per clip and per predicted frame;
- :func:`evaluate_clips` runs the three over held-out clips in one pass, :func:`evaluate_token_shards` the masked
  tokens over token shards, :func:`fvd_report` the Frechet video distances.
"""

from __future__ import annotations

import dataclasses
import itertools
import math
import sys
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

import torch
from tqdm.auto import tqdm

from .. import code_grids, metrics, tasks
from ..conditions import (build_condition_video, latent_condition_region, latent_condition_regions,
                          two_grid_condition_region)
from ..masking import MaskingConfig, make_training_batch, recorded_masking
from ..pipeline import prior_of
from ..sequence import NO_LABEL, code_nll, predicted_codes
from ..tasks import condition_name
from ..cli import UsageError
from ..shard_meta import TokenShardMeta
from .inputs import check_token_meta, shard_tasks, supported_tasks, token_batches_from_shards


class TokenizerEvaluation:
    """Accumulates reconstruction quality and code statistics over batches of clips. A continuous tokenizer (none /
    kl) has no codes: its summary has no codebook or bits-per-pixel keys. Two code grids (hierarchy 2): the codebook
    keys are the bottom grid's, ``top_codebook_*`` the top grid's, and the bits per pixel count both grids."""

    def __init__(self, tokenizer, device: torch.device, num_samples: int = 1):
        self.tokenizer = tokenizer
        self.device = device
        continuous, size = tokenizer.config.continuous, tokenizer.config.codebook_size
        self.usage = None if continuous else metrics.CodebookUsage(size)
        self.top_usage = metrics.CodebookUsage(size) if tokenizer.config.hierarchy == 2 else None
        self.top_grid: tuple[int, int, int] | None = None
        self.psnr: list[float] = []
        self.ssim: list[float] = []
        self.grid: tuple[int, int, int] | None = None
        self.video_size: tuple[int, int, int] | None = None
        self.num_samples = num_samples
        self.samples: list[tuple[torch.Tensor, torch.Tensor]] = []  # (real, reconstruction), each (3, T, H, W)

    @torch.no_grad()
    def update(self, video: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Reconstruct a batch ``(B, 3, T, H, W)``; returns ``(codes (B, t, h, w), reconstruction)`` (continuous:
        the latents (B, D, t, h, w) in place of the codes)."""
        video = video.to(self.device)
        codes = self.tokenizer.encode(video)  # (B, t, h, w), continuous (B, D, t, h, w); two grids (top, bottom)
        recon = self.tokenizer.decode(codes).clamp(-1, 1).float()  # (B, 3, T, H, W)
        bottom = codes
        if self.top_usage is not None:
            self.top_usage.update(codes.top)
            self.top_grid, bottom = tuple(codes.top.shape[-3:]), codes.bottom
        if self.usage is not None:
            self.usage.update(bottom)
        self.psnr += metrics.video_psnr(recon.cpu(), video.cpu()).tolist()
        self.ssim += metrics.video_ssim(recon.cpu(), video.cpu()).tolist()
        self.grid = tuple(bottom.shape[-3:])
        self.video_size = tuple(video.shape[2:])
        for i in range(min(video.shape[0], self.num_samples - len(self.samples))):
            self.samples.append((video[i].cpu(), recon[i].cpu()))
        return codes, recon

    def summary(self) -> dict[str, Any]:
        if not self.psnr:
            raise UsageError("no clip could be read: nothing to evaluate")
        tokens, pixels = math.prod(self.grid), math.prod(self.video_size)
        bits = metrics.bits_per_pixel(self.usage.codebook_size, self.grid, self.video_size) if self.usage else 0.0
        summary = {
            "num_clips": len(self.psnr),
            "psnr": mean_finite(self.psnr),
            "ssim": sum(self.ssim) / len(self.ssim),
            "token_grid": list(self.grid),
            "clip_size": list(self.video_size),
        }
        entropy_bits = self.usage.bits_per_pixel(tokens, pixels) if self.usage else 0.0
        if self.top_usage is not None:  # two grids: the top grid's statistics, and its bits on top of the bottom's
            summary.update({"top_token_grid": list(self.top_grid),
                            **{f"top_{_codebook_key(k)}": v for k, v in self.top_usage.summary().items()}})
            bits += metrics.bits_per_pixel(self.top_usage.codebook_size, self.top_grid, self.video_size)
            entropy_bits += self.top_usage.bits_per_pixel(math.prod(self.top_grid), pixels)
        if self.usage is not None:  # code statistics: a continuous tokenizer has none
            summary.update({
                **{_codebook_key(k): v for k, v in self.usage.summary().items()},
                "bits_per_pixel": bits,
                "bits_per_pixel_entropy_coded": entropy_bits,
            })
        return {**summary, "per_clip": {"psnr": self.psnr, "ssim": self.ssim}}


def _codebook_key(key: str) -> str:
    """The report's name of a ``metrics.CodebookUsage`` summary key (``usage`` -> ``codebook_usage``)."""
    return key if key.startswith("codebook") else f"codebook_{key}"


def mean_finite(values: Sequence[float]) -> float:
    # A perfect reconstruction has infinite PSNR; JSON cannot hold inf, and one such clip would hide the rest.
    finite = [v for v in values if math.isfinite(v)]
    return sum(finite) / len(finite) if finite else float("inf")


class MaskedTokenEvaluation:
    """Masked-token NLL (nats) and accuracy per task, on a fixed random masking (seeded) of held-out token grids.

    The maskings are the model's training masking (``masking``; by default the one its export recorded,
    ``masking.recorded_masking``): its schedule draws the ratios and, over two code grids, its
    ``two_grid_masking`` says whether one mask covers both grids (``joint``) or each example is in the top or the
    bottom stage (``stages``). Nothing is dropped and only the masked positions are scored.

    The sequences are the model's own (``config.conditioning``): an interior model's masked slots inside a task's
    latent condition region show the condition codes, so it needs ``condition_regions`` (by condition name, as
    ``masking.make_training_batch`` takes them: ``conditions.latent_condition_regions`` of the clips' size, the
    tokenizer's causality and the token grid, or ``TokenShardMeta.condition_regions`` of token shards)."""

    def __init__(self, transformer, tasks: Sequence[str], seed: int = 0,
                 condition_regions: Mapping[str, torch.Tensor] | None = None, masking: MaskingConfig | None = None):
        self.transformer = transformer
        self.condition_regions = condition_regions
        # held-out scoring: the training masking without condition dropout, the masked tokens alone weighed
        trained = recorded_masking(transformer) if masking is None else masking
        self.maskings = {t: trained.replace(tasks=[t], cond_dropout_prob=0.0, uncond_prob=0.0, unmasked_weight=0.0)
                         for t in tasks}
        self.conditioning = transformer.config.conditioning  # sequence.PriorConfig: either prior answers
        if self.conditioning == "interior" and condition_regions is None:
            raise ValueError("a model with interior conditioning is scored with the condition regions of its clips")
        self.tasks = list(tasks)
        self.generator = torch.Generator().manual_seed(seed)
        self.nll = {t: 0.0 for t in self.tasks}
        self.correct = {t: 0 for t in self.tasks}
        self.count = {t: 0 for t in self.tasks}

    @torch.no_grad()
    def update(self, batch: dict[str, torch.Tensor]) -> None:
        """``batch``: collated token items ``{"codes": (B, t, h, w), "cond.<task>": ..., "label": (B,)}``."""
        config = self.transformer.config
        device = next(self.transformer.parameters()).device
        labels = torch.as_tensor(batch.get("label", NO_LABEL)).long().reshape(-1).expand(batch["codes"].shape[0])
        # Labels the model has no class token for are evaluated as unlabelled.
        labels = torch.where((labels >= 0) & (labels < config.num_classes), labels, torch.full_like(labels, NO_LABEL))
        batch = {**batch, "label": labels}
        for task in self.tasks:
            rows = batch
            if tasks.task(task).needs_label:  # only the examples with a class the model knows
                keep = labels >= 0
                if not bool(keep.any()):
                    continue
                rows = {k: (v[keep] if isinstance(v, torch.Tensor) and v.dim() > 0 else v) for k, v in batch.items()}
            tb = make_training_batch(rows, config.vocab, self.maskings[task], generator=self.generator,
                                     conditioning=self.conditioning, condition_regions=self.condition_regions)
            logits = self.transformer(tb.input_ids.to(device)).float().cpu()  # (B, L, V) or factorised (B, L, F, S)
            scored = tb.loss_mask > 0  # (B, L): the masked video positions
            target = tb.labels[scored]  # (M,)
            picked = logits[scored]  # (M, V) or (M, F, S)
            # per whole code: a factorised model's sub-token NLLs summed, comparable with a flat model's
            self.nll[task] += float(code_nll(picked, target, config.codebook_size).sum())
            self.correct[task] += int((predicted_codes(picked, config.codebook_size) == target).sum())
            self.count[task] += int(target.numel())

    def summary(self) -> dict[str, Any]:
        per_task = {}
        for t in self.tasks:
            if self.count[t] == 0:  # e.g. "class" without labelled examples
                continue
            n = self.count[t]
            per_task[t] = {"nll": self.nll[t] / n, "accuracy": self.correct[t] / n, "masked_tokens": self.count[t]}
        total = max(sum(self.count.values()), 1)
        nll = sum(self.nll.values()) / total
        return {
            "masked_token_nll": nll,
            "masked_token_perplexity": math.exp(min(nll, 700.0)),
            "masked_token_accuracy": sum(self.correct.values()) / total,
            "masked_tokens": sum(self.count.values()),
            "per_task": per_task,
        }


#: the report's frame-prediction entries: the model's prediction, the baselines it has to beat (on Moving MNIST an
#: all-black prediction beats copying the last frame) and the tokenizer's reconstruction of the truth (an upper bound)
FRAME_PREDICTION_ENTRIES = ("generated", "copy_baseline", "copy_through_tokenizer", "black_baseline", "mean_baseline",
                            "reconstruction")
FRAME_METRICS = ("psnr", "ssim", "mse_per_frame")
FRAME_METRIC_UNITS = {
    "psnr": "dB, RGB in [0, 1], mean over predicted frames",
    "ssim": "RGB, Gaussian window, mean over predicted frames",
    "mse_per_frame": "sum of squared errors over a frame's pixels in [0, 1] on gray (the mean over RGB), mean over "
                     "predicted frames",
}


def frame_scores(prediction: torch.Tensor, target: torch.Tensor) -> dict[str, torch.Tensor]:
    """Per-frame scores ``(B, T)`` of predicted frames ``(B, 3, T, H, W)`` in [-1, 1] against the real ones.

    ``psnr`` and ``ssim`` on RGB like the rest of the report (``metrics.video_psnr`` is their mean over frames);
    ``mse_per_frame`` is the Moving MNIST literature's per-frame MSE: the sum over the frame's pixels, with values in
    [0, 1], of the squared error, computed on gray (the mean over the channels, so a gray digit replicated to RGB
    counts once).
    """
    b, c, t, h, w = prediction.shape
    frames = lambda v: v.transpose(1, 2).reshape(b * t, c, h, w)  # (B*T, 3, H, W)
    gray = lambda v: (v.double().mean(1) + 1) / 2  # (B, T, H, W) in [0, 1]
    return {"psnr": metrics.psnr(frames(prediction), frames(target)).view(b, t),
            "ssim": metrics.ssim(frames(prediction), frames(target)).view(b, t),
            "mse_per_frame": (gray(prediction) - gray(target)).pow(2).sum((2, 3))}


def frame_prediction_baselines(real: torch.Tensor, num_cond_frames: int) -> dict[str, torch.Tensor]:
    """Predictions that need no model, ``(B, 3, T, H, W)`` like ``real``: the last given frame repeated
    (``copy_baseline``), all black (-1, ``black_baseline``) and the mean of the given frames (``mean_baseline``)."""
    mean = real[:, :, :num_cond_frames].mean(2, keepdim=True).expand_as(real)
    return {"copy_baseline": build_condition_video(real, "frame_prediction", num_cond_frames=num_cond_frames),
            "black_baseline": torch.full_like(real, -1.0), "mean_baseline": mean}


class CodeAgreement:
    """The generated codes against the real clips' own codes on the predicted latent slots (those outside the
    condition region): how often the prior drew the very code, and how concentrated its draws are. A prior that
    regresses to the most frequent code (Moving MNIST's flat background) shows it here before any pixel does: its
    most common code takes a far larger share of its draws than of the real codes."""

    def __init__(self, codebook_size: int):
        self.matches = 0
        self.real, self.generated = metrics.CodebookUsage(codebook_size), metrics.CodebookUsage(codebook_size)

    def update(self, generated: torch.Tensor, real: torch.Tensor, predicted: torch.Tensor) -> None:
        """``generated`` and ``real`` codes ``(B, t, h, w)``; ``predicted`` bool ``(t, h, w)``: the slots scored."""
        generated, real = generated[:, predicted].cpu(), real[:, predicted].cpu()  # (B, slots)
        self.matches += int((generated == real).sum())
        self.real.update(real)
        self.generated.update(generated)

    def summary(self) -> dict[str, Any]:
        """``accuracy`` (the generated code is the real one), the most common real code and its share of the real
        codes and of the generated ones, the generated codes' own most common share, and the distinct codes of
        each; ``{}`` before any update."""
        slots = self.real.num_tokens
        if not slots:
            return {}
        top_real = int(self.real.counts.argmax())
        return {"slots": slots, "accuracy": self.matches / slots,
                "most_common_real_code": top_real, "its_share_of_real": int(self.real.counts[top_real]) / slots,
                "its_share_of_generated": int(self.generated.counts[top_real]) / slots,
                "generated_most_common_share": int(self.generated.counts.max()) / slots,
                "distinct_real": self.real.used_codes, "distinct_generated": self.generated.used_codes}


class FramePredictionEvaluation:
    """Frame prediction from the first ``num_cond_frames`` frames: the generated future frames against the real
    ones, next to the baselines of ``FRAME_PREDICTION_ENTRIES``, scored by ``frame_scores`` per clip and per
    predicted frame (the curves of a PSNR / SSIM / MSE-per-frame plot)."""

    def __init__(self, tokenizer, transformer, num_cond_frames: int = 1, steps: int = 12, temperature: float = 1.0,
                 guidance_scale: float = 0.0, seed: int = 0, num_samples: int = 1, choice_temperature: float = 4.5):
        self.tokenizer, self.transformer = tokenizer, transformer
        self.num_cond_frames = num_cond_frames
        self.steps, self.temperature, self.guidance_scale, self.seed = steps, temperature, guidance_scale, seed
        self.choice_temperature = choice_temperature
        # entry -> metric -> one list of per-predicted-frame values per clip
        self.scores: dict[str, dict[str, list[list[float]]]] = {
            name: {metric: [] for metric in FRAME_METRICS} for name in FRAME_PREDICTION_ENTRIES
        }
        self.num_frames: int | None = None
        self.num_samples = num_samples
        self.samples: list[torch.Tensor] = []  # generated (3, T, H, W)
        self.generated: list[torch.Tensor] = []  # for FVD, (3, T, H, W) each
        self.codes = CodeAgreement(transformer.config.codebook_size)

    @torch.no_grad()
    def update(self, video: torch.Tensor, reconstruction: torch.Tensor, keep_for_fvd: bool = False,
               condition_codes: torch.Tensor | tuple[torch.Tensor, torch.Tensor] | None = None,
               real_codes: torch.Tensor | None = None) -> None:
        """Score the clips ``video`` ``(B, 3, T, H, W)`` whose tokenizer reconstructions are ``reconstruction``.

        The whole batch is generated at once (one sample per clip, each given its own condition) from one generator
        seeded with ``seed`` + the number of clips scored before the batch: batch size 1 gives clip ``i`` the seed
        ``seed + i``; any batch size samples from the same distribution, and a seed and a batch size fix the
        samples. ``condition_codes``: the tokenizer's codes (two grids: the ``(top, bottom)`` pair) of the clips'
        condition video (``conditions.build_condition_video(video, "frame_prediction", num_cond_frames)``) when the
        caller has them already; else they are encoded here. ``real_codes`` ``(B, t, h, w)``: the clips' own codes,
        for :class:`CodeAgreement` (one code grid only)."""
        device = next(self.transformer.parameters()).device
        prior = prior_of(self.transformer)  # masked or autoregressive: the options its sampler takes
        n, batch = self.num_cond_frames, video.shape[0]
        self.num_frames = video.shape[2]
        real = video.cpu()
        if condition_codes is None:  # the n given frames, the last one repeated (as pipeline.condition_video)
            condition = build_condition_video(video.to(device), "frame_prediction", num_cond_frames=n)
            condition_codes = self.tokenizer.encode(condition)  # (B, t, h, w); two grids (top, bottom)
        codes = prior.generate_codes(self.transformer, "frame_prediction", code_grids.pack_codes(condition_codes),
                                     num_samples=batch, seed=self.seed + len(self.scores["generated"]["psnr"]),
                                     **self._sampling_options(prior, video.shape[2:]))
        if isinstance(real_codes, torch.Tensor) and isinstance(codes, torch.Tensor):
            given = latent_condition_region("frame_prediction", codes.shape[1:], video.shape[2:],
                                            self.tokenizer.config.causal, n)
            self.codes.update(codes, real_codes, ~given.to(codes.device))
        generated = self.tokenizer.decode(codes).clamp(-1, 1).float().cpu()  # (B, 3, T, H, W)
        predictions = {"generated": generated, **frame_prediction_baselines(real, n),
                       "copy_through_tokenizer": self.tokenizer.decode(condition_codes).clamp(-1, 1).float().cpu(),
                       "reconstruction": reconstruction.cpu()}
        for name in FRAME_PREDICTION_ENTRIES:  # scored on the future frames only
            for metric, values in frame_scores(predictions[name][:, :, n:], real[:, :, n:]).items():
                self.scores[name][metric] += values.tolist()  # one list per clip
        self.samples += list(generated[: max(self.num_samples - len(self.samples), 0)])
        if keep_for_fvd:
            self.generated += list(generated)

    def _sampling_options(self, prior, clip_size: Sequence[int]) -> dict[str, Any]:
        """The sampler's keywords: those of ours its prior takes, and an interior model's condition region (the
        latent slots of the n given frames of ``clip_size`` ``(T, H, W)`` clips)."""
        options = {k: v for k, v in (("steps", self.steps), ("temperature", self.temperature),
                                     ("choice_temperature", self.choice_temperature),
                                     ("guidance_scale", self.guidance_scale)) if k in prior.options}
        config = self.transformer.config
        if config.conditioning == "interior":
            options["condition_region"] = two_grid_condition_region("frame_prediction", config.token_grid,
                                                                    config.top_grid, clip_size,
                                                                    self.tokenizer.config.causal,
                                                                    self.num_cond_frames)
        return options

    def summary(self) -> dict[str, Any]:
        """Per entry: the means over clips and predicted frames, ``per_clip`` (means over a clip's predicted frames)
        and ``per_frame`` (means over clips of each predicted frame; an infinite PSNR, an exact frame, is left out
        of the mean unless every clip has it)."""
        n = self.num_cond_frames
        out: dict[str, Any] = {"num_cond_frames": n, "steps": self.steps, "temperature": self.temperature,
                               "choice_temperature": self.choice_temperature, "guidance_scale": self.guidance_scale,
                               "num_clips": len(self.scores["generated"]["psnr"]),
                               "predicted_frames": list(range(n, self.num_frames or n)), "units": FRAME_METRIC_UNITS,
                               "generated_codes": self.codes.summary()}
        for name, scores in self.scores.items():
            per_clip = {m: [sum(v) / len(v) for v in clips] for m, clips in scores.items()}
            per_frame = {m: [mean_finite(frame) for frame in zip(*clips)] for m, clips in scores.items()}
            out[name] = {"psnr": mean_finite(per_clip["psnr"]),
                         **{m: sum(per_clip[m]) / max(len(per_clip[m]), 1) for m in ("ssim", "mse_per_frame")},
                         "per_clip": per_clip, "per_frame": per_frame}
        return out


def compute_fvd(extractor, real: list[torch.Tensor], fake: list[torch.Tensor], batch_size: int) -> float:
    batches = lambda videos: (torch.stack(videos[i : i + batch_size]) for i in range(0, len(videos), batch_size))
    return metrics.frechet_video_distance(extractor, batches(real), batches(fake))


@dataclasses.dataclass
class ClipResults:
    """What one pass over the held-out clips accumulated."""

    tokenizer: TokenizerEvaluation
    frame_prediction: FramePredictionEvaluation | None = None
    masked_tokens: MaskedTokenEvaluation | None = None  # on the clips' own codes, tokenized on the fly
    real: list[torch.Tensor] = dataclasses.field(default_factory=list)  # (3, T, H, W) each, kept for FVD
    reconstructed: list[torch.Tensor] = dataclasses.field(default_factory=list)
    lost: dict[str, list] = dataclasses.field(default_factory=dict)  # iterate_clips' unreadable / skipped

    def report(self) -> dict[str, Any]:
        """The report's ``tokenizer``, ``data_problems`` and (with a transformer) ``frame_prediction`` sections."""
        unreadable, skipped = self.lost.get("unreadable", []), self.lost.get("skipped", [])
        if not self.tokenizer.psnr:
            raise UsageError(f"no clip could be read: {len(unreadable)} unreadable"
                             + (f", e.g. {unreadable[0]['path']}: {unreadable[0]['reason']}" if unreadable else ""))
        report = {"tokenizer": {**self.tokenizer.summary(), "unreadable_clips": sum(u["clips"] for u in unreadable),
                                "skipped_videos": len(skipped)},
                  "data_problems": {"unreadable": unreadable, "skipped": skipped}}
        if self.frame_prediction is not None:
            report["frame_prediction"] = self.frame_prediction.summary()
        return report

    def sample_rows(self) -> list[tuple[str, torch.Tensor]]:
        """Labelled rows of the sample strip: real | reconstructed | generated, for each kept clip."""
        rows: list[tuple[str, torch.Tensor]] = []
        generated = self.frame_prediction.samples if self.frame_prediction is not None else []
        for i, (real, recon) in enumerate(self.tokenizer.samples):
            rows += [(f"real {i}", real), (f"reconstructed {i}", recon)]
            if i < len(generated):
                rows.append((f"generated {i}", generated[i]))
        return rows


@torch.no_grad()
def evaluate_clips(clips: Iterable[torch.Tensor], results: ClipResults, num_cond_frames: int = 1,
                   keep_videos: bool = False) -> ClipResults:
    """Run ``results``' evaluations over batches of clips ``(B, 3, T, H, W)``; ``keep_videos``: keep the real and
    reconstructed clips (and the generated ones) for FVD. The masked tokens score frame prediction given
    ``num_cond_frames`` frames (its condition ``cond.<magvit.tasks.condition_name>``; an interior model's
    ``condition_regions`` must hold its region, :func:`clip_condition_regions`)."""
    tokenizer = results.tokenizer.tokenizer
    for video in clips:
        video = video.to(results.tokenizer.device)
        codes, recon = results.tokenizer.update(video)
        if keep_videos:
            results.real += list(video.cpu())
            results.reconstructed += list(recon.cpu())
        condition_codes = None  # the frame-prediction condition's codes: encoded once, for both evaluations
        if results.masked_tokens is not None or results.frame_prediction is not None:
            condition = build_condition_video(video, "frame_prediction", num_cond_frames=num_cond_frames)
            condition_codes = tokenizer.encode(condition)  # (B, t, h, w); two grids (top, bottom)
        if results.masked_tokens is not None:  # the codes and the frame-prediction condition of the same clips
            key = f"cond.{condition_name('frame_prediction', num_cond_frames)}"
            grids = {**code_grids.shard_entries("codes", codes),  # two grids: each also its top grid
                     **code_grids.shard_entries(key, condition_codes)}
            results.masked_tokens.update({**{k: v.cpu() for k, v in grids.items()},
                                          "label": torch.full((video.shape[0],), -1)})
        if results.frame_prediction is not None:
            results.frame_prediction.update(video, recon, keep_for_fvd=keep_videos, condition_codes=condition_codes,
                                            real_codes=codes)
    return results


def evaluate_token_shards(directory: Path, tokenizer, transformer, requested: Sequence[str], batch_size: int,
                          max_examples: int | None, seed: int = 0, progress: bool = False) -> MaskedTokenEvaluation:
    """Masked-token NLL over held-out token shards (checked to hold this model pair's codes), on the requested
    tasks whose condition codes the shards hold (an interior model: in the latent condition regions of the shards'
    clips, tokenizer and given-frame counts, from their ``meta.json``)."""
    meta = check_token_meta(directory, tokenizer, transformer)
    batches = token_batches_from_shards(directory, batch_size, max_examples)
    first = next(batches, None)
    if first is None:
        raise UsageError(f"--tokens: no token grid in {directory}")
    grid = tuple(first["codes"].shape[1:])
    if grid != tuple(transformer.config.token_grid):
        raise UsageError(f"--tokens: token grid {grid} does not match the transformer's "
                         f"{tuple(transformer.config.token_grid)}")
    interior = transformer.config.conditioning == "interior"
    regions = _shard_regions(directory, meta, transformer) if interior else None
    evaluation = MaskedTokenEvaluation(transformer, supported_tasks(requested, shard_tasks(first)), seed, regions)
    for batch in tqdm(itertools.chain([first], batches), desc="token grids", unit="batch", disable=not progress,
                      file=sys.stderr, dynamic_ncols=True):
        evaluation.update(batch)
    return evaluation


def clip_condition_regions(tokenizer, transformer, num_cond_frames: int = 1) -> dict[str, torch.Tensor]:
    """The latent condition regions (``conditions.latent_condition_regions``) of an interior transformer's tasks for the
    tokenizer's clips, frame prediction given ``num_cond_frames`` frames (two code grids: both, packed)."""
    tc, xc = tokenizer.config, transformer.config
    return latent_condition_regions(xc.tasks, xc.token_grid, (tc.num_frames, tc.image_size, tc.image_size), tc.causal,
                                    (num_cond_frames,), xc.top_grid)


def _shard_regions(directory: Path, meta: TokenShardMeta, transformer) -> dict[str, torch.Tensor]:
    """``TokenShardMeta.condition_regions`` of the shards; ``UsageError`` when their meta.json lacks the clip size."""
    try:
        return meta.condition_regions(transformer.config.tasks)
    except (KeyError, TypeError, ValueError) as err:
        raise UsageError(f"--tokens: {directory}/meta.json does not tell the clips' size and tokenizer an interior "
                         f"model's condition regions need ({type(err).__name__}: {err})") from None


def fvd_report(extractor, results: ClipResults | None, batch_size: int) -> dict[str, Any]:
    """The report's ``fvd`` section: FVD of the reconstructions (and of the frame predictions) against the real
    clips, or why it was skipped."""
    if extractor is None:
        return {"skipped": "no --i3d file given: FVD needs a local I3D TorchScript (i3d_torchscript.pt)"}
    real = results.real if results is not None else []
    if len(real) < 2:
        return {"skipped": f"FVD needs at least 2 clips, got {len(real)}"}
    report = {"num_clips": len(real), "reconstruction": compute_fvd(extractor, real, results.reconstructed,
                                                                    batch_size)}
    generated = results.frame_prediction.generated if results.frame_prediction is not None else []
    if len(generated) >= 2:
        report["frame_prediction"] = compute_fvd(extractor, real, generated, batch_size)
    return report
