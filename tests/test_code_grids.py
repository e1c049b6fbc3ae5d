"""Priors over VQ-VAE-2's two code grids (``magvit.code_grids``): packing round trips; the masked prior's two
training stages and two decoding phases; frame prediction given several frame counts at both grids; the
autoregressive prior's causal order (top before bottom); and end to end (slow): a hierarchy-2 tokenizer's token
shards, both trainers, and ``python -m magvit.generate`` / ``evaluate``."""

from __future__ import annotations

import json
import socket
import subprocess
import sys

import pytest
import torch

from magvit import code_grids
from magvit.autoregressive import AutoregressiveConfig, AutoregressiveObjectiveConfig, AutoregressiveTransformer
from magvit.prior_training import training_sequence
from magvit.sequence import IGNORE_INDEX, SequenceLayout, TokenVocabulary
from magvit.conditions import latent_condition_regions
from magvit.masking import MaskingConfig, make_training_batch
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
    tb = make_training_batch(batch, vocab, MaskingConfig(tasks=["frame_prediction"], cond_dropout_prob=0.0,
                                                         two_grid_masking="stages"),
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


def test_joint_masking_masks_both_grids_with_one_mask_and_scores_every_position():
    """The trainer's default for two grids (MaskingConfig.two_grid_masking): one mask over the packed sequence."""
    assert MaskingConfig().two_grid_masking == "joint"
    with pytest.raises(ValueError, match="two_grid_masking"):
        MaskingConfig(two_grid_masking="both")
    vocab = TokenVocabulary(K)
    layout = SequenceLayout(GRID, "prefix", TOP_GRID)
    batch = _shard_batch(64)
    tb = make_training_batch(batch, vocab, MaskingConfig(tasks=["frame_prediction"], cond_dropout_prob=0.0,
                                                         two_grid_masking="joint"),
                             generator=torch.Generator().manual_seed(1))
    video = slice(layout.video.start, layout.video.stop)
    masked = tb.input_ids[:, video] == vocab.mask_token  # (B, N_TOP + N_BOTTOM)
    in_top, in_bottom = masked[:, :N_TOP].any(1), masked[:, N_TOP:].any(1)
    both = in_top & in_bottom & ~masked[:, N_TOP:].all(1)  # masks in both grids, the bottom not wholly masked
    assert int(both.sum()) > 32  # no stages: most examples mask both grids at once
    assert bool((tb.loss_mask[:, video] > 0).all())  # every video position is scored (unmasked_weight 1)
    assert torch.equal(tb.labels[:, video], code_grids.pack(batch["top.codes"], batch["codes"]))


def test_interior_training_batch_shows_the_condition_at_both_grids():
    vocab = TokenVocabulary(K)
    regions = latent_condition_regions(["frame_prediction"], GRID, (4, 16, 16), False, top_grid=TOP_GRID)
    region = regions["frame_prediction"]
    assert region.shape == (N,) and bool(region[:4].all()) and not bool(region[4:8].any())  # latent frame 0 known
    batch = _shard_batch(32)
    tb = make_training_batch(batch, vocab, MaskingConfig(tasks=["frame_prediction"], cond_dropout_prob=0.0,
                                                         two_grid_masking="stages"),
                             conditioning="interior", condition_regions=regions,
                             generator=torch.Generator().manual_seed(2))
    video = tb.input_ids[:, 2:]  # (B, N): no prefix
    condition = code_grids.pack(batch["top.cond.frame_prediction"], batch["cond.frame_prediction"])
    truth = code_grids.pack(batch["top.codes"], batch["codes"])
    hidden = video != truth  # masked slots show the mask token or (inside the region) the condition token
    shown = torch.where(region, condition, torch.full_like(condition, vocab.mask_token))
    assert torch.equal(video[hidden], shown[hidden])
    top_stage = (tb.loss_mask[:, 2:2 + N_TOP] > 0).any(1)
    assert bool(top_stage.any()) and torch.equal(video[top_stage][:, N_TOP:], shown[top_stage][:, N_TOP:])


def test_frame_prediction_given_several_frame_counts_at_both_grids():
    from magvit.conditions import build_condition_video
    from magvit.prep.tokenize import encode_batch
    from magvit.tokenizer import TokenizerConfig, VideoTokenizer

    # tokenize --cond-frames: each count's condition codes at both grids
    tokenizer = VideoTokenizer(TokenizerConfig.preset("tiny", num_frames=4, image_size=16, hierarchy=2,
                                                      base_channels=8)).eval()
    video = torch.rand(2, 3, 4, 16, 16) * 2 - 1
    entries = encode_batch(tokenizer, video, ["frame_prediction"], None, "cpu", cond_frames=(1, 3))
    keys = ["codes", "cond.frame_prediction", "cond.frame_prediction.3"]
    assert sorted(entries) == sorted(keys + [f"top.{k}" for k in keys])
    with torch.no_grad():
        three = tokenizer.encode(build_condition_video(video, "frame_prediction", num_cond_frames=3))
    assert torch.equal(entries["top.cond.frame_prediction.3"], three.top.int())
    assert torch.equal(entries["cond.frame_prediction.3"], three.bottom.int())
    # training: each example takes one count's codes and (interior) its region, packed over both grids
    vocab = TokenVocabulary(K)
    regions = latent_condition_regions(["frame_prediction"], GRID, (4, 16, 16), False, cond_frames=(1, 3),
                                       top_grid=TOP_GRID)
    one, all_frames = regions["frame_prediction"], regions["frame_prediction.3"]
    assert torch.equal(one, latent_condition_regions(["frame_prediction"], GRID, (4, 16, 16), False,
                                                     top_grid=TOP_GRID)["frame_prediction"])
    assert bool(all_frames.all()) and not bool(one.all())  # 3 of 4 frames: both latent frames of both grids
    batch = {**_shard_batch(64), **code_grids.shard_entries("cond.frame_prediction.3",
                                                            _codes(64, torch.Generator().manual_seed(4)))}
    tb = make_training_batch(batch, vocab, MaskingConfig(tasks=["frame_prediction"], cond_dropout_prob=0.0,
                                                         two_grid_masking="stages"),
                             conditioning="interior", condition_regions=regions,
                             generator=torch.Generator().manual_seed(5))
    video_ids, mask = tb.input_ids[:, 2:], vocab.mask_token
    packed = {key: code_grids.pack(batch[f"top.{key}"], batch[key]) for key in keys}
    hidden = video_ids != packed["codes"]
    shows = {region_key: ((torch.where(region, packed[key], mask) == video_ids) | ~hidden).all(1)
             for region_key, key, region in ((1, "cond.frame_prediction", one),
                                             (3, "cond.frame_prediction.3", all_frames))}
    assert bool((shows[1] | shows[3]).all())  # every example shows one count's condition in that count's region
    assert bool((shows[1] & ~shows[3]).any()) and bool((shows[3] & ~shows[1]).any())  # both counts drawn


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
    region = latent_condition_regions(["frame_prediction"], GRID, (4, 16, 16), False,
                                      top_grid=TOP_GRID)["frame_prediction"]
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
    ids = training_sequence(batch, config.vocab,
                            AutoregressiveObjectiveConfig(tasks=["frame_prediction"], cond_dropout_prob=0.0))
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
from test_train_e2e import ROOT, _env, _losses  # noqa: E402

TRAIN = ["data.batch_size=2", "train.max_steps=2", "train.warmup_steps=1", "checkpoint.every=2",
         "logging.log_every=1", "logging.tensorboard=false", "logging.progress=false"]


@pytest.fixture(scope="module")
def two_grid_tokens(tmp_path_factory, real_video_path):
    """A tiny hierarchy-2 tokenizer export (random weights), a manifest of four 4x16x16 real clips and their token
    shards in both formats, with frame prediction given 1 and 2 frames (``--cond-frames 1,2``)."""
    from conftest import load_real_clip
    from magvit import TokenizerConfig, VideoTokenizer
    from magvit.data import write_manifest
    from magvit.prep import tokenize
    from magvit.video_io import write_video

    root = tmp_path_factory.mktemp("two_grids")
    records = []
    for i in range(4):
        write_video(root / f"clip_{i}.mp4", load_real_clip(real_video_path, num_frames=4, size=16, start=4 * i), 8)
        records.append({"path": f"clip_{i}.mp4", "frames": 4, "split": "train"})
    write_manifest(root / "manifest.jsonl", records)
    torch.manual_seed(0)
    config = TokenizerConfig.preset("tiny", num_frames=4, image_size=16, hierarchy=2, base_channels=8)  # 0.16 M
    VideoTokenizer(config).save_pretrained(root / "tokenizer")
    for out, extra in (("tokens", []), ("stream", ["--format", "webdataset"])):
        assert tokenize.main(["--tokenizer", str(root / "tokenizer"), "--manifest", str(root / "manifest.jsonl"),
                              "--out", str(root / out), "--split", "all", "--workers", "0", "--sketch", "none",
                              "--cond-frames", "1,2", *extra]) == 0
    return root


def _train_side_by_side(runs: dict[str, list[str]], logs) -> None:
    """One-process runs of the trainers at the same time (their start-up is most of their time), each on its own
    port; fails with a run's output when it does."""
    with socket.socket() as a, socket.socket() as b:  # two distinct free ports
        a.bind(("127.0.0.1", 0))
        b.bind(("127.0.0.1", 0))
        ports = [a.getsockname()[1], b.getsockname()[1]]
    procs = []
    for (script, args), port in zip(runs.items(), ports):
        with open(logs / f"{script}.log", "w") as log:
            procs.append((script, subprocess.Popen([sys.executable, str(ROOT / "launch" / script), *args], cwd=ROOT,
                                                   env={**_env(), "MASTER_PORT": str(port)}, stdout=log,
                                                   stderr=subprocess.STDOUT)))
    for script, proc in procs:
        assert proc.wait(timeout=240) == 0, (logs / f"{script}.log").read_text()[-3000:]


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
    assert meta["token_grid"] == list(GRID) and meta["top_grid"] == list(TOP_GRID) and meta["cond_frames"] == [1, 2]
    item = TokenShardDataset(root / "tokens")[0]
    assert item["codes"].shape == GRID and item["top.codes"].shape == TOP_GRID
    for key in ("cond.frame_prediction", "cond.frame_prediction.2"):  # every given-frame count at both grids
        assert item[key].shape == GRID and item[f"top.{key}"].shape == TOP_GRID
    streamed = next(iter(ShardStream(str(root / "stream"), "tokens", batch_size=2, shuffle_buffer=1)))
    assert streamed["top.codes"].shape == (2, *TOP_GRID) and streamed["codes"].shape == (2, *GRID)
    assert streamed["top.cond.frame_prediction.2"].shape == (2, *TOP_GRID)

    # the masked prior (tiny.yaml: interior, regions at both grids for each count) on the safetensors shards, with
    # validation and samples; the autoregressive prior on the webdataset stream
    masked, ar = tmp_path / "masked", tmp_path / "ar"
    _train_side_by_side({
        "train_transformer.py": ["--config", "configs/transformer/tiny.yaml", "--run-dir", str(masked),
                                 f"data.tokens={root / 'tokens'}", f"data.val_tokens={root / 'tokens'}",
                                 "data.val_clips=2", "logging.sample_every=2", *TRAIN],
        "train_autoregressive.py": ["--config", "configs/autoregressive/tiny.yaml", "--run-dir", str(ar),
                                    "data.format=webdataset", f"data.shards={root / 'stream'}", *TRAIN]}, tmp_path)
    assert sorted(_losses(masked, "loss")) == [1, 2] and sorted(_losses(masked, "val/nll")) == [2]
    assert (masked / "samples" / "step_00000002.mp4").is_file()
    exported = json.loads((masked / "export" / "config.json").read_text())["config"]
    assert exported["top_grid"] == list(TOP_GRID) and exported["cond_frames"] == [1, 2]
    assert exported["conditioning"] == "interior"
    assert sorted(_losses(ar, "loss")) == [1, 2]

    clip = load_real_clip(real_video_path, num_frames=4, size=24)[0]
    write_image(tmp_path / "first_frame.png", clip[:, 0])
    for prior in (masked, ar):
        models = ["--tokenizer", str(root / "tokenizer"), "--transformer", str(prior / "export")]
        steps = ["--steps", "2"] if prior is masked else []  # the autoregressive prior refuses --steps
        assert generate([*models, "--cond", str(tmp_path / "first_frame.png"), "--out",
                         str(tmp_path / f"{prior.name}.mp4"), *steps]) == 0
        assert generate([*models, "--task", "unconditional", "--out", str(tmp_path / f"{prior.name}_u.mp4"),
                         *steps]) == 0
        for name in (f"{prior.name}.mp4", f"{prior.name}_u.mp4"):
            assert read_video(tmp_path / name).frames.shape == (4, 16, 16, 3), name
        given = "2" if prior is masked else "1"  # the masked prior: its interior regions of 2 given frames
        assert evaluate([*models, "--data", meta["manifest"], "--split", "all", "--max-clips", "1", "--steps", "2",
                         "--cond-frames", given, "--out", str(tmp_path / prior.name), "--no-progress"]) == 0
        report = json.loads((tmp_path / prior.name / "report.json").read_text())
        assert report["tokenizer"]["top_token_grid"] == list(TOP_GRID)
        assert report["frame_prediction"]["num_clips"] == 1
        assert report["frame_prediction"]["num_cond_frames"] == int(given)
        if prior is masked:  # the masked-token NLL of the clips' own codes, both stages, in the interior regions
            assert report["masked_tokens"]["masked_token_nll"] > 0
