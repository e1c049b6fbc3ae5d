"""What a training run reads: the data section of a run config, and this rank's endless, resumable batches.

``DataConfig`` says where the data is and in which format: ``files`` (the tokenizer decodes the videos of
``manifest``; the transformer reads the token shard folder ``tokens``), ``safetensors`` (the folder ``shards``
written by ``data_prep.extract`` / ``data_prep.tokenize``, random access) or ``webdataset`` (tar shards at
``shards``, streamed by :class:`magvit.streaming.ShardStream`). :func:`clip_batches` and :func:`token_batches` open
it as a :class:`BatchStream`, whose position ``(epoch, batch)`` travels with every checkpoint so a resumed run
sees exactly the batches an uninterrupted one would. :func:`held_out_tokens` reads the few held-out token grids
(``val_tokens``) the transformer is scored on while it trains.
"""

from __future__ import annotations

import dataclasses
import signal
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping, Sequence

import torch

from .cli import UsageError
from .config import Config
from .data import ClipDataset, ClipShardDataset, TokenShardDataset
from .shard_meta import META_NAME, TokenShardMeta, read_meta_json
from .streaming import ShardStream, resolve_shards

FORMATS = ("files", "safetensors", "webdataset")


@dataclasses.dataclass
class DataConfig(Config):
    """What is read and how much per rank. ``batch_size`` is the micro-batch of one rank."""

    manifest: str = "data/sample/manifest.jsonl"  # tokenizer: clip manifest (JSON lines); also its validation clips
    tokens: str = "data/sample/tokens"  # transformer: token shard directory
    val_tokens: str = ""  # transformer: token shards of held-out clips, scored at each sample step (empty: none)
    num_frames: int = 16
    image_size: int = 64
    frame_stride: int = 1
    clips_per_video: int = 1  # clips drawn from each video per epoch (small data sets: > 1)
    hflip: bool = True
    batch_size: int = 2
    num_workers: int = 2
    val_clips: int = 4  # validation clips (tokenizer) / held-out token grids (transformer) of each sample step
    # "files": the manifest (tokenizer) / token shard folder `tokens` (transformer), random access; "safetensors":
    # the shard folder `shards` of data_prep.extract (clips) / data_prep.tokenize (tokens), random access;
    # "webdataset": stream the tar shards of `shards` (magvit.streaming.ShardStream)
    format: str = "files"
    shards: str = ""  # folder (webdataset: or fsspec URL) with meta.json, or a brace pattern of .tar shard URLs
    shuffle_buffer: int = 256  # webdataset: samples in each loader worker's shuffling buffer (0: stored order)

    def __post_init__(self):
        if min(self.batch_size, self.num_frames, self.image_size, self.frame_stride, self.clips_per_video) < 1:
            raise ValueError("data: batch_size, num_frames, image_size, frame_stride, clips_per_video must be >= 1")
        if self.num_workers < 0 or self.val_clips < 0 or self.shuffle_buffer < 0:
            raise ValueError("data: num_workers, val_clips and shuffle_buffer must be >= 0")
        if self.format not in FORMATS:
            raise ValueError(f"data.format must be one of {', '.join(repr(f) for f in FORMATS)}, got {self.format!r}")
        if self.format == "webdataset" and not self.shards:
            raise ValueError("data.format 'webdataset' needs data.shards (a folder or URL with meta.json, or a "
                             "pattern like .../shard-{00000..00099}.tar)")
        if self.format == "safetensors" and not self.shards:
            raise ValueError("data.format 'safetensors' needs data.shards (the --out folder of data_prep.extract "
                             "or data_prep.tokenize)")


