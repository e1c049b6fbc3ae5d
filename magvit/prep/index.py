"""Index videos into a manifest (JSON lines) with a stable train/val split.

    python -m data_prep.index INPUT... --out manifest.jsonl [--val-fraction 0.1] [--workers N]

INPUT: folders (scanned recursively) or files. Each video is probed (frame count, fps, size, duration, codec) in
parallel worker processes, decoding its first and last frame so that truncated files are caught here rather than
mid-training. Unreadable files never stop the run: they go to ``<out stem>.rejects.jsonl`` beside the manifest with
the reason. The split is a hash of the path relative to its INPUT folder, so it is the same on every machine and a
file keeps its split when others are added; classes with at least two videos but no val video get their
lowest-hash video moved to val (``--min-val-per-class``). The label is the name of the parent folder.

Symbolic links are followed, never into a cycle: a link to a folder that contains it, a link loop or a dangling
link is a reject with the reason. Sketch videos are never indexed as clips: folders written by
``data_prep.sketch`` (they hold a ``.magvit-sketches`` marker) are skipped, and re-indexing over a manifest that has
``sketch`` keys skips those videos and keeps the keys.

Exit status: 0 when the manifest holds at least one video, 1 when nothing usable was found, 2 for bad arguments.
"""

from __future__ import annotations

import concurrent.futures as cf
import errno
import hashlib
import multiprocessing
import os
import stat
import sys
from collections import Counter
from pathlib import Path
from typing import Any, Sequence

from magvit.cli import ArgumentParser, UsageError, command_name, quiet_decoders, run_main
from magvit.progress import progress
from magvit.data import read_manifest, write_manifest
from magvit.fileio import check_writable_file
from magvit.video_io import IMAGE_EXTENSIONS, VIDEO_EXTENSIONS, VideoReadError, probe_video

PROG = command_name("python -m data_prep.index")


#: a folder holding this file is the output of ``data_prep.sketch`` (edge maps, not clips): never indexed as videos
SKETCH_MARKER = ".magvit-sketches"


def _bad_link(path: str) -> str:
    """Why a symbolic link cannot be followed (a loop, or a target that is gone)."""
    try:
        os.stat(path)
    except OSError as err:
        if err.errno == errno.ELOOP:
            return "symbolic link loop (the links point at each other): not followed"
        return f"broken symbolic link (target {os.readlink(path)!r} does not exist)"
    return "symbolic link cannot be followed"


def _walk(root: Path, extensions: tuple[str, ...], rejects: list[dict], skipped: list[dict]) -> list[Path]:
    """Candidate files under ``root``, following symbolic links but never into a cycle.

    A link to a folder that contains it (a cycle), a link loop or a dangling link goes to ``rejects`` with the
    reason; a folder reached twice through links is scanned once; ``data_prep.sketch`` output goes to ``skipped``.
    """
    found, visited = [], set()
    root_stat = root.stat()
    stack = [(root, frozenset({(root_stat.st_dev, root_stat.st_ino)}))]  # folder, real (dev, inode) of its chain
    visited |= stack[0][1]
    while stack:
        folder, chain = stack.pop()
        try:
            entries = sorted(os.scandir(folder), key=lambda e: e.name)
        except OSError as err:
            rejects.append({"path": str(folder), "reason": f"cannot list the folder ({err.strerror})"})
            continue
        for entry in entries:
            if entry.name.startswith("."):
                continue
            try:
                st = os.stat(entry.path)  # follows links
            except OSError:
                if entry.is_symlink():
                    rejects.append({"path": entry.path, "reason": _bad_link(entry.path)})
                continue
            if stat.S_ISDIR(st.st_mode):
                key = (st.st_dev, st.st_ino)
                if key in chain:
                    rejects.append({"path": entry.path, "reason": "symbolic link to a folder that contains it "
                                                                  "(a cycle): not followed"})
                elif key not in visited:
                    visited.add(key)
                    if os.path.exists(os.path.join(entry.path, SKETCH_MARKER)):
                        skipped.append({"path": entry.path, "reason": "sketch videos (data_prep.sketch output)"})
                    else:
                        stack.append((Path(entry.path), chain | {key}))
            elif stat.S_ISREG(st.st_mode) and Path(entry.name).suffix.lower() in extensions:
                found.append(Path(entry.path))
    return found


