"""Datasets over a video manifest, over pre-extracted clip shards, and over token shards.

Every item is a pure function of ``(seed, epoch, index)``: the clip start, crop and flip come from a generator
seeded with exactly those numbers, never from global random state. Splitting the work across ranks
(``DistributedSampler``) and DataLoader workers therefore yields the same items with no duplicates, whatever the
process layout.

Manifest (JSON lines, one video each): ``path, frames, fps, width, height, duration, codec, split, label`` and,
optionally, ``sketch`` (an aligned sketch video). A relative ``path``/``sketch`` is relative to the manifest's folder.
"""

from __future__ import annotations

import json
import logging
import math
import os
from collections import Counter
from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import Dataset

from .code_grids import TOP
from .fileio import atomic_path
from .shard_meta import META_NAME, TokenShardMeta, read_meta_json
from .video_io import VideoReadError, read_video, to_float

logger = logging.getLogger(__name__)

MANIFEST_FIELDS = ("path", "frames", "fps", "width", "height", "duration", "codec", "split", "label")


# --------------------------------------------------------------------------------------------------------------------
# Manifest
# --------------------------------------------------------------------------------------------------------------------
def read_manifest(path: str | os.PathLike, split: str | None = None) -> list[dict[str, Any]]:
    """Records of a manifest (JSON lines), ``path``/``sketch`` resolved against the manifest's folder.

    Args:
        split: keep only ``"train"`` or ``"val"`` records; ``None`` or ``"all"`` keeps everything.

    Raises:
        FileNotFoundError: no manifest there. ValueError: a line is not JSON or lacks ``path``/``frames``.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"manifest not found: {path}")
    if split not in (None, "all", "train", "val"):
        raise ValueError(f"split must be 'train', 'val' or 'all', got {split!r}")
    records = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as err:
            raise ValueError(f"{path}:{number}: not a JSON line ({err})") from None
        if not isinstance(record, dict) or "path" not in record or "frames" not in record:
            raise ValueError(f"{path}:{number}: a manifest record needs at least 'path' and 'frames'")
        problem = _record_problem(record)
        if problem:
            raise ValueError(f"{path}:{number}: {problem}")
        for key in ("path", "sketch"):
            if record.get(key) and not os.path.isabs(record[key]):
                record[key] = str(path.parent / record[key])
        if split in (None, "all") or record.get("split") == split:
            records.append(record)
    return records


def _record_problem(record: dict[str, Any]) -> str | None:
    """Why a manifest record cannot be used as it stands (wrong types), or ``None``."""
    if not isinstance(record["path"], str) or not record["path"]:
        return f"'path' must be a file name, got {record['path']!r}"
    if record.get("sketch") is not None and not isinstance(record["sketch"], str):
        return f"'sketch' must be a file name, got {record['sketch']!r}"
    frames = record["frames"]
    if isinstance(frames, bool) or not isinstance(frames, int) or frames < 0:
        return f"'frames' must be a whole number >= 0, got {frames!r}"
    label = record.get("label")
    if label is not None and (isinstance(label, bool) or not isinstance(label, (str, int))):
        return f"'label' must be a class name (a string or a number) or null, got {type(label).__name__} {label!r}"
    return None


def write_manifest(path: str | os.PathLike, records: Iterable[dict[str, Any]]) -> Path:
    """Write records as JSON lines atomically (temp file, then rename): a crash never leaves half a manifest."""
    path = Path(path)
    with atomic_path(path) as tmp, open(tmp, "w", encoding="utf-8") as f:
        for record in records:
            f.write(json.dumps(record, ensure_ascii=False) + "\n")
    return path


def class_names(records: Sequence[dict[str, Any]]) -> list[str]:
    """Sorted class names of the records that have a label (labels are indices into this list)."""
    names = {r["label"] for r in records if r.get("label") is not None}
    if len({type(n) for n in names}) > 1:
        raise ValueError(f"labels mix names and numbers (e.g. {sorted(map(repr, names))[:4]}): use one kind")
    return sorted(names)


# --------------------------------------------------------------------------------------------------------------------
# Spatial preprocessing
# --------------------------------------------------------------------------------------------------------------------
def _size_hw(image_size: int | Sequence[int]) -> tuple[int, int]:
    if isinstance(image_size, int):
        return image_size, image_size
    h, w = image_size
    return int(h), int(w)


def resize_short_side(video: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Float ``(C, T, H, W)`` -> scaled (antialiased bilinear) so that it covers ``size`` = (h, w), aspect kept."""
    _, _, h, w = video.shape
    scale = max(size[0] / h, size[1] / w)
    new_h, new_w = max(size[0], round(h * scale)), max(size[1], round(w * scale))
    if (new_h, new_w) == (h, w):
        return video
    return F.interpolate(video, size=(new_h, new_w), mode="bilinear", antialias=True, align_corners=False)