class ResumableDistributedSampler(torch.utils.data.Sampler[int]):
    """Each rank's share of a per-epoch permutation of ``range(dataset_len)``, seeded by ``(seed, epoch)``;
    ``start_batch`` skips the batches already consumed this epoch (resume) without loading them.

    Every rank gets ``dataset_len // world_size`` indices (the remainder is dropped so ranks stay in step).
    """

    def __init__(self, dataset_len: int, rank: int, world_size: int, batch_size: int, seed: int = 0,
                 shuffle: bool = True):
        if dataset_len < world_size * batch_size:
            raise ValueError(f"dataset of {dataset_len} items is smaller than one global batch "
                             f"({world_size} ranks x {batch_size})")
        self.dataset_len, self.rank, self.world_size = dataset_len, rank, world_size
        self.batch_size, self.seed, self.shuffle = batch_size, seed, shuffle
        self.epoch = 0
        self.start_batch = 0

    def set_epoch(self, epoch: int, start_batch: int = 0) -> None:
        self.epoch, self.start_batch = epoch, start_batch

    @property
    def batches_per_epoch(self) -> int:
        return (self.dataset_len // self.world_size) // self.batch_size

    def _indices(self) -> list[int]:
        if self.shuffle:
            gen = torch.Generator().manual_seed(self.seed * 100003 + self.epoch)
            order = torch.randperm(self.dataset_len, generator=gen).tolist()
        else:
            order = list(range(self.dataset_len))
        per_rank = self.batches_per_epoch * self.batch_size
        mine = order[self.rank::self.world_size][:per_rank]
        return mine[self.start_batch * self.batch_size:]

    def __iter__(self) -> Iterator[int]:
        return iter(self._indices())

    def __len__(self) -> int:
        return max(0, (self.batches_per_epoch - self.start_batch) * self.batch_size)


class BatchStream:
    """Endless batches over epochs with a resumable position ``(epoch, batch)``: the number of micro-batches this
    rank consumed in the current epoch. ``make_loader(sampler)`` builds the DataLoader (drop_last batches)."""

    def __init__(self, dataset: Any, sampler: ResumableDistributedSampler,
                 make_loader: Callable[[ResumableDistributedSampler], Any], epoch: int = 0, batch: int = 0):
        if sampler.batches_per_epoch < 1:
            raise ValueError("not a single batch per epoch: lower data.batch_size or add data")
        self.dataset, self.sampler, self.make_loader = dataset, sampler, make_loader
        self.epoch, self.batch = epoch, batch
        self._iterator: Iterator | None = None

    def _start_epoch(self) -> None:
        self.sampler.set_epoch(self.epoch, self.batch)  # a streaming plan's batch count depends on the epoch
        if self.batch >= self.sampler.batches_per_epoch:
            self.epoch, self.batch = self.epoch + 1, 0
        self.sampler.set_epoch(self.epoch, self.batch)
        if hasattr(self.dataset, "set_epoch"):  # clip datasets draw crops from (seed, epoch, index)
            self.dataset.set_epoch(self.epoch)
        self._iterator = iter(self.make_loader(self.sampler))

    def __iter__(self) -> "BatchStream":
        return self

    def __next__(self) -> Any:
        if self._iterator is None:
            self._start_epoch()
        try:
            item = next(self._iterator)
        except StopIteration:
            self.epoch, self.batch = self.epoch + 1, 0
            self._start_epoch()
            item = next(self._iterator)
        self.batch += 1
        return item

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "batch": self.batch}

    def load_state_dict(self, state: Mapping[str, int]) -> None:
        """Continue at a checkpoint's position (before the first batch is drawn)."""
        self.epoch, self.batch = int(state["epoch"]), int(state["batch"])


def ignore_stop_signals(worker_id: int) -> None:
    """DataLoader ``worker_init_fn``: SIGTERM / SIGUSR1 leave a worker alone. SLURM (at a time limit or ``scancel``)
    and ``kill`` of a process group signal the workers too; a worker killed by it makes the rank's next batch raise,
    so the rank could not finish its step and checkpoint (``magvit.distributed.PreemptionHandler``). The rank owns
    its workers and ends them when it exits."""
    for sig in (signal.SIGTERM, signal.SIGUSR1):
        signal.signal(sig, signal.SIG_IGN)


