"""VideoTokenizer: shapes, parameter counts against the paper, causality, round trips, validation, inflation, and
overfitting one real clip."""

import math

import pytest
import torch
from conftest import load_real_clip

from magvit import TokenizerConfig, VideoTokenizer
from magvit.config import ConfigError
from magvit.quantizers import QuantizerConfig
from magvit.tokenizer import HierarchicalCodes, inflate_tokenizer

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
    assert sorted(p.name for p in (tmp_path / "tok").iterdir()) == ["README.md", "config.json", "model.safetensors"]
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
        if "values" not in message:  # forward (the training step) checks the layout only: no host sync
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


@pytest.mark.parametrize("options", [dict(), dict(downsample="conv", upsample="depth_to_space",
                                                 spatial_downsample=(False, True))], ids=["v1", "v2-time-only-level"])
@pytest.mark.parametrize("causal", [False, True], ids=["central", "causal"])
def test_inflation_matches_image_tokenizer_on_static_video(causal, options):
    image_cfg = TokenizerConfig.preset("tiny", temporal_kernel_size=1, num_frames=1, temporal_downsample=(False, False),
                                       **options)
    image_tok = VideoTokenizer(image_cfg).eval()
    video_cfg = TokenizerConfig.preset("tiny", causal=causal, **options)
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
    """40 steps on one real 8x32x32 clip (bikes, every 2nd frame) raise reconstruction PSNR well over 5 dB (by
    ~12 dB for seeds 0, 1 and 2)."""
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
    for _ in range(40):
        # fp32: bf16 autocast is ~47x slower on a CPU without native bf16 (magvit.precision); CI may have one
        reconstruction, stats = tok(clip)
        loss = (reconstruction - clip).pow(2).mean() + stats["quantizer_loss"]
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    after = psnr()
    print(f"overfit PSNR: {before:.2f} dB -> {after:.2f} dB")
    assert after > before + 5.0, (before, after)


def test_bf16_weights_run_on_cpu():
    """DeepSpeed bf16 casts the whole model to bf16: every op (avg pooling included) must have a CPU kernel."""
    from magvit.discriminator import Discriminator, DiscriminatorConfig

    for options, frames in ((dict(), 8), (dict(causal=True, quantizer="lfq", **TINY_V2), 9)):  # v1; v2, odd T
        tok = VideoTokenizer(TokenizerConfig.preset("tiny", **options)).to(torch.bfloat16)
        video = (torch.rand(1, 3, frames, 32, 32) * 2 - 1).to(torch.bfloat16)
        recon, stats = tok(video)
        assert recon.dtype == torch.bfloat16 and recon.shape == video.shape
        disc = Discriminator(DiscriminatorConfig.preset("tiny", image_size=32, num_frames=frames)).to(torch.bfloat16)
        logits = disc(recon)
        assert logits.shape == (1,) and torch.isfinite(logits.float()).all()


@pytest.mark.parametrize("hierarchy", [1, 2])
@pytest.mark.parametrize("quantizer", ["vq", "lfq", "fsq"])
def test_forward_does_no_host_sync(monkeypatch, quantizer, hierarchy):
    """The training step reads no tensor value on the host (each would wait for the GPU): ``.item()``, ``bool()``,
    ``int()``, ``float()``, ``.tolist()`` and ``.numpy()`` all raise while it runs."""
    codebook_size = {"vq": 64, "lfq": 64, "fsq": 240}[quantizer]
    cfg = TokenizerConfig.preset("tiny", quantizer=quantizer, codebook_size=codebook_size, hierarchy=hierarchy)
    tok = VideoTokenizer(cfg).train()
    video = _video(cfg, batch=1)

    def sync(*args, **kwargs):
        raise AssertionError("host sync in VideoTokenizer.forward")

    with monkeypatch.context() as patch:
        for name in ("item", "__bool__", "__int__", "__float__", "__index__", "tolist", "numpy"):
            patch.setattr(torch.Tensor, name, sync)
        reconstruction, stats = tok(video)
        (reconstruction.mean() + stats["quantizer_loss"]).backward()
    assert reconstruction.shape == video.shape


