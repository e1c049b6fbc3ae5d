"""COMMIT condition regions and fills: which pixels of a clip a task knows, its condition video in pixel space
(:func:`build_condition_video`), and the same regions at the token grid's resolution for interior conditioning
(:func:`latent_condition_region`, one or two code grids).

What varies by task (frames, area and fill) is read from the task's row in ``magvit/tasks.py``; a new kind of
region or fill is a few lines here.
"""

from __future__ import annotations

from typing import Sequence

import torch

from . import code_grids
from . import tasks as _tasks


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
