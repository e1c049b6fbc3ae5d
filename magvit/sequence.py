"""The token vocabulary and the sequence layout shared by the priors, and the logit / code-NLL helpers.

Sequence layout of a model's ``conditioning`` (``TransformerConfig.conditioning``)::

    prefix   (length 2 + 2N): [task token][class or unconditional token][prefix: N condition tokens][video: N tokens]
    interior (length 2 + N):  [task token][class or unconditional token][video: N tokens]

with ``N = t*h*w`` (two code grids: ``N = N_top + t*h*w``, ``magvit.code_grids``). Prefix: the prefix holds the
tokens of the pixel-space condition video (COMMIT tasks) or of a sketch video; tasks without one (class,
unconditional) and dropped conditions fill it with the pad token. Interior (MAGVIT's COMMIT as its official code
does it): each condition token sits in the slot of the video token it conditions; a masked video slot inside the
task's condition region (``magvit.conditions.latent_condition_region``) holds the condition token instead of the
mask token, in training and at every decoding step (:func:`interior_condition_tokens`). Sketch conditioning has no
region, so interior models have no sketch task (``TransformerConfig`` refuses it). The autoregressive prior uses the
prefix layout.

The token ids of a model's tasks follow its own task list (``TokenVocabulary.tasks``). Nothing here draws a random
number; the masks and the training batches are ``magvit.masking``'s.
"""

from __future__ import annotations

import dataclasses
from typing import Protocol, Sequence

import torch
import torch.nn.functional as F

from . import code_grids
from . import tasks as _tasks

#: Where a model's condition tokens go (``TransformerConfig.conditioning``, see the module docstring).
CONDITIONINGS: tuple[str, ...] = ("prefix", "interior")

#: Label of an example without a class.
NO_LABEL = -1
#: Target id ignored by the losses (positions that are not video codes).
IGNORE_INDEX = -100


# --- vocabulary and sequence layout --------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class TokenVocabulary:
    """Named special tokens placed after the codebook: ``[codes][mask][pad][uncond][tasks...][classes...]``.

    ``tasks`` is the model's own task list (``TransformerConfig.tasks``): its order fixes the task-token ids, and
    the class tokens follow it, so rows added to the task table later change no id of this vocabulary.
    """

    codebook_size: int
    num_classes: int = 0
    tasks: tuple[str, ...] = _tasks.DEFAULT_TASKS

    def __post_init__(self) -> None:
        if self.codebook_size < 2:
            raise ValueError(f"codebook_size must be >= 2, got {self.codebook_size}")
        if self.num_classes < 0:
            raise ValueError(f"num_classes must be >= 0, got {self.num_classes}")
        if not self.tasks or len(set(self.tasks)) != len(self.tasks):
            raise ValueError(f"tasks must be a non-empty list of distinct task names, got {list(self.tasks)}")
        for name in self.tasks:
            _tasks.task(name)  # raises for a name the task table does not know

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
        """Vectorised :meth:`class_token` for a (B,) long tensor of labels (``NO_LABEL`` -> unconditional), on their
        device and unchecked (no host sync): labels are checked where they are read (``check_training_batch``)."""
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
    """Positions of the parts of a sequence for a token grid ``(t, h, w)`` and a ``conditioning`` of
    :data:`CONDITIONINGS` (``"interior"``: no prefix, the prefix slice is empty).

    Two code grids (``top_grid``, VQ-VAE-2; ``magvit.code_grids``): the prefix and the video each hold the top grid's
    tokens, then the bottom grid's (``token_grid``), packed flat: ``N = N_top + t*h*w``."""

    token_grid: tuple[int, int, int]
    conditioning: str = "prefix"
    top_grid: tuple[int, int, int] | None = None

    def __post_init__(self) -> None:
        if self.conditioning not in CONDITIONINGS:
            raise ValueError(f"conditioning must be one of {CONDITIONINGS}, got {self.conditioning!r}")

    @property
    def interior(self) -> bool:
        return self.conditioning == "interior"

    @property
    def num_video_tokens(self) -> int:
        t, h, w = self.token_grid
        return t * h * w + self.num_top_tokens

    @property
    def num_top_tokens(self) -> int:
        """Tokens of the top grid, the first of the video (and of the prefix); 0 with one grid."""
        return code_grids.num_tokens(self.top_grid)

    @property
    def video_shape(self) -> tuple[int, ...]:
        """One example's video (or prefix) tokens as tensors hold them: ``token_grid``, or with two grids packed
        flat ``(N_top + t*h*w,)``."""
        return tuple(self.token_grid) if self.top_grid is None else (self.num_video_tokens,)

    @property
    def task_position(self) -> int:
        return 0

    @property
    def class_position(self) -> int:
        return 1

    @property
    def prefix(self) -> slice:
        return slice(2, 2 if self.interior else 2 + self.num_video_tokens)

    @property
    def video(self) -> slice:
        start = self.prefix.stop
        return slice(start, start + self.num_video_tokens)

    @property
    def length(self) -> int:
        return self.video.stop


