"""Video I/O: real footage, a corpus of bad inputs built here, decord vs PyAV agreement, write round trips."""

from __future__ import annotations

import sys
from pathlib import Path

import av
import numpy as np
import pytest
import torch

from magvit import video_io
from magvit.video_io import (
    VideoReadError,
    decord_available,
    frame_grid,
    probe_video,
    read_video,
    save_frame_grid,
    to_float,
    to_uint8,
    write_image,
    write_video,
)

# decord and PyAV bundle their own FFmpeg builds; both convert yuv420p -> RGB with swscale. Measured difference on
# the real clips and the corpus below: 0 (identical frames). Allowed: at most 1/255 per value.
DECODER_TOLERANCE = 1
# decord has wheels for Linux x86-64 only (the package requires it there alone); elsewhere PyAV reads everything.
needs_decord = pytest.mark.skipif(not decord_available(), reason="decord is not installed (no wheel here)")


def _encode(path: Path, frames: np.ndarray, codec: str = "libx264", pix_fmt: str = "yuv420p", fmt: str = "rgb24",
            fps: int = 25, options: dict | None = None) -> Path:
    """Write frames with PyAV directly (lets the corpus hold what ``write_video`` refuses: odd sizes, gray)."""
    with av.open(str(path), "w", options=options or {}) as container:
        stream = container.add_stream(codec, rate=fps)
        stream.width, stream.height = frames.shape[2], frames.shape[1]
        stream.pix_fmt = pix_fmt
        for frame in frames:
            for packet in stream.encode(av.VideoFrame.from_ndarray(frame, format=fmt)):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return path