def crop_offsets(height: int, width: int, size: tuple[int, int], rng: np.random.Generator | None) -> tuple[int, int]:
    """Top-left of a ``size`` crop: uniform random with ``rng``, centered without."""
    max_top, max_left = height - size[0], width - size[1]
    if rng is None:
        return max_top // 2, max_left // 2
    return int(rng.integers(0, max_top + 1)), int(rng.integers(0, max_left + 1))


def preprocess_frames(frames: torch.Tensor, size: tuple[int, int], rng: np.random.Generator | None,
                      hflip: bool) -> torch.Tensor:
    """uint8 ``(T, H, W, 3)`` -> float ``(3, T, h, w)`` in [-1, 1]: short-side resize, crop, optional flip."""
    video = resize_short_side(to_float(frames), size)  # (3, T, H', W')
    top, left = crop_offsets(video.shape[-2], video.shape[-1], size, rng)
    video = video[..., top:top + size[0], left:left + size[1]]
    if hflip:
        video = video.flip(-1)
    return video.clamp(-1, 1).contiguous()


def collate_skip_none(batch: list[dict | None]) -> dict | None:
    """``default_collate`` that drops ``None`` items (``ClipDataset(on_error="skip")``); ``None`` if all failed."""
    batch = [item for item in batch if item is not None]
    if not batch:
        return None
    return torch.utils.data.default_collate(batch)


