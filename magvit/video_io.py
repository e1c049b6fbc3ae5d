"""Read and write videos and images at the I/O boundary.

Inside the library a video is a float tensor ``(3, T, H, W)`` (or ``(B, 3, T, H, W)``) in ``[-1, 1]``; on disk and
at this boundary it is uint8 ``(T, H, W, 3)`` RGB. Reading uses decord (fast, frame-accurate random access) where it
is installed (its wheels are for Linux x86-64) and PyAV elsewhere or when decord fails; a still image (png/jpg/...)
reads as a 1-frame video. Writing uses PyAV (mp4: libx264, yuv420p) and Pillow (gif, png). Every read failure is a
:class:`VideoReadError` whose message names the file and the reason.
"""

from __future__ import annotations

import functools
import math
import os
import re
import warnings
from pathlib import Path
from typing import NamedTuple, Sequence

import numpy as np
import torch

from .fileio import atomic_path

VIDEO_EXTENSIONS = (".mp4", ".avi", ".mkv", ".webm", ".mov", ".mpg", ".mpeg", ".m4v", ".gif")
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".webp")
BACKENDS = ("auto", "decord", "pyav")
#: The most pixels (width x height) a still image may have: 8192 x 8192. Checked from its header before anything is
#: decoded: Pillow itself refuses only above ~179 megapixels, and reading a 144-megapixel PNG took 4.2 GB.
MAX_IMAGE_PIXELS = 8192 * 8192


class VideoReadError(ValueError):
    """A video or image could not be read; the message names the file and the reason."""

    def __init__(self, path: str | os.PathLike, reason: str):
        self.path = str(path)
        self.reason = reason
        super().__init__(f"cannot read {self.path}: {reason}")


class VideoFrames(NamedTuple):
    """Decoded frames: uint8 ``(T, H, W, 3)`` RGB and the stream's frame rate (0.0 for a still image)."""

    frames: torch.Tensor
    fps: float


def is_image(path: str | os.PathLike) -> bool:
    return Path(path).suffix.lower() in IMAGE_EXTENSIONS


# --------------------------------------------------------------------------------------------------------------------
# Reading
# --------------------------------------------------------------------------------------------------------------------
def _check_file(path: Path) -> None:
    if not path.exists():
        raise VideoReadError(path, "no such file")
    if not path.is_file():
        raise VideoReadError(path, "not a regular file")
    if path.stat().st_size == 0:
        raise VideoReadError(path, "empty file (0 bytes)")


def _short(err: BaseException) -> str:
    """One line of an exception, without decord's multi-line C++ stack traces."""
    strerror = getattr(err, "strerror", None)  # av.FFmpegError / OSError: the FFmpeg or OS message itself
    if strerror:
        return f"{type(err).__name__}: {strerror}"[:300]
    text = [re.sub(r"^\[[\d:]+\] \S+:\d+: ", "", t.strip()) for t in str(err).strip().splitlines()]
    line = next((t.strip() for t in text if t.strip() and not t.strip().startswith(("Stack trace", "[bt]"))), "")
    return f"{type(err).__name__}: {line}"[:300] if line else type(err).__name__


def _check_indices(path: Path, indices: Sequence[int], num_frames: int) -> list[int]:
    indices = [int(i) for i in indices]
    if not indices:
        raise ValueError("indices must not be empty")
    bad = [i for i in indices if i < 0 or i >= num_frames]
    if bad:
        raise VideoReadError(path, f"frame index {bad[0]} out of range (the video has {num_frames} frames)")
    return indices


def _too_many_pixels(pixels: int | None, size: str = "") -> str:
    """Why an image of ``pixels`` (None: unknown, over Pillow's own limit; ``size``: ``"WxH"``) is refused."""
    found = f"{pixels / 1e6:.1f} megapixels" if pixels else "more pixels than Pillow opens"
    found = f"{size} = {found}" if size else found
    return (f"{found}, more than the {MAX_IMAGE_PIXELS / 1e6:.1f} (8192 x 8192) an image may have here; downscale it "
            "first")


