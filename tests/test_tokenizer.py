"""VideoTokenizer: shapes, parameter counts against the paper, causality, round trips, validation, inflation, and
overfitting one real clip."""

import math

import pytest
import torch
from conftest import load_real_clip

from magvit import TokenizerConfig, VideoTokenizer
from magvit.config import ConfigError
from magvit.quantizers import QuantizerConfig
from magvit.tokenizer import inflate_tokenizer

OPTIONS = [
    dict(),
    dict(quantizer="lfq"),
    dict(causal=True),
    dict(causal=True, quantizer="lfq"),
]


def _video(cfg: TokenizerConfig, batch: int = 1, frames: int | None = None) -> torch.Tensor:
    t = cfg.num_frames if frames is None else frames
    return torch.rand(batch, cfg.in_channels, t, cfg.image_size, cfg.image_size) * 2 - 1


@pytest.mark.parametrize("options", OPTIONS, ids=lambda o: "-".join(f"{k}={v}" for k, v in o.items()) or "default")
def test_tiny_shapes_and_token_grid(options):
    cfg = TokenizerConfig.preset("tiny", **options)
    tok = VideoTokenizer(cfg)
    video = _video(cfg, batch=1)
    grid = cfg.token_grid(cfg.num_frames, cfg.image_size, cfg.image_size)
    if cfg.causal:
        assert cfg.num_frames == 9 and grid == (1 + 8 // cfg.temporal_factor, 8, 8)
    else:
        assert cfg.num_frames == 8 and grid == (8 // cfg.temporal_factor, 8, 8)
    latent_dim = 6 if cfg.quantizer == "lfq" else cfg.embedding_dim  # LFQ: log2(64) bits
    assert cfg.latent_dim == latent_dim
    # bf16 autocast as in training (3D convs are much faster on CPU); quantization stays fp32 inside.
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert tok.encoder(video).shape == (1, latent_dim, *grid)
        codes = tok.encode(video)
        assert codes.dtype == torch.long and codes.shape == (1, *grid)
        assert 0 <= codes.min() and codes.max() < cfg.codebook_size
        assert tok.decode(codes).shape == video.shape
        reconstruction, stats = tok(video)
    assert reconstruction.shape == video.shape
    assert stats["quantizer_loss"].dim() == 0 and stats["quantizer_loss"].requires_grad
    assert 0 < stats["codebook_usage"] <= 1 and 1 <= stats["perplexity"] <= cfg.codebook_size
    assert tok.decoder_last_layer is tok.decoder.conv_out.weight
    assert tok.decoder_last_layer.shape[:2] == (3, cfg.base_channels)


@pytest.mark.parametrize("name, paper", [("B", 41e6), ("L", 158e6)])
def test_paper_presets_parameters_and_shapes(name, paper):
    """MAGVIT-B / -L: encoder + decoder + codebook parameters within 3% of the paper's 41M / 158M.

    Counted: every parameter of the tokenizer (encoder, VQ codebook 1024 x 256, decoder: convs, GroupNorm affines,
    biases); measured B = 40.58M (-1.0%), L = 157.81M (-0.1%). Built on the meta device (no memory, no init cost).
    """
    cfg = TokenizerConfig.preset(name)
    assert (cfg.codebook_size, cfg.embedding_dim, cfg.spatial_factor, cfg.temporal_factor) == (1024, 256, 8, 4)
    assert cfg.token_grid(16, 128, 128) == (4, 16, 16)
    with torch.device("meta"):
        tok = VideoTokenizer(cfg)
        count = sum(p.numel() for p in tok.parameters())
        latents = tok.encoder(torch.empty(1, 3, 16, 128, 128))
        video = tok.decoder(latents)
    assert abs(count - paper) / paper < 0.03, f"{name}: {count / 1e6:.2f}M parameters vs the paper's {paper / 1e6:.0f}M"
    assert sum(p.numel() for p in tok.quantizer.parameters()) == 1024 * 256
    assert latents.shape == (1, 256, 4, 16, 16) and video.shape == (1, 3, 16, 128, 128)
    # MAGVIT-v2 options on the same preset: 1 + 16 frames -> 1 + 4 latent frames; LFQ with log2(1024) = 10 bits.
    causal = TokenizerConfig.preset(name, causal=True, quantizer="lfq")
    assert causal.num_frames == 17 and causal.latent_dim == 10
    assert causal.token_grid(17, 128, 128) == (5, 16, 16)
    with torch.device("meta"):
        causal_tok = VideoTokenizer(causal)
        latents = causal_tok.encoder(torch.empty(1, 3, 17, 128, 128))
        assert causal_tok.decoder(latents).shape == (1, 3, 17, 128, 128)
    assert latents.shape == (1, 10, 5, 16, 16)


@pytest.mark.parametrize("quantizer", ["vq", "lfq"])
def test_straight_through_gradient_reaches_encoder(quantizer):
    cfg = TokenizerConfig.preset("tiny", quantizer=quantizer, quantization=QuantizerConfig(entropy_loss_weight=0.0))
    tok = VideoTokenizer(cfg)
    video = _video(cfg, batch=1)
    reconstruction, _ = tok(video)
    # Only the reconstruction loss: the encoder gets gradient solely through the straight-through estimator.
    (reconstruction - video).pow(2).mean().backward()
    for module in (tok.encoder.conv_in, tok.encoder.conv_out):
        assert module.weight.grad is not None and module.weight.grad.abs().sum() > 0


@pytest.mark.parametrize("quantizer", ["vq", "lfq"])
def test_causal_future_frames_never_change_past_latents(quantizer):
    cfg = TokenizerConfig.preset("tiny", causal=True, quantizer=quantizer)
    tok = VideoTokenizer(cfg).eval()
    f = cfg.temporal_factor
    video = torch.rand(1, 3, cfg.num_frames, 16, 16) * 2 - 1  # 1 + 4 * f frames
    with torch.no_grad():
        latents = tok.encoder(video)
        codes = tok.quantizer(latents).codes
        assert torch.equal(codes, tok.encode(video))
        for k in range(cfg.num_frames):
            changed = video.clone()
            changed[:, :, k] = torch.rand_like(changed[:, :, k]) * 2 - 1
            first_affected = math.ceil(k / f)  # latent frame j covers input frames (j - 1) * f + 1 .. j * f
            new_latents = tok.encoder(changed)
            assert torch.equal(new_latents[:, :, :first_affected], latents[:, :, :first_affected]), k
            assert torch.equal(tok.quantizer(new_latents).codes[:, :first_affected], codes[:, :first_affected]), k
            assert not torch.allclose(new_latents[:, :, first_affected], latents[:, :, first_affected]), k
        # The decoder is causal too: changing latent frame j leaves output frames before (j - 1) * f + 1 unchanged.
        decoded = tok.decode(codes)
        for j in range(1, codes.shape[1]):
            changed = codes.clone()
            changed[:, j] = (changed[:, j] + 1) % cfg.codebook_size
            assert torch.equal(tok.decode(changed)[:, :, : (j - 1) * f + 1], decoded[:, :, : (j - 1) * f + 1]), j
        # A single image is a valid input, tokenized exactly as the first frame of a clip.
        image_codes = tok.encode(video[:, :, :1])
        assert image_codes.shape == (1, 1, 4, 4)
        assert torch.equal(image_codes[:, 0], codes[:, 0])
        assert tok.decode(image_codes).shape == (1, 3, 1, 16, 16)


def test_non_causal_model_mixes_time():
    """Control for the causality test: the default (non-causal) encoder does let the last frame change latent 0."""
    cfg = TokenizerConfig.preset("tiny")
    tok = VideoTokenizer(cfg).eval()
    video = torch.rand(1, 3, cfg.num_frames, 16, 16) * 2 - 1
    changed = video.clone()
    changed[:, :, -1] = -changed[:, :, -1]
    with torch.no_grad():
        assert not torch.allclose(tok.encoder(video)[:, :, 0], tok.encoder(changed)[:, :, 0])


@pytest.mark.parametrize("options", [dict(quantization=QuantizerConfig(use_ema=True, kmeans_init=True)),
                                     dict(causal=True, quantizer="lfq")], ids=["vq-ema-kmeans", "causal-lfq"])
def test_save_load_round_trip(tmp_path, options):
    cfg = TokenizerConfig.preset("tiny", **options)
    tok = VideoTokenizer(cfg)
    video = _video(cfg)
    tok(video)  # one training step of state: k-means init + EMA update for the VQ
    tok.eval()
    with torch.no_grad():
        codes = tok.encode(video)
        decoded = tok.decode(codes)
    tok.save_pretrained(tmp_path / "tok")
    assert sorted(p.name for p in (tmp_path / "tok").iterdir()) == ["config.json", "model.safetensors"]
    loaded = VideoTokenizer.from_pretrained(tmp_path / "tok")
    assert loaded.config == cfg
    with torch.no_grad():
        assert torch.equal(loaded.encode(video), codes)
        assert torch.equal(loaded.decode(codes), decoded)
    for (name, a), (_, b) in zip(tok.state_dict().items(), loaded.state_dict().items()):
        assert torch.equal(a, b), name


def test_bad_inputs_raise_value_error():
    cfg = TokenizerConfig.preset("tiny")
    tok = VideoTokenizer(cfg)
    good = _video(cfg, batch=1)
    cases = [
        (good[0], "shape \\(B, 3, T, H, W\\)"),
        (good[:, :1], "3 channels"),
        (((good + 1) * 127.5).to(torch.uint8), "float video"),
        (good * 1.5, "values in \\[-1, 1\\]"),
        (good[:, :, :7], "divisible by the temporal factor 2"),
        (good[:, :, :, :30, :30], "divisible by the spatial factor 4"),
    ]
    for bad, message in cases:
        with pytest.raises(ValueError, match=message):
            tok.encode(bad)
        with pytest.raises(ValueError, match=message):
            tok(bad)
    tok.encode(good.clamp(-1, 1) * (1 + 5e-4))  # within the range tolerance
    with pytest.raises(ValueError, match="T = 1 \\+ k \\* 2"):
        VideoTokenizer(TokenizerConfig.preset("tiny", causal=True)).encode(good)  # 8 frames
    codes = tok.encode(good)
    for bad, message in [
        (codes[0], "shape \\(B, t, h, w\\)"),
        (codes.float(), "integer codes"),
        (codes + cfg.codebook_size, "codes in \\[0, 64\\)"),
        (codes - codes.max() - 1, "codes in \\[0, 64\\)"),
    ]:
        with pytest.raises(ValueError, match=message):
            tok.decode(bad)


def test_config_presets_and_validation(tmp_path):
    assert TokenizerConfig.preset("tiny", causal=True).num_frames == 9  # 1 + 8
    assert TokenizerConfig.preset("tiny", causal=True, num_frames=5).num_frames == 5
    with pytest.raises(ConfigError, match="T = 1 \\+ k \\* 2"):
        TokenizerConfig.preset("tiny", causal=True, num_frames=8)
    with pytest.raises(ConfigError, match="power-of-two"):
        TokenizerConfig.preset("tiny", quantizer="lfq", codebook_size=100)
    with pytest.raises(ConfigError, match="one flag per downsample"):
        TokenizerConfig.preset("tiny", temporal_downsample=(True,))
    with pytest.raises(ConfigError, match="unknown config key 'quantization.bta'"):
        TokenizerConfig.preset("tiny", quantization={"bta": 1})
    path = tmp_path / "tok.yaml"
    path.write_text("preset: B\ncausal: true\nquantizer: lfq\nquantization:\n  entropy_loss_weight: 0.05\n")
    cfg = TokenizerConfig.from_yaml(path)
    assert (cfg.num_frames, cfg.base_channels, cfg.latent_dim, cfg.quantization.entropy_loss_weight) == (17, 64, 10, 0.05)
    assert TokenizerConfig.from_dict(cfg.to_dict()) == cfg


@pytest.mark.parametrize("causal", [False, True], ids=["central", "causal"])
def test_inflation_matches_image_tokenizer_on_static_video(causal):
    image_cfg = TokenizerConfig.preset("tiny", temporal_kernel_size=1, num_frames=1, temporal_downsample=(False, False))
    image_tok = VideoTokenizer(image_cfg).eval()
    video_cfg = TokenizerConfig.preset("tiny", causal=causal)
    video_tok = inflate_tokenizer(image_tok, video_cfg).eval()
    conv = video_tok.encoder.levels[0][0].conv1.weight  # (O, I, 3, 3, 3)
    centre = 2 if causal else 1
    assert torch.equal(conv[:, :, centre], image_tok.encoder.levels[0][0].conv1.weight[:, :, 0])
    assert conv[:, :, [i for i in range(3) if i != centre]].abs().sum() == 0
    image = torch.rand(1, 3, 1, 16, 16) * 2 - 1
    static = image.expand(-1, -1, video_cfg.num_frames, -1, -1).contiguous()  # all frames equal
    with torch.no_grad():
        image_latent = image_tok.encoder(image)  # (1, D, 1, 4, 4)
        video_latents = video_tok.encoder(static)  # (1, D, t, 4, 4)
        assert video_latents.shape[2] == video_cfg.token_grid(video_cfg.num_frames, 16, 16)[0]
        torch.testing.assert_close(video_latents, image_latent.expand_as(video_latents), atol=1e-5, rtol=1e-4)
        codes = video_tok.encode(static)
        assert torch.equal(codes, image_tok.encode(image).expand_as(codes))
        torch.testing.assert_close(video_tok.decode(codes), image_tok.decode(codes[:, :1]).expand_as(static),
                                   atol=1e-5, rtol=1e-4)
    with pytest.raises(ValueError, match="temporal_kernel_size=1"):
        inflate_tokenizer(video_tok, video_cfg)
    with pytest.raises(ValueError, match="base_channels"):
        inflate_tokenizer(image_tok, video_cfg.replace(base_channels=32))


@pytest.mark.slow
def test_overfit_one_real_clip_raises_psnr(real_video_path):
    """100 steps on one real 8x32x32 clip (bikes, every 2nd frame) raise reconstruction PSNR well over 5 dB."""
    torch.manual_seed(0)
    clip = load_real_clip(real_video_path, num_frames=8, size=32, stride=2)  # (1, 3, 8, 32, 32)
    cfg = TokenizerConfig.preset("tiny")
    tok = VideoTokenizer(cfg)

    def psnr() -> float:
        tok.eval()
        with torch.no_grad():
            reconstruction = tok.decode(tok.encode(clip)).clamp(-1, 1)
        tok.train()
        return 10 * math.log10(4.0 / (reconstruction - clip).pow(2).mean().item())  # peak-to-peak 2

    before = psnr()
    optimizer = torch.optim.Adam(tok.parameters(), lr=2e-3, betas=(0.9, 0.99))
    for _ in range(100):
        # bf16 autocast: CPU 3D convolutions run ~8x faster than fp32 (quantization stays fp32 inside).
        with torch.autocast("cpu", dtype=torch.bfloat16):
            reconstruction, stats = tok(clip)
        loss = (reconstruction.float() - clip).pow(2).mean() + stats["quantizer_loss"]
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    after = psnr()
    print(f"overfit PSNR: {before:.2f} dB -> {after:.2f} dB")
    assert after > before + 5.0, (before, after)


def test_bf16_weights_run_on_cpu():
    """DeepSpeed bf16 casts the whole model to bf16: every op (avg pooling included) must have a CPU kernel."""
    from magvit.discriminator import Discriminator, DiscriminatorConfig

    tok = VideoTokenizer(TokenizerConfig.preset("tiny")).to(torch.bfloat16)
    video = (torch.rand(1, 3, 8, 32, 32) * 2 - 1).to(torch.bfloat16)
    recon, stats = tok(video)
    assert recon.dtype == torch.bfloat16 and recon.shape == video.shape
    disc = Discriminator(DiscriminatorConfig.preset("tiny", image_size=32, num_frames=8)).to(torch.bfloat16)
    logits = disc(recon)
    assert logits.shape == (1,) and torch.isfinite(logits.float()).all()


def test_batch_one_conv_fast_path_matches_plain_conv():
    """The batch-1 CPU route through oneDNN (zero second sample) gives the plain convolution's values and grads."""
    from magvit.tokenizer import Conv3d

    for causal in (False, True):
        conv = Conv3d(4, 6, (3, 3, 3), causal=causal)
        x = torch.randn(1, 4, 5, 8, 8, requires_grad=True)
        y = conv(x)
        padded = torch.nn.functional.pad(x, (0, 0, 0, 0, 2, 0)) if causal else x
        ref = torch.nn.functional.conv3d(padded, conv.weight, conv.bias, padding=conv.padding)
        torch.testing.assert_close(y, ref, atol=1e-5, rtol=1e-5)
        grad_y = torch.randn_like(y)
        gx, gw = torch.autograd.grad(y, (x, conv.weight), grad_y)
        rx, rw = torch.autograd.grad(ref, (x, conv.weight), grad_y)
        torch.testing.assert_close(gx, rx, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(gw, rw, atol=1e-5, rtol=1e-5)
