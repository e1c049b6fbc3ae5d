"""Continuous latents beside the quantizers: ``quantizer="none"`` (a plain autoencoder) and ``quantizer="kl"`` (LDM's
KL-regularised VAE): the KL against its closed form, reparameterised sampling, gradients, encode / decode, the
config's codebook convention, save / load, the trainer's steps, token shards refusing them and ``magvit.evaluate``."""

from __future__ import annotations

import contextlib
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from magvit import TokenizerConfig, VideoTokenizer
from magvit.config import ConfigError
from magvit.quantizers import (
    GaussianBottleneck,
    GaussianPosterior,
    IdentityBottleneck,
    QuantizerConfig,
    build_quantizer,
    gaussian_kl,
)

ROOT = Path(__file__).resolve().parents[1]
KINDS = ["none", "kl"]


def _video(cfg: TokenizerConfig, batch: int = 2) -> torch.Tensor:
    torch.manual_seed(0)
    return torch.rand(batch, 3, cfg.num_frames, cfg.image_size, cfg.image_size) * 2 - 1


def _posterior_latents(mean: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
    """The encoder output (B, 2D, t, h, w) whose posterior is (mean, logvar)."""
    return torch.cat([mean, logvar], dim=1)


# --- the KL term ----------------------------------------------------------------------------------------------------
def test_kl_matches_the_closed_form_on_known_values():
    # Sample 0: mean (1, 0), var (1, 4); sample 1: mean (0, 2), var (1/4, 1). Per clip 0.5 * sum(mu^2 + s^2 - 1 -
    # log s^2): 0.5 + 0.5 * (3 - log 4) = 2 - log 2 and 0.5 * (-3/4 + log 4) + 2 = 13/8 + log 2; mean 29/16.
    mean = torch.tensor([[1.0, 0.0], [0.0, 2.0]]).view(2, 2, 1, 1, 1)
    logvar = torch.tensor([[0.0, math.log(4)], [math.log(0.25), 0.0]]).view(2, 2, 1, 1, 1)
    assert gaussian_kl(GaussianPosterior(mean, logvar)).item() == pytest.approx(29 / 16, rel=1e-6)
    bottleneck = GaussianBottleneck(2, QuantizerConfig(kl_weight=0.5)).eval()
    out = bottleneck(_posterior_latents(mean, logvar))
    assert out.stats["kl_loss"].item() == pytest.approx(29 / 16, rel=1e-6)
    assert out.loss.item() == pytest.approx(0.5 * 29 / 16, rel=1e-6)  # kl_weight * KL
    assert gaussian_kl(GaussianPosterior(torch.zeros(3, 4, 2, 2, 2), torch.zeros(3, 4, 2, 2, 2))).item() == 0.0


def test_kl_equals_torch_distributions_per_clip():
    torch.manual_seed(0)
    mean, logvar = torch.randn(3, 4, 2, 3, 3), torch.randn(3, 4, 2, 3, 3)
    q = torch.distributions.Normal(mean, torch.exp(0.5 * logvar))
    expected = torch.distributions.kl_divergence(q, torch.distributions.Normal(0.0, 1.0)).flatten(1).sum(1).mean()
    torch.testing.assert_close(gaussian_kl(GaussianPosterior(mean, logvar)), expected)


def test_logvar_is_clamped_as_in_ldm():
    posterior = GaussianBottleneck(1).posterior(torch.tensor([0.0, 50.0, 0.0, -50.0]).view(2, 2, 1, 1, 1))
    assert posterior.logvar.flatten().tolist() == [20.0, -30.0]


def test_default_kl_weight_and_validation():
    assert QuantizerConfig().kl_weight == 1e-6  # LDM's
    with pytest.raises(ConfigError, match="kl_weight"):
        QuantizerConfig.from_dict({"kl_weight": -1.0})


# --- sampling and gradients -----------------------------------------------------------------------------------------
def test_reparameterisation_samples_in_training_and_gives_the_mean_at_eval():
    torch.manual_seed(0)
    mean = torch.randn(2, 3, 2, 4, 4)
    logvar = torch.full_like(mean, math.log(0.25))  # std 0.5
    z = _posterior_latents(mean, logvar)
    bottleneck = GaussianBottleneck(3)
    assert torch.equal(bottleneck.eval()(z).quantized, mean)
    assert torch.equal(bottleneck.latents(z), mean)
    torch.manual_seed(1)
    sample = bottleneck.train()(z).quantized
    torch.manual_seed(1)
    assert torch.allclose(sample, mean + 0.5 * torch.randn_like(mean))  # mean + std * eps
    many = GaussianBottleneck(1).train()(_posterior_latents(torch.zeros(1, 1, 1, 100, 100),
                                                             torch.full((1, 1, 1, 100, 100), math.log(0.25))))
    assert many.quantized.std().item() == pytest.approx(0.5, rel=0.05)


def test_identity_passes_latents_through():
    z = torch.randn(2, 5, 2, 3, 3, requires_grad=True)
    out = IdentityBottleneck(5).train()(z)
    assert out.quantized is z and out.codes is None and out.loss.item() == 0.0
    assert IdentityBottleneck(5).latents(z) is z
    with pytest.raises(ValueError, match=r"\(B, 5, t, h, w\)"):
        IdentityBottleneck(5)(torch.randn(2, 4, 1, 2, 2))


@pytest.mark.parametrize("kind", KINDS)
def test_stats_have_loss_terms_and_no_code_statistics(kind):
    quantizer = build_quantizer(kind, 0, 4, QuantizerConfig())
    z = torch.randn(2, 8 if kind == "kl" else 4, 1, 2, 2)
    out = quantizer(z)
    assert out.codes is None
    assert {"commitment_loss", "codebook_loss", "entropy_loss"} <= set(out.stats)
    assert "codebook_usage" not in out.stats and "perplexity" not in out.stats
    assert ("kl_loss" in out.stats) == (kind == "kl")
    assert all(not v.requires_grad and v.dtype == torch.float32 for v in out.stats.values())


@pytest.mark.parametrize("kind", KINDS)
def test_gradients_reach_the_encoder(kind):
    cfg = TokenizerConfig.preset("tiny", quantizer=kind, embedding_dim=4)
    tok = VideoTokenizer(cfg).train()
    reconstruction, stats = tok(_video(cfg))
    (reconstruction.pow(2).mean() + stats["quantizer_loss"]).backward()
    grad = tok.encoder.conv_out.weight.grad  # (encoder_dim, C, 1, 1, 1)
    assert grad.shape[0] == cfg.encoder_dim == (8 if kind == "kl" else 4)
    assert grad[:4].abs().sum() > 0  # the latents / the mean
    if kind == "kl":
        assert grad[4:].abs().sum() > 0  # the log-variance, through the sample and the KL
    assert tok.encoder.conv_in.weight.grad.abs().sum() > 0


# --- the tokenizer ----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", KINDS)
def test_config_has_no_codebook(kind):
    cfg = TokenizerConfig.preset("tiny", quantizer=kind)  # tiny says 64 codes: ignored
    assert cfg.continuous and cfg.codebook_size == 0 and cfg.latent_dim == cfg.embedding_dim == 16
    assert cfg.encoder_dim == (32 if kind == "kl" else 16)
    assert TokenizerConfig.from_dict(cfg.to_dict()) == cfg
    assert TokenizerConfig.preset("tiny", quantizer=kind, codebook_size=0) == cfg
    assert not TokenizerConfig.preset("tiny").continuous and TokenizerConfig.preset("tiny").encoder_dim == 16
    with pytest.raises(ValueError, match="codebook_size must be >= 2"):
        TokenizerConfig.preset("tiny", codebook_size=0)  # a discrete quantizer needs codes
    with pytest.raises(ConfigError, match="quantizer"):
        TokenizerConfig.from_dict({"quantizer": "gaussian"})


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("causal", [False, True], ids=["non-causal", "causal"])
def test_encode_decode_round_trip_shapes(kind, causal):
    cfg = TokenizerConfig.preset("tiny", quantizer=kind, causal=causal, embedding_dim=4)
    tok = VideoTokenizer(cfg).eval()
    video = _video(cfg)
    latents = tok.encode(video)
    t, h, w = cfg.token_grid(*video.shape[2:])
    assert latents.shape == (2, 4, t, h, w) and latents.dtype == torch.float32
    with torch.no_grad():
        decoded = tok.decode(latents)
        assert decoded.shape == video.shape
        torch.testing.assert_close(decoded, tok(video)[0])  # eval forward = decode(encode(video))
    if kind == "kl":
        posterior = tok.encode_posterior(video)
        assert posterior.mean.shape == posterior.logvar.shape == latents.shape
        assert torch.equal(posterior.mean, latents)
    else:
        with pytest.raises(ValueError, match="needs a kl tokenizer"):
            tok.encode_posterior(video)


def test_decode_checks_latents():
    tok = VideoTokenizer(TokenizerConfig.preset("tiny", quantizer="kl", embedding_dim=4)).eval()
    with pytest.raises(ValueError, match=r"\(B, 4, t, h, w\)"):
        tok.decode(torch.zeros(1, 4, 8, 8, dtype=torch.long))  # codes given to a continuous tokenizer
    with pytest.raises(ValueError, match="float latents"):
        tok.decode(torch.zeros(1, 4, 4, 8, 8, dtype=torch.long))
    with pytest.raises(ValueError, match="finite"):
        tok.decode(torch.full((1, 4, 4, 8, 8), float("nan")))
    with pytest.raises(ValueError, match=r"\[-1, 1\]"):
        tok.encode(torch.full((1, 3, 8, 32, 32), 2.0))


@pytest.mark.parametrize("kind", KINDS)
def test_save_and_load(kind, tmp_path):
    cfg = TokenizerConfig.preset("tiny", quantizer=kind, quantization={"kl_weight": 1e-4})
    torch.manual_seed(0)
    tok = VideoTokenizer(cfg).eval()
    tok.save_pretrained(tmp_path / "export")
    assert json.loads((tmp_path / "export" / "config.json").read_text())["config"]["codebook_size"] == 0
    loaded = VideoTokenizer.from_pretrained(tmp_path / "export").eval()
    assert loaded.config == cfg and loaded.config.quantization.kl_weight == 1e-4
    video = _video(cfg, batch=1)
    assert torch.equal(loaded.encode(video), tok.encode(video))


def test_forward_does_no_host_sync(no_host_sync):
    cfg = TokenizerConfig.preset("tiny", quantizer="kl")
    tok = VideoTokenizer(cfg).train()
    video = _video(cfg, batch=1)
    with no_host_sync("VideoTokenizer.forward"):
        reconstruction, stats = tok(video)
        (reconstruction.mean() + stats["quantizer_loss"]).backward()


# --- training, token shards, evaluation --------------------------------------------------------------------------------
class _Engine:
    """The few DeepSpeed engine methods the trainer's steps call, on a plain module with an SGD step."""

    def __init__(self, module: torch.nn.Module):
        self.module = module
        self.optimizer = torch.optim.SGD(module.parameters(), lr=1e-3)

    def __call__(self, x):
        return self.module(x)

    def backward(self, loss):
        loss.backward()

    def step(self):
        self.optimizer.step()
        self.optimizer.zero_grad()


def test_trainer_steps_with_a_kl_tokenizer():
    """``model.quantizer=kl`` on the tiny config: the trainer's generator and discriminator steps run, the KL is
    logged and added to the generator loss, and no codebook statistic is logged."""
    from magvit.discriminator import Discriminator
    from magvit.launch.train_tokenizer import LastLayerInput, discriminator_step, generator_step, load_config
    from magvit.losses import LeCamRegularizer
    from magvit.trainloop import NonFiniteGuard

    cfg = load_config("configs/tokenizer/tiny.yaml", ["model.quantizer=kl", "loss.disc_start=1"])
    assert cfg.model.quantizer == "kl" and cfg.model.codebook_size == 0
    torch.manual_seed(0)
    g_engine, d_engine = _Engine(VideoTokenizer(cfg.model).train()), _Engine(Discriminator(cfg.discriminator))
    before = g_engine.module.encoder.conv_out.weight.detach().clone()
    last_input = LastLayerInput(g_engine.module.decoder.conv_out) if cfg.loss.adaptive_gan_weight else None
    guard, lecam, video = NonFiniteGuard(5), LeCamRegularizer(cfg.loss.lecam_decay), _video(cfg.model)
    for step in range(2):
        g_metrics, recon = generator_step(g_engine, d_engine.module, video, step, cfg, None, guard,
                                          contextlib.nullcontext(), last_input)
        assert "quantizer/kl_loss" in g_metrics and "quantizer/codebook_usage" not in g_metrics
        assert math.isfinite(g_metrics["g/loss"]) and ("g/gan" in g_metrics) == (step >= 1)
        if step >= 1:
            d_metrics = discriminator_step(d_engine, video, recon, step, cfg, lecam, guard, contextlib.nullcontext())
            assert math.isfinite(d_metrics["d/loss"])
    assert not torch.equal(g_engine.module.encoder.conv_out.weight, before)


def test_token_shards_refuse_a_continuous_tokenizer(tmp_path):
    from magvit.cli import UsageError
    from magvit.prep.tokenize import load_tokenizer

    VideoTokenizer(TokenizerConfig.preset("tiny", quantizer="kl")).save_pretrained(tmp_path / "kl")
    with pytest.raises(UsageError, match="continuous latents, not codes") as err:
        load_tokenizer(str(tmp_path / "kl"), "cpu")
    assert "\n" not in str(err.value)


def _manifest(directory: Path, paths: list[str], split: str) -> Path:
    from magvit.video_io import probe_video

    records = [{"path": p, **probe_video(p), "split": split, "label": None} for p in paths]
    manifest = directory / "manifest.jsonl"
    manifest.write_text("".join(json.dumps(r) + "\n" for r in records))
    return manifest


def test_evaluate_a_kl_tokenizer(real_video_paths, tmp_path, capsys):
    from magvit import evaluate

    torch.manual_seed(0)
    VideoTokenizer(TokenizerConfig.preset("tiny", quantizer="kl")).save_pretrained(tmp_path / "kl")
    manifest = _manifest(tmp_path, real_video_paths, "val")
    out = tmp_path / "eval"
    assert evaluate.main(["--tokenizer", str(tmp_path / "kl"), "--data", str(manifest), "--out", str(out),
                          "--no-progress"]) == 0
    report = json.loads((out / "report.json").read_text())["tokenizer"]
    assert report["num_clips"] >= 2 and math.isfinite(report["psnr"]) and report["token_grid"] == [4, 8, 8]
    assert not any(key.startswith(("codebook", "bits_per_pixel")) for key in report)
    printed = capsys.readouterr().out
    assert "PSNR" in printed and "codes n/a (continuous latents)" in printed


@pytest.mark.slow
def test_trainer_runs_and_exports_a_kl_tokenizer(real_video_paths, tmp_path):
    """The real trainer (one plain python process) for 2 steps with ``model.quantizer=kl``: its export is a kl
    tokenizer and its metrics log the KL."""
    from magvit.runlog import read_metrics

    manifest = _manifest(tmp_path, real_video_paths, "train")
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        env.pop(key, None)
    run_dir = tmp_path / "run"
    result = subprocess.run(
        [sys.executable, str(ROOT / "launch" / "train_tokenizer.py"), "--config", "configs/tokenizer/tiny.yaml",
         "--run-dir", str(run_dir), f"data.manifest={manifest}", "model.quantizer=kl", "train.max_steps=2",
         "data.num_frames=4", "data.image_size=16", "data.batch_size=2", "data.num_workers=0", "data.val_clips=0",
         "loss.disc_start=1", "train.warmup_steps=1", "logging.log_every=1", "logging.sample_every=0",
         "logging.tensorboard=false", "logging.progress=false"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=240)
    assert result.returncode == 0, result.stderr[-3000:]
    logged = [row for row in read_metrics(run_dir / "metrics.jsonl") if "quantizer/kl_loss" in row]
    assert logged and all(math.isfinite(row["quantizer/kl_loss"]) for row in logged)
    assert not any("quantizer/codebook_usage" in row for row in read_metrics(run_dir / "metrics.jsonl"))
    export = VideoTokenizer.from_pretrained(run_dir / "export")
    assert export.config.quantizer == "kl" and export.config.codebook_size == 0
