"""Tokenize a dataset with a trained tokenizer into token shards for transformer training.

    python -m data_prep.tokenize --tokenizer DIR --manifest manifest.jsonl --out DIR [--split train|val|all]
                                 [--batch-size 8] [--shard-size 256] [--format safetensors|webdataset]
                                 [--device cuda|cpu] [--rank R --world-size W] [--cond-frames 1,2,5]

Clips of the tokenizer's ``num_frames`` x ``image_size`` (center start and crop, deterministic) are encoded with
``VideoTokenizer.from_pretrained(DIR)``. Each ``shard-XXXXX.safetensors`` holds, per clip: ``codes`` (N, t, h, w),
``cond.<task>`` (N, t, h, w) for every pixel-space COMMIT task (``magvit.tasks.CONDITION_TASKS``, condition video
from ``build_condition_video``; frame prediction once per given-frame count of ``--cond-frames``:
``cond.frame_prediction`` for one frame, ``cond.frame_prediction.<n>`` for ``n``), ``sketch_codes`` (N, t, h, w)
from the sketch video (the manifest's ``sketch`` when every clip has one, else ``data_prep.sketch.sketch_video`` of
the clip), ``labels`` (N,) and ``clip_index`` (N,). ``meta.json`` (written last) holds the tokenizer config and
its weights' fingerprint (``tokenizer_weights``, ``magvit.pretrained.weights_fingerprint``), ``token_grid``,
``codebook_size``, ``classes``, ``condition_tasks``, ``num_examples`` and (``--cond-frames`` other than 1)
``cond_frames``. A ``hierarchy=2`` tokenizer's top grid goes beside each of them as ``top.codes``,
``top.cond.<condition>``, ``top.sketch_codes`` (N, t, h/2, w/2), and ``meta.json`` records its ``top_grid``
(``magvit.code_grids``). Codes are stored as int32. Rerunning resumes: finished shards are kept (each is written to
a temp file and renamed). Decoding runs in DataLoader workers, encoding on all torch threads of ``--device``
(default: the GPU when there is one). ``--format webdataset`` writes ``shard-XXXXX.tar`` streaming shards instead
(``magvit.streaming``; the same ``meta.json``). Several processes (``--rank R --world-size W``, or torchrun's /
SLURM's environment) split the work: rank ``r`` writes shards ``r, r + W, ...``, and the last rank to finish writes
``meta.json``; the shards are the ones a single process writes. A run holds a lock on ``--out`` (rank 0 of several),
so a second tokenize into the same folder at the same time refuses.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Sequence

import torch

from magvit import code_grids
from magvit.cli import ArgumentParser, UsageError, command_name, quiet_decoders, run_main
from magvit.conditions import build_condition_video
from magvit.distributed import share_cores
from magvit.runlog import RunLock
from magvit.shard_meta import META_NAME, TokenShardMeta
from magvit.tasks import CONDITION_TASKS, condition_name, task as task_row
from magvit.prep.shards import (FORMATS, check_out_dir, file_digest, finish_rank, fingerprint, num_shards,
                               open_out_dir_ranked, rank_from_env, write_shards)
from magvit.tokenizer import VideoTokenizer
from magvit.data import ClipDataset, read_manifest
from magvit.sketch import sketch_video
from magvit.pretrained import resolve_pretrained, weights_fingerprint

PROG = command_name("python -m data_prep.tokenize")


def load_tokenizer(directory: str, device: str):
    try:
        tokenizer = VideoTokenizer.from_pretrained(directory, device=device)
    except (FileNotFoundError, ValueError) as err:
        raise UsageError(str(err)) from None
    if tokenizer.config.continuous:  # token shards hold integer codes
        raise UsageError(f"{directory}: a {tokenizer.config.quantizer!r} tokenizer has continuous latents, not codes: "
                         f"token shards need a vq, lfq or fsq tokenizer")
    return tokenizer


@torch.inference_mode()
def encode_batch(tokenizer, video: torch.Tensor, tasks: Sequence[str], sketch: torch.Tensor | None,
                 device: str, cond_frames: Sequence[int] = (1,)) -> dict[str, torch.Tensor]:
    """Codes of a clip batch ``(B, 3, T, H, W)``, of its condition videos (frame prediction: one per given-frame
    count of ``cond_frames``) and of its sketch, as int32 ``(B, t, h, w)`` (two grids: each also its ``top.`` entry,
    ``code_grids.shard_entries``).

    All variants go through the encoder as one batch (one call instead of one per variant).
    """
    conditions = [(task, n) for task in tasks for n in (cond_frames if task_row(task).frames == "first" else (1,))]
    names = (["codes"] + [f"cond.{condition_name(task, n)}" for task, n in conditions]
             + (["sketch_codes"] if sketch is not None else []))
    variants = [video] + [build_condition_video(video, task, num_cond_frames=n) for task, n in conditions]
    if sketch is not None:
        variants.append(sketch)
    codes = tokenizer.encode(torch.cat(variants).to(device))  # (V * B, t, h, w); two grids: (top, bottom)
    parts = code_grids.split_codes(codes, len(video))
    return {key: grid.cpu().to(torch.int32) for name, part in zip(names, parts)
            for key, grid in code_grids.shard_entries(name, part).items()}


def build_parser() -> ArgumentParser:
    parser = ArgumentParser(prog=PROG, description=__doc__.split("\n\n")[0])
    parser.add_argument("--tokenizer", required=True, help="save_pretrained folder of a VideoTokenizer, or its Hub id")
    parser.add_argument("--manifest", required=True, help="manifest from data_prep.index")
    parser.add_argument("--out", required=True, help="output folder for the token shards")
    parser.add_argument("--split", choices=("train", "val", "all"), default="train")
    parser.add_argument("--batch-size", type=int, default=8, help="clips per encoder batch (default 8)")
    parser.add_argument("--shard-size", type=int, default=256, help="clips per shard (default 256)")
    parser.add_argument("--sketch", choices=("auto", "manifest", "compute", "none"), default="auto",
                        help="sketch source: the manifest's 'sketch' videos, computed edge maps, or no sketch codes "
                             "(default auto: the manifest's when every clip has one, else computed)")
    parser.add_argument("--no-conditions", action="store_true", help="skip the cond.<task> codes")
    parser.add_argument("--tasks", default=None, metavar="TASK[,TASK...]",
                        help="the pixel-condition tasks whose cond.<task> codes the shards carry (default: all of "
                             f"{', '.join(CONDITION_TASKS)}); each costs one more encoding per clip")
    parser.add_argument("--cond-frames", default="1", metavar="N[,N...]",
                        help="frame prediction: the given-frame counts whose condition codes the shards carry "
                             "(default 1; e.g. 1,2,5: training draws one of them per example)")
    parser.add_argument("--frame-stride", type=int, default=1)
    parser.add_argument("--workers", type=int, default=None, help="decoding DataLoader workers (default: 2)")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: the usable cores / this job's processes on this machine, or "
                        "OMP_NUM_THREADS)")
    parser.add_argument("--device", default=None, help="encoder device (default: cuda when available, else cpu)")
    parser.add_argument("--format", choices=FORMATS, default="safetensors",
                        help="shard format: safetensors (random access) or webdataset (tar shards for streaming)")
    parser.add_argument("--rank", type=int, default=None, help="this process's rank (default: $RANK, else 0)")
    parser.add_argument("--world-size", type=int, default=None,
                        help="processes sharing the work (default: $WORLD_SIZE, else 1)")
    parser.add_argument("--overwrite", action="store_true",
                        help="start over: remove the shards already in --out (also damaged ones or those of other "
                             "settings)")
    return parser


def check_args(args) -> None:
    """Refuse bad numbers, a missing manifest or an unusable ``--out`` before anything is loaded or encoded."""
    for name in ("batch_size", "shard_size", "frame_stride"):
        if getattr(args, name) < 1:
            raise UsageError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if args.workers is not None and args.workers < 0:
        raise UsageError(f"--workers must be >= 0, got {args.workers}")
    try:
        args.cond_frames = sorted({int(n) for n in args.cond_frames.split(",")})
    except ValueError:
        raise UsageError(f"--cond-frames must be comma-separated frame counts (e.g. 1,2,5), got "
                         f"{args.cond_frames!r}") from None
    if args.no_conditions and args.cond_frames != [1]:
        raise UsageError("--cond-frames: --no-conditions writes no condition codes")
    if args.tasks is not None:
        if args.no_conditions:
            raise UsageError("--tasks: --no-conditions writes no condition codes")
        args.tasks = [t for t in args.tasks.split(",") if t]
        unknown = [t for t in args.tasks if t not in CONDITION_TASKS]
        if unknown or not args.tasks:
            raise UsageError(f"--tasks: {unknown[0] + ' is not' if unknown else 'name at least'} one of "
                             f"{', '.join(CONDITION_TASKS)}")
    if not Path(args.manifest).is_file():
        raise UsageError(f"manifest not found: {args.manifest}")
    check_out_dir(Path(args.out))


def lock_out_dir(out: Path):
    """An exclusive lock on ``--out`` for this run's life (``magvit.runlog.RunLock``), so that a second tokenize
    into the same folder refuses instead of mixing its shards (or its plan) with this one's. Rank 0 holds it for a
    multi-process run: the other ranks share the folder and follow rank 0's plan."""
    lock = RunLock(out, option="--out", holder="tokenize run")
    problem = lock.acquire()
    if problem is not None:
        raise UsageError(problem)
    return lock


