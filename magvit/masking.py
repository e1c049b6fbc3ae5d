"""The one mask schedule, the token vocabulary and sequence layout, COMMIT condition construction, training masks
and the masked-token loss.

Everything here is shared by training (``launch/train_transformer.py``) and sampling (``magvit/sampling.py``), so
the schedule, the special tokens and the sequence layout are defined exactly once.

Sequence layout (length ``2 + 2 * t*h*w``)::

    [task token][class or unconditional token][prefix: t*h*w condition tokens][video: t*h*w tokens]

The prefix holds the tokens of the pixel-space condition video (COMMIT tasks) or of a sketch video; tasks without
a pixel condition (class, unconditional) and dropped conditions fill it with the no-condition pad token.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Mapping, NamedTuple, Sequence

import torch
import torch.nn.functional as F

from . import tasks as _tasks
from .config import Config, require_finite

@dataclasses.dataclass
class MaskingConfig(Config):
    """Options of ``masking.make_training_batch`` and ``masking.masked_token_loss``."""

    tasks: list[str] | None = None  # None: every task the token shards support
    schedule: str = "cosine"
    cond_dropout_prob: float = 0.1  # classifier-free guidance: drop the condition / class
    unmasked_weight: float = 1.0  # loss weight of the visible video tokens (masked ones weigh 1)
    label_smoothing: float = 0.0

    def __post_init__(self):
        require_finite(self, ("cond_dropout_prob", "unmasked_weight", "label_smoothing"))
        if not 0 <= self.cond_dropout_prob <= 1 or self.unmasked_weight < 0 or not 0 <= self.label_smoothing < 1:
            raise ValueError("masking: need 0 <= cond_dropout_prob <= 1, unmasked_weight >= 0 and "
                             "0 <= label_smoothing < 1")


# --- tasks: the table is magvit/tasks.py; names kept here for the modules that import them -----------------------

#: Names of the COMMIT tasks whose condition is a pixel-space video (``build_condition_video``), in table order;
#: ``data_prep.tokenize`` writes one ``cond.<task>`` token grid per clip for each of these.
CONDITION_TASKS: tuple[str, ...] = _tasks.CONDITION_TASKS
#: Names of every task of the table (the rows: ``magvit.tasks.TASKS``).
TASKS: tuple[str, ...] = _tasks.TASK_NAMES

SCHEDULES: tuple[str, ...] = ("cosine", "linear", "square", "exponential")

#: Label value meaning "no class" (as in ``ClipDataset`` / token shards).
NO_LABEL = -1
#: ``labels`` value at positions that carry no target (cross_entropy's ``ignore_index``).
IGNORE_INDEX = -100

_EXPONENTIAL_RATE = 5.0  # steepness of the "exponential" schedule


# --- the mask schedule ---------------------------------------------------------------------------------------------


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
    if name not in SCHEDULES:
        raise ValueError(f"unknown mask schedule '{name}'; expected one of {', '.join(SCHEDULES)}")
    is_tensor = isinstance(ratio, torch.Tensor)
    r = ratio if is_tensor else torch.tensor(float(ratio), dtype=torch.float64)
    if bool(((r < 0) | (r > 1)).any()):
        raise ValueError(f"mask_schedule expects a ratio in [0, 1], got {ratio}")
    if name == "cosine":
        out = torch.cos(math.pi / 2 * r)
    elif name == "linear":
        out = 1 - r
    elif name == "square":
        out = 1 - r**2
    else:
        k = _EXPONENTIAL_RATE
        out = (torch.exp(-k * r) - math.exp(-k)) / (1 - math.exp(-k))
    out = out.clamp(0.0, 1.0)
    return out if is_tensor else float(out)


# --- vocabulary and sequence layout --------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class TokenVocabulary:
    """Named special tokens placed after the codebook: ``[codes][mask][pad][uncond][tasks...][classes...]``."""

    codebook_size: int
    num_classes: int = 0
    tasks: tuple[str, ...] = TASKS

    def __post_init__(self) -> None:
        if self.codebook_size < 2:
            raise ValueError(f"codebook_size must be >= 2, got {self.codebook_size}")
        if self.num_classes < 0:
            raise ValueError(f"num_classes must be >= 0, got {self.num_classes}")

    @property
    def mask_token(self) -> int:
        """Stands for a video token still to be generated."""
        return self.codebook_size

    @property
    def pad_token(self) -> int:
        """Fills the condition prefix when there is no (or a dropped) pixel/sketch condition."""
        return self.codebook_size + 1

    @property
    def unconditional_token(self) -> int:
        """Takes the class slot when there is no (or a dropped) class label."""
        return self.codebook_size + 2

    def task_token(self, task: str) -> int:
        if task not in self.tasks:
            raise ValueError(f"unknown task '{task}'; expected one of {', '.join(self.tasks)}")
        return self.codebook_size + 3 + self.tasks.index(task)

    def class_token(self, label: int) -> int:
        """The class token of ``label``, or the unconditional token for ``NO_LABEL``."""
        if label == NO_LABEL:
            return self.unconditional_token
        if not 0 <= label < self.num_classes:
            raise ValueError(f"class id {label} out of range: the model knows {self.num_classes} classes")
        return self.codebook_size + 3 + len(self.tasks) + label

    def class_tokens(self, labels: torch.Tensor) -> torch.Tensor:
        """Vectorised :meth:`class_token` for a (B,) long tensor of labels (``NO_LABEL`` -> unconditional)."""
        if bool(((labels < NO_LABEL) | (labels >= self.num_classes)).any()):
            raise ValueError(f"class ids must be in [-1, {self.num_classes}), got {labels.tolist()}")
        first = self.codebook_size + 3 + len(self.tasks)
        return torch.where(labels >= 0, first + labels, torch.full_like(labels, self.unconditional_token))

    @property
    def size(self) -> int:
        """Total vocabulary size (embedding rows)."""
        return self.codebook_size + 3 + len(self.tasks) + self.num_classes


@dataclasses.dataclass(frozen=True)
class CodeFactorization:
    """A code as ``num_factors`` sub-tokens of equal bit width (MAGVIT-v2's token factorization).

    Code ``c`` is the base-``S`` number of its sub-tokens, most significant first:
    ``c = sum_i sub_i * S**(F - 1 - i)`` with ``S = sub_vocab_size``; for ``2^18`` codes and ``F = 2`` that is
    ``(c >> 9, c & 511)``. The transformer then embeds and predicts ``F`` tokens of ``S`` values each instead of one
    of ``codebook_size`` values. ``num_factors = 1`` is the identity (any codebook size).
    """

    codebook_size: int
    num_factors: int = 1

    def __post_init__(self) -> None:
        k, f = self.codebook_size, self.num_factors
        if f < 1:
            raise ValueError(f"token_factorization must be >= 1, got {f}")
        bits = k.bit_length() - 1
        if f > 1 and (k < 2 or k != 1 << bits or bits % f):
            raise ValueError(f"codebook_size {k} cannot be split into {f} sub-tokens: token factorization needs a "
                             f"power-of-two codebook whose bit count divides by {f} "
                             "(e.g. 2^18 codes = 2 sub-tokens of 2^9)")

    @property
    def sub_vocab_size(self) -> int:
        """Values per sub-token ``S`` (``S ** num_factors == codebook_size``)."""
        if self.num_factors == 1:
            return self.codebook_size
        return 1 << ((self.codebook_size.bit_length() - 1) // self.num_factors)

    def _radix(self, device: torch.device) -> torch.Tensor:
        # (F,): S**(F-1), ..., S, 1; built on the device, so no host-to-device copy per call
        return self.sub_vocab_size ** torch.arange(self.num_factors - 1, -1, -1, device=device)

    def split(self, codes: torch.Tensor) -> torch.Tensor:
        """Sub-tokens ``(..., F)`` of codes ``(...)`` in ``[0, codebook_size)``."""
        return torch.div(codes.long()[..., None], self._radix(codes.device), rounding_mode="floor") \
            % self.sub_vocab_size

    def merge(self, sub_tokens: torch.Tensor) -> torch.Tensor:
        """Codes ``(...)`` of sub-tokens ``(..., F)``: the inverse of :meth:`split`."""
        return (sub_tokens.long() * self._radix(sub_tokens.device)).sum(dim=-1)


@dataclasses.dataclass(frozen=True)
class SequenceLayout:
    """Positions of the parts of a sequence for a token grid ``(t, h, w)``."""

    token_grid: tuple[int, int, int]

    @property
    def num_video_tokens(self) -> int:
        t, h, w = self.token_grid
        return t * h * w

    @property
    def task_position(self) -> int:
        return 0

    @property
    def class_position(self) -> int:
        return 1

    @property
    def prefix(self) -> slice:
        return slice(2, 2 + self.num_video_tokens)

    @property
    def video(self) -> slice:
        n = self.num_video_tokens
        return slice(2 + n, 2 + 2 * n)

    @property
    def length(self) -> int:
        return 2 + 2 * self.num_video_tokens


def build_sequence(
    vocab: TokenVocabulary,
    layout: SequenceLayout,
    task_tokens: torch.Tensor,
    class_tokens: torch.Tensor,
    prefix: torch.Tensor | None,
    video: torch.Tensor | None,
) -> torch.Tensor:
    """Assemble ``(B, L)`` input ids from per-example task / class tokens (B,), prefix tokens ``(B, t, h, w)``
    (``None``: all pad) and video tokens ``(B, t, h, w)`` (``None``: all mask)."""
    batch = task_tokens.shape[0]
    n = layout.num_video_tokens
    for name, grid in (("prefix", prefix), ("video", video)):
        if grid is not None and (grid.dim() != 4 or tuple(grid.shape[1:]) != tuple(layout.token_grid)):
            raise ValueError(f"{name} tokens must be (B, {', '.join(map(str, layout.token_grid))}), "
                             f"got {tuple(grid.shape)}")
    device = task_tokens.device
    ids = torch.empty(batch, layout.length, dtype=torch.long, device=device)
    ids[:, layout.task_position] = task_tokens
    ids[:, layout.class_position] = class_tokens
    ids[:, layout.prefix] = vocab.pad_token if prefix is None else prefix.reshape(batch, n)
    ids[:, layout.video] = vocab.mask_token if video is None else video.reshape(batch, n)
    return ids


# --- COMMIT condition construction in pixel space ------------------------------------------------------------------


def condition_region(task: str, num_frames: int, height: int, width: int, num_cond_frames: int = 1) -> torch.Tensor:
    """Bool ``(T, H, W)``: True where the condition video shows real pixels for ``task``."""
    if task not in CONDITION_TASKS:
        raise ValueError(f"'{task}' is not a pixel-space condition task; expected one of {', '.join(CONDITION_TASKS)}")
    known = torch.zeros(num_frames, height, width, dtype=torch.bool)
    # Central band: the middle half of each axis (MAGVIT's OPC/OPV/OPH/IPC regions).
    h0, h1 = height // 4, height - height // 4
    w0, w1 = width // 4, width - width // 4
    if task == "frame_prediction":
        if not 1 <= num_cond_frames < num_frames:
            raise ValueError(f"frame_prediction needs 1 <= num_cond_frames < {num_frames}, got {num_cond_frames}")
        known[:num_cond_frames] = True
    elif task == "interpolation":
        if num_frames < 3:
            raise ValueError(f"interpolation needs at least 3 frames, got {num_frames}")
        known[0] = True
        known[-1] = True
    elif task == "outpaint_central":
        known[:, h0:h1, w0:w1] = True
    elif task == "outpaint_vertical":
        known[:, :, w0:w1] = True
    elif task == "outpaint_horizontal":
        known[:, h0:h1, :] = True
    elif task == "inpaint_central":
        known[:] = True
        known[:, h0:h1, w0:w1] = False
    return known


def build_condition_video(video: torch.Tensor, task: str, num_cond_frames: int = 1,
                          fill_value: float = 0.0) -> torch.Tensor:
    """The COMMIT condition video of ``task`` built in pixel space, ready to be tokenized.

    ``video``: ``(3, T, H, W)`` or ``(B, 3, T, H, W)`` in [-1, 1]; the result has the same shape.
    Temporal tasks fill unknown frames by replicating the nearest known frame (frame prediction: the last given
    frame; interpolation: the first frame for the first half, the last for the second half) so the tokenizer sees
    a natural video; spatial tasks fill unknown pixels with ``fill_value`` (0 = mid grey).
    """
    if not isinstance(video, torch.Tensor) or video.dim() not in (4, 5) or video.shape[-4] != 3:
        raise ValueError(f"video must be a (3, T, H, W) or (B, 3, T, H, W) tensor, got "
                         f"{tuple(video.shape) if isinstance(video, torch.Tensor) else type(video).__name__}")
    num_frames, height, width = video.shape[-3:]
    known = condition_region(task, num_frames, height, width, num_cond_frames).to(video.device)  # (T, H, W)
    if task == "frame_prediction":
        index = torch.arange(num_frames, device=video.device).clamp(max=num_cond_frames - 1)
        return video.index_select(-3, index)
    if task == "interpolation":
        index = torch.where(torch.arange(num_frames, device=video.device) < num_frames // 2, 0, num_frames - 1)
        return video.index_select(-3, index)
    return torch.where(known, video, torch.full_like(video, fill_value))


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


def make_training_batch(
    batch: Mapping[str, torch.Tensor],
    vocab: TokenVocabulary,
    *,
    tasks: Sequence[str] | None = None,
    schedule: str = "cosine",
    cond_dropout_prob: float = 0.1,
    unmasked_weight: float = 1.0,
    mask_ratio: float | None = None,
    generator: torch.Generator | None = None,
) -> TrainingBatch:
    """Turn token-shard items into a masked-token training batch.

    ``batch``: collated items ``{"codes": (B, t, h, w), "cond.<task>": (B, t, h, w)..., "sketch_codes": (B, t, h, w)
    (optional), "label": (B,)}``. For every example a task is drawn uniformly among ``tasks`` (default: every task
    the batch supports: each ``cond.<task>`` present, ``sketch`` if ``sketch_codes`` is present, ``class`` for
    labelled examples, ``unconditional``). The task's condition tokens go into the prefix and the label (if any)
    into the class slot. For classifier-free guidance the prefix and the class are each dropped (replaced by the
    pad / unconditional token) with probability ``cond_dropout_prob``.

    The video tokens are masked with ratio ``mask_schedule(r, schedule)``, ``r ~ U(0, 1)`` per example (or the fixed
    ``mask_ratio``). As in MAGVIT the loss covers all video positions: masked ones with weight 1, unmasked ones with
    ``unmasked_weight``.

    All randomness comes from ``generator`` (CPU); the outputs live on the device of ``batch["codes"]``.
    """
    if "codes" not in batch:
        raise ValueError(f"batch needs 'codes' (B, t, h, w); got keys {sorted(batch)}")
    codes = batch["codes"].long()
    if codes.dim() != 4:
        raise ValueError(f"batch['codes'] must be (B, t, h, w), got {tuple(codes.shape)}")
    if bool(((codes < 0) | (codes >= vocab.codebook_size)).any()):
        raise ValueError(f"codes must be in [0, {vocab.codebook_size})")
    if not 0.0 <= cond_dropout_prob <= 1.0:
        raise ValueError(f"cond_dropout_prob must be in [0, 1], got {cond_dropout_prob}")
    if mask_ratio is not None and not 0.0 <= mask_ratio <= 1.0:
        raise ValueError(f"mask_ratio must be in [0, 1], got {mask_ratio}")
    device = codes.device
    b = codes.shape[0]
    layout = SequenceLayout(tuple(codes.shape[1:]))  # type: ignore[arg-type]
    n = layout.num_video_tokens
    labels_in = batch.get("label")
    labels_in = (torch.full((b,), NO_LABEL, dtype=torch.long) if labels_in is None
                 else torch.as_tensor(labels_in).long().reshape(b).cpu())

    # Which tasks each example can train on.
    supported = [t for t in CONDITION_TASKS if f"cond.{t}" in batch]
    if "sketch_codes" in batch:
        supported.append("sketch")
    supported += ["class", "unconditional"]
    chosen = list(supported if tasks is None else tasks)
    for t in chosen:
        if t not in vocab.tasks:
            raise ValueError(f"unknown task '{t}'; expected one of {', '.join(vocab.tasks)}")
        if t not in supported:
            need = "sketch_codes" if t == "sketch" else f"cond.{t}"
            raise ValueError(f"task '{t}' needs '{need}' in the batch; got keys {sorted(batch)}")
    if not chosen:
        raise ValueError("tasks must name at least one task")
    allowed = torch.ones(b, len(chosen), dtype=torch.bool)  # (B, num_tasks)
    if "class" in chosen:
        allowed[:, chosen.index("class")] = labels_in >= 0
    no_choice = ~allowed.any(dim=1)
    if bool(no_choice.any()):
        raise ValueError("some examples have no label and 'class' is the only task allowed")
    scores = _rand((b, len(chosen)), generator).masked_fill(~allowed, -1.0)
    task_index = scores.argmax(dim=1)  # (B,) uniform among the allowed tasks

    # Prefix: the chosen task's condition tokens (pad for class / unconditional).
    prefix = torch.full((b, n), vocab.pad_token, dtype=torch.long, device=device)
    for i, t in enumerate(chosen):
        rows = (task_index == i).to(device)
        key = "sketch_codes" if t == "sketch" else f"cond.{t}"
        if key in batch and bool(rows.any()):
            prefix[rows] = batch[key].long().reshape(b, n).to(device)[rows]
    class_labels = torch.where(torch.tensor([t == "unconditional" for t in chosen])[task_index],
                               torch.full_like(labels_in, NO_LABEL), labels_in)

    # Classifier-free guidance: drop prefix and class independently.
    drop_prefix = _rand((b,), generator) < cond_dropout_prob
    drop_class = _rand((b,), generator) < cond_dropout_prob
    prefix[drop_prefix.to(device)] = vocab.pad_token
    class_labels = torch.where(drop_class, torch.full_like(class_labels, NO_LABEL), class_labels)

    # Mask the video tokens per the schedule.
    if mask_ratio is None:
        ratio = mask_schedule(_rand((b,), generator), schedule)
    else:
        ratio = torch.full((b,), float(mask_ratio), dtype=torch.float64)
    masked = random_mask(n, ratio, generator).to(device)  # (B, N)
    video = codes.reshape(b, n)
    video_in = torch.where(masked, torch.full_like(video, vocab.mask_token), video)

    task_tokens = torch.tensor([vocab.task_token(t) for t in chosen], dtype=torch.long)[task_index]
    input_ids = build_sequence(vocab, layout, task_tokens.to(device), vocab.class_tokens(class_labels).to(device),
                               prefix.reshape(codes.shape), video_in.reshape(codes.shape))
    labels = torch.full_like(input_ids, IGNORE_INDEX)
    labels[:, layout.video] = video
    loss_mask = torch.zeros(b, layout.length, dtype=torch.float32, device=device)
    loss_mask[:, layout.video] = torch.where(masked, 1.0, float(unmasked_weight))
    return TrainingBatch(input_ids, labels, loss_mask)


def factor_logits(logits: torch.Tensor, codebook_size: int) -> torch.Tensor:
    """The code logits of a model output in factor form ``(..., F, S)`` with ``S ** F == codebook_size``.

    A flat output ``(..., V)`` (``V >= codebook_size``: the codes, then the special tokens) becomes
    ``(..., 1, codebook_size)``; a factorised output ``(..., F, S)`` (one head per sub-token,
    :class:`CodeFactorization`) passes unchanged. Special tokens are never targets, so their logits are dropped.
    """
    if logits.shape[-1] >= codebook_size:
        return logits[..., :codebook_size].unsqueeze(-2)
    factors, sub = (logits.shape[-2], logits.shape[-1]) if logits.dim() >= 2 else (0, logits.shape[-1])
    if not 1 < factors < codebook_size.bit_length() or sub**factors != codebook_size:
        raise ValueError(f"logits {tuple(logits.shape)} fit neither a flat (..., V >= {codebook_size}) nor a "
                         f"factorised (..., F, S) output with S**F == {codebook_size}")
    return logits


def code_nll(logits: torch.Tensor, targets: torch.Tensor, codebook_size: int,
             label_smoothing: float = 0.0) -> torch.Tensor:
    """Negative log-likelihood (nats) ``(M,)`` of target codes ``(M,)`` under model logits ``(M, V)`` or
    ``(M, F, S)``.

    Factorised, it is the sum of the ``F`` sub-token cross-entropies: the NLL of the whole code under the model's
    joint ``p(c) = prod_i p_i(sub_i)``, so it is comparable with a flat model's. Label smoothing applies to each
    sub-token's distribution.
    """
    code_logits = factor_logits(logits, codebook_size).float()  # (M, F, S)
    m, factors, sub = code_logits.shape
    sub_targets = CodeFactorization(codebook_size, factors).split(targets)  # (M, F)
    ce = F.cross_entropy(code_logits.reshape(m * factors, sub), sub_targets.reshape(m * factors), reduction="none",
                         label_smoothing=label_smoothing)  # (M * F,)
    return ce.view(m, factors).sum(dim=1)


def predicted_codes(logits: torch.Tensor, codebook_size: int) -> torch.Tensor:
    """The most likely code ``(...)`` under model logits ``(..., V)`` or ``(..., F, S)``: the sub-tokens are
    independent given the context, so the joint's argmax is the merge of each sub-token's argmax."""
    code_logits = factor_logits(logits, codebook_size)  # (..., F, S)
    return CodeFactorization(codebook_size, code_logits.shape[-2]).merge(code_logits.argmax(dim=-1))


def masked_token_loss(logits: torch.Tensor, labels: torch.Tensor, loss_mask: torch.Tensor, codebook_size: int,
                      label_smoothing: float = 0.0) -> torch.Tensor:
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
