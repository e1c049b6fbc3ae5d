"""Train the MAGVIT video tokenizer (generator) against a 3D discriminator with DeepSpeed.

    deepspeed --num_accelerators 2 launch/train_tokenizer.py --config configs/tokenizer/tiny.yaml \\
        [--deepspeed_config configs/deepspeed/zero2.json] [--run-dir DIR] \\
        [--resume auto|never] [--overwrite] [key.path=value ...]

Also runs under ``torchrun``, ``srun`` (one process per task) and as plain ``python`` (one process).

Generator and discriminator are two DeepSpeed engines with their own torch Adam optimizers (beta1 = 0,
beta2 = 0.99 as MAGVIT) and LR schedules. Each optimizer step is ``generator_step`` (reconstruction + quantizer +
perceptual + weighted GAN loss) followed, once the discriminator has started, by ``discriminator_step`` (GAN loss
on real vs. reconstructed clips + optional R1 and LeCam). The exported weights (``RUN_DIR/export``) are the EMA of
the generator. SIGTERM/SIGUSR1 finish the step, checkpoint and exit with status 3. Send them to the training
processes (srun and ``scancel --signal`` do): the deepspeed launcher answers SIGTERM by terminating its children
(they still checkpoint, within its 30 s grace period) and exits with status 1 itself.
"""

from __future__ import annotations

import sys
import warnings
from pathlib import Path
from typing import Any, Sequence

if __package__ in (None, ""):  # `python launch/train_tokenizer.py` / the deepspeed launcher: make magvit importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import torch

from magvit import distributed as dist
from magvit.cli import run_main
from magvit.checkpoint import CheckpointManager, export_ema, seed_everything
from magvit.training import (EMA, MetricsLogger, MetricsWindow, NonFiniteGuard, NonFiniteLossError,
                             TokenizerTrainConfig, UsageError, WarmupCosineSchedule, build_adam, load_train_config,
                             make_batch_stream, parse_train_command, precision_context, progress_bar,
                             resume_latest, start_run)

DEFAULT_CONFIG = "configs/tokenizer/tiny.yaml"


# --------------------------------------------------------------------------------------------------------------
# Configuration
# --------------------------------------------------------------------------------------------------------------
def load_config(config_path: str, overrides: Sequence[str], deepspeed_config: str | None = None
                ) -> TokenizerTrainConfig:
    """The resolved training config. The clip size of the model and discriminator follows ``data``
    (``num_frames``, ``image_size``); a size that does not fit either network is a ``ConfigError``."""
    from magvit.config import ConfigError
    from magvit.discriminator import DiscriminatorConfig
    from magvit.tokenizer import TokenizerConfig

    sections = {"model": TokenizerConfig, "discriminator": DiscriminatorConfig}
    cfg = load_train_config(TokenizerTrainConfig, config_path, overrides, sections, deepspeed_config)
    clip = {"num_frames": cfg.data.num_frames, "image_size": cfg.data.image_size}
    cfg = cfg.replace(model={**cfg.model, **clip}, discriminator={**cfg.discriminator, **clip})
    for name, cls in sections.items():
        try:
            cls.from_dict(getattr(cfg, name))
        except ConfigError as err:
            raise ConfigError(f"{name} (with data.num_frames/image_size): {err}") from None
    if cfg.loss.perceptual_weight > 0 and not cfg.loss.perceptual_model:
        raise ConfigError("loss.perceptual_weight > 0 needs loss.perceptual_model (a local ResNet-50 folder)")
    if cfg.init_from:  # before any process group or run dir exists: names and shapes from the export's header
        from magvit.tokenizer import check_init_from

        try:
            check_init_from(TokenizerConfig.from_dict(cfg.model), cfg.init_from, cfg.inflate)
        except (ValueError, FileNotFoundError) as err:
            raise ConfigError(f"init_from: {err}") from None
    return cfg


class LastLayerInput:
    """Keeps the input of the decoder's last conv from the latest forward (for the adaptive GAN weight)."""

    def __init__(self, layer: torch.nn.Module):
        self.value: torch.Tensor | None = None
        self.handle = layer.register_forward_hook(self._hook)

    def _hook(self, module, inputs, output) -> None:
        self.value = inputs[0].detach()