def make_corpus(root: Path, real_video_path: str) -> dict[str, dict]:
    """Good and bad inputs built from real footage.

    Returns ``{name: {"path": Path, "ok": bool, "frames": int, "size": (H, W)}}``; ``ok`` says whether the file is
    a usable video (the short and 1-frame ones are usable videos, just too short for long clips).
    """
    root.mkdir(parents=True, exist_ok=True)
    real = read_video(real_video_path, indices=range(40)).frames.numpy()  # (40, 272, 640, 3)
    small = real[:, ::4, ::4][:, :64, :96].copy()  # (40, 64, 96, 3)
    corpus: dict[str, dict] = {}

    def add(name, path, ok, frames=0, size=(0, 0)):
        corpus[name] = {"path": Path(path), "ok": ok, "frames": frames, "size": size}

    add("good", write_video(root / "walk" / "good.mp4", small[:30], 25), True, 30, (64, 96))
    add("good_gif", write_video(root / "walk" / "loop.gif", small[:12], 10), True, 12, (64, 96))
    (root / "zero.mp4").write_bytes(b"")
    add("zero_bytes", root / "zero.mp4", False)
    full = write_video(root / "full.mp4", small[:30], 25).read_bytes()
    (root / "full.mp4").unlink()
    (root / "truncated.mp4").write_bytes(full[: len(full) // 2])  # moov atom (at the end) is gone
    add("truncated", root / "truncated.mp4", False)
    faststart = _encode(root / "fs.mp4", small[:30], options={"movflags": "faststart"}).read_bytes()
    (root / "fs.mp4").unlink()
    (root / "truncated_faststart.mp4").write_bytes(faststart[: int(len(faststart) * 0.6)])  # frames missing
    add("truncated_faststart", root / "truncated_faststart.mp4", False)
    (root / "notes.mp4").write_text("this is a text file, not a video\n" * 50)
    add("text_as_mp4", root / "notes.mp4", False)
    add("one_frame", write_video(root / "one.mp4", small[:1], 25), True, 1, (64, 96))
    gray = real[:20, :48, :64].mean(-1).astype(np.uint8)  # (20, 48, 64)
    add("grayscale", _encode(root / "gray.mkv", gray, codec="ffv1", pix_fmt="gray", fmt="gray"), True, 20, (48, 64))
    odd = real[:20, 100:161, 200:297].copy()  # (20, 61, 97, 3): odd sizes need yuv444p
    add("odd_size", _encode(root / "odd.mp4", odd, pix_fmt="yuv444p"), True, 20, (61, 97))
    add("short", write_video(root / "short.mp4", small[:5], 25), True, 5, (64, 96))
    add("unicode_space", write_video(root / "vidéos à voir" / "clip ünï 1.mp4", small[:24], 25), True, 24, (64, 96))
    add("image", write_image(root / "still.png", small[0]), True, 1, (64, 96))
    return corpus


@pytest.fixture(scope="module")
def corpus(tmp_path_factory, real_video_path):
    return make_corpus(tmp_path_factory.mktemp("corpus"), real_video_path)


def test_real_footage_probe_and_read(real_video_paths):
    bikes, carphone = real_video_paths
    info = probe_video(bikes, check="ends")
    assert info == {"frames": 250, "fps": 25.0, "width": 640, "height": 272, "duration": 10.0, "codec": "h264"}
    info = probe_video(carphone)
    assert (info["frames"], info["width"], info["height"]) == (120, 176, 144)
    assert info["fps"] == pytest.approx(30000 / 1001)
    frames, fps = read_video(carphone, indices=[5, 0, 5])
    assert frames.shape == (3, 144, 176, 3) and frames.dtype == torch.uint8 and fps == pytest.approx(29.97, abs=0.01)
    assert torch.equal(frames[0], frames[2]) and not torch.equal(frames[0], frames[1])
    assert read_video(carphone, max_frames=7).frames.shape[0] == 7


@needs_decord
@pytest.mark.parametrize("which", [0, 1])
def test_decord_and_pyav_decode_the_same_frames(real_video_paths, which):
    path = real_video_paths[which]
    indices = [0, 1, 2, 57, 58, 119, 3]  # forward, backward (seek) and repeated access
    a = read_video(path, indices=indices, backend="decord").frames.int()
    b = read_video(path, indices=indices, backend="pyav").frames.int()
    assert a.shape == b.shape
    diff = (a - b).abs()
    assert diff.max().item() <= DECODER_TOLERANCE, f"max |decord - pyav| = {diff.max().item()}"


@needs_decord
def test_decoders_agree_on_corpus(corpus):
    for name in ("good", "grayscale", "odd_size", "one_frame", "unicode_space"):
        path = corpus[name]["path"]
        a = read_video(path, backend="decord").frames.int()
        b = read_video(path, backend="pyav").frames.int()
        assert a.shape == b.shape == (corpus[name]["frames"], *corpus[name]["size"], 3), name
        assert (a - b).abs().max().item() <= DECODER_TOLERANCE, name


@pytest.fixture
def without_decord(monkeypatch):
    """A machine without decord: ``import decord`` fails (as where it has no wheel)."""
    monkeypatch.setitem(sys.modules, "decord", None)
    decord_available.cache_clear()
    yield
    decord_available.cache_clear()


def test_auto_reads_and_probes_with_pyav_without_decord(corpus, without_decord, monkeypatch):
    assert not decord_available()
    decord_calls = []
    monkeypatch.setattr(video_io, "_decord_reader", lambda *args: decord_calls.append(args))
    for name in ("good", "grayscale", "odd_size", "one_frame"):
        item = corpus[name]
        info = probe_video(item["path"])
        assert (info["frames"], info["height"], info["width"]) == (item["frames"], *item["size"]), name
        assert info == probe_video(item["path"], backend="pyav"), name
        frames = read_video(item["path"]).frames
        assert torch.equal(frames, read_video(item["path"], backend="pyav").frames), name
    for name in ("truncated", "text_as_mp4"):  # bad files: PyAV's reason alone, nothing about a missing decord
        with pytest.raises(VideoReadError) as err:
            probe_video(corpus[name]["path"], check="ends")
        assert "decord" not in str(err.value), name
    assert decord_calls == []


def test_corpus_nothing_crashes_and_each_bad_file_has_a_reason(corpus):
    for name, item in corpus.items():
        path = item["path"]
        if item["ok"]:
            info = probe_video(path, check="ends")
            assert info["frames"] == item["frames"], name
            assert (info["height"], info["width"]) == item["size"], name
            frames, _ = read_video(path)
            assert frames.shape == (item["frames"], *item["size"], 3), name  # grayscale expanded to 3 channels
        else:
            with pytest.raises(VideoReadError) as err:
                probe_video(path, check="ends")
            message = str(err.value)
            assert str(path) in message and len(err.value.reason) > 5, message
            assert isinstance(err.value, ValueError)
    assert "empty file" in str(_probe_error(corpus["zero_bytes"]["path"]))
    assert "truncated" in str(_probe_error(corpus["truncated_faststart"]["path"]))
    assert "Invalid data" in str(_probe_error(corpus["text_as_mp4"]["path"]))


def _probe_error(path):
    try:
        probe_video(path, check="ends")
    except VideoReadError as err:
        return err
    raise AssertionError(f"{path} should not probe")


def test_read_errors_name_file_and_reason(tmp_path, corpus):
    with pytest.raises(VideoReadError, match="no such file"):
        read_video(tmp_path / "missing.mp4")
    with pytest.raises(VideoReadError, match="out of range"):
        read_video(corpus["short"]["path"], indices=[0, 5])
    with pytest.raises(VideoReadError, match="out of range"):
        read_video(corpus["short"]["path"], indices=[0, 5], backend="pyav")
    with pytest.raises(VideoReadError, match="notes.mp4"):
        read_video(corpus["text_as_mp4"]["path"])
    with pytest.raises(ValueError, match="backend"):
        read_video(corpus["good"]["path"], backend="ffmpeg")
    # a still image is a 1-frame video; repeated index 0 is allowed, anything else is out of range
    assert read_video(corpus["image"]["path"], indices=[0, 0]).frames.shape == (2, 64, 96, 3)
    with pytest.raises(VideoReadError, match="out of range"):
        read_video(corpus["image"]["path"], indices=[1])


def test_conversions_round_trip():
    frames = torch.randint(0, 256, (4, 6, 10, 3), dtype=torch.uint8)
    video = to_float(frames)
    assert video.shape == (3, 4, 6, 10) and video.min() >= -1 and video.max() <= 1
    assert torch.equal(to_uint8(video), frames)
    assert torch.equal(to_uint8(to_float(frames[None])), frames[None])  # batched layout
    assert torch.equal(to_uint8(to_float(frames[0])), frames[0])  # single image
    assert to_uint8(torch.full((3, 1, 2, 2), 5.0)).unique().tolist() == [255]  # clamped
    with pytest.raises(ValueError, match="uint8"):
        to_float(video)
    with pytest.raises(ValueError, match="shape"):
        to_uint8(torch.zeros(4, 2, 2, 2))


def test_write_mp4_round_trip_and_even_sizes(tmp_path, real_clip):
    video = real_clip[0]  # (3, 16, 64, 64) float
    path = write_video(tmp_path / "out.mp4", video, fps=12)
    info = probe_video(path)
    assert (info["frames"], info["width"], info["height"], info["codec"]) == (16, 64, 64, "h264")
    assert info["fps"] == pytest.approx(12)
    back = read_video(path).frames
    err = (back.float() - to_uint8(video).float()).abs().mean().item()
    assert err < 4.0, f"libx264 crf 18 round trip mean abs error {err:.2f}/255"
    with av.open(str(path)) as container:
        assert container.streams.video[0].codec_context.pix_fmt == "yuv420p"
    odd = torch.randint(0, 256, (3, 61, 97, 3), dtype=torch.uint8)
    info = probe_video(write_video(tmp_path / "odd.mp4", odd, fps=25))
    assert (info["height"], info["width"]) == (62, 98)  # padded by one replicated row/column
    assert not list(tmp_path.glob(".*"))  # no temp files left behind


def test_write_gif_and_png_grid(tmp_path, real_clip):
    video = real_clip[0, :, :5]  # (3, 5, 64, 64)
    gif = write_video(tmp_path / "a.gif", video, fps=10)
    frames = read_video(gif, backend="pyav").frames
    assert frames.shape == (5, 64, 64, 3)
    assert (frames.float() - to_uint8(video).float()).abs().mean() < 8  # palette quantisation
    rows = [video, to_uint8(real_clip[0, :, :3])]  # float and uint8 rows of different lengths
    grid = frame_grid(rows, pad=2)
    assert grid.shape == (2 * 66 + 2, 5 * 66 + 2, 3)
    assert torch.equal(grid[2:66, 2:66], to_uint8(video[:, 0]))
    assert torch.equal(grid[68:132, 68:132], to_uint8(real_clip[0, :, 1]))
    assert (grid[68:132, 3 * 66 + 2:] == 255).all()  # missing frames of the short row stay background
    png = save_frame_grid(tmp_path / "grid.png", rows)
    assert torch.equal(read_video(png).frames[0], grid)


@needs_decord
def test_pyav_seeks_deep_clips_to_the_same_frames_as_decord(tmp_path, real_video_path):
    """Short GOPs with B-frames: PyAV seeks to the keyframe before the clip and maps pts to frame numbers."""
    from magvit import video_io

    frames = read_video(real_video_path, indices=range(120)).frames[:, ::4, ::4].numpy()  # (120, 68, 160, 3)
    path = tmp_path / "gop.mp4"
    with av.open(str(path), "w") as container:
        stream = container.add_stream("libx264", rate=25)
        stream.width, stream.height, stream.pix_fmt = 160, 68, "yuv420p"
        stream.options = {"g": "8", "bf": "2"}
        for frame in frames:
            for packet in stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    indices = [97, 98, 99, 100, 60, 119, 97]
    assert min(indices) >= video_io._SEEK_MIN_FRAMES
    seeked = video_io._decode_after_seek(path, sorted(set(indices)), 25.0)
    assert seeked is not None and sorted(seeked) == sorted(set(indices))  # the seek path itself, not the fallback
    a = read_video(path, indices=indices, backend="decord").frames.int()
    b = read_video(path, indices=indices, backend="pyav").frames.int()
    assert (a - b).abs().max().item() <= DECODER_TOLERANCE
    assert torch.equal(torch.from_numpy(seeked[60]).int(), a[4])
