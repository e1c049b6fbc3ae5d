"""Priors over VQ-VAE-2's two code grids (``magvit.code_grids``): packing round trips; the masked prior's two
training stages and two decoding phases; the autoregressive prior's causal order (top before bottom); and end to end
(slow): a hierarchy-2 tokenizer's token shards, both trainers, and ``python -m magvit.generate`` / ``evaluate``."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from magvit import code_grids
from magvit.autoregressive import AutoregressiveConfig, AutoregressiveTransformer, training_sequence
from magvit.masking import (IGNORE_INDEX, SequenceLayout, TokenVocabulary, latent_condition_regions,
                            make_training_batch)
from magvit.tokenizer import HierarchicalCodes
from magvit.transformer import MaskedVideoTransformer, TransformerConfig

GRID, TOP_GRID = (2, 4, 4), (2, 2, 2)  # the tiny hierarchy-2 tokenizer's grids of 4x16x16 clips
N_TOP, N = 8, 40  # top tokens, video tokens (top + bottom)
K = 16  # codebook


def _codes(batch: int, generator: torch.Generator) -> HierarchicalCodes:
    return HierarchicalCodes(torch.randint(0, K, (batch, *TOP_GRID), generator=generator),
                             torch.randint(0, K, (batch, *GRID), generator=generator))


def _shard_batch(batch: int, seed: int = 0) -> dict[str, torch.Tensor]:
    """A collated two-grid token batch as the shards hold it: codes and the frame-prediction condition."""
    g = torch.Generator().manual_seed(seed)
    return {**code_grids.shard_entries("codes", _codes(batch, g)),
            **code_grids.shard_entries("cond.frame_prediction", _codes(batch, g)),
            "label": torch.full((batch,), -1)}


def test_pack_unpack_round_trip_and_shapes():
    g = torch.Generator().manual_seed(0)
    codes = _codes(3, g)
    packed = code_grids.pack_codes(codes)
    assert packed.shape == (3, N)
    assert torch.equal(packed[:, :N_TOP], codes.top.reshape(3, -1))  # the top grid first, raster order
    assert torch.equal(packed[:, N_TOP:], codes.bottom.reshape(3, -1))
    top, bottom = code_grids.video_codes(packed, GRID, TOP_GRID)
    assert torch.equal(top, codes.top) and torch.equal(bottom, codes.bottom)
    one = codes.bottom
    assert code_grids.pack_codes(one) is one
    assert torch.equal(code_grids.video_codes(one.reshape(3, -1), GRID, None), one)
    with pytest.raises(ValueError, match="packed tokens must be"):
        code_grids.unpack(packed[:, 1:], TOP_GRID, GRID)
    parts = code_grids.split_codes(codes, 2)
    assert [type(p) for p in parts] == [HierarchicalCodes] * 2 and parts[1].top.shape == (1, *TOP_GRID)
    assert sorted(code_grids.shard_entries("cond.x", codes)) == ["cond.x", "top.cond.x"]
    batch = _shard_batch(2)
    packed_batch, top_grid = code_grids.pack_batch(batch)
    assert top_grid == TOP_GRID and sorted(packed_batch) == ["codes", "cond.frame_prediction", "label"]
    assert torch.equal(packed_batch["codes"], code_grids.pack(batch["top.codes"], batch["codes"]))
    single = {"codes": one}
    assert code_grids.pack_batch(single) == (single, None)
    assert code_grids.check_grids(GRID, [2, 2, 2]) == TOP_GRID and code_grids.check_grids(GRID, None) is None
    with pytest.raises(ValueError, match="top_grid must be"):
        code_grids.check_grids(GRID, (2, 4, 4))
    layout = SequenceLayout(GRID, "prefix", TOP_GRID)
    assert layout.length == 2 + 2 * N and layout.video_shape == (N,)
    assert TransformerConfig.preset("tiny", codebook_size=K, token_grid=GRID, top_grid=TOP_GRID).max_length == 2 + 2 * N
    assert TransformerConfig.preset("tiny", codebook_size=K, token_grid=GRID).top_grid is None  # old exports


def test_a_two_grid_tokenizer_pairs_only_with_a_prior_over_both_grids():
    from magvit import TokenizerConfig
    from magvit.cli import UsageError
    from magvit.pipeline import check_pair

    two = TokenizerConfig.preset("tiny", num_frames=4, image_size=16, hierarchy=2, codebook_size=K)
    one = TokenizerConfig.preset("tiny", num_frames=4, image_size=16, codebook_size=K)
    both = TransformerConfig.preset("tiny", codebook_size=K, token_grid=GRID, top_grid=TOP_GRID)
    bottom_only = TransformerConfig.preset("tiny", codebook_size=K, token_grid=GRID)
    assert check_pair(two, both) == GRID and check_pair(one, bottom_only) == GRID
    for tokenizer, prior in ((two, bottom_only), (one, both)):
        with pytest.raises(UsageError, match="top code grid"):
            check_pair(tokenizer, prior)


def test_masked_training_batch_has_a_top_stage_and_a_bottom_stage():
    vocab = TokenVocabulary(K)
    layout = SequenceLayout(GRID, "prefix", TOP_GRID)
    batch = _shard_batch(64)
    tb = make_training_batch(batch, vocab, tasks=["frame_prediction"], cond_dropout_prob=0.0,
                             generator=torch.Generator().manual_seed(1))
    video = slice(layout.video.start, layout.video.stop)
    top, bottom = slice(video.start, video.start + N_TOP), slice(video.start + N_TOP, video.stop)
    packed = code_grids.pack(batch["top.codes"], batch["codes"])
    assert torch.equal(tb.labels[:, video], packed)  # every video position is a target, top first
    assert torch.equal(tb.input_ids[:, layout.prefix], code_grids.pack(batch["top.cond.frame_prediction"],
                                                                       batch["cond.frame_prediction"]))
    top_stage = (tb.loss_mask[:, top] > 0).any(1)
    bottom_stage = (tb.loss_mask[:, bottom] > 0).any(1)
    assert bool((top_stage ^ bottom_stage).all()) and 10 < int(top_stage.sum()) < 54  # one stage each, both drawn
    mask = vocab.mask_token
    # top stage: the bottom all masked and never scored; some top tokens masked
    assert bool((tb.input_ids[top_stage][:, bottom] == mask).all())
    assert bool((tb.loss_mask[top_stage][:, bottom] == 0).all())
    assert bool((tb.input_ids[top_stage][:, top] == mask).any(1).all())
    # bottom stage: the whole top shown as it is and not scored; some bottom tokens masked
    assert torch.equal(tb.input_ids[bottom_stage][:, top], packed[bottom_stage][:, :N_TOP])
    assert bool((tb.loss_mask[bottom_stage][:, top] == 0).all())
    assert bool((tb.input_ids[bottom_stage][:, bottom] == mask).any(1).all())
    assert torch.equal(tb.loss_mask[tb.labels == IGNORE_INDEX], torch.zeros(int((tb.labels == IGNORE_INDEX).sum())))


def test_interior_training_batch_shows_the_condition_at_both_grids():
    vocab = TokenVocabulary(K)
    regions = latent_condition_regions(["frame_prediction"], GRID, (4, 16, 16), False, TOP_GRID)
    region = regions["frame_prediction"]
    assert region.shape == (N,) and bool(region[:4].all()) and not bool(region[4:8].any())  # latent frame 0 known
    batch = _shard_batch(32)
    tb = make_training_batch(batch, vocab, tasks=["frame_prediction"], cond_dropout_prob=0.0, conditioning="interior",
                             condition_regions=regions, generator=torch.Generator().manual_seed(2))
    video = tb.input_ids[:, 2:]  # (B, N): no prefix
    condition = code_grids.pack(batch["top.cond.frame_prediction"], batch["cond.frame_prediction"])
    truth = code_grids.pack(batch["top.codes"], batch["codes"])
    hidden = video != truth  # masked slots show the mask token or (inside the region) the condition token
    shown = torch.where(region, condition, torch.full_like(condition, vocab.mask_token))
    assert torch.equal(video[hidden], shown[hidden])
    top_stage = (tb.loss_mask[:, 2:2 + N_TOP] > 0).any(1)
    assert bool(top_stage.any()) and torch.equal(video[top_stage][:, N_TOP:], shown[top_stage][:, N_TOP:])


def _masked_prior(conditioning: str = "prefix") -> MaskedVideoTransformer:
    torch.manual_seed(0)
    config = TransformerConfig.preset("tiny", codebook_size=K, token_grid=GRID, top_grid=TOP_GRID,
                                      conditioning=conditioning, tasks=("frame_prediction", "unconditional"))
    return MaskedVideoTransformer(config).eval()


@pytest.mark.parametrize("conditioning", ["prefix", "interior"])
def test_two_phase_decoding_fixes_the_top_before_any_bottom_token(conditioning):
    from magvit.pipeline import generate_codes

    model = _masked_prior(conditioning)
    layout = model.config.layout
    seen: list[torch.Tensor] = []
    model.register_forward_pre_hook(lambda module, args: seen.append(args[0].clone()))
    condition = code_grids.pack_codes(_codes(1, torch.Generator().manual_seed(3)))  # (1, N)
    region = latent_condition_regions(["frame_prediction"], GRID, (4, 16, 16), False, TOP_GRID)["frame_prediction"]
    kept = condition.clone()
    top, bottom = generate_codes(model, "frame_prediction", condition, num_samples=2, steps=3, guidance_scale=1.0,
                                 seed=0, condition_region=region if conditioning == "interior" else None)
    assert top.shape == (2, *TOP_GRID) and bottom.shape == (2, *GRID) and torch.equal(condition, kept)
    mask = model.config.vocab.mask_token
    calls = [ids[:2] for ids in seen]  # the conditional half of each guided call
    assert len(calls) == 6  # 3 steps for the top, then 3 for the bottom
    video = [ids[:, layout.video] for ids in calls]  # (2, N) each: what the model saw
    final_top = top.reshape(2, -1)
    unknown = torch.full_like(condition, mask)  # a masked slot shows the mask token, an interior one in the region
    unknown = torch.where(region, condition, unknown) if conditioning == "interior" else unknown  # its condition
    for step, ids in enumerate(video):
        if step < 3:  # top phase: the bottom wholly unknown; a revealed top token is already the final one
            assert torch.equal(ids[:, N_TOP:], unknown.expand(2, -1)[:, N_TOP:])
            if conditioning == "prefix":
                revealed = ids[:, :N_TOP] != mask
                assert torch.equal(ids[:, :N_TOP][revealed], final_top[revealed])
        else:  # bottom phase: the whole top fixed
            assert torch.equal(ids[:, :N_TOP], final_top)
        if conditioning == "prefix":
            assert torch.equal(calls[step][:, layout.prefix], condition.expand(2, -1))  # the prefix, never written
        else:  # every slot of the region shows its condition code until revealed, at both grids' resolutions
            assert not bool((ids[:, region] == mask).any())


def test_autoregressive_prior_models_the_top_before_the_bottom():
    torch.manual_seed(0)
    config = AutoregressiveConfig.preset("tiny", codebook_size=K, token_grid=GRID, top_grid=TOP_GRID,
                                         tasks=("frame_prediction", "unconditional"))
    prior = AutoregressiveTransformer(config).eval()
    layout = config.layout
    batch = _shard_batch(2)
    ids = training_sequence(batch, config.vocab, tasks=["frame_prediction"], cond_dropout_prob=0.0)
    assert ids.shape == (2, layout.length)
    assert torch.equal(ids[:, layout.video], code_grids.pack(batch["top.codes"], batch["codes"]))
    changed = ids.clone()
    first_bottom = layout.video.start + N_TOP
    changed[:, first_bottom + 3] = (changed[:, first_bottom + 3] + 1) % K  # a bottom code
    with torch.no_grad():
        before, after = prior(ids), prior(changed)
    # every logit that predicts a top code (positions video.start - 1 ... first_bottom - 2), and all up to the change
    assert torch.equal(before[:, :first_bottom + 3], after[:, :first_bottom + 3])
    assert not torch.equal(before[:, first_bottom + 3:], after[:, first_bottom + 3:])


# --- end to end: token shards of a hierarchy-2 tokenizer, both trainers, generate and evaluate -------------------
from test_train_e2e import ROOT, _env, _losses, _run, manifest  # noqa: E402, F401

TRAIN = ["data.batch_size=2", "train.max_steps=3", "train.warmup_steps=1", "checkpoint.every=3",
         "logging.log_every=1", "logging.tensorboard=false", "logging.progress=false"]


def _tokenize(root, manifest, out: str, *extra: str) -> None:
    subprocess.run([sys.executable, "-m", "data_prep.tokenize", "--tokenizer", str(root / "tokenizer"),
                    "--manifest", str(manifest), "--out", str(root / out), "--split", "all", "--workers", "0",
                    "--threads", "1", "--sketch", "none", *extra], cwd=ROOT, env=_env(), check=True,
                   capture_output=True, timeout=180)


@pytest.fixture(scope="module")
def two_grid_tokens(tmp_path_factory, manifest):
    """A tiny hierarchy-2 tokenizer export (random weights) and its token shards in both formats."""
    from magvit import TokenizerConfig, VideoTokenizer

    root = tmp_path_factory.mktemp("two_grids")
    torch.manual_seed(0)
    VideoTokenizer(TokenizerConfig.preset("tiny", num_frames=4, image_size=16, hierarchy=2)).save_pretrained(
        root / "tokenizer")
    _tokenize(root, manifest, "tokens")
    _tokenize(root, manifest, "stream", "--format", "webdataset")
    return root


@pytest.mark.slow
def test_two_grid_shards_train_both_priors_which_generate_and_evaluate(two_grid_tokens, real_video_path, tmp_path):
    from conftest import load_real_clip
    from magvit.data import TokenShardDataset
    from magvit.evaluate import main as evaluate
    from magvit.generate import main as generate
    from magvit.streaming import ShardStream
    from magvit.video_io import read_video, write_image

    root = two_grid_tokens
    meta = json.loads((root / "tokens" / "meta.json").read_text())
    assert meta["token_grid"] == list(GRID) and meta["top_grid"] == list(TOP_GRID)
    item = TokenShardDataset(root / "tokens")[0]
    assert item["codes"].shape == GRID and item["top.codes"].shape == TOP_GRID
    assert item["top.cond.frame_prediction"].shape == TOP_GRID and item["cond.frame_prediction"].shape == GRID
    streamed = next(iter(ShardStream(str(root / "stream"), "tokens", batch_size=2, shuffle_buffer=1)))
    assert streamed["top.codes"].shape == (2, *TOP_GRID) and streamed["codes"].shape == (2, *GRID)

    masked, ar = tmp_path / "masked", tmp_path / "ar"
    result = _run("train_transformer.py", ["--config", "configs/transformer/tiny.yaml", "--run-dir", str(masked),
                                           f"data.tokens={root / 'tokens'}", f"data.val_tokens={root / 'tokens'}",
                                           "data.val_clips=2", "logging.sample_every=3", *TRAIN], ranks=1)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert sorted(_losses(masked, "loss")) == [1, 2, 3] and sorted(_losses(masked, "val/nll")) == [3]
    assert (masked / "samples" / "step_00000003.mp4").is_file()
    assert json.loads((masked / "export" / "config.json").read_text())["config"]["top_grid"] == list(TOP_GRID)
    result = _run("train_autoregressive.py", ["--config", "configs/autoregressive/tiny.yaml", "--run-dir", str(ar),
                                              "data.format=webdataset", f"data.shards={root / 'stream'}", *TRAIN],
                  ranks=1)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert sorted(_losses(ar, "loss")) == [1, 2, 3]

    clip = load_real_clip(real_video_path, num_frames=4, size=24)[0]
    write_image(tmp_path / "first_frame.png", clip[:, 0])
    for prior in (masked, ar):
        models = ["--tokenizer", str(root / "tokenizer"), "--transformer", str(prior / "export")]
        assert generate([*models, "--cond", str(tmp_path / "first_frame.png"), "--out",
                         str(tmp_path / f"{prior.name}.mp4"), "--steps", "2"]) == 0
        assert generate([*models, "--task", "unconditional", "--out", str(tmp_path / f"{prior.name}_u.mp4"),
                         "--steps", "2"]) == 0
        for name in (f"{prior.name}.mp4", f"{prior.name}_u.mp4"):
            assert read_video(tmp_path / name).frames.shape == (4, 16, 16, 3), name
        assert evaluate([*models, "--data", meta["manifest"], "--split", "all", "--max-clips", "2", "--steps", "2",
                         "--out", str(tmp_path / prior.name), "--no-progress"]) == 0
        report = json.loads((tmp_path / prior.name / "report.json").read_text())
        assert report["tokenizer"]["top_token_grid"] == list(TOP_GRID)
        assert report["frame_prediction"]["num_clips"] == 2
        if prior is masked:  # the masked-token NLL of the clips' own codes, both stages
            assert report["masked_tokens"]["masked_token_nll"] > 0
