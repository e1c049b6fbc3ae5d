"""What the priors' trainers share (``magvit.launch.train_transformer``, ``magvit.launch.train_autoregressive``):
the model's sizes from the token shards, the checks of the trained tasks and of the network before a run dir is
written, the network with its EMA and engine, and the autoregressive prior's training sequences (the masked
transformer's task and condition draws, every video code visible)."""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Mapping, Sequence

import torch

from . import distributed as dist
from .batches import token_meta
from .checkpoint import seed_everything
from .cli import UsageError
from .config import ConfigError
from .ema import EMA
from .masking import make_training_batch
from .optim import WarmupCosineSchedule, build_adam
from .sequence import IGNORE_INDEX, TokenVocabulary


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


def training_sequence(batch: Mapping[str, torch.Tensor], vocab: TokenVocabulary, *,
                      tasks: Sequence[str] | None = None, cond_dropout_prob: float = 0.1,
                      generator: torch.Generator | None = None) -> torch.Tensor:
    """The autoregressive prior's input ids ``(B, L)`` of token-shard items ``batch`` (as for
    ``masking.make_training_batch``): per example a task, its condition codes in the prefix, its class in the class
    slot, each dropped with ``cond_dropout_prob``, drawn exactly as for the masked transformer (that function's
    draws, so a run's random stream is the one it always was), and every video code in place.

    No host sync; the values are checked where the batch is read (``masking.check_training_batch``).
    """
    masked = make_training_batch(batch, vocab, tasks=tasks, cond_dropout_prob=cond_dropout_prob, mask_ratio=0.0,
                                 generator=generator)
    # ratio 0 still masks one video token per example: the labels hold every video code (two grids: packed, top first)
    return torch.where(masked.labels != IGNORE_INDEX, masked.labels, masked.input_ids)
