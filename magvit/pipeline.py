"""Generation with a trained tokenizer + prior (the masked transformer, or the autoregressive one): the pair, checked
once, and every COMMIT task.

Example::

    import torch
    from magvit import VideoPipeline

    pipe = VideoPipeline.from_pretrained("runs/demo/tokenizer/export", "runs/demo/transformer/export")
    video, fps = pipe.load_video("first_frame.mp4")  # (3, T, S, S) in [-1, 1], fitted to the tokenizer
    videos = pipe("frame_prediction", condition=video, num_samples=4, steps=12,
                  generator=torch.Generator().manual_seed(0))  # (4, 3, T, S, S) in [-1, 1]

The condition (a float video of any size) is resized (short side) and centre-cropped to the tokenizer's resolution,
turned into the task's COMMIT condition video in pixel space (:func:`condition_video`) and tokenized (the codes fill
an interior model's condition region slots, a prefix model's prefix), and the video tokens are decoded in ``steps``
parallel steps (``magvit.sampling.iterative_decode``), then decoded to pixels. The sketch task takes a sketch video
(``magvit.sketch.sketch_video``); class and unconditional generation take no condition.

The prior is the export's (:data:`priors`, by its config.json's ``model_type``): the masked transformer decodes in
parallel steps (:func:`generate_codes`), the autoregressive transformer (VQGAN's prior) one code at a time with a
key/value cache and temperature / top-k / top-p (:func:`generate_codes_autoregressive`), from the same condition
sequence.
"""

from __future__ import annotations

import dataclasses
import os
import sys
import warnings
from pathlib import Path
from typing import Callable, Sequence

import torch

from . import code_grids, tasks
from .autoregressive import AutoregressiveTransformer
from .autoregressive_sampling import autoregressive_decode
from .data import crop_offsets, resize_short_side
from .pretrained import CONFIG_NAME, read_config_json, resolve_pretrained
from .sampling import iterative_decode
from .tokenizer import VideoTokenizer
from .transformer import MaskedVideoTransformer
from .video_io import VideoReadError, read_video, to_float
from .cli import UsageError
from .sequence import NO_LABEL, build_sequence, interior_condition_tokens
from .conditions import build_condition_video, two_grid_condition_region


# --- the model pair ------------------------------------------------------------------------------------------------


def check_pair(tokenizer_config, transformer_config) -> tuple[int, int, int]:
    """Raise ``UsageError`` unless the transformer was trained on this tokenizer's codes (same codebook, same token
    grid of the tokenizer's clips, the same top grid or none); returns the (bottom) grid ``(t, h, w)``."""
    tc, xc = tokenizer_config, transformer_config
    if tc.codebook_size != xc.codebook_size:
        raise UsageError(f"tokenizer and transformer do not belong together: codebook size {tc.codebook_size} vs "
                         f"{xc.codebook_size}")
    grid = tuple(tc.token_grid(tc.num_frames, tc.image_size, tc.image_size))
    if grid != tuple(xc.token_grid):
        raise UsageError(f"tokenizer and transformer do not belong together: token grid {grid} "
                         f"({tc.num_frames}x{tc.image_size}x{tc.image_size} clips) vs {tuple(xc.token_grid)}")
    top = tc.top_grid(tc.num_frames, tc.image_size, tc.image_size) if tc.hierarchy == 2 else None
    if top != xc.top_grid:  # two code grids (VQ-VAE-2): the prior must model both
        raise UsageError(f"tokenizer and transformer do not belong together: top code grid {top} vs "
                         f"{xc.top_grid} (None: one grid)")
    return grid  # type: ignore[return-value]


@dataclasses.dataclass(frozen=True)
class Prior:
    """One kind of prior over the tokenizer's codes: the class of its exports and its code sampler."""

    model_class: type  # a PretrainedMixin network; its model_type (in config.json) names the row
    # (prior, task, prefix codes (1 or N, t, h, w) | None, **kw) -> (N, t, h, w); two grids: packed (1 or N, N') ->
    # (top, bottom)
    generate_codes: Callable[..., torch.Tensor]
    options: tuple[str, ...]  # its sampling keywords besides class_id, num_samples, generator, seed, progress