def _open_image(path: Path):
    """The opened image: header read, nothing decoded yet; ``VideoReadError`` for an unreadable one or one of more
    than ``MAX_IMAGE_PIXELS`` pixels."""
    from PIL import Image, UnidentifiedImageError

    try:
        with warnings.catch_warnings():  # Pillow warns above its own limit, which is higher than ours: refused below
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            img = Image.open(path)
    except Image.DecompressionBombError as err:  # above twice Pillow's limit it refuses before we see the size
        found = re.search(r"\((\d+) pixels\)", str(err))
        raise VideoReadError(path, _too_many_pixels(int(found.group(1)) if found else None)) from None
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as err:
        raise VideoReadError(path, f"not a readable image ({_short(err)})") from None
    width, height = img.size
    if width * height > MAX_IMAGE_PIXELS:
        img.close()
        raise VideoReadError(path, _too_many_pixels(width * height, f"{width}x{height}"))
    return img


def image_size(path: str | os.PathLike) -> tuple[int, int]:
    """``(width, height)`` of an image from its header (nothing decoded). Raises ``VideoReadError`` for a missing or
    unreadable file and for one of more than ``MAX_IMAGE_PIXELS`` pixels."""
    path = Path(path)
    _check_file(path)
    with _open_image(path) as img:
        return img.size


def _read_image(path: Path, indices: Sequence[int] | None) -> VideoFrames:
    try:
        with _open_image(path) as img:
            img.load()
            rgb = np.array(img.convert("RGB"))  # grayscale / palette / RGBA -> (H, W, 3)
    except VideoReadError:
        raise
    except (OSError, ValueError, SyntaxError) as err:  # damaged after a sound header
        raise VideoReadError(path, f"not a readable image ({_short(err)})") from None
    if indices is not None:
        _check_indices(path, indices, 1)
        rgb = np.stack([rgb] * len(indices))
    else:
        rgb = rgb[None]
    return VideoFrames(torch.from_numpy(np.ascontiguousarray(rgb)), 0.0)


@functools.cache
def decord_available() -> bool:
    """Whether decord imports here; without it ``backend="auto"`` reads and probes with PyAV alone."""
    try:
        import decord  # noqa: F401
    except ImportError:
        return False
    return True


def _decord_reader(path: Path, threads: int):
    import decord

    return decord.VideoReader(str(path), ctx=decord.cpu(0), num_threads=threads)


def _read_decord(path: Path, indices: Sequence[int] | None, max_frames: int | None, threads: int) -> VideoFrames:
    reader = _decord_reader(path, threads)
    num_frames = len(reader)
    if num_frames == 0:
        raise VideoReadError(path, "the video stream has no frames")
    if indices is None:
        indices = range(num_frames if max_frames is None else min(num_frames, max_frames))
    indices = _check_indices(path, indices, num_frames)
    frames = reader.get_batch(indices).asnumpy()  # (T, H, W, 3) uint8, RGB even for grayscale sources
    return VideoFrames(torch.from_numpy(np.ascontiguousarray(frames)), float(reader.get_avg_fps()))


def _stream_fps(stream) -> float:
    rate = stream.average_rate or stream.guessed_rate or stream.base_rate
    return float(rate) if rate else 0.0


#: below this first frame number PyAV decodes from the start; above it, it seeks to the keyframe before it first
_SEEK_MIN_FRAMES = 48


def _decode_after_seek(path: Path, wanted: Sequence[int], fps: float) -> dict[int, np.ndarray] | None:
    """Frames ``wanted`` (sorted) after seeking to the keyframe before the first one; ``None`` when the timestamps
    cannot be trusted (missing pts, or the seek landed past the first wanted frame): the caller decodes from the start.
    """
    import av

    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        stream.thread_type = "AUTO"
        if not stream.time_base:
            return None
        time_base, start = stream.time_base, stream.start_time or 0
        first, last, needed = wanted[0], wanted[-1], set(wanted)
        container.seek(start + int((first - 0.5) / fps / time_base), stream=stream, backward=True, any_frame=False)
        out: dict[int, np.ndarray] = {}
        seen = False
        for frame in container.decode(stream):
            if frame.pts is None:
                return None
            index = round(float((frame.pts - start) * time_base) * fps)  # constant frame rate: pts -> frame number
            if not seen and index > first:
                return None
            seen = True
            if index in needed:
                out[index] = frame.to_ndarray(format="rgb24")
            if index >= last:
                break
    return out if len(out) == len(needed) else None


