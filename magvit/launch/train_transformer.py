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

import json
import sys
import warnings
from pathlib import Path
from typing import Any, Sequence

if __package__ in (None, ""):  # `python launch/train_transformer.py` / the deepspeed launcher
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import torch

from magvit import distributed as dist
from magvit.cli import run_main
from magvit.checkpoint import CheckpointManager, export_ema, seed_everything
from magvit.training import (EMA, MetricsLogger, MetricsWindow, NonFiniteGuard, NonFiniteLossError,
                             TransformerTrainConfig, UsageError, WarmupCosineSchedule, build_adam, load_train_config,
                             make_batch_stream, parse_train_command, precision_context, progress_bar,
                             resume_latest, start_run)

DEFAULT_CONFIG = "configs/transformer/tiny.yaml"


def load_config(config_path: str, overrides: Sequence[str], deepspeed_config: str | None = None
                ) -> TransformerTrainConfig:
    """The training config (YAML + overrides), strictly checked; the model's data-dependent sizes are filled in
    later by :func:`with_token_sizes`."""
    from magvit.config import ConfigError
    from magvit.masking import SCHEDULES, TASKS
    from magvit.transformer import TransformerConfig

    cfg = load_train_config(TransformerTrainConfig, config_path, overrides, {"model": TransformerConfig},
                            deepspeed_config)
    m = cfg.masking
    if m.schedule not in SCHEDULES:
        raise ConfigError(f"masking.schedule: {m.schedule!r} is not one of {list(SCHEDULES)}")
    unknown = [t for t in (m.tasks or []) if t not in TASKS]
    if unknown:
        raise ConfigError(f"masking.tasks: unknown task {unknown[0]!r}; known: {', '.join(TASKS)}")
    return cfg


def with_token_sizes(cfg: TransformerTrainConfig) -> TransformerTrainConfig:
    """Set ``model.codebook_size``/``token_grid``/``num_classes`` from the token shards' ``meta.json``."""
    from magvit.config import ConfigError
    from magvit.transformer import TransformerConfig

    meta_path = Path(cfg.data.tokens) / "meta.json"
    if cfg.data.format == "webdataset":  # meta.json beside the tar shards, wherever they are
        from magvit.streaming import resolve_shards

        meta_path = cfg.data.shards
        try:
            meta = resolve_shards(cfg.data.shards)[0]
        except (OSError, ValueError) as err:
            raise UsageError(f"data.shards: {err}") from None
    elif not meta_path.is_file():
        raise UsageError(f"token shards not found: {meta_path} (make them with `python -m data_prep.tokenize`, "
                         "or set data.tokens=DIR)")
    try:
        if cfg.data.format == "files":
            meta = json.loads(meta_path.read_text())
        from_data = {"codebook_size": int(meta["codebook_size"]), "token_grid": list(meta["token_grid"]),
                     "num_classes": len(meta.get("classes") or [])}
    except (json.JSONDecodeError, KeyError, TypeError, ValueError) as err:
        raise UsageError(f"{meta_path}: not a token shard meta.json ({err})") from None
    cfg = cfg.replace(model={**cfg.model, **from_data})
    try:
        TransformerConfig.from_dict(cfg.model)
    except ConfigError as err:
        raise ConfigError(f"model (with the token shards' sizes): {err}") from None
    return cfg


