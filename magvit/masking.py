"""The one mask schedule, the token vocabulary and sequence layout, COMMIT condition construction, training masks
and the masked-token loss.

Everything here is shared by training (``launch/train_transformer.py``) and sampling (``magvit/sampling.py``), so
the schedule, the special tokens and the sequence layout are defined exactly once.

Sequence layout of a model's ``conditioning`` (``TransformerConfig.conditioning``)::

    prefix   (length 2 + 2N): [task token][class or unconditional token][prefix: N condition tokens][video: N tokens]
    interior (length 2 + N):  [task token][class or unconditional token][video: N tokens]

with ``N = t*h*w``. Prefix: the prefix holds the tokens of the pixel-space condition video (COMMIT tasks) or of a
sketch video; tasks without one (class, unconditional) and dropped conditions fill it with the pad token.
Interior (MAGVIT's COMMIT as its official code does it): each condition token sits in the slot of the video token it
conditions; a masked video slot inside the task's condition region (:func:`latent_condition_region`) holds the
condition token instead of the mask token, in training and at every decoding step. Sketch conditioning has no
region, so interior models have no sketch task (``TransformerConfig`` refuses it).

What varies by task (condition region and fill, the token-shard key of the prefix, the use of the label) is read
from the task's row in ``magvit/tasks.py``; the token ids of a model's tasks follow its own task list
(``TokenVocabulary.tasks``). The per-batch path (:func:`make_training_batch`) never waits for the device: checks of
tensor values live in :func:`check_training_batch` and in the token-shard dataset.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Mapping, NamedTuple, Sequence

import torch
import torch.nn.functional as F

from . import code_grids
from . import tasks as _tasks
from .config import Config, require_finite


@dataclasses.dataclass
class MaskingConfig(Config):
    """Options of ``masking.make_training_batch`` and ``masking.masked_token_loss``."""

    tasks: list[str] | None = None  # None: every task of the model that the token shards support
    schedule: str = "cosine"
    cond_dropout_prob: float = 0.1  # classifier-free guidance: drop the condition / class, each independently
    uncond_prob: float = 0.0  # ... and drop both together (the unconditional branch of guidance), on top of that
    unmasked_weight: float = 1.0  # loss weight of the visible video tokens (masked ones weigh 1)
    label_smoothing: float = 0.0
    # Two code grids (VQ-VAE-2): "joint" masks both grids with one mask; "stages" trains a top or a bottom stage per
    # example (two_stage_mask). Decoding is top first either way. "joint" measured 1.4-2.3% lower held-out NLL on the
    # two-stage maskings at 60-240 s (BENCHMARKS.md, "Priors over two code grids").
    two_grid_masking: str = "joint"

    def __post_init__(self):
        require_finite(self, ("cond_dropout_prob", "uncond_prob", "unmasked_weight", "label_smoothing"))
        if self.tasks is not None and not self.tasks:
            raise ValueError("tasks is an empty list, which trains nothing: name the tasks to train, or null "
                             "for every task of the model that the token shards carry")
        if self.two_grid_masking not in TWO_GRID_MASKINGS:
            raise ValueError(f"masking.two_grid_masking must be one of {list(TWO_GRID_MASKINGS)}, got "
                             f"{self.two_grid_masking!r}")
        if not (0 <= self.cond_dropout_prob <= 1 and 0 <= self.uncond_prob <= 1) or self.unmasked_weight < 0 \
                or not 0 <= self.label_smoothing < 1:
            raise ValueError("masking: need 0 <= cond_dropout_prob <= 1, 0 <= uncond_prob <= 1, unmasked_weight >= 0 "
                             "and 0 <= label_smoothing < 1")


# --- tasks: the table is magvit/tasks.py; names kept here for the modules that import them -----------------------

#: Names of the COMMIT tasks whose condition is a pixel-space video (``build_condition_video``), in table order;
#: ``data_prep.tokenize`` writes one ``cond.<task>`` token grid per clip for each of these.
CONDITION_TASKS: tuple[str, ...] = _tasks.CONDITION_TASKS
#: Names of every task of the table (the rows: ``magvit.tasks.TASKS``).
TASKS: tuple[str, ...] = _tasks.TASK_NAMES

#: Where a model's condition tokens go (``TransformerConfig.conditioning``, see the module docstring).
CONDITIONINGS: tuple[str, ...] = ("prefix", "interior")

#: How a masked prior over two code grids trains (``MaskingConfig.two_grid_masking``, :func:`make_training_batch`).
TWO_GRID_MASKINGS: tuple[str, ...] = ("joint", "stages")

#: Label value meaning "no class" (as in ``ClipDataset`` / token shards).
NO_LABEL = -1
#: ``labels`` value at positions that carry no target (cross_entropy's ``ignore_index``).
IGNORE_INDEX = -100

_EXPONENTIAL_RATE = 5.0  # steepness of the "exponential" schedule


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


# --- COMMIT condition construction in pixel space ------------------------------------------------------------------
# The kinds of region and fill that the rows of magvit/tasks.py name.


def _first_frames(task: str, num_frames: int, num_cond_frames: int) -> torch.Tensor:
    if not 1 <= num_cond_frames < num_frames:
        raise ValueError(f"{task} needs 1 <= num_cond_frames < {num_frames}, got {num_cond_frames}")
    return torch.arange(num_frames) < num_cond_frames


def _end_frames(task: str, num_frames: int, num_cond_frames: int) -> torch.Tensor:
    if num_frames < 3:
        raise ValueError(f"{task} needs at least 3 frames, got {num_frames}")
    t = torch.arange(num_frames)
    return (t == 0) | (t == num_frames - 1)


def _middle_half(size: int) -> torch.Tensor:
    """Bool ``(size,)``: the central band of one axis (MAGVIT's OPC/OPV/OPH/IPC regions)."""
    i = torch.arange(size)
    return (i >= size // 4) & (i < size - size // 4)


def _every(size: int) -> torch.Tensor:
    return torch.ones(size, dtype=torch.bool)


#: Task.frames -> known frames ``(T,)`` bool, given (task name, T, num_cond_frames).
_KNOWN_FRAMES = {"first": _first_frames, "ends": _end_frames, "all": lambda task, t, n: _every(t)}
#: Task.area -> known pixels of a frame ``(H, W)`` bool.
_KNOWN_AREAS = {
    "all": lambda h, w: _every(h)[:, None] & _every(w),
    "central": lambda h, w: _middle_half(h)[:, None] & _middle_half(w),
    "vertical": lambda h, w: _every(h)[:, None] & _middle_half(w),
    "horizontal": lambda h, w: _middle_half(h)[:, None] & _every(w),
    "outside_central": lambda h, w: ~(_middle_half(h)[:, None] & _middle_half(w)),
}


def _condition_task(task: str) -> _tasks.Task:
    row = next((t for t in _tasks.TASKS if t.name == task and t.condition == "video"), None)
    if row is None:
        known = ", ".join(t.name for t in _tasks.TASKS if t.condition == "video")
        raise ValueError(f"'{task}' is not a pixel-space condition task; expected one of {known}")
    return row


def condition_region(task: str, num_frames: int, height: int, width: int, num_cond_frames: int = 1) -> torch.Tensor:
    """Bool ``(T, H, W)``: True where the condition video shows real pixels for ``task`` (its row's ``frames``
    and ``area``)."""
    row = _condition_task(task)
    frames = _KNOWN_FRAMES[row.frames](task, num_frames, num_cond_frames)  # (T,)
    return frames[:, None, None] & _KNOWN_AREAS[row.area](height, width)  # (T, H, W)


def _nearest_known_frame(known: torch.Tensor) -> torch.Tensor:
    """``(T,)`` long: for every frame the index of the nearest known frame of ``known`` ``(T,)`` (ties: the later)."""
    frames = known.nonzero().squeeze(1)  # (K,)
    distance = (torch.arange(known.shape[0])[:, None] - frames[None, :]).abs()  # (T, K)
    return frames.flip(0)[distance.flip(1).argmin(dim=1)]  # argmin takes the first of equals: here the later frame


def _known_neighbours(known: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(T,)`` long each: the last known frame at or before every frame and the first at or after it (before the
    first / after the last known frame: that frame)."""
    t = torch.arange(known.shape[0])
    before = torch.where(known, t, -1).cummax(dim=0).values
    after = torch.where(known, t, known.shape[0]).flip(0).cummin(dim=0).values.flip(0)
    first, last = t[known][0], t[known][-1]
    return torch.where(before < 0, first, before), torch.where(after >= known.shape[0], last, after)


def _fill_nearest_frame(video: torch.Tensor, known: torch.Tensor, fill_value: float) -> torch.Tensor:
    index = _nearest_known_frame(known.flatten(1).any(dim=1))  # (T,)
    return video.index_select(-3, index.to(video.device))


def _fill_linear_blend(video: torch.Tensor, known: torch.Tensor, fill_value: float) -> torch.Tensor:
    # frame i between known frames a <= i <= b: (1 - w) * frame a + w * frame b, w = (i - a) / (b - a)
    before, after = _known_neighbours(known.flatten(1).any(dim=1))  # (T,) each
    t = torch.arange(known.shape[0])
    weight = torch.where(after > before, (t - before) / (after - before).clamp_min(1), 0.0)  # (T,) float
    start, end = video.index_select(-3, before.to(video.device)), video.index_select(-3, after.to(video.device))
    return torch.lerp(start, end, weight.to(video).view(-1, 1, 1))  # known frames: start == end, copied exactly


def _edge_index(known: torch.Tensor) -> torch.Tensor:
    """``(S,)`` long: every position of one axis clamped into the known span of ``known`` ``(S,)``."""
    i = torch.arange(known.shape[0])
    return i.clamp(int(i[known][0]), int(i[known][-1]))


def _fill_edge(video: torch.Tensor, known: torch.Tensor, fill_value: float) -> torch.Tensor:
    # the known box of every frame (tasks.Task allows "edge" on box areas only), padded by its edge pixels
    rows, cols = known.any(dim=2).any(dim=0), known.any(dim=1).any(dim=0)  # (H,), (W,)
    video = video.index_select(-2, _edge_index(rows).to(video.device))
    return video.index_select(-1, _edge_index(cols).to(video.device))


def _fill_constant(video: torch.Tensor, known: torch.Tensor, fill_value: float) -> torch.Tensor:
    return torch.where(known.to(video.device), video, torch.full_like(video, fill_value))


#: Task.fill -> the condition video from the video ``(..., 3, T, H, W)`` and its known pixels ``(T, H, W)`` bool.
_FILLS = {"nearest_frame": _fill_nearest_frame, "linear_blend": _fill_linear_blend, "edge": _fill_edge,
          "constant": _fill_constant}


def build_condition_video(video: torch.Tensor, task: str, num_cond_frames: int = 1,
                          fill_value: float = 0.0) -> torch.Tensor:
    """The COMMIT condition video of ``task`` built in pixel space, ready to be tokenized.

    ``video``: ``(3, T, H, W)`` or ``(B, 3, T, H, W)`` in [-1, 1]; the result has the same shape. Known pixels are
    copied exactly; the task's row says how the unknown ones are filled (as MAGVIT's official code does):
    ``nearest_frame`` replicates the nearest known frame (frame prediction: the last given frame),
    ``linear_blend`` blends the known frames before and after linearly by distance (interpolation: frame ``i`` of
    ``T`` is ``(1 - i/(T-1)) * first + i/(T-1) * last``), ``edge`` replicates the edge pixels of the known box
    (outpainting), ``constant`` fills them with ``fill_value`` (0 = mid grey; inpainting).
    """
    if not isinstance(video, torch.Tensor) or video.dim() not in (4, 5) or video.shape[-4] != 3:
        raise ValueError(f"video must be a (3, T, H, W) or (B, 3, T, H, W) tensor, got "
                         f"{tuple(video.shape) if isinstance(video, torch.Tensor) else type(video).__name__}")
    num_frames, height, width = video.shape[-3:]
    row = _condition_task(task)
    known = condition_region(task, num_frames, height, width, num_cond_frames)  # (T, H, W)
    return _FILLS[row.fill](video, known, fill_value)


def _temporal_factor(num_frames: int, latent_frames: int, causal: bool) -> int:
    """Frames per latent frame of a tokenizer mapping ``num_frames`` to ``latent_frames`` (``ValueError`` if none)."""
    if causal:  # 1 + k * f frames -> 1 + k latent frames
        f = (num_frames - 1) // (latent_frames - 1) if latent_frames > 1 else 1
        fits = num_frames == 1 + (latent_frames - 1) * f
    else:
        f = num_frames // latent_frames
        fits = num_frames == latent_frames * f
    if not fits:
        raise ValueError(f"{num_frames} frames do not map to {latent_frames} latent frames "
                         f"({'causal' if causal else 'non-causal'} tokenizer)")
    return f


def latent_condition_region(task: str, token_grid: Sequence[int], clip_size: Sequence[int], causal: bool,
                            num_cond_frames: int = 1) -> torch.Tensor:
    """Bool ``(t, h, w)``: the latent slots of ``task``'s condition region (:func:`condition_region` at pixel
    level) for a tokenizer that maps ``clip_size`` ``(T, H, W)`` clips to ``token_grid`` ``(t, h, w)``.

    A slot is in the region when its ``H/h x W/w`` pixel block is wholly known in at least one of its frames. A
    latent frame of frames partly given counts (the condition video fills the rest from them; MAGVIT's own code
    conditions on one latent frame for one given frame of four); a pixel block partly padded does not. Frames map
    to latent frames as the tokenizer does: ``i // f``, or causally (``TokenizerConfig.causal``) frame 0 alone to
    latent frame 0 and frames ``(j - 1) f + 1 .. j f`` to latent frame ``j``.
    """
    (t, h, w), (frames, height, width) = (tuple(int(x) for x in token_grid), tuple(int(x) for x in clip_size))
    if height % h or width % w:
        raise ValueError(f"a {height}x{width} frame does not map to a {h}x{w} latent grid")
    f = _temporal_factor(frames, t, causal)
    known = condition_region(task, frames, height, width, num_cond_frames)  # (T, H, W)
    blocks = known.view(frames, h, height // h, w, width // w).all(dim=4).all(dim=2)  # (T, h, w)
    i = torch.arange(frames)
    latent = torch.div(i + f - 1, f, rounding_mode="floor") if causal else torch.div(i, f, rounding_mode="floor")
    hits = torch.zeros(t, h * w).index_add_(0, latent, blocks.flatten(1).float())  # (t, h*w) known frames per slot
    return (hits > 0).view(t, h, w)


def latent_condition_regions(tasks: Sequence[str], token_grid: Sequence[int], clip_size: Sequence[int],
                             causal: bool, cond_frames: Sequence[int] = (1,),
                             top_grid: Sequence[int] | None = None) -> dict[str, torch.Tensor]:
    """:func:`latent_condition_region` of each pixel-condition task of ``tasks`` (the others have none), by its
    condition's name (``magvit.tasks.condition_name``; frame prediction: one region per given-frame count of
    ``cond_frames``): the ``condition_regions`` of :func:`make_training_batch` for an interior model. With a
    ``top_grid`` (two code grids) each is :func:`two_grid_condition_region`."""
    regions = {}
    for name in tasks:
        row = _tasks.task(name)
        if row.condition != "video":
            continue
        for n in cond_frames if row.frames == "first" else (1,):
            regions[_tasks.condition_name(name, n)] = two_grid_condition_region(name, token_grid, top_grid,
                                                                                clip_size, causal, n)
    return regions


def shard_cond_frames(meta: Mapping) -> tuple[int, ...]:
    """The frame-prediction given-frame counts whose condition codes token shards hold, from their ``meta.json``
    (``cond_frames``; shards without the key hold the one-frame condition when they hold frame prediction's)."""
    if "cond_frames" in meta:
        return tuple(int(n) for n in meta["cond_frames"])
    return (1,) if "frame_prediction" in (meta.get("condition_tasks") or ()) else ()


def shard_condition_regions(meta: Mapping, tasks: Sequence[str]) -> dict[str, torch.Tensor]:
    """:func:`latent_condition_regions` of ``tasks`` for the clips, tokenizer, given-frame counts and code grids of
    token shards (their ``meta.json``: ``num_frames``, ``image_size``, ``tokenizer.causal``, ``token_grid``,
    ``cond_frames``, ``top_grid`` when they hold two grids)."""
    clip = (int(meta["num_frames"]), int(meta["image_size"]), int(meta["image_size"]))
    causal = bool((meta.get("tokenizer") or {}).get("causal", False))
    return latent_condition_regions(tasks, meta["token_grid"], clip, causal, shard_cond_frames(meta) or (1,),
                                    meta.get("top_grid"))


def two_grid_condition_region(task: str, token_grid: Sequence[int], top_grid: Sequence[int] | None,
                              clip_size: Sequence[int], causal: bool, num_cond_frames: int = 1) -> torch.Tensor:
    """:func:`latent_condition_region` on ``token_grid`` ``(t, h, w)``; with a ``top_grid`` the regions of both grids,
    each at its own resolution, packed as the sequence holds them: bool ``(N_top + t*h*w,)``
    (``magvit.code_grids.pack``)."""
    bottom = latent_condition_region(task, token_grid, clip_size, causal, num_cond_frames)
    if top_grid is None:
        return bottom
    top = latent_condition_region(task, top_grid, clip_size, causal, num_cond_frames)
    return code_grids.pack(top[None], bottom[None])[0]


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


def _draw(batch_size: int, num_tasks: int, num_tokens: int, schedule: str, cond_dropout_prob: float,
          uncond_prob: float, mask_ratio: float | None, generator: torch.Generator | None,
          top_tokens: int = 0, draw_counts: bool = False) -> _Draws:
    # The order of the draws is part of the training RNG's stream (exact resume replays it): keep it. The joint drop
    # and the given-frame count draw last and only when asked, so a run without them draws what it always drew.
    task_scores = _rand((batch_size, num_tasks), generator)
    drop_prefix = _rand((batch_size,), generator) < cond_dropout_prob
    drop_class = _rand((batch_size,), generator) < cond_dropout_prob
    if mask_ratio is None:
        ratio = _gamma(_rand((batch_size,), generator), schedule)  # U(0, 1) through the schedule
    else:
        ratio = torch.full((batch_size,), float(mask_ratio), dtype=torch.float64)
    if top_tokens:  # two code grids: a top or a bottom stage per example
        masked, scored = two_stage_mask(top_tokens, num_tokens - top_tokens, ratio, generator)
    else:
        masked, scored = random_mask(num_tokens, ratio, generator), None
    if uncond_prob > 0:
        both = _rand((batch_size,), generator) < uncond_prob
        drop_prefix, drop_class = drop_prefix | both, drop_class | both
    count_scores = _rand((batch_size,), generator) if draw_counts else None
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
    *,
    tasks: Sequence[str] | None = None,
    schedule: str = "cosine",
    cond_dropout_prob: float = 0.1,
    uncond_prob: float = 0.0,
    unmasked_weight: float = 1.0,
    mask_ratio: float | None = None,
    generator: torch.Generator | None = None,
    conditioning: str = "prefix",
    condition_regions: Mapping[str, torch.Tensor] | None = None,
    two_grid_masking: str = "stages",
) -> TrainingBatch:
    """Turn token-shard items into a masked-token training batch.

    ``batch``: collated items ``{"codes": (B, t, h, w), "cond.<task>": (B, t, h, w)..., "sketch_codes": (B, t, h, w)
    (optional), "label": (B,)}``. For every example a task is drawn uniformly among ``tasks`` (default: every task
    of the model the batch supports, :func:`training_tasks`; ``class`` for labelled examples only). The task's
    condition tokens go into the prefix and the label (if any) into the class slot. For classifier-free guidance
    the condition and the class are each dropped (replaced by the pad / unconditional token) with probability
    ``cond_dropout_prob``, and both together with probability ``uncond_prob`` on top (so the unconditional branch
    trains ``uncond_prob + (1 - uncond_prob) * cond_dropout_prob**2`` of the time).

    ``conditioning="interior"`` (MAGVIT's COMMIT; sequence ``2 + N``): no prefix; a masked video slot inside the
    task's latent condition region (``condition_regions[task]`` ``(t, h, w)`` bool, e.g. from
    :func:`latent_condition_regions`) holds the condition token instead of the mask token (a dropped condition:
    the mask token). No sketch task.

    Frame prediction given several frame counts (the batch carries ``cond.frame_prediction`` for one given frame and
    ``cond.frame_prediction.<n>`` for ``n``, ``magvit.tasks.condition_name``): each frame-prediction example takes
    one of the carried counts, uniformly, its codes and (interior) its region ``condition_regions["frame_prediction"
    ".<n>"]``. That draw comes last from ``generator``, and only when a task has several, so a batch of one count
    draws what it always drew.

    Two code grids (VQ-VAE-2; the batch also holds ``top.codes``, ``top.cond.<condition>``... ``(B, t, h', w')``,
    ``magvit.code_grids``): every grid is packed top first, the region of ``condition_regions[<condition>]`` is the
    packed ``(N_top + N,)`` one (:func:`two_grid_condition_region`). With ``two_grid_masking="stages"`` (the states
    two-phase decoding visits: what held-out scoring uses) each example trains the top or the bottom stage
    (:func:`two_stage_mask`; its draws replace the one-grid mask's, so one-grid batches draw as before); with
    ``"joint"`` (the trainer's default, ``MaskingConfig``) one mask covers the packed sequence like one grid.

    The video tokens are masked with ratio ``mask_schedule(r, schedule)``, ``r ~ U(0, 1)`` per example (or the fixed
    ``mask_ratio``). As in MAGVIT the loss covers all video positions: masked ones with weight 1, unmasked ones with
    ``unmasked_weight``.

    All randomness comes from ``generator`` (CPU); the outputs live on the device of ``batch["codes"]``, and nothing
    waits for that device: the tensors' values are not checked here (:func:`check_training_batch` does).
    """
    grid = tuple(_video_codes(batch).shape[1:])  # (t, h, w): the bottom grid when there are two
    batch, top_grid = code_grids.pack_batch(batch)  # two grids: each of them (B, N_top + N), top first
    codes = batch["codes"].long()  # (B, t, h, w), or packed (B, N_top + N)
    rows = training_tasks(batch, vocab, tasks)
    check_schedule(schedule)
    for name, p in (("cond_dropout_prob", cond_dropout_prob), ("uncond_prob", uncond_prob)):
        if not 0.0 <= p <= 1.0:
            raise ValueError(f"{name} must be in [0, 1], got {p}")
    if mask_ratio is not None and not 0.0 <= mask_ratio <= 1.0:
        raise ValueError(f"mask_ratio must be in [0, 1], got {mask_ratio}")
    if two_grid_masking not in TWO_GRID_MASKINGS:
        raise ValueError(f"two_grid_masking must be one of {list(TWO_GRID_MASKINGS)}, got {two_grid_masking!r}")
    b, device = codes.shape[0], codes.device
    layout = SequenceLayout(grid, conditioning, top_grid)  # type: ignore[arg-type]
    variants, sizes = _variants(batch, rows)
    table = _region_table(variants, condition_regions, layout) if layout.interior else None  # (num_variants, N)
    draws = _draw(b, len(rows), layout.num_video_tokens, schedule, cond_dropout_prob, uncond_prob, mask_ratio,
                  generator, layout.num_top_tokens if two_grid_masking == "stages" else 0,
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
                     unmasked_weight, scored)


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