# --------------------------------------------------------------------------------------------------------------------
# Clips decoded on the fly
# --------------------------------------------------------------------------------------------------------------------
class ClipDataset(Dataset):
    """Clips of ``num_frames`` frames from the videos of a manifest, as float ``(3, T, H, W)`` in [-1, 1].

    Item ``i`` is clip ``i % clips_per_video`` of video ``i // clips_per_video``:
    ``{"video": (3, T, H, W), "label": int (-1 if none), "index": i}`` (plus ``"sketch"``, aligned, with
    ``with_sketch=True``).

    Args:
        manifest: manifest path or already-read records (see :func:`read_manifest`).
        split: ``"train"``, ``"val"`` or ``"all"``.
        num_frames: frames per clip (T).
        image_size: output size, an int (square) or ``(H, W)``; the short side is resized to cover it, then cropped.
        frame_stride: take every ``frame_stride``-th source frame; ignored when ``target_fps`` is set.
        target_fps: resample to this frame rate (source step = fps / target_fps, may be fractional).
        random_start / random_crop: default to ``split == "train"``; otherwise clips are evenly spaced (centered for
            one clip per video) and crops centered.
        hflip: flip horizontally with probability 1/2 (train only makes sense).
        seed: base seed; the randomness of item ``i`` in epoch ``e`` is ``Generator([seed, e, i])``.
        clips_per_video: clips taken from each video per epoch.
        short_videos: ``"skip"`` drops videos with fewer frames than a clip needs (listed in ``self.skipped`` with
            the reason); ``"pad"`` keeps them and repeats their last frame.
        on_error: a file that fails to decode mid-training is counted in ``self.failures`` and replaced by another
            item chosen from ``Generator([seed, epoch, i, attempt])`` (``"substitute"``), or returns ``None``
            (``"skip"``, use :func:`collate_skip_none`), or raises (``"raise"``).
        with_sketch: also return the record's ``sketch`` video, read at the same frames with the same crop/flip.
        backend: decoder, see :func:`magvit.video_io.read_video`.
        uint8_output: return ``video``/``sketch`` as uint8 ``(T, H, W, 3)`` instead (used by clip extraction).
    """

    def __init__(
        self,
        manifest: str | os.PathLike | Sequence[dict[str, Any]],
        split: str = "train",
        num_frames: int = 16,
        image_size: int | Sequence[int] = 128,
        frame_stride: int = 1,
        target_fps: float | None = None,
        random_start: bool | None = None,
        random_crop: bool | None = None,
        hflip: bool = False,
        seed: int = 0,
        clips_per_video: int = 1,
        short_videos: str = "skip",
        on_error: str = "substitute",
        with_sketch: bool = False,
        backend: str = "auto",
        uint8_output: bool = False,
        max_attempts: int = 10,
    ):
        if num_frames < 1:
            raise ValueError(f"num_frames must be >= 1, got {num_frames}")
        if frame_stride < 1:
            raise ValueError(f"frame_stride must be >= 1, got {frame_stride}")
        if target_fps is not None and target_fps <= 0:
            raise ValueError(f"target_fps must be > 0, got {target_fps}")
        if clips_per_video < 1:
            raise ValueError(f"clips_per_video must be >= 1, got {clips_per_video}")
        if short_videos not in ("skip", "pad"):
            raise ValueError(f"short_videos must be 'skip' or 'pad', got {short_videos!r}")
        if on_error not in ("substitute", "skip", "raise"):
            raise ValueError(f"on_error must be 'substitute', 'skip' or 'raise', got {on_error!r}")
        if split not in ("train", "val", "all"):
            raise ValueError(f"split must be 'train', 'val' or 'all', got {split!r}")
        all_records = read_manifest(manifest) if isinstance(manifest, (str, os.PathLike)) else list(manifest)
        for number, record in enumerate(all_records, 1):
            problem = _record_problem(record) if "path" in record and "frames" in record else "no 'path'/'frames'"
            if problem:
                raise ValueError(f"manifest record {number}: {problem}")
        self.classes = class_names(all_records)  # over all splits: train and val share label ids
        records = [r for r in all_records if split == "all" or r.get("split") == split]
        self.split = split
        self.num_frames = num_frames
        self.size = _size_hw(image_size)
        self.frame_stride = frame_stride
        self.target_fps = target_fps
        self.random_start = split == "train" if random_start is None else random_start
        self.random_crop = split == "train" if random_crop is None else random_crop
        self.hflip = hflip
        self.seed = seed
        self.epoch = 0
        self.clips_per_video = clips_per_video
        self.short_videos = short_videos
        self.on_error = on_error
        self.with_sketch = with_sketch
        self.backend = backend
        self.uint8_output = uint8_output
        self.max_attempts = max_attempts
        self.failures: Counter[str] = Counter()  # path -> failed reads in this process
        self.failure_reasons: dict[str, str] = {}  # path -> why its last read failed
        self.skipped: list[tuple[str, str]] = []  # (path, reason) dropped at construction
        self.records = []
        for record in records:
            reason = self._unusable(record)
            if reason:
                self.skipped.append((record["path"], reason))
            else:
                self.records.append(record)
        missing = sum(reason == "no such file" for _, reason in self.skipped)
        if records and missing == len(records):
            raise ValueError(f"none of the {len(records)} '{split}' videos of the manifest exists, e.g. "
                             f"{records[0]['path']} (relative paths are relative to the manifest's folder)")
        if self.skipped:
            logger.warning("ClipDataset(%s): skipped %d of %d videos, e.g. %s: %s", split, len(self.skipped),
                           len(records), *self.skipped[0])
        self._class_index = {name: i for i, name in enumerate(self.classes)}

    # --- geometry of a clip -----------------------------------------------------------------------------------------
    def step(self, record: dict[str, Any]) -> float:
        """Source frames between two clip frames."""
        fps = float(record.get("fps") or 0.0)
        if self.target_fps is not None and fps > 0:
            return fps / self.target_fps
        return float(self.frame_stride)

    def span(self, record: dict[str, Any]) -> int:
        """Source frames one clip covers."""
        return int(math.floor((self.num_frames - 1) * self.step(record) + 0.5)) + 1

    def _unusable(self, record: dict[str, Any]) -> str | None:
        if not os.path.isfile(record["path"]):  # one stat per video at start, not a failure per read
            return "no such file"
        if self.with_sketch and not record.get("sketch"):
            return "no 'sketch' in the manifest record"
        frames = int(record.get("frames") or 0)
        if frames < 1:
            return "no frames"
        if self.short_videos == "skip" and frames < self.span(record):
            return f"{frames} frames, a clip needs {self.span(record)}"
        return None

    def __len__(self) -> int:
        return len(self.records) * self.clips_per_video

    def set_epoch(self, epoch: int) -> None:
        """Choose the epoch whose randomness items use (call before each epoch, like ``DistributedSampler``)."""
        self.epoch = int(epoch)

    def label(self, record: dict[str, Any]) -> int:
        name = record.get("label")
        return self._class_index[name] if name is not None else -1

    def clip_indices(self, record: dict[str, Any], clip: int, rng: np.random.Generator) -> list[int]:
        """Source frame numbers of clip number ``clip`` of a video."""
        frames, step, span = int(record["frames"]), self.step(record), self.span(record)
        max_start = max(0, frames - span)
        if self.random_start:
            start = int(rng.integers(0, max_start + 1))
        else:  # evenly spaced; one clip per video is centered
            start = int((clip + 0.5) * max_start / self.clips_per_video + 0.5) if max_start else 0
            start = min(start, max_start)
        idx = [start + int(math.floor(k * step + 0.5)) for k in range(self.num_frames)]
        return [min(i, frames - 1) for i in idx]  # short videos in "pad" mode repeat their last frame

    # --- items ------------------------------------------------------------------------------------------------------
    def load(self, index: int, epoch: int | None = None) -> dict[str, Any]:
        """Item ``index`` of ``epoch`` (default: the current one); raises ``VideoReadError`` if its file fails."""
        epoch = self.epoch if epoch is None else epoch
        record = self.records[index // self.clips_per_video]
        rng = np.random.default_rng([self.seed, epoch, index])
        indices = self.clip_indices(record, index % self.clips_per_video, rng)
        frames = self._read(record["path"], indices, int(record["frames"]))
        crop_rng = rng if self.random_crop else None
        flip = bool(self.hflip and rng.random() < 0.5)
        # the crop generator state is copied so the sketch gets exactly the same crop as the video
        state = crop_rng.bit_generator.state if crop_rng is not None else None
        item = {"video": self._prepare(frames, crop_rng, flip), "label": self.label(record), "index": index}
        if self.with_sketch:
            if crop_rng is not None:
                crop_rng.bit_generator.state = state
            sketch = self._read(record["sketch"], indices, int(record["frames"]))
            item["sketch"] = self._prepare(sketch, crop_rng, flip)
        return item

    def _read(self, path: str, indices: list[int], frames: int) -> torch.Tensor:
        """uint8 ``(T, H, W, 3)`` at ``indices``; ``VideoReadError`` when the file is shorter than the manifest says.

        A file re-encoded or truncated after indexing decodes fewer frames than its record promises: padding the
        clip with its last frame would train on a still image without a word, so it is a failure (counted in
        ``failures``, handled by ``on_error``) whose reason says to re-index.
        """
        try:
            got = read_video(path, indices=indices, backend=self.backend).frames
        except VideoReadError as err:
            if "out of range" not in err.reason:
                raise
            raise VideoReadError(path, f"shorter than the manifest says ({frames} frames): {err.reason}; the file "
                                       "changed after indexing, re-run data_prep.index") from None
        if len(got) != len(indices):  # a decoder that returns fewer frames than asked
            raise VideoReadError(path, f"the decoder returned {len(got)} of {len(indices)} frames (the manifest says "
                                       f"{frames}); re-run data_prep.index")
        return got

    def _prepare(self, frames: torch.Tensor, rng: np.random.Generator | None, flip: bool) -> torch.Tensor:
        video = preprocess_frames(frames, self.size, rng, flip)  # (3, T, h, w)
        if self.uint8_output:
            return ((video + 1) * 127.5).round().clamp(0, 255).to(torch.uint8).permute(1, 2, 3, 0).contiguous()
        return video

    def __getitem__(self, index: int) -> dict[str, Any] | None:
        if not 0 <= index < len(self):
            raise IndexError(f"index {index} out of range for {len(self)} clips")
        source = index
        for attempt in range(self.max_attempts):
            try:
                item = self.load(source)
                item["index"] = index  # the sampler's index, also for a substitute
                return item
            except (VideoReadError, OSError) as err:
                path = self.records[source // self.clips_per_video]["path"]
                self.failures[path] += 1
                self.failure_reasons[path] = err.reason if isinstance(err, VideoReadError) else str(err)
                logger.warning("skipping %s (%s)", path, err)
                if self.on_error == "raise":
                    raise
                if self.on_error == "skip":
                    return None
                rng = np.random.default_rng([self.seed, self.epoch, index, attempt + 1])
                source = int(rng.integers(0, len(self)))
        raise RuntimeError(f"{self.max_attempts} videos in a row failed to decode, last: {path}")

    @property
    def num_failures(self) -> int:
        """Failed reads in this process (each DataLoader worker counts its own)."""
        return sum(self.failures.values())


# --------------------------------------------------------------------------------------------------------------------
# Clips from pre-extracted shards (data_prep.extract)
# --------------------------------------------------------------------------------------------------------------------
def _read_meta(directory: Path, kind: str) -> dict[str, Any]:
    """The ``meta.json`` of a shard folder (``shard_meta.read_meta_json``), its shards listed and present."""
    if not (directory / META_NAME).is_file():
        raise FileNotFoundError(f"no {kind} shards at {directory} (missing meta.json; did the run finish?)")
    meta = read_meta_json(directory)
    shards = meta.get("shards")
    if not shards:
        raise ValueError(f"{directory / META_NAME}: no shards listed")
    missing = [s["file"] for s in shards if not (directory / s["file"]).is_file()]
    if missing:
        raise FileNotFoundError(f"{directory}: shard {missing[0]} listed in meta.json is missing")
    return meta


class ClipShardDataset(Dataset):
    """Clips pre-extracted by ``python -m data_prep.extract``: no video decoding on the hot path.

    Shards hold ``frames`` uint8 ``(N, T, H, W, 3)`` and ``labels`` ``(N,)``. Items match :class:`ClipDataset`:
    ``{"video": (3, T, h, w) float in [-1, 1], "label", "index"}``, with a crop of ``image_size`` (random for
    ``random_crop``, else centered) and optional flip, a pure function of ``(seed, epoch, index)``.
    """

    def __init__(self, directory: str | os.PathLike, image_size: int | Sequence[int] | None = None,
                 random_crop: bool = False, hflip: bool = False, seed: int = 0):
        self.directory = Path(directory)
        self.meta = _read_meta(self.directory, "clip")
        self.classes = list(self.meta.get("classes", []))
        stored = tuple(self.meta["size"])
        self.size = stored if image_size is None else _size_hw(image_size)
        if self.size[0] > stored[0] or self.size[1] > stored[1]:
            raise ValueError(f"image_size {self.size} is larger than the stored clips {stored}")
        self.random_crop, self.hflip, self.seed, self.epoch = random_crop, hflip, seed, 0
        counts = [int(s["num_examples"]) for s in self.meta["shards"]]
        self._starts = np.cumsum([0] + counts)
        self._handles: dict[int, Any] = {}
        self._pid = None

    def __len__(self) -> int:
        return int(self._starts[-1])

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def _shard(self, number: int):
        from safetensors import safe_open

        if self._pid != os.getpid():  # handles are per process (DataLoader workers fork)
            self._handles, self._pid = {}, os.getpid()
        if number not in self._handles:
            self._handles[number] = safe_open(str(self.directory / self.meta["shards"][number]["file"]), "pt")
        return self._handles[number]

    def __getitem__(self, index: int) -> dict[str, Any]:
        if not 0 <= index < len(self):
            raise IndexError(f"index {index} out of range for {len(self)} clips")
        number = int(np.searchsorted(self._starts, index, side="right") - 1)
        row = index - int(self._starts[number])
        shard = self._shard(number)
        frames = shard.get_slice("frames")[row:row + 1][0]  # (T, H, W, 3) uint8, only this row is read
        label = int(shard.get_slice("labels")[row:row + 1][0])
        rng = np.random.default_rng([self.seed, self.epoch, index])
        video = to_float(frames)
        top, left = crop_offsets(video.shape[-2], video.shape[-1], self.size, rng if self.random_crop else None)
        video = video[..., top:top + self.size[0], left:left + self.size[1]]
        if self.hflip and rng.random() < 0.5:
            video = video.flip(-1)
        return {"video": video.contiguous(), "label": label, "index": index}


# --------------------------------------------------------------------------------------------------------------------
# Token shards (data_prep.tokenize)
# --------------------------------------------------------------------------------------------------------------------
def check_label_range(labels: torch.Tensor, num_classes: int, where: str) -> None:
    """``ValueError`` naming ``where`` unless every class label is -1 (none) or one of meta.json's ``num_classes``
    classes: a foreign label would index past the class embeddings mid-training."""
    if labels.numel():
        low, high = int(labels.min()), int(labels.max())
        if low < -1 or high >= num_classes:
            raise ValueError(f"{where}: class labels in [{low}, {high}], outside the {num_classes} classes of "
                             f"meta.json (-1: none, else 0..{num_classes - 1})")


def check_code_range(tensors: dict[str, torch.Tensor], codebook_size: int, where: str) -> None:
    """``ValueError`` unless every token grid (``codes``, ``cond.<task>``, ``sketch_codes``) is an integer tensor with
    values in ``[0, codebook_size)``: a damaged shard or codes of another tokenizer fail here, not inside a step."""
    for key, tensor in tensors.items():
        if not (key in ("codes", "sketch_codes") or key.startswith(("cond.", TOP))):  # TOP: two grids' top grids
            continue
        if tensor.is_floating_point() or tensor.is_complex() or tensor.dtype == torch.bool:
            raise ValueError(f"{where}: '{key}' holds {tensor.dtype} values, token codes are integers")
        if tensor.numel():
            low, high = int(tensor.min()), int(tensor.max())
            if low < 0 or high >= codebook_size:
                raise ValueError(f"{where}: '{key}' holds codes in [{low}, {high}], outside the codebook "
                                 f"[0, {codebook_size}) of meta.json")


class TokenShardDataset(Dataset):
    """Token shards written by ``python -m data_prep.tokenize``, memory-mapped: nothing is held in RAM per rank.

    ``meta.json``: ``tokenizer`` (config), ``token_grid``, ``codebook_size``, ``classes``, ``condition_tasks``,
    ``num_examples``, ``shards`` (two code grids: ``top_grid``, and items also hold ``top.codes``, ``top.cond.<task>``
    ... ``(t, h/2, w/2)``, ``magvit.code_grids``). Items: ``{"codes": (t, h, w) long, "cond.<task>": (t, h, w) long ...,
    "sketch_codes": (t, h, w) long (when present), "label": int, "index": int}``; item ``i`` is row ``i`` of the
    shards in ``meta.json`` order. Each item reads its own rows through ``safetensors.safe_open`` (one handle per
    shard and process), so the resident memory does not grow with the data set.

    Validated at open (``ValueError`` with the reason): damaged shards, grids that disagree with ``token_grid`` or
    between shards, codes outside ``[0, codebook_size)`` (each shard is scanned once, one tensor at a time, and
    dropped again).
    """

    def __init__(self, directory: str | os.PathLike):
        self.directory = Path(directory)
        self.meta = TokenShardMeta.from_dict(_read_meta(self.directory, "token"), str(self.directory / META_NAME))
        self.classes = list(self.meta.classes)
        self.condition_tasks = list(self.meta.condition_tasks)
        self.token_grid, self.codebook_size, self.top_grid = self.meta.token_grid, self.meta.codebook_size, \
            self.meta.top_grid
        self._files = [str(self.directory / shard["file"]) for shard in self.meta.shards]
        self._layout: dict[str, tuple[str, tuple[int, ...]]] | None = None  # key -> (dtype, row shape)
        counts = [self._check_shard(path) for path in self._files]
        self._starts = np.cumsum([0] + counts)
        self._keys = [k for k in self._layout if k not in ("labels", "clip_index")]
        self._handles: dict[int, Any] = {}
        self._pid: int | None = None

    def _check_shard(self, path: str) -> int:
        """Rows of one shard after checking its header against the others and its codes against the codebook."""
        from safetensors import SafetensorError, safe_open

        try:
            with safe_open(path, "pt") as f:
                layout = {key: (str(f.get_slice(key).get_dtype()), tuple(f.get_slice(key).get_shape()))
                          for key in f.keys()}
                if "codes" not in layout:
                    raise ValueError(f"{path}: not a token shard (no 'codes')")
                rows = layout["codes"][1][0]
                for key, (_, shape) in layout.items():
                    if shape[0] != rows:
                        raise ValueError(f"{self.directory}: '{key}' has {shape[0]} rows, 'codes' has {rows}")
                if tuple(layout["codes"][1][1:]) != self.token_grid:
                    raise ValueError(f"{self.directory}: codes of shape {tuple(layout['codes'][1][1:])}, "
                                     f"meta.json says token_grid {self.token_grid}")
                rows_layout = {key: (dtype, shape[1:]) for key, (dtype, shape) in layout.items()}
                if self._layout is None:
                    self._layout = rows_layout
                elif rows_layout != self._layout:
                    raise ValueError(f"{self.directory}: shards do not fit together ({path} holds "
                                     f"{sorted(rows_layout.items())}, the first shard {sorted(self._layout.items())})")
                top_shape = tuple(layout.get(TOP + "codes", ("", (rows,)))[1][1:])  # two grids: the top grid's
                if self.top_grid is not None and top_shape != self.top_grid:
                    raise ValueError(f"{self.directory}: top.codes of shape {top_shape} in {path}, meta.json says "
                                     f"top_grid {self.top_grid}")
                for key in [k for k in layout if k in ("codes", "sketch_codes") or k.startswith(("cond.", TOP))]:
                    # one tensor at a time, dropped after the check: at most one grid of one shard is resident
                    check_code_range({key: f.get_tensor(key)}, self.codebook_size, str(self.directory))
                if "labels" in layout:
                    check_label_range(f.get_tensor("labels"), len(self.classes), path)
        except SafetensorError as err:  # truncated, overwritten, not safetensors at all
            raise ValueError(f"{path}: damaged token shard ({err}); re-run data_prep.tokenize") from None
        return int(rows)

    def __len__(self) -> int:
        return int(self._starts[-1])

    def _shard(self, number: int):
        from safetensors import safe_open

        if self._pid != os.getpid():  # handles are per process (DataLoader workers fork)
            self._handles, self._pid = {}, os.getpid()
        if number not in self._handles:
            self._handles[number] = safe_open(self._files[number], "pt")
        return self._handles[number]

    def __getitem__(self, index: int) -> dict[str, Any]:
        if not 0 <= index < len(self):
            raise IndexError(f"index {index} out of range for {len(self)} examples")
        number = int(np.searchsorted(self._starts, index, side="right") - 1)
        row = index - int(self._starts[number])
        shard = self._shard(number)
        item: dict[str, Any] = {key: shard.get_slice(key)[row:row + 1][0].long() for key in self._keys}
        item["label"] = int(shard.get_slice("labels")[row:row + 1][0]) if "labels" in self._layout else -1
        item["index"] = index
        return item

    @property
    def tensors(self) -> dict[str, torch.Tensor]:
        """All shards concatenated, ``{key: (N, ...)}``: loads everything into RAM (inspection and tests only)."""
        return {key: torch.cat([self._shard(n).get_tensor(key) for n in range(len(self._files))])
                for key in self._layout}

    def __getstate__(self) -> dict[str, Any]:  # open handles stay behind (spawned workers open their own)
        return {**self.__dict__, "_handles": {}, "_pid": None}