def transformer_step(engine, batch: dict[str, Any], step: int, cfg: TransformerTrainConfig, vocab,
                     guard: NonFiniteGuard, autocast) -> dict[str, float] | None:
    """One micro-step: mask the batch's video tokens, predict them, back-propagate the masked-token loss.
    Returns metrics, or None when a non-finite loss on any rank made every rank skip it."""
    from magvit.masking import make_training_batch, masked_token_loss, predicted_codes

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
    from magvit.data import TokenShardDataset
    from magvit.streaming import ShardStream
    from magvit.model_card import TrainingRecord
    from magvit.transformer import MaskedVideoTransformer, TransformerConfig

    # from here on SIGTERM/SIGUSR1 mean "checkpoint and exit 3"
    run = start_run(cfg, ds_base, run_dir, argv, "magvit.train_transformer", resume=resume,
                    overwrite=overwrite)
    rank, world, device, stage, log = run.rank, run.world_size, run.device, run.zero_stage, run.log
    tc = cfg.train

    seed_everything(tc.seed)  # identical initial weights on every rank
    model_cfg = TransformerConfig.from_dict(cfg.model)
    model = MaskedVideoTransformer(model_cfg)
    ema = EMA(model, tc.ema_decay, warmup=tc.ema_warmup)
    seed_everything(tc.seed + rank)
    optimizer = build_adam(model, cfg.optim)
    schedule = WarmupCosineSchedule(optimizer, tc.warmup_steps, tc.max_steps, tc.min_lr_ratio)
    engine = dist.build_engine(model, optimizer, run.ds_config, schedule)
    autocast = precision_context(tc.precision, device)
    vocab = model_cfg.vocab

    d = cfg.data
    source = d.tokens if d.format == "files" else d.shards
    try:
        if d.format == "webdataset":  # streamed: split by shard across ranks and loader workers
            dataset = ShardStream(d.shards, "tokens", d.batch_size, rank, world, d.num_workers, tc.seed,
                                  d.shuffle_buffer)
        else:
            dataset = TokenShardDataset(d.tokens)
        stream = make_batch_stream(dataset, d, rank, world, tc.seed, device)
    except (ValueError, OSError) as err:  # a damaged shard, codes outside the codebook, too few examples
        raise UsageError(f"{source}: {' '.join(str(err).split())}") from None
    num_examples = dataset.num_examples if d.format == "webdataset" else len(dataset)

    ckpt = CheckpointManager(run_dir / "checkpoints", keep_last=cfg.checkpoint.keep_last)
    ckpt.clean_stale()
    guard = NonFiniteGuard(tc.max_nonfinite_steps)
    resumed = resume_latest(ckpt, {"transformer": engine}, ema, stream, guard, run) if resume else None
    step = int(resumed["step"]) if resumed is not None else 0
    last_eval: dict[str, float] = {}  # the last logged loss / accuracy, for the export's model card

    def save(at_step: int) -> None:
        ckpt.save(at_step, {"transformer": engine},
                  {"data": stream.state_dict(), **guard.state_dict(), "config": cfg.to_dict()},
                  ema)
        if rank == 0:
            with torch.random.fork_rng(devices=[]):  # must not move the training RNG (exact resume)
                plain = MaskedVideoTransformer(model_cfg)
            plain.class_names = list(dataset.classes)  # class id -> name, from the shards' meta.json
            export_ema(plain, ema, run_dir / "export", TrainingRecord(str(source), num_examples, at_step,
                                                                      dict(last_eval)))
        dist.barrier()

    metrics_log = MetricsLogger(run_dir, enabled=rank == 0, tensorboard=cfg.logging.tensorboard)
    bar = progress_bar(tc.max_steps, step, enabled=rank == 0 and cfg.logging.progress)
    window = MetricsWindow(metrics_log, bar, d.batch_size * world * tc.grad_accum_steps, "perf/examples_per_s",
                           loss_key="loss", rate_label="ex_s")
    exit_code, micro = 0, 0
    last_saved = step if resumed is not None else -1
    log.info("training MaskedVideoTransformer (%.1fM parameters) for %d steps on %d rank(s), ZeRO-%d, %s, run dir %s",
             sum(p.numel() for p in ema.shadow.values()) / 1e6, tc.max_steps, world, stage, tc.precision, run_dir)
    try:
        while step < tc.max_steps:
            if micro == 0 and run.checkpoint_if_preempted(step, last_saved, save):  # only between optimizer steps
                exit_code = dist.EXIT_CODE_PREEMPTED
                break
            batch = {k: v.to(device, non_blocking=True) if isinstance(v, torch.Tensor) else v
                     for k, v in next(stream).items()}
            boundary = engine.is_gradient_accumulation_boundary()
            lr = engine.get_lr()[0]
            out = transformer_step(engine, batch, step, cfg, vocab, guard, autocast)
            if out is None:
                metrics_log.log(step, {"nonfinite_skipped": guard.total_skipped}, event="nonfinite_loss")
                log.warning("non-finite loss at step %d: micro-batch skipped (%d in a row)", step, guard.consecutive)
                continue
            window.add(out)
            micro = 0 if boundary else micro + 1
            if not boundary:
                continue

            with dist.gathered_parameters(engine.module, stage):
                ema.update(engine.module)
            step += 1
            run.count_skipped_step(engine, step, guard, metrics_log)  # overflowing gradients: no update
            window.end_step()
            if step % cfg.logging.log_every == 0 or step == tc.max_steps:
                logged = window.log(step, {"lr": lr}, stream.epoch)
                last_eval.update({k: logged[k] for k in ("loss", "masked_accuracy") if k in logged})
            if step % cfg.checkpoint.every == 0 or step == tc.max_steps:
                save(step)
                last_saved = step
    except NonFiniteLossError as err:
        exit_code = run.stop_for_nonfinite(err, step, guard, metrics_log)
    finally:
        run.close(bar, metrics_log)
    if exit_code == 0:
        log.info("done: %d steps, EMA weights exported to %s", step, run_dir / "export")
    dist.shutdown(engine)
    return exit_code


def cli() -> int:
    """Console entry point."""
    warnings.filterwarnings("ignore", category=FutureWarning, message=r".*deprecated. Please use")
    return run_main(None, main)


if __name__ == "__main__":
    sys.exit(cli())