def test_batch_one_conv_fast_path_matches_plain_conv(monkeypatch):
    """The batch-1 CPU route through oneDNN (zero second sample) gives the plain convolution's values and grads;
    it is taken for 3x3x3 kernels only, and ``Conv3d.cpu_batch_one_route`` turns it off."""
    from magvit.tokenizer import Conv3d, cpu_batch_one_route_pays

    x = torch.randn(1, 4, 5, 8, 8)
    assert cpu_batch_one_route_pays(x, (3, 3, 3)) and not cpu_batch_one_route_pays(x, (1, 1, 1))
    assert not cpu_batch_one_route_pays(x.repeat(2, 1, 1, 1, 1), (3, 3, 3))
    assert not cpu_batch_one_route_pays(x.bfloat16(), (3, 3, 3))
    batches, conv_forward = [], torch.nn.Conv3d._conv_forward
    monkeypatch.setattr(torch.nn.Conv3d, "_conv_forward",
                        lambda self, x, *args: batches.append(x.shape[0]) or conv_forward(self, x, *args))
    conv = Conv3d(4, 6, (3, 3, 3), causal=False)
    conv(x)
    monkeypatch.setattr(Conv3d, "cpu_batch_one_route", False)
    conv(x)
    assert batches == [2, 1]
    monkeypatch.undo()

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


# --- MAGVIT-v2 blocks ------------------------------------------------------------------------------------------
TINY_V2 = dict(downsample="conv", upsample="depth_to_space", decoder_norm="adaptive_group",
               decoder_channel_multipliers=(1, 1, 2), decoder_res_blocks=(0, 1, 1))  # V2's plan for three levels


@pytest.mark.parametrize("causal", [False, True], ids=["central", "causal"])
@pytest.mark.parametrize("decoder_norm", ["group", "adaptive_group"])
@pytest.mark.parametrize("upsample", ["nearest", "depth_to_space"])
@pytest.mark.parametrize("downsample", ["avg_pool", "conv"])
def test_v2_block_combinations_shapes(downsample, upsample, decoder_norm, causal):
    cfg = TokenizerConfig.preset("tiny", downsample=downsample, upsample=upsample, decoder_norm=decoder_norm,
                                 causal=causal, quantizer="lfq")
    tok = VideoTokenizer(cfg)
    video = torch.rand(1, 3, cfg.num_frames, 16, 16) * 2 - 1
    grid = cfg.token_grid(cfg.num_frames, 16, 16)
    latents = tok.encoder(video)
    assert latents.shape == (1, cfg.latent_dim, *grid)
    assert tok.decoder(latents).shape == video.shape
    if causal:  # a single image in, a single frame out
        assert tok.decoder(tok.encoder(video[:, :, :1])).shape == (1, 3, 1, 16, 16)
    has = {name for name, _ in tok.named_modules()}
    assert ("encoder.downsample_convs.0" in has) == (downsample == "conv")
    assert ("decoder.norm_out.scale_shift" in has) == (decoder_norm == "adaptive_group")


def test_v2_decoder_plan_and_v1_state_dict_unchanged():
    cfg = TokenizerConfig.preset("tiny", **TINY_V2)
    assert cfg.decoder_multipliers == (1, 1, 2) and cfg.decoder_blocks == (0, 1, 1)
    v1 = TokenizerConfig.preset("tiny")
    assert v1.decoder_multipliers == v1.channel_multipliers and v1.decoder_blocks == (1, 1, 1)
    tok = VideoTokenizer(cfg)
    assert [len(level) for level in tok.decoder.levels] == [1, 1, 0]  # deepest level first
    video = torch.rand(2, 3, 8, 16, 16) * 2 - 1
    assert tok(video)[0].shape == video.shape
    # The v1 layout keeps its parameter names (old exports load): no v2-only modules appear.
    names = set(VideoTokenizer(v1).state_dict())
    assert not any("downsample_convs" in n or "scale_shift" in n or ".norm.weight" in n for n in names)
    for bad, match in [(dict(decoder_res_blocks=(1, 1)), "one entry per level"),
                       (dict(decoder_channel_multipliers=(1, 0, 2)), ">= 1"),
                       (dict(upsample="pixel_shuffle"), "not one of")]:
        with pytest.raises(ConfigError, match=match):
            TokenizerConfig.preset("tiny", **bad)


