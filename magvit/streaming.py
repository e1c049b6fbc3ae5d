"""Streaming shards: clips and tokens as webdataset tar files, read front to back from a disk or any fsspec URL.

A data set bigger than a disk (or than a node's page cache) is read as a stream of tar shards instead of by random
access. Each sample of a shard is one clip or one token grid, its tensors stored as ``.npy`` members::

    000000123.frames.npy       uint8 (T, H, W, 3)                    clips (data_prep.extract --format webdataset)
    000000123.codes.npy        int32 (t, h, w), plus cond.<task>.npy / sketch_codes.npy   tokens (data_prep.tokenize)
    000000123.cls              the label as text (-1: none)

The key is the clip index of the source, so a sample knows its place. ``meta.json`` beside the shards (the same
one a safetensors folder has) lists every shard with its ``num_examples``: knowing the counts up front is what
lets every rank take the same number of batches per epoch and lets a resumed run skip exactly what it consumed.

Order of one epoch (``seed``, ``epoch``; ``W`` ranks, ``L = max(1, num_workers)`` loader workers per rank): the
shard list is permuted by ``Generator([seed, epoch])``; rank ``r`` takes shards ``r, r + W, ...`` of it and its
worker ``w`` every ``L``-th of those; a worker streams its shards through a shuffling buffer drawn from
``Generator([seed, epoch, r, w])`` and cuts ``batch_size`` batches, every worker the same number (the fewest any
worker of any rank can fill); rank batch ``k`` is batch ``k // L`` of worker ``k % L``. That order depends on
``(seed, epoch, W, L, batch_size, shuffle_buffer)`` only, never on timing, so a resume at batch ``b`` skips each
worker's share of the first ``b`` batches (read, not decoded) and sees exactly the batches an uninterrupted run
would.
"""

from __future__ import annotations

import io
import json
import os
import posixpath
from typing import Any, Iterator, Sequence

import numpy as np
import torch
from torch.utils.data import IterableDataset, default_collate, get_worker_info

from .data import crop_offsets, _size_hw
from .video_io import to_float

TOKEN_KEYS = ("codes", "sketch_codes")  # plus every cond.<task>


# --------------------------------------------------------------------------------------------------------------------
# Samples <-> tar members
# --------------------------------------------------------------------------------------------------------------------
def encode_sample(key: int, tensors: dict[str, torch.Tensor], label: int) -> dict[str, Any]:
    """One webdataset sample: ``{"__key__": "000000123", "<name>.npy": bytes, ..., "cls": b"2"}``."""
    sample: dict[str, Any] = {"__key__": f"{int(key):09d}", "cls": str(int(label)).encode()}
    for name, tensor in tensors.items():
        buffer = io.BytesIO()
        np.save(buffer, tensor.numpy(), allow_pickle=False)
        sample[f"{name}.npy"] = buffer.getvalue()
    return sample


def decode_sample(sample: dict[str, Any]) -> dict[str, Any]:
    """Tensors of a sample read back (``{"<name>": tensor, "label": int, "index": int}``); never unpickles."""
    item: dict[str, Any] = {}
    for field, data in sample.items():
        if field.endswith(".npy"):
            item[field[:-4]] = torch.from_numpy(np.load(io.BytesIO(data), allow_pickle=False))
    item["label"] = int(sample["cls"])
    item["index"] = int(sample["__key__"])
    return item


def write_tar_shard(path: str | os.PathLike, samples: Sequence[dict[str, Any]]) -> None:
    """Write one tar shard atomically (temp file, then rename): a rerun never sees half a shard."""
    import webdataset as wds

    from .fileio import atomic_path

    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        writer = wds.TarWriter(f, encoder=False, mtime=0.0)  # fixed mtime: equal inputs give equal bytes
        for sample in samples:
            writer.write(sample)
        writer.close()


def iter_tar_samples(url: str) -> Iterator[dict[str, Any]]:
    """Raw samples (bytes per member) of one tar shard at a local path or any fsspec URL, in stored order."""
    import fsspec
    from webdataset.tariterators import group_by_keys, tar_file_expander

    with fsspec.open(url, "rb") as stream:
        yield from group_by_keys(tar_file_expander([{"url": url, "stream": stream}]))


