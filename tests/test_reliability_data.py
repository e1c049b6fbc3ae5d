"""Hostile and damaged data: symbolic-link cycles, long damaged files, files that changed after indexing, sketch
folders beside the clips, malformed manifests and token shards. Each is detected, counted and reported."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from magvit.video_io import probe_video, read_video, write_video

REPO = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}


@pytest.fixture(scope="module")
def frames(real_video_paths) -> torch.Tensor:
    """(40, 72, 88, 3) uint8 frames of real footage (carphone, downscaled)."""
    return read_video(real_video_paths[1], indices=range(40)).frames[:, ::2, ::2]


def _index(*args: str, timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "data_prep.index", *args, "--workers", "1"], capture_output=True,
                          text=True, timeout=timeout, env=ENV, cwd=REPO)


def _rejects(manifest: Path) -> dict[str, str]:
    path = manifest.with_name(f"{manifest.stem}.rejects.jsonl")
    return {Path(r["path"]).name: r["reason"] for r in map(json.loads, path.read_text().splitlines())}


# --- symbolic links ------------------------------------------------------------------------------------------------
def test_index_survives_link_cycles_and_loops(tmp_path, frames):
    """Two links to the parent folder (an exponential walk before), a loop between two links and a dangling link:
    the walk ends within the timeout, the real video is indexed once, every bad link is a reject with a reason."""
    data = tmp_path / "data"
    write_video(data / "cat" / "real.mp4", frames[:12], fps=10)
    os.symlink("..", data / "cat" / "up1")
    os.symlink("..", data / "cat" / "up2")
    os.symlink("b.mp4", data / "cat" / "a.mp4")
    os.symlink("a.mp4", data / "cat" / "b.mp4")
    os.symlink("gone.mp4", data / "cat" / "dangling.mp4")
    out = tmp_path / "manifest.jsonl"
    result = _index(str(data), "--out", str(out), "--val-fraction", "0")  # TimeoutExpired = the old hang
    assert result.returncode == 0, result.stderr
    assert "Traceback" not in result.stderr
    records = [json.loads(line) for line in out.read_text().splitlines()]
    assert [(Path(r["path"]).name, r["label"], r["frames"]) for r in records] == [("real.mp4", "cat", 12)]
    rejects = _rejects(out)
    assert "a cycle" in rejects["up1"] and "a cycle" in rejects["up2"]
    assert "symbolic link loop" in rejects["a.mp4"] and "symbolic link loop" in rejects["b.mp4"]
    assert "broken symbolic link" in rejects["dangling.mp4"]


def test_index_follows_links_to_other_folders_once(tmp_path, frames):
    """A link to a folder outside the input is followed; a second link to the same folder adds nothing."""
    outside = tmp_path / "elsewhere" / "dog"
    write_video(outside / "d.mp4", frames[:10], fps=10)
    data = tmp_path / "data"
    data.mkdir()
    os.symlink(outside, data / "dog")
    os.symlink(outside, data / "dog_again")
    from magvit.prep.index import build_manifest

    summary = build_manifest([data], tmp_path / "m.jsonl", val_fraction=0.0, workers=1, show_progress=False)
    assert summary["videos"] == 1 and summary["rejected"] == []


# --- bounded memory ------------------------------------------------------------------------------------------------
_PROBE = """
import resource, sys
from magvit.video_io import probe_video
info = probe_video(sys.argv[1], check=sys.argv[2], backend="pyav")
print(info["frames"], resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)  # KiB on Linux
"""


def test_probing_a_long_damaged_file_keeps_one_frame_in_memory(tmp_path):
    """The exact frame count of a damaged file (the PyAV path, taken when decord cannot open a file) is found by
    decoding frame by frame: peak RSS does not grow with the 138 MB the decoded frames would take."""
    import av

    n, h, w = 600, 240, 320  # 600 * 230 KB = 138 MB of decoded frames
    path = tmp_path / "long.mkv"
    noise = np.random.default_rng(0).integers(0, 256, (h, w, 3), dtype=np.uint8)
    with av.open(str(path), "w") as container:
        stream = container.add_stream("libx264", rate=25)
        stream.width, stream.height, stream.pix_fmt = w, h, "yuv420p"
        stream.options = {"preset": "ultrafast", "crf": "40"}
        for i in range(n):
            for packet in stream.encode(av.VideoFrame.from_ndarray(np.roll(noise, i, axis=1), format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    damaged = tmp_path / "damaged.mkv"
    damaged.write_bytes(path.read_bytes()[: int(path.stat().st_size * 0.8)])  # the tail is gone

    def peak(check: str) -> tuple[int, float]:
        out = subprocess.run([sys.executable, "-c", _PROBE, str(damaged), check], capture_output=True, text=True,
                             env=ENV, check=True, timeout=120).stdout.split()
        return int(out[0]), int(out[1]) / 1024  # frames, MiB

    frames_none, baseline = peak("none")  # headers only: the interpreter, torch, PyAV
    frames_ends, full = peak("ends")  # every frame decoded
    assert 0 < frames_ends < n and frames_none >= frames_ends  # damaged: fewer decodable frames than packets
    assert full - baseline < 40, f"probing took {full - baseline:.0f} MiB more than reading the headers"


# --- files that changed after indexing -------------------------------------------------------------------------------
def test_a_file_shorter_than_its_manifest_is_a_counted_failure(tmp_path, frames):
    """Re-encoded to 10 frames after indexing at 30: a clip past the end is a failure with a reason, not a clip of
    one repeated frame."""
    from magvit.data import ClipDataset

    path = write_video(tmp_path / "v.mp4", frames[:30], fps=10)
    record = {"path": str(path), **probe_video(path), "split": "train", "label": None}
    write_video(path, frames[:10], fps=10)  # the file changes, the manifest does not
    dataset = ClipDataset([record], "train", num_frames=16, image_size=32, random_start=False, on_error="skip")
    assert dataset[0] is None
    assert dataset.num_failures == 1
    assert "shorter than the manifest says (30 frames)" in dataset.failure_reasons[str(path)]
    with pytest.raises(Exception, match="re-run data_prep.index"):
        ClipDataset([record], "train", num_frames=16, image_size=32, on_error="raise")[0]


# --- sketch folders ------------------------------------------------------------------------------------------------
@pytest.fixture
def demo_folder(tmp_path, frames):
    """Like the demo's data folder: two classes of clips, a manifest, sketches under sketches/ and in the manifest."""
    from magvit.prep import sketch
    from magvit.cli import run_main
    from magvit.prep.index import build_manifest

    data = tmp_path / "sample"
    for i in range(3):
        write_video(data / "bikes" / f"b{i}.mp4", frames[i * 10:i * 10 + 10], fps=10)
        write_video(data / "cars" / f"c{i}.mp4", frames[i * 10 + 5:i * 10 + 15], fps=10)
    build_manifest([data], data / "manifest.jsonl", val_fraction=0.0, workers=1, show_progress=False)
    assert run_main(sketch.PROG, sketch.main, ["--manifest", str(data / "manifest.jsonl"), "--out",
                                               str(data / "sketches"), "--workers", "1"]) == 0
    return data