def test_old_export_without_v2_fields_loads(tmp_path):
    """A config.json written before the v2 fields existed loads as the v1 architecture, weights included."""
    import json

    tok = VideoTokenizer(TokenizerConfig.preset("tiny")).eval()
    tok.save_pretrained(tmp_path / "old")
    meta = json.loads((tmp_path / "old" / "config.json").read_text())
    for key in ("downsample", "upsample", "decoder_norm", "decoder_channel_multipliers", "decoder_res_blocks"):
        del meta["config"][key]
    (tmp_path / "old" / "config.json").write_text(json.dumps(meta))
    loaded = VideoTokenizer.from_pretrained(tmp_path / "old")
    assert loaded.config == tok.config
    video = _video(tok.config)
    with torch.no_grad():
        assert torch.equal(loaded.encode(video), tok.encode(video))


@pytest.mark.parametrize("quantizer", ["vq", "lfq"])
def test_v2_causal_future_frames_never_change_past(quantizer):
    """Strided causal convs, causal depth-to-space and the latent-conditioned norms keep the causal contract:
    input frame k changes latents >= ceil(k / f) only, and latent j changes output frames > (j - 1) * f only."""
    cfg = TokenizerConfig.preset("tiny", causal=True, quantizer=quantizer, **TINY_V2)
    tok = VideoTokenizer(cfg).eval()
    for p in tok.decoder.parameters():  # adaptive norms start as plain GroupNorm: make them depend on the latents
        if p.dim() == 5 and not p.abs().sum():
            torch.nn.init.normal_(p, std=0.1)
    f = cfg.temporal_factor
    video = torch.rand(1, 3, cfg.num_frames, 16, 16) * 2 - 1
    with torch.no_grad():
        latents = tok.encoder(video)
        for k in range(cfg.num_frames):
            changed = video.clone()
            changed[:, :, k] = torch.rand_like(changed[:, :, k]) * 2 - 1
            first = math.ceil(k / f)
            new = tok.encoder(changed)
            assert torch.equal(new[:, :, :first], latents[:, :, :first]), k
            assert not torch.allclose(new[:, :, first], latents[:, :, first]), k
        decoded = tok.decoder(latents)
        for j in range(1, latents.shape[2]):
            changed = latents.clone()
            changed[:, :, j] = torch.randn_like(changed[:, :, j])
            out = tok.decoder(changed)
            keep = (j - 1) * f + 1
            assert torch.equal(out[:, :, :keep], decoded[:, :, :keep]), j
            assert not torch.allclose(out[:, :, keep:keep + f], decoded[:, :, keep:keep + f]), j


def test_adaptive_group_norm_starts_as_group_norm_and_uses_latents():
    from magvit.tokenizer import AdaptiveGroupNorm, GroupNorm

    for causal in (False, True):
        ada = AdaptiveGroupNorm(4, 8, 6, causal=causal)
        plain = GroupNorm(4, 8, per_frame=causal)
        with torch.no_grad():
            for module in (ada.norm, plain):  # the same (non-trivial) affine in both
                module.weight.copy_(torch.linspace(0.5, 2.0, 8))
                module.bias.copy_(torch.linspace(-1.0, 1.0, 8))
        x = torch.randn(2, 8, 5, 8, 8)
        z = torch.randn(2, 6, 3 if causal else 5, 2, 2)
        torch.testing.assert_close(ada(x, z), plain(x), atol=0, rtol=0)
        # Trained, scale and shift follow the latents: a 1x1x1 map of z, nearest-resized to x's grid.
        with torch.no_grad():
            ada.scale_shift.weight.normal_()
        out = ada(x, z)
        assert not torch.allclose(out, plain(x))
        params = ada.scale_shift(z)  # (2, 16, t, 2, 2)
        frame = 4  # non-causal: frame i -> latent i; causal (r = 2): frames 1, 2 -> latent 1, frames 3, 4 -> 2
        latent = 2 if causal else 4
        scale, shift = params[:, :8, latent, 1, 1], params[:, 8:, latent, 1, 1]
        expected = plain(x)[:, :, frame, 7, 7] * (1 + scale) + shift
        torch.testing.assert_close(out[:, :, frame, 7, 7], expected, atol=1e-5, rtol=1e-5)


