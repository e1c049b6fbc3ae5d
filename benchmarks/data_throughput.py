"""Decode + preprocess throughput of the clip pipeline: decord vs PyAV vs pre-extracted uint8 shards vs webdataset.

    python benchmarks/data_throughput.py [--data data/sample] [--num-frames 16] [--image-size 128] [--out FILE]

Clips of ``num_frames x image_size x image_size`` (random start, random crop, flip: the training path) are read
through a DataLoader (batch 4) with 0, 1 and 2 workers; ``webdataset`` streams the same clips from tar shards
(``data_prep.extract --format webdataset``, ``magvit.streaming.ShardStream``, shuffling buffer of 64, batches cut
in the workers; an epoch drops what does not fill a batch in every worker). Each configuration runs one warm-up epoch (worker start-up,
file cache) and is then timed over ``--epochs`` epochs with persistent workers. Prints a table (clips/s, frames/s)
and writes it as Markdown with ``--out``. The sample data is built first if missing (not timed).
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import torch
from torch.utils.data import DataLoader

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def _time_loader(dataset, workers: int, epochs: int) -> tuple[float, int]:
    from magvit.streaming import ShardStream

    if isinstance(dataset, ShardStream):  # batches cut in the workers, planned for this many of them
        dataset = ShardStream(dataset.location, "clips", 4, num_workers=workers, seed=0, shuffle_buffer=64,
                              image_size=dataset.size, random_crop=True, hflip=True)
        loader = DataLoader(dataset, batch_size=None, num_workers=workers, persistent_workers=workers > 0)
    else:
        loader = DataLoader(dataset, batch_size=4, shuffle=False, num_workers=workers,
                            persistent_workers=workers > 0)
    for _ in loader:  # warm-up epoch: worker start-up, file cache
        pass
    clips = 0
    start = time.perf_counter()
    for _ in range(epochs):
        for batch in loader:
            clips += len(batch["video"])
    return time.perf_counter() - start, clips


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", default=str(ROOT / "data" / "sample"), help="sample data folder (built if missing)")
    parser.add_argument("--num-frames", type=int, default=16)
    parser.add_argument("--image-size", type=int, default=128)
    parser.add_argument("--clips-per-video", type=int, default=4)
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--workers", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--out", default=None, help="also write the table (Markdown) here")
    args = parser.parse_args()

    from magvit.prep import extract
    from magvit.cli import quiet_decoders
    from magvit.prep.sample_data import build_sample_data
    from magvit.data import ClipDataset, ClipShardDataset, read_manifest
    from magvit.streaming import ShardStream

    quiet_decoders()
    load_start = os.getloadavg()[0]
    data = Path(args.data)
    if not (data / "manifest.jsonl").is_file():
        build_sample_data(data, show_progress=False)
    manifest = data / "manifest.jsonl"
    records = read_manifest(manifest)
    common = dict(num_frames=args.num_frames, image_size=args.image_size, clips_per_video=args.clips_per_video,
                  hflip=True, seed=0)
    with tempfile.TemporaryDirectory() as tmp, tempfile.TemporaryDirectory() as tars:
        # shards keep the short side (random crop still possible): stored at image_size, cropped to image_size
        extract_args = ["--manifest", str(manifest), "--split", "all", "--num-frames", str(args.num_frames),
                        "--image-size", str(args.image_size), "--clips-per-video", str(args.clips_per_video),
                        "--workers", "2"]
        assert extract.main([*extract_args, "--out", tmp]) == 0
        # streaming splits by shard: at least 4 tar shards, so that every worker has some
        shard_size = max(1, len(records) * args.clips_per_video // 4)
        assert extract.main([*extract_args, "--out", tars, "--format", "webdataset",
                             "--shard-size", str(shard_size)]) == 0
        sources = {
            "decord": ClipDataset(records, "all", backend="decord", random_start=True, random_crop=True, **common),
            "pyav": ClipDataset(records, "all", backend="pyav", random_start=True, random_crop=True, **common),
            "shards": ClipShardDataset(tmp, image_size=args.image_size, random_crop=True, hflip=True, seed=0),
            "webdataset": ShardStream(tars, "clips", 4, image_size=args.image_size, random_crop=True, hflip=True),
        }
        rows = []
        for name, dataset in sources.items():
            for workers in args.workers:
                seconds, clips = _time_loader(dataset, workers, args.epochs)
                rows.append((name, workers, clips, seconds, clips / seconds, clips * args.num_frames / seconds))
                print(f"{name:10s} workers={workers}: {clips / seconds:7.1f} clips/s", file=sys.stderr)

    sizes = sorted({f"{r['width']}x{r['height']}" for r in records})
    load = os.getloadavg()[0]
    header = (f"Clip pipeline throughput, {args.num_frames}x{args.image_size}x{args.image_size} clips (random start, "
              f"crop, flip), batch 4, {len(records)} videos ({', '.join(sizes)}, h264) x {args.clips_per_video} "
              f"clips, {args.epochs} timed epochs after a warm-up; {os.cpu_count()} CPUs, torch "
              f"{torch.__version__}, {torch.get_num_threads()} torch threads, {platform.python_version()}; load "
              f"average {load_start:.1f} at the start, {load:.1f} at the end (other work on the machine)")
    lines = [header, "", "| source | workers | clips | seconds | clips/s | frames/s |",
             "|---|---:|---:|---:|---:|---:|"]
    for name, workers, clips, seconds, cps, fps in rows:
        lines.append(f"| {name} | {workers} | {clips} | {seconds:.2f} | {cps:.1f} | {fps:.0f} |")
    table = "\n".join(lines)
    print(table)
    if args.out:
        Path(args.out).write_text(table + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
