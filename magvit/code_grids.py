"""Two code grids (VQ-VAE-2, Razavi et al. 2019) in one prior sequence: the top grid's tokens, then the bottom's.

A ``hierarchy=2`` tokenizer encodes a clip into a top grid ``(t, h/2, w/2)`` and a bottom grid ``(t, h, w)``
(``tokenizer.HierarchicalCodes``). VQ-VAE-2's priors model the top first and the bottom given the top; here both
priors see ONE sequence whose video part is the two grids packed flat, each in raster order::

    video: [top: t*(h/2)*(w/2) tokens][bottom: t*h*w tokens]

so the autoregressive prior (raster order) models ``p(top) p(bottom | top)`` without any change of its own, and the
masked prior trains with one mask over the packed sequence (or, ``MaskingConfig.two_grid_masking="stages"``, on a
top and a bottom stage) and decodes in two phases, top first (``masking.make_training_batch``,
``pipeline.generate_codes``). A prior config records the top grid (``top_grid`` beside ``token_grid``); without it
(every single-grid model) nothing here is used.

Token shards keep the bottom grid under the single-grid keys (``codes``, ``cond.<task>``, ``sketch_codes``) and the
top grid under the same keys prefixed by :data:`TOP` (``top.codes``, ``top.cond.<task>``, ...); ``meta.json``
records both grids (``token_grid``, ``top_grid``). This module is the one place that packs and unpacks them.
"""

from __future__ import annotations

import math
from typing import Mapping, Sequence

import torch

#: Prefix of a top grid's token-shard key (``top.codes`` is the top grid of ``codes``).
TOP = "top."


def num_tokens(grid: Sequence[int] | None) -> int:
    """Tokens of a grid ``(t, h, w)``; 0 for no grid (``None``)."""
    return 0 if grid is None else math.prod(grid)


def pack(top: torch.Tensor, bottom: torch.Tensor) -> torch.Tensor:
    """``(B, N_top + N)``: the top grid ``(B, t, h', w')`` then the bottom grid ``(B, t, h, w)``, each in raster
    order."""
    return torch.cat([top.reshape(top.shape[0], -1), bottom.reshape(bottom.shape[0], -1)], dim=1)


def unpack(tokens: torch.Tensor, top_grid: Sequence[int], grid: Sequence[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """The inverse of :func:`pack`: ``(top (B, *top_grid), bottom (B, *grid))`` of packed tokens ``(B, N_top + N)``."""
    n_top = num_tokens(top_grid)
    if tokens.dim() != 2 or tokens.shape[1] != n_top + num_tokens(grid):
        raise ValueError(f"packed tokens must be (B, {n_top + num_tokens(grid)}), got {tuple(tokens.shape)}")
    return (tokens[:, :n_top].reshape(-1, *top_grid), tokens[:, n_top:].reshape(-1, *grid))


def pack_codes(codes) -> torch.Tensor:
    """A tokenizer's codes as the prior's video tokens: ``(B, t, h, w)`` as they are; two grids ``(top, bottom)``
    packed to ``(B, N_top + N)``."""
    return pack(*codes) if isinstance(codes, tuple) else codes


def video_codes(video: torch.Tensor, token_grid: Sequence[int], top_grid: Sequence[int] | None):
    """What the tokenizer decodes from a prior's video tokens ``(B, N)``: ``(B, t, h, w)``, or with a top grid the
    ``(top, bottom)`` pair."""
    if top_grid is None:
        return video.reshape(-1, *token_grid)
    return unpack(video, top_grid, token_grid)


def split_codes(codes, size: int) -> list:
    """``codes`` (``(B, ...)`` or a ``(top, bottom)`` pair) cut along the batch into parts of ``size`` examples."""
    if isinstance(codes, tuple):
        return [type(codes)(*parts) for parts in zip(*(grid.split(size) for grid in codes))]
    return list(codes.split(size))


def shard_entries(name: str, codes) -> dict[str, torch.Tensor]:
    """The token-shard entries of one code grid ``name`` (``codes``, ``cond.<task>``...): ``{name: codes}``, or for
    a ``(top, bottom)`` pair ``{name: bottom, "top." + name: top}``."""
    if isinstance(codes, tuple):
        top, bottom = codes
        return {name: bottom, TOP + name: top}
    return {name: codes}


def pack_batch(batch: Mapping[str, torch.Tensor]) -> tuple[Mapping[str, torch.Tensor], tuple[int, int, int] | None]:
    """A collated token batch as one grid per key: a batch without top grids as it is (and ``None``); with them,
    every key that has a top twin packed to ``(B, N_top + N)`` (:func:`pack`), the top keys dropped, and the top
    grid ``(t, h', w')``."""
    if TOP + "codes" not in batch:
        return batch, None
    top_grid = tuple(int(n) for n in batch[TOP + "codes"].shape[1:])
    packed = {key: value for key, value in batch.items() if not key.startswith(TOP)}
    for key, value in batch.items():
        if key.startswith(TOP):
            packed[key[len(TOP):]] = pack(value, batch[key[len(TOP):]])
    return packed, top_grid  # type: ignore[return-value]


def top_grid_of(bottom_grid: Sequence[int]) -> tuple[int, int, int]:
    """The top grid ``(t, h / 2, w / 2)`` of a bottom grid (``TokenizerConfig.top_grid``'s rule)."""
    t, h, w = (int(n) for n in bottom_grid)
    return t, h // 2, w // 2


def check_grids(token_grid: Sequence[int], top_grid: Sequence[int] | None) -> tuple[int, int, int] | None:
    """``top_grid`` as a tuple (``None`` stays ``None``), ``ValueError`` unless it is the top grid of
    ``token_grid`` (same frames, half its H and W)."""
    if top_grid is None:
        return None
    top = tuple(int(n) for n in top_grid)
    if len(top) != 3 or min(top) < 1 or top != top_grid_of(token_grid) or token_grid[1] % 2 or token_grid[2] % 2:
        raise ValueError(f"top_grid must be (t, h / 2, w / 2) of token_grid {tuple(token_grid)}, got {top_grid}")
    return top  # type: ignore[return-value]


def decoding_phases(layout) -> list[torch.Tensor]:
    """The positions ``(L,)`` bool of a :class:`magvit.sequence.SequenceLayout` that a masked prior fills, phase by
    phase: the video; with two grids the top grid's, then the bottom grid's (given the fixed top)."""
    video, split = layout.video, layout.video.start + layout.num_top_tokens
    parts = [video] if split == video.start else [slice(video.start, split), slice(split, video.stop)]
    phases = []
    for part in parts:
        positions = torch.zeros(layout.length, dtype=torch.bool)
        positions[part] = True
        phases.append(positions)
    return phases