def tar_rows(path: str | os.PathLike) -> int | None:
    """Samples in a finished local tar shard; ``None`` for a damaged one (truncated, not a tar): written again."""
    import tarfile

    try:
        size = os.path.getsize(path)
        with tarfile.open(path, "r") as tar:
            members = [member for member in tar.getmembers() if member.isreg()]
    except (tarfile.TarError, OSError, EOFError):
        return None
    # cut short: a member's data runs past the end, or the end-of-archive blocks (two zero blocks) are missing
    end = max((m.offset_data + -(-m.size // 512) * 512 for m in members), default=0)
    if not members or end + 1024 > size:
        return None
    with open(path, "rb") as f:
        f.seek(end)
        if f.read(1024).strip(b"\0"):
            return None
    return len({member.name.split(".", 1)[0] for member in members})


# --------------------------------------------------------------------------------------------------------------------
# Where the shards are
# --------------------------------------------------------------------------------------------------------------------
def resolve_shards(location: str) -> tuple[dict[str, Any], list[str], list[int]]:
    """``(meta, shard URLs, examples per shard)`` of a folder/URL holding ``meta.json``, or of a brace pattern of
    tar URLs (``s3://bucket/tok/shard-{00000..00099}.tar``) whose ``meta.json`` sits in the same folder.

    Raises:
        FileNotFoundError: no ``meta.json``. ValueError: a shard that ``meta.json`` does not list, or no shards.
    """
    import fsspec
    from braceexpand import braceexpand

    is_pattern = location.endswith(".tar") or "{" in location
    folder = posixpath.dirname(location) if is_pattern else location.rstrip("/")
    meta_url = f"{folder}/meta.json"
    try:
        with fsspec.open(meta_url, "r") as f:
            meta = json.load(f)
    except FileNotFoundError:
        raise FileNotFoundError(f"no streaming shards at {location} (missing {meta_url}; did the run finish?)") from None
    counts = {s["file"]: int(s["num_examples"]) for s in meta.get("shards", [])}
    names = [posixpath.basename(u) for u in braceexpand(location)] if is_pattern else list(counts)
    unknown = [name for name in names if name not in counts]
    if unknown:
        raise ValueError(f"{location}: shard {unknown[0]} is not listed in {meta_url}")
    if not names or not all(name.endswith(".tar") for name in names):
        raise ValueError(f"{location}: no webdataset (.tar) shards listed in {meta_url}")
    return meta, [f"{folder}/{name}" for name in names], [counts[name] for name in names]


# --------------------------------------------------------------------------------------------------------------------
# The stream
# --------------------------------------------------------------------------------------------------------------------
def shuffled(samples: Iterator[Any], size: int, rng: np.random.Generator) -> Iterator[Any]:
    """A shuffling buffer of ``size`` samples (0 or 1: stored order): each new sample takes the place of a random
    one, which is emitted; the rest are emitted in a random order at the end."""
    if size <= 1:
        yield from samples
        return
    buffer: list[Any] = []
    for sample in samples:
        if len(buffer) < size:
            buffer.append(sample)
            continue
        j = int(rng.integers(0, size))
        buffer[j], sample = sample, buffer[j]
        yield sample
    for j in rng.permutation(len(buffer)):
        yield buffer[j]


class ShardStream(IterableDataset):
    """This rank's resumable batches of a webdataset shard set, ``kind`` ``"clips"`` or ``"tokens"``.

    Yields collated batches (use ``DataLoader(stream, batch_size=None, num_workers=num_workers)``): tokens as
    :class:`magvit.data.TokenShardDataset` items (codes long), clips as :class:`magvit.data.ClipShardDataset`
    items (``video`` (3, T, h, w) float in [-1, 1], a crop of ``image_size`` random with ``random_crop`` and a flip
    with ``hflip``, drawn from ``Generator([seed, epoch, index])``). ``set_epoch(epoch, start_batch)`` chooses the
    epoch and how many of its batches this rank already consumed. The order is described in the module docstring.
    """

    def __init__(self, location: str, kind: str, batch_size: int, rank: int = 0, world_size: int = 1,
                 num_workers: int = 0, seed: int = 0, shuffle_buffer: int = 256,
                 image_size: int | Sequence[int] | None = None, random_crop: bool = False, hflip: bool = False):
        if kind not in ("clips", "tokens"):
            raise ValueError(f"kind must be 'clips' or 'tokens', got {kind!r}")
        if batch_size < 1 or shuffle_buffer < 0 or not 0 <= rank < world_size:
            raise ValueError(f"need batch_size >= 1, shuffle_buffer >= 0, 0 <= rank < world_size (got {batch_size}, "
                             f"{shuffle_buffer}, {rank}, {world_size})")
        self.meta, self.urls, self.counts = resolve_shards(location)
        self.kind, self.location, self.batch_size = kind, location, batch_size
        self.rank, self.world_size, self.workers = rank, world_size, max(1, num_workers)
        if len(self.urls) < world_size * self.workers:
            raise ValueError(f"{location}: {len(self.urls)} shards for {world_size} ranks x {self.workers} loader "
                             "workers; streaming splits by shard, so write more (smaller) shards or use fewer "
                             "data.num_workers")
        self.seed, self.shuffle_buffer = seed, shuffle_buffer
        self.classes = list(self.meta.get("classes", []))
        stored = self.meta.get("size")
        self.size = _size_hw(image_size) if image_size is not None else (tuple(stored) if stored else None)
        if kind == "clips" and stored and (self.size[0] > stored[0] or self.size[1] > stored[1]):
            raise ValueError(f"image_size {self.size} is larger than the stored clips {tuple(stored)}")
        self.random_crop, self.hflip = random_crop, hflip
        self.epoch, self.start_batch = 0, 0
        if self.batches_per_epoch < 1:
            raise ValueError(f"{location}: not a single batch of {batch_size} per loader worker of every rank "
                             f"({sum(self.counts)} examples in {len(self.urls)} shards for {world_size} ranks x "
                             f"{self.workers} workers)")

    def set_epoch(self, epoch: int, start_batch: int = 0) -> None:
        self.epoch, self.start_batch = int(epoch), int(start_batch)

    # --- the plan of an epoch ------------------------------------------------------------------------------------
    def _assignment(self, epoch: int) -> list[list[list[int]]]:
        """Shard numbers per ``[rank][worker]`` in ``epoch``."""
        order = np.random.default_rng([self.seed, epoch]).permutation(len(self.urls)).tolist()
        ranks = [order[r::self.world_size] for r in range(self.world_size)]
        return [[mine[w::self.workers] for w in range(self.workers)] for mine in ranks]

    def _worker_batches(self, epoch: int) -> int:
        """Batches every worker of every rank yields in ``epoch`` (the fewest any of them can fill)."""
        return min(sum(self.counts[s] for s in shards) // self.batch_size
                   for workers in self._assignment(epoch) for shards in workers)

    @property
    def num_examples(self) -> int:
        """Examples in all shards (of every rank)."""
        return sum(self.counts)

    @property
    def batches_per_epoch(self) -> int:
        """Batches this rank yields in the current epoch (equal on every rank)."""
        return self._worker_batches(self.epoch) * self.workers

    def __len__(self) -> int:
        return max(0, self.batches_per_epoch - self.start_batch)

    # --- items -----------------------------------------------------------------------------------------------------
    def _prepare(self, sample: dict[str, Any]) -> dict[str, Any]:
        item = decode_sample(sample)
        if self.kind == "tokens":
            return {key: (value.long() if isinstance(value, torch.Tensor) else value) for key, value in item.items()
                    if key not in ("labels", "clip_index")}
        rng = np.random.default_rng([self.seed, self.epoch, item["index"]])
        video = to_float(item.pop("frames"))  # (3, T, H, W)
        top, left = crop_offsets(video.shape[-2], video.shape[-1], self.size, rng if self.random_crop else None)
        video = video[..., top:top + self.size[0], left:left + self.size[1]]
        if self.hflip and rng.random() < 0.5:
            video = video.flip(-1)
        return {"video": video.contiguous(), "label": item["label"], "index": item["index"]}

    def worker_batches(self, worker: int, skip: int) -> Iterator[dict[str, Any]]:
        """Batches of this rank's ``worker`` in the current epoch, after its first ``skip`` (read, not decoded)."""
        shards = self._assignment(self.epoch)[self.rank][worker]
        rng = np.random.default_rng([self.seed, self.epoch, self.rank, worker])
        raw = (sample for s in shards for sample in iter_tar_samples(self.urls[s]))
        total = self._worker_batches(self.epoch) * self.batch_size
        batch: list[dict[str, Any]] = []
        for n, sample in enumerate(shuffled(raw, self.shuffle_buffer, rng)):
            if n >= total:
                return
            if n < skip * self.batch_size:
                continue
            batch.append(self._prepare(sample))
            if len(batch) == self.batch_size:
                yield default_collate(batch)
                batch = []

    def __iter__(self) -> Iterator[dict[str, Any]]:
        info = get_worker_info()
        if (info.num_workers if info else 1) != self.workers:
            raise RuntimeError(f"ShardStream planned for {self.workers} loader workers, the DataLoader has "
                               f"{info.num_workers if info else 0}")
        # the loader asks its workers in turn starting at 0; worker 0 plays the worker of batch start_batch
        worker = ((info.id if info else 0) + self.start_batch) % self.workers
        skip = max(0, -(-(self.start_batch - worker) // self.workers))  # its batches among the first start_batch
        return self.worker_batches(worker, skip)