# --------------------------------------------------------------------------------------------------------------
# The two steps
# --------------------------------------------------------------------------------------------------------------
def generator_step(g_engine, discriminator: torch.nn.Module, video: torch.Tensor, step: int,
                   cfg: TokenizerTrainConfig, perceptual, guard: NonFiniteGuard, autocast,
                   last_input: LastLayerInput | None) -> tuple[dict[str, float], torch.Tensor] | None:
    """One generator micro-step on ``video`` (B, 3, T, H, W). Returns (metrics, reconstruction detached), or None
    when a non-finite loss on any rank made every rank skip it.

    The pixel-space losses are evaluated on a detached copy of the reconstruction, and their gradient with respect
    to it is pushed into the generator with ``engine.backward(<recon, dL/drecon> + quantizer_loss)``: the same
    parameter gradients as back-propagating the loss itself, but the discriminator's parameters never receive
    gradients and the adaptive GAN weight needs no extra pass through the engine's backward hooks (gradient norms
    at the decoder's last layer come from re-running that one conv on its saved input).
    """
    from magvit import losses

    lc = cfg.loss
    with autocast:
        recon, stats = g_engine(video)  # (B, 3, T, H, W), {"quantizer_loss": scalar, ...}
    recon_leaf = recon.detach().requires_grad_(True)
    rec = losses.reconstruction_loss(video, recon_leaf, lc.recon_loss)
    nll = lc.recon_weight * rec
    metrics: dict[str, float] = {"g/recon": rec.item()}
    if lc.perceptual_weight > 0:
        with autocast:
            perc = perceptual(video, recon_leaf)
        nll = nll + lc.perceptual_weight * perc.float()
        metrics["g/perceptual"] = perc.item()
    (grad,) = torch.autograd.grad(nll, recon_leaf)  # (B, 3, T, H, W)
    loss = nll.detach() + stats["quantizer_loss"].detach().float()
    if losses.discriminator_active(step, lc.disc_start):
        with autocast:
            fake_logits = discriminator(recon_leaf)  # (B,)
        g_gan = losses.generator_loss(fake_logits, lc.gan_loss)
        (gan_grad,) = torch.autograd.grad(g_gan, recon_leaf)
        if lc.adaptive_gan_weight and last_input is not None:
            last_layer = g_engine.module.decoder.conv_out
            with autocast:
                out = last_layer(last_input.value)  # recon again, as a function of the last layer only
            weight = lc.gan_weight * losses.adaptive_gan_weight(
                (out.float() * grad.float()).sum(), (out.float() * gan_grad.float()).sum(), last_layer.weight)
        else:
            weight = torch.tensor(float(lc.gan_weight))
        grad = grad + weight.to(gan_grad) * gan_grad
        loss = loss + weight.float() * g_gan.detach()
        metrics.update({"g/gan": g_gan.item(), "g/gan_weight": float(weight)})
    metrics["g/loss"] = loss.item()
    for key, value in stats.items():
        if isinstance(value, torch.Tensor) and value.numel() == 1:
            metrics[f"quantizer/{key}"] = value.item()
    if not guard.check(metrics["g/loss"], step, dist.all_reduce_max):
        return None
    surrogate = (recon.float() * grad.float()).sum() + stats["quantizer_loss"].float()
    g_engine.backward(surrogate)
    g_engine.step()
    return metrics, recon.detach()


def discriminator_step(d_engine, video: torch.Tensor, recon: torch.Tensor, step: int, cfg: TokenizerTrainConfig,
                       lecam, guard: NonFiniteGuard, autocast) -> dict[str, float] | None:
    """One discriminator micro-step: real ``video`` vs. the generator's ``recon`` (both (B, 3, T, H, W)).
    Returns metrics, or None when skipped for a non-finite loss."""
    from magvit import losses

    lc = cfg.loss
    real = video.detach()
    with autocast:
        logits = d_engine(torch.cat([real, recon.detach().to(real.dtype)]))  # (2B,): one pass for both halves
    real_logits, fake_logits = logits.chunk(2)
    d_gan = losses.discriminator_loss(real_logits, fake_logits, lc.gan_loss)
    loss = d_gan
    metrics = {"d/gan": d_gan.item(), "d/real_logits": real_logits.float().mean().item(),
               "d/fake_logits": fake_logits.float().mean().item()}
    if lc.r1_weight > 0:
        # Its own pass through the plain module: autograd.grad through the engine's forward would run DeepSpeed's
        # gradient-reduction epilogue mid-step. The penalty's graph still reaches D's parameters via backward.
        real_r1 = video.detach().requires_grad_(True)
        with autocast:
            r1_logits = d_engine.module(real_r1)  # (B,)
        r1 = losses.r1_penalty(r1_logits, real_r1)
        loss = loss + lc.r1_weight * r1  # MAGVIT: r1_weight * E||grad_x D(x)||^2 (10 for B / L), no 1/2
        metrics["d/r1"] = r1.item()
    if lc.lecam_weight > 0:
        reg = lecam(real_logits, fake_logits)
        loss = loss + lc.lecam_weight * reg
        metrics["d/lecam"] = reg.item()
    metrics["d/loss"] = loss.item()
    if not guard.check(metrics["d/loss"], step, dist.all_reduce_max):
        return None
    d_engine.backward(loss)
    d_engine.step()
    return metrics