def _read_pyav(path: Path, indices: Sequence[int] | None, max_frames: int | None,
               partial_ok: bool = False) -> VideoFrames:
    import av

    if indices is not None and len(indices) and not partial_ok and min(indices) >= _SEEK_MIN_FRAMES:
        # a clip deep inside a long video: seek instead of decoding everything before it
        with av.open(str(path)) as container:
            fps = _stream_fps(container.streams.video[0]) if container.streams.video else 0.0
        if fps > 0:
            try:
                got = _decode_after_seek(path, sorted(set(int(i) for i in indices)), fps)
            except Exception:
                got = None
            if got is not None:
                return VideoFrames(torch.from_numpy(np.stack([got[int(i)] for i in indices])), fps)

    with av.open(str(path)) as container:
        if not container.streams.video:
            raise VideoReadError(path, "no video stream")
        stream = container.streams.video[0]
        if not partial_ok:  # frame threading may report a late packet's error before earlier frames come out
            stream.thread_type = "AUTO"
        fps = _stream_fps(stream)
        wanted = None if indices is None else [int(i) for i in indices]
        if wanted is not None:
            if not wanted:
                raise ValueError("indices must not be empty")
            if min(wanted) < 0:
                raise VideoReadError(path, f"frame index {min(wanted)} out of range")
        # Decode sequentially from the start: exact frame numbering without trusting timestamps.
        decoded: dict[int, np.ndarray] = {}
        last = None if wanted is None else max(wanted)
        needed = None if wanted is None else set(wanted)
        count = 0
        try:
            for i, frame in enumerate(container.decode(stream)):
                count = i + 1
                if needed is None or i in needed:
                    decoded[i] = frame.to_ndarray(format="rgb24")  # (H, W, 3)
                if (last is not None and i >= last) or (max_frames is not None and wanted is None
                                                        and count >= max_frames):
                    break
        except Exception as err:  # corrupt data mid-stream (truncated file)
            if not (partial_ok and count):
                raise VideoReadError(path, f"decoding failed after {count} frames ({_short(err)})") from None
    if count == 0:
        raise VideoReadError(path, "the video stream has no decodable frames")
    if wanted is None:
        order = sorted(decoded)
    else:
        missing = [i for i in wanted if i not in decoded]
        if missing:
            raise VideoReadError(path, f"frame index {missing[0]} out of range (only {count} frames decodable)")
        order = wanted
    frames = np.stack([decoded[i] for i in order])
    return VideoFrames(torch.from_numpy(frames), fps)


def _count_decodable(path: Path) -> tuple[int, tuple[int, int]]:
    """Frames PyAV decodes from the start until the end or the first error, and the frame size ``(H, W)``.

    Frames are decoded one at a time and dropped: memory stays that of one frame whatever the length (keeping them
    would hold e.g. 4000 frames of 360p, 1.7 GB, per probing worker).
    """
    import av

    count, size = 0, (0, 0)
    with av.open(str(path)) as container:
        if not container.streams.video:
            raise VideoReadError(path, "no video stream")
        stream = container.streams.video[0]
        try:
            for frame in container.decode(stream):
                if count == 0:
                    size = (frame.height, frame.width)
                count += 1
        except Exception as err:  # corrupt data mid-stream: the frames before it count
            if count == 0:
                raise VideoReadError(path, f"decoding failed ({_short(err)})") from None
    if count == 0:
        raise VideoReadError(path, "the video stream has no decodable frames")
    return count, size