def pick_device(device: str | None, rank: int, world: int) -> str:
    """``--device``, by default the GPU when there is one; with several ranks on a node, this rank's GPU."""
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and ":" not in device and world > 1 and torch.cuda.device_count() > 1:
        device = f"cuda:{int(os.environ.get('LOCAL_RANK', rank)) % torch.cuda.device_count()}"
    return device


def open_clips(args, config) -> tuple:
    """The manifest's clips of ``--split`` at the tokenizer's size and the sketch source they use:
    ``(ClipDataset, sketch_mode)`` with ``sketch_mode`` ``"manifest"``, ``"compute"`` or ``"none"``."""
    try:
        records = read_manifest(args.manifest)
    except (OSError, ValueError) as err:
        raise UsageError(str(err)) from None
    in_split = [r for r in records if args.split == "all" or r.get("split") == args.split]
    sketch_mode = args.sketch
    if sketch_mode == "auto":
        sketch_mode = "manifest" if in_split and all(r.get("sketch") for r in in_split) else "compute"
    if sketch_mode == "manifest" and not all(r.get("sketch") for r in in_split):
        raise UsageError("--sketch manifest: some videos have no 'sketch' (run python -m data_prep.sketch first)")
    try:
        dataset = ClipDataset(records, args.split, num_frames=config.num_frames, image_size=config.image_size,
                              frame_stride=args.frame_stride, random_start=False, random_crop=False, on_error="skip",
                              with_sketch=sketch_mode == "manifest")
    except ValueError as err:  # e.g. no file of the manifest exists, or labels of mixed kinds
        raise UsageError(f"{args.manifest}: {err}") from None
    if len(dataset) == 0:
        raise UsageError(f"no {args.split} videos with enough frames ({config.num_frames} x stride "
                         f"{args.frame_stride}) in {args.manifest}")
    return dataset, sketch_mode