def _records(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


@pytest.mark.parametrize("marker", [True, False], ids=["sketch-folder-marker", "sketch-keys-only"])
def test_reindexing_the_demo_folder_keeps_clips_and_sketch_keys(demo_folder, marker):
    """Re-indexing the folder indexes the 6 clips, not 12 (sketches as clips), and keeps the manifest's sketch
    keys; without the folder's marker (sketches made before it existed) the manifest's own keys exclude them."""
    from magvit.prep.index import SKETCH_MARKER, build_manifest

    manifest = demo_folder / "manifest.jsonl"
    before = {Path(r["path"]).name: r["sketch"] for r in _records(manifest)}
    assert len(before) == 6 and all(before.values())
    if not marker:
        (demo_folder / "sketches" / SKETCH_MARKER).unlink()
    summary = build_manifest([demo_folder], manifest, val_fraction=0.0, workers=1, show_progress=False)
    after = _records(manifest)
    assert summary["videos"] == 6 and summary["sketches_kept"] == 6
    assert {Path(r["path"]).name: r["sketch"] for r in after} == before
    assert not any("sketches" in Path(r["path"]).parts for r in after)


# --- malformed manifests and token shards -----------------------------------------------------------------------------
def test_manifest_with_all_paths_missing_or_a_list_label_is_a_value_error(tmp_path):
    from magvit.data import ClipDataset, read_manifest

    missing = tmp_path / "missing.jsonl"
    missing.write_text("".join(json.dumps({"path": f"gone{i}.mp4", "frames": 30, "split": "train"}) + "\n"
                               for i in range(3)))
    with pytest.raises(ValueError, match="none of the 3 'train' videos of the manifest exists"):
        ClipDataset(missing, "train", num_frames=8, image_size=32)
    listed = tmp_path / "listed.jsonl"
    listed.write_text(json.dumps({"path": "a.mp4", "frames": 30, "label": ["cat", "dog"]}) + "\n")
    with pytest.raises(ValueError, match=r"listed.jsonl:1: 'label' must be a class name .* got list"):
        read_manifest(listed)
    with pytest.raises(ValueError, match="'label' must be a class name"):
        ClipDataset([{"path": "a.mp4", "frames": 30, "label": ["cat"], "split": "train"}], "train")


def _token_dir(root: Path, codes: torch.Tensor, codebook_size: int = 64, labels: torch.Tensor | None = None,
               classes: tuple[str, ...] = ()) -> Path:
    from magvit.cli import write_json
    from magvit.prep.shards import save_shard

    root.mkdir(parents=True, exist_ok=True)
    labels = torch.full((len(codes),), -1, dtype=torch.long) if labels is None else labels  # -1: no class
    save_shard(root / "shard-00000.safetensors", {"codes": codes, "labels": labels})
    write_json(root / "meta.json", {"token_grid": list(codes.shape[1:]), "codebook_size": codebook_size,
                                    "classes": list(classes),
                                    "shards": [{"file": "shard-00000.safetensors", "num_examples": len(codes)}]})
    return root


def test_token_shards_are_validated_at_load(tmp_path):
    from magvit.data import TokenShardDataset

    good = torch.randint(0, 64, (3, 2, 4, 4), dtype=torch.int32)
    assert len(TokenShardDataset(_token_dir(tmp_path / "good", good))) == 3
    outside = good.clone()
    outside[1, 0, 0, 0] = 64
    with pytest.raises(ValueError, match=r"'codes' holds codes in \[\d+, 64\], outside the codebook \[0, 64\)"):
        TokenShardDataset(_token_dir(tmp_path / "outside", outside))
    negative = good.clone()
    negative[0, 0, 0, 0] = -1
    with pytest.raises(ValueError, match="outside the codebook"):
        TokenShardDataset(_token_dir(tmp_path / "negative", negative))
    damaged = _token_dir(tmp_path / "damaged", good)
    shard = damaged / "shard-00000.safetensors"
    shard.write_bytes(shard.read_bytes()[:-40])  # truncated
    with pytest.raises(ValueError, match="damaged token shard"):
        TokenShardDataset(damaged)
    floats = _token_dir(tmp_path / "floats", good.float())
    with pytest.raises(ValueError, match="token codes are integers"):
        TokenShardDataset(floats)


def test_token_shard_labels_outside_the_classes_are_refused_at_load(tmp_path):
    """A label past meta.json's classes would index past the class embeddings mid-training: refused when the
    shards open, naming the shard. -1 (no class) is always fine."""
    from magvit.batches import DataConfig, token_batches
    from magvit.cli import UsageError
    from magvit.data import TokenShardDataset

    codes = torch.randint(0, 64, (3, 2, 4, 4), dtype=torch.int32)
    fine = _token_dir(tmp_path / "fine", codes, labels=torch.tensor([0, -1, 1]), classes=("a", "b"))
    assert [TokenShardDataset(fine)[i]["label"] for i in range(3)] == [0, -1, 1]
    shard = tmp_path / "past" / "shard-00000.safetensors"
    cases = [("past", [0, 2, 1], ("a", "b")), ("none", [0, -1, -1], ()), ("low", [-2, 0, 0], ("a",))]
    for folder, labels, classes in cases:
        bad = _token_dir(tmp_path / folder, codes, labels=torch.tensor(labels), classes=classes)
        with pytest.raises(ValueError, match=f"shard-00000.safetensors: class labels in \\[-?\\d+, \\d+\\], outside the "
                                             f"{len(classes)} classes of meta.json"):
            TokenShardDataset(bad)
    data = DataConfig(tokens=str(shard.parent), batch_size=2, num_workers=0)
    with pytest.raises(UsageError) as refused:
        token_batches(data, 0, 1, 0, torch.device("cpu"))
    assert str(shard) in str(refused.value) and "\n" not in str(refused.value)


# --- token shard folders: one tokenize at a time, settings recorded, the tokenizer's weights fingerprinted ----------
@pytest.fixture(scope="module")
def tokenize_setup(tmp_path_factory, frames) -> dict[str, Path]:
    """4 real clips indexed, two tiny tokenizers of one config with other weights, a transformer that fits both."""
    from magvit import MaskedVideoTransformer, TokenizerConfig, TransformerConfig, VideoTokenizer
    from magvit.prep.index import build_manifest

    root = tmp_path_factory.mktemp("tokenize")
    for i in range(4):
        write_video(root / "clips" / f"c{i % 2}" / f"v{i}.mp4", frames[i * 5:i * 5 + 10], fps=10)
    build_manifest([root / "clips"], root / "manifest.jsonl", val_fraction=0.0, workers=1, show_progress=False)
    cfg = TokenizerConfig.preset("tiny")
    for seed, name in ((0, "tokenizer"), (1, "retrained")):
        torch.manual_seed(seed)
        VideoTokenizer(cfg).save_pretrained(root / name)
    grid = cfg.token_grid(cfg.num_frames, cfg.image_size, cfg.image_size)
    MaskedVideoTransformer(TransformerConfig.preset("tiny", codebook_size=cfg.codebook_size, token_grid=grid)
                           ).save_pretrained(root / "transformer")
    return {"root": root, "manifest": root / "manifest.jsonl", "tokenizer": root / "tokenizer",
            "retrained": root / "retrained", "transformer": root / "transformer"}


def _tokenize(setup: dict[str, Path], out: Path, *extra) -> int:
    from magvit.cli import run_main
    from magvit.prep import tokenize

    argv = ["--tokenizer", setup["tokenizer"], "--manifest", setup["manifest"], "--out", out, "--split", "all",
            "--workers", "0", "--no-conditions", "--sketch", "none", *extra]
    try:
        return run_main(tokenize.PROG, tokenize.main, [str(a) for a in argv])
    except SystemExit as exit_:
        return int(exit_.code or 0)


def _one_line(err: str) -> str:
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


def test_a_second_tokenize_into_a_folder_in_use_is_refused(tokenize_setup, tmp_path, capsys):
    """While one tokenize holds --out (here: this process's other lock on it), a second one refuses in one line
    naming the holder and touches nothing; once the first is done, the folder is free again."""
    from magvit.prep.tokenize import lock_out_dir

    out = tmp_path / "tokens"
    first = lock_out_dir(out)
    try:
        assert _tokenize(tokenize_setup, out) == 2
        line = _one_line(capsys.readouterr().err)
        assert line.endswith(f"error: {out} is in use by another tokenize run (pid {os.getpid()}): wait for it to "
                             "finish, stop it, or use another --out"), line
        assert list(out.iterdir()) == []  # no plan, no shard: nothing mixed
    finally:
        first.release()
    assert _tokenize(tokenize_setup, out) == 0
    assert _tokenize(tokenize_setup, out) == 0  # the lock went with the first run: a rerun resumes


def test_a_tokenize_rerun_with_other_settings_needs_overwrite(tokenize_setup, tmp_path, capsys):
    out = tmp_path / "tokens"
    assert _tokenize(tokenize_setup, out, "--shard-size", "2") == 0
    capsys.readouterr()
    assert _tokenize(tokenize_setup, out, "--shard-size", "3") == 2
    assert "holds shards made with other inputs or settings" in _one_line(capsys.readouterr().err)
    assert [s["num_examples"] for s in json.loads((out / "meta.json").read_text())["shards"]] == [2, 2]
    assert _tokenize(tokenize_setup, out, "--shard-size", "3", "--overwrite") == 0
    assert [s["num_examples"] for s in json.loads((out / "meta.json").read_text())["shards"]] == [3, 1]


def test_evaluate_tokens_of_a_tokenizer_with_the_same_config_but_other_weights(tokenize_setup, tmp_path, capsys):
    """The shards record their tokenizer's weights (sha256): evaluate refuses them with another tokenizer of the
    same config, accepts them with their own, and accepts older shards without the record with a warning."""
    from magvit import evaluate
    from magvit.pretrained import weights_fingerprint

    out = tmp_path / "tokens"
    assert _tokenize(tokenize_setup, out) == 0
    meta = json.loads((out / "meta.json").read_text())
    assert meta["tokenizer_weights"] == weights_fingerprint(tokenize_setup["tokenizer"])
    assert meta["tokenizer_weights"].startswith("sha256:") and len(meta["tokenizer_weights"]) == 7 + 64
    capsys.readouterr()

    def run(tokenizer: str, report: str) -> int:
        return evaluate.main(["--tokenizer", str(tokenize_setup[tokenizer]), "--transformer",
                              str(tokenize_setup["transformer"]), "--tokens", str(out), "--out", str(tmp_path / report),
                              "--no-progress", "--nll-tasks", "unconditional"])

    assert run("retrained", "other") == 2
    line = _one_line(capsys.readouterr().err)
    assert "was made by a tokenizer with other weights than --tokenizer" in line
    assert not (tmp_path / "other" / "report.json").exists()
    assert run("tokenizer", "own") == 0
    assert "tokenizer's weights" not in capsys.readouterr().err
    del meta["tokenizer_weights"]  # shards made before the record
    (out / "meta.json").write_text(json.dumps(meta))
    assert run("retrained", "old") == 0
    warnings = [line for line in capsys.readouterr().err.splitlines() if "tokenizer's weights" in line]
    assert len(warnings) == 1 and "warning: the token shards" in warnings[0] and "do not record" in warnings[0]
    assert json.loads((tmp_path / "old" / "report.json").read_text())["warnings"][0] in warnings[0]
