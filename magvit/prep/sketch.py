"""Sketch (edge-map) videos aligned with the videos of a manifest.

    python -m data_prep.sketch --manifest M --out DIR            # compute sketches
    python -m data_prep.sketch --manifest M --sketch-dir USERDIR # bring your own, aligned by file name

A sketch frame is ``magvit.sketch.sketch_frames`` of the video's frame (Canny edges, black on white). Each sketch
video gets the video's path relative to the common folder of all videos (``DIR/<class>/<name>.mp4``) and the
manifest gains a ``sketch`` field pointing at it (the manifest is rewritten atomically, in place unless
``--out-manifest`` is given). Existing sketches are kept.
"""

from __future__ import annotations

import concurrent.futures as cf
import json
import multiprocessing
import os
import sys
from pathlib import Path
from typing import Any, Sequence

from magvit.cli import ArgumentParser, UsageError, command_name, quiet_decoders, run_main
from magvit.progress import progress
from magvit.sketch import sketch_frames
from magvit.data import read_manifest, write_manifest
from magvit.video_io import VIDEO_EXTENSIONS, VideoReadError, probe_video, read_video, write_video
from magvit.prep.index import SKETCH_MARKER

PROG = command_name("python -m data_prep.sketch")


def _read_raw_manifest(path: Path) -> list[dict[str, Any]]:
    try:
        resolved = read_manifest(path)
    except (FileNotFoundError, ValueError) as err:
        raise UsageError(str(err)) from None
    raw = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    for record, full in zip(raw, resolved):
        record["_abs"] = full["path"]
    return raw


def relative_names(paths: Sequence[str]) -> list[str]:
    """Paths relative to their common folder (the names the sketch videos get)."""
    folders = [os.path.dirname(p) for p in paths]
    root = os.path.commonpath(folders) if folders else ""
    return [os.path.relpath(p, root) for p in paths]


def _make_sketch(source: str, target: str, overwrite: bool) -> tuple[str, str | None, bool]:
    """Worker: write the sketch of ``source`` to ``target``. Returns (target, error or None, skipped)."""

    try:
        if not overwrite and Path(target).is_file():
            try:
                if probe_video(target, check="none")["frames"] == probe_video(source, check="none")["frames"]:
                    return target, None, True
            except VideoReadError:
                pass  # damaged earlier output: redo it
        frames, fps = read_video(source)
        # near-lossless: compression ringing would otherwise blur the one-pixel lines
        write_video(target, sketch_frames(frames), fps=fps or 1.0, crf=8, preset="veryfast")
        return target, None, False
    except VideoReadError as err:
        return target, err.reason, False
    except Exception as err:
        return target, f"{type(err).__name__}: {err}", False


def _find_user_sketch(sketch_dir: Path, rel: str) -> Path | None:
    exact = sketch_dir / rel
    if exact.is_file():
        return exact
    stem = exact.with_suffix("")
    for ext in VIDEO_EXTENSIONS:
        for candidate in (stem.with_suffix(ext), sketch_dir / (Path(rel).stem + ext)):
            if candidate.is_file():
                return candidate
    return None


def _match_user_sketches(records: list[dict[str, Any]], names: list[str], sketch_dir: Path,
                         failures: list[tuple[str, str]]) -> dict[int, str]:
    """``{record index: sketch path}`` of the user's sketches in ``sketch_dir`` that are named like the videos and
    at least as long; the others go to ``failures`` with the reason."""
    if not sketch_dir.is_dir():
        raise UsageError(f"--sketch-dir not found: {sketch_dir}")
    results: dict[int, str] = {}
    for i, (record, rel) in enumerate(progress(list(zip(records, names)), desc="matching", unit="video")):
        found = _find_user_sketch(sketch_dir, rel)
        if found is None:
            failures.append((record["_abs"], f"no sketch named like {rel} in {sketch_dir}"))
            continue
        try:
            frames = probe_video(found, check="first")["frames"]
        except VideoReadError as err:
            failures.append((record["_abs"], f"sketch {found}: {err.reason}"))
            continue
        if frames < int(record["frames"]):
            failures.append((record["_abs"], f"sketch {found} has {frames} frames, the video {record['frames']}"))
            continue
        results[i] = str(found.resolve())
    return results


