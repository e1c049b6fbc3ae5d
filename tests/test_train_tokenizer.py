"""Starting weights of a tokenizer run: fine-tuning from an export (``init_from``) and 2D->3D inflation
(``init_from`` + ``inflate: true``), through the library function the trainer calls and its config check."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

from magvit import TokenizerConfig, VideoTokenizer
from magvit.config import ConfigError
from magvit.tokenizer import check_init_from, init_tokenizer

ROOT = Path(__file__).resolve().parents[1]
TINY_V2 = dict(downsample="conv", upsample="depth_to_space", decoder_norm="adaptive_group",
               decoder_channel_multipliers=(1, 1, 2), decoder_res_blocks=(0, 1, 1))


def _trained_export(cfg: TokenizerConfig, path: Path) -> VideoTokenizer:
    """An export whose weights differ from any fresh initialisation (every tensor perturbed)."""
    torch.manual_seed(1)
    tok = VideoTokenizer(cfg)
    with torch.no_grad():
        for p in tok.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    tok.save_pretrained(path)
    return tok


@pytest.mark.parametrize("options", [dict(), dict(causal=True, quantizer="lfq", **TINY_V2)], ids=["v1", "v2"])
def test_init_from_export_gives_identical_weights(tmp_path, options):
    cfg = TokenizerConfig.preset("tiny", **options)
    source = _trained_export(cfg, tmp_path / "export")
    torch.manual_seed(0)
    start = init_tokenizer(cfg, tmp_path / "export")
    assert start.training  # ready to train
    source_state, start_state = source.state_dict(), start.state_dict()
    assert source_state.keys() == start_state.keys()
    for name, tensor in source_state.items():
        assert torch.equal(start_state[name], tensor), name
    # A run config may change what has no weights (clip size, loss weights): still the same tensors.
    other = cfg.replace(num_frames=cfg.num_frames + cfg.temporal_factor,
                        quantization={**cfg.quantization.to_dict(), "entropy_loss_weight": 0.5})
    assert torch.equal(init_tokenizer(other, tmp_path / "export").decoder.conv_out.weight,
                       source.decoder.conv_out.weight)
    # No init_from: a fresh model (the same as building it directly under the same seed).
    torch.manual_seed(0)
    fresh = init_tokenizer(cfg)
    torch.manual_seed(0)
    assert torch.equal(fresh.encoder.conv_in.weight, VideoTokenizer(cfg).encoder.conv_in.weight)


@pytest.mark.parametrize("options", [dict(causal=False), dict(causal=True), dict(causal=True, **TINY_V2)],
                         ids=["central", "causal", "causal-v2"])
def test_inflate_from_2d_export_matches_image_model_per_frame(tmp_path, options):
    blocks = {k: v for k, v in options.items() if k != "causal"}
    image_cfg = TokenizerConfig.preset("tiny", temporal_kernel_size=1, num_frames=1, temporal_downsample=(False, False),
                                       **blocks)
    image_tok = _trained_export(image_cfg, tmp_path / "image").eval()
    video_cfg = TokenizerConfig.preset("tiny", **options)
    video_tok = init_tokenizer(video_cfg, tmp_path / "image", inflate=True).eval()
    assert video_tok.encoder.conv_in.weight.shape[2] == 3
    image = torch.rand(2, 3, 1, 16, 16) * 2 - 1
    static = image.expand(-1, -1, video_cfg.num_frames, -1, -1).contiguous()
    with torch.no_grad():
        image_latent = image_tok.encoder(image)  # (2, D, 1, 4, 4)
        latents = video_tok.encoder(static)  # (2, D, t, 4, 4)
        torch.testing.assert_close(latents, image_latent.expand_as(latents), atol=1e-5, rtol=1e-4)
        image_codes = image_tok.encode(image)
        codes = video_tok.encode(static)
        assert torch.equal(codes, image_codes.expand_as(codes))
        frames = video_tok.decode(codes)  # every output frame equals the 2D model's decoded image
        torch.testing.assert_close(frames, image_tok.decode(image_codes).expand_as(frames), atol=1e-5, rtol=1e-4)


def test_bad_sources_are_one_line_errors(tmp_path):
    cfg = TokenizerConfig.preset("tiny")
    with pytest.raises(FileNotFoundError, match="no VideoTokenizer checkpoint"):
        init_tokenizer(cfg, tmp_path / "missing")
    _trained_export(cfg.replace(base_channels=8), tmp_path / "narrow")
    with pytest.raises(ValueError, match=r"'encoder.conv_in.weight' is \(8, 3, 3, 3, 3\) in the export but "
                                         r"\(16, 3, 3, 3, 3\) in the model \(and \d+ more\)"):
        init_tokenizer(cfg, tmp_path / "narrow")
    _trained_export(cfg.replace(quantizer="lfq"), tmp_path / "lfq")  # no VQ codebook, different latent width
    with pytest.raises(ValueError, match="does not fit the model config"):
        check_init_from(cfg, tmp_path / "lfq")
    _trained_export(cfg, tmp_path / "video")
    with pytest.raises(ValueError, match="temporal_kernel_size=1"):
        init_tokenizer(cfg, tmp_path / "video", inflate=True)
    with pytest.raises(ValueError, match="inflate needs init_from"):
        init_tokenizer(cfg, "", inflate=True)
    (tmp_path / "video" / "model.safetensors").write_bytes(b"\x80\x04not safetensors")
    with pytest.raises(ValueError, match="not a readable safetensors file"):
        init_tokenizer(cfg, tmp_path / "video")
    for message in ("does not fit", "not a readable"):  # every message is one line
        assert "\n" not in message


def test_training_config_keys_and_cli_errors(tmp_path):
    """``init_from`` / ``inflate`` in the run config; a bad source stops the trainer before it starts: one line on
    stderr, exit status 2."""
    from magvit.launch.train_tokenizer import load_config
    from magvit.run_config import TokenizerTrainConfig

    cfg = TokenizerConfig.preset("tiny")
    _trained_export(cfg, tmp_path / "export")
    loaded = load_config("configs/tokenizer/tiny.yaml", [f"init_from={tmp_path / 'export'}"])
    assert (loaded.init_from, loaded.inflate) == (str(tmp_path / "export"), False)
    with pytest.raises(ConfigError, match="init_from: .*'encoder.conv_in.weight'"):
        load_config("configs/tokenizer/tiny.yaml", [f"init_from={tmp_path / 'export'}", "model.base_channels=32"])
    with pytest.raises(ConfigError, match="inflate: true needs init_from"):
        TokenizerTrainConfig.from_dict({"inflate": True})
    # The same keys under `model`, as `model.init_from: PATH` / `model.inflate: true`.
    (tmp_path / "nested.yaml").write_text(f"model:\n  preset: tiny\n  init_from: {tmp_path / 'export'}\n")
    nested = load_config(str(tmp_path / "nested.yaml"), [])
    assert (nested.init_from, nested.inflate, hasattr(nested.model, "init_from")) == (str(tmp_path / "export"), False, False)
    with pytest.raises(ConfigError, match="inflate: true needs init_from"):
        TokenizerTrainConfig.from_dict({"model": {"preset": "tiny", "inflate": True}})
    with pytest.raises(ConfigError, match="init_from and model.init_from disagree"):
        TokenizerTrainConfig.from_dict({"init_from": "a", "model": {"preset": "tiny", "init_from": "b"}})
    result = subprocess.run([sys.executable, str(ROOT / "launch" / "train_tokenizer.py"), "--config",
                             "configs/tokenizer/tiny.yaml", f"init_from={tmp_path / 'missing'}"],
                            cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: init_from: no VideoTokenizer checkpoint"), lines
