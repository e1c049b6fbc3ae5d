"""Train the masked video transformer on token shards with DeepSpeed.

    deepspeed --num_accelerators 2 launch/train_transformer.py --config configs/transformer/tiny.yaml \\
        [--deepspeed_config configs/deepspeed/zero2.json] [--run-dir DIR] [--resume auto] [key.path=value ...]

Also runs under ``torchrun``, ``srun`` (one process per task) and as plain ``python`` (one process).

The token shards come from ``python -m data_prep.tokenize``; their ``meta.json`` fixes the model's codebook size,
token grid and number of classes. Each step draws a task (COMMIT condition, sketch, class, unconditional) and a
mask ratio from the mask schedule per example (``masking.make_training_batch``) and minimises the masked-token
cross-entropy. The exported weights (``RUN_DIR/export``) are the EMA of the transformer. SIGTERM/SIGUSR1 finish
the step, checkpoint and exit with status 3 (send them to the training processes, as srun does; see
``train_tokenizer.py``).
"""

from __future__ import annotations

import contextlib
import json
import math
import sys
import time
import warnings
from pathlib import Path
from typing import Any, Sequence

if __package__ in (None, ""):  # `python launch/train_transformer.py` / the deepspeed launcher
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch

from magvit import distributed as dist
from magvit.checkpoint import CheckpointManager, export_ema, latest_checkpoint, seed_everything
from magvit.training import (EMA, BatchStream, MetricsLogger, NonFiniteGuard, NonFiniteLossError,
                             ResumableDistributedSampler, TransformerTrainConfig, UsageError, WarmupCosineSchedule,
                             build_adam, build_arg_parser, load_train_config, parse_args, run_cli, setup_run_dir)

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
    if not meta_path.is_file():
        raise UsageError(f"token shards not found: {meta_path} (make them with `python -m data_prep.tokenize`, "
                         "or set data.tokens=DIR)")
    try:
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


def precision_context(precision: str, device: torch.device):
    if precision == "autocast-bf16":
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def transformer_step(engine, batch: dict[str, Any], step: int, cfg: TransformerTrainConfig, vocab,
                     guard: NonFiniteGuard, autocast) -> dict[str, float] | None:
    """One micro-step: mask the batch's video tokens, predict them, back-propagate the masked-token loss.
    Returns metrics, or None when a non-finite loss on any rank made every rank skip it."""
    from magvit.masking import make_training_batch, masked_token_loss

    m = cfg.masking
    tb = make_training_batch(batch, vocab, tasks=m.tasks, schedule=m.schedule, cond_dropout_prob=m.cond_dropout_prob,
                             unmasked_weight=m.unmasked_weight)  # randomness from the (checkpointed) global RNG
    with autocast:
        logits = engine(tb.input_ids)  # (B, L, vocab)
    loss = masked_token_loss(logits, tb.labels, tb.loss_mask, vocab.codebook_size, m.label_smoothing)
    with torch.no_grad():
        masked = tb.input_ids == vocab.mask_token  # (B, L): the positions to predict
        hits = (logits[..., :vocab.codebook_size].argmax(-1) == tb.labels) & masked
        accuracy = hits.sum().item() / max(1, masked.sum().item())
    metrics = {"loss": loss.item(), "masked_accuracy": accuracy}
    if not guard.check(metrics["loss"], step, dist.all_reduce_max):
        return None
    engine.backward(loss)
    engine.step()
    return metrics


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_arg_parser(__doc__.split("\n")[0], DEFAULT_CONFIG)
    args = parse_args(parser, argv)
    cfg = load_config(args.config, args.overrides, args.deepspeed_config)
    try:
        ds_base = dist.load_deepspeed_config(cfg.train.deepspeed_config)
    except ValueError as err:
        raise UsageError(str(err)) from None
    cfg = with_token_sizes(cfg)
    run_dir = Path(args.run_dir or Path("runs") / "transformer" / Path(args.config).stem)
    return train(cfg, ds_base, run_dir, resume=args.resume == "auto", argv=sys.argv if argv is None else argv)