def priors() -> dict[str, Prior]:
    """``model_type`` -> :class:`Prior`: the masked transformer (MAGVIT) and the autoregressive one (VQGAN)."""
    return {
        MaskedVideoTransformer.model_type: Prior(MaskedVideoTransformer, generate_codes, (
            "steps", "temperature", "choice_temperature", "top_k", "guidance_scale", "schedule")),
        AutoregressiveTransformer.model_type: Prior(AutoregressiveTransformer, generate_codes_autoregressive, (
            "temperature", "top_k", "top_p", "guidance_scale")),
    }


def prior_of(model) -> Prior:
    """The row of a loaded prior (by its class's ``model_type``)."""
    return priors()[model.model_type]


def _prior_class(directory: Path) -> type:
    """The class of the prior exported in ``directory`` (by config.json's ``model_type``); for any other folder
    the masked transformer's, whose ``from_pretrained`` then says what is wrong with it."""
    try:  # bounded like every read of an export's config (pretrained.MAX_CONFIG_BYTES)
        model_type = read_config_json(directory / CONFIG_NAME).get("model_type")
    except (OSError, ValueError):  # no config.json, too large, not JSON, not an object
        model_type = None
    rows = priors()
    return rows.get(model_type, rows[MaskedVideoTransformer.model_type]).model_class


def load_pretrained(kind: str, name_or_path: str | os.PathLike, device: str | torch.device = "cpu"):
    """``VideoTokenizer`` (``kind="tokenizer"``), ``MaskedVideoTransformer`` (``"transformer"``) or either prior
    (``"prior"``: the class its export's ``model_type`` names, :func:`priors`) from an export folder or a Hub id; any
    failure (missing folder, foreign or damaged export) is one ``UsageError``."""
    classes = {"tokenizer": VideoTokenizer, "transformer": MaskedVideoTransformer, "prior": None}
    if kind not in classes:
        raise ValueError(f"kind must be one of {', '.join(classes)}, got {kind!r}")
    try:
        directory = resolve_pretrained(name_or_path)
        return (classes[kind] or _prior_class(directory)).from_pretrained(directory, device=device)
    except Exception as err:  # missing folder, foreign or corrupt checkpoint: all user-facing
        what = "transformer" if kind == "prior" else kind  # a prior is what --transformer names
        raise UsageError(f"cannot load the {what} from {name_or_path}: {err}") from None


# --- conditions ----------------------------------------------------------------------------------------------------


def task_row(name: str) -> tasks.Task:
    """The row of task ``name`` in the task table (``UsageError`` naming the known tasks)."""
    try:
        return tasks.task(name)
    except ValueError as err:
        raise UsageError(str(err)) from None


def fit_video(video: torch.Tensor, image_size: int) -> torch.Tensor:
    """Float ``(3, T, H, W)`` -> ``(3, T, S, S)`` in [-1, 1]: short side resized to ``S``, centre crop (as the
    clip datasets do)."""
    size = (image_size, image_size)
    video = resize_short_side(video, size)
    top, left = crop_offsets(video.shape[-2], video.shape[-1], size, None)
    return video[..., top:top + image_size, left:left + image_size].clamp(-1, 1).contiguous()


def condition_video(task: str, video: torch.Tensor, num_frames: int, num_cond_frames: int = 1) -> torch.Tensor:
    """The prefix video ``(3, num_frames, S, S)`` of ``task`` (a row with a prefix) from a fitted video
    ``(3, T, S, S)``, by the frames its row knows.

    ``frames="first"`` (frame prediction) uses the first ``num_cond_frames`` frames, ``"ends"`` (interpolation)
    the first and the last of the first ``num_frames`` frames; ``"all"`` (outpainting, inpainting) and the sketch
    need a whole clip of ``num_frames`` frames.
    """
    row, available = task_row(task), video.shape[1]
    if row.frames == "first":
        if available < num_cond_frames:
            raise UsageError(f"{task} with {num_cond_frames} condition frame(s) needs at least "
                             f"{num_cond_frames} frame(s), the condition has {available}")
        clip = video[:, :num_cond_frames]
        clip = torch.cat([clip, clip[:, -1:].expand(-1, num_frames - num_cond_frames, -1, -1)], dim=1)
        return build_condition_video(clip, task, num_cond_frames=num_cond_frames)
    if row.frames == "ends":
        if available < 2:
            raise UsageError(f"{task} needs a first and a last frame, the condition has {available} frame")
        ends = video[:, [0, min(available, num_frames) - 1]]
        clip = ends[:, [0] * (num_frames - 1) + [1]]
        return build_condition_video(clip, task)
    if available < num_frames:
        what = "the sketch" if row.condition == "sketch" else task
        raise UsageError(f"{what} needs a clip of {num_frames} frames, the condition has {available}")
    if row.condition == "sketch":  # the sketch video is the prefix as it is
        return video[:, :num_frames]
    return build_condition_video(video[:, :num_frames], task)


