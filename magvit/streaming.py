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

Shards are untrusted until checked: before a stream is planned, every local shard is read header by header (tar
headers and each ``.npy`` header, no data) and compared with ``meta.json``: its sample count, the members of each
sample (the same fields in every sample, none outside a sample), dtypes (no object arrays; integer codes, uint8
frames) and shapes, and a complete archive (not cut short). A damaged shard is one :class:`ShardError` line naming
it, so an epoch is always a pass over the declared samples. Shards at a remote URL are checked as they stream (count,
fields, decoding), with the same errors.
"""

from __future__ import annotations

import io
import math
import os
import posixpath
import re
from typing import Any, Iterator, Sequence

import numpy as np
import torch
from torch.utils.data import IterableDataset, default_collate, get_worker_info

from .data import crop_offsets, _size_hw
from .shard_meta import meta_location, read_meta_json
from .video_io import to_float
from .fileio import atomic_path

TOKEN_KEYS = ("codes", "sketch_codes")  # plus every cond.<task>
# What every sample of a kind holds (its members' suffixes), and the numpy dtype kinds its arrays may have
REQUIRED_FIELDS = {"clips": ("frames.npy", "cls"), "tokens": ("codes.npy", "cls")}
ARRAY_KINDS = {"clips": "u", "tokens": "iu"}  # uint8 frames; int32 codes (any integer type decodes)
MAX_PATTERN_SHARDS = 1_000_000  # a brace pattern never names more (nor more than meta.json lists)


class ShardError(ValueError):
    """A webdataset shard that does not hold what its ``meta.json`` declares (one line, naming the shard)."""


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
# Checking a shard against meta.json (headers only)
# --------------------------------------------------------------------------------------------------------------------
def _npy_layout(f: Any, size: int, known: dict[bytes, tuple[np.dtype, tuple[int, ...], int]]
                ) -> tuple[np.dtype, tuple[int, ...]]:
    """dtype and shape of the ``.npy`` member of ``size`` bytes at ``f``'s position, from its header alone;
    ``ValueError`` for an object array (loading it would unpickle) or data that does not fill the shape the header
    announces. ``known`` caches parsed headers (every sample of a shard repeats them)."""
    head = f.read(min(size, 12))
    if len(head) < 10 or head[:6] != b"\x93NUMPY" or head[6] not in (1, 2):
        raise ValueError("not a .npy array (of format version 1 or 2)")
    start, length = (10, int.from_bytes(head[8:10], "little")) if head[6] == 1 else \
        (12, int.from_bytes(head[8:12], "little"))
    if start + length > min(size, 1 << 16):
        raise ValueError("its .npy header runs past the member (or past 64 KiB)")
    header = (head + f.read(max(0, start + length - len(head))))[:start + length]
    if header not in known:
        reader = np.lib.format.read_array_header_1_0 if head[6] == 1 else np.lib.format.read_array_header_2_0
        stream = io.BytesIO(header)
        np.lib.format.read_magic(stream)
        shape, _, dtype = reader(stream)
        known[header] = (dtype, tuple(shape), len(header))
    dtype, shape, offset = known[header]
    if dtype.hasobject:
        raise ValueError("an object array (loading it would unpickle)")
    if offset + math.prod(shape) * dtype.itemsize != size:
        raise ValueError(f"its {size} bytes do not hold the {dtype} array of shape {shape} it announces")
    return dtype, shape


def scan_tar_shard(path: str | os.PathLike) -> list[tuple[str, dict[str, Any]]]:
    """The samples of a local tar shard in stored order, read from the tar and ``.npy`` headers (no array data):
    ``[(key, {field: (dtype, shape) of a .npy member, or the text of a small one like cls})]``.

    Raises :class:`ShardError` naming the shard for a file that is not a tar, a member that belongs to no sample
    (a name other than ``KEY.FIELD`` with a numeric key, a link, a folder), a sample split in two, an object or
    damaged ``.npy``, and an archive cut short (inside a member, or before its end-of-archive blocks)."""
    import tarfile

    name = os.path.basename(path)
    samples: list[tuple[str, dict[str, Any]]] = []
    seen: set[str] = set()
    known: dict[bytes, Any] = {}
    try:
        size = os.path.getsize(path)
        end = 0
        with tarfile.open(path, "r:") as tar, open(path, "rb") as raw:
            for member in tar:  # headers only: tarfile seeks over the data
                key, dot, field = member.name.partition(".")
                field = field.lower()  # as webdataset's grouping reads it
                if not member.isreg() or "/" in member.name or not dot or not key.isdigit():
                    raise ShardError(f"{name}: member {member.name!r} belongs to no sample (expected KEY.FIELD "
                                     "files like 000000123.codes.npy)")
                if member.offset_data + member.size > size:
                    raise ShardError(f"{name}: cut short inside member {member.name} (an interrupted copy?)")
                if not samples or samples[-1][0] != key:
                    if key in seen:
                        raise ShardError(f"{name}: the members of sample {key} are not stored together")
                    seen.add(key)
                    samples.append((key, {}))
                fields = samples[-1][1]
                if field in fields:
                    raise ShardError(f"{name}: sample {key} holds {field} twice")
                raw.seek(member.offset_data)
                try:
                    fields[field] = _npy_layout(raw, member.size, known) if field.endswith(".npy") else \
                        raw.read(member.size).decode("ascii", "replace") if member.size <= 64 else None
                except ValueError as err:
                    raise ShardError(f"{name}: member {member.name}: {err}") from None
                end = max(end, member.offset_data + -(-member.size // 512) * 512)
            raw.seek(end)  # two zero blocks end an archive; a cut at a member boundary lacks them
            complete = end + 1024 <= size and not raw.read(1024).strip(b"\0")
    except (tarfile.TarError, EOFError) as err:
        raise ShardError(f"{name}: not a readable tar ({err})") from None
    if not complete:
        raise ShardError(f"{name}: cut short after {len(samples)} samples (no end-of-archive blocks; an "
                         "interrupted copy?)")
    return samples


def check_tar_shard(path: str | os.PathLike, declared: int, kind: str, meta: dict[str, Any],
                    expected: dict[str, Any] | None = None) -> dict[str, Any]:
    """Compare a local tar shard with what ``meta.json`` declares of it: ``declared`` samples, each with the same
    fields as ``expected`` (the first sample's of the first shard checked; ``None``: this shard's first), arrays of
    the kind's dtypes with one shape per field (token grids: ``token_grid`` / ``top_grid``), labels as integers.
    Returns the fields of a sample, ``{field: (dtype, shape) or None}``; raises :class:`ShardError`."""
    name = os.path.basename(path)
    samples = scan_tar_shard(path)
    if len(samples) != declared:
        raise ShardError(f"{name}: holds {len(samples)} samples, meta.json declares {declared}")
    if not samples:
        return expected or {}
    reference = expected if expected is not None else samples[0][1]
    missing = [field for field in REQUIRED_FIELDS[kind] if field not in reference]
    if missing:
        raise ShardError(f"{name}: its samples lack {missing[0]} ({kind} shards hold "
                         f"{', '.join(REQUIRED_FIELDS[kind])})")
    grids = {"": meta.get("token_grid"), "top.": meta.get("top_grid")} if kind == "tokens" else {}
    for key, fields in samples:
        if fields.keys() != reference.keys():
            odd = sorted(fields.keys() ^ reference.keys())[0]
            where = "lacks" if odd in reference else "has a member the others lack:"
            raise ShardError(f"{name}: sample {key} {where} {odd}")
        for field, layout in fields.items():
            if field == "cls":
                if layout is None or not re.fullmatch(r"\s*-?\d+\s*", layout):
                    raise ShardError(f"{name}: sample {key}: cls is not an integer label")
                if kind == "tokens":
                    _check_label(int(layout), meta, f"{name}: sample {key}")
            elif field.endswith(".npy"):
                dtype, shape = layout
                if dtype.kind not in ARRAY_KINDS[kind]:
                    raise ShardError(f"{name}: sample {key}: {field} holds {dtype}, {kind} shards hold "
                                     f"{'uint8 frames' if kind == 'clips' else 'integer codes'}")
                if shape != reference[field][1]:
                    raise ShardError(f"{name}: sample {key}: {field} has shape {shape}, the others "
                                     f"{reference[field][1]}")
                grid = grids.get("top." if field.startswith("top.") else "")
                if grid and shape != tuple(grid):
                    raise ShardError(f"{name}: sample {key}: {field} has shape {shape}, meta.json's grid is "
                                     f"{tuple(grid)}")
    return reference


def _check_label(label: int, meta: dict[str, Any], where: str) -> None:
    """:class:`ShardError` unless a token sample's label is -1 (none) or one of meta.json's classes."""
    num_classes = len(meta.get("classes") or [])
    if not -1 <= label < num_classes:
        raise ShardError(f"{where}: class label {label} outside the {num_classes} classes of meta.json (-1: none, "
                         f"else 0..{num_classes - 1})")


def _is_local(url: str) -> bool:
    return url.startswith("file://") or "://" not in url


def check_shards(urls: Sequence[str], counts: Sequence[int], kind: str, meta: dict[str, Any]) -> None:
    """:func:`check_tar_shard` on every local shard of ``urls`` (``counts``: what meta.json declares of each);
    remote shards are checked as they stream. Raises :class:`ShardError` for the first that does not fit."""
    expected = None
    for url, declared in zip(urls, counts):
        if _is_local(url):
            path = url[len("file://"):] if url.startswith("file://") else url
            try:
                expected = check_tar_shard(path, declared, kind, meta, expected)
            except FileNotFoundError:
                raise ShardError(f"{posixpath.basename(url)}: listed in meta.json, missing") from None


# --------------------------------------------------------------------------------------------------------------------
# Where the shards are
# --------------------------------------------------------------------------------------------------------------------
def pattern_size(pattern: str) -> int:
    """An upper bound on the names a brace pattern expands to (``{a..b}``, ``{a..b..step}``, ``{x,y,z}``, nested),
    computed without expanding it: the product of each group's alternatives."""
    total, stack = 1, []  # stack: per open group, [start index, top-level commas]
    for i, char in enumerate(pattern):
        if char == "{":
            stack.append([i, 0])
        elif char == "," and stack:
            stack[-1][1] += 1
        elif char == "}" and stack:
            start, commas = stack.pop()
            body = pattern[start + 1:i]
            span = re.fullmatch(r"(-?\d+)\.\.(-?\d+)(?:\.\.(-?\d+))?", body)
            letters = re.fullmatch(r"([A-Za-z])\.\.([A-Za-z])(?:\.\.(-?\d+))?", body)
            if span or letters:
                lo, hi = (int(span[1]), int(span[2])) if span else (ord(letters[1]), ord(letters[2]))
                step = abs(int((span or letters)[3] or 1)) or 1
                total *= abs(hi - lo) // step + 1
            else:
                total *= commas + 1
    return total


