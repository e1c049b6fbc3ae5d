"""Train the autoregressive prior (VQGAN's transformer over the codes) on token shards with DeepSpeed.

    deepspeed --num_accelerators 2 launch/train_autoregressive.py --config configs/autoregressive/tiny.yaml \\
        [--deepspeed_config configs/deepspeed/zero2.json] [--run-dir DIR] \\
        [--resume auto|never] [--overwrite] [key.path=value ...]

Also runs under ``torchrun``, ``srun`` (one process per task) and as plain ``python`` (one process).

The token shards are the masked transformer's (``python -m data_prep.tokenize``); their ``meta.json`` fixes the
model's codebook size, token grid and number of classes. Each step draws a task and its condition per example as
the masked transformer's trainer does (``prior_training.training_sequence``) and minimises the next-token
cross-entropy of the video codes (``autoregressive.next_token_loss``). Everything else (checkpoints, exact resume,
preemption, the EMA export in ``RUN_DIR/export``) is ``magvit.trainloop.TrainLoop``'s, as for the other trainers.
"""

from __future__ import annotations

import sys
import warnings
from pathlib import Path
from typing import Any, Sequence

if __package__ in (None, ""):  # `python launch/train_autoregressive.py` / the deepspeed launcher
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import torch

from magvit import distributed as dist
from magvit.autoregressive import AutoregressiveTransformer, next_token_loss, video_logits
from magvit.batches import token_batches
from magvit.cli import run_main
from magvit.prior_training import (build_prior, check_carried_tasks, check_network, check_trained_tasks,
                                   training_sequence, with_token_sizes)
from magvit.resume import start_run
from magvit.run_config import AutoregressiveTrainConfig, load_train_config, parse_train_command
from magvit.precision import autocast as precision_autocast
from magvit.trainloop import NonFiniteGuard, Reporting, TrainLoop

DEFAULT_CONFIG = "configs/autoregressive/tiny.yaml"
REPORTING = Reporting("AutoregressiveTransformer", loss_key="loss", rate_key="perf/examples_per_s",
                      rate_label="ex_s", lr_keys={"transformer": "lr"}, card_keys=("loss", "next_token_accuracy"))


def load_config(config_path: str, overrides: Sequence[str], deepspeed_config: str | None = None
                ) -> AutoregressiveTrainConfig:
    """The training config (YAML + overrides), strictly checked; the model's data-dependent sizes are filled in
    later by ``with_token_sizes``."""
    cfg = load_train_config(AutoregressiveTrainConfig, config_path, overrides, deepspeed_config)
    check_trained_tasks("objective.tasks", cfg.objective.tasks, cfg.model.tasks)
    return cfg


def autoregressive_step(engine, batch: dict[str, Any], step: int, cfg: AutoregressiveTrainConfig,
                        guard: NonFiniteGuard, autocast) -> dict[str, float] | None:
    """One micro-step: the conditioned sequences, their next-token logits, back-propagate the loss on the video
    codes. Returns metrics, or None when a non-finite loss on any rank made every rank skip it."""
    o, vocab, layout = cfg.objective, cfg.model.vocab, cfg.model.layout
    # randomness from the (checkpointed) global RNG
    input_ids = training_sequence(batch, vocab, tasks=o.tasks, cond_dropout_prob=o.cond_dropout_prob)  # (B, L)
    with autocast:
        logits = engine(input_ids)  # (B, L, vocab)
    loss = next_token_loss(logits, input_ids, layout, vocab.codebook_size, o.label_smoothing)
    with torch.no_grad():
        hits = video_logits(logits, layout, vocab.codebook_size).argmax(dim=-1) == input_ids[:, layout.video]
        metrics = {"loss": loss.item(), "next_token_accuracy": hits.float().mean().item()}
    if not guard.check(metrics["loss"], step, dist.all_reduce_max):
        return None
    engine.backward(loss)
    engine.step()
    return metrics


def main(argv: Sequence[str] | None = None) -> int:
    args, cfg, ds_base = parse_train_command(__doc__.split("\n")[0], DEFAULT_CONFIG, "autoregressive", load_config,
                                             argv)
    cfg = with_token_sizes(cfg)
    check_carried_tasks("objective.tasks", cfg.objective.tasks, cfg)
    check_network(AutoregressiveTransformer, cfg.model)
    return train(cfg, ds_base, args.run_dir, resume=args.resume == "auto" and not args.overwrite,
                 argv=sys.argv if argv is None else argv, overwrite=args.overwrite)


def train(cfg: AutoregressiveTrainConfig, ds_base: dict[str, Any], run_dir: Path, resume: bool,
          argv: Sequence[str], overwrite: bool = False) -> int:
    # from here on SIGTERM/SIGUSR1 mean "checkpoint and exit 3"
    run = start_run(cfg, ds_base, run_dir, argv, "magvit.train_autoregressive", resume=resume, overwrite=overwrite)
    tc, device = cfg.train, run.device
    ema, engine = build_prior(AutoregressiveTransformer, cfg, run)
    autocast = precision_autocast(tc.precision, device)
    data = token_batches(cfg.data, run.rank, run.world_size, tc.seed, device)

    def export_model() -> AutoregressiveTransformer:  # (the loop keeps the training RNG where it was)
        plain = AutoregressiveTransformer(cfg.model)
        plain.class_names = list(data.classes)  # class id -> name, from the shards' meta.json
        return plain

    loop = TrainLoop(run, cfg, run_dir, {"transformer": engine}, ema, data, export_model, REPORTING)

    def micro_step(batch: dict[str, Any], step: int) -> dict[str, float] | None:
        batch = {k: v.to(device, non_blocking=True) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
        return autoregressive_step(engine, batch, step, cfg, loop.guard, autocast)

    return loop.run(micro_step, resume)


def cli() -> int:
    """Console entry point."""
    warnings.filterwarnings("ignore", category=FutureWarning, message=r".*deprecated. Please use")
    return run_main(None, main)


if __name__ == "__main__":
    sys.exit(cli())