def warn_untrained_cond_frames(prior, num_cond_frames: int) -> None:
    """One line on stderr when ``prior`` records the frame-prediction given-frame counts of its training shards
    (``TransformerConfig.cond_frames``) and ``num_cond_frames`` is not one of them: it was never trained on that
    condition."""
    trained = tuple(prior.config.cond_frames)  # empty: not recorded (sequence.PriorConfig)
    if trained and "frame_prediction" in prior.config.tasks and num_cond_frames not in trained:
        print(f"warning: the transformer was trained on frame prediction given {', '.join(map(str, trained))} "
              f"frame(s), not {num_cond_frames} (tokenize with --cond-frames {num_cond_frames} to train it)",
              file=sys.stderr)


# --- sampling ------------------------------------------------------------------------------------------------------


@torch.no_grad()
def generate_codes(
    transformer,
    task: str,
    condition_codes: torch.Tensor | None,
    *,
    class_id: int = NO_LABEL,
    num_samples: int = 1,
    steps: int = 12,
    temperature: float = 1.0,
    choice_temperature: float = 4.5,
    top_k: int | None = None,
    guidance_scale: float = 0.0,
    schedule: str = "cosine",
    generator: torch.Generator | None = None,
    seed: int | None = None,
    progress: bool = False,
    condition_region: torch.Tensor | None = None,
) -> torch.Tensor:
    """Sample ``num_samples`` code grids ``(N, t, h, w)`` for ``task`` given prefix codes ``(1, t, h, w)`` shared by
    the samples or ``(N, t, h, w)``, one per sample (a batch of clips, each decoded from its own condition,
    independently of the others), or ``None`` for class / unconditional, and a class id (``NO_LABEL``: unconditional
    class token). A model with interior conditioning takes them as the condition codes of ``condition_region``
    ``(t, h, w)`` bool (``conditions.latent_condition_region``), re-filled into its masked slots at every step.

    Two code grids (``config.top_grid``): ``condition_codes`` and ``condition_region`` are packed, top first
    (``magvit.code_grids``); the top grid is decoded first in ``steps`` steps, then the bottom grid given it in
    ``steps`` more; returns the ``(top (N, t, h', w'), bottom (N, t, h, w))`` pair.

    ``generator`` (a CPU ``torch.Generator``) or ``seed`` (shorthand for a fresh one seeded with it) makes the
    samples reproducible on every device.
    """
    if generator is not None and seed is not None:
        raise ValueError("give a generator or a seed, not both")
    config = transformer.config
    vocab, layout = config.vocab, config.layout
    tokens, uncond, prefix = condition_sequences(transformer, task, condition_codes, class_id, num_samples)
    condition = None
    if layout.interior and prefix is not None:
        if condition_region is None:
            raise UsageError(f"task '{task}': a model with interior conditioning needs the condition region")
        condition = interior_condition_tokens(vocab, layout, tokens, prefix, condition_region)
    if seed is not None:
        generator = torch.Generator().manual_seed(seed)
    for positions in code_grids.decoding_phases(layout):  # two grids: the top, then the bottom given the fixed top
        tokens = iterative_decode(transformer, tokens, mask_token=vocab.mask_token,
                                  codebook_size=config.codebook_size, steps=steps, temperature=temperature,
                                  choice_temperature=choice_temperature, top_k=top_k, schedule=schedule,
                                  guidance_scale=guidance_scale, uncond_tokens=uncond if guidance_scale else None,
                                  condition_tokens=condition, positions=positions, generator=generator,
                                  progress=progress)
        uncond = torch.where(positions.to(tokens.device), tokens, uncond)  # the unconditional branch shares them
    return code_grids.video_codes(tokens[:, layout.video], layout.token_grid, layout.top_grid)


