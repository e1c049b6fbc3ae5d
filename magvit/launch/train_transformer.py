"""Train the masked video transformer on token shards with DeepSpeed.

    deepspeed --num_accelerators 2 launch/train_transformer.py --config configs/transformer/tiny.yaml \\
        [--deepspeed_config configs/deepspeed/zero2.json] [--run-dir DIR] \\
        [--resume auto|never] [--overwrite] [key.path=value ...]

Also runs under ``torchrun``, ``srun`` (one process per task) and as plain ``python`` (one process).

The token shards come from ``python -m data_prep.tokenize``; their ``meta.json`` fixes the model's codebook size,
token grid and number of classes. Each step draws a task (COMMIT condition, sketch, class, unconditional) and a
mask ratio from the mask schedule per example (``masking.make_training_batch``) and minimises the masked-token
cross-entropy. The exported weights (``RUN_DIR/export``) are the EMA of the transformer. SIGTERM/SIGUSR1 finish
the step, checkpoint and exit with status 3 (send them to the training processes, as srun does; see
``train_tokenizer.py``).
"""

from __future__ import annotations

import sys
import warnings
from pathlib import Path
from typing import Any, Sequence

if __package__ in (None, ""):  # `python launch/train_transformer.py` / the deepspeed launcher
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import torch

from magvit import distributed as dist
from magvit.batches import token_batches, token_sizes
from magvit.checkpoint import seed_everything
from magvit.cli import run_main
from magvit.config import ConfigError
from magvit.ema import EMA
from magvit.masking import SCHEDULES, TASKS, make_training_batch, masked_token_loss, predicted_codes
from magvit.optim import WarmupCosineSchedule, build_adam
from magvit.resume import start_run
from magvit.run_config import TransformerTrainConfig, load_train_config, parse_train_command
from magvit.trainloop import NonFiniteGuard, Reporting, TrainLoop, precision_context
from magvit.transformer import MaskedVideoTransformer

DEFAULT_CONFIG = "configs/transformer/tiny.yaml"
REPORTING = Reporting("MaskedVideoTransformer", loss_key="loss", rate_key="perf/examples_per_s", rate_label="ex_s",
                      lr_keys={"transformer": "lr"}, card_keys=("loss", "masked_accuracy"))


def load_config(config_path: str, overrides: Sequence[str], deepspeed_config: str | None = None
                ) -> TransformerTrainConfig:
    """The training config (YAML + overrides), strictly checked; the model's data-dependent sizes are filled in
    later by :func:`with_token_sizes`."""
    cfg = load_train_config(TransformerTrainConfig, config_path, overrides, deepspeed_config)
    m = cfg.masking
    if m.schedule not in SCHEDULES:
        raise ConfigError(f"masking.schedule: {m.schedule!r} is not one of {list(SCHEDULES)}")
    unknown = [t for t in (m.tasks or []) if t not in TASKS]
    if unknown:
        raise ConfigError(f"masking.tasks: unknown task {unknown[0]!r}; known: {', '.join(TASKS)}")
    return cfg


def with_token_sizes(cfg: TransformerTrainConfig) -> TransformerTrainConfig:
    """Set ``model.codebook_size``/``token_grid``/``num_classes`` from the token shards' ``meta.json``."""
    try:
        return cfg.replace(model=cfg.model.replace(**token_sizes(cfg.data)))
    except ConfigError as err:
        raise ConfigError(f"model (with the token shards' sizes): {err}") from None


def transformer_step(engine, batch: dict[str, Any], step: int, cfg: TransformerTrainConfig, vocab,
                     guard: NonFiniteGuard, autocast) -> dict[str, float] | None:
    """One micro-step: mask the batch's video tokens, predict them, back-propagate the masked-token loss.
    Returns metrics, or None when a non-finite loss on any rank made every rank skip it."""
    m = cfg.masking
    tb = make_training_batch(batch, vocab, tasks=m.tasks, schedule=m.schedule, cond_dropout_prob=m.cond_dropout_prob,
                             unmasked_weight=m.unmasked_weight)  # randomness from the (checkpointed) global RNG
    with autocast:
        logits = engine(tb.input_ids)  # (B, L, vocab), or (B, L, F, S) with token_factorization F
    loss = masked_token_loss(logits, tb.labels, tb.loss_mask, vocab.codebook_size, m.label_smoothing)
    with torch.no_grad():
        masked = tb.input_ids == vocab.mask_token  # (B, L): the positions to predict
        hits = (predicted_codes(logits, vocab.codebook_size) == tb.labels) & masked
        accuracy = hits.sum().item() / max(1, masked.sum().item())
    metrics = {"loss": loss.item(), "masked_accuracy": accuracy}
    if not guard.check(metrics["loss"], step, dist.all_reduce_max):
        return None
    engine.backward(loss)
    engine.step()
    return metrics


def main(argv: Sequence[str] | None = None) -> int:
    args, cfg, ds_base = parse_train_command(__doc__.split("\n")[0], DEFAULT_CONFIG, "transformer", load_config,
                                             argv)
    cfg = with_token_sizes(cfg)
    return train(cfg, ds_base, args.run_dir, resume=args.resume == "auto" and not args.overwrite,
                 argv=sys.argv if argv is None else argv, overwrite=args.overwrite)


def train(cfg: TransformerTrainConfig, ds_base: dict[str, Any], run_dir: Path, resume: bool,
          argv: Sequence[str], overwrite: bool = False) -> int:
    # from here on SIGTERM/SIGUSR1 mean "checkpoint and exit 3"
    run = start_run(cfg, ds_base, run_dir, argv, "magvit.train_transformer", resume=resume, overwrite=overwrite)
    tc, device = cfg.train, run.device

    seed_everything(tc.seed)  # identical initial weights on every rank
    model = MaskedVideoTransformer(cfg.model)
    ema = EMA(model, tc.ema_decay, warmup=tc.ema_warmup)
    seed_everything(tc.seed + run.rank)
    optimizer = build_adam(model, cfg.optim)
    schedule = WarmupCosineSchedule(optimizer, tc.warmup_steps, tc.max_steps, tc.min_lr_ratio)
    engine = dist.build_engine(model, optimizer, run.ds_config, schedule)
    autocast = precision_context(tc.precision, device)
    vocab = cfg.model.vocab
    data = token_batches(cfg.data, run.rank, run.world_size, tc.seed, device)

    def export_model() -> MaskedVideoTransformer:  # (the loop keeps the training RNG where it was)
        plain = MaskedVideoTransformer(cfg.model)
        plain.class_names = list(data.classes)  # class id -> name, from the shards' meta.json
        return plain

    loop = TrainLoop(run, cfg, run_dir, {"transformer": engine}, ema, data, export_model, REPORTING)

    def micro_step(batch: dict[str, Any], step: int) -> dict[str, float] | None:
        batch = {k: v.to(device, non_blocking=True) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
        return transformer_step(engine, batch, step, cfg, vocab, loop.guard, autocast)

    return loop.run(micro_step, resume)


def cli() -> int:
    """Console entry point."""
    warnings.filterwarnings("ignore", category=FutureWarning, message=r".*deprecated. Please use")
    return run_main(None, main)


if __name__ == "__main__":
    sys.exit(cli())