def test_depth_to_space_layout_and_shapes():
    from magvit.tokenizer import DepthToSpaceUpsample, depth_to_space

    x = torch.randn(2, 3 * 8, 4, 5, 6)  # C = 3, r = (2, 2, 2)
    y = depth_to_space(x, (2, 2, 2), causal=False)
    assert y.shape == (2, 3, 8, 10, 12)
    c, a, b, d = 1, 1, 0, 1  # sub-pixel (a, b, d) of channel c at low-res position (t, h, w) = (2, 3, 4)
    assert torch.equal(y[:, c, 2 * 2 + a, 3 * 2 + b, 4 * 2 + d], x[:, c * 8 + (a * 2 + b) * 2 + d, 2, 3, 4])
    # The inverse (space-to-depth) gives the input back.
    back = y.reshape(2, 3, 4, 2, 5, 2, 6, 2).permute(0, 1, 3, 5, 7, 2, 4, 6).reshape(x.shape)
    assert torch.equal(back, x)
    causal = depth_to_space(x, (2, 2, 2), causal=True)
    assert causal.shape == (2, 3, 1 + 3 * 2, 10, 12) and torch.equal(causal, y[:, :, 1:])
    assert depth_to_space(torch.randn(1, 12, 3, 4, 4), (1, 2, 2), causal=True).shape == (1, 3, 3, 8, 8)
    # Initialised as nearest upsampling of one conv: the 2x2x2 sub-pixels of every low-res voxel are equal.
    cfg = TokenizerConfig.preset("tiny", causal=False)
    up = DepthToSpaceUpsample(8, 4, True, cfg)
    out = up(torch.randn(1, 8, 4, 4, 4))
    assert out.shape == (1, 4, 8, 8, 8)
    torch.testing.assert_close(out, out[:, :, ::2, ::2, ::2].repeat_interleave(2, 2).repeat_interleave(2, 3)
                               .repeat_interleave(2, 4))


@pytest.mark.parametrize("name, count", [("B2", 42.68e6), ("L2", 170.16e6)])
def test_v2_presets_on_meta(name, count):
    """B2 / L2: causal, LFQ with 2**18 codes (18 bits), 17x128x128 -> 5x16x16, the V2 blocks."""
    from magvit.tokenizer import V2

    cfg = TokenizerConfig.preset(name)
    assert (cfg.causal, cfg.quantizer, cfg.codebook_size, cfg.latent_dim, cfg.num_frames) == (True, "lfq", 2**18, 18, 17)
    assert all(getattr(cfg, k) == (tuple(v) if isinstance(v, tuple) else v) for k, v in V2.items()
               if k != "decoder_res_blocks")
    assert cfg.token_grid(17, 128, 128) == (5, 16, 16)
    with torch.device("meta"):
        tok = VideoTokenizer(cfg)
        latents = tok.encoder(torch.empty(1, 3, 17, 128, 128))
        video = tok.decoder(latents)
    assert latents.shape == (1, 18, 5, 16, 16) and video.shape == (1, 3, 17, 128, 128)
    params = sum(p.numel() for p in tok.parameters())
    assert abs(params - count) / count < 0.005, params


