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
from magvit import losses
from magvit.batches import clip_batches
from magvit.checkpoint import seed_everything
from magvit.cli import UsageError, run_main
from magvit.config import ConfigError
from magvit.discriminator import Discriminator
from magvit.ema import EMA
from magvit.optim import WarmupCosineSchedule, build_adam
from magvit.resume import start_run
from magvit.run_config import TokenizerTrainConfig, load_train_config, parse_train_command
from magvit.tokenizer import TokenizerConfig, VideoTokenizer, check_init_from, init_tokenizer
from magvit.tracking import Tracker
from magvit.precision import autocast as precision_autocast
from magvit.trainloop import NonFiniteGuard, Reporting, TrainLoop
from magvit.metrics import video_psnr
from magvit.video_io import save_frame_grid, write_video
from magvit.data import ClipDataset

DEFAULT_CONFIG = "configs/tokenizer/tiny.yaml"
REPORTING = Reporting("VideoTokenizer", loss_key="g/loss", rate_key="perf/clips_per_s", rate_label="clips_s",
                      lr_keys={"generator": "lr/generator", "discriminator": "lr/discriminator"})


# --------------------------------------------------------------------------------------------------------------
# Configuration
# --------------------------------------------------------------------------------------------------------------
def load_config(config_path: str, overrides: Sequence[str], deepspeed_config: str | None = None
                ) -> TokenizerTrainConfig:
    """The resolved training config (the clip size of the model and discriminator follows ``data``). An
    ``init_from`` export whose weights do not fit ``model`` is a ``ConfigError`` (from its header only)."""
    cfg = load_train_config(TokenizerTrainConfig, config_path, overrides, deepspeed_config)
    if cfg.init_from:  # before any process group or run dir exists
        try:
            check_init_from(cfg.model, cfg.init_from, cfg.inflate)
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
        last_layer, rec_term, gan_term = g_engine.module.decoder.conv_out, None, None
        if last_input is not None:  # the adaptive weight's two losses, as functions of the last layer only
            with autocast:
                out = last_layer(last_input.value)  # recon again
            rec_term, gan_term = (out.float() * grad.float()).sum(), (out.float() * gan_grad.float()).sum()
        weight = losses.gan_weight(step, lc.disc_start, lc.gan_weight, adaptive=last_input is not None,
                                   rec_loss=rec_term, gan_loss=gan_term, last_layer=last_layer.weight)
        grad = grad + weight.to(gan_grad) * gan_grad
        loss = loss + weight.float() * g_gan.detach()
        metrics.update({"g/gan": g_gan.item(), "g/gan_weight": float(weight)})
    metrics["g/loss"] = loss.item()
    for key, value in stats.items():
        if isinstance(value, torch.Tensor) and value.numel() == 1:
            metrics[f"quantizer/{key}"] = value.item()
    if not guard.check(metrics["g/loss"], step, dist.all_reduce_max, name="generator loss"):
        return None
    surrogate = (recon.float() * grad.float()).sum() + stats["quantizer_loss"].float()
    g_engine.backward(surrogate)
    g_engine.step()
    return metrics, recon.detach()


def discriminator_step(d_engine, video: torch.Tensor, recon: torch.Tensor, step: int, cfg: TokenizerTrainConfig,
                       lecam, guard: NonFiniteGuard, autocast) -> dict[str, float] | None:
    """One discriminator micro-step: real ``video`` vs. the generator's ``recon`` (both (B, 3, T, H, W)).
    Returns metrics, or None when skipped for a non-finite loss."""
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
    if not guard.check(metrics["d/loss"], step, dist.all_reduce_max, name="discriminator loss"):
        return None
    d_engine.backward(loss)
    d_engine.step()
    return metrics