def read_video(
    path: str | os.PathLike,
    indices: Sequence[int] | None = None,
    max_frames: int | None = None,
    backend: str = "auto",
    threads: int = 1,
) -> VideoFrames:
    """Decode a video (or a still image as a 1-frame video).

    Args:
        path: video file (any container/codec FFmpeg reads) or image (png, jpg, bmp, webp).
        indices: frame numbers to return, in the given order (repeats allowed); all frames when ``None``.
        max_frames: with ``indices=None``, stop after this many frames.
        backend: ``"auto"`` (decord where installed, then PyAV if decord fails), ``"decord"`` or ``"pyav"``.
        threads: decoder threads for decord (1 suits DataLoader workers; 0 lets decord choose).

    Returns:
        ``VideoFrames(frames, fps)``: uint8 ``(T, H, W, 3)`` RGB (grayscale sources are expanded to 3 channels)
        and the average frame rate (0.0 for an image).

    Raises:
        VideoReadError: missing/empty/corrupt file, no video stream, or an index past the end.
    """
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if max_frames is not None and max_frames < 1:
        raise ValueError(f"max_frames must be >= 1, got {max_frames}")
    path = Path(path)
    _check_file(path)
    if is_image(path):
        frames = _read_image(path, indices)
        return frames if max_frames is None else VideoFrames(frames.frames[:max_frames], frames.fps)
    errors = []
    if backend == "decord" or (backend == "auto" and decord_available()):
        try:
            return _read_decord(path, indices, max_frames, threads)
        except VideoReadError as err:
            if backend == "decord" or "out of range" in err.reason:
                raise
            errors.append(f"decord: {err.reason}")
        except Exception as err:  # decord raises DECORDError / RuntimeError with C++ traces
            if backend == "decord":
                raise VideoReadError(path, _short(err)) from None
            errors.append(f"decord: {_short(err)}")
    try:
        return _read_pyav(path, indices, max_frames)
    except VideoReadError as err:
        if errors:
            raise VideoReadError(path, f"{err.reason} ({'; '.join(errors)})") from None
        raise
    except Exception as err:  # av.FFmpegError (InvalidDataError, ...), OSError
        reason = _short(err)
        if errors:
            reason = f"{reason} ({'; '.join(errors)})"
        raise VideoReadError(path, reason) from None


def probe_video(path: str | os.PathLike, check: str = "first", backend: str = "auto") -> dict:
    """Metadata of a video or image: ``frames, fps, width, height, duration, codec``.

    Args:
        check: how much to decode to prove the file is usable: ``"none"`` (headers only), ``"first"`` (first frame),
            ``"ends"`` (first and last frame, catches truncated files whose index promises frames that are gone).
        backend: ``"auto"`` (decord where installed for frame count and decoding, PyAV if decord fails or is not
            installed), ``"decord"``, ``"pyav"``.

    Raises:
        VideoReadError: the file cannot be used, with the reason.
    """
    if check not in ("none", "first", "ends"):
        raise ValueError(f"check must be 'none', 'first' or 'ends', got {check!r}")
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    path = Path(path)
    _check_file(path)
    if is_image(path):
        return _probe_image(path, check)._asdict()
    header = _probe_header(path)
    decord_failure = ""
    if backend == "decord" or (backend == "auto" and decord_available()):
        try:
            return _probe_decord(path, header, check)._asdict()
        except VideoReadError as err:
            if backend == "decord" or err.reason.startswith("truncated"):
                raise
            decord_failure = f"decord: {err.reason}"
        except Exception as err:  # decord raises DECORDError / RuntimeError with C++ traces
            if backend == "decord":
                raise VideoReadError(path, _short(err)) from None
            decord_failure = f"decord: {_short(err)}"
    return _probe_pyav(path, header, check, decord_failure)._asdict()


class _Probe(NamedTuple):
    """What :func:`probe_video` reports, in its key order."""

    frames: int
    fps: float
    width: int
    height: int
    duration: float
    codec: str


def _probed(frames: int, fps: float, width: int, height: int, codec: str) -> _Probe:
    duration = frames / fps if fps > 0 else 0.0
    return _Probe(int(frames), float(fps), int(width), int(height), float(duration), str(codec))