def test_v2_decoder_moves_flops_off_full_resolution():
    """At 17x64x64, base 32, multipliers 1-2-2-4 (the benchmarks' size) the V2 decoder does < 1/3 of v1's FLOPs,
    and under half of them at full resolution (the last depth-to-space conv, the output norm and conv)."""
    from torch.utils.flop_counter import FlopCounterMode

    from magvit.tokenizer import V2

    base = dict(num_frames=17, image_size=64, base_channels=32, channel_multipliers=(1, 2, 2, 4), num_res_blocks=1,
                temporal_downsample=(True, True, False), codebook_size=1024, quantizer="lfq", causal=True,
                norm_groups=8)
    flops = {}
    for name, options in (("v1", {}), ("v2", V2)):
        with torch.device("meta"):
            tok = VideoTokenizer(TokenizerConfig(**base, **options))
            with FlopCounterMode(display=False) as counter:
                tok.decoder(torch.empty(1, 10, 5, 8, 8))
        counts = counter.get_flop_counts()
        full = ("Decoder.upsample_convs.2", "Decoder.norm_out", "Decoder.conv_out")
        flops[name] = (counter.get_total_flops(), sum(sum(counts.get(k, {}).values()) for k in full))
    assert flops["v2"][0] < flops["v1"][0] / 3, flops
    assert flops["v2"][1] < flops["v2"][0] / 2, flops


# --- VQ-VAE-2's two code grids (hierarchy=2) ---------------------------------------------------------------------------
HIERARCHY_KINDS = {"vq": 64, "lfq": 64, "fsq": 240}