def find_inputs(inputs: Sequence[str | os.PathLike], images: bool = False,
                exclude: set[str] | frozenset[str] = frozenset()) -> tuple[list[tuple[Path, str, str | None]],
                                                                          list[dict], list[dict]]:
    """Files to index as ``(path, key, parent label)``, the rejected links, and the skipped folders and files.

    ``key`` is the path relative to its INPUT folder; ``exclude`` holds real paths never to index (the sketch
    videos of an existing manifest). Raises ``UsageError`` for an INPUT that does not exist.
    """
    extensions = VIDEO_EXTENSIONS + (IMAGE_EXTENSIONS if images else ())
    found: dict[Path, tuple[Path, str, str | None]] = {}
    rejects: list[dict] = []
    skipped: list[dict] = []
    for raw in inputs:
        root = Path(raw)
        if not root.exists():
            raise UsageError(f"input not found: {raw}" + (f" ({_bad_link(raw)})" if root.is_symlink() else ""))
        if root.is_file():
            resolved = root.resolve()
            found.setdefault(resolved, (resolved, f"{resolved.parent.name}/{resolved.name}", resolved.parent.name))
            continue
        for path in _walk(root, extensions, rejects, skipped):
            real = Path(os.path.realpath(path))
            if str(real) in exclude:
                skipped.append({"path": str(path), "reason": "a sketch video of the manifest"})
                continue
            rel = path.relative_to(root)
            label = rel.parts[-2] if len(rel.parts) >= 2 else None
            found.setdefault(real, (real, rel.as_posix(), label))
    return sorted(found.values(), key=lambda item: str(item[0])), rejects, skipped


def split_hash(key: str) -> float:
    """A stable number in [0, 1) from a path key (SHA-1, independent of Python's hash seed)."""
    return int.from_bytes(hashlib.sha1(key.encode("utf-8")).digest()[:8], "big") / 2**64


def assign_splits(records: list[dict[str, Any]], keys: list[str], val_fraction: float,
                  min_val_per_class: int = 1) -> None:
    """Set ``split`` in place: ``val`` when ``split_hash(key) < val_fraction``, then top up small classes."""
    hashes = [split_hash(k) for k in keys]
    for record, h in zip(records, hashes):
        record["split"] = "val" if h < val_fraction else "train"
    if val_fraction <= 0 or min_val_per_class <= 0:
        return
    by_label: dict[Any, list[int]] = {}
    for i, record in enumerate(records):
        if record.get("label") is not None:
            by_label.setdefault(record["label"], []).append(i)
    for members in by_label.values():
        if len(members) < 2:
            continue
        have = sum(records[i]["split"] == "val" for i in members)
        # move the lowest-hash train videos, keeping at least one video in train
        for i in sorted((i for i in members if records[i]["split"] == "train"), key=lambda i: hashes[i]):
            if have >= min_val_per_class or have >= len(members) - 1:
                break
            records[i]["split"] = "val"
            have += 1


def _probe(path: str, check: str) -> tuple[str, dict | None, str | None]:
    try:
        return path, probe_video(path, check=check), None
    except VideoReadError as err:
        return path, None, err.reason
    except Exception as err:  # never let one file stop the run
        return path, None, f"{type(err).__name__}: {err}"


def _probe_isolated(path: str, check: str, timeout: float) -> tuple[str, dict | None, str | None]:
    """Probe one file in its own process: a decoder that crashes or hangs only loses this file."""
    with cf.ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("fork")) as pool:
        future = pool.submit(_probe, path, check)
        try:
            return future.result(timeout=timeout)
        except cf.process.BrokenProcessPool:
            return path, None, "the decoder crashed on this file"
        except cf.TimeoutError:
            for process in list(pool._processes.values()):  # the worker is ours: stop the hung decoder
                process.kill()
            return path, None, f"probing took longer than {timeout:g} s"