# --------------------------------------------------------------------------------------------------------------
# Validation samples and export (rank 0, EMA weights in a plain copy: no collectives)
# --------------------------------------------------------------------------------------------------------------
def ema_copy(model_cfg, ema: EMA, live: torch.nn.Module) -> torch.nn.Module:
    """A plain fp32 tokenizer with the EMA weights and the live model's buffers (e.g. codebook statistics)."""
    from magvit.tokenizer import VideoTokenizer

    with torch.random.fork_rng(devices=[]):  # building it must not move the training RNG (exact resume)
        model = VideoTokenizer(model_cfg)
    buffers = dict(live.named_buffers())
    with torch.no_grad():
        for name, buf in model.named_buffers():
            if name in buffers and buffers[name].shape == buf.shape:
                buf.copy_(buffers[name].detach().to("cpu", buf.dtype))
    ema.copy_to(model)
    return model.eval()


@torch.no_grad()
def validate(model: torch.nn.Module, val_videos: torch.Tensor, samples_dir: Path, step: int,
             fps: float) -> dict[str, float]:
    """Reconstruct the validation clips (V, 3, T, H, W); write ``step_XXXXXXXX.mp4`` (real | reconstruction side
    by side, clips one after another) and a PNG grid (rows: real, reconstruction, ...). Returns PSNR."""
    from magvit.metrics import video_psnr
    from magvit.video_io import save_frame_grid, write_video

    recon = model(val_videos)[0].float().clamp(-1, 1)
    psnr = video_psnr(recon, val_videos).mean().item()
    pairs = torch.cat([val_videos, recon], dim=-1)  # (V, 3, T, H, 2W)
    movie = torch.cat(list(pairs), dim=1)  # (3, V*T, H, 2W)
    write_video(samples_dir / f"step_{step:08d}.mp4", movie, fps=fps)
    rows = [v for pair in zip(val_videos, recon) for v in pair]
    save_frame_grid(samples_dir / f"step_{step:08d}.png", rows)
    return {"val/psnr": psnr}


def load_val_videos(cfg: TokenizerTrainConfig, num: int) -> torch.Tensor:
    """The first ``num`` validation clips (center crops); the train split if the manifest has no val records."""
    from magvit.data import ClipDataset

    d = cfg.data
    kwargs = dict(num_frames=d.num_frames, image_size=d.image_size, frame_stride=d.frame_stride, seed=cfg.train.seed)
    dataset = ClipDataset(d.manifest, "val", **kwargs)
    if len(dataset) == 0:
        dataset = ClipDataset(d.manifest, "train", random_start=False, random_crop=False, **kwargs)
    items = [dataset[i]["video"] for i in range(min(num, len(dataset)))]
    return torch.stack(items) if items else torch.empty(0)


# --------------------------------------------------------------------------------------------------------------
# Main
# --------------------------------------------------------------------------------------------------------------
def main(argv: Sequence[str] | None = None) -> int:
    args, cfg, ds_base = parse_train_command(__doc__.split("\n")[0], DEFAULT_CONFIG, "tokenizer", load_config, argv)
    if cfg.data.format == "files" and not Path(cfg.data.manifest).is_file():
        raise UsageError(f"manifest not found: {cfg.data.manifest} (make one with `python -m data_prep.sample_data "
                         f"--out data/sample` or set data.manifest=...)")
    return train(cfg, ds_base, args.run_dir, resume=args.resume == "auto" and not args.overwrite,
                 argv=sys.argv if argv is None else argv, overwrite=args.overwrite)