def _probe_image(path: Path, check: str) -> _Probe:
    try:
        with _open_image(path) as img:
            fmt = (img.format or path.suffix[1:]).lower()
            if check != "none":
                img.load()
            width, height = img.size
    except VideoReadError:
        raise
    except (OSError, ValueError, SyntaxError) as err:  # damaged after a sound header
        raise VideoReadError(path, f"not a readable image ({_short(err)})") from None
    return _Probe(1, 0.0, width, height, 0.0, fmt)


def _probe_header(path: Path) -> _Probe:
    """The container's word (PyAV, no decoding): codec name, size, fps and frame count (packets counted when the
    container stores none, as mkv / webm); a readable reason for files that are not videos at all."""
    import av

    try:
        with av.open(str(path)) as container:
            if not container.streams.video:
                raise VideoReadError(path, "no video stream")
            stream = container.streams.video[0]
            codec = stream.codec_context.name
            width, height = stream.codec_context.width, stream.codec_context.height
            fps = _stream_fps(stream)
            frames = int(stream.frames or 0)
            if frames == 0:
                frames = sum(1 for packet in container.demux(stream) if packet.size)
    except VideoReadError:
        raise
    except Exception as err:
        raise VideoReadError(path, f"not a video FFmpeg can open, e.g. truncated or another format "
                                   f"({_short(err)})") from None
    if codec is None:
        raise VideoReadError(path, "unknown video codec")
    return _probed(frames, fps, width, height, codec)


def _probe_decord(path: Path, header: _Probe, check: str) -> _Probe:
    """Frame count and fps from decord's index; with ``check`` the first (and last) frame decoded."""
    reader = _decord_reader(path, 1)
    frames, fps = len(reader), float(reader.get_avg_fps()) or header.fps
    height, width = header.height, header.width
    if frames == 0:
        raise VideoReadError(path, "the video stream has no frames")
    if check != "none":
        height, width = reader[0].asnumpy().shape[:2]
    if check == "ends" and frames > 1:
        try:
            reader[frames - 1].asnumpy()
        except Exception as err:
            raise VideoReadError(path, f"truncated or corrupt: frame {frames - 1} of {frames} cannot be "
                                       f"decoded ({_short(err)})") from None
    return _probed(frames, fps, width, height, header.codec)


def _probe_pyav(path: Path, header: _Probe, check: str, decord_failure: str) -> _Probe:
    """The header's metadata proven by PyAV decoding. When decord could not open the file (``decord_failure``),
    ``"first"`` becomes ``"ends"``: every promised frame must decode (truncated files)."""
    if decord_failure and check == "first":
        check = "ends"
    frames, height, width = header.frames, header.height, header.width
    try:
        if check == "first":
            height, width = _read_pyav(path, [0], None).frames.shape[1:3]
        elif check == "ends":
            decodable, (height, width) = _count_decodable(path)  # exact count, no frame kept
            if decodable < frames:
                raise VideoReadError(path, f"truncated or corrupt: only {decodable} of {frames} frames "
                                           "can be decoded")
            frames = decodable
    except Exception as err:
        reason = err.reason if isinstance(err, VideoReadError) else _short(err)
        if not reason.startswith("truncated"):  # the headers were fine, the frames are not
            reason = f"truncated or corrupt: {reason}"
        raise VideoReadError(path, reason + (f" ({decord_failure})" if decord_failure else "")) from None
    if frames == 0:
        raise VideoReadError(path, "the video stream has no frames")
    return _probed(frames, header.fps, width, height, header.codec)


