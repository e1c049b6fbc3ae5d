"""Pre-extract clips into compact uint8 shards, so training never decodes video on the hot path.

    python -m data_prep.extract --manifest M --out DIR --num-frames 16 --image-size 128 [--split train]
                                [--format safetensors|webdataset]

Each video gives ``--clips-per-video`` evenly spaced clips, short-side resized to ``--image-size`` and center
cropped, stored as ``frames`` uint8 ``(N, T, H, W, 3)`` plus ``labels`` ``(N,)`` in ``shard-XXXXX.safetensors``,
with ``meta.json`` written last (read by ``magvit.data.ClipShardDataset``, which can crop smaller and flip; a
tokenizer run trains on them with ``data.format=safetensors data.shards=DIR``). Store a larger ``--image-size`` than
the training size to keep random-crop augmentation. Rerunning resumes: finished shards are kept. Videos that fail to
decode are left out and reported. ``--format webdataset`` writes ``shard-XXXXX.tar`` streaming shards instead
(``magvit.streaming.ShardStream``, ``data.format=webdataset``; the same ``meta.json``).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Sequence


from magvit.cli import ArgumentParser, UsageError, command_name, quiet_decoders, run_main, write_json
from magvit.prep.shards import FORMATS, check_out_dir, fingerprint, open_out_dir, write_shards
from magvit.data import ClipDataset

PROG = command_name("python -m data_prep.extract")


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
    parser.add_argument("--format", choices=FORMATS, default="safetensors",
                        help="shard format: safetensors (random access) or webdataset (tar shards for streaming)")
    parser.add_argument("--overwrite", action="store_true", help="start over: remove the shards already in --out (also damaged ones or those of other settings)")
    args = parser.parse_args(argv)
    for name in ("num_frames", "image_size", "clips_per_video", "frame_stride", "shard_size"):
        if getattr(args, name) < 1:
            raise UsageError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    check_out_dir(Path(args.out))
    quiet_decoders()

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
    if args.format != "safetensors":  # folders written before the option keep their fingerprint
        settings["format"] = args.format
    videos = [(r["path"], r["frames"], r.get("label")) for r in dataset.records]
    plan = {"settings": settings, "fingerprint": fingerprint({"settings": settings, "videos": videos})}
    open_out_dir(out, plan, args.overwrite)
    workers = (os.cpu_count() or 1) if args.workers is None else args.workers

    shards, made, kept, dropped = write_shards(
        dataset, out, args.shard_size, batch_size=8, workers=workers, desc="extracting",
        encode=lambda batch: {"frames": batch["video"], "labels": batch["label"].long(),
                              "clip_index": batch["index"].long()}, format=args.format)
    meta = {"format": "magvit-clips", "num_frames": args.num_frames, "size": [args.image_size, args.image_size],
            "classes": dataset.classes, "split": args.split, "manifest": str(Path(args.manifest).resolve()),
            "frame_stride": args.frame_stride, "target_fps": args.target_fps,
            "clips_per_video": args.clips_per_video, "storage": args.format, "num_examples": sum(s["num_examples"] for s in shards),
            "shards": shards}
    if shards:
        write_json(out / "meta.json", meta)
    for path, reason in dataset.skipped[:10]:
        print(f"skipped {path}: {reason}", file=sys.stderr)
    print(f"extracted {meta['num_examples']} clips of {args.num_frames}x{args.image_size}x{args.image_size} "
          f"into {len(shards)} shards ({made} written, {kept} already there) -> {out}; {dropped} failed to decode, "
          f"{len(dataset.skipped)} videos too short")
    return 0 if shards else 1


def cli() -> int:
    """Console entry point."""
    return run_main(PROG, main, interrupted="interrupted (finished outputs are kept; rerun to resume)")


if __name__ == "__main__":
    sys.exit(cli())
