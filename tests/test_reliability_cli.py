"""Careless flags and broken inputs for ``index`` / ``tokenize`` / ``evaluate``: one line on stderr and exit 2
(checked before any long work), damaged outputs cleared by a rerun, unreadable clips and foreign token shards
reported, and decoding with any number of steps."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch

from magvit.prep import index, tokenize
from magvit.cli import run_main
from magvit import evaluate
from magvit.video_io import probe_video, read_video, write_video


def cli(module, *argv) -> int:
    try:
        return run_main(module.PROG, module.main, [str(a) for a in argv])
    except SystemExit as exit_:
        return int(exit_.code or 0)


def one_line(err: str) -> str:
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


@contextmanager
def read_only(folder: Path):
    """``folder`` made unwritable, also for root (immutable attribute); skips where neither works."""
    if os.geteuid() == 0:
        made = shutil.which("chattr") and subprocess.run(["chattr", "+i", str(folder)],
                                                          capture_output=True).returncode == 0
        undo = ["chattr", "-i", str(folder)]
    else:
        os.chmod(folder, 0o500)
        made, undo = True, None
    try:
        try:
            (folder / ".probe").touch()
            (folder / ".probe").unlink()
            pytest.skip("cannot make a folder read-only here")
        except OSError:
            pass
        if not made:
            pytest.skip("cannot make a folder read-only here")
        yield folder
    finally:
        if undo:
            subprocess.run(undo, capture_output=True)
        else:
            os.chmod(folder, 0o700)


@pytest.fixture(scope="module")
def setup(tmp_path_factory, real_video_paths):
    """Tiny tokenizers (64 and 32 codes), a matching transformer, damaged model folders, 10 real clips indexed."""
    from magvit import MaskedVideoTransformer, TokenizerConfig, TransformerConfig, VideoTokenizer

    root = tmp_path_factory.mktemp("reliability")
    torch.manual_seed(0)
    cfg = TokenizerConfig.preset("tiny")
    VideoTokenizer(cfg).save_pretrained(root / "tokenizer")
    VideoTokenizer(TokenizerConfig.preset("tiny", codebook_size=32)).save_pretrained(root / "tokenizer32")
    grid = cfg.token_grid(cfg.num_frames, cfg.image_size, cfg.image_size)
    MaskedVideoTransformer(TransformerConfig.preset("tiny", codebook_size=cfg.codebook_size, token_grid=grid)
                           ).save_pretrained(root / "transformer")
    weights = (root / "tokenizer" / "model.safetensors").read_bytes()
    for name, data in (("truncated", weights[: len(weights) // 2]), ("shapes", None), ("pickled", None)):
        shutil.copytree(root / "tokenizer", root / name)
        if name == "truncated":
            (root / name / "model.safetensors").write_bytes(data)
        elif name == "shapes":
            shutil.copy(root / "tokenizer32" / "model.safetensors", root / name / "model.safetensors")
        else:
            torch.save({"state": torch.zeros(3)}, root / name / "model.safetensors")
    frames = read_video(real_video_paths[1], indices=range(60)).frames[:, ::2, ::2]  # (60, 72, 88, 3)
    for i in range(10):
        write_video(root / "clips" / f"c{i % 2}" / f"v{i}.mp4", frames[i * 5:i * 5 + 10], fps=10)
    assert cli(index, root / "clips", "--out", root / "manifest.jsonl", "--val-fraction", "0", "--workers", "1") == 0
    return root


# --- --out that cannot be written ----------------------------------------------------------------------------------
def test_index_out_is_a_folder_or_read_only(setup, tmp_path, capsys):
    assert cli(index, setup / "clips", "--out", tmp_path) == 2
    assert "is a folder; give a file name" in one_line(capsys.readouterr().err)
    locked = tmp_path / "locked"
    locked.mkdir()
    with read_only(locked):
        assert cli(index, setup / "clips", "--out", locked / "m.jsonl") == 2
        assert "cannot write in" in one_line(capsys.readouterr().err)


def test_tokenize_out_is_a_file_or_read_only(setup, tmp_path, capsys):
    args = ["--tokenizer", setup / "tokenizer", "--manifest", setup / "manifest.jsonl", "--workers", "0"]
    (tmp_path / "file").write_text("x")
    assert cli(tokenize, *args, "--out", tmp_path / "file") == 2
    assert "is a file, not a folder" in one_line(capsys.readouterr().err)
    locked = tmp_path / "locked"
    locked.mkdir()
    with read_only(locked):
        assert cli(tokenize, *args, "--out", locked / "tokens") == 2
        assert "cannot write in" in one_line(capsys.readouterr().err)


def test_evaluate_checks_out_before_computing(setup, tmp_path, capsys, monkeypatch):
    def no_models(*args, **kwargs):
        raise AssertionError("models loaded before --out was checked")

    monkeypatch.setattr(evaluate, "load_models", no_models)
    (tmp_path / "file").write_text("x")
    args = ["--tokenizer", setup / "tokenizer", "--data", setup / "manifest.jsonl", "--no-progress"]
    assert evaluate.main([str(a) for a in args + ["--out", tmp_path / "file"]]) == 2
    assert "is a file, not a folder" in one_line(capsys.readouterr().err)
    locked = tmp_path / "locked"
    locked.mkdir()
    with read_only(locked):
        assert evaluate.main([str(a) for a in args + ["--out", locked / "report"]]) == 2
        assert "cannot write in" in one_line(capsys.readouterr().err)


# --- damaged model folders ------------------------------------------------------------------------------------------
@pytest.mark.parametrize(("model", "message"), [("truncated", "not a readable safetensors file"),
                                                ("pickled", "not a readable safetensors file"),
                                                ("shapes", "does not fit the model in config.json")])
def test_damaged_tokenizer_weights_are_one_line(setup, tmp_path, capsys, model, message):
    assert evaluate.main(["--tokenizer", str(setup / model), "--data", str(setup / "manifest.jsonl"), "--out",
                          str(tmp_path / "report"), "--no-progress"]) == 2
    assert message in one_line(capsys.readouterr().err)
    assert cli(tokenize, "--tokenizer", setup / model, "--manifest", setup / "manifest.jsonl", "--out",
               tmp_path / "tokens") == 2
    assert message in one_line(capsys.readouterr().err)


# --- manifests ------------------------------------------------------------------------------------------------------
def test_tokenize_manifest_with_missing_paths_or_a_list_label(setup, tmp_path, capsys):
    missing = tmp_path / "missing.jsonl"
    missing.write_text("".join(json.dumps({"path": f"/nowhere/v{i}.mp4", "frames": 30, "split": "train"}) + "\n"
                               for i in range(4)))
    args = ["--tokenizer", setup / "tokenizer", "--out", tmp_path / "tokens", "--workers", "0"]
    assert cli(tokenize, *args, "--manifest", missing) == 2
    assert "none of the 4 'train' videos of the manifest exists" in one_line(capsys.readouterr().err)
    listed = tmp_path / "listed.jsonl"
    record = json.loads((setup / "manifest.jsonl").read_text().splitlines()[0])
    listed.write_text(json.dumps({**record, "label": ["c0", "c1"]}) + "\n")
    assert cli(tokenize, *args, "--manifest", listed) == 2
    assert "'label' must be a class name" in one_line(capsys.readouterr().err)


# --- token shards ---------------------------------------------------------------------------------------------------
def test_tokenize_rerun_and_overwrite_clear_a_corrupt_shard(setup, tmp_path, capsys):
    from magvit.data import TokenShardDataset

    out = tmp_path / "tokens"
    args = ["--tokenizer", setup / "tokenizer", "--manifest", setup / "manifest.jsonl", "--out", out,
            "--workers", "0", "--shard-size", "4", "--no-conditions", "--sketch", "none"]
    assert cli(tokenize, *args) == 0
    reference = TokenShardDataset(out).tensors["codes"].clone()
    shard = out / "shard-00001.safetensors"
    for extra, counts in (([], "(1 written, 2 already there)"), (["--overwrite"], "(3 written, 0 already there)")):
        shard.write_bytes(shard.read_bytes()[:100])  # a crash or a full disk half-way through a write
        capsys.readouterr()
        assert cli(tokenize, *args, *extra) == 0
        assert counts in capsys.readouterr().out
        assert torch.equal(TokenShardDataset(out).tensors["codes"], reference)


def test_evaluate_refuses_shards_of_another_tokenizer(setup, tmp_path, capsys):
    out = tmp_path / "tokens32"
    assert cli(tokenize, "--tokenizer", setup / "tokenizer32", "--manifest", setup / "manifest.jsonl", "--out", out,
               "--workers", "0", "--no-conditions", "--sketch", "none") == 0
    capsys.readouterr()
    assert evaluate.main(["--transformer", str(setup / "transformer"), "--tokens", str(out), "--out",
                          str(tmp_path / "report"), "--no-progress"]) == 2
    line = one_line(capsys.readouterr().err)
    assert "32-code book" in line and "the transformer has 64 codes" in line
    assert not (tmp_path / "report" / "report.json").exists()


# --- unreadable clips -----------------------------------------------------------------------------------------------
def test_evaluate_counts_and_reports_unreadable_clips(setup, tmp_path, capsys):
    """7 of 10 indexed clips damaged afterwards: the report says 3 clips evaluated and 7 unreadable, with why."""
    data = tmp_path / "clips"
    shutil.copytree(setup / "clips", data)
    records = [json.loads(line) for line in (setup / "manifest.jsonl").read_text().splitlines()]
    for record in records:
        record["path"] = str(data / Path(record["path"]).relative_to(setup / "clips"))
        record["split"] = "val"
    for record in records[:7]:
        path = Path(record["path"])
        path.write_bytes(path.read_bytes()[:2000])
    manifest = tmp_path / "manifest.jsonl"
    manifest.write_text("".join(json.dumps(r) + "\n" for r in records))
    assert evaluate.main(["--tokenizer", str(setup / "tokenizer"), "--data", str(manifest), "--out",
                          str(tmp_path / "report"), "--no-progress"]) == 0
    report = json.loads((tmp_path / "report" / "report.json").read_text())
    assert report["tokenizer"]["num_clips"] == 3 and report["tokenizer"]["unreadable_clips"] == 7
    assert sorted(u["path"] for u in report["data_problems"]["unreadable"]) == sorted(r["path"] for r in records[:7])
    assert all(u["reason"] for u in report["data_problems"]["unreadable"])
    assert "7 clips unreadable" in capsys.readouterr().out


def test_evaluate_rejects_nan_sampling_values(setup, tmp_path, capsys):
    for flag in ("--temperature", "--guidance-scale"):
        assert evaluate.main(["--tokenizer", str(setup / "tokenizer"), "--data", str(setup / "manifest.jsonl"),
                              "--split", "all", "--out", str(tmp_path / "r"), "--no-progress", flag, "nan"]) == 2
        assert f"{flag} must be a finite number" in one_line(capsys.readouterr().err)


# --- decoding steps -------------------------------------------------------------------------------------------------
def test_decoding_with_a_thousand_steps_and_the_schedule_loop():
    """1000 steps used to recurse 1000 deep (RecursionError); the loop gives the recursive definition's counts."""
    import math

    from magvit.masking import mask_schedule
    from magvit.sampling import iterative_decode, masked_counts, num_masked_after_step

    def recursive(n, step, steps):  # the former definition, for a known-value check at small sizes
        if step >= steps - 1:
            return 0
        before = n if step == 0 else recursive(n, step - 1, steps)
        return max(0, min(before - 1, math.floor(n * mask_schedule((step + 1) / steps, "cosine"))))

    for n, steps in ((256, 12), (100, 30), (5, 8)):
        assert masked_counts(n, steps) == [recursive(n, s, steps) for s in range(steps)]
    counts = masked_counts(5000, 5000)  # 4999 levels of recursion before
    assert len(counts) == 5000 and counts[-1] == 0 and all(a > b for a, b in zip(counts, counts[1:]))
    assert num_masked_after_step(5000, 4998, 5000) == counts[4998] == 1  # one token per step at the end
    tokens = torch.full((1, 1200), 7)
    logits_fn = lambda t: torch.randn(t.shape[0], t.shape[1], 8, generator=torch.Generator().manual_seed(0))
    out = iterative_decode(logits_fn, tokens, mask_token=7, codebook_size=4, steps=1000)
    assert out.shape == (1, 1200) and int(out.max()) < 4