def probe_all(paths: list[str], workers: int, check: str, timeout: float = 120.0,
              show_progress: bool = True) -> dict[str, tuple[dict | None, str | None]]:
    """``{path: (info, None) or (None, reason)}`` probing in ``workers`` processes."""
    results: dict[str, tuple[dict | None, str | None]] = {}
    bar = progress(total=len(paths), desc="probing", unit="file", disable=not show_progress)
    if workers <= 1 or len(paths) <= 1:
        for path in paths:
            _, info, reason = _probe(path, check)
            results[path] = (info, reason)
            bar.update()
    else:
        pending = list(paths)
        try:
            with cf.ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("fork")) as pool:
                futures = {pool.submit(_probe, p, check): p for p in pending}
                for future in cf.as_completed(futures):
                    path, info, reason = future.result()
                    results[path] = (info, reason)
                    bar.update()
        except cf.process.BrokenProcessPool:
            # a decoder crashed a worker: redo the unfinished files one by one, each in its own process
            for path in [p for p in pending if p not in results]:
                _, info, reason = _probe_isolated(path, check, timeout)
                results[path] = (info, reason)
                bar.update()
    bar.close()
    return results


def build_manifest(inputs: Sequence[str | os.PathLike], out: str | os.PathLike, val_fraction: float = 0.1,
                   labels: bool = True, images: bool = False, workers: int | None = None, check: str = "ends",
                   min_frames: int = 1, min_val_per_class: int = 1, relative_paths: bool = False,
                   show_progress: bool = True) -> dict[str, Any]:
    """Probe ``inputs`` and write the manifest and the rejects file. Returns a summary dict.

    The manifest is only written when at least one video is usable (an existing one is never replaced by an
    empty one).
    """
    if not 0.0 <= val_fraction < 1.0:
        raise UsageError(f"--val-fraction must be in [0, 1), got {val_fraction}")
    if min_frames < 1:
        raise UsageError(f"--min-frames must be >= 1, got {min_frames}")
    out = Path(out)
    try:
        check_writable_file(out)  # before probing: a bad --out fails now, not after every file is decoded
    except ValueError as err:
        raise UsageError(f"--out: {err}") from None
    sketches = _existing_sketches(out)
    files, rejects, skipped = find_inputs(inputs, images=images, exclude={s for s, _ in sketches.values()})
    workers = workers or os.cpu_count() or 1
    results = probe_all([str(p) for p, _, _ in files], workers, check, show_progress=show_progress)
    records, keys = [], []
    for path, key, label in files:
        info, reason = results[str(path)]
        if info is not None and info["frames"] < min_frames:
            info, reason = None, f"only {info['frames']} frames (--min-frames {min_frames})"
        if info is None:
            rejects.append({"path": str(path), "reason": reason})
            continue
        shown = os.path.relpath(path, out.parent.resolve()) if relative_paths else str(path)
        records.append({"path": shown, **info, "split": "train", "label": label if labels else None})
        if str(path) in sketches:  # keep the sketch data_prep.sketch made for this video
            sketch = sketches[str(path)][1]
            records[-1]["sketch"] = os.path.relpath(sketch, out.parent.resolve()) if relative_paths else sketch
        keys.append(key)
    assign_splits(records, keys, val_fraction, min_val_per_class)
    rejects_path = out.with_name(f"{out.stem}.rejects.jsonl")
    if records:
        write_manifest(out, records)
    write_manifest(rejects_path, rejects)
    splits = Counter(r["split"] for r in records)
    return {"manifest": str(out), "rejects_file": str(rejects_path), "videos": len(records),
            "train": splits["train"], "val": splits["val"],
            "classes": sorted({r["label"] for r in records if r["label"] is not None}),
            "rejected": rejects, "skipped": skipped, "frames": sum(r["frames"] for r in records),
            "sketches_kept": sum("sketch" in r for r in records)}