# --------------------------------------------------------------------------------------------------------------
# Validation samples and export (rank 0, EMA weights in a plain copy: no collectives)
# --------------------------------------------------------------------------------------------------------------
def ema_copy(model_cfg: TokenizerConfig, ema: EMA, live: torch.nn.Module) -> torch.nn.Module:
    """A plain fp32 tokenizer with the EMA weights and the live model's buffers (e.g. codebook statistics)."""
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
             fps: float, tracker: Tracker) -> dict[str, float]:
    """Reconstruct the validation clips (V, 3, T, H, W); write ``step_XXXXXXXX.mp4`` (real | reconstruction side
    by side, clips one after another) and a PNG grid (rows: real, reconstruction, ...), and give the same video and
    the middle frames to the run's tracker (TensorBoard / W&B). Returns PSNR."""
    recon = model(val_videos)[0].float().clamp(-1, 1)
    psnr = video_psnr(recon, val_videos).mean().item()
    pairs = torch.cat([val_videos, recon], dim=-1)  # (V, 3, T, H, 2W)
    movie = torch.cat(list(pairs), dim=1)  # (3, V*T, H, 2W)
    write_video(samples_dir / f"step_{step:08d}.mp4", movie, fps=fps)
    rows = [v for pair in zip(val_videos, recon) for v in pair]
    save_frame_grid(samples_dir / f"step_{step:08d}.png", rows)
    tracker.log_video(step, "val/real_vs_reconstruction", pairs, fps)
    tracker.log_images(step, "val/frames", torch.stack([v[:, v.shape[1] // 2] for v in rows]))  # (2V, 3, H, W)
    return {"val/psnr": psnr}


def load_val_videos(cfg: TokenizerTrainConfig, num: int) -> torch.Tensor:
    """The first ``num`` validation clips (center crops); the train split if the manifest has no val records."""

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
    lc = cfg.loss
    try:  # a perceptual network that cannot be loaded is one line before the run dir is written
        perceptual = losses.PerceptualLoss(lc.perceptual_model or None)
    except (ValueError, OSError) as err:
        raise UsageError(f"loss.perceptual_model: {' '.join(str(err).split())}") from None
    # from here on SIGTERM/SIGUSR1 mean "checkpoint and exit 3"
    run = start_run(cfg, ds_base, run_dir, argv, "magvit.train_tokenizer", resume=resume, overwrite=overwrite)
    tc, device = cfg.train, run.device

    # --- networks: identical initial weights on every rank, then per-rank randomness ---------------------------
    seed_everything(tc.seed)
    try:  # fresh, fine-tuned from an export (init_from) or inflated from a 2D export (init_from + inflate)
        generator = init_tokenizer(cfg.model, cfg.init_from, cfg.inflate)
    except (ValueError, FileNotFoundError) as err:
        raise UsageError(f"init_from: {err}") from None
    discriminator = Discriminator(cfg.discriminator)
    ema = EMA(generator, tc.ema_decay, warmup=tc.ema_warmup)  # fp32 full copy, before ZeRO partitions anything
    if tc.compile:  # in place: parameter names (EMA, checkpoints, exports) unchanged
        generator.compile()
    perceptual = perceptual.to(device)
    lecam = losses.LeCamRegularizer(lc.lecam_decay).to(device)
    seed_everything(tc.seed + run.rank)

    g_opt = build_adam(generator, cfg.optim)
    d_opt = build_adam(discriminator, cfg.disc_optim)
    g_sched = WarmupCosineSchedule(g_opt, tc.warmup_steps, tc.max_steps, tc.min_lr_ratio)
    d_sched = WarmupCosineSchedule(d_opt, tc.warmup_steps, max(1, tc.max_steps - lc.disc_start), tc.min_lr_ratio)
    g_engine = dist.build_engine(generator, g_opt, run.ds_config, g_sched)
    d_engine = dist.build_engine(discriminator, d_opt, run.ds_config, d_sched)
    dtype = torch.bfloat16 if tc.precision == "bf16" else torch.float32
    autocast = precision_autocast(tc.precision, device)
    last_input = LastLayerInput(g_engine.module.decoder.conv_out) if lc.adaptive_gan_weight else None

    # --- data: training clips; validation clips from the manifest (a streaming run without one validates none) ---
    data = clip_batches(cfg.data, run.rank, run.world_size, tc.seed, device)
    has_val = cfg.data.val_clips > 0 and Path(cfg.data.manifest).is_file()
    val_videos = load_val_videos(cfg, cfg.data.val_clips) if run.rank == 0 and has_val else None

    def restore_lecam(state: dict[str, Any]) -> None:
        lecam.ema_real.fill_(state["lecam"][0])
        lecam.ema_fake.fill_(state["lecam"][1])

    loop = TrainLoop(run, cfg, run_dir, {"generator": g_engine, "discriminator": d_engine}, ema, data,
                     export_model=lambda: ema_copy(cfg.model, ema, g_engine.module), reporting=REPORTING,
                     extra_state=lambda: {"lecam": [lecam.ema_real.item(), lecam.ema_fake.item()]},
                     restore_extra=restore_lecam)

    def micro_step(batch: dict[str, Any], step: int) -> dict[str, float] | None:
        video = batch["video"].to(device, dtype, non_blocking=True)  # (B, 3, T, H, W)
        out = generator_step(g_engine, d_engine.module, video, step, cfg, perceptual, loop.guard, autocast,
                             last_input)
        if out is None:  # skipped for a non-finite loss
            return None
        g_metrics, recon = out
        if not losses.discriminator_active(step, lc.disc_start):
            return g_metrics
        # a skipped discriminator micro-batch: with accumulation, its optimizer step takes one more
        d_metrics = discriminator_step(d_engine, video, recon, step, cfg, lecam, loop.guard, autocast)
        return {**g_metrics, **(d_metrics or {})}

    def sample(step: int) -> dict[str, float]:
        model = ema_copy(cfg.model, ema, g_engine.module).to(device)
        return validate(model, val_videos.to(device), run_dir / "samples", step, fps=8.0, tracker=loop.tracker)

    return loop.run(micro_step, resume, sample=sample if val_videos is not None else None)


def cli() -> int:
    """Console entry point."""
    warnings.filterwarnings("ignore", category=FutureWarning, message=r".*deprecated. Please use")
    return run_main(None, main)


if __name__ == "__main__":
    sys.exit(cli())