def make_batch_stream(dataset: Any, data: DataConfig, rank: int, world_size: int, seed: int,
                      device: torch.device) -> BatchStream:
    """This rank's endless, resumable micro-batches of ``dataset`` (``data.batch_size`` items, drop_last).
    A :class:`magvit.streaming.ShardStream` plans its own batches and position. Raises ``ValueError`` when the
    data set is smaller than one global batch."""
    if isinstance(dataset, ShardStream):  # collated batches from the workers, already split by rank and worker
        # a generator of its own: the loader must not draw its worker seeds from the (checkpointed) global RNG
        return BatchStream(None, dataset, lambda s: torch.utils.data.DataLoader(
            s, batch_size=None, num_workers=data.num_workers, pin_memory=device.type == "cuda",
            generator=torch.Generator().manual_seed(seed + rank), worker_init_fn=ignore_stop_signals))
    sampler = ResumableDistributedSampler(len(dataset), rank, world_size, data.batch_size, seed=seed)

    def make_loader(s: ResumableDistributedSampler) -> torch.utils.data.DataLoader:
        return torch.utils.data.DataLoader(dataset, batch_size=data.batch_size, sampler=s, drop_last=True,
                                           num_workers=data.num_workers, pin_memory=device.type == "cuda",
                                           generator=torch.Generator().manual_seed(seed + rank),
                                           worker_init_fn=ignore_stop_signals)

    return BatchStream(dataset, sampler, make_loader)


@dataclasses.dataclass
class TrainData:
    """This rank's training batches and what the export's model card says about them."""

    stream: BatchStream
    source: str  # the manifest, token folder or shard location
    num_examples: int  # of every rank
    classes: list[str]  # class id -> name (empty: no labels)


def _open(dataset: Callable[[], Any], data: DataConfig, source: str, rank: int, world_size: int, seed: int,
          device: torch.device) -> TrainData:
    """Open ``dataset()`` as :class:`TrainData`; a damaged shard, a missing file or too few examples for one
    global batch is a one-line ``UsageError`` naming ``source``."""
    try:
        opened = dataset()
        stream = make_batch_stream(opened, data, rank, world_size, seed, device)
    except (ValueError, OSError) as err:
        raise UsageError(f"{source}: {' '.join(str(err).split())}") from None
    num_examples = opened.num_examples if isinstance(opened, ShardStream) else len(opened)
    return TrainData(stream, source, num_examples, list(getattr(opened, "classes", [])))


def clip_batches(data: DataConfig, rank: int, world_size: int, seed: int, device: torch.device) -> TrainData:
    """Training clips (``{"video": (B, 3, T, H, W), "label", "index"}``) with random crops and flips: decoded from
    the manifest's videos (``files``), or pre-extracted shards (``safetensors`` / ``webdataset``) of
    ``data.num_frames`` frames stored at ``data.image_size`` or larger."""
    def dataset() -> Any:
        if data.format == "files":
            return ClipDataset(data.manifest, "train", num_frames=data.num_frames, image_size=data.image_size,
                               frame_stride=data.frame_stride, hflip=data.hflip, seed=seed,
                               clips_per_video=data.clips_per_video)
        if data.format == "webdataset":
            clips = ShardStream(data.shards, "clips", data.batch_size, rank, world_size, data.num_workers, seed,
                                data.shuffle_buffer, image_size=data.image_size, random_crop=True, hflip=data.hflip)
        else:
            clips = ClipShardDataset(data.shards, image_size=data.image_size, random_crop=True, hflip=data.hflip,
                                     seed=seed)
            if clips.meta.get("storage", "safetensors") != "safetensors":
                raise ValueError(f"holds {clips.meta['storage']} shards: set data.format={clips.meta['storage']}")
        if int(clips.meta.get("num_frames", data.num_frames)) != data.num_frames:
            raise ValueError(f"clips of {clips.meta['num_frames']} frames, data.num_frames is {data.num_frames}")
        return clips

    source = data.manifest if data.format == "files" else data.shards
    return _open(dataset, data, source, rank, world_size, seed, device)


