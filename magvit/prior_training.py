"""What the priors' trainers share (``magvit.launch.train_transformer``, ``magvit.launch.train_autoregressive``):
the skeleton both commands run (:class:`PriorCommand`: the command line and config, the checks before a run dir is
written, :func:`start_prior_run`: the run, the network with its EMA and engine, the rank's token batches and the
training loop), the model's sizes from the token shards, and the autoregressive prior's training sequences (the
masked transformer's task and condition draws, every video code visible). A command keeps what differs: its micro-step
and, for the masked transformer, the held-out validation.
"""

from __future__ import annotations

import dataclasses
import sys
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import torch

from . import distributed as dist
from .autoregressive import AutoregressiveObjectiveConfig
from .batches import TrainData, token_batches, token_meta
from .checkpoint import seed_everything
from .cli import UsageError
from .config import Config, ConfigError
from .ema import EMA
from .masking import MaskingConfig, make_training_batch
from .optim import WarmupCosineSchedule, build_adam
from .precision import autocast as precision_autocast
from .resume import RunContext, start_run
from .run_config import load_train_config, parse_train_command
from .sequence import IGNORE_INDEX, TokenVocabulary
from .trainloop import Reporting, TrainLoop


# --- the skeleton of a prior's trainer -----------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class PriorCommand:
    """What tells one prior's trainer from the other's; the rest (:meth:`main`, :func:`start_prior_run`) is shared."""

    description: str  # the command's one line (its module docstring's first line)
    kind: str  # the default run dir's folder, runs/<kind>/<config name>
    default_config: str
    config_class: type[Config]  # the run config (TransformerTrainConfig, AutoregressiveTrainConfig)
    network: Callable[[Any], torch.nn.Module]  # the exported network's class, built from ``cfg.model``
    tasks_key: str  # the run config's key of the trained tasks: "masking.tasks" | "objective.tasks"
    logger_name: str  # the run's logger (logs/rank<r>.log)
    reporting: Reporting

    def trained_tasks(self, cfg: Any) -> Sequence[str] | None:
        section, field = self.tasks_key.split(".")
        return getattr(getattr(cfg, section), field)

    def load_config(self, config_path: str, overrides: Sequence[str], deepspeed_config: str | None = None) -> Any:
        """The training config (YAML + overrides), strictly checked; the model's data-dependent sizes are filled
        in later by :func:`with_token_sizes`."""
        cfg = load_train_config(self.config_class, config_path, overrides, deepspeed_config)
        check_trained_tasks(self.tasks_key, self.trained_tasks(cfg), cfg.model.tasks)  # the rest: the config's own
        return cfg

    def main(self, train: Callable[..., int], argv: Sequence[str] | None = None) -> int:
        """Parse the command line, load and check the config (the shards' sizes, the trained tasks they carry, the
        network buildable) before any run dir is written, then ``train(cfg, ds_base, run_dir, resume, argv,
        overwrite)``."""
        args, cfg, ds_base = parse_train_command(self.description, self.default_config, self.kind, self.load_config,
                                                 argv)
        cfg = with_token_sizes(cfg)
        check_carried_tasks(self.tasks_key, self.trained_tasks(cfg), cfg)
        check_network(self.network, cfg.model)
        return train(cfg, ds_base, args.run_dir, resume=args.resume == "auto" and not args.overwrite,
                     argv=sys.argv if argv is None else argv, overwrite=args.overwrite)


@dataclasses.dataclass
class PriorRun:
    """A started prior's run: this rank's context, the network's EMA and DeepSpeed engine, the autocast of the
    resolved precision and the rank's token batches."""

    command: PriorCommand
    cfg: Any
    run_dir: Path
    context: RunContext
    ema: EMA
    engine: Any
    autocast: Any
    data: TrainData

    def on_device(self, batch: Mapping[str, Any]) -> dict[str, Any]:
        device = self.context.device
        return {k: v.to(device, non_blocking=True) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}

    def loop(self, records: Mapping[str, Any] | None = None) -> TrainLoop:
        """The training loop, whose exports hold the shards' class names and ``records`` (the network's
        ``PretrainedMixin.records``, e.g. the masked transformer's ``training_masking``)."""
        def export_model() -> torch.nn.Module:  # (the loop keeps the training RNG where it was)
            plain = self.command.network(self.cfg.model)
            plain.class_names = list(self.data.classes)  # class id -> name, from the shards' meta.json
            for key, value in (records or {}).items():
                setattr(plain, key, value)
            return plain

        return TrainLoop(self.context, self.cfg, self.run_dir, {"transformer": self.engine}, self.ema, self.data,
                         export_model, self.command.reporting)


def start_prior_run(command: PriorCommand, cfg: Any, ds_base: Mapping[str, Any], run_dir: Path, resume: bool,
                    argv: Sequence[str], overwrite: bool = False) -> PriorRun:
    """Start the run (``resume.start_run``: from here on SIGTERM/SIGUSR1 mean "checkpoint and exit 3"), build the
    network, its EMA and engine (:func:`build_prior`) and open this rank's token batches. The order is the one
    exact resume replays: keep it."""
    run = start_run(cfg, ds_base, run_dir, argv, command.logger_name, resume=resume, overwrite=overwrite)
    ema, engine = build_prior(command.network, cfg, run)
    autocast = precision_autocast(cfg.train.precision, run.device)
    data = token_batches(cfg.data, run.rank, run.world_size, cfg.train.seed, run.device)
    return PriorRun(command, cfg, Path(run_dir), run, ema, engine, autocast, data)


