"""Training pieces shared by ``launch/train_tokenizer.py`` and ``launch/train_transformer.py`` (no deepspeed here).

Typed training configs, the command line (``--config``, ``--run-dir``, ``--resume auto``, ``key.path=value``),
the warmup + cosine learning-rate schedule, weight-decay parameter groups, the EMA of weights, the metrics logger
(TensorBoard + ``metrics.jsonl``), run-directory set-up, the non-finite-loss guard, a resumable data order, and
the run bookkeeping both scripts share (``start_run``, ``resume_latest``, ``MetricsWindow``).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import logging
import math
import os
import platform
import shlex
import shutil
import sys
import time
from pathlib import Path
from typing import Any, Callable, Iterator, Literal, Mapping, Sequence

import torch
import yaml

from . import distributed as dist
from .cli import ArgumentParser, UsageError
from .config import Config, ConfigError, require_finite
from .losses import TokenizerLossConfig
from .masking import MaskingConfig

Precision = Literal["fp32", "bf16", "autocast-bf16"]


# --------------------------------------------------------------------------------------------------------------
# Configs
# --------------------------------------------------------------------------------------------------------------
@dataclasses.dataclass
class DataConfig(Config):
    """What is read and how much per rank. ``batch_size`` is the micro-batch of one rank."""

    manifest: str = "data/sample/manifest.jsonl"  # tokenizer: clip manifest (JSON lines)
    tokens: str = "data/sample/tokens"  # transformer: token shard directory
    num_frames: int = 16
    image_size: int = 64
    frame_stride: int = 1
    clips_per_video: int = 1  # clips drawn from each video per epoch (small data sets: > 1)
    hflip: bool = True
    batch_size: int = 2
    num_workers: int = 2
    val_clips: int = 4  # validation clips reconstructed / evaluated at each sample step
    # "files": the manifest (tokenizer) / token shard folder (transformer) above, random access; "webdataset":
    # stream the tar shards of `shards` (magvit.streaming.ShardStream)
    format: str = "files"
    shards: str = ""  # webdataset: folder or fsspec URL with meta.json, or a brace pattern of .tar shard URLs
    shuffle_buffer: int = 256  # webdataset: samples in each loader worker's shuffling buffer (0: stored order)

    def __post_init__(self):
        if min(self.batch_size, self.num_frames, self.image_size, self.frame_stride, self.clips_per_video) < 1:
            raise ValueError("data: batch_size, num_frames, image_size, frame_stride, clips_per_video must be >= 1")
        if self.num_workers < 0 or self.val_clips < 0 or self.shuffle_buffer < 0:
            raise ValueError("data: num_workers, val_clips and shuffle_buffer must be >= 0")
        if self.format not in ("files", "webdataset"):
            raise ValueError(f"data.format must be 'files' or 'webdataset', got {self.format!r}")
        if self.format == "webdataset" and not self.shards:
            raise ValueError("data.format 'webdataset' needs data.shards (a folder or URL with meta.json, or a "
                             "pattern like .../shard-{00000..00099}.tar)")


@dataclasses.dataclass
class OptimConfig(Config):
    """Adam(W). MAGVIT trains both networks with beta1 = 0, beta2 = 0.99."""

    lr: float = 1e-4
    beta1: float = 0.0
    beta2: float = 0.99
    eps: float = 1e-8
    weight_decay: float = 0.0  # decoupled (AdamW); never applied to norms, biases, embeddings
    grad_clip: float = 1.0  # global norm; 0 disables

    def __post_init__(self):
        require_finite(self, ("lr", "beta1", "beta2", "eps", "weight_decay", "grad_clip"))
        if self.lr <= 0 or not (0 <= self.beta1 < 1 and 0 <= self.beta2 < 1) or self.weight_decay < 0:
            raise ValueError("optim: need lr > 0, 0 <= beta1, beta2 < 1, weight_decay >= 0")
        if self.eps <= 0 or self.grad_clip < 0:
            raise ValueError("optim: need eps > 0 and grad_clip >= 0")


@dataclasses.dataclass
class TrainConfig(Config):
    """Length, schedule, precision and parallelism of a run."""

    max_steps: int = 1000  # optimizer steps
    warmup_steps: int = 100
    min_lr_ratio: float = 0.1  # cosine decays to lr * min_lr_ratio at max_steps
    grad_accum_steps: int = 1
    seed: int = 0  # rank r uses seed + r for its own randomness
    precision: Precision = "fp32"
    deepspeed_config: str = "configs/deepspeed/zero2.json"
    zero_stage: int | None = None  # overrides the stage of the DeepSpeed config when set
    ema_decay: float = 0.999
    ema_warmup: bool = True  # effective decay min(ema_decay, (1 + n) / (10 + n)) after n updates
    # that many non-finite losses, or optimizer steps DeepSpeed skipped for non-finite gradients, in a row stop the run
    max_nonfinite_steps: int = 20

    def __post_init__(self):
        require_finite(self, ("min_lr_ratio", "ema_decay"))
        if self.max_steps < 1 or self.warmup_steps < 0 or self.grad_accum_steps < 1 or self.max_nonfinite_steps < 1:
            raise ValueError("train: need max_steps >= 1, warmup_steps >= 0, grad_accum_steps >= 1, "
                             "max_nonfinite_steps >= 1")
        if not 0.0 <= self.min_lr_ratio <= 1.0 or not 0.0 <= self.ema_decay < 1.0:
            raise ValueError("train: need 0 <= min_lr_ratio <= 1 and 0 <= ema_decay < 1")
        if self.zero_stage not in (None, 0, 1, 2, 3):
            raise ValueError(f"train: zero_stage must be 0, 1, 2 or 3 (or null: the DeepSpeed config's), "
                             f"got {self.zero_stage}")


@dataclasses.dataclass
class LoggingConfig(Config):
    log_every: int = 10  # steps between metric lines
    sample_every: int = 500  # steps between validation reconstructions/metrics (0: only at the end)
    tensorboard: bool = True
    progress: bool = True  # tqdm bar on rank 0

    def __post_init__(self):
        if self.log_every < 1 or self.sample_every < 0:  # `step % 0` would stop the run at its first step
            raise ValueError("logging: need log_every >= 1 and sample_every >= 0")


@dataclasses.dataclass
class CheckpointConfig(Config):
    every: int = 1000  # steps between checkpoints (also written at the end and on preemption)
    keep_last: int = 3

    def __post_init__(self):
        if self.every < 1 or self.keep_last < 1:
            raise ValueError("checkpoint: every and keep_last must be >= 1")


@dataclasses.dataclass
class TokenizerTrainConfig(Config):
    """``configs/tokenizer/*.yaml``. ``model``/``discriminator``: a ``preset`` name plus field overrides."""

    model: dict[str, Any] = dataclasses.field(default_factory=lambda: {"preset": "tiny"})
    discriminator: dict[str, Any] = dataclasses.field(default_factory=lambda: {"preset": "tiny"})
    data: DataConfig = dataclasses.field(default_factory=DataConfig)
    optim: OptimConfig = dataclasses.field(default_factory=OptimConfig)
    disc_optim: OptimConfig = dataclasses.field(default_factory=OptimConfig)
    loss: TokenizerLossConfig = dataclasses.field(default_factory=TokenizerLossConfig)
    train: TrainConfig = dataclasses.field(default_factory=TrainConfig)
    logging: LoggingConfig = dataclasses.field(default_factory=LoggingConfig)
    checkpoint: CheckpointConfig = dataclasses.field(default_factory=CheckpointConfig)
    # Starting weights (step 0; a resume reads its checkpoint instead): a `save_pretrained` export to fine-tune
    # (names and shapes as `model`), or with `inflate: true` a 2D export (temporal_kernel_size=1) inflated into
    # `model` by central inflation. Empty: random initialisation. `model.init_from` / `model.inflate` are accepted
    # as the same keys (they describe where the model's weights come from) and moved here.
    init_from: str = ""
    inflate: bool = False

    def __post_init__(self):
        for key, default in (("init_from", ""), ("inflate", False)):
            if key in self.model:
                value = self.model.pop(key)
                if getattr(self, key) not in (default, value):
                    raise ValueError(f"{key} and model.{key} disagree ({getattr(self, key)!r} vs {value!r}): give one")
                setattr(self, key, value)
        if self.inflate and not self.init_from:
            raise ValueError("inflate: true needs init_from (the folder of a 2D tokenizer export)")


@dataclasses.dataclass
class TransformerTrainConfig(Config):
    """``configs/transformer/*.yaml``. ``model``: a ``preset`` plus overrides; its ``codebook_size``,
    ``token_grid`` and ``num_classes`` follow the token shards."""

    model: dict[str, Any] = dataclasses.field(default_factory=lambda: {"preset": "tiny"})
    masking: MaskingConfig = dataclasses.field(default_factory=MaskingConfig)
    data: DataConfig = dataclasses.field(default_factory=DataConfig)
    optim: OptimConfig = dataclasses.field(default_factory=lambda: OptimConfig(lr=1e-4, beta1=0.9, beta2=0.96,
                                                                             weight_decay=0.045))
    train: TrainConfig = dataclasses.field(default_factory=TrainConfig)
    logging: LoggingConfig = dataclasses.field(default_factory=LoggingConfig)
    checkpoint: CheckpointConfig = dataclasses.field(default_factory=CheckpointConfig)


def resolve_section(section: Mapping[str, Any], config_cls: type[Config], name: str) -> dict[str, Any]:
    """Expand ``{"preset": ..., overrides...}`` into the full field dict of ``config_cls`` (strict), so the run
    directory records every value and ``name.field=value`` overrides can address any field."""
    try:
        return config_cls.from_mapping(section).to_dict()
    except ConfigError as err:
        raise ConfigError(f"{name}: {err}") from None


# --------------------------------------------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------------------------------------------
def build_arg_parser(description: str, default_config: str) -> argparse.ArgumentParser:
    parser = ArgumentParser(description=description, formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--config", default=default_config, help="training YAML (model, data, optim, train, ...)")
    parser.add_argument("--deepspeed_config", "--deepspeed-config", dest="deepspeed_config", default=None,
                        help="DeepSpeed JSON (ZeRO stage and options); overrides train.deepspeed_config")
    parser.add_argument("--run-dir", "--run_dir", dest="run_dir", default=None,
                        help="where everything of the run goes (default: runs/<kind>/<config name>)")
    parser.add_argument("--resume", choices=["auto", "never"], default="auto",
                        help="'auto': continue from the latest complete checkpoint in the run dir, if any; 'never': "
                             "start at step 0, refused when the run dir already holds a run (see --overwrite)")
    parser.add_argument("--overwrite", action="store_true",
                        help="start over in a run dir that holds a run: first DELETE its previous run "
                             f"({', '.join(s + '/' for s in RUN_SUBDIRS)}, {', '.join(RUN_FILES)}); other files "
                             "stay. Implies a fresh start (no resume)")
    parser.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    parser.add_argument("overrides", nargs="*", metavar="key.path=value", help="config overrides")
    return parser


def parse_args(parser: argparse.ArgumentParser, argv: Sequence[str] | None) -> argparse.Namespace:
    args = parser.parse_intermixed_args(argv)
    for word in args.overrides:
        if "=" not in word or word.startswith("-"):
            raise UsageError(f"expected key.path=value, got '{word}'")
    return args


def load_train_config(config_cls: type[Config], path: str, overrides: Sequence[str],
                      sections: Mapping[str, type[Config]], deepspeed_config: str | None = None) -> Config:
    """Load the YAML, expand the model sections named in ``sections`` (preset + overrides -> full dict), apply
    ``key.path=value`` overrides and re-validate the model sections. ``<section>.preset=NAME`` switches the preset
    (the YAML's field overrides of that section still apply). Raises ``ConfigError``."""
    cfg = config_cls.from_yaml(path)
    presets = {}  # `model.preset=B` picks another preset before the section is expanded
    rest = []
    for word in overrides:
        key, _, value = word.partition("=")
        name = key[: -len(".preset")] if key.endswith(".preset") else None
        if name in sections:
            presets[name] = value
        else:
            rest.append(word)
    cfg = cfg.replace(**{name: resolve_section({**getattr(cfg, name), **({"preset": presets[name]} if name in presets
                                                                           else {})}, cls, name)
                         for name, cls in sections.items()})
    cfg = cfg.with_overrides(rest)
    for name, cls in sections.items():
        resolve_section(getattr(cfg, name), cls, name)  # strict check after overrides
    if deepspeed_config:
        cfg = cfg.with_overrides([f"train.deepspeed_config={deepspeed_config}"])
    return cfg


def parse_train_command(description: str, default_config: str, kind: str,
                        load_config: Callable[[str, Sequence[str], str | None], Config],
                        argv: Sequence[str] | None) -> tuple[argparse.Namespace, Config, dict[str, Any]]:
    """Parse a training command line, load its config with ``load_config(path, overrides, deepspeed_config)`` and
    the base DeepSpeed JSON. ``args.run_dir`` comes back as a ``Path`` (default ``runs/<kind>/<config stem>``).
    Raises ``UsageError`` / ``ConfigError``."""
    args = parse_args(build_arg_parser(description, default_config), argv)
    cfg = load_config(args.config, args.overrides, args.deepspeed_config)
    try:
        ds_base = dist.load_deepspeed_config(cfg.train.deepspeed_config)
    except ValueError as err:
        raise UsageError(str(err)) from None
    args.run_dir = Path(args.run_dir or Path("runs") / kind / Path(args.config).stem)
    return args, cfg, ds_base


# --------------------------------------------------------------------------------------------------------------
# Learning rate, weight decay, EMA
# --------------------------------------------------------------------------------------------------------------
def warmup_cosine(step: int, warmup_steps: int, max_steps: int, min_lr_ratio: float) -> float:
    """LR multiplier at optimizer step ``step`` (0-based): linear warmup from 1/warmup to 1 over ``warmup_steps``,
    then cosine decay from 1 to ``min_lr_ratio`` at ``max_steps`` (held there afterwards)."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    decay_steps = max(1, max_steps - warmup_steps)
    progress = min(1.0, (step - warmup_steps) / decay_steps)
    return min_lr_ratio + (1.0 - min_lr_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


class WarmupCosineSchedule(torch.optim.lr_scheduler.LRScheduler):
    """``warmup_cosine`` as a scheduler; its ``state_dict`` (step counter) travels with DeepSpeed checkpoints."""

    def __init__(self, optimizer: torch.optim.Optimizer, warmup_steps: int, max_steps: int,
                 min_lr_ratio: float = 0.0, last_epoch: int = -1):
        self.warmup_steps, self.max_steps, self.min_lr_ratio = warmup_steps, max_steps, min_lr_ratio
        super().__init__(optimizer, last_epoch)

    def get_lr(self) -> list[float]:
        factor = warmup_cosine(self.last_epoch, self.warmup_steps, self.max_steps, self.min_lr_ratio)
        return [base * factor for base in self.base_lrs]

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """The position (step counter, base LRs) comes from the checkpoint, the shape (warmup, end, floor) stays
        the one this schedule was built with from the config in force: a resumed run with a new
        ``train.max_steps`` decays to its new end instead of silently keeping the old one."""
        shape = (self.warmup_steps, self.max_steps, self.min_lr_ratio)
        super().load_state_dict(state_dict)
        self.warmup_steps, self.max_steps, self.min_lr_ratio = shape
        self.refresh()

    def refresh(self) -> None:
        """Set the optimizer's learning rates to the schedule's value at its current step (after a resume, as
        DeepSpeed may load the optimizer's param groups after the schedule)."""
        values = self.get_lr()
        for group, lr in zip(self.optimizer.param_groups, values):
            group["lr"] = lr
        self._last_lr = values


_NORM_TYPES = (torch.nn.LayerNorm, torch.nn.GroupNorm, torch.nn.modules.batchnorm._NormBase, torch.nn.RMSNorm)


def weight_decay_param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """Two AdamW groups: decay for weight matrices / conv kernels; none for biases, norm parameters, embeddings
    and codebooks (decaying them shrinks scales and token vectors towards zero for no regularisation gain)."""
    no_decay_ids: set[int] = set()
    for module_name, module in model.named_modules():
        for name, param in module.named_parameters(recurse=False):
            full = f"{module_name}.{name}" if module_name else name
            lowered = full.lower()
            if (isinstance(module, (torch.nn.Embedding, *_NORM_TYPES)) or param.ndim < 2 or name.endswith("bias")
                    or "embed" in lowered or "codebook" in lowered or "norm" in lowered):
                no_decay_ids.add(id(param))
    decay, no_decay, seen = [], [], set()
    for param in model.parameters():
        if not param.requires_grad or id(param) in seen:
            continue
        seen.add(id(param))
        (no_decay if id(param) in no_decay_ids else decay).append(param)
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return [g for g in groups if g["params"]]


def build_adam(model: torch.nn.Module, optim: OptimConfig) -> torch.optim.Optimizer:
    """torch AdamW (no JIT-built fused kernels) over the weight-decay groups."""
    return torch.optim.AdamW(weight_decay_param_groups(model, optim.weight_decay), lr=optim.lr,
                             betas=(optim.beta1, optim.beta2), eps=optim.eps)


class EMA:
    """Exponential moving average of a module's parameters, kept in fp32: ``shadow = d * shadow + (1 - d) * p``.

    With ``warmup`` the decay after ``n`` updates is ``min(decay, (1 + n) / (10 + n))``, so short runs are not
    dominated by the initial weights. The caller makes full parameters visible during ``update`` (ZeRO-3:
    ``distributed.gathered_parameters``).
    """

    def __init__(self, model: torch.nn.Module, decay: float, warmup: bool = False):
        if not 0.0 <= decay < 1.0:
            raise ValueError(f"EMA decay must be in [0, 1), got {decay}")
        self.decay = decay
        self.warmup = warmup
        self.num_updates = 0
        self.shadow: dict[str, torch.Tensor] = {
            name: p.detach().float().clone() for name, p in model.named_parameters()}

    def current_decay(self) -> float:
        if self.warmup:
            return min(self.decay, (1 + self.num_updates) / (10 + self.num_updates))
        return self.decay

    @torch.no_grad()
    def update(self, model: torch.nn.Module) -> None:
        decay = self.current_decay()
        for name, p in model.named_parameters():
            shadow = self.shadow[name]
            shadow.lerp_(p.detach().to(shadow.device, torch.float32), 1.0 - decay)
        self.num_updates += 1

    @torch.no_grad()
    def copy_to(self, model: torch.nn.Module) -> None:
        """Write the averaged weights into ``model`` (same architecture)."""
        for name, p in model.named_parameters():
            p.copy_(self.shadow[name].to(p.dtype))

    def state_dict(self) -> dict[str, Any]:
        return {"decay": self.decay, "num_updates": self.num_updates, "shadow": dict(self.shadow)}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        shadow = state["shadow"]
        if set(shadow) != set(self.shadow):
            missing, extra = set(self.shadow) - set(shadow), set(shadow) - set(self.shadow)
            raise ValueError(f"EMA state does not match the model (missing {sorted(missing)[:3]}, "
                             f"unexpected {sorted(extra)[:3]})")
        for name, value in shadow.items():
            if value.shape != self.shadow[name].shape:
                raise ValueError(f"EMA tensor {name}: shape {tuple(value.shape)} != {tuple(self.shadow[name].shape)}")
            self.shadow[name] = value.float().clone()
        self.decay = float(state.get("decay", self.decay))
        self.num_updates = int(state.get("num_updates", 0))


# --------------------------------------------------------------------------------------------------------------
# Non-finite losses
# --------------------------------------------------------------------------------------------------------------
class NonFiniteLossError(RuntimeError):
    pass


class NonFiniteGuard:
    """Decides, identically on every rank, whether a micro-batch's loss may be back-propagated, and counts the
    optimizer steps DeepSpeed skipped because the gradients were not finite (a finite loss can still overflow
    them, e.g. ``loss.recon_weight=3e38``: then no weight ever changes).

    ``check`` takes this rank's loss value and a ``reduce_max`` collective; if any rank saw a NaN/inf the step is
    skipped everywhere. ``check_step`` takes whether the engine applied its last optimizer step. Either kind of
    skip ``max_consecutive`` times in a row raises ``NonFiniteLossError``.
    """

    def __init__(self, max_consecutive: int):
        self.max_consecutive = max_consecutive
        self.consecutive = 0
        self.total_skipped = 0
        self.consecutive_skipped_steps = 0
        self.total_skipped_steps = 0

    def state_dict(self) -> dict[str, int]:
        """The totals a checkpoint keeps (the trainer state's ``nonfinite_skipped`` / ``skipped_steps``)."""
        return {"nonfinite_skipped": self.total_skipped, "skipped_steps": self.total_skipped_steps}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.total_skipped = int(state.get("nonfinite_skipped", 0))
        self.total_skipped_steps = int(state.get("skipped_steps", 0))

    def check_step(self, applied: bool, step: int, reduce_max: Callable[[float], float] = float) -> bool:
        """After an optimizer step: False (on every rank) when any rank's engine skipped the update."""
        skipped = reduce_max(0.0 if applied else 1.0) > 0.0
        if not skipped:
            self.consecutive_skipped_steps = 0
            return True
        self.consecutive_skipped_steps += 1
        self.total_skipped_steps += 1
        if self.consecutive_skipped_steps >= self.max_consecutive:
            raise NonFiniteLossError(
                f"{self.consecutive_skipped_steps} optimizer steps in a row skipped for non-finite gradients (last "
                f"at step {step}): the weights are not learning; stopping. Lower the loss weights or the learning "
                "rate, or resume from an earlier checkpoint.")
        return False

    def check(self, loss_value: float, step: int, reduce_max: Callable[[float], float] = float) -> bool:
        bad = reduce_max(0.0 if math.isfinite(loss_value) else 1.0) > 0.0
        if not bad:
            self.consecutive = 0
            return True
        self.consecutive += 1
        self.total_skipped += 1
        if self.consecutive >= self.max_consecutive:
            raise NonFiniteLossError(
                f"{self.consecutive} non-finite losses in a row (last at step {step}); stopping. "
                "Lower the learning rate, enable gradient clipping or resume from an earlier checkpoint.")
        return False


# --------------------------------------------------------------------------------------------------------------
# Data order that can resume mid-epoch
# --------------------------------------------------------------------------------------------------------------
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


# --------------------------------------------------------------------------------------------------------------
# Run directory and metrics
# --------------------------------------------------------------------------------------------------------------
RUN_SUBDIRS = ("checkpoints", "export", "samples", "tb", "logs")
RUN_FILES = ("metrics.jsonl", "config.yaml", "deepspeed_config.json", "command.txt", "version.txt")


def previous_run(run_dir: str | os.PathLike) -> str | None:
    """What shows that ``run_dir`` already holds a run (its ``config.yaml``, a checkpoint, logged metrics or an
    export), or None for a new or empty run dir."""
    run_dir = Path(run_dir)
    if (run_dir / "config.yaml").is_file():
        return "config.yaml"
    if (run_dir / "checkpoints").is_dir() and any((run_dir / "checkpoints").iterdir()):
        return "checkpoints/"
    if (run_dir / "metrics.jsonl").is_file() and (run_dir / "metrics.jsonl").stat().st_size > 0:
        return "metrics.jsonl"
    if (run_dir / "export" / "config.json").is_file():
        return "export/"
    return None


def clear_run_dir(run_dir: str | os.PathLike) -> None:
    """Delete the previous run of ``run_dir`` (``--overwrite``): the run folders and files the training scripts
    write (``RUN_SUBDIRS``, ``RUN_FILES``, an interrupted export's ``.export.*`` folders); nothing else. In a SLURM
    job the running job's own files in ``logs/`` (``*-<SLURM_JOB_ID>*``, open for its output) stay."""
    run_dir = Path(run_dir)
    job = os.environ.get("SLURM_JOB_ID")
    logs = [p for p in (run_dir / "logs").iterdir() if not (job and f"-{job}" in p.name)] \
        if (run_dir / "logs").is_dir() and not (run_dir / "logs").is_symlink() else []
    subs = [run_dir / sub for sub in RUN_SUBDIRS if sub != "logs" or (run_dir / sub).is_symlink()]
    for path in [*subs, *logs, *(run_dir / name for name in RUN_FILES), *run_dir.glob(".export.*")]:
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        elif path.exists() or path.is_symlink():
            path.unlink()


def rerun_problem(run_dir: Path, resume: bool, overwrite: bool) -> str | None:
    """The one-line refusal of a fresh start (no resume, no overwrite) in a run dir that already holds a run."""
    found = None if resume or overwrite else previous_run(run_dir)
    if found is None:
        return None
    return (f"{run_dir} already holds a run ({found}): pass --resume auto to continue it, --overwrite to delete it "
            "and start over, or another --run-dir")


def version_info() -> dict[str, str]:
    from . import __version__

    info = {"magvit": __version__, "torch": torch.__version__, "python": platform.python_version()}
    try:
        import deepspeed

        info["deepspeed"] = deepspeed.__version__
    except ImportError:
        pass
    return info


def setup_run_dir(run_dir: str | os.PathLike, config: Config, deepspeed_config: Mapping[str, Any] | None,
                  argv: Sequence[str]) -> Path:
    """Create the run layout and record the resolved config, DeepSpeed config, command line (appended, one line
    per launch) and package versions. Call on rank 0 only."""
    run_dir = Path(run_dir)
    for sub in RUN_SUBDIRS:
        (run_dir / sub).mkdir(parents=True, exist_ok=True)
        probe = run_dir / sub / f".write-test-{os.getpid()}"  # a read-only checkpoints/ fails now, not at step N
        probe.write_text("")
        probe.unlink()
    (run_dir / "config.yaml").write_text(yaml.safe_dump(config.to_dict(), sort_keys=False))
    if deepspeed_config is not None:
        (run_dir / "deepspeed_config.json").write_text(json.dumps(deepspeed_config, indent=2) + "\n")
    launcher = {k: os.environ[k] for k in ("WORLD_SIZE", "SLURM_JOB_ID") if k in os.environ}
    line = f"{time.strftime('%Y-%m-%dT%H:%M:%S')} {json.dumps(launcher)} {shlex.join([sys.executable, *argv])}\n"
    with open(run_dir / "command.txt", "a") as f:
        f.write(line)
    (run_dir / "version.txt").write_text("".join(f"{k} {v}\n" for k, v in version_info().items()))
    return run_dir


class MetricsLogger:
    """Scalars to ``RUN_DIR/metrics.jsonl`` (one JSON object per line, flushed) and TensorBoard ``RUN_DIR/tb``.
    Disabled (no-op) on ranks other than 0."""

    def __init__(self, run_dir: str | os.PathLike, enabled: bool = True, tensorboard: bool = True):
        self.enabled = enabled
        self._file = None
        self._tb = None
        if not enabled:
            return
        run_dir = Path(run_dir)
        self._file = open(run_dir / "metrics.jsonl", "a")
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self._tb = SummaryWriter(str(run_dir / "tb"))

    def log(self, step: int, metrics: Mapping[str, float], **extra: Any) -> None:
        if not self.enabled:
            return
        clean = {k: float(v) for k, v in metrics.items()}
        record = {"step": int(step), "time": round(time.time(), 3), **extra, **clean}
        self._file.write(json.dumps(record) + "\n")
        self._file.flush()
        if self._tb is not None:
            for key, value in clean.items():
                if math.isfinite(value):
                    self._tb.add_scalar(key, value, step)

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None
        if self._tb is not None:
            self._tb.close()
            self._tb = None


def read_metrics(path: str | os.PathLike) -> list[dict[str, Any]]:
    """All records of a ``metrics.jsonl`` (a torn last line from a killed run is ignored)."""
    records = []
    for line in Path(path).read_text().splitlines():
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return records


# --------------------------------------------------------------------------------------------------------------
# Run bookkeeping shared by the training scripts (each keeps its own loop and steps)
# --------------------------------------------------------------------------------------------------------------
@dataclasses.dataclass
class RunContext:
    """This process's place in the run, as :func:`start_run` set it up."""

    rank: int
    world_size: int
    device: torch.device
    ds_config: dict[str, Any]
    zero_stage: int
    preempt: dist.PreemptionHandler
    log: logging.Logger

    def checkpoint_if_preempted(self, step: int, last_saved: int, save: Callable[[int], None]) -> bool:
        """True when a preemption signal reached any rank (a collective: call it on every rank between optimizer
        steps); ``save(step)`` has then written the checkpoint unless ``last_saved == step``."""
        if not self.preempt.should_stop():
            return False
        self.log.warning("signal received: checkpointing at step %d and exiting with status %d", step,
                         dist.EXIT_CODE_PREEMPTED)
        if last_saved != step:
            save(step)
        return True

    def stop_for_nonfinite(self, err: NonFiniteLossError, step: int, guard: NonFiniteGuard,
                           metrics_log: "MetricsLogger") -> int:
        """Record why the run stops (``event: nonfinite_stop``) and return its exit status, 1."""
        metrics_log.log(step, guard.state_dict(), event="nonfinite_stop")
        self.log.error("%s", err)
        return 1

    def count_skipped_step(self, engine: Any, step: int, guard: NonFiniteGuard, metrics_log: "MetricsLogger") -> None:
        """At an optimizer-step boundary: log (``event: step_skipped``) when DeepSpeed skipped ``engine``'s update
        for non-finite gradients; ``guard`` raises ``NonFiniteLossError`` after too many in a row. A collective."""
        if guard.check_step(engine.was_step_applied(), step, dist.all_reduce_max):
            return
        metrics_log.log(step, guard.state_dict(), event="step_skipped")
        self.log.warning("optimizer step %d skipped by DeepSpeed: non-finite gradients (%d in a row)", step,
                         guard.consecutive_skipped_steps)

    def close(self, bar: Any, metrics_log: "MetricsLogger") -> None:
        """End of the loop, whatever ended it: close the progress bar and the metrics, restore the signals."""
        bar.close()
        self.preempt.uninstall()
        metrics_log.close()


def start_run(cfg: Config, ds_base: Mapping[str, Any], run_dir: Path, argv: Sequence[str],
              logger_name: str, resume: bool = False, overwrite: bool = False) -> RunContext:
    """Start the process group, turn SIGTERM/SIGUSR1 into "checkpoint and exit 3" from here on, resolve the
    DeepSpeed config (``cfg.data``, ``cfg.train``, ``cfg.optim.grad_clip``), check that a ``resume`` can honour
    ``cfg`` (:func:`resume_changes`), refuse a fresh start over a previous run unless ``overwrite``
    (:func:`rerun_problem`; ``overwrite`` deletes it, :func:`clear_run_dir`), set up ``run_dir`` (rank 0) and open
    this rank's logger (``run_dir/logs/rank<r>.log``). A refused resume or rerun or an unwritable run dir raises
    ``UsageError`` on every rank before ``config.yaml`` is written, so the run dir never records a value that is
    not in force."""
    env = dist.init_distributed()
    preempt = dist.PreemptionHandler().install()
    tc = cfg.train
    try:
        ds_config = dist.make_deepspeed_config(ds_base, micro_batch_size=cfg.data.batch_size,
                                               grad_accum_steps=tc.grad_accum_steps, grad_clip=cfg.optim.grad_clip,
                                               precision=tc.precision, zero_stage=tc.zero_stage,
                                               world_size=env.world_size)
    except ValueError as err:  # the same on every rank
        raise UsageError(f"{tc.deepspeed_config}: {err}") from None
    stage = ds_config["zero_optimization"]["stage"]
    problem = rerun_problem(run_dir, resume, overwrite)  # every rank looks before rank 0 writes anything
    if dist.all_reduce_max(1.0 if problem else 0.0) > 0:
        raise UsageError(problem or f"{run_dir} already holds a run (seen by another rank)")
    changes: list[str] = []
    if resume:
        problem, changes = resume_changes(cfg, run_dir / "checkpoints", env.world_size, stage)
    if problem is None and env.rank == 0:
        try:
            if overwrite:
                clear_run_dir(run_dir)
            setup_run_dir(run_dir, cfg, ds_config, argv)
        except OSError as err:
            problem = f"cannot write the run dir {run_dir}: {err}"
    if dist.all_reduce_max(1.0 if problem else 0.0) > 0:  # every rank stops with one line, none waits forever
        raise UsageError(problem or "rank 0 could not set up the run dir (see its error)")
    log = dist.rank_zero_logger(logger_name, env.rank, run_dir / "logs" / f"rank{env.rank}.log")
    for line in changes:
        log.info("resume: %s", line)
    return RunContext(env.rank, env.world_size, dist.device(), ds_config, stage, preempt, log)


# On resume these keys may differ from the checkpoint's config (they change how long the run goes and what it
# reports, not the state it continues from); every other key is fixed by the checkpoint.
RESUME_MAY_CHANGE = ("train.max_steps", "train.max_nonfinite_steps", "logging.", "checkpoint.", "data.num_workers",
                     "data.val_clips")


def _flatten(tree: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    out = {}
    for key, value in tree.items():
        if isinstance(value, Mapping) and value:
            out.update(_flatten(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def resume_changes(cfg: Config, checkpoints: Path, world_size: int, zero_stage: int) -> tuple[str | None, list[str]]:
    """Compare ``cfg`` with the config, world size and ZeRO stage of the latest checkpoint under ``checkpoints``.
    Returns ``(problem, changes)``: ``problem`` a one-line refusal (keys that cannot change on resume, another
    world size or stage, a damaged trainer state) or None; ``changes`` the allowed differences as
    ``"key: old -> new"`` (they are applied)."""
    from .checkpoint import CheckpointError, latest_checkpoint, read_trainer_state, world_size_mismatch

    latest = latest_checkpoint(checkpoints)
    if latest is None:
        return None, []
    try:
        state = read_trainer_state(latest)
    except CheckpointError as err:
        return str(err), []
    if state.get("world_size", world_size) != world_size:
        return world_size_mismatch(latest, state["world_size"], world_size), []
    if state.get("zero_stage", zero_stage) != zero_stage:
        return (f"{latest} was written with ZeRO-{state['zero_stage']}, this run uses ZeRO-{zero_stage}: resume "
                f"with train.zero_stage={state['zero_stage']} or start a new --run-dir"), []
    saved, now = _flatten(state.get("config") or {}), _flatten(cfg.to_dict())
    diffs = [(k, saved[k], now[k]) for k in sorted(now) if k in saved and saved[k] != now[k]]
    fixed = [d for d in diffs if not any(d[0] == m or (m.endswith(".") and d[0].startswith(m))
                                         for m in RESUME_MAY_CHANGE)]
    if fixed:
        listed = ", ".join(f"{k} ({old!r} -> {new!r})" for k, old, new in fixed[:4])
        more = f" and {len(fixed) - 4} more" if len(fixed) > 4 else ""
        return (f"cannot resume {latest} with changed {listed}{more}: only "
                f"{', '.join(m.rstrip('.') + ('.*' if m.endswith('.') else '') for m in RESUME_MAY_CHANGE)} may "
                "change on resume; undo the change or start a new --run-dir"), []
    if cfg.train.max_steps < state["step"]:
        return f"train.max_steps={cfg.train.max_steps} is below the step of {latest} ({state['step']})", []
    streamed = getattr(getattr(cfg, "data", None), "format", "files") == "webdataset"
    for key, old, new in diffs:  # a streaming run's batch order follows its loader workers (magvit.streaming)
        if streamed and key == "data.num_workers":
            return (f"cannot resume the streaming run of {latest} with changed data.num_workers ({old} -> {new}): "
                    "its batch order follows the loader workers; undo the change or start a new --run-dir"), []
    return None, [f"{k}: {old!r} -> {new!r}" for k, old, new in diffs]


def precision_context(precision: Precision, device: torch.device) -> contextlib.AbstractContextManager:
    """``torch.autocast`` for ``autocast-bf16``; DeepSpeed handles ``bf16`` (bf16 weights) itself."""
    if precision == "autocast-bf16":
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def make_batch_stream(dataset: Any, data: DataConfig, rank: int, world_size: int, seed: int,
                      device: torch.device) -> BatchStream:
    """This rank's endless, resumable micro-batches of ``dataset`` (``data.batch_size`` items, drop_last).
    A :class:`magvit.streaming.ShardStream` plans its own batches and position. Raises ``ValueError`` when the
    data set is smaller than one global batch."""
    from .streaming import ShardStream

    if isinstance(dataset, ShardStream):  # collated batches from the workers, already split by rank and worker
        # a generator of its own: the loader must not draw its worker seeds from the (checkpointed) global RNG
        return BatchStream(None, dataset, lambda s: torch.utils.data.DataLoader(
            s, batch_size=None, num_workers=data.num_workers, pin_memory=device.type == "cuda",
            generator=torch.Generator().manual_seed(seed + rank)))
    sampler = ResumableDistributedSampler(len(dataset), rank, world_size, data.batch_size, seed=seed)

    def make_loader(s: ResumableDistributedSampler) -> torch.utils.data.DataLoader:
        return torch.utils.data.DataLoader(dataset, batch_size=data.batch_size, sampler=s, drop_last=True,
                                           num_workers=data.num_workers, pin_memory=device.type == "cuda",
                                           generator=torch.Generator().manual_seed(seed + rank))

    return BatchStream(dataset, sampler, make_loader)


def resume_latest(ckpt: Any, engines: Mapping[str, Any], ema: EMA, stream: BatchStream, guard: NonFiniteGuard,
                  run: RunContext) -> dict[str, Any] | None:
    """Load the latest complete checkpoint of ``ckpt`` (a ``checkpoint.CheckpointManager``) into the engines and
    the EMA; restore the data position and the guard's counts. Returns its state (``state["step"]``: the step),
    or None when there is none. :func:`start_run` has already refused a checkpoint of another world size."""
    from .checkpoint import latest_checkpoint

    latest = latest_checkpoint(ckpt.root)
    if latest is None:
        run.log.info("no checkpoint in %s: starting fresh", ckpt.root)
        return None
    state = ckpt.load(latest, engines, ema)
    step = int(state["step"])
    stream.epoch, stream.batch = state["data"]["epoch"], state["data"]["batch"]
    guard.load_state_dict(state)
    for engine in engines.values():  # the schedule in force (a new train.max_steps moves its end)
        schedule = getattr(engine, "lr_scheduler", None)
        if isinstance(schedule, WarmupCosineSchedule):
            schedule.refresh()
    run.log.info("resumed from %s (step %d, epoch %d, batch %d)", latest, step, stream.epoch, stream.batch)
    return state


def progress_bar(max_steps: int, step: int, enabled: bool) -> Any:
    """The tqdm bar of optimizer steps (disabled: a no-op bar)."""
    from tqdm import tqdm

    return tqdm(total=max_steps, initial=step, disable=not enabled, unit="step", dynamic_ncols=True)


class MetricsWindow:
    """The metrics of the micro-steps since the last log line, and the optimizer steps and time they took.

    ``log`` writes the means over the window, averaged over ranks (a collective: every rank calls it at the same
    step), then ``extra`` (e.g. learning rates), the throughput ``rate_key`` (``items_per_step`` per optimizer
    step), ``perf/step_s``, ``epoch`` and the peak memory of the busiest and the idlest rank; shows ``loss_key``
    and the throughput (as ``rate_label``) on the progress bar, and starts a new window.
    """

    def __init__(self, metrics_log: MetricsLogger, bar: Any, items_per_step: int, rate_key: str, loss_key: str,
                 rate_label: str, clock: Callable[[], float] = time.perf_counter):
        self.metrics_log, self.bar, self.items_per_step = metrics_log, bar, items_per_step
        self.rate_key, self.loss_key, self.rate_label, self.clock = rate_key, loss_key, rate_label, clock
        self.values: dict[str, list[float]] = {}
        self.steps = 0
        self.start = clock()

    def add(self, metrics: Mapping[str, float]) -> None:
        """One micro-step's metrics."""
        for key, value in metrics.items():
            self.values.setdefault(key, []).append(value)

    def end_step(self) -> None:
        """An optimizer step is complete."""
        self.steps += 1
        self.bar.update(1)

    def log(self, step: int, extra: Mapping[str, float], epoch: int) -> dict[str, float]:
        keys = sorted(self.values)
        means = dict(zip(keys, dist.all_reduce_mean([sum(self.values[k]) / len(self.values[k]) for k in keys])))
        elapsed = self.clock() - self.start
        means.update({**extra, self.rate_key: self.items_per_step * self.steps / elapsed,
                      "perf/step_s": elapsed / self.steps, "epoch": epoch})
        peaks = dist.all_gather_scalar(dist.peak_memory_mb())
        means.update({"mem/peak_mb_max": max(peaks), "mem/peak_mb_min": min(peaks)})
        self.metrics_log.log(step, means)
        self.bar.set_postfix(**{"loss": f"{means.get(self.loss_key, math.nan):.4f}",
                                self.rate_label: f"{means[self.rate_key]:.1f}"})
        self.values, self.steps, self.start = {}, 0, self.clock()
        return means