# --- images too large to decode -------------------------------------------------------------------------------------
def _png_header(path: Path, width: int, height: int) -> Path:
    """A PNG whose header says ``width x height`` RGB and whose pixel data is empty: all a reader sees before it
    decodes (a real 144-megapixel PNG took 4.2 GB to read)."""
    import struct
    import zlib

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0))
                     + chunk(b"IDAT", zlib.compress(b"")) + chunk(b"IEND", b""))
    return path


@pytest.mark.parametrize("width, height, shown", [(12000, 12000, "12000x12000 = 144.0 megapixels"),
                                                  (20000, 20000, "400.0 megapixels")],
                         ids=["144-megapixels", "400-megapixels-past-pillow-limit"])
def test_huge_images_are_refused_from_their_header(tmp_path, capsys, width, height, shown):
    """Above 8192 x 8192 an image is refused before it is decoded, by every reader and by generate's --cond /
    --sketch before any model is loaded (Pillow itself warns at 89 and raises its own error at 179 megapixels)."""
    from magvit import generate
    from magvit.video_io import MAX_IMAGE_PIXELS, VideoReadError, image_size

    big = _png_header(tmp_path / "big.png", width, height)
    for read in (image_size, read_video, probe_video):
        with pytest.raises(VideoReadError, match=re.escape(f"cannot read {big}: {shown}, more than the 67.1 ")):
            read(big)
    for flag in ("--cond", "--sketch"):
        task = ["--task", "sketch"] if flag == "--sketch" else []
        assert generate.main([flag, str(big), *task, "--out", str(tmp_path / "out.mp4"), "--tokenizer",
                              str(tmp_path / "none"), "--transformer", str(tmp_path / "none")]) == 2
        line = one_line(capsys.readouterr().err)
        assert line == f"error: {flag} {big}: {shown}, more than the 67.1 (8192 x 8192) an image may have here; " \
                       "downscale it first", line
    assert image_size(_png_header(tmp_path / "limit.png", 8192, MAX_IMAGE_PIXELS // 8192)) == (8192, 8192)