# --------------------------------------------------------------------------------------------------------------------
# Layout conversions
# --------------------------------------------------------------------------------------------------------------------
def to_uint8(video: torch.Tensor) -> torch.Tensor:
    """Float ``(3, T, H, W)`` (or ``(B, 3, T, H, W)``, or an image ``(3, H, W)``) in [-1, 1] -> uint8 channels-last.

    ``(3, T, H, W) -> (T, H, W, 3)``, ``(B, 3, T, H, W) -> (B, T, H, W, 3)``, ``(3, H, W) -> (H, W, 3)``.
    A uint8 tensor is returned unchanged (it is assumed to be channels-last already).
    """
    if video.dtype == torch.uint8:
        return video
    if not video.is_floating_point():
        raise ValueError(f"expected a float video in [-1, 1] or uint8 frames, got dtype {video.dtype}")
    if video.dim() not in (3, 4, 5) or video.shape[-4 if video.dim() > 3 else 0] != 3:
        raise ValueError(f"expected (3, H, W), (3, T, H, W) or (B, 3, T, H, W), got shape {tuple(video.shape)}")
    out = ((video.detach().float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).cpu()
    if out.dim() == 3:
        return out.permute(1, 2, 0).contiguous()
    if out.dim() == 4:
        return out.permute(1, 2, 3, 0).contiguous()
    return out.permute(0, 2, 3, 4, 1).contiguous()


def to_float(frames: torch.Tensor) -> torch.Tensor:
    """uint8 ``(T, H, W, 3)`` -> float ``(3, T, H, W)`` in [-1, 1] (also ``(B, T, H, W, 3)`` and ``(H, W, 3)``)."""
    if frames.dtype != torch.uint8:
        raise ValueError(f"expected uint8 frames, got dtype {frames.dtype}")
    if frames.dim() not in (3, 4, 5) or frames.shape[-1] != 3:
        raise ValueError(f"expected (H, W, 3), (T, H, W, 3) or (B, T, H, W, 3), got shape {tuple(frames.shape)}")
    video = frames.float() / 127.5 - 1.0
    if video.dim() == 3:
        return video.permute(2, 0, 1).contiguous()
    if video.dim() == 4:
        return video.permute(3, 0, 1, 2).contiguous()
    return video.permute(0, 4, 1, 2, 3).contiguous()


def _as_frames(video: torch.Tensor | np.ndarray) -> np.ndarray:
    """Any accepted video layout -> uint8 numpy ``(T, H, W, 3)``."""
    if isinstance(video, np.ndarray):
        video = torch.from_numpy(video)
    if video.dtype == torch.uint8:
        if video.dim() == 3:
            video = video[None]
        if video.dim() != 4 or video.shape[-1] not in (1, 3):
            raise ValueError(f"expected uint8 (T, H, W, 3), got shape {tuple(video.shape)}")
        if video.shape[-1] == 1:
            video = video.expand(-1, -1, -1, 3)
        return np.ascontiguousarray(video.cpu().numpy())
    if video.dim() == 5:
        if video.shape[0] != 1:
            raise ValueError(f"write one video at a time, got a batch of {video.shape[0]}")
        video = video[0]
    if video.dim() == 3:
        video = video.unsqueeze(1)  # (3, H, W) image -> (3, 1, H, W)
    return to_uint8(video).numpy()


# --------------------------------------------------------------------------------------------------------------------
# Writing
# --------------------------------------------------------------------------------------------------------------------
#: frame rates a written video can hold: mp4 stores the rate as a fraction with a denominator <= 1001 (below
#: 1/1001 it rounds to 0, which libx264 silently replaces by 24 fps) and GIF a frame duration of at most 655.35 s
MIN_FPS = 0.01
MAX_FPS = 1000.0


def check_fps(fps: float) -> float:
    """``fps`` if a video can be written at that rate, else ``ValueError`` saying why."""
    if not isinstance(fps, (int, float)) or not math.isfinite(fps) or not MIN_FPS <= fps <= MAX_FPS:
        raise ValueError(f"fps must be a number in [{MIN_FPS:g}, {MAX_FPS:g}], got {fps}")
    return float(fps)


def write_video(path: str | os.PathLike, video: torch.Tensor | np.ndarray, fps: float, crf: int = 18,
                preset: str = "medium") -> Path:
    """Write a video atomically (temp file, then rename).

    Args:
        path: ``.mp4`` / ``.mkv`` / ``.mov`` (libx264, yuv420p) or ``.gif``.
        video: float ``(3, T, H, W)`` / ``(1, 3, T, H, W)`` in [-1, 1], or uint8 ``(T, H, W, 3)``.
        fps: frames per second, in [MIN_FPS, MAX_FPS] (see :func:`check_fps`).
        crf: libx264 quality (0 = lossless luma, 18 = visually lossless, 23 = FFmpeg default).
        preset: libx264 speed/size trade-off (``"ultrafast"`` ... ``"veryslow"``).

    Odd heights/widths are padded by one replicated row/column (yuv420p needs even sizes).
    """
    path = Path(path)
    check_fps(fps)
    frames = _as_frames(video)  # (T, H, W, 3)
    suffix = path.suffix.lower()
    if suffix not in (".gif", ".mp4", ".mkv", ".mov", ".m4v"):
        raise ValueError(f"cannot write {path}: unsupported extension {path.suffix!r} (use .mp4, .mkv, .mov, .gif)")
    with atomic_path(path) as tmp:  # the temp file keeps the suffix: the container format follows it
        if suffix == ".gif":
            from PIL import Image

            images = [Image.fromarray(f) for f in frames]
            images[0].save(tmp, save_all=True, append_images=images[1:], duration=max(1, round(1000 / fps)),
                           loop=0, optimize=False)
        else:
            import av
            from fractions import Fraction

            pad_h, pad_w = frames.shape[1] % 2, frames.shape[2] % 2
            if pad_h or pad_w:
                frames = np.pad(frames, ((0, 0), (0, pad_h), (0, pad_w), (0, 0)), mode="edge")
            rate = Fraction(fps).limit_denominator(1001)
            with av.open(str(tmp), mode="w") as container:
                stream = container.add_stream("libx264", rate=rate)
                stream.width, stream.height = frames.shape[2], frames.shape[1]
                stream.pix_fmt = "yuv420p"
                stream.options = {"crf": str(crf), "preset": preset}
                for frame in frames:
                    for packet in stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")):
                        container.mux(packet)
                for packet in stream.encode():
                    container.mux(packet)
    return path


def write_image(path: str | os.PathLike, image: torch.Tensor | np.ndarray) -> Path:
    """Write one image (png/jpg) atomically: uint8 ``(H, W, 3)`` or float ``(3, H, W)`` in [-1, 1]."""
    from PIL import Image

    path = Path(path)
    if isinstance(image, np.ndarray):
        image = torch.from_numpy(image)
    array = (image if image.dtype == torch.uint8 else to_uint8(image)).cpu().numpy()
    if array.ndim != 3 or array.shape[-1] != 3:
        raise ValueError(f"expected an image (H, W, 3) uint8 or (3, H, W) float, got shape {tuple(image.shape)}")
    with atomic_path(path) as tmp:
        Image.fromarray(np.ascontiguousarray(array)).save(tmp)
    return path


def frame_grid(rows: Sequence[torch.Tensor] | torch.Tensor, pad: int = 2, background: int = 255) -> torch.Tensor:
    """Tile videos into one uint8 image ``(H', W', 3)``: row ``i`` holds the frames of video ``i`` left to right.

    ``rows``: a sequence of videos (float ``(3, T, H, W)`` in [-1, 1] or uint8 ``(T, H, W, 3)``) or a float batch
    ``(B, 3, T, H, W)``. Videos may differ in length and size; cells take the largest frame size.
    """
    if isinstance(rows, torch.Tensor):
        rows = list(rows) if rows.dim() == 5 else [rows]
    if len(rows) == 0:
        raise ValueError("frame_grid needs at least one video")
    videos = [_as_frames(v) for v in rows]  # each (T, H, W, 3)
    cell_h = max(v.shape[1] for v in videos)
    cell_w = max(v.shape[2] for v in videos)
    cols = max(v.shape[0] for v in videos)
    grid = np.full((len(videos) * (cell_h + pad) + pad, cols * (cell_w + pad) + pad, 3), background, np.uint8)
    for r, v in enumerate(videos):
        for c, frame in enumerate(v):
            top, left = pad + r * (cell_h + pad), pad + c * (cell_w + pad)
            grid[top:top + frame.shape[0], left:left + frame.shape[1]] = frame
    return torch.from_numpy(grid)


def save_frame_grid(path: str | os.PathLike, rows: Sequence[torch.Tensor] | torch.Tensor, pad: int = 2) -> Path:
    """Write a PNG grid of frames: rows = videos, columns = frames (see :func:`frame_grid`)."""
    return write_image(path, frame_grid(rows, pad=pad))