@pytest.mark.parametrize("quantizer", sorted(HIERARCHY_KINDS))
@pytest.mark.parametrize("causal", [False, True], ids=["non-causal", "causal"])
def test_two_level_codes_round_trip(quantizer, causal):
    """encode gives a top grid at half the bottom's H and W (same t) and the bottom grid; decode takes both and
    equals the eval forward; the codes in each grid are those of its own codebook."""
    from magvit.tokenizer import HierarchicalCodes

    cfg = TokenizerConfig.preset("tiny", quantizer=quantizer, codebook_size=HIERARCHY_KINDS[quantizer], causal=causal,
                                 hierarchy=2)
    torch.manual_seed(0)
    tok = VideoTokenizer(cfg).eval()
    video = _video(cfg, batch=2)
    codes = tok.encode(video)
    t, h, w = cfg.token_grid(*video.shape[2:])
    assert isinstance(codes, HierarchicalCodes) and cfg.top_grid(*video.shape[2:]) == (t, h // 2, w // 2)
    assert codes.top.shape == (2, t, h // 2, w // 2) and codes.bottom.shape == (2, t, h, w)
    assert codes.top.dtype == codes.bottom.dtype == torch.long
    assert int(codes.top.max()) < cfg.codebook_size and int(codes.bottom.max()) < cfg.codebook_size
    with torch.no_grad():
        decoded = tok.decode(codes)
        assert decoded.shape == video.shape
        torch.testing.assert_close(decoded, tok(video)[0], rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(tok.decode((codes.top, codes.bottom)), decoded)  # a plain tuple too
    assert torch.equal(tok.encode(video).bottom, codes.bottom)  # inference changes no state


def test_two_level_training_step_logs_both_grids_and_reaches_both_encoders():
    cfg = TokenizerConfig.preset("tiny", hierarchy=2, quantization=QuantizerConfig(entropy_loss_weight=0.0))
    tok = VideoTokenizer(cfg).train()
    reconstruction, stats = tok(_video(cfg, batch=2))
    assert {"codebook_usage", "top_codebook_usage", "perplexity", "top_perplexity"} <= set(stats)
    (reconstruction.pow(2).mean() + stats["quantizer_loss"]).backward()
    for name in ("encoder.conv_in.weight", "top.encoder_in.weight", "top.decoder_in.weight", "top.merge.weight",
                 "top.quantizer.codebook", "quantizer.codebook"):
        assert tok.get_parameter(name).grad.abs().sum() > 0, name


def test_hierarchy_config_validation_and_state(tmp_path):
    one = VideoTokenizer(TokenizerConfig.preset("tiny"))
    assert not any(name.startswith("top.") for name in one.state_dict())  # hierarchy 1: the exports of before
    with pytest.raises(ConfigError, match="hierarchy must be 1"):
        TokenizerConfig.from_dict({"hierarchy": 3})
    with pytest.raises(ValueError, match="hierarchy 2 needs a discrete quantizer"):
        TokenizerConfig.preset("tiny", quantizer="kl", hierarchy=2)
    with pytest.raises(ValueError, match="spatial factor times 2"):
        TokenizerConfig.preset("tiny", hierarchy=2, image_size=20)  # bottom grid 5x5: no half
    cfg = TokenizerConfig.preset("tiny", hierarchy=2)
    tok = VideoTokenizer(cfg).eval()
    with pytest.raises(ValueError, match="spatial factor times 2"):
        tok.encode(torch.zeros(1, 3, 8, 36, 36))
    codes = tok.encode(_video(cfg))
    with pytest.raises(ValueError, match=r"\(top, bottom\) codes"):
        tok.decode(codes.bottom)
    with pytest.raises(ValueError, match="half the bottom's H and W"):
        tok.decode((codes.bottom, codes.bottom))
    with pytest.raises(ValueError, match=r"codes in \[0, 64\)"):
        tok.decode((codes.top + 64, codes.bottom))
    tok.save_pretrained(tmp_path / "export")
    loaded = VideoTokenizer.from_pretrained(tmp_path / "export").eval()
    assert loaded.config == cfg
    video = _video(cfg)
    assert all(torch.equal(a, b) for a, b in zip(loaded.encode(video), tok.encode(video)))


def test_two_level_tokenizer_is_evaluated_on_both_grids(tmp_path):
    from magvit.evaluation.evaluators import TokenizerEvaluation
    from magvit.metrics import bits_per_pixel
    from magvit.prep.tokenize import load_tokenizer

    tok = VideoTokenizer(TokenizerConfig.preset("tiny", hierarchy=2, num_frames=4, image_size=16)).eval()
    tok.save_pretrained(tmp_path / "export")
    assert load_tokenizer(str(tmp_path / "export"), "cpu").config.hierarchy == 2  # token shards take both grids
    evaluation = TokenizerEvaluation(tok, torch.device("cpu"))
    codes, _ = evaluation.update(torch.rand(2, 3, 4, 16, 16) * 2 - 1)
    assert isinstance(codes, HierarchicalCodes)
    summary = evaluation.summary()
    assert summary["token_grid"] == [2, 4, 4] and summary["top_token_grid"] == [2, 2, 2]
    assert summary["top_codebook_size"] == summary["codebook_size"] and 0 < summary["top_codebook_usage"] <= 1
    assert summary["bits_per_pixel"] == pytest.approx(bits_per_pixel(tok.config.codebook_size, (2, 4, 4), (4, 16, 16))
                                                      + bits_per_pixel(tok.config.codebook_size, (2, 2, 2),
                                                                       (4, 16, 16)))


def test_patch_size_space_to_depth_grid_locality_and_gradient():
    """``patch_size`` p: each frame's p x p pixel blocks become channels before the first conv and come back after the
    last, so the grid is p x coarser, pixels of one block share the first conv's input position, the decoder's
    output blocks are independent sub-pixels, and the straight-through gradient still reaches ``conv_in``."""
    base = TokenizerConfig.preset("tiny", causal=True, quantizer="lfq")
    cfg = base.replace(patch_size=2)
    assert cfg.spatial_factor == 2 * base.spatial_factor
    assert cfg.token_grid(9, 32, 32) == (5, 4, 4) and base.token_grid(9, 32, 32) == (5, 8, 8)
    with pytest.raises(ValueError, match="divisible by the spatial factor 8"):
        cfg.token_grid(9, 28, 28)
    with pytest.raises(ConfigError, match="patch_size must be >= 1"):
        TokenizerConfig.from_dict({**cfg.to_dict(), "patch_size": 0})
    tok = VideoTokenizer(cfg)
    assert tok.encoder.conv_in.weight.shape[1] == 3 * 2 * 2 and tok.decoder.conv_out.weight.shape[0] == 3 * 2 * 2
    video = _video(cfg, batch=1)
    with torch.no_grad():
        codes = tok.encode(video)
        assert codes.shape == (1, 5, 4, 4) and tok.decode(codes).shape == video.shape
        # Space-to-depth layout: input pixel (y, x) of channel c is channel c * 4 + (y % 2) * 2 + x % 2 at (y // 2,
        # x // 2) of conv_in's input; checked by the conv_in input that a hook sees.
        seen = {}
        hook = tok.encoder.conv_in.register_forward_hook(lambda m, args, out: seen.update(x=args[0]))
        tok.encoder(video)
        hook.remove()
        x = seen["x"]
        assert x.shape == (1, 12, 9, 16, 16)
        assert torch.equal(x[0, 1 * 4 + 1 * 2 + 0, :, 3, 5], video[0, 1, :, 7, 10])
    reconstruction, stats = tok(video)
    ((reconstruction - video).pow(2).mean() + stats["quantizer_loss"]).backward()
    assert tok.encoder.conv_in.weight.grad.abs().sum() > 0


@pytest.mark.parametrize("options", [dict(), dict(downsample="conv", upsample="depth_to_space")])
def test_spatial_downsample_keeps_h_w_where_told(options, tmp_path):
    """``spatial_downsample``: a downsample flagged False halves time only (where ``temporal_downsample`` says), so the
    grid is twice as fine per such flag; empty flags are every downsample halving H and W (the same model, draw for
    draw); the flags travel with an export, and the straight-through gradient reaches the first conv."""
    base = TokenizerConfig.preset("tiny", causal=True, quantizer="fsq", codebook_size=240, **options)
    assert base.spatial_flags == (True, True) and base.token_grid(9, 32, 32) == (5, 8, 8)
    torch.manual_seed(0)
    default = VideoTokenizer(base)
    torch.manual_seed(0)
    explicit = VideoTokenizer(base.replace(spatial_downsample=(True, True)))
    video = _video(base, batch=1)
    with torch.no_grad():
        assert torch.equal(default.encode(video), explicit.encode(video))
    cfg = base.replace(spatial_downsample=(True, False))
    assert cfg.spatial_factor == 2 and cfg.token_grid(9, 32, 32) == (5, 16, 16)
    with pytest.raises(ValueError, match="spatial_downsample needs one flag per downsample"):
        base.replace(spatial_downsample=(True,))
    tok = VideoTokenizer(cfg)
    with torch.no_grad():
        codes = tok.encode(video)
        assert codes.shape == (1, 5, 16, 16) and tok.decode(codes).shape == video.shape
    tok.save_pretrained(tmp_path / "export")
    loaded = VideoTokenizer.from_pretrained(tmp_path / "export")
    assert loaded.config.spatial_flags == (True, False)
    with torch.no_grad():
        assert torch.equal(loaded.encode(video), codes)
    reconstruction, stats = tok(video)
    ((reconstruction - video).pow(2).mean() + stats["quantizer_loss"]).backward()
    assert tok.encoder.conv_in.weight.grad.abs().sum() > 0


def test_downsample_upsample_time_only_known_values():
    """Pooling with ``spatial=False``: causal frame 0 kept, frames 1.. averaged in pairs, H and W untouched; the
    nearest upsampling puts each latent frame back on its frames (frame 0 alone)."""
    from magvit.tokenizer import downsample, upsample

    x = torch.arange(5 * 2 * 2, dtype=torch.float32).view(1, 1, 5, 2, 2)
    pooled = downsample(x, temporal=True, causal=True, spatial=False)
    assert pooled.shape == (1, 1, 3, 2, 2)
    assert torch.equal(pooled[0, 0, 0], x[0, 0, 0]) and torch.equal(pooled[0, 0, 2], (x[0, 0, 3] + x[0, 0, 4]) / 2)
    assert torch.equal(downsample(x, temporal=False, causal=True, spatial=False), x)
    back = upsample(pooled, temporal=True, causal=True, spatial=False)
    assert back.shape == x.shape and torch.equal(back[:, :, 1], pooled[:, :, 1]) and torch.equal(back[:, :, 2], pooled[:, :, 1])
    assert torch.equal(downsample(x, temporal=True, causal=False, spatial=False)[0, 0, 0], (x[0, 0, 0] + x[0, 0, 1]) / 2)
