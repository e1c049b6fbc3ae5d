"""The one training loop: every trainer builds its networks, engines and data, then hands its micro-step to
:class:`TrainLoop`, which owns everything around it.

Per micro-step: the preemption check (between optimizer steps only), the next batch, the micro-step itself, the
non-finite-loss bookkeeping (:class:`NonFiniteGuard`), the accumulation boundary. Per optimizer step: the EMA of
the exported network (under gathered parameters with ZeRO-3), skipped-step detection, and the log / sample /
checkpoint cadence of ``logging`` and ``checkpoint``. At the end, whatever ended it: the metrics, the progress
bar and the signal handlers are closed and the engines shut down.
"""

from __future__ import annotations

import dataclasses
import math
import time
from pathlib import Path
from typing import Any, Callable, Mapping

import torch

from . import distributed as dist
from .batches import TrainData
from .checkpoint import CheckpointManager, export_ema
from .config import Config
from .ema import EMA
from .fileio import recover_folder
from .model_card import TrainingRecord
from .resume import RunContext, resume_latest
from .runlog import MetricsLogger, MetricsWindow, progress_bar
from .tracking import Tracker, TrackingConfig

MicroStep = Callable[[Any, int], "dict[str, float] | None"]


@dataclasses.dataclass
class LoggingConfig(TrackingConfig):
    """How often a run reports, and where to (``TrackingConfig``: TensorBoard, Weights & Biases)."""

    log_every: int = 10  # steps between metric lines
    sample_every: int = 500  # steps between validation reconstructions/metrics (0: only at the end)
    progress: bool = True  # tqdm bar on rank 0

    def __post_init__(self):
        super().__post_init__()
        if self.log_every < 1 or self.sample_every < 0:  # `step % 0` would stop the run at its first step
            raise ValueError("logging: need log_every >= 1 and sample_every >= 0")


@dataclasses.dataclass
class CheckpointConfig(Config):
    every: int = 1000  # steps between checkpoints (also written at the end and on preemption)
    keep_last: int = 3

    def __post_init__(self):
        if self.every < 1 or self.keep_last < 1:
            raise ValueError("checkpoint: every and keep_last must be >= 1")


class NonFiniteLossError(RuntimeError):
    """Too many non-finite losses or skipped optimizer steps in a row: the run stops (exit status 1)."""


class NonFiniteGuard:
    """Decides, identically on every rank, whether a micro-batch's loss may be back-propagated, and counts the
    optimizer steps DeepSpeed skipped because the gradients were not finite (a finite loss can still overflow
    them, e.g. ``loss.recon_weight=3e38``: then no weight ever changes).

    ``check`` takes this rank's loss value and a ``reduce_max`` collective; if any rank saw a NaN/inf the step is
    skipped everywhere. ``check_step`` takes whether the engine applied its last optimizer step. Either kind of
    skip ``max_consecutive`` times in a row raises ``NonFiniteLossError``, and so does a run whose every optimizer
    step was skipped, however short (``check_step(..., last=True)``): its export would be untrained.
    """

    def __init__(self, max_consecutive: int):
        self.max_consecutive = max_consecutive
        self.consecutive = 0
        self.total_skipped = 0
        self.consecutive_skipped_steps = 0
        self.total_skipped_steps = 0
        self.last_skipped = "loss"  # what the latest skipped check was about, for the log
        self.run_start = 0  # the step this process's run started (or resumed) at

    def state_dict(self) -> dict[str, int]:
        """The totals a checkpoint keeps (the trainer state's ``nonfinite_skipped`` / ``skipped_steps``)."""
        return {"nonfinite_skipped": self.total_skipped, "skipped_steps": self.total_skipped_steps}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.total_skipped = int(state.get("nonfinite_skipped", 0))
        self.total_skipped_steps = int(state.get("skipped_steps", 0))

    def check_step(self, applied: bool, step: int, reduce_max: Callable[[float], float] = float,
                   last: bool = False) -> bool:
        """After optimizer step ``step`` (1-based; ``last``: the run's final one): False (on every rank) when any
        rank's engine skipped the update."""
        skipped = reduce_max(0.0 if applied else 1.0) > 0.0
        if not skipped:
            self.consecutive_skipped_steps = 0
            return True
        self.consecutive_skipped_steps += 1
        self.total_skipped_steps += 1
        if last and self.consecutive_skipped_steps >= step - self.run_start:
            raise NonFiniteLossError(
                f"every optimizer step of this run ({step - self.run_start}, to step {step}) was skipped for "
                "non-finite gradients: the weights did not change; stopping without exporting them. Lower the loss "
                "weights or the learning rate.")
        if self.consecutive_skipped_steps >= self.max_consecutive:
            raise NonFiniteLossError(
                f"{self.consecutive_skipped_steps} optimizer steps in a row skipped for non-finite gradients (last "
                f"at step {step}): the weights are not learning; stopping. Lower the loss weights or the learning "
                "rate, or resume from an earlier checkpoint.")
        return False

    def check(self, loss_value: float, step: int, reduce_max: Callable[[float], float] = float,
              name: str = "loss") -> bool:
        """Before a backward pass: False (on every rank) when any rank's ``loss_value`` (its ``name``, e.g.
        ``"discriminator loss"``) is not finite."""
        bad = reduce_max(0.0 if math.isfinite(loss_value) else 1.0) > 0.0
        if not bad:
            self.consecutive = 0
            return True
        self.last_skipped = name
        self.consecutive += 1
        self.total_skipped += 1
        if self.consecutive >= self.max_consecutive:
            raise NonFiniteLossError(
                f"{self.consecutive} non-finite losses in a row (last at step {step}); stopping. "
                "Lower the learning rate, enable gradient clipping or resume from an earlier checkpoint.")
        return False


