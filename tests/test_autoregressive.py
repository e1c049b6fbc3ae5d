"""The autoregressive prior (VQGAN's transformer over the codes): causality, KV-cache decoding against decoding
without it, the training sequence and loss, exports and the pipeline; and end to end (slow): a 2-rank DeepSpeed
run on token shards, exact resume after SIGKILL, the export generating mp4s from a first frame and from a sketch
through ``python -m magvit.generate``."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from conftest import load_real_clip
from magvit import TokenizerConfig, TransformerConfig, VideoPipeline, VideoTokenizer
from magvit.autoregressive import (AutoregressiveConfig, AutoregressiveObjectiveConfig, AutoregressiveTransformer,
                                   next_token_loss, video_logits)
from magvit.prior_training import training_sequence
from magvit.autoregressive_sampling import autoregressive_decode, filter_logits, sample_codes
from magvit.masking import MaskingConfig, make_training_batch
from magvit.pipeline import load_pretrained
from test_train_e2e import ROOT, _kill_after_checkpoint_and_resume, _losses, _run

GRID = (2, 4, 4)  # the tiny tokenizer's codes of 4x16x16 clips


def _prior(**overrides) -> AutoregressiveTransformer:
    torch.manual_seed(0)
    return AutoregressiveTransformer(AutoregressiveConfig.preset("tiny", token_grid=GRID, **overrides)).eval()


def _sequences(prior: AutoregressiveTransformer, batch: int = 2) -> torch.Tensor:
    """Random ``(B, L)`` sequences: a task and class token, then codes (prefix and video)."""
    config = prior.config
    ids = torch.randint(0, config.codebook_size, (batch, config.max_length))
    ids[:, 0] = config.vocab.task_token("frame_prediction")
    ids[:, 1] = config.vocab.unconditional_token
    return ids


def test_presets_are_the_masked_transformers_sizes_and_configs_check_themselves():
    for name in ("tiny", "B", "L"):
        ar, masked = AutoregressiveConfig.preset(name), TransformerConfig.preset(name)
        assert (ar.hidden_size, ar.num_layers, ar.num_heads, ar.intermediate_size) == \
            (masked.hidden_size, masked.num_layers, masked.num_heads, masked.intermediate_size)
    config = AutoregressiveConfig.preset("tiny", num_classes=3)
    assert config.max_length == 2 + 2 * 4 * 8 * 8 and config.vocab_size == 64 + 3 + 9 + 3
    with pytest.raises(ValueError, match="not divisible"):
        AutoregressiveConfig.preset("tiny", num_heads=3)
    with pytest.raises(ValueError, match="unknown task 'nope'"):
        AutoregressiveConfig.preset("tiny", tasks=("class", "nope"))
    with pytest.raises(ValueError, match="unknown task 'nope'"):
        AutoregressiveObjectiveConfig(tasks=["nope"])


def test_changing_a_token_never_changes_the_logits_before_it():
    prior = _prior()
    ids = _sequences(prior, batch=1)
    logits = prior(ids)
    assert logits.shape == (1, prior.config.max_length, prior.config.vocab_size)
    for j in (1, 2, 17, 18, 25, prior.config.max_length - 1):
        changed = ids.clone()
        changed[0, j] = (changed[0, j] + 1) % prior.config.codebook_size
        other = prior(changed)
        assert torch.equal(other[:, :j], logits[:, :j]), j
        assert not torch.allclose(other[:, j], logits[:, j]), j  # the token itself is read at its own position


def test_forward_cached_is_forward():
    prior = _prior()
    ids = _sequences(prior)
    full = prior(ids)
    first, cache = prior.forward_cached(ids[:, :20])
    second, cache = prior.forward_cached(ids[:, 20:23], cache)
    torch.testing.assert_close(torch.cat([first, second], dim=1), full[:, :23], rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match=r"23 \+ L <= 66"):
        prior.forward_cached(ids, cache)


@pytest.mark.parametrize("options", [dict(), dict(temperature=0.7, top_k=5, top_p=0.9), dict(temperature=0.0),
                                     dict(guidance_scale=1.5)])
def test_kv_cache_decoding_equals_decoding_without_it_and_keeps_the_prefix(options):
    prior = _prior()
    config = prior.config
    tokens = _sequences(prior, batch=3)
    start = config.layout.video.start
    tokens[:, start:] = config.vocab.mask_token
    uncond = tokens.clone()
    uncond[:, config.layout.prefix] = config.vocab.pad_token
    guided = {"uncond_tokens": uncond} if "guidance_scale" in options else {}
    outs = [autoregressive_decode(prior, tokens, start=start, codebook_size=config.codebook_size, use_cache=cache,
                                  generator=torch.Generator().manual_seed(3), **options, **guided)
            for cache in (True, False)]
    assert torch.equal(outs[0], outs[1])
    assert torch.equal(outs[0][:, :start], tokens[:, :start])  # the condition comes back unchanged
    video = outs[0][:, start:]
    assert int(video.min()) >= 0 and int(video.max()) < config.codebook_size  # codes only, never special tokens
    again = autoregressive_decode(prior, tokens, start=start, codebook_size=config.codebook_size,
                                  generator=torch.Generator().manual_seed(3), **options, **guided)
    assert torch.equal(again, outs[0])


def test_filters_and_sampling():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    assert torch.isinf(filter_logits(logits, top_k=2)).tolist() == [[False, False, True, True]]
    assert torch.isinf(filter_logits(logits, top_p=0.6)).tolist() == [[False, False, True, True]]
    assert torch.isinf(filter_logits(logits, top_p=0.85)).tolist() == [[False, False, False, True]]
    assert torch.isinf(filter_logits(logits, top_p=0.1)).tolist() == [[False, True, True, True]]  # the top stays
    shuffled = logits[:, [2, 0, 3, 1]]  # the filter works in code order, not sorted order
    assert torch.isinf(filter_logits(shuffled, top_p=0.6)).tolist() == [[True, False, True, False]]
    many = logits.expand(4000, -1)
    draws = sample_codes(many, top_p=0.6, generator=torch.Generator().manual_seed(0))
    assert set(draws.tolist()) == {0, 1}
    assert (draws == 0).float().mean().item() == pytest.approx(0.5 / 0.8, abs=0.03)  # renormalised nucleus
    assert sample_codes(many[:3], temperature=0.0).tolist() == [0, 0, 0]


def test_training_sequence_holds_every_code_and_the_masked_transformers_conditions():
    config = AutoregressiveConfig.preset("tiny", token_grid=GRID, num_classes=2)
    vocab, layout = config.vocab, config.layout
    batch = {"codes": torch.randint(0, 64, (4, *GRID)), "cond.frame_prediction": torch.randint(0, 64, (4, *GRID)),
             "label": torch.tensor([0, 1, -1, 1])}
    ids = training_sequence(batch, vocab, AutoregressiveObjectiveConfig(cond_dropout_prob=0.3),
                            torch.Generator().manual_seed(1))
    masked = make_training_batch(batch, vocab, MaskingConfig(cond_dropout_prob=0.3), mask_ratio=0.0,
                                 generator=torch.Generator().manual_seed(1))
    assert torch.equal(ids[:, layout.video], batch["codes"].reshape(4, -1))
    assert torch.equal(ids[:, :layout.video.start], masked.input_ids[:, :layout.video.start])  # the same draws


def test_the_loss_reads_the_positions_before_each_video_code():
    config = AutoregressiveConfig.preset("tiny", token_grid=GRID)
    layout, k = config.layout, config.codebook_size
    ids = torch.randint(0, k, (2, config.max_length))
    logits = torch.randn(2, config.max_length, config.vocab_size)
    loss = next_token_loss(logits, ids, layout, k)
    expected = torch.nn.functional.cross_entropy(logits[:, layout.video.start - 1:-1, :k].reshape(-1, k),
                                                 ids[:, layout.video].reshape(-1))
    torch.testing.assert_close(loss, expected)
    other = logits.clone()
    other[:, :layout.video.start - 1] = torch.randn_like(other[:, :layout.video.start - 1])  # the condition's own
    other[:, -1] = 0.0  # the last position predicts nothing
    other[:, :, k:] = 5.0  # special tokens are never targets
    torch.testing.assert_close(next_token_loss(other, ids, layout, k), loss)
    assert video_logits(logits, layout, k).shape == (2, layout.num_video_tokens, k)


def test_export_round_trip_and_the_pipeline_loads_either_prior(tmp_path):
    from magvit.cli import UsageError
    from magvit.transformer import MaskedVideoTransformer

    prior = _prior(num_classes=2)
    prior.class_names = ["a", "b"]
    prior.save_pretrained(tmp_path / "ar")
    import magvit

    assert magvit.AutoregressiveTransformer is AutoregressiveTransformer  # the model card's usage line
    assert "from magvit import AutoregressiveTransformer" in (tmp_path / "ar" / "README.md").read_text()
    loaded = load_pretrained("prior", tmp_path / "ar")
    assert isinstance(loaded, AutoregressiveTransformer) and loaded.class_names == ["a", "b"]
    ids = _sequences(prior)
    assert torch.equal(loaded(ids), prior(ids))
    # what needs the masked transformer (evaluate's masked-token NLL) still refuses another prior
    with pytest.raises(UsageError, match="'autoregressive_transformer' checkpoint, expected 'masked_video"):
        load_pretrained("transformer", tmp_path / "ar")
    MaskedVideoTransformer(TransformerConfig.preset("tiny")).save_pretrained(tmp_path / "masked")
    assert isinstance(load_pretrained("prior", tmp_path / "masked"), MaskedVideoTransformer)
    VideoTokenizer(TokenizerConfig.preset("tiny")).save_pretrained(tmp_path / "tok")
    with pytest.raises(UsageError, match="cannot load the transformer from .*'video_tokenizer' checkpoint"):
        load_pretrained("prior", tmp_path / "tok")


def test_pipeline_samples_an_autoregressive_prior(real_video_path):
    tokenizer = VideoTokenizer(TokenizerConfig.preset("tiny", num_frames=4, image_size=16)).eval()
    pipe = VideoPipeline(tokenizer, _prior(num_classes=2))
    clip = load_real_clip(real_video_path, num_frames=4, size=24)[0]  # (3, 4, 24, 24): cropped to 16
    assert "top_p" in pipe.prior_kind.options and "steps" not in pipe.prior_kind.options
    for task, condition in (("frame_prediction", clip), ("class", None)):
        videos = pipe(task, condition, num_samples=2, class_id=1 if task == "class" else -1, seed=4, top_k=8,
                      top_p=0.95, guidance_scale=1.0)
        assert videos.shape == (2, 3, 4, 16, 16) and float(videos.abs().max()) <= 1.0
        assert torch.equal(videos, pipe(task, condition, num_samples=2, class_id=1 if task == "class" else -1,
                                        generator=torch.Generator().manual_seed(4), top_k=8, top_p=0.95,
                                        guidance_scale=1.0))


def test_trainer_config_errors_are_one_line_exit_2(capsys, monkeypatch):
    from magvit.launch import train_autoregressive

    monkeypatch.chdir(ROOT)
    cases = [(["objective.tasks=[nope]"], "unknown task 'nope'"), (["objective.label_smoothing=1"], "objective"),
             (["model.num_heads=3"], "not divisible"), (["data.tokens=/nonexistent"], "not found")]
    for overrides, expected in cases:
        argv = ["--config=configs/autoregressive/tiny.yaml", *overrides]
        assert train_autoregressive.run_main(None, train_autoregressive.main, argv) == 2, argv
        err = capsys.readouterr().err
        assert err.startswith("error: ") and err.count("\n") == 1 and expected in err, (argv, err)


# --- end to end: 2 ranks with the deepspeed launcher, SIGKILL, exact resume, generation ---------------------------
# (the launch helpers are the masked transformer's, from test_train_e2e; the sample data is conftest's)

AR_OVERRIDES = ["data.batch_size=2", "train.max_steps=6", "train.warmup_steps=2", "checkpoint.every=2",
                "logging.log_every=1", "logging.tensorboard=false", "logging.progress=false"]


@pytest.fixture(scope="module")
def tiny_tokens(tmp_path_factory, sample_manifest) -> Path:
    """Token shards (2x4x4 codes) of the sample clips, by a tiny tokenizer export (random weights: the prior's
    training and decoding, not the codes' quality, are under test)."""
    from magvit.prep import tokenize

    root = tmp_path_factory.mktemp("ar_tokens")
    torch.manual_seed(0)
    VideoTokenizer(TokenizerConfig.preset("tiny", num_frames=4, image_size=16)).save_pretrained(root / "tokenizer")
    assert tokenize.main(["--tokenizer", str(root / "tokenizer"), "--manifest", str(sample_manifest), "--out",
                          str(root / "tokens"), "--split", "all", "--workers", "0"]) == 0  # in-process: no start-up
    return root


@pytest.fixture(scope="module")
def ar_reference(tmp_path_factory, tiny_tokens) -> Path:
    """Uninterrupted 2-rank ZeRO-2 fp32 run of 6 steps."""
    run_dir = tmp_path_factory.mktemp("ar_ref")
    result = _run("train_autoregressive.py", ["--config", "configs/autoregressive/tiny.yaml", "--run-dir",
                                              str(run_dir), f"data.tokens={tiny_tokens / 'tokens'}", *AR_OVERRIDES])
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return run_dir


@pytest.mark.slow
def test_autoregressive_run_resumes_exactly_after_sigkill_and_its_export_generates(ar_reference, tiny_tokens,
                                                                                  real_video_path, tmp_path):
    """Killed (SIGKILL, whole process group) after its first checkpoint, resumed with --resume auto: every later
    step's losses and the exported EMA weights equal the uninterrupted run's. The export then generates an mp4
    from a first frame and from a sketch through the command line."""
    from safetensors.torch import load_file

    from magvit.generate import main
    from magvit.video_io import read_video, write_image, write_video

    losses = _losses(ar_reference, "loss")
    assert sorted(losses) == [1, 2, 3, 4, 5, 6] and all(0 < v < 10 for v in losses.values())
    assert sorted(_losses(ar_reference, "next_token_accuracy")) == [1, 2, 3, 4, 5, 6]
    run_dir = tmp_path / "run"
    args = ["--config", "configs/autoregressive/tiny.yaml", "--run-dir", str(run_dir),
            f"data.tokens={tiny_tokens / 'tokens'}", *AR_OVERRIDES]
    killed_at = _kill_after_checkpoint_and_resume("train_autoregressive.py", args, run_dir)
    assert 2 <= killed_at < 6
    for key in ("loss", "next_token_accuracy"):
        reference, resumed = _losses(ar_reference, key), _losses(run_dir, key)
        assert all(resumed[s] == reference[s] for s in reference if s > killed_at), key
    weights = [load_file(str(run / "export" / "model.safetensors")) for run in (ar_reference, run_dir)]
    assert weights[0].keys() == weights[1].keys()
    assert all(torch.equal(weights[0][name], weights[1][name]) for name in weights[0])

    clip = load_real_clip(real_video_path, num_frames=4, size=24)[0]
    write_image(tmp_path / "first_frame.png", clip[:, 0])
    write_video(tmp_path / "clip.mp4", clip, fps=10)
    models = ["--tokenizer", str(tiny_tokens / "tokenizer"), "--transformer", str(run_dir / "export")]
    assert main([*models, "--cond", str(tmp_path / "first_frame.png"), "--out", str(tmp_path / "fp.mp4"),
                 "--top-k", "16", "--top-p", "0.9", "--temperature", "0.8"]) == 0
    assert main([*models, "--task", "sketch", "--cond", str(tmp_path / "clip.mp4"), "--out",
                 str(tmp_path / "sketch.mp4"), "--num-samples", "2"]) == 0
    for name in ("fp.mp4", "sketch_0.mp4", "sketch_1.mp4"):
        assert read_video(tmp_path / name).frames.shape == (4, 16, 16, 3), name