def shard_plan(args, config, dataset, sketch_mode: str, tasks: Sequence[str]) -> dict:
    """Settings and fingerprint of this run: a rerun with the same ones resumes, others need ``--overwrite``."""
    settings = {"split": args.split, "shard_size": args.shard_size, "sketch": sketch_mode, "tasks": tasks,
                **({"format": args.format} if args.format != "safetensors" else {}),
                **({"cond_frames": args.cond_frames} if args.cond_frames != [1] else {}),
                "frame_stride": args.frame_stride, "tokenizer_config": config.to_dict(),
                "tokenizer_weights": file_digest(Path(args.tokenizer) / "model.safetensors")}
    videos = [(r["path"], r["frames"], r.get("label"), r.get("sketch")) for r in dataset.records]
    return {"settings": settings, "fingerprint": fingerprint({"s": settings, "v": videos})}


def make_encoder(tokenizer, tasks: Sequence[str], sketch_mode: str, device: str, cond_frames: Sequence[int] = (1,)):
    """``batch -> tensors of the shard``: codes, condition codes, sketch codes, labels and clip indices."""

    def encode(batch: dict) -> dict[str, torch.Tensor]:
        video = batch["video"]  # (B, 3, T, H, W) in [-1, 1]
        sketch = None
        if sketch_mode == "manifest":
            sketch = batch["sketch"]
        elif sketch_mode == "compute":
            sketch = sketch_video(video)
        return {**encode_batch(tokenizer, video, tasks, sketch, device, cond_frames), "labels": batch["label"].long(),
                "clip_index": batch["index"].long()}

    return encode


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    check_args(args)
    rank, world = rank_from_env(args.rank, args.world_size)
    lock = lock_out_dir(Path(args.out)) if rank == 0 else None
    try:
        return run(args, rank, world)
    finally:
        if lock is not None:
            lock.release()


