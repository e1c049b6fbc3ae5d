"""Pre-extract clips into compact uint8 shards, so training never decodes video on the hot path.

    python -m data_prep.extract --manifest M --out DIR --num-frames 16 --image-size 128 [--split train]

Each video gives ``--clips-per-video`` evenly spaced clips, short-side resized to ``--image-size`` and center
cropped, stored as ``frames`` uint8 ``(N, T, H, W, 3)`` plus ``labels`` ``(N,)`` in ``shard-XXXXX.safetensors``,
with ``meta.json`` written last (read by ``magvit.data.ClipShardDataset``, which can crop smaller and flip). Store a
larger ``--image-size`` than the training size to keep random-crop augmentation. Rerunning resumes: finished
shards are kept. Videos that fail to decode are left out and reported.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Sequence

import torch
from torch.utils.data import DataLoader, Subset

from data_prep._cli import ArgumentParser, UsageError, progress, quiet_decoders, run_main, write_json
from data_prep._shards import fingerprint, open_out_dir, save_shard, shard_name, shard_rows

PROG = "python -m data_prep.extract"


def main(argv: Sequence[str] | None = None) -> int:
    parser = ArgumentParser(prog=PROG, description=__doc__.split("\n\n")[0])
    parser.add_argument("--manifest", required=True, help="manifest from data_prep.index")
    parser.add_argument("--out", required=True, help="output folder for the shards")
    parser.add_argument("--num-frames", type=int, default=16, help="frames per clip (default 16)")
    parser.add_argument("--image-size", type=int, default=128, help="stored square size (default 128)")
    parser.add_argument("--split", choices=("train", "val", "all"), default="train")
    parser.add_argument("--clips-per-video", type=int, default=1)
    parser.add_argument("--frame-stride", type=int, default=1)
    parser.add_argument("--target-fps", type=float, default=None, help="resample to this fps (overrides stride)")
    parser.add_argument("--shard-size", type=int, default=256, help="clips per shard (default 256)")
    parser.add_argument("--workers", type=int, default=None, help="decoding DataLoader workers (default: cores)")
    parser.add_argument("--overwrite", action="store_true", help="discard shards made with other settings")
    args = parser.parse_args(argv)
    for name in ("num_frames", "image_size", "clips_per_video", "frame_stride", "shard_size"):
        if getattr(args, name) < 1:
            raise UsageError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    quiet_decoders()
    from magvit.data import ClipDataset, collate_skip_none

    try:
        dataset = ClipDataset(args.manifest, args.split, num_frames=args.num_frames, image_size=args.image_size,
                              frame_stride=args.frame_stride, target_fps=args.target_fps, random_start=False,
                              random_crop=False, clips_per_video=args.clips_per_video, on_error="skip",
                              uint8_output=True)
    except (FileNotFoundError, ValueError) as err:
        raise UsageError(str(err)) from None
    if len(dataset) == 0:
        raise UsageError(f"no {args.split} videos with >= {args.num_frames} frames in {args.manifest}")
    out = Path(args.out)
    settings = {k: getattr(args, k) for k in ("num_frames", "image_size", "split", "clips_per_video",
                                              "frame_stride", "target_fps", "shard_size")}
    videos = [(r["path"], r["frames"], r.get("label")) for r in dataset.records]
    plan = {"settings": settings, "fingerprint": fingerprint({"settings": settings, "videos": videos})}
    open_out_dir(out, plan, args.overwrite)
    workers = (os.cpu_count() or 1) if args.workers is None else args.workers

    num_shards = -(-len(dataset) // args.shard_size)
    shards, made, kept, dropped = [], 0, 0, 0
    bar = progress(total=len(dataset), desc="extracting", unit="clip")
    for number in range(num_shards):
        path = out / shard_name(number)
        lo, hi = number * args.shard_size, min(len(dataset), (number + 1) * args.shard_size)
        if path.is_file():
            shards.append({"file": path.name, "num_examples": shard_rows(path)})
            kept += 1
            bar.update(hi - lo)
            continue
        loader = DataLoader(Subset(dataset, range(lo, hi)), batch_size=8, num_workers=workers,
                            collate_fn=collate_skip_none)
        frames, labels, index = [], [], []
        for step, batch in enumerate(loader):
            if batch is not None:
                frames.append(batch["video"])
                labels.append(batch["label"])
                index.append(batch["index"])
            bar.update(min(8, hi - lo - 8 * step))
        got = sum(len(f) for f in frames)
        dropped += (hi - lo) - got
        if got:  # a shard whose every clip failed is left out of meta.json (a rerun retries it)
            save_shard(path, {"frames": torch.cat(frames), "labels": torch.cat(labels).long(),
                              "clip_index": torch.cat(index).long()})
            shards.append({"file": path.name, "num_examples": got})
            made += 1
    bar.close()
    meta = {"format": "magvit-clips", "num_frames": args.num_frames, "size": [args.image_size, args.image_size],
            "classes": dataset.classes, "split": args.split, "manifest": str(Path(args.manifest).resolve()),
            "frame_stride": args.frame_stride, "target_fps": args.target_fps,
            "clips_per_video": args.clips_per_video, "num_examples": sum(s["num_examples"] for s in shards),
            "shards": shards}
    if shards:
        write_json(out / "meta.json", meta)
    for path, reason in dataset.skipped[:10]:
        print(f"skipped {path}: {reason}", file=sys.stderr)
    print(f"extracted {meta['num_examples']} clips of {args.num_frames}x{args.image_size}x{args.image_size} "
          f"into {len(shards)} shards ({made} written, {kept} already there) -> {out}; {dropped} failed to decode, "
          f"{len(dataset.skipped)} videos too short")
    return 0 if shards else 1


if __name__ == "__main__":
    sys.exit(run_main(PROG, main))