def condition_sequences(prior, task: str, condition_codes: torch.Tensor | None, class_id: int,
                        num_samples: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """The ``(N, L)`` sequences of ``task`` with its condition codes ``(1 or N, t, h, w)`` (two grids: packed
    ``(1 or N, N_top + N)``, ``magvit.code_grids.pack_codes``; ``None``: all pad) in the prefix (an interior model
    has no prefix slots: the decoder shows them in the condition region) and the class token of ``class_id``, video
    positions masked; their dropped form for classifier-free guidance (pad prefix, unconditional class token); and
    the condition codes ``(N, t, h, w)`` (``None`` for a task without one). ``UsageError`` for a task or class id
    the prior does not know."""
    vocab, layout = prior.config.vocab, prior.config.layout
    device = next(prior.parameters()).device
    has_condition_codes = task_row(task).has_condition_codes
    if has_condition_codes and condition_codes is None:
        raise UsageError(f"task '{task}' needs a condition")
    prefix = condition_codes.to(device).expand(num_samples, *layout.video_shape) if has_condition_codes else None
    try:  # a task this model was not trained with, a class id out of its range
        task_token, class_token = vocab.task_token(task), vocab.class_token(class_id)
    except ValueError as err:
        raise UsageError(str(err)) from None
    task_tokens = torch.full((num_samples,), task_token, dtype=torch.long, device=device)
    class_tokens = torch.full((num_samples,), class_token, dtype=torch.long, device=device)
    tokens = build_sequence(vocab, layout, task_tokens, class_tokens, None if layout.interior else prefix, None)
    uncond = build_sequence(vocab, layout, task_tokens, torch.full_like(class_tokens, vocab.unconditional_token),
                            None, None)
    return tokens, uncond, prefix


@torch.no_grad()
def generate_codes_autoregressive(
    prior,
    task: str,
    condition_codes: torch.Tensor | None,
    *,
    class_id: int = NO_LABEL,
    num_samples: int = 1,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    guidance_scale: float = 0.0,
    generator: torch.Generator | None = None,
    seed: int | None = None,
    use_cache: bool = True,
    progress: bool = False,
) -> torch.Tensor:
    """:func:`generate_codes` for an autoregressive prior (``magvit.autoregressive.AutoregressiveTransformer``):
    the same condition sequence, then the video codes one at a time in raster order
    (``magvit.autoregressive_sampling.autoregressive_decode``, with a key/value cache unless ``use_cache=False``)
    with ``temperature``, ``top_k`` and ``top_p``. Returns ``(N, t, h, w)``; two code grids (``config.top_grid``):
    the ``(top, bottom)`` pair, the top grid's codes generated first (raster order of the packed video)."""
    if generator is not None and seed is not None:
        raise ValueError("give a generator or a seed, not both")
    layout = prior.config.layout
    tokens, uncond, _ = condition_sequences(prior, task, condition_codes, class_id, num_samples)
    if seed is not None:
        generator = torch.Generator().manual_seed(seed)
    out = autoregressive_decode(prior, tokens, start=layout.video.start, codebook_size=prior.config.codebook_size,
                                temperature=temperature, top_k=top_k, top_p=top_p, guidance_scale=guidance_scale,
                                uncond_tokens=uncond if guidance_scale else None, generator=generator,
                                use_cache=use_cache, progress=progress)
    return code_grids.video_codes(out[:, layout.video], layout.token_grid, layout.top_grid)


@torch.no_grad()
def generate(tokenizer, transformer, task: str, condition: torch.Tensor | None = None, *, num_cond_frames: int = 1,
             **kwargs) -> torch.Tensor:
    """Generate videos ``(N, 3, T, H, W)`` in [-1, 1].

    ``condition``: the pixel-space condition video ``(3, T, H, W)`` of a COMMIT task or the sketch video
    (:func:`condition_video`); ``None`` for class / unconditional; ``num_cond_frames``: the frames it gives (frame
    prediction), which fix an interior model's condition region. ``kwargs`` go to the prior's code sampler
    (:func:`generate_codes` for the masked transformer, :func:`generate_codes_autoregressive` for the
    autoregressive one).
    """
    device, layout = next(transformer.parameters()).device, transformer.config.layout
    condition_codes = None
    if condition is not None and task_row(task).has_condition_codes:
        # (1, t, h, w); two grids: (top, bottom) packed to (1, N_top + N)
        condition_codes = code_grids.pack_codes(tokenizer.encode(condition.unsqueeze(0).to(device)))
        if layout.interior and task_row(task).condition == "video":
            kwargs["condition_region"] = two_grid_condition_region(task, layout.token_grid, layout.top_grid,
                                                                   condition.shape[1:], tokenizer.config.causal,
                                                                   num_cond_frames)
    codes = prior_of(transformer).generate_codes(transformer, task, condition_codes, **kwargs)
    return tokenizer.decode(codes).clamp(-1, 1)


# --- the pipeline --------------------------------------------------------------------------------------------------


class VideoPipeline:
    """A ``VideoTokenizer`` and the prior trained on its codes (:attr:`prior`: a ``MaskedVideoTransformer`` or an
    ``AutoregressiveTransformer``, :func:`priors`), checked to belong together."""

    def __init__(self, tokenizer, prior):
        self.token_grid = check_pair(tokenizer.config, prior.config)  # (t, h, w)
        self.tokenizer, self.prior = tokenizer, prior

    @classmethod
    def from_pretrained(cls, tokenizer: str | os.PathLike, prior: str | os.PathLike,
                        device: str | torch.device = "cpu") -> VideoPipeline:
        """Both models from their export folders or Hub ids (``org/name``), in eval mode on ``device``; the
        ``prior`` export (what the commands' ``--transformer`` names) may be either kind (:func:`priors`)."""
        return cls(load_pretrained("tokenizer", tokenizer, device), load_pretrained("prior", prior, device))

    @property
    def transformer(self):
        """Deprecated alias of :attr:`prior` (kept for one release; read-only)."""
        warnings.warn("VideoPipeline.transformer is deprecated; use VideoPipeline.prior", DeprecationWarning,
                      stacklevel=2)
        return self.prior

    @property
    def device(self) -> torch.device:
        return next(self.prior.parameters()).device

    @property
    def prior_kind(self) -> Prior:
        """The prior's row of :func:`priors`: its code sampler and the sampling keywords it takes."""
        return prior_of(self.prior)

    @property
    def num_frames(self) -> int:
        return self.tokenizer.config.num_frames

    @property
    def image_size(self) -> int:
        return self.tokenizer.config.image_size

    @property
    def class_names(self) -> Sequence[str]:
        """The prior export's class names (class id = index); empty for exports without them."""
        return self.prior.class_names

    def load_video(self, path: str | os.PathLike) -> tuple[torch.Tensor, float]:
        """Read a video or an image (``UsageError`` if unreadable) and fit it to the tokenizer: ``((3, T, S, S),
        fps)`` with at most ``num_frames`` frames (fps 0 for an image)."""
        try:
            frames, fps = read_video(path, max_frames=self.num_frames)
        except VideoReadError as err:
            raise UsageError(str(err)) from None
        return fit_video(to_float(frames), self.image_size), float(fps)

    def prepare_condition(self, task: str, video: torch.Tensor | None, num_cond_frames: int = 1) -> torch.Tensor | None:
        """The pixel-space condition ``(3, T, S, S)`` of ``task`` from a float video ``(3, T', H, W)`` or
        ``(1, 3, T', H, W)`` of any size in [-1, 1]; ``None`` for the tasks without one (class, unconditional)."""
        if not task_row(task).has_condition_codes:
            if video is not None:
                raise UsageError(f"task '{task}' takes no condition video")
            return None
        if video is None:
            raise UsageError(f"task '{task}' needs a condition video")
        if video.dim() == 5 and video.shape[0] == 1:
            video = video[0]
        if video.dim() != 4 or video.shape[0] != 3 or not video.is_floating_point():
            raise UsageError(f"the condition must be a float video (3, T, H, W) in [-1, 1], got "
                             f"{video.dtype} {tuple(video.shape)}")
        return condition_video(task, fit_video(video, self.image_size), self.num_frames, num_cond_frames)

    @torch.no_grad()
    def __call__(self, task: str, condition: torch.Tensor | None = None, *, num_cond_frames: int = 1,
                 **sampling) -> torch.Tensor:
        """Generate videos ``(num_samples, 3, T, S, S)`` in [-1, 1] on the pipeline's device.

        ``task``: a task name of ``magvit.tasks.TASKS``; ``condition``: the user's video (:meth:`prepare_condition`) or,
        for ``"sketch"``, the sketch video; ``sampling``: ``num_samples``, ``class_id``, ``generator``, ``seed``,
        ``progress`` and the prior's own keywords (:attr:`prior_kind`: the masked transformer's ``steps``,
        ``temperature``, ``choice_temperature``, ``top_k``, ``guidance_scale``, ``schedule``; the autoregressive
        one's ``temperature``, ``top_k``, ``top_p``, ``guidance_scale``).
        """
        prepared = self.prepare_condition(task, condition, num_cond_frames)
        return generate(self.tokenizer, self.prior, task, prepared, num_cond_frames=num_cond_frames,
                        **sampling)