def run(args, rank: int, world: int) -> int:
    """Tokenize as the checked command line ``args`` says, as rank ``rank`` of ``world`` processes."""
    args.device = pick_device(args.device, rank, world)
    quiet_decoders()
    if args.threads:
        torch.set_num_threads(args.threads)
    else:  # ranks of one job on one machine share its cores (one process: all of them)
        share_cores()

    try:  # a Hub id (org/name) becomes its snapshot folder in the Hub cache; the digest below reads its weights
        args.tokenizer = str(resolve_pretrained(args.tokenizer))
    except (FileNotFoundError, ValueError) as err:
        raise UsageError(str(err)) from None
    tokenizer = load_tokenizer(args.tokenizer, args.device)
    config = tokenizer.config
    num_frames, size = config.num_frames, config.image_size
    grid = config.token_grid(num_frames, size, size)
    tasks = [] if args.no_conditions else [t for t in CONDITION_TASKS if args.tasks is None or t in args.tasks]
    if not all(1 <= n < num_frames for n in args.cond_frames):
        raise UsageError(f"--cond-frames: every count must be in [1, {num_frames}) (the tokenizer's clips have "
                         f"{num_frames} frames), got {','.join(map(str, args.cond_frames))}")
    dataset, sketch_mode = open_clips(args, config)

    out = Path(args.out)
    plan = shard_plan(args, config, dataset, sketch_mode, tasks)
    open_out_dir_ranked(out, plan, args.overwrite, rank, world)
    workers = 2 if args.workers is None else args.workers

    numbers = range(rank, num_shards(len(dataset), args.shard_size), world)
    mine, made, kept, dropped = write_shards(dataset, out, args.shard_size, args.batch_size, workers,
                                             "tokenizing" if world == 1 else f"tokenizing (rank {rank}/{world})",
                                             make_encoder(tokenizer, tasks, sketch_mode, args.device,
                                                          args.cond_frames),
                                             format=args.format, numbers=numbers)
    shards = finish_rank(out, plan["fingerprint"], rank, world, mine)
    meta = {"format": "magvit-tokens", "tokenizer": config.to_dict(),
            "tokenizer_dir": str(Path(args.tokenizer).resolve()),
            "tokenizer_weights": weights_fingerprint(args.tokenizer),  # evaluate --tokens compares it
            "token_grid": list(grid),
            **({"top_grid": list(config.top_grid(num_frames, size, size))} if config.hierarchy == 2 else {}),
            "codebook_size": config.codebook_size, "classes": dataset.classes, "condition_tasks": tasks,
            **({"cond_frames": args.cond_frames} if args.cond_frames != [1] else {}),
            "has_sketch": sketch_mode != "none", "sketch_source": sketch_mode, "num_frames": num_frames,
            "image_size": size, "frame_stride": args.frame_stride, "split": args.split,
            "manifest": str(Path(args.manifest).resolve()), "storage": args.format,
            "videos": [str(Path(r["path"]).resolve()) for r in dataset.records],  # clip_index -> its video
            "num_examples": sum(s["num_examples"] for s in shards or mine), "shards": shards or mine}
    if shards:
        TokenShardMeta.from_dict(meta, str(out / META_NAME)).write(out)  # the schema checks what it writes
    elif world > 1:
        print(f"rank {rank}: wrote its shards; meta.json follows when all {world} ranks have finished",
              file=sys.stderr)
        return 0 if mine else 1
    for path_, reason in dataset.skipped[:10]:
        print(f"skipped {path_}: {reason}", file=sys.stderr)
    print(f"tokenized {meta['num_examples']} clips ({num_frames}x{size}x{size} -> tokens {tuple(grid)}; "
          f"{len(tasks)} condition tasks; sketch: {sketch_mode}; {len(dataset.classes)} classes) into {len(shards)} "
          f"shards ({made} written, {kept} already there) -> {out}; {dropped} failed to decode, "
          f"{len(dataset.skipped)} videos too short")
    return 0 if shards else 1


def cli() -> int:
    """Console entry point."""
    return run_main(PROG, main, interrupted="interrupted (finished outputs are kept; rerun to resume)")


if __name__ == "__main__":
    sys.exit(cli())