def train(cfg: TransformerTrainConfig, ds_base: dict[str, Any], run_dir: Path, resume: bool,
          argv: Sequence[str]) -> int:
    from magvit.data import TokenShardDataset
    from magvit.transformer import MaskedVideoTransformer, TransformerConfig

    env = dist.init_distributed()
    preempt = dist.PreemptionHandler().install()  # from here on SIGTERM/SIGUSR1 mean "checkpoint and exit 3"
    rank, world = env.rank, env.world_size
    device = dist.device()
    tc = cfg.train
    ds_config = dist.make_deepspeed_config(ds_base, micro_batch_size=cfg.data.batch_size,
                                           grad_accum_steps=tc.grad_accum_steps, grad_clip=cfg.optim.grad_clip,
                                           precision=tc.precision, zero_stage=tc.zero_stage, world_size=world)
    stage = ds_config["zero_optimization"]["stage"]
    if rank == 0:
        setup_run_dir(run_dir, cfg, ds_config, argv)
    dist.barrier()
    log = dist.rank_zero_logger("magvit.train_transformer", rank, run_dir / "logs" / f"rank{rank}.log")

    seed_everything(tc.seed)  # identical initial weights on every rank
    model_cfg = TransformerConfig.from_dict(cfg.model)
    model = MaskedVideoTransformer(model_cfg)
    ema = EMA(model, tc.ema_decay, warmup=tc.ema_warmup)
    seed_everything(tc.seed + rank)
    optimizer = build_adam(model, cfg.optim)
    schedule = WarmupCosineSchedule(optimizer, tc.warmup_steps, tc.max_steps, tc.min_lr_ratio)
    engine = dist.build_engine(model, optimizer, ds_config, schedule)
    autocast = precision_context(tc.precision, device)
    vocab = model_cfg.vocab

    d = cfg.data
    try:
        dataset = TokenShardDataset(d.tokens)
        sampler = ResumableDistributedSampler(len(dataset), rank, world, d.batch_size, seed=tc.seed)
    except (ValueError, FileNotFoundError) as err:  # e.g. too few examples for one global batch
        raise UsageError(f"{d.tokens}: {err}") from None

    def make_loader(s):
        return torch.utils.data.DataLoader(dataset, batch_size=d.batch_size, sampler=s, drop_last=True,
                                           num_workers=d.num_workers, pin_memory=device.type == "cuda",
                                           generator=torch.Generator().manual_seed(tc.seed + rank))

    stream = BatchStream(dataset, sampler, make_loader)

    ckpt = CheckpointManager(run_dir / "checkpoints", keep_last=cfg.checkpoint.keep_last)
    ckpt.clean_stale()
    guard = NonFiniteGuard(tc.max_nonfinite_steps)
    step = 0
    latest = latest_checkpoint(ckpt.root) if resume else None
    if latest is not None:
        state = ckpt.load(latest, {"transformer": engine}, ema)
        step = int(state["step"])
        stream.epoch, stream.batch = state["data"]["epoch"], state["data"]["batch"]
        guard.total_skipped = int(state.get("nonfinite_skipped", 0))
        if state.get("rng_restored") is False:
            log.warning("checkpoint was written with another world size: RNG streams restart from the seed")
            seed_everything(tc.seed + rank + 7919 * step)
        log.info("resumed from %s (step %d, epoch %d, batch %d)", latest, step, stream.epoch, stream.batch)
    elif resume:
        log.info("no checkpoint in %s: starting fresh", ckpt.root)

    def save(at_step: int) -> None:
        ckpt.save(at_step, {"transformer": engine},
                  {"data": stream.state_dict(), "nonfinite_skipped": guard.total_skipped, "config": cfg.to_dict()},
                  ema)
        if rank == 0:
            with torch.random.fork_rng(devices=[]):  # must not move the training RNG (exact resume)
                plain = MaskedVideoTransformer(model_cfg)
            export_ema(plain, ema, run_dir / "export")
        dist.barrier()

    metrics_log = MetricsLogger(run_dir, enabled=rank == 0, tensorboard=cfg.logging.tensorboard)
    examples_per_step = d.batch_size * world * tc.grad_accum_steps
    from tqdm import tqdm

    bar = tqdm(total=tc.max_steps, initial=step, disable=rank != 0 or not cfg.logging.progress, unit="step",
               dynamic_ncols=True)
    window: dict[str, list[float]] = {}
    t_last, steps_since = time.perf_counter(), 0
    exit_code, micro = 0, 0
    last_saved = step if latest is not None else -1
    log.info("training MaskedVideoTransformer (%.1fM parameters) for %d steps on %d rank(s), ZeRO-%d, %s, run dir %s",
             sum(p.numel() for p in ema.shadow.values()) / 1e6, tc.max_steps, world, stage, tc.precision, run_dir)
    try:
        while step < tc.max_steps:
            if micro == 0 and preempt.should_stop():
                log.warning("signal received: checkpointing at step %d and exiting with status %d", step,
                            dist.EXIT_CODE_PREEMPTED)
                if last_saved != step:
                    save(step)
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
            for key, value in out.items():
                window.setdefault(key, []).append(value)
            micro = 0 if boundary else micro + 1
            if not boundary:
                continue

            with dist.gathered_parameters(engine.module, stage):
                ema.update(engine.module)
            step += 1
            steps_since += 1
            bar.update(1)
            if step % cfg.logging.log_every == 0 or step == tc.max_steps:
                keys = sorted(window)
                means = dict(zip(keys, dist.all_reduce_mean([sum(window[k]) / len(window[k]) for k in keys])))
                elapsed = time.perf_counter() - t_last
                means.update({"lr": lr, "perf/examples_per_s": examples_per_step * steps_since / elapsed,
                              "perf/step_s": elapsed / steps_since, "epoch": stream.epoch})
                peaks = dist.all_gather_scalar(dist.peak_memory_mb())
                means.update({"mem/peak_mb_max": max(peaks), "mem/peak_mb_min": min(peaks)})
                metrics_log.log(step, means)
                bar.set_postfix(loss=f"{means.get('loss', math.nan):.4f}",
                                ex_s=f"{means['perf/examples_per_s']:.1f}")
                window, t_last, steps_since = {}, time.perf_counter(), 0
            if step % cfg.checkpoint.every == 0 or step == tc.max_steps:
                save(step)
                last_saved = step
    except NonFiniteLossError as err:
        metrics_log.log(step, {"nonfinite_skipped": guard.total_skipped}, event="nonfinite_stop")
        log.error("%s", err)
        exit_code = 1
    finally:
        bar.close()
        preempt.uninstall()
        metrics_log.close()
    if exit_code == 0:
        log.info("done: %d steps, EMA weights exported to %s", step, run_dir / "export")
    dist.shutdown(engine)
    return exit_code


if __name__ == "__main__":
    warnings.filterwarnings("ignore", category=FutureWarning, message=r".*deprecated. Please use")
    sys.exit(run_cli(main))