def build_sequence(
    vocab: TokenVocabulary,
    layout: SequenceLayout,
    task_tokens: torch.Tensor,
    class_tokens: torch.Tensor,
    prefix: torch.Tensor | None,
    video: torch.Tensor | None,
) -> torch.Tensor:
    """Assemble ``(B, L)`` input ids from per-example task / class tokens (B,), prefix tokens ``(B, t, h, w)``
    (``None``: all pad; an interior layout has no prefix) and video tokens ``(B, t, h, w)`` (``None``: all mask);
    with two grids both are packed ``(B, N_top + N)`` (``layout.video_shape``)."""
    batch = task_tokens.shape[0]
    n = layout.num_video_tokens
    if layout.interior and prefix is not None:
        raise ValueError("an interior layout has no prefix: its condition tokens go into the video slots")
    for name, grid in (("prefix", prefix), ("video", video)):
        if grid is not None and tuple(grid.shape[1:]) != layout.video_shape:
            raise ValueError(f"{name} tokens must be (B, {', '.join(map(str, layout.video_shape))}), "
                             f"got {tuple(grid.shape)}")
    device = task_tokens.device
    ids = torch.empty(batch, layout.length, dtype=torch.long, device=device)
    ids[:, layout.task_position] = task_tokens
    ids[:, layout.class_position] = class_tokens
    ids[:, layout.prefix] = vocab.pad_token if prefix is None else prefix.reshape(batch, n)  # interior: empty
    ids[:, layout.video] = vocab.mask_token if video is None else video.reshape(batch, n)
    return ids


def interior_condition_tokens(vocab: TokenVocabulary, layout: SequenceLayout, tokens: torch.Tensor,
                              condition_codes: torch.Tensor, region: torch.Tensor) -> torch.Tensor:
    """``(B, L)``: what each still-masked slot of ``tokens`` ``(B, L)`` shows an interior model while decoding:
    the condition code ``condition_codes (B, t, h, w)`` inside ``region`` ``(t, h, w)`` bool, the mask token
    elsewhere (``iterative_decode``'s ``condition_tokens``); two grids: both packed (``layout.video_shape``)."""
    batch, n = tokens.shape[0], layout.num_video_tokens
    codes = condition_codes.to(tokens.device).reshape(batch, n)
    shown = tokens.clone()
    shown[:, layout.video] = torch.where(region.to(tokens.device).reshape(1, n), codes,
                                         torch.full_like(codes, vocab.mask_token))
    return shown


# --- logits and code NLL -------------------------------------------------------------------------------------------


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


# --- what every prior's config tells -------------------------------------------------------------------------------


class PriorConfig(Protocol):
    """The config of either prior (``TransformerConfig``, ``AutoregressiveConfig``) as the code that builds, decodes
    and scores their sequences reads it: no ``getattr`` defaults, each config answers every question."""

    codebook_size: int
    token_grid: tuple[int, int, int]
    top_grid: tuple[int, int, int] | None
    num_classes: int
    tasks: Sequence[str]

    @property
    def conditioning(self) -> str: ...  # one of CONDITIONINGS (the autoregressive prior: always "prefix")

    @property
    def cond_frames(self) -> tuple[int, ...]: ...  # frame prediction's trained given-frame counts (empty: unknown)

    @property
    def vocab(self) -> TokenVocabulary: ...

    @property
    def layout(self) -> SequenceLayout: ...