def _compute_sketches(records: list[dict[str, Any]], names: list[str], out: Path, workers: int, overwrite: bool,
                      failures: list[tuple[str, str]]) -> tuple[dict[int, str], int]:
    """Write the sketch of every video under ``out`` in ``workers`` processes; returns ``({record index: sketch
    path}, how many were already there)``; the videos that failed go to ``failures`` with the reason."""
    out.mkdir(parents=True, exist_ok=True)
    (out / SKETCH_MARKER).write_text("sketch videos of data_prep.sketch: data_prep.index does not index them\n")
    targets = [str((out / rel).with_suffix(".mp4").resolve()) for rel in names]
    jobs = [(r["_abs"], t, overwrite) for r, t in zip(records, targets)]
    results: dict[int, str] = {}
    already = 0
    bar = progress(total=len(jobs), desc="sketching", unit="video")
    with cf.ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("fork")) as pool:
        futures = {pool.submit(_make_sketch, *job): i for i, job in enumerate(jobs)}
        for future in cf.as_completed(futures):
            i = futures[future]
            target, error, was_there = future.result()
            bar.update()
            if error:
                failures.append((records[i]["_abs"], error))
            else:
                results[i] = target
                already += was_there
    bar.close()
    return results, already


def main(argv: Sequence[str] | None = None) -> int:
    parser = ArgumentParser(prog=PROG, description=__doc__.split("\n\n")[0])
    parser.add_argument("--manifest", required=True, help="manifest from data_prep.index")
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--out", help="folder for the computed sketch videos")
    source.add_argument("--sketch-dir", help="folder of your own sketch videos, aligned by relative file name")
    parser.add_argument("--out-manifest", default=None, help="write the updated manifest here (default: in place)")
    parser.add_argument("--workers", type=int, default=None, help="processes (default: all cores)")
    parser.add_argument("--overwrite", action="store_true", help="recompute sketches that already exist")
    args = parser.parse_args(argv)
    if args.workers is not None and args.workers < 1:
        raise UsageError(f"--workers must be >= 1, got {args.workers}")
    manifest = Path(args.manifest)
    records = _read_raw_manifest(manifest)
    if not records:
        raise UsageError(f"{manifest} holds no videos")
    out_manifest = Path(args.out_manifest) if args.out_manifest else manifest
    quiet_decoders()

    names = relative_names([r["_abs"] for r in records])
    failures: list[tuple[str, str]] = []
    if args.sketch_dir:
        results = _match_user_sketches(records, names, Path(args.sketch_dir), failures)
        made, skipped = 0, len(results)
    else:
        workers = args.workers or os.cpu_count() or 1
        results, skipped = _compute_sketches(records, names, Path(args.out), workers, args.overwrite, failures)
        made = len(results) - skipped

    relative = not os.path.isabs(records[0]["path"])
    updated = []
    for i, record in enumerate(records):
        record = {k: v for k, v in record.items() if k != "_abs"}
        if i in results:
            record["sketch"] = os.path.relpath(results[i], out_manifest.parent.resolve()) if relative else results[i]
        updated.append(record)
    if results:
        write_manifest(out_manifest, updated)
    for path, reason in failures[:20]:
        print(f"no sketch for {path}: {reason}", file=sys.stderr)
    print(f"sketches: {made} computed, {skipped} already there or matched, {len(failures)} failed; "
          f"{len(results)}/{len(records)} videos have a sketch -> {out_manifest if results else '(manifest unchanged)'}")
    return 0 if results else 1


def cli() -> int:
    """Console entry point."""
    return run_main(PROG, main, interrupted="interrupted (finished outputs are kept; rerun to resume)")


if __name__ == "__main__":
    sys.exit(cli())