def resolve_shards(location: str) -> tuple[dict[str, Any], list[str], list[int]]:
    """``(meta, shard URLs, examples per shard)`` of a folder/URL holding ``meta.json``, or of a brace pattern of
    tar URLs (``s3://bucket/tok/shard-{00000..00099}.tar``) whose ``meta.json`` sits in the same folder.

    Raises:
        FileNotFoundError: no ``meta.json``. ValueError: a ``meta.json`` without a shard list, a shard that it does
        not list, no shards, or a brace pattern naming more shards than it lists (refused before expanding it).
    """
    from braceexpand import braceexpand  # imported where used: only brace patterns need it

    is_pattern = location.endswith(".tar") or "{" in location
    folder = posixpath.dirname(location) if is_pattern else location.rstrip("/")
    meta_url = meta_location(folder)
    try:
        meta = read_meta_json(folder)
    except FileNotFoundError:
        raise FileNotFoundError(f"no streaming shards at {location} (missing {meta_url}; did the run finish?)") from None
    try:
        counts = {str(s["file"]): int(s["num_examples"]) for s in meta.get("shards", [])}
    except (AttributeError, KeyError, TypeError, ValueError) as err:
        raise ValueError(f"{meta_url}: not a shard meta.json (its shards need file and num_examples; "
                         f"{type(err).__name__}: {err})") from None
    if is_pattern:  # sized before it is expanded: a typo like {00000..99999999} would take GBs
        names_at_most = pattern_size(location)
        if names_at_most > min(len(counts), MAX_PATTERN_SHARDS):
            raise ValueError(f"{location}: the brace pattern names up to {names_at_most} shards, more than the "
                             f"{len(counts)} that {meta_url} lists")
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
        check_shards(self.urls, self.counts, kind, self.meta)  # an epoch is a pass over the declared samples
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
        name = posixpath.basename(str(sample.get("__url__", self.location)))
        missing = [field for field in REQUIRED_FIELDS[self.kind] if field not in sample]
        if missing:  # a member outside any sample, or a sample cut short (remote shards are checked here)
            raise ShardError(f"{name}: sample {sample.get('__key__')!r} lacks {missing[0]}")
        try:
            item = decode_sample(sample)
        except ValueError as err:  # an object array, a damaged .npy, a label that is not a number
            raise ShardError(f"{name}: sample {sample.get('__key__')!r}: {err}") from None
        if self.kind == "tokens":  # a remote shard's labels are checked here, a local one's before training
            _check_label(int(item["label"]), self.meta, f"{name}: sample {sample.get('__key__')!r}")
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
        raw = (sample for s in shards for sample in self._counted_samples(s))
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

    def _counted_samples(self, shard: int) -> Iterator[dict[str, Any]]:
        """The raw samples of shard number ``shard``; :class:`ShardError` when it is unreadable or holds another
        count than meta.json declares (a shard changed since it was checked, or a remote one)."""
        url, count = self.urls[shard], 0
        try:
            for count, sample in enumerate(iter_tar_samples(url), 1):
                yield sample
        except Exception as err:  # a tar cut inside a member, a stream that broke off
            # webdataset appends the stream and URL to the arguments: the first one is the reason
            reason = err.args[0] if err.args and isinstance(err.args[0], str) else str(err)
            raise ShardError(f"{posixpath.basename(url)}: not a readable tar ({reason.split(' @ ')[0][:200]})") \
                from None
        if count != self.counts[shard]:
            raise ShardError(f"{posixpath.basename(url)}: holds {count} samples, meta.json declares "
                             f"{self.counts[shard]}")

    def __iter__(self) -> Iterator[dict[str, Any]]:
        info = get_worker_info()
        if (info.num_workers if info else 1) != self.workers:
            raise RuntimeError(f"ShardStream planned for {self.workers} loader workers, the DataLoader has "
                               f"{info.num_workers if info else 0}")
        # the loader asks its workers in turn starting at 0; worker 0 plays the worker of batch start_batch
        worker = ((info.id if info else 0) + self.start_batch) % self.workers
        skip = max(0, -(-(self.start_batch - worker) // self.workers))  # its batches among the first start_batch
        return self.worker_batches(worker, skip)