def train(cfg: TokenizerTrainConfig, ds_base: dict[str, Any], run_dir: Path, resume: bool,
          argv: Sequence[str], overwrite: bool = False) -> int:
    from magvit.data import ClipDataset
    from magvit.streaming import ShardStream
    from magvit.discriminator import Discriminator, DiscriminatorConfig
    from magvit.losses import LeCamRegularizer, PerceptualLoss
    from magvit.model_card import TrainingRecord
    from magvit.tokenizer import TokenizerConfig, init_tokenizer

    # from here on SIGTERM/SIGUSR1 mean "checkpoint and exit 3"
    run = start_run(cfg, ds_base, run_dir, argv, "magvit.train_tokenizer", resume=resume,
                    overwrite=overwrite)
    rank, world, device, stage, log = run.rank, run.world_size, run.device, run.zero_stage, run.log
    tc = cfg.train

    # --- networks: identical initial weights on every rank, then per-rank randomness ---------------------------
    seed_everything(tc.seed)
    model_cfg = TokenizerConfig.from_dict(cfg.model)
    try:  # fresh, fine-tuned from an export (init_from) or inflated from a 2D export (init_from + inflate)
        generator = init_tokenizer(model_cfg, cfg.init_from, cfg.inflate)
    except (ValueError, FileNotFoundError) as err:
        raise UsageError(f"init_from: {err}") from None
    discriminator = Discriminator(DiscriminatorConfig.from_dict(cfg.discriminator))
    ema = EMA(generator, tc.ema_decay, warmup=tc.ema_warmup)  # fp32 full copy, before ZeRO partitions anything
    perceptual = PerceptualLoss(cfg.loss.perceptual_model or None).to(device)
    lecam = LeCamRegularizer(cfg.loss.lecam_decay).to(device)
    seed_everything(tc.seed + rank)

    g_opt = build_adam(generator, cfg.optim)
    d_opt = build_adam(discriminator, cfg.disc_optim)
    g_sched = WarmupCosineSchedule(g_opt, tc.warmup_steps, tc.max_steps, tc.min_lr_ratio)
    d_sched = WarmupCosineSchedule(d_opt, tc.warmup_steps, max(1, tc.max_steps - cfg.loss.disc_start),
                                   tc.min_lr_ratio)
    g_engine = dist.build_engine(generator, g_opt, run.ds_config, g_sched)
    d_engine = dist.build_engine(discriminator, d_opt, run.ds_config, d_sched)
    engines = {"generator": g_engine, "discriminator": d_engine}
    dtype = torch.bfloat16 if tc.precision == "bf16" else torch.float32
    autocast = precision_context(tc.precision, device)
    last_input = LastLayerInput(g_engine.module.decoder.conv_out) if cfg.loss.adaptive_gan_weight else None

    # --- data ----------------------------------------------------------------------------------------------------
    d = cfg.data
    source = d.manifest if d.format == "files" else d.shards
    try:
        if d.format == "webdataset":  # clips of data_prep.extract --format webdataset, streamed, random crops
            train_set = ShardStream(d.shards, "clips", d.batch_size, rank, world, d.num_workers, tc.seed,
                                    d.shuffle_buffer, image_size=d.image_size, random_crop=True, hflip=d.hflip)
            if int(train_set.meta.get("num_frames", d.num_frames)) != d.num_frames:
                raise ValueError(f"clips of {train_set.meta['num_frames']} frames, data.num_frames is {d.num_frames}")
        else:
            train_set = ClipDataset(d.manifest, "train", num_frames=d.num_frames, image_size=d.image_size,
                                    frame_stride=d.frame_stride, hflip=d.hflip, seed=tc.seed,
                                    clips_per_video=d.clips_per_video)
        stream = make_batch_stream(train_set, d, rank, world, tc.seed, device)
    except (ValueError, FileNotFoundError) as err:  # e.g. too few clips for one global batch
        raise UsageError(f"{source}: {err}") from None
    num_clips = train_set.num_examples if d.format == "webdataset" else len(train_set)
    # validation clips come from the manifest (a streaming run without one validates nothing)
    has_val = d.val_clips > 0 and Path(d.manifest).is_file()
    val_videos = load_val_videos(cfg, d.val_clips) if rank == 0 and has_val else None

    # --- resume ----------------------------------------------------------------------------------------------------
    ckpt = CheckpointManager(run_dir / "checkpoints", keep_last=cfg.checkpoint.keep_last)
    ckpt.clean_stale()
    guard = NonFiniteGuard(tc.max_nonfinite_steps)
    resumed = resume_latest(ckpt, engines, ema, stream, guard, run) if resume else None
    step = int(resumed["step"]) if resumed is not None else 0
    if resumed is not None:
        lecam.ema_real.fill_(resumed["lecam"][0])
        lecam.ema_fake.fill_(resumed["lecam"][1])
    last_eval: dict[str, float] = {}  # the last validation numbers (val/psnr), for the export's model card

    def save(at_step: int) -> None:
        state = {"data": stream.state_dict(), "lecam": [lecam.ema_real.item(), lecam.ema_fake.item()],
                 **guard.state_dict(), "config": cfg.to_dict()}
        ckpt.save(at_step, engines, state, ema)
        if rank == 0:
            export_ema(ema_copy(model_cfg, ema, g_engine.module), ema, run_dir / "export",
                       TrainingRecord(str(source), num_clips, at_step, dict(last_eval)))
        dist.barrier()

    # --- loop ------------------------------------------------------------------------------------------------------
    metrics_log = MetricsLogger(run_dir, enabled=rank == 0, tensorboard=cfg.logging.tensorboard)
    bar = progress_bar(tc.max_steps, step, enabled=rank == 0 and cfg.logging.progress)
    window = MetricsWindow(metrics_log, bar, d.batch_size * world * tc.grad_accum_steps, "perf/clips_per_s",
                           loss_key="g/loss", rate_label="clips_s")
    exit_code, micro = 0, 0
    last_saved = step if resumed is not None else -1
    log.info("training %s for %d steps on %d rank(s), ZeRO-%d, %s, run dir %s", model_cfg.__class__.__name__,
             tc.max_steps, world, stage, tc.precision, run_dir)
    try:
        while step < tc.max_steps:
            if micro == 0 and run.checkpoint_if_preempted(step, last_saved, save):  # only between optimizer steps
                exit_code = dist.EXIT_CODE_PREEMPTED
                break
            batch = next(stream)
            video = batch["video"].to(device, dtype, non_blocking=True)  # (B, 3, T, H, W)
            boundary = g_engine.is_gradient_accumulation_boundary()
            lrs = {"lr/generator": g_engine.get_lr()[0], "lr/discriminator": d_engine.get_lr()[0]}  # this step's
            out = generator_step(g_engine, d_engine.module, video, step, cfg, perceptual, guard, autocast,
                                 last_input)
            if out is None:
                metrics_log.log(step, {"nonfinite_skipped": guard.total_skipped}, event="nonfinite_loss")
                log.warning("non-finite generator loss at step %d: micro-batch skipped (%d in a row)", step,
                            guard.consecutive)
                continue
            g_metrics, recon = out
            d_metrics = {}
            if step >= cfg.loss.disc_start:
                d_out = discriminator_step(d_engine, video, recon, step, cfg, lecam, guard, autocast)
                if d_out is None:  # with accumulation, the discriminator's step then takes one more micro-batch
                    metrics_log.log(step, {"nonfinite_skipped": guard.total_skipped}, event="nonfinite_loss")
                    log.warning("non-finite discriminator loss at step %d: its micro-batch skipped", step)
                else:
                    d_metrics = d_out
            window.add({**g_metrics, **d_metrics})
            micro = 0 if boundary else micro + 1
            if not boundary:
                continue

            # --- an optimizer step is complete ------------------------------------------------------------------------
            with dist.gathered_parameters(g_engine.module, stage):
                ema.update(g_engine.module)
            step += 1
            run.count_skipped_step(g_engine, step, guard, metrics_log)  # overflowing gradients: no update
            window.end_step()
            if step % cfg.logging.log_every == 0 or step == tc.max_steps:
                window.log(step, lrs, stream.epoch)
            if val_videos is not None and (cfg.logging.sample_every and step % cfg.logging.sample_every == 0
                                           or step == tc.max_steps):
                model = ema_copy(model_cfg, ema, g_engine.module).to(device)
                last_eval.update(validate(model, val_videos.to(device), run_dir / "samples", step, fps=8.0))
                metrics_log.log(step, last_eval)
            if step % cfg.checkpoint.every == 0 or step == tc.max_steps:
                save(step)
                last_saved = step
    except NonFiniteLossError as err:
        exit_code = run.stop_for_nonfinite(err, step, guard, metrics_log)
    finally:
        run.close(bar, metrics_log)
    if exit_code == 0 and rank == 0:
        log.info("done: %d steps, EMA weights exported to %s", step, run_dir / "export")
    dist.shutdown(g_engine, d_engine)
    return exit_code


def cli() -> int:
    """Console entry point."""
    warnings.filterwarnings("ignore", category=FutureWarning, message=r".*deprecated. Please use")
    return run_main(None, main)


if __name__ == "__main__":
    sys.exit(cli())
