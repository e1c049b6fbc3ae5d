"""Train the autoregressive prior (VQGAN's transformer over the codes) on token shards with DeepSpeed.

    deepspeed --num_accelerators 2 launch/train_autoregressive.py --config configs/autoregressive/tiny.yaml \\
        [--deepspeed_config configs/deepspeed/zero2.json] [--run-dir DIR] \\
        [--resume auto|never] [--overwrite] [key.path=value ...]

Also runs under ``torchrun``, ``srun`` (one process per task) and as plain ``python`` (one process).

The token shards are the masked transformer's (``python -m data_prep.tokenize``); their ``meta.json`` fixes the
model's codebook size, token grid and number of classes. Each step draws a task and its condition per example as
the masked transformer's trainer does (``prior_training.training_sequence``) and minimises the next-token
cross-entropy of the video codes (``autoregressive.next_token_loss``). Everything else (the command line, checks,
checkpoints, exact resume, preemption, the EMA export in ``RUN_DIR/export``) is the priors' shared skeleton
(``magvit.prior_training``) and ``magvit.trainloop.TrainLoop``'s, as for the other trainers.
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
from magvit.cli import run_main
from magvit.prior_training import PriorCommand, start_prior_run, training_sequence
from magvit.run_config import AutoregressiveTrainConfig
from magvit.trainloop import NonFiniteGuard, Reporting

COMMAND = PriorCommand(
    __doc__.split("\n")[0], kind="autoregressive", default_config="configs/autoregressive/tiny.yaml",
    config_class=AutoregressiveTrainConfig, network=AutoregressiveTransformer, tasks_key="objective.tasks",
    logger_name="magvit.train_autoregressive",
    reporting=Reporting("AutoregressiveTransformer", loss_key="loss", rate_key="perf/examples_per_s",
                        rate_label="ex_s", lr_keys={"transformer": "lr"}, card_keys=("loss", "next_token_accuracy")))
DEFAULT_CONFIG = COMMAND.default_config
load_config = COMMAND.load_config


def autoregressive_step(engine, batch: dict[str, Any], step: int, cfg: AutoregressiveTrainConfig,
                        guard: NonFiniteGuard, autocast) -> dict[str, float] | None:
    """One micro-step: the conditioned sequences, their next-token logits, back-propagate the loss on the video
    codes. Returns metrics, or None when a non-finite loss on any rank made every rank skip it."""
    o, vocab, layout = cfg.objective, cfg.model.vocab, cfg.model.layout
    input_ids = training_sequence(batch, vocab, o)  # (B, L); randomness from the (checkpointed) global RNG
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
    return COMMAND.main(train, argv)


def train(cfg: AutoregressiveTrainConfig, ds_base: dict[str, Any], run_dir: Path, resume: bool,
          argv: Sequence[str], overwrite: bool = False) -> int:
    prior = start_prior_run(COMMAND, cfg, ds_base, run_dir, resume, argv, overwrite)
    loop = prior.loop()

    def micro_step(batch: dict[str, Any], step: int) -> dict[str, float] | None:
        return autoregressive_step(prior.engine, prior.on_device(batch), step, cfg, loop.guard, prior.autocast)

    return loop.run(micro_step, resume)


def cli() -> int:
    """Console entry point."""
    warnings.filterwarnings("ignore", category=FutureWarning, message=r".*deprecated. Please use")
    return run_main(None, main)


if __name__ == "__main__":
    sys.exit(cli())
