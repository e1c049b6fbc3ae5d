"""``python -m magvit.evaluate`` on tiny randomly initialised models and real clips."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from magvit import evaluate, metrics
from magvit.evaluation.evaluators import (FRAME_PREDICTION_ENTRIES, FramePredictionEvaluation, MaskedTokenEvaluation,
                                         frame_scores)
from magvit.evaluation.report import plot_frame_prediction, plot_training_curves
from magvit.runlog import read_metrics


@pytest.fixture(scope="module")
def setup(tmp_path_factory, real_video_paths):
    """Tiny tokenizer + matching transformer (save_pretrained), a manifest of the two real clips, a run dir."""
    from magvit.tokenizer import TokenizerConfig, VideoTokenizer
    from magvit.transformer import MaskedVideoTransformer, TransformerConfig
    from magvit.video_io import probe_video

    root = tmp_path_factory.mktemp("eval")
    torch.manual_seed(0)
    tok_cfg = TokenizerConfig.preset("tiny")  # 8x32x32 clips -> 4x8x8 tokens of a 64-code book
    VideoTokenizer(tok_cfg).save_pretrained(root / "tokenizer")
    grid = tok_cfg.token_grid(tok_cfg.num_frames, tok_cfg.image_size, tok_cfg.image_size)
    xf_cfg = TransformerConfig.preset("tiny", codebook_size=tok_cfg.codebook_size, token_grid=grid)
    MaskedVideoTransformer(xf_cfg).save_pretrained(root / "transformer")
    other = TransformerConfig.preset("tiny", codebook_size=tok_cfg.codebook_size, token_grid=(2, 8, 8))
    MaskedVideoTransformer(other).save_pretrained(root / "transformer_other_grid")
    records = [{"path": p, **probe_video(p), "split": "val", "label": None} for p in real_video_paths]
    (root / "manifest.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    run_dir = root / "run"
    run_dir.mkdir()
    lines = [json.dumps({"step": s, "time": 0.0, "loss": 1.0 / (s + 1), "psnr": 10.0 + s}) for s in range(5)]
    (run_dir / "metrics.jsonl").write_text("\n".join(lines) + "\n{\"step\": 5, \"lo")  # torn last line
    return {"root": root, "tok_cfg": tok_cfg, "grid": grid}


def _args(setup, out: Path, *extra: str) -> list[str]:
    root = setup["root"]
    return ["--tokenizer", str(root / "tokenizer"), "--data", str(root / "manifest.jsonl"), "--out", str(out),
            "--no-progress", *extra]


def test_tokenizer_and_transformer_report(setup, tmp_path, capsys):
    from magvit.data import ClipDataset
    from magvit.conditions import build_condition_video
    from magvit.tokenizer import VideoTokenizer

    root, cfg = setup["root"], setup["tok_cfg"]
    out = tmp_path / "report"
    code = evaluate.main(_args(setup, out, "--transformer", str(root / "transformer"), "--run-dir",
                               str(root / "run"), "--steps", "3"))
    assert code == 0
    report = json.loads((out / "report.json").read_text())
    printed = capsys.readouterr().out
    assert "PSNR" in printed and "FVD skipped" in printed and str(out / "report.json") in printed

    # Reconstruction metrics equal a direct computation on the same clips.
    tokenizer = VideoTokenizer.from_pretrained(root / "tokenizer")
    videos = torch.stack([item["video"] for item in ClipDataset(root / "manifest.jsonl", "val", cfg.num_frames,
                                                                 cfg.image_size)])
    with torch.no_grad():
        codes = tokenizer.encode(videos)
        recon = tokenizer.decode(codes).clamp(-1, 1)
    tok = report["tokenizer"]
    assert tok["num_clips"] == 2
    assert tok["per_clip"]["psnr"] == pytest.approx(metrics.video_psnr(recon, videos).tolist(), abs=1e-4)
    assert tok["ssim"] == pytest.approx(metrics.video_ssim(recon, videos).mean().item(), abs=1e-5)
    usage = metrics.CodebookUsage(cfg.codebook_size)
    usage.update(codes)
    assert tok["codebook_num_tokens"] == 2 * math.prod(setup["grid"]) == usage.num_tokens
    assert tok["codebook_perplexity"] == pytest.approx(usage.perplexity)
    assert tok["codebook_usage"] == pytest.approx(usage.usage)
    # 64 codes = 6 bits per token, 4*8*8 tokens per 8*32*32 pixels.
    assert tok["bits_per_pixel"] == pytest.approx(6 * 256 / 8192)
    assert 0 < tok["bits_per_pixel_entropy_coded"] <= tok["bits_per_pixel"] + 1e-12

    # Frame prediction: the copy baseline equals repeating frame 0, scored on frames 1..T-1.
    fp = report["frame_prediction"]
    baseline = build_condition_video(videos, "frame_prediction", num_cond_frames=1)
    expected = metrics.video_psnr(baseline[:, :, 1:], videos[:, :, 1:])
    assert fp["copy_baseline"]["per_clip"]["psnr"] == pytest.approx(expected.tolist(), abs=1e-4)
    expected_recon = metrics.video_psnr(recon[:, :, 1:], videos[:, :, 1:])
    assert fp["reconstruction"]["per_clip"]["psnr"] == pytest.approx(expected_recon.tolist(), abs=1e-4)
    assert len(fp["generated"]["per_clip"]["psnr"]) == 2 and fp["steps"] == 3
    # Every entry has the three metrics, per clip and per predicted frame (frames 1..7 of 8).
    assert fp["predicted_frames"] == list(range(1, cfg.num_frames))
    for name in FRAME_PREDICTION_ENTRIES:
        for metric in ("psnr", "ssim", "mse_per_frame"):
            assert metric in fp[name] and len(fp[name]["per_clip"][metric]) == 2
            assert len(fp[name]["per_frame"][metric]) == cfg.num_frames - 1
    gray = lambda v: (v.mean(1) + 1) / 2  # (B, T, H, W) in [0, 1]
    expected_mse = (gray(baseline[:, :, 1:]) - gray(videos[:, :, 1:])).pow(2).sum((2, 3)).mean(1)
    assert fp["copy_baseline"]["per_clip"]["mse_per_frame"] == pytest.approx(expected_mse.tolist(), rel=1e-5)
    # The generated codes against the clips' own on the predicted latent slots: latent frames 1-3 (frame 0 given,
    # latent frame 0 holds frames 0-1).
    agreement, future = fp["generated_codes"], codes[:, 1:].flatten()
    assert agreement["slots"] == future.numel() == 2 * 3 * 64 and 0.0 <= agreement["accuracy"] <= 1.0
    assert agreement["distinct_real"] == len(future.unique())
    assert agreement["its_share_of_real"] == pytest.approx(future.bincount().max().item() / future.numel())
    assert "generated codes on the 384 predicted latent slots" in printed
    assert report["warnings"] == []

    # Masked tokens, tokenized on the fly: a random 64-way model is near log(64) nats.
    mt = report["masked_tokens"]
    assert set(mt["per_task"]) == {"frame_prediction", "unconditional"}
    assert abs(mt["masked_token_nll"] - math.log(64)) < 1.0
    assert 0.0 <= mt["masked_token_accuracy"] <= 1.0 and mt["masked_tokens"] > 0

    assert "skipped" in report["fvd"]
    for name in ("curves", "per_clip", "frame_prediction", "samples"):
        path = Path(report["plots"][name])
        assert path.is_file() and path.read_bytes()[:4] == b"\x89PNG"


def _write_token_shards(directory: Path, grid, codebook_size: int, n: int = 6) -> torch.Tensor:
    from safetensors.torch import save_file

    directory.mkdir()
    g = torch.Generator().manual_seed(1)
    codes = torch.randint(0, codebook_size, (n, *grid), generator=g)
    cond = torch.randint(0, codebook_size, (n, *grid), generator=g)
    save_file({"codes": codes, "cond.frame_prediction": cond, "labels": torch.full((n,), -1)},
              str(directory / "shard-00000.safetensors"))
    meta = {"token_grid": list(grid), "codebook_size": codebook_size, "classes": [],
            "condition_tasks": ["frame_prediction"], "num_examples": n,
            "shards": [{"file": "shard-00000.safetensors", "num_examples": n}]}
    (directory / "meta.json").write_text(json.dumps(meta))
    return codes


def test_masked_token_nll_on_shards_is_deterministic(setup, tmp_path):
    root = setup["root"]
    shards = tmp_path / "tokens"
    _write_token_shards(shards, setup["grid"], setup["tok_cfg"].codebook_size)
    reports = []
    for i in range(2):
        out = tmp_path / f"out{i}"
        assert evaluate.main(["--transformer", str(root / "transformer"), "--data", str(shards), "--out", str(out),
                              "--no-progress", "--nll-tasks", "frame_prediction,unconditional,interpolation,class"]) == 0
        reports.append(json.loads((out / "report.json").read_text()))
    mt = reports[0]["masked_tokens"]
    assert mt == reports[1]["masked_tokens"]  # fixed seed: same masks, same numbers
    # No interpolation condition in the data, no labelled example for "class".
    assert set(mt["per_task"]) == {"frame_prediction", "unconditional"}
    # The overall NLL is the token-weighted mean of the per-task NLLs.
    tasks = mt["per_task"].values()
    weighted = sum(t["nll"] * t["masked_tokens"] for t in tasks) / sum(t["masked_tokens"] for t in tasks)
    assert mt["masked_token_nll"] == pytest.approx(weighted)
    assert "tokenizer" not in reports[0]


def test_masked_token_evaluation_known_values():
    """With a fake transformer whose logits put all mass on the right code, NLL -> 0 and accuracy = 1."""
    from magvit.sequence import TokenVocabulary

    vocab = TokenVocabulary(8)

    class Oracle(torch.nn.Module):
        def __init__(self, codes):
            super().__init__()
            self.codes = codes
            self.anchor = torch.nn.Parameter(torch.zeros(()))
            self.config = type("C", (), {"vocab": vocab, "codebook_size": 8, "num_classes": 0,
                                         "conditioning": "prefix"})()  # what sequence.PriorConfig asks of it

        def forward(self, ids):
            logits = torch.full((*ids.shape, vocab.size), -50.0)
            video = slice(2 + 4, 2 + 8)
            logits[:, video].scatter_(-1, self.codes.reshape(ids.shape[0], 4, 1), 50.0)
            return logits

    codes = torch.tensor([[[[1, 2], [3, 4]]], [[[5, 6], [7, 0]]]])
    ev = MaskedTokenEvaluation(Oracle(codes), ["unconditional"], seed=0)
    ev.update({"codes": codes, "label": torch.tensor([-1, -1])})
    summary = ev.summary()
    assert summary["masked_token_accuracy"] == 1.0
    assert summary["masked_token_nll"] == pytest.approx(0.0, abs=1e-6)


@pytest.mark.parametrize("two_grid_masking", ["joint", "stages"])
def test_masked_token_evaluation_masks_as_the_prior_was_trained(two_grid_masking):
    """Two code grids: the held-out sequences are the recorded training masking's (``training_masking``), with no
    condition dropout and only the masked tokens weighed; a prior without the record gets the trainer's default."""
    from magvit.masking import MaskingConfig, make_training_batch
    from magvit.sequence import TokenVocabulary

    vocab, seen = TokenVocabulary(8, tasks=("unconditional",)), []

    class Recorder(torch.nn.Module):
        def __init__(self, record):
            super().__init__()
            self.anchor = torch.nn.Parameter(torch.zeros(()))
            self.training_masking = record
            self.config = type("C", (), {"vocab": vocab, "codebook_size": 8, "num_classes": 0,
                                         "conditioning": "prefix"})()

        def forward(self, ids):
            seen.append(ids.clone())
            return torch.zeros(*ids.shape, vocab.size)

    g = torch.Generator().manual_seed(0)
    batch = {"codes": torch.randint(0, 8, (16, 2, 4, 4), generator=g),
             "top.codes": torch.randint(0, 8, (16, 2, 2, 2), generator=g), "label": torch.full((16,), -1)}
    trained = MaskingConfig(two_grid_masking=two_grid_masking)
    for record in (trained.to_dict(), None if two_grid_masking == "joint" else trained.to_dict()):
        MaskedTokenEvaluation(Recorder(record), ["unconditional"], seed=3).update(batch)
    scoring = trained.replace(tasks=["unconditional"], cond_dropout_prob=0.0, unmasked_weight=0.0)
    expected = make_training_batch(batch, vocab, scoring, generator=torch.Generator().manual_seed(3)).input_ids
    assert torch.equal(seen[0], expected) and torch.equal(seen[1], expected)
    other = make_training_batch(batch, vocab, scoring.replace(two_grid_masking={"joint": "stages", "stages": "joint"}[
        two_grid_masking]), generator=torch.Generator().manual_seed(3)).input_ids
    assert not torch.equal(other, expected)


