"""Starting or continuing a run: the process group, the checks that a resume can honour the config in force
(:func:`resume_changes`, the keys that may change in ``RESUME_MAY_CHANGE``), the run dir set-up
(:func:`start_run`), and the load of the latest checkpoint into the engines (:func:`resume_latest`).
"""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path
from typing import Any, Mapping, Sequence

import torch

from . import distributed as dist
from .checkpoint import CheckpointError, CheckpointManager, latest_checkpoint, read_trainer_state, world_size_mismatch
from .cli import UsageError
from .config import Config
from .ema import EMA
from .optim import WarmupCosineSchedule
from .precision import describe, emulation_warning, resolve_precision, warn_once
from .runlog import RunLock, clear_run_dir, rerun_problem, setup_run_dir
from .tracking import check_backends


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
    precision: str = ""  # the precision in force and why (``magvit.precision.describe``), for the model card
    lock: Any = None  # rank 0's ``runlog.RunLock`` on the run dir, held for the run's life


def start_run(cfg: Config, ds_base: Mapping[str, Any], run_dir: Path, argv: Sequence[str],
              logger_name: str, resume: bool = False, overwrite: bool = False) -> RunContext:
    """Start the process group, turn SIGTERM/SIGUSR1 into "checkpoint and exit 3" from here on, resolve the
    DeepSpeed config (``cfg.data``, ``cfg.train``, ``cfg.optim.grad_clip``), check that a ``resume`` can honour
    ``cfg`` (:func:`resume_changes`), refuse a fresh start over a previous run unless ``overwrite``
    (:func:`rerun_problem`; ``overwrite`` deletes it, :func:`clear_run_dir`), set up ``run_dir`` (rank 0) and open
    this rank's logger (``run_dir/logs/rank<r>.log``). A refused resume or rerun or an unwritable run dir raises
    ``UsageError`` on every rank before ``config.yaml`` is written, so the run dir never records a value that is
    not in force. ``train.precision: auto`` is resolved here for this device (``magvit.precision``) and ``cfg``
    records the result."""
    env = dist.init_distributed()
    preempt = dist.PreemptionHandler().install()
    tc = cfg.train
    requested = tc.precision
    tc.precision, support = resolve_precision(requested, dist.device())
    try:
        ds_config = dist.make_deepspeed_config(ds_base, micro_batch_size=cfg.data.batch_size,
                                               grad_accum_steps=tc.grad_accum_steps, grad_clip=cfg.optim.grad_clip,
                                               precision=tc.precision, zero_stage=tc.zero_stage,
                                               world_size=env.world_size)
        dist.check_deepspeed_config(ds_config)
    except ValueError as err:  # the same on every rank
        raise UsageError(f"{tc.deepspeed_config}: {err}") from None
    stage = ds_config["zero_optimization"]["stage"]
    check_backends(cfg.logging)  # a missing wandb package stops every rank alike, before anything is written
    lock, problem = RunLock(run_dir), None
    if env.rank == 0:  # one holder per run; the lock lasts this process's life (RunContext.lock)
        try:
            problem = lock.acquire()
        except OSError as err:
            problem = f"cannot write the run dir {run_dir}: {err}"
    if dist.all_reduce_max(1.0 if problem else 0.0) > 0:
        raise UsageError(problem or f"{run_dir} is in use by another run (seen by rank 0)")
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
    precision = describe(requested, tc.precision, support)
    log.info("precision: %s", precision)
    warn_once(emulation_warning(tc.precision, support), log)
    for line in changes:
        log.info("resume: %s", line)
    return RunContext(env.rank, env.world_size, dist.device(), ds_config, stage, preempt, log, precision, lock)


# On resume these keys may differ from the checkpoint's config (they change how long the run goes and what it
# reports, not the state it continues from); every other key is fixed by the checkpoint.
RESUME_MAY_CHANGE = ("train.max_steps", "train.max_nonfinite_steps", "train.compile", "logging.", "checkpoint.",
                     "data.num_workers", "data.val_clips", "data.val_tokens")


def _flatten(tree: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    out = {}
    for key, value in tree.items():
        if isinstance(value, Mapping) and value:
            out.update(_flatten(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def _same_weights_precision(key: str, old: Any, new: Any) -> bool:
    """fp32 and bf16 autocast keep the same fp32 weights and checkpoint, so a run may resume in the other (``auto``
    resolving differently on another machine); DeepSpeed's ``bf16`` stores bf16 weights and may not."""
    return key == "train.precision" and {old, new} <= {"fp32", "autocast-bf16"}


def resume_changes(cfg: Config, checkpoints: Path, world_size: int, zero_stage: int) -> tuple[str | None, list[str]]:
    """Compare ``cfg`` with the config, world size and ZeRO stage of the latest checkpoint under ``checkpoints``.
    Returns ``(problem, changes)``: ``problem`` a one-line refusal (keys that cannot change on resume, another
    world size or stage, a damaged trainer state) or None; ``changes`` the allowed differences as
    ``"key: old -> new"`` (they are applied)."""
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
                                         for m in RESUME_MAY_CHANGE) and not _same_weights_precision(*d)]
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


def resume_latest(ckpt: CheckpointManager, engines: Mapping[str, Any], ema: EMA | None,
                  log: logging.Logger) -> dict[str, Any] | None:
    """Load the latest complete checkpoint of ``ckpt`` into the engines (model, optimizer, LR schedule), the EMA
    and this rank's RNG, with every ``WarmupCosineSchedule`` set to the config in force (a new
    ``train.max_steps`` moves its end). Returns its trainer state (``state["step"]``, the data position
    ``state["data"]``, ...) for the caller to restore the rest from, or None when there is none.
    :func:`start_run` has already refused a checkpoint of another world size."""
    latest = latest_checkpoint(ckpt.root)
    if latest is None:
        log.info("no checkpoint in %s: starting fresh", ckpt.root)
        return None
    state = ckpt.load(latest, engines, ema)
    for engine in engines.values():
        schedule = getattr(engine, "lr_scheduler", None)
        if isinstance(schedule, WarmupCosineSchedule):
            schedule.refresh()
    position = state.get("data", {})
    log.info("resumed from %s (step %d, epoch %s, batch %s)", latest, state["step"], position.get("epoch"),
             position.get("batch"))
    return state