@dataclasses.dataclass(frozen=True)
class Reporting:
    """What the loop reports of a run besides the micro-step's own metrics."""

    name: str  # the network trained (the exported EMA), for the log
    loss_key: str  # the metric shown on the progress bar
    rate_key: str  # the throughput metric (examples per second), e.g. "perf/clips_per_s"
    rate_label: str  # its label on the progress bar
    lr_keys: Mapping[str, str]  # engine name -> the metric of its learning rate
    card_keys: tuple[str, ...] = ()  # logged means the export's model card keeps (besides the sample metrics)


class TrainLoop:
    """Runs ``micro_step(batch, step)`` until ``train.max_steps`` optimizer steps are done (or, with
    ``train.max_minutes``, until a step ends that much wall time after the loop started: the same end as the last).

    ``engines`` are the run's DeepSpeed engines (checkpointed together); the first one is the network whose EMA
    ``ema`` is updated each optimizer step and exported with every checkpoint (``export_model()``: a plain copy
    holding its current buffers, built on rank 0 with the training RNG set aside). A micro-step does its forward,
    backward and ``engine.step()`` and returns its metrics, or None when :attr:`guard` made it skip the whole
    micro-batch (it then does not count towards the accumulation). ``extra_state()`` adds entries to each
    checkpoint's trainer state and ``restore_extra(state)`` reads them back on resume. ``cfg`` is the whole run
    config (``train``, ``logging``, ``checkpoint``, ``data`` sections), recorded in each checkpoint.
    """

    def __init__(self, run: RunContext, cfg: Config, run_dir: Path, engines: Mapping[str, Any], ema: EMA,
                 data: TrainData, export_model: Callable[[], torch.nn.Module], reporting: Reporting,
                 extra_state: Callable[[], dict[str, Any]] = dict,
                 restore_extra: Callable[[Mapping[str, Any]], None] = lambda state: None):
        self.context, self.cfg, self.run_dir, self.ema, self.data = run, cfg, Path(run_dir), ema, data
        self.engines = dict(engines)
        self.engine = next(iter(self.engines.values()))  # the network of the EMA and the export
        self.export_model, self.reporting = export_model, reporting
        self.extra_state, self.restore_extra = extra_state, restore_extra
        self.ckpt = CheckpointManager(self.run_dir / "checkpoints", keep_last=cfg.checkpoint.keep_last)
        self.guard = NonFiniteGuard(cfg.train.max_nonfinite_steps)
        self.step, self.last_saved = 0, -1
        self.last_eval: dict[str, float] = {}  # the latest card metrics, for the export's model card
        self.metrics_log = MetricsLogger(self.run_dir, enabled=False)  # opened by `run`
        self.clock = time.monotonic  # seconds; ``train.max_minutes`` counts from the loop's start on it
        self.started: float | None = None
        self.out_of_time = False  # the step just done used up ``train.max_minutes``
        self.tracker = Tracker(cfg.logging, self.run_dir, is_main=False)  # opened by `run`; a sample() logs media to it

    # --- the run ---------------------------------------------------------------------------------------------------
    def run(self, micro_step: MicroStep, resume: bool, sample: Callable[[int], dict[str, float]] | None = None
            ) -> int:
        """Continue from the latest checkpoint (``resume``) or start at step 0, train, and shut down.
        ``sample(step)`` (rank 0; None: never) evaluates / writes samples at the ``logging.sample_every`` cadence
        and at the end; its metrics are logged and go into the model card. Returns the exit status: 0 done, 1
        stopped for non-finite losses, ``distributed.EXIT_CODE_PREEMPTED`` after a preemption signal (checkpoint
        written)."""
        tc, lc, r = self.cfg.train, self.cfg.logging, self.reporting
        self.ckpt.clean_stale()
        if self.context.rank == 0:  # an export swap interrupted by the last run: the previous export back in place
            recover_folder(self.run_dir / "export", self.run_dir / ".export.old")
        if resume:
            self._resume()
        self.guard.run_start = self.step
        log, rank = self.context.log, self.context.rank
        self.tracker = Tracker(lc, self.run_dir, is_main=rank == 0, run_config=self.cfg.to_dict(), job_type=r.name,
                               log=log)  # its warnings (W&B offline) in logs/rank0.log too
        self.metrics_log = MetricsLogger(self.run_dir, enabled=rank == 0, tracker=self.tracker)
        bar = progress_bar(tc.max_steps, self.step, enabled=rank == 0 and lc.progress)
        items_per_step = self.cfg.data.batch_size * self.context.world_size * tc.grad_accum_steps
        self.window = MetricsWindow(self.metrics_log, bar, items_per_step, r.rate_key, loss_key=r.loss_key,
                                    rate_label=r.rate_label)
        log.info("training %s (%.1fM parameters) for %d steps%s on %d rank(s), ZeRO-%d, %s, run dir %s", r.name,
                 sum(p.numel() for p in self.ema.shadow.values()) / 1e6, tc.max_steps,
                 f" or {tc.max_minutes:g} minutes" if tc.max_minutes else "", self.context.world_size,
                 self.context.zero_stage, tc.precision, self.run_dir)
        exit_code = 1  # until the loop returns: an exception marks the tracked run failed
        try:
            exit_code = self._loop(micro_step, sample)
        except NonFiniteLossError as err:
            self.metrics_log.log(self.step, self.guard.state_dict(), event="nonfinite_stop")
            log.error("%s", err)
            exit_code = 1
        finally:  # whatever ended the loop
            bar.close()
            self.context.preempt.uninstall()
            self.metrics_log.close()
            self.tracker.close(exit_code)
        if exit_code == 0:
            budget = f" (train.max_minutes={tc.max_minutes:g} reached)" if self.out_of_time else ""
            log.info("done: %d steps%s, EMA weights exported to %s", self.step, budget, self.run_dir / "export")
        dist.shutdown(*self.engines.values())
        return exit_code

    def _resume(self) -> None:
        state = resume_latest(self.ckpt, self.engines, self.ema, self.context.log)
        if state is None:
            return
        self.step = self.last_saved = int(state["step"])
        self.data.stream.load_state_dict(state["data"])
        self.guard.load_state_dict(state)
        self.restore_extra(state)

    def _loop(self, micro_step: MicroStep, sample: Callable[[int], dict[str, float]] | None) -> int:
        micro = 0  # micro-steps of the current optimizer step done
        self.started = self.clock()
        while self.step < self.cfg.train.max_steps and not self.out_of_time:
            if micro == 0 and self._preempted():  # only between optimizer steps
                return dist.EXIT_CODE_PREEMPTED
            batch = next(self.data.stream)
            boundary = self.engine.is_gradient_accumulation_boundary()
            lrs = {key: self.engines[name].get_lr()[0] for name, key in self.reporting.lr_keys.items()}  # this step's
            skipped = self.guard.total_skipped
            metrics = micro_step(batch, self.step)
            if self.guard.total_skipped > skipped:
                self._log_nonfinite(whole=metrics is None)
            if metrics is None:
                continue
            self.window.add(metrics)
            micro = 0 if boundary else micro + 1
            if boundary:
                self._end_step(lrs, sample)
        return 0

    def _end_step(self, lrs: Mapping[str, float], sample: Callable[[int], dict[str, float]] | None) -> None:
        """An optimizer step is complete: EMA, skipped-step check, then log / sample / checkpoint when due."""
        with dist.gathered_parameters(self.engine.module, self.context.zero_stage):
            self.ema.update(self.engine.module)
        self.step += 1
        self.out_of_time = self._time_is_up()
        step, lc = self.step, self.cfg.logging
        last = step == self.cfg.train.max_steps or self.out_of_time
        self._count_skipped_step()
        self.window.end_step()
        if step % lc.log_every == 0 or last:
            logged = self.window.log(step, lrs, self.data.stream.epoch)
            self.last_eval.update({k: logged[k] for k in self.reporting.card_keys if k in logged})
        if sample is not None and (lc.sample_every and step % lc.sample_every == 0 or last):
            result = sample(step)
            self.last_eval.update(result)
            self.metrics_log.log(step, result)
        if step % self.cfg.checkpoint.every == 0 or last:
            self.save(step)

    # --- checkpoints and what stops a run ------------------------------------------------------------------------
    def save(self, step: int) -> None:
        """Checkpoint ``step`` (every rank), then export the EMA weights (rank 0)."""
        state = {"data": self.data.stream.state_dict(), **self.extra_state(), **self.guard.state_dict(),
                 "config": self.cfg.to_dict()}
        self.ckpt.save(step, self.engines, state, self.ema)
        if self.context.rank == 0:
            record = TrainingRecord(str(self.data.source), self.data.num_examples, step, dict(self.last_eval),
                                    precision=self.context.precision)
            with torch.random.fork_rng(devices=[]):  # building the copy must not move the training RNG (exact resume)
                model = self.export_model()
            export_ema(model, self.ema, self.run_dir / "export", record)
        dist.barrier()
        self.last_saved = step

    def _time_is_up(self) -> bool:
        """Whether ``train.max_minutes`` of this loop have passed on any rank (a collective, so that every rank
        stops after the same step)."""
        limit = self.cfg.train.max_minutes
        if not limit:
            return False
        return dist.all_reduce_max(self.clock() - self.started) >= limit * 60

    def _preempted(self) -> bool:
        """True when a preemption signal reached any rank (a collective); the checkpoint of this step is then on
        disk."""
        if not self.context.preempt.should_stop():
            return False
        self.context.log.warning("signal received: checkpointing at step %d and exiting with status %d", self.step,
                                 dist.EXIT_CODE_PREEMPTED)
        if self.last_saved != self.step:
            self.save(self.step)
        return True

    def _log_nonfinite(self, whole: bool) -> None:
        """A micro-step skipped its backward pass for a non-finite loss: the whole micro-batch (``whole``) or one
        of its parts (e.g. the discriminator's, whose optimizer step then takes one more micro-batch)."""
        self.metrics_log.log(self.step, {"nonfinite_skipped": self.guard.total_skipped}, event="nonfinite_loss")
        self.context.log.warning("non-finite %s at step %d: %s skipped (%d in a row)", self.guard.last_skipped,
                                 self.step, "micro-batch" if whole else "its part of the micro-step",
                                 self.guard.consecutive)

    def _count_skipped_step(self) -> None:
        """Log (``event: step_skipped``) when DeepSpeed skipped the update for non-finite gradients; the guard
        raises ``NonFiniteLossError`` after too many in a row. A collective."""
        if self.guard.check_step(self.engine.was_step_applied(), self.step, dist.all_reduce_max,
                                 last=self.step == self.cfg.train.max_steps or self.out_of_time):
            return
        self.metrics_log.log(self.step, self.guard.state_dict(), event="step_skipped")
        self.context.log.warning("optimizer step %d skipped by DeepSpeed: non-finite gradients (%d in a row)",
                                 self.step, self.guard.consecutive_skipped_steps)