def token_batches(data: DataConfig, rank: int, world_size: int, seed: int, device: torch.device) -> TrainData:
    """Training token grids (``{"codes": (B, t, h, w), "cond.<task>"..., "label"}``) of ``data_prep.tokenize``: the
    folder ``tokens`` (``files``) or ``shards`` (``safetensors``), or streamed tar shards (``webdataset``)."""
    def dataset() -> Any:
        if data.format == "webdataset":  # streamed: split by shard across ranks and loader workers
            return ShardStream(data.shards, "tokens", data.batch_size, rank, world_size, data.num_workers, seed,
                               data.shuffle_buffer)
        return TokenShardDataset(token_folder(data))

    source = data.tokens if data.format == "files" else data.shards
    return _open(dataset, data, source, rank, world_size, seed, device)


def token_folder(data: DataConfig) -> str:
    """The folder of the token shards of a random-access format (``files``: ``tokens``; ``safetensors``: ``shards``)."""
    return data.tokens if data.format == "files" else data.shards


def token_meta(data: DataConfig) -> TokenShardMeta:
    """The training token shards' ``meta.json`` (:class:`magvit.shard_meta.TokenShardMeta`). Read before any process
    group exists; ``UsageError`` when it is missing or is not one of token shards."""
    if data.format == "webdataset":  # meta.json beside the tar shards, wherever they are
        where = data.shards
        try:
            meta = resolve_shards(data.shards)[0]
        except (OSError, ValueError) as err:
            raise UsageError(f"data.shards: {err}") from None
    else:
        path = Path(token_folder(data)) / META_NAME
        where = str(path)
        if not path.is_file():
            raise UsageError(f"token shards not found: {path} (make them with `python -m data_prep.tokenize`, "
                             f"or set data.{'tokens' if data.format == 'files' else 'shards'}=DIR)")
        try:
            meta = read_meta_json(token_folder(data))
        except (OSError, ValueError) as err:
            raise UsageError(str(err)) from None
    try:
        return TokenShardMeta.from_dict(meta, where)
    except ValueError as err:
        raise UsageError(str(err)) from None


def token_sizes(data: DataConfig) -> dict[str, Any]:
    """``codebook_size``, ``token_grid``, ``num_classes``, ``cond_frames`` (frame prediction's given-frame counts)
    and ``top_grid`` (two code grids; else None) of the token shards (``TokenShardMeta.sizes``): what they fix for a
    model trained on them; ``UsageError`` as :func:`token_meta`."""
    return token_meta(data).sizes()


def held_out_tokens(data: DataConfig, classes: Sequence[str]) -> tuple[dict[str, Any], TokenShardMeta] | None:
    """The first ``data.val_clips`` token grids of ``data.val_tokens``, collated (``{"codes": (V, t, h, w),
    "cond.<task>"..., "label": (V,), "index": (V,)}``), and their ``meta.json``; None when there are none to read.
    Labels are mapped by name to the training shards' class ids ``classes`` (-1 for a class they lack). Read
    without a DataLoader: its worker seed would be drawn from the (checkpointed) global RNG. ``UsageError`` when
    the folder holds no token shards or codes of another codebook or grid than the training shards'."""
    if not data.val_tokens or data.val_clips == 0:
        return None
    try:
        dataset = TokenShardDataset(data.val_tokens)
    except (OSError, ValueError, KeyError) as err:
        raise UsageError(f"data.val_tokens: {' '.join(str(err).split())}") from None
    train = token_meta(data)
    problem = dataset.meta.fit_problem(train.codebook_size, train.token_grid, train.top_grid, "the training data")
    if problem:
        raise UsageError(f"data.val_tokens: {data.val_tokens} holds {problem}: tokenize both with the same tokenizer")
    if len(dataset) == 0:
        raise UsageError(f"data.val_tokens: no token grid in {data.val_tokens}")
    batch = torch.utils.data.default_collate([dataset[i] for i in range(min(data.val_clips, len(dataset)))])
    # held-out class id -> training class id; the extra last entry maps the unlabelled -1 to -1
    to_train = torch.tensor([list(classes).index(n) if n in classes else -1 for n in dataset.classes] + [-1])
    batch["label"] = to_train[batch["label"]]
    return batch, dataset.meta