def _existing_sketches(out: Path) -> dict[str, tuple[str, str]]:
    """``{real video path: (real sketch path, sketch path)}`` of the manifest already at ``out`` (if any), so that
    re-indexing keeps the ``sketch`` keys and never takes the sketch videos for clips."""
    if not out.is_file():
        return {}
    try:
        records = read_manifest(out)
    except (OSError, ValueError):  # unreadable: it is about to be replaced anyway
        return {}
    return {os.path.realpath(r["path"]): (os.path.realpath(r["sketch"]), os.path.abspath(r["sketch"]))
            for r in records if isinstance(r.get("sketch"), str) and os.path.isfile(r["sketch"])}


def main(argv: Sequence[str] | None = None) -> int:
    parser = ArgumentParser(prog=PROG, description=__doc__.split("\n\n")[0],
                            epilog="Exit status: 0 if at least one video was indexed, 1 if none, 2 on bad arguments.")
    parser.add_argument("inputs", nargs="+", metavar="INPUT", help="folders (scanned recursively) or video files")
    parser.add_argument("--out", required=True, help="manifest to write (JSON lines)")
    parser.add_argument("--val-fraction", type=float, default=0.1, help="share of videos in val (default 0.1)")
    parser.add_argument("--min-val-per-class", type=int, default=1,
                        help="classes with >= 2 videos get at least this many val videos (default 1; 0 = off)")
    parser.add_argument("--no-labels", action="store_true", help="do not take labels from parent folder names")
    parser.add_argument("--images", action="store_true", help="also index still images (png, jpg) as 1-frame videos")
    parser.add_argument("--min-frames", type=int, default=1, help="reject videos with fewer frames (default 1)")
    parser.add_argument("--check", choices=("none", "first", "ends"), default="ends",
                        help="decode nothing, the first, or the first and last frame of each file (default ends)")
    parser.add_argument("--relative-paths", action="store_true",
                        help="store paths relative to the manifest's folder (portable data folder)")
    parser.add_argument("--workers", type=int, default=None, help="probe processes (default: all cores)")
    args = parser.parse_args(argv)
    if args.workers is not None and args.workers < 1:
        raise UsageError(f"--workers must be >= 1, got {args.workers}")
    quiet_decoders()
    summary = build_manifest(args.inputs, args.out, val_fraction=args.val_fraction, labels=not args.no_labels,
                             images=args.images, workers=args.workers, check=args.check, min_frames=args.min_frames,
                             min_val_per_class=args.min_val_per_class, relative_paths=args.relative_paths)
    for skip in summary["skipped"][:5]:
        print(f"skipped {skip['path']}: {skip['reason']}", file=sys.stderr)
    for reject in summary["rejected"][:20]:
        print(f"rejected {reject['path']}: {reject['reason']}", file=sys.stderr)
    if len(summary["rejected"]) > 20:
        print(f"... and {len(summary['rejected']) - 20} more", file=sys.stderr)
    classes = summary["classes"]
    print(f"indexed {summary['videos']} videos ({summary['frames']} frames; train {summary['train']}, val "
          f"{summary['val']}; {len(classes)} classes{': ' + ', '.join(classes[:10]) if classes else ''}"
          f"{', ...' if len(classes) > 10 else ''}) -> {summary['manifest']}; rejected {len(summary['rejected'])}"
          f" -> {summary['rejects_file']}"
          + (f"; kept {summary['sketches_kept']} sketch links" if summary["sketches_kept"] else "")
          + (f"; skipped {len(summary['skipped'])} sketch folders/videos" if summary["skipped"] else ""))
    if summary["videos"] == 0:
        print(f"{PROG}: nothing usable found in {' '.join(args.inputs)}", file=sys.stderr)
        return 1
    return 0


def cli() -> int:
    """Console entry point."""
    return run_main(PROG, main, interrupted="interrupted (finished outputs are kept; rerun to resume)")


if __name__ == "__main__":
    sys.exit(cli())