def test_fvd_with_scripted_extractor(setup, tmp_path):
    class Features(torch.nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return torch.cat([x.mean(dim=(2, 3, 4)), x.std(dim=(2, 3, 4))], dim=1)  # (B, 6)

    path = tmp_path / "features.pt"
    torch.jit.script(Features()).save(str(path))
    out = tmp_path / "out"
    assert evaluate.main(_args(setup, out, "--i3d", str(path), "--num-samples", "0")) == 0
    report = json.loads((out / "report.json").read_text())
    fvd = report["fvd"]
    assert fvd["num_clips"] == 2 and math.isfinite(fvd["reconstruction"]) and fvd["reconstruction"] > 0
    assert "samples" not in report["plots"]


@pytest.mark.parametrize("case, message", [
    ("no_tokenizer_dir", "--tokenizer: no such folder"),
    ("mismatch", "do not belong together"),
    ("no_data", "give --data"),
    ("bad_manifest_split", "no usable 'train' clip"),
    ("missing_i3d", "--i3d: no such file"),
    ("bad_run_dir", "no metrics.jsonl"),
    ("bad_flag", "unrecognized arguments"),
    ("nan_temperature", "--temperature must be a finite number"),
    ("negative_choice", "--choice-temperature must be in [0, "),
    ("record_without_transformer", "--record-decoding writes into the masked transformer export"),
])
def test_user_errors_are_one_line_exit_2(setup, tmp_path, capsys, case, message):
    root = setup["root"]
    args = {
        "no_tokenizer_dir": ["--tokenizer", str(tmp_path / "nope"), "--data", str(root / "manifest.jsonl")],
        "mismatch": ["--tokenizer", str(root / "tokenizer"), "--transformer", str(root / "transformer_other_grid"),
                     "--data", str(root / "manifest.jsonl")],
        "no_data": ["--tokenizer", str(root / "tokenizer")],
        "bad_manifest_split": _args(setup, tmp_path / "o", "--split", "train"),
        "missing_i3d": _args(setup, tmp_path / "o", "--i3d", str(tmp_path / "i3d.pt")),
        "bad_run_dir": _args(setup, tmp_path / "o", "--run-dir", str(tmp_path)),
        "bad_flag": ["--tokenizer", str(root / "tokenizer"), "--frobnicate"],
        "nan_temperature": _args(setup, tmp_path / "o", "--temperature", "nan"),
        "negative_choice": _args(setup, tmp_path / "o", "--choice-temperature", "-1"),
        "record_without_transformer": _args(setup, tmp_path / "o", "--record-decoding"),
    }[case]
    with pytest.raises(SystemExit) if case == "bad_flag" else _nullcontext() as exit_info:
        code = evaluate.main(args)
    if case == "bad_flag":
        code = exit_info.value.code
    err = capsys.readouterr().err.strip()
    assert code == 2
    assert message in err and "\n" not in err and "Traceback" not in err


def test_recorded_decoding_is_what_later_evaluations_use(setup, tmp_path, capsys):
    """``--record-decoding`` writes the settings it evaluated into the export; later runs decode so by default."""
    import shutil

    from magvit.transformer import MaskedVideoTransformer

    export = tmp_path / "transformer"
    shutil.copytree(setup["root"] / "transformer", export)
    common = ["--transformer", str(export), "--cond-frames", "2", "--nll-tasks", "frame_prediction", "--max-clips", "1"]
    chosen = _args(setup, tmp_path / "a", *common, "--steps", "2", "--temperature", "0", "--record-decoding")
    assert evaluate.main(chosen) == 0
    expected = {"steps": 2, "temperature": 0.0, "choice_temperature": 4.5, "guidance_scale": 0.0}
    assert json.loads((export / "config.json").read_text())["decoding"] == expected
    assert MaskedVideoTransformer.from_pretrained(export).decoding == expected  # a record of the export
    assert evaluate.main(_args(setup, tmp_path / "b", *common)) == 0
    later = json.loads((tmp_path / "b" / "report.json").read_text())["frame_prediction"]
    assert (later["steps"], later["temperature"], later["choice_temperature"]) == (2, 0.0, 4.5)
    assert evaluate.main(_args(setup, tmp_path / "c", *common, "--temperature", "0.5")) == 0  # a flag wins
    assert json.loads((tmp_path / "c" / "report.json").read_text())["frame_prediction"]["temperature"] == 0.5
    # the same scores as the run that chose them: recording changed nothing but the defaults
    first = json.loads((tmp_path / "a" / "report.json").read_text())["frame_prediction"]["generated"]
    assert later["generated"]["psnr"] == first["psnr"]
    capsys.readouterr()


class _nullcontext:
    def __enter__(self):
        return None

    def __exit__(self, *exc):
        return False


def test_training_curves_skip_torn_lines_and_text(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (run / "metrics.jsonl").write_text(
        json.dumps({"step": 1, "loss": 2.0, "event": "nonfinite_loss"}) + "\n"
        + json.dumps({"step": 2, "loss": 1.0}) + "\n{\"step\": 3,"
    )
    assert [r["step"] for r in read_metrics(run / "metrics.jsonl")] == [1, 2]
    path = plot_training_curves([run], tmp_path / "curves.png")
    assert path is not None and path.stat().st_size > 0
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "metrics.jsonl").write_text("")
    assert plot_training_curves([empty], tmp_path / "none.png") is None


def test_folder_of_videos_is_indexed(setup, real_video_paths, tmp_path, capsys):
    import shutil

    videos = tmp_path / "videos"
    videos.mkdir()
    shutil.copy(real_video_paths[1], videos / "carphone.mp4")  # real footage, 176x144
    out = tmp_path / "out"
    assert evaluate.main(["--tokenizer", str(setup["root"] / "tokenizer"), "--data", str(videos), "--out", str(out),
                          "--no-progress", "--num-samples", "1"]) == 0
    report = json.loads((out / "report.json").read_text())
    assert report["tokenizer"]["num_clips"] == 1 and (out / "clips_manifest.jsonl").is_file()
    empty = tmp_path / "empty"
    empty.mkdir()
    assert evaluate.main(["--tokenizer", str(setup["root"] / "tokenizer"), "--data", str(empty), "--out",
                          str(tmp_path / "o2"), "--no-progress"]) == 2
    assert "no readable video" in capsys.readouterr().err


def test_frame_scores_known_values():
    """PSNR / SSIM on RGB; MSE per frame = sum over a gray frame in [0, 1] of the squared error."""
    black = torch.full((1, 3, 2, 16, 16), -1.0)
    exact = frame_scores(black, black)
    assert torch.isinf(exact["psnr"]).all() and torch.allclose(exact["ssim"], torch.ones(1, 2, dtype=torch.float64))
    assert (exact["mse_per_frame"] == 0).all()
    assert frame_scores(torch.ones_like(black), black)["mse_per_frame"].tolist() == [[256.0, 256.0]]
    red = black.clone()
    red[:, 0] = 1.0  # one channel of three off by the whole range: gray off by 1/3
    assert frame_scores(red, black)["mse_per_frame"] == pytest.approx(torch.full((1, 2), 256 / 9))
    assert frame_scores(red, black)["psnr"] == pytest.approx(torch.full((1, 2), 10 * math.log10(3)))


def _frame_prediction(setup, video: torch.Tensor, num_cond_frames: int) -> dict:
    from magvit.tokenizer import VideoTokenizer
    from magvit.transformer import MaskedVideoTransformer

    tokenizer = VideoTokenizer.from_pretrained(setup["root"] / "tokenizer")
    transformer = MaskedVideoTransformer.from_pretrained(setup["root"] / "transformer")
    evaluation = FramePredictionEvaluation(tokenizer, transformer, num_cond_frames=num_cond_frames, steps=2)
    evaluation.update(video, video)  # a perfect reconstruction
    return evaluation.summary(), tokenizer


def test_code_agreement_known_values():
    """Accuracy and the most common code's shares, counted on the predicted slots only."""
    from magvit.evaluation.evaluators import CodeAgreement

    real = torch.tensor([[[[7, 7], [7, 1]], [[2, 7], [3, 7]]]])  # (1, t=2, 2, 2); slot (0, 0, 0) is given
    generated = torch.tensor([[[[9, 7], [7, 7]], [[7, 7], [7, 7]]]])  # the mode everywhere
    predicted = torch.ones(2, 2, 2, dtype=torch.bool)
    predicted[0, 0, 0] = False
    agreement = CodeAgreement(16)
    assert agreement.summary() == {}
    agreement.update(generated, real, predicted)
    agreement.update(generated, real, predicted)  # counts add up over batches
    assert agreement.summary() == {"slots": 14, "accuracy": 8 / 14, "most_common_real_code": 7,
                                   "its_share_of_real": 8 / 14, "its_share_of_generated": 1.0,
                                   "generated_most_common_share": 1.0, "distinct_real": 4, "distinct_generated": 1}


def test_frame_prediction_baselines_known_values(setup):
    cfg = setup["tok_cfg"]
    shape = (1, 3, cfg.num_frames, cfg.image_size, cfg.image_size)
    pixels = cfg.image_size**2
    black, _ = _frame_prediction(setup, torch.full(shape, -1.0), 1)
    for name in ("black_baseline", "copy_baseline", "mean_baseline", "reconstruction"):  # all exact on black
        assert black[name]["psnr"] == math.inf and black[name]["ssim"] == pytest.approx(1.0)
        assert black[name]["mse_per_frame"] == 0.0 and black[name]["per_frame"]["psnr"] == [math.inf] * 7

    # Frames in [0, 1]: 0 (black), 0.75, then 1 (white); 2 given frames, 6 predicted.
    video = torch.ones(shape)
    video[:, :, 0], video[:, :, 1] = -1.0, 0.5
    fp, tokenizer = _frame_prediction(setup, video, 2)
    assert fp["predicted_frames"] == list(range(2, cfg.num_frames))
    assert fp["copy_baseline"]["mse_per_frame"] == pytest.approx(0.25**2 * pixels)  # copies 0.75
    assert fp["black_baseline"]["mse_per_frame"] == pytest.approx(1.0 * pixels)
    assert fp["mean_baseline"]["mse_per_frame"] == pytest.approx(0.625**2 * pixels)  # the mean given frame, 0.375
    assert fp["mean_baseline"]["per_frame"]["mse_per_frame"] == pytest.approx([0.625**2 * pixels] * 6)
    assert fp["black_baseline"]["psnr"] == pytest.approx(0.0)
    with torch.no_grad():  # the copied video through the tokenizer, scored on the predicted frames
        copy = video[:, :, [0, 1, 1, 1, 1, 1, 1, 1]]
        through = tokenizer.decode(tokenizer.encode(copy)).clamp(-1, 1)
    expected = metrics.video_psnr(through[:, :, 2:], video[:, :, 2:])
    assert fp["copy_through_tokenizer"]["psnr"] == pytest.approx(float(expected), abs=1e-4)

    path = plot_frame_prediction({"frame_prediction": fp}, Path(setup["root"]) / "frame_prediction.png")
    assert path.read_bytes()[:4] == b"\x89PNG"
    assert plot_frame_prediction({}, Path(setup["root"]) / "none.png") is None


def _warnings(capsys) -> list[str]:
    lines = capsys.readouterr().err.splitlines()
    return [line for line in lines if line.startswith(f"{evaluate.PROG}: warning:")]


def test_warns_when_the_token_shards_hold_the_evaluated_clips(setup, tmp_path, capsys):
    from magvit.prep import tokenize

    root = setup["root"]
    shards = tmp_path / "tokens"
    assert tokenize.main(["--tokenizer", str(root / "tokenizer"), "--manifest", str(root / "manifest.jsonl"),
                          "--out", str(shards), "--split", "val", "--workers", "0", "--no-conditions", "--sketch", "none"]) == 0
    assert len(json.loads((shards / "meta.json").read_text())["videos"]) == 2
    capsys.readouterr()
    out = tmp_path / "out"
    assert evaluate.main(_args(setup, out, "--transformer", str(root / "transformer"), "--tokens", str(shards),
                               "--steps", "2", "--nll-tasks", "unconditional", "--max-clips", "1")) == 0
    report = json.loads((out / "report.json").read_text())
    printed = _warnings(capsys)
    assert len(printed) == 1 and "hold 1 of the 1 evaluated clips" in printed[0]
    assert report["warnings"] == [printed[0].split("warning: ", 1)[1]]

    # Shards of other videos: no warning; older shards without `videos`: their manifest and split tell.
    meta = json.loads((shards / "meta.json").read_text())
    (shards / "meta.json").write_text(json.dumps({**meta, "videos": [str(tmp_path / "other.mp4")]}))
    assert evaluate.main(_args(setup, tmp_path / "o2", "--transformer", str(root / "transformer"), "--tokens",
                               str(shards), "--steps", "2", "--nll-tasks", "unconditional", "--max-clips", "1")) == 0
    assert _warnings(capsys) == []
    del meta["videos"]
    (shards / "meta.json").write_text(json.dumps({**meta, "split": "all"}))
    assert evaluate.main(_args(setup, tmp_path / "o3", "--transformer", str(root / "transformer"), "--tokens",
                               str(shards), "--steps", "2", "--nll-tasks", "unconditional", "--max-clips", "1")) == 0
    printed = _warnings(capsys)
    assert len(printed) == 2 and "hold 1 of the 1 evaluated clips" in printed[0] and "'all' split" in printed[1]

    # The shards alone, tokenized from a training split: their NLL is not held-out.
    (shards / "meta.json").write_text(json.dumps({**meta, "split": "train"}))
    assert evaluate.main(["--transformer", str(root / "transformer"), "--data", str(shards), "--out",
                          str(tmp_path / "o4"), "--no-progress", "--nll-tasks", "unconditional"]) == 0
    printed = _warnings(capsys)
    assert len(printed) == 1 and "'train' split" in printed[0]


# --- interior (COMMIT) conditioning ------------------------------------------------------------------------------


def test_interior_masked_token_evaluation_shows_the_condition_in_its_region():
    """The sequences an interior model is scored on, rebuilt by hand: a masked slot shows the condition code inside
    the frame-prediction region and the mask token outside; only masked slots are scored (a uniform model there, a
    wrong confident one at the visible slots: the NLL is exactly log K)."""
    from magvit.sequence import TokenVocabulary
    from magvit.conditions import latent_condition_regions

    vocab, grid = TokenVocabulary(8, tasks=("frame_prediction", "unconditional")), (2, 2, 2)
    regions = latent_condition_regions(vocab.tasks, grid, (4, 4, 4), causal=False)  # latent frame 0
    seen = []

    class Recorder(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.anchor = torch.nn.Parameter(torch.zeros(()))
            self.config = type("C", (), {"vocab": vocab, "codebook_size": 8, "num_classes": 0,
                                         "conditioning": "interior"})()

        def forward(self, ids):
            seen.append(ids.clone())
            logits = torch.zeros(*ids.shape, vocab.size)
            visible = ids < 4  # true codes are 0..3, condition codes 4..7, then the special tokens
            logits[visible] = 50.0 * torch.nn.functional.one_hot((ids[visible] + 1) % 4, vocab.size).float()
            return logits

    g = torch.Generator().manual_seed(0)
    codes, cond = torch.randint(0, 4, (6, *grid), generator=g), torch.randint(4, 8, (6, *grid), generator=g)
    with pytest.raises(ValueError, match="condition regions"):
        MaskedTokenEvaluation(Recorder(), ["frame_prediction"])
    ev = MaskedTokenEvaluation(Recorder(), ["frame_prediction"], seed=0, condition_regions=regions)
    ev.update({"codes": codes, "cond.frame_prediction": cond, "label": torch.full((6,), -1)})
    (ids,) = seen
    video, truth, shown = ids[:, 2:], codes.reshape(6, 8), cond.reshape(6, 8)
    assert ids.shape == (6, 2 + 8)  # no prefix
    masked = video != truth
    region = regions["frame_prediction"].reshape(1, 8).expand(6, 8)
    assert bool((masked & region).any()) and bool((masked & ~region).any())
    assert torch.equal(video[masked & region], shown[masked & region])
    assert bool((video[masked & ~region] == vocab.mask_token).all())
    summary = ev.summary()
    assert summary["masked_tokens"] == int(masked.sum())
    assert summary["masked_token_nll"] == pytest.approx(math.log(8), abs=1e-5)


def test_evaluate_an_interior_export_end_to_end(setup, tmp_path, capsys):
    """An interior export (recording 1-frame training shards) evaluated given 3 frames, on the clips and on token
    shards: frame-prediction entries and masked tokens in report.json, one warning about the untrained count."""
    from magvit.transformer import MaskedVideoTransformer, TransformerConfig

    root, cfg = setup["root"], setup["tok_cfg"]
    config = TransformerConfig.preset("tiny", codebook_size=cfg.codebook_size, token_grid=setup["grid"],
                                      conditioning="interior", tasks=["frame_prediction", "unconditional"],
                                      cond_frames=[1])
    MaskedVideoTransformer(config).save_pretrained(tmp_path / "interior")
    out = tmp_path / "report"
    assert evaluate.main(_args(setup, out, "--transformer", str(tmp_path / "interior"), "--steps", "2",
                               "--cond-frames", "3")) == 0
    report = json.loads((out / "report.json").read_text())
    fp = report["frame_prediction"]
    assert fp["num_cond_frames"] == 3 and fp["predicted_frames"] == list(range(3, cfg.num_frames))
    assert all(len(fp[name]["per_clip"]["psnr"]) == 2 for name in FRAME_PREDICTION_ENTRIES)
    assert set(report["masked_tokens"]["per_task"]) == {"frame_prediction", "unconditional"}
    err = capsys.readouterr().err
    assert err.count("trained on frame prediction given 1 frame(s), not 3") == 1
    shards = tmp_path / "tokens"
    _write_token_shards(shards, setup["grid"], cfg.codebook_size)
    meta = json.loads((shards / "meta.json").read_text())
    (shards / "meta.json").write_text(json.dumps({**meta, "num_frames": cfg.num_frames, "image_size": cfg.image_size,
                                                  "tokenizer": {"causal": False}}))
    assert evaluate.main(["--transformer", str(tmp_path / "interior"), "--data", str(shards), "--out",
                          str(tmp_path / "shards"), "--no-progress"]) == 0
    mt = json.loads((tmp_path / "shards" / "report.json").read_text())["masked_tokens"]
    assert set(mt["per_task"]) == {"frame_prediction", "unconditional"} and mt["masked_tokens"] > 0


# --- batched generation ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("conditioning", ["prefix", "interior"])
def test_batched_generation_agrees_with_one_clip_at_a_time(setup, conditioning):
    """A batch of clips decoded together, each from its own condition codes (what evaluate's frame prediction does):
    with argmax sampling and no choice noise the codes equal those decoded one clip at a time, and every sequence the
    model sees shows its own clip's condition codes (prefix: in its prefix slots; interior: in the masked slots of
    the condition region) and, once revealed, its final codes: nothing fixed is ever altered, no row mixed up."""
    from magvit.conditions import two_grid_condition_region
    from magvit.pipeline import generate_codes
    from magvit.transformer import MaskedVideoTransformer, TransformerConfig

    cfg, grid = setup["tok_cfg"], setup["grid"]
    torch.manual_seed(0)
    config = TransformerConfig.preset("tiny", codebook_size=cfg.codebook_size, token_grid=grid,
                                      conditioning=conditioning, tasks=["frame_prediction", "unconditional"])
    model = MaskedVideoTransformer(config).eval()
    seen = []
    forward = model.forward
    model.forward = lambda ids: (seen.append(ids.clone()), forward(ids))[1]
    cond = torch.randint(0, cfg.codebook_size, (3, *grid), generator=torch.Generator().manual_seed(1))
    region = two_grid_condition_region("frame_prediction", grid, None, (cfg.num_frames, cfg.image_size,
                                                                        cfg.image_size), cfg.causal, 3)
    options = {"steps": 4, "temperature": 0.0, "choice_temperature": 0.0,
               "condition_region": region if conditioning == "interior" else None}
    batched = generate_codes(model, "frame_prediction", cond, num_samples=3, seed=0, **options)
    shown = torch.stack(seen)  # (steps, 3, L)
    one_at_a_time = torch.cat([generate_codes(model, "frame_prediction", cond[i : i + 1], seed=7 + i, **options)
                               for i in range(3)])
    assert torch.equal(batched, one_at_a_time) and bool((batched >= 0).all())

    layout, mask = config.layout, config.vocab.mask_token
    final, given = batched.reshape(1, 3, -1), cond.reshape(1, 3, -1)
    video = shown[:, :, layout.video]  # (steps, 3, N)
    if conditioning == "prefix":
        assert torch.equal(shown[:, :, layout.prefix], given.expand(shown.shape[0], -1, -1))
        still_masked = torch.full_like(video, mask)
    else:  # inside the region a masked slot shows the clip's condition code, outside the mask token
        still_masked = torch.where(region.reshape(1, 1, -1), given, torch.full_like(given, mask)).expand_as(video)
        assert torch.equal(video[0], still_masked[0])  # the first step: all masked
    assert bool(((video == still_masked) | (video == final)).all())


def test_frame_prediction_batch_size(setup, tmp_path):
    """--batch-size changes how many clips are generated at once, not what the entries that do not sample measure
    (baselines, the reconstruction, the copy through the tokenizer: equal per clip for batch sizes 1 and 2); the
    generated entry is fixed by the seed and the batch size. The condition is the pipeline's."""
    from magvit.data import ClipDataset
    from magvit.conditions import build_condition_video
    from magvit.pipeline import condition_video

    root, cfg = setup["root"], setup["tok_cfg"]
    reports = {}
    for run, batch_size in (("one", "1"), ("two", "2"), ("again", "2")):
        out = tmp_path / run
        assert evaluate.main(_args(setup, out, "--transformer", str(root / "transformer"), "--steps", "2",
                                   "--batch-size", batch_size, "--cond-frames", "2",
                                   "--nll-tasks", "unconditional")) == 0
        reports[run] = json.loads((out / "report.json").read_text())
    fp = {run: report["frame_prediction"] for run, report in reports.items()}
    assert fp["two"]["generated"] == fp["again"]["generated"]
    for name in FRAME_PREDICTION_ENTRIES:
        for metric in ("psnr", "ssim", "mse_per_frame"):
            assert len(fp["one"][name]["per_clip"][metric]) == 2
            if name != "generated":
                assert fp["one"][name]["per_clip"][metric] == pytest.approx(fp["two"][name]["per_clip"][metric],
                                                                            rel=1e-5, abs=1e-4)
    assert reports["one"]["tokenizer"]["per_clip"]["psnr"] == pytest.approx(
        reports["two"]["tokenizer"]["per_clip"]["psnr"], abs=1e-4)
    clips = torch.stack([item["video"] for item in ClipDataset(root / "manifest.jsonl", "val", cfg.num_frames,
                                                                cfg.image_size)])
    for clip in clips:  # the batch's condition video is the one pipeline.condition_video builds for one clip
        assert torch.equal(build_condition_video(clip[None], "frame_prediction", num_cond_frames=2)[0],
                           condition_video("frame_prediction", clip, cfg.num_frames, num_cond_frames=2))


def test_autoregressive_frame_prediction_in_one_batch_equals_one_clip_at_a_time():
    """The autoregressive prior through the batched frame prediction: greedy (temperature 0), a batch of 3 clips
    scores each clip as 3 batches of one do."""
    from magvit.autoregressive import AutoregressiveConfig, AutoregressiveTransformer
    from magvit.tokenizer import TokenizerConfig, VideoTokenizer

    torch.manual_seed(0)
    cfg = TokenizerConfig.preset("tiny", num_frames=4, image_size=16)  # 2x4x4 codes: 32 decoding steps
    tokenizer = VideoTokenizer(cfg).eval()
    grid = cfg.token_grid(cfg.num_frames, cfg.image_size, cfg.image_size)
    prior = AutoregressiveTransformer(AutoregressiveConfig.preset("tiny", codebook_size=cfg.codebook_size,
                                                                  token_grid=grid)).eval()
    video = torch.rand(3, 3, cfg.num_frames, cfg.image_size, cfg.image_size, generator=torch.Generator().manual_seed(2))
    video = video * 2 - 1
    batched, one_by_one = (FramePredictionEvaluation(tokenizer, prior, num_cond_frames=2, temperature=0.0,
                                                     num_samples=3) for _ in range(2))
    batched.update(video, video)
    for clip in video.split(1):
        one_by_one.update(clip, clip)
    for a, b in zip(batched.samples, one_by_one.samples):
        assert torch.allclose(a, b, atol=1e-5)
    for name in FRAME_PREDICTION_ENTRIES:
        for metric in ("psnr", "ssim", "mse_per_frame"):
            for a, b in zip(batched.scores[name][metric], one_by_one.scores[name][metric]):  # per clip
                assert a == pytest.approx(b, rel=1e-5, abs=1e-4)


def test_reuse_freed_memory_is_taken_by_glibc():
    import os

    try:
        glibc = bool(os.confstr("CS_GNU_LIBC_VERSION"))
    except (AttributeError, ValueError, OSError):
        glibc = False
    assert evaluate.reuse_freed_memory() is glibc
