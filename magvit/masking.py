"""The one mask schedule, the training masks and batches of the masked transformer, and the masked-token loss.

The schedule (:func:`mask_schedule`) is shared by training (:func:`make_training_batch`, used by
``magvit/launch/train_transformer.py`` and the evaluator) and decoding (``magvit/sampling.py``), so it is defined
exactly once. The vocabulary and the sequence layout are ``magvit.sequence``'s, the condition regions
``magvit.conditions``'. The per-batch path (:func:`make_training_batch`) never waits for the device: checks of
tensor values live in :func:`check_training_batch` and in the token-shard dataset.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Mapping, NamedTuple, Sequence

import torch

from . import code_grids
from . import tasks as _tasks
from .config import Config, ConfigError, require_finite
from .sequence import IGNORE_INDEX, NO_LABEL, SequenceLayout, TokenVocabulary, build_sequence, code_nll

#: How a masked prior over two code grids trains (``MaskingConfig.two_grid_masking``, :func:`make_training_batch`).
TWO_GRID_MASKINGS: tuple[str, ...] = ("joint", "stages")

_EXPONENTIAL_RATE = 5.0  # steepness of the "exponential" schedule


@dataclasses.dataclass
class MaskingConfig(Config):
    """The options of a masked prior's training masks (:func:`make_training_batch`, passed whole) and its loss
    (``label_smoothing``, :func:`masked_token_loss`): each default is here and nowhere else. An export records the
    masking it was trained with (:func:`recorded_masking`), so held-out scoring masks as training did."""

    tasks: list[str] | None = None  # None: every task of the model that the token shards support
    schedule: str = "cosine"
    cond_dropout_prob: float = 0.1  # classifier-free guidance: drop the condition / class, each independently
    uncond_prob: float = 0.0  # ... and drop both together (the unconditional branch of guidance), on top of that
    unmasked_weight: float = 1.0  # loss weight of the visible video tokens (masked ones weigh 1)
    # Examples with every video token (two grids' stages: of the stage) masked, their condition shown as always: the
    # state of decoding's first step, which the schedule's draw never gives exactly (a cosine draw masks all but a
    # few tokens, and those few tell where things are). 0: the draws of a run without it, unchanged.
    full_mask_prob: float = 0.0
    label_smoothing: float = 0.0
    # Two code grids (VQ-VAE-2): "joint" masks both grids with one mask; "stages" trains a top or a bottom stage per
    # example (two_stage_mask). Decoding is top first either way. "joint" measured 1.4-2.3% lower held-out NLL on the
    # two-stage maskings at 60-240 s (BENCHMARKS.md, "Priors over two code grids").
    two_grid_masking: str = "joint"

    def __post_init__(self):
        require_finite(self, ("cond_dropout_prob", "uncond_prob", "unmasked_weight", "label_smoothing",
                              "full_mask_prob"))
        if self.tasks is not None and not self.tasks:
            raise ValueError("tasks is an empty list, which trains nothing: name the tasks to train, or null "
                             "for every task of the model that the token shards carry")
        for name in self.tasks or []:
            try:
                _tasks.task(name)  # the table as it is now: a row added later is known
            except ValueError as err:
                raise ValueError(f"tasks: {err}") from None
        if self.schedule not in _GAMMAS:
            raise ValueError(f"schedule: {self.schedule!r} is not one of {list(SCHEDULES)}")
        if self.two_grid_masking not in TWO_GRID_MASKINGS:
            raise ValueError(f"masking.two_grid_masking must be one of {list(TWO_GRID_MASKINGS)}, got "
                             f"{self.two_grid_masking!r}")
        if not (0 <= self.cond_dropout_prob <= 1 and 0 <= self.uncond_prob <= 1) or self.unmasked_weight < 0 \
                or not 0 <= self.label_smoothing < 1 or not 0 <= self.full_mask_prob <= 1:
            raise ValueError("masking: need 0 <= cond_dropout_prob <= 1, 0 <= uncond_prob <= 1, unmasked_weight >= 0, "
                             "0 <= label_smoothing < 1 and 0 <= full_mask_prob <= 1")


def recorded_masking(prior: Any) -> MaskingConfig:
    """The masking a masked prior was trained with: its export's ``training_masking`` (config.json, written by the
    trainer). An export without it (written before the record) gets ``MaskingConfig()``, the trainer's defaults, so
    a two-grid export of a run that set ``masking.two_grid_masking: stages`` before then is scored ``joint``.
    ``ConfigError`` (one line) for a record that is not a valid masking."""
    record = getattr(prior, "training_masking", None)
    if record is None:
        return MaskingConfig()
    try:
        return MaskingConfig.from_dict(record)
    except ValueError as err:  # ConfigError, or a value __post_init__ refuses
        raise ConfigError(f"the prior's config.json: training_masking: {err}") from None


# --- the mask schedule ---------------------------------------------------------------------------------------------

#: gamma(r) of each schedule, unclamped (see :func:`mask_schedule`).
_GAMMAS = {
    "cosine": lambda r: torch.cos(math.pi / 2 * r),
    "linear": lambda r: 1 - r,
    "square": lambda r: 1 - r**2,
    "exponential": lambda r: (torch.exp(-_EXPONENTIAL_RATE * r) - math.exp(-_EXPONENTIAL_RATE))
    / (1 - math.exp(-_EXPONENTIAL_RATE)),
}
SCHEDULES: tuple[str, ...] = tuple(_GAMMAS)


def check_schedule(name: str) -> None:
    if name not in _GAMMAS:
        raise ValueError(f"unknown mask schedule '{name}'; expected one of {', '.join(SCHEDULES)}")


def _gamma(ratio: torch.Tensor, name: str) -> torch.Tensor:
    """:func:`mask_schedule` of a tensor already known to lie in [0, 1], with a known schedule: no checks."""
    return _GAMMAS[name](ratio).clamp(0.0, 1.0)


def mask_schedule(ratio: float | torch.Tensor, name: str = "cosine") -> float | torch.Tensor:
    """Fraction of tokens that are masked at progress ``ratio`` in [0, 1] (MaskGIT's gamma function).

    Monotone non-increasing with ``gamma(0) = 1`` (all masked) and ``gamma(1) = 0`` (all revealed). Training draws
    ``ratio ~ U(0, 1)`` and masks ``gamma(ratio)`` of the video tokens; decoding step ``s`` of ``K`` leaves
    ``gamma((s + 1) / K)`` of the initially unknown tokens masked.

    - ``cosine``: ``cos(pi/2 * r)`` (MaskGIT's default)
    - ``linear``: ``1 - r``
    - ``square``: ``1 - r**2``
    - ``exponential``: ``(exp(-k r) - exp(-k)) / (1 - exp(-k))`` with ``k = 5`` (reveals most tokens early)
    """
    check_schedule(name)
    is_tensor = isinstance(ratio, torch.Tensor)
    r = ratio if is_tensor else torch.tensor(float(ratio), dtype=torch.float64)
    if bool(((r < 0) | (r > 1)).any()):
        raise ValueError(f"mask_schedule expects a ratio in [0, 1], got {ratio}")
    out = _gamma(r, name)
    return out if is_tensor else float(out)


# --- training batches ----------------------------------------------------------------------------------------------


class TrainingBatch(NamedTuple):
    input_ids: torch.Tensor  # (B, L) long
    labels: torch.Tensor  # (B, L) long; codebook ids at video positions, IGNORE_INDEX elsewhere
    loss_mask: torch.Tensor  # (B, L) float weights; 0 outside the video positions


def random_mask(num_tokens: int, mask_ratio: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """Bool ``(B, N)`` masks with exactly ``clamp(floor(ratio * N), 1, N)`` True entries per row at random places.

    ``mask_ratio``: ``(B,)`` fractions in [0, 1]. At least one token is masked so every example trains.
    """
    batch = mask_ratio.shape[0]
    # The small epsilon keeps e.g. a float32 0.77 (= 0.76999998) from losing a token to rounding.
    counts = torch.floor(mask_ratio.double() * num_tokens + 1e-4).long().clamp(1, num_tokens)  # (B,)
    scores = torch.rand(batch, num_tokens, generator=generator)  # on the CPU, like the generator
    ranks = scores.argsort(dim=1).argsort(dim=1)  # (B, N): rank of each position in a random permutation
    return (ranks < counts.cpu()[:, None]).to(mask_ratio.device)


def _rand(shape: tuple[int, ...], generator: torch.Generator | None) -> torch.Tensor:
    return torch.rand(shape, generator=generator)  # CPU: a CPU generator gives the same draws on every device


def _on(device: torch.device, tensor: torch.Tensor) -> torch.Tensor:
    # Host-to-device without waiting for the device's queue (a blocking copy synchronises the stream).
    return tensor.to(device, non_blocking=True)


def _video_codes(batch: Mapping[str, torch.Tensor]) -> torch.Tensor:
    if "codes" not in batch:
        raise ValueError(f"batch needs 'codes' (B, t, h, w); got keys {sorted(batch)}")
    codes = batch["codes"].long()
    if codes.dim() != 4:
        raise ValueError(f"batch['codes'] must be (B, t, h, w), got {tuple(codes.shape)}")
    return codes


def _batch_labels(batch: Mapping[str, torch.Tensor], batch_size: int) -> torch.Tensor:
    labels = batch.get("label")
    if labels is None:
        return torch.full((batch_size,), NO_LABEL, dtype=torch.long)
    return torch.as_tensor(labels).long().reshape(batch_size)


def training_tasks(batch: Mapping[str, torch.Tensor], vocab: TokenVocabulary,
                   tasks: Sequence[str] | None = None) -> list[_tasks.Task]:
    """The task rows a batch trains on: ``tasks``, or every task of the model whose condition the batch carries
    (``cond.<task>``, frame prediction's of any given-frame count, ``sketch_codes``; class and unconditional need
    none). Host-side checks only."""
    carried = [name for name in vocab.tasks if _tasks.carries(batch, _tasks.task(name))]
    names = carried if tasks is None else list(tasks)
    rows = []
    for name in names:
        if name not in vocab.tasks:
            raise ValueError(f"unknown task '{name}'; expected one of {', '.join(vocab.tasks)}")
        row = _tasks.task(name)
        if not _tasks.carries(batch, row):
            raise ValueError(f"task '{name}' needs '{row.shard_key}' in the batch; got keys {sorted(batch)}")
        rows.append(row)
    if not rows:
        raise ValueError("tasks must name at least one task")
    return rows


def check_training_batch(batch: Mapping[str, torch.Tensor], vocab: TokenVocabulary,
                         tasks: Sequence[str] | None = None) -> None:
    """The value checks :func:`make_training_batch` leaves out (each reads tensors, a host sync on a device), for a
    batch that did not come through ``TokenShardDataset`` (which checks its codes when it opens): codes in
    ``[0, codebook_size)``, labels in ``[-1, num_classes)``, a task for every example."""
    codes = _video_codes(batch)
    for key in ("codes", "sketch_codes", *(k for k in batch if k.startswith(("cond.", code_grids.TOP)))):
        if key in batch and bool(((batch[key] < 0) | (batch[key] >= vocab.codebook_size)).any()):
            raise ValueError(f"batch['{key}']: codes must be in [0, {vocab.codebook_size})")
    labels = _batch_labels(batch, codes.shape[0])
    if bool(((labels < NO_LABEL) | (labels >= vocab.num_classes)).any()):
        raise ValueError(f"class ids must be in [-1, {vocab.num_classes}), got {labels.tolist()}")
    if all(row.needs_label for row in training_tasks(batch, vocab, tasks)) and bool((labels < 0).any()):
        raise ValueError("some examples have no label and 'class' is the only task allowed")


class _Draws(NamedTuple):
    """Every random number of a training batch, on the CPU."""

    task_scores: torch.Tensor  # (B, num_tasks) U(0, 1): the task is the allowed one of highest score
    drop_prefix: torch.Tensor  # (B,) bool: classifier-free guidance drops the condition tokens
    drop_class: torch.Tensor  # (B,) bool: ... and, independently, the class (both: also the joint drop)
    masked: torch.Tensor  # (B, N) bool: the masked video tokens
    scored: torch.Tensor | None  # (B, N) bool: the video tokens the loss covers (None: all; two grids' stages)
    count_scores: torch.Tensor | None  # (B,) U(0, 1): the given-frame count of frame prediction (None: one carried)


def _draw(batch_size: int, num_tasks: int, num_tokens: int, masking: MaskingConfig, mask_ratio: float | None,
          generator: torch.Generator | None, top_tokens: int = 0, draw_counts: bool = False) -> _Draws:
    # The order of the draws is part of the training RNG's stream (exact resume replays it): keep it. The joint drop
    # and the given-frame count draw last and only when asked, so a run without them draws what it always drew.
    task_scores = _rand((batch_size, num_tasks), generator)
    drop_prefix = _rand((batch_size,), generator) < masking.cond_dropout_prob
    drop_class = _rand((batch_size,), generator) < masking.cond_dropout_prob
    if mask_ratio is None:
        ratio = _gamma(_rand((batch_size,), generator), masking.schedule)  # U(0, 1) through the schedule
    else:
        ratio = torch.full((batch_size,), float(mask_ratio), dtype=torch.float64)
    if top_tokens:  # two code grids: a top or a bottom stage per example
        masked, scored = two_stage_mask(top_tokens, num_tokens - top_tokens, ratio, generator)
    else:
        masked, scored = random_mask(num_tokens, ratio, generator), None
    if masking.uncond_prob > 0:
        both = _rand((batch_size,), generator) < masking.uncond_prob
        drop_prefix, drop_class = drop_prefix | both, drop_class | both
    count_scores = _rand((batch_size,), generator) if draw_counts else None
    if masking.full_mask_prob > 0 and mask_ratio is None:  # a fixed ratio (held-out scoring) stays what it says
        full = (_rand((batch_size,), generator) < masking.full_mask_prob)[:, None]  # (B, 1)
        masked = masked | (full if scored is None else full & scored)  # two grids' stages: the stage's tokens
    return _Draws(task_scores, drop_prefix, drop_class, masked, scored, count_scores)


def two_stage_mask(top_tokens: int, bottom_tokens: int, ratio: torch.Tensor,
                   generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """VQ-VAE-2's two priors as two training stages of one masked prior over packed two-grid videos
    ``[top][bottom]`` (``magvit.code_grids``): ``(masked, scored)``, each bool ``(B, N_top + N_bottom)``.

    Each example is in the top stage or the bottom stage with probability 1/2. Top stage: ``ratio`` ``(B,)`` of the
    top tokens masked (:func:`random_mask`), the whole bottom masked and not scored (decoding's first phase sees
    the same). Bottom stage: the whole top given and not scored (a condition, as decoding's second phase has it),
    ``ratio`` of the bottom tokens masked."""
    batch = ratio.shape[0]
    top_stage = (_rand((batch,), generator) < 0.5)[:, None]  # (B, 1)
    top_mask, bottom_mask = random_mask(top_tokens, ratio, generator), random_mask(bottom_tokens, ratio, generator)
    ones = lambda n: torch.ones(batch, n, dtype=torch.bool)
    masked = torch.cat([top_mask & top_stage, torch.where(top_stage, ones(bottom_tokens), bottom_mask)], dim=1)
    scored = torch.cat([top_stage.expand(-1, top_tokens), ~top_stage.expand(-1, bottom_tokens)], dim=1)
    return masked.to(ratio.device), scored.to(ratio.device)


def _choose_tasks(scores: torch.Tensor, rows: Sequence[_tasks.Task], labels: torch.Tensor) -> torch.Tensor:
    """``(B,)`` index into ``rows``, uniform among the tasks each example can train on (a class-only task needs a
    label), on the labels' device. An example with none (unlabelled, only ``class`` asked) gets row 0."""
    needs_label = _on(labels.device, torch.tensor([row.needs_label for row in rows]))  # (num_tasks,)
    scores = _on(labels.device, scores).masked_fill(needs_label & (labels < 0)[:, None], -1.0)
    return scores.argmax(dim=1)


class _Variant(NamedTuple):
    """One condition a training batch can give: a task row and, for frame prediction, one given-frame count."""

    row: _tasks.Task
    name: str  # the condition's name (magvit.tasks.condition_name): the key of its region
    shard_key: str | None  # the batch key of its codes (None: the task has none)


def _variants(batch: Mapping[str, torch.Tensor], rows: Sequence[_tasks.Task]) -> tuple[list[_Variant], torch.Tensor]:
    """Every row's conditions (frame prediction: one per given-frame count the batch carries, in increasing order;
    every other row: one) and ``(num_tasks,)`` long: how many each row has."""
    variants, sizes = [], []
    for row in rows:
        counts = _tasks.carried_cond_frames(batch, row.name) if row.frames == "first" else (1,)
        names = [_tasks.condition_name(row.name, n) for n in counts]
        variants += [_Variant(row, name, f"cond.{name}" if row.condition == "video" else row.shard_key)
                     for name in names]
        sizes.append(len(names))
    return variants, torch.tensor(sizes)


def _choose_variants(task_index: torch.Tensor, sizes: torch.Tensor, scores: torch.Tensor | None) -> torch.Tensor:
    """``(B,)`` index into the variants: the first of each example's task, plus, where the task has several, the
    one ``scores`` ``(B,)`` U(0, 1) picks uniformly (``None``: every task has one)."""
    sizes = _on(task_index.device, sizes)
    first = (sizes.cumsum(0) - sizes)[task_index]
    if scores is None:
        return first
    count = sizes[task_index]
    return first + (_on(task_index.device, scores) * count).long().clamp_max(count - 1)


def _condition_prefix(batch: Mapping[str, torch.Tensor], variants: Sequence[_Variant], variant_index: torch.Tensor,
                      drop: torch.Tensor, vocab: TokenVocabulary, num_tokens: int) -> torch.Tensor:
    """``(B, N)``: the condition codes of each example's variant; pad for a task without one or a dropped one."""
    b, device = variant_index.shape[0], variant_index.device
    prefix = torch.full((b, num_tokens), vocab.pad_token, dtype=torch.long, device=device)
    for i, variant in enumerate(variants):
        if variant.shard_key is not None:
            condition = _on(device, batch[variant.shard_key]).long().reshape(b, num_tokens)
            prefix = torch.where((variant_index == i)[:, None], condition, prefix)
    return prefix.masked_fill(_on(device, drop)[:, None], vocab.pad_token)


def _class_slot(labels: torch.Tensor, rows: Sequence[_tasks.Task], task_index: torch.Tensor, drop: torch.Tensor,
                vocab: TokenVocabulary) -> torch.Tensor:
    """``(B,)`` class tokens: the label, unconditional where the task ignores it, it was dropped or there is none."""
    uses_label = _on(labels.device, torch.tensor([row.uses_label for row in rows]))[task_index]  # (B,)
    keep = uses_label & ~_on(labels.device, drop)
    return vocab.class_tokens(torch.where(keep, labels, torch.full_like(labels, NO_LABEL)))


def _region_table(variants: Sequence[_Variant], regions: Mapping[str, torch.Tensor] | None,
                  layout: SequenceLayout) -> torch.Tensor:
    """``(num_variants, N)`` bool on the CPU: the latent condition region of each variant (none for a task without
    a pixel condition). Host-side checks only: an interior model has no sketch task, every pixel condition needs
    its region."""
    table = torch.zeros(len(variants), layout.num_video_tokens, dtype=torch.bool)
    for i, (row, name, _) in enumerate(variants):
        if row.condition == "sketch":
            raise ValueError(f"task '{row.name}': interior conditioning has no sketch condition (no region)")
        if row.condition == "video":
            region = (regions or {}).get(name)
            if region is None or tuple(region.shape) != layout.video_shape:
                raise ValueError(f"interior conditioning needs condition_regions['{name}'] of shape "
                                 f"{layout.video_shape}, got {None if region is None else tuple(region.shape)}")
            table[i] = region.reshape(-1).cpu()
    return table


def _assemble(vocab: TokenVocabulary, layout: SequenceLayout, codes: torch.Tensor, task_tokens: torch.Tensor,
              class_tokens: torch.Tensor, condition: torch.Tensor, region: torch.Tensor | None,
              masked: torch.Tensor, unmasked_weight: float, scored: torch.Tensor | None = None) -> TrainingBatch:
    """The sequence, its targets (every video position) and loss weights (masked 1, visible ``unmasked_weight``;
    0 outside ``scored`` ``(B, N)`` when given).

    ``condition`` ``(B, N)``: the prefix, or (interior, ``region`` ``(B, N)`` bool given) the tokens that the masked
    slots inside the region show instead of the mask token."""
    b = codes.shape[0]
    video = codes.reshape(b, layout.num_video_tokens)  # (B, N) the targets
    video_in = torch.where(masked, torch.full_like(video, vocab.mask_token), video)
    if region is not None:
        video_in = torch.where(masked & region, condition, video_in)
    prefix = None if layout.interior else condition.reshape(codes.shape)
    input_ids = build_sequence(vocab, layout, task_tokens, class_tokens, prefix, video_in.reshape(codes.shape))
    labels = torch.full_like(input_ids, IGNORE_INDEX)
    labels[:, layout.video] = video
    loss_mask = torch.zeros(b, layout.length, dtype=torch.float32, device=codes.device)
    weights = torch.where(masked, 1.0, float(unmasked_weight))  # (B, N)
    loss_mask[:, layout.video] = weights if scored is None else weights * scored
    return TrainingBatch(input_ids, labels, loss_mask)


def make_training_batch(
    batch: Mapping[str, torch.Tensor],
    vocab: TokenVocabulary,
    masking: MaskingConfig,
    *,
    generator: torch.Generator | None = None,
    mask_ratio: float | None = None,
    conditioning: str = "prefix",
    condition_regions: Mapping[str, torch.Tensor] | None = None,
) -> TrainingBatch:
    """Turn token-shard items into a masked-token training batch.

    ``batch``: collated items ``{"codes": (B, t, h, w), "cond.<task>": (B, t, h, w)..., "sketch_codes": (B, t, h, w)
    (optional), "label": (B,)}``. For every example a task is drawn uniformly among ``tasks`` (default: every task
    of the model the batch supports, :func:`training_tasks`; ``class`` for labelled examples only). The task's
    condition tokens go into the prefix and the label (if any) into the class slot. ``masking`` (the run's
    :class:`MaskingConfig`, validated when it was made) holds every option; the arguments after it are per call:
    the generator, a fixed ratio, and the model's conditioning and the clips' regions. For classifier-free guidance
    the condition and the class are each dropped (replaced by the pad / unconditional token) with probability
    ``masking.cond_dropout_prob``, and both together with probability ``masking.uncond_prob`` on top (so the
    unconditional branch trains ``uncond_prob + (1 - uncond_prob) * cond_dropout_prob**2`` of the time).

    ``conditioning="interior"`` (MAGVIT's COMMIT; sequence ``2 + N``): no prefix; a masked video slot inside the
    task's latent condition region (``condition_regions[task]`` ``(t, h, w)`` bool, e.g. from
    ``magvit.conditions.latent_condition_regions``) holds the condition token instead of the mask token (a dropped
    condition: the mask token). No sketch task.

    Frame prediction given several frame counts (the batch carries ``cond.frame_prediction`` for one given frame and
    ``cond.frame_prediction.<n>`` for ``n``, ``magvit.tasks.condition_name``): each frame-prediction example takes
    one of the carried counts, uniformly, its codes and (interior) its region ``condition_regions["frame_prediction"
    ".<n>"]``. That draw comes last from ``generator``, and only when a task has several, so a batch of one count
    draws what it always drew.

    Two code grids (VQ-VAE-2; the batch also holds ``top.codes``, ``top.cond.<condition>``... ``(B, t, h', w')``,
    ``magvit.code_grids``): every grid is packed top first, the region of ``condition_regions[<condition>]`` is the
    packed ``(N_top + N,)`` one (``conditions.two_grid_condition_region``). With
    ``masking.two_grid_masking="stages"`` (the states two-phase decoding visits) each example trains the top or the
    bottom stage (:func:`two_stage_mask`; its draws replace the one-grid mask's, so one-grid batches draw as before);
    with ``"joint"`` (the default) one mask covers the packed sequence like one grid.

    The video tokens are masked with ratio ``mask_schedule(r, masking.schedule)``, ``r ~ U(0, 1)`` per example (or
    the fixed ``mask_ratio``); without a fixed ratio, ``masking.full_mask_prob`` of the examples have every video token
    masked (drawn last, only when it is above 0). As in MAGVIT the loss covers all video positions: masked ones with
    weight 1, unmasked ones with ``masking.unmasked_weight``.

    All randomness comes from ``generator`` (CPU); the outputs live on the device of ``batch["codes"]``, and nothing
    waits for that device: the tensors' values are not checked here (:func:`check_training_batch` does).
    """
    grid = tuple(_video_codes(batch).shape[1:])  # (t, h, w): the bottom grid when there are two
    batch, top_grid = code_grids.pack_batch(batch)  # two grids: each of them (B, N_top + N), top first
    codes = batch["codes"].long()  # (B, t, h, w), or packed (B, N_top + N)
    rows = training_tasks(batch, vocab, masking.tasks)
    if mask_ratio is not None and not 0.0 <= mask_ratio <= 1.0:  # the options' checks are MaskingConfig's own
        raise ValueError(f"mask_ratio must be in [0, 1], got {mask_ratio}")
    b, device = codes.shape[0], codes.device
    layout = SequenceLayout(grid, conditioning, top_grid)  # type: ignore[arg-type]
    variants, sizes = _variants(batch, rows)
    table = _region_table(variants, condition_regions, layout) if layout.interior else None  # (num_variants, N)
    draws = _draw(b, len(rows), layout.num_video_tokens, masking, mask_ratio, generator,
                  layout.num_top_tokens if masking.two_grid_masking == "stages" else 0,
                  draw_counts=bool((sizes > 1).any()))

    labels = _on(device, _batch_labels(batch, b))  # (B,)
    task_index = _choose_tasks(draws.task_scores, rows, labels)  # (B,)
    variant_index = _choose_variants(task_index, sizes, draws.count_scores)  # (B,)
    task_tokens = _on(device, torch.tensor([vocab.task_token(row.name) for row in rows]))[task_index]
    condition = _condition_prefix(batch, variants, variant_index, draws.drop_prefix, vocab, layout.num_video_tokens)
    class_tokens = _class_slot(labels, rows, task_index, draws.drop_class, vocab)
    region = None if table is None else _on(device, table)[variant_index] & ~_on(device, draws.drop_prefix)[:, None]
    scored = None if draws.scored is None else _on(device, draws.scored)
    return _assemble(vocab, layout, codes, task_tokens, class_tokens, condition, region, _on(device, draws.masked),
                     masking.unmasked_weight, scored)


def masked_token_loss(logits: torch.Tensor, labels: torch.Tensor, loss_mask: torch.Tensor, codebook_size: int,
                      label_smoothing: float) -> torch.Tensor:
    """Weighted mean cross-entropy over the video positions, with logits restricted to the codebook.

    ``logits``: ``(B, L, V)``, or ``(B, L, F, S)`` from a factorised model (then the per-position loss is the sum of
    the sub-token cross-entropies, :func:`code_nll`); ``labels``: ``(B, L)`` (``IGNORE_INDEX`` where there is no
    target); ``loss_mask``: ``(B, L)`` weights (from :func:`make_training_batch`).
    """
    if logits.shape[:2] != labels.shape or labels.shape != loss_mask.shape:
        raise ValueError(f"shapes differ: logits {tuple(logits.shape)}, labels {tuple(labels.shape)}, "
                         f"loss_mask {tuple(loss_mask.shape)}")
    valid = labels != IGNORE_INDEX  # (B, L): the video positions
    # (M,): special tokens are never targets, so only the code logits count
    ce = code_nll(logits[valid], labels[valid], codebook_size, label_smoothing)
    weights = loss_mask[valid].float()
    return (ce * weights).sum() / weights.sum().clamp_min(1e-8)