# --- the checks and the build --------------------------------------------------------------------------------------


def with_token_sizes(cfg: Any) -> Any:
    """``cfg`` with ``model.codebook_size`` / ``token_grid`` / ``num_classes`` (and, for a model that records them,
    ``cond_frames`` and ``top_grid``) from the token shards' ``meta.json`` (``TokenShardMeta.sizes``)."""
    fields = {f.name for f in dataclasses.fields(cfg.model)}
    sizes = token_meta(cfg.data).sizes()
    try:
        return cfg.replace(model=cfg.model.replace(**{k: v for k, v in sizes.items() if k in fields}))
    except ConfigError as err:
        raise ConfigError(f"model (with the token shards' sizes): {err}") from None


def check_trained_tasks(key: str, tasks: Sequence[str] | None, model_tasks: Sequence[str]) -> None:
    """``ConfigError`` when the trained ``tasks`` (the config's ``key``; None: all) name a task the model has no
    task token for (its ``model.tasks``), which the first step would find."""
    foreign = [name for name in tasks or [] if name not in model_tasks]
    if foreign:
        raise ConfigError(f"{key}: {foreign[0]!r} is not one of the model's tasks (model.tasks: "
                          f"{', '.join(model_tasks)})")


def check_carried_tasks(key: str, tasks: Sequence[str] | None, cfg: Any) -> None:
    """``UsageError`` when the trained ``tasks`` (the config's ``key``; None: what the shards carry) name a task
    whose condition codes the token shards do not hold (their ``meta.json``), which the first step would find."""
    meta = token_meta(cfg.data)
    missing = [name for name in tasks or [] if not meta.carries(name)]
    if missing:
        where = cfg.data.shards if cfg.data.format != "files" else cfg.data.tokens
        held = [name for name in cfg.model.tasks if meta.carries(name)]
        raise UsageError(f"{key}: the token shards {where} hold no condition codes of {missing[0]!r} (they carry "
                         f"{', '.join(held) or 'none of the model tasks'}); tokenize with that task, or train others")


def check_network(network: Callable[[Any], torch.nn.Module], model_cfg: Any) -> None:
    """Build ``network(model_cfg)`` on the meta device (shapes only: no memory, no RNG draw) so that a value only
    transformers checks when the network is built (``model.hidden_act``, ``model.attn_implementation``: an unknown
    name, a kernel that is not installed) is one ``UsageError`` before the run dir is written."""
    from transformers.activations import ACT2CLS  # heavy: imported only when a trainer starts

    if model_cfg.hidden_act not in ACT2CLS:  # transformers' own KeyError names nothing but the value
        raise UsageError(f"model.hidden_act: {model_cfg.hidden_act!r} is not an activation transformers knows; one "
                         f"of {', '.join(sorted(ACT2CLS))}")
    try:
        with torch.device("meta"):
            network(model_cfg)
    except (ImportError, ValueError, KeyError, TypeError, RuntimeError) as err:
        reason = " ".join(str(err).split())
        raise UsageError(f"model: {network.__name__} cannot be built with this config ({type(err).__name__}: "
                         f"{reason[:400]})") from None


def build_prior(network: Callable[[Any], torch.nn.Module], cfg: Any, run: Any) -> tuple[EMA, Any]:
    """A prior's network from ``cfg.model`` (the same initial weights on every rank), the EMA of its weights and its
    DeepSpeed engine (Adam(W) of ``cfg.optim``, warmup + cosine of ``cfg.train``). ``run``: ``resume.RunContext``."""
    tc = cfg.train
    seed_everything(tc.seed)  # identical initial weights on every rank
    model = network(cfg.model)
    ema = EMA(model, tc.ema_decay, warmup=tc.ema_warmup)
    if tc.compile:  # in place: parameter names (EMA, checkpoints, exports) unchanged
        model.compile()
    seed_everything(tc.seed + run.rank)
    optimizer = build_adam(model, cfg.optim)
    schedule = WarmupCosineSchedule(optimizer, tc.warmup_steps, tc.max_steps, tc.min_lr_ratio)
    return ema, dist.build_engine(model, optimizer, run.ds_config, schedule)


def training_sequence(batch: Mapping[str, torch.Tensor], vocab: TokenVocabulary,
                      objective: AutoregressiveObjectiveConfig, generator: torch.Generator | None = None
                      ) -> torch.Tensor:
    """The autoregressive prior's input ids ``(B, L)`` of token-shard items ``batch`` (as for
    ``masking.make_training_batch``): per example a task of ``objective.tasks``, its condition codes in the prefix,
    its class in the class slot, each dropped with ``objective.cond_dropout_prob``, drawn exactly as for the masked
    transformer (that function's draws, so a run's random stream is the one it always was), and every video code in
    place.

    No host sync; the values are checked where the batch is read (``masking.check_training_batch``).
    """
    # The mask is thrown away; "stages" keeps the draws two-grid runs always made (its stage draw included).
    masking = MaskingConfig(tasks=objective.tasks, cond_dropout_prob=objective.cond_dropout_prob,
                            two_grid_masking="stages")
    masked = make_training_batch(batch, vocab, masking, generator=generator, mask_ratio=0.0)
    # ratio 0 still masks one video token per example: the labels hold every video code (two grids: packed, top first)
    return torch.where(masked.labels != IGNORE_INDEX, masked.labels, masked.input_ids)
