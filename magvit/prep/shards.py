"""Resumable shard folders: a plan fingerprint, atomic safetensors shards, ``meta.json`` written last."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any, Callable

import torch

from magvit.cli import UsageError, write_json
from magvit.fileio import atomic_path, check_writable_dir
from magvit.streaming import encode_sample, tar_rows, write_tar_shard
from magvit.data import collate_skip_none
from magvit.progress import progress

PLAN_NAME = ".plan.json"


FORMATS = ("safetensors", "webdataset")  # random-access safetensors shards, or streaming tar shards
SUFFIX = {"safetensors": ".safetensors", "webdataset": ".tar"}


def shard_name(number: int, format: str = "safetensors") -> str:
    return f"shard-{number:05d}{SUFFIX[format]}"


def num_shards(examples: int, shard_size: int) -> int:
    return -(-examples // shard_size)


def fingerprint(data: Any) -> str:
    """SHA-1 of a JSON-able value (sorted keys): equal plans give equal fingerprints on every machine."""
    return hashlib.sha1(json.dumps(data, sort_keys=True, default=str).encode("utf-8")).hexdigest()


def file_digest(path: str | os.PathLike) -> str:
    digest = hashlib.sha1()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def check_out_dir(out: Path) -> None:
    """``UsageError`` unless ``out`` is (or can be made) a writable folder: checked before any work is done."""

    try:
        check_writable_dir(out)
    except ValueError as err:
        raise UsageError(f"--out: {err}") from None


def _read_plan(plan_path: Path) -> dict[str, Any] | None:
    try:
        plan = json.loads(plan_path.read_text())
    except (OSError, ValueError):  # damaged: the shards beside it are of unknown origin
        return None
    return plan if isinstance(plan, dict) else None


def open_out_dir(out: Path, plan: dict[str, Any], overwrite: bool) -> None:
    """Create ``out`` or check that its earlier, possibly interrupted, run had the same plan (then resume).

    ``overwrite`` starts over: every shard and ``meta.json`` in ``out`` is removed, whatever made them.
    """
    check_out_dir(out)
    plan_path = out / PLAN_NAME
    existing = sorted(p for suffix in SUFFIX.values() for p in out.glob(f"shard-*{suffix}"))
    old = _read_plan(plan_path) if plan_path.is_file() else None
    if existing and not overwrite:
        if old is None:
            raise UsageError(f"{out} holds shards of unknown origin; use another --out or --overwrite")
        if old.get("fingerprint") != plan["fingerprint"]:
            raise UsageError(f"{out} holds shards made with other inputs or settings; use another --out "
                             "or --overwrite")
    if overwrite or old is None or old.get("fingerprint") != plan["fingerprint"]:
        for path in existing + [out / "meta.json"]:
            path.unlink(missing_ok=True)
    write_json(plan_path, plan)


def save_shard(path: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None) -> None:
    """Write one shard atomically: a rerun never sees half a shard under its final name."""
    from safetensors.torch import save_file


    with atomic_path(path) as tmp:  # save_file alone writes 0600
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp), metadata=metadata)


def shard_rows(path: Path) -> int | None:
    """Examples in a finished shard (from its header, nothing else is read); ``None`` for a damaged shard (a
    truncated or overwritten file, a header without ``codes``/``frames``): the caller writes it again."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), "pt") as f:  # checks that the file holds every byte its header announces
            key = next((k for k in ("codes", "frames") if k in f.keys()), None)
            if key is None:
                return None
            rows = {int(f.get_slice(k).get_shape()[0]) for k in f.keys()}
            return rows.pop() if len(rows) == 1 else None
    except (SafetensorError, OSError):
        return None


def save_tar_shard(path: Path, tensors: dict[str, torch.Tensor]) -> None:
    """Write one webdataset shard atomically: one sample per row, keyed by its ``clip_index``, labelled by
    ``labels`` (see ``magvit.streaming``)."""
    rows = {k: v for k, v in tensors.items() if k not in ("labels", "clip_index")}
    write_tar_shard(path, [encode_sample(int(tensors["clip_index"][i]), {k: v[i] for k, v in rows.items()},
                                         int(tensors["labels"][i])) for i in range(len(tensors["labels"]))])


def write_shards(dataset, out: Path, shard_size: int, batch_size: int, workers: int, desc: str,
                 encode: Callable[[dict[str, Any]], dict[str, torch.Tensor]], format: str = "safetensors",
                 numbers: range | None = None) -> tuple[list[dict[str, Any]], int, int, int]:
    """Turn ``dataset`` into shards of ``shard_size`` examples under ``out``, skipping shards a previous run finished.

    ``encode(batch)`` maps a collated batch to the tensors to store (each with the batch in dim 0, ``labels`` and
    ``clip_index`` among them). A shard whose every clip failed to decode is left out (a rerun retries it).
    ``format``: ``safetensors`` (random access) or ``webdataset`` (tar shards for streaming). ``numbers``: the shard
    numbers to write (default all; one rank of a multi-process run passes ``range(rank, n, world_size)``).
    Returns ``(shards for meta.json, shards written, shards kept, clips dropped)``.
    """
    from torch.utils.data import DataLoader, Subset



    count_rows, save = (shard_rows, save_shard) if format == "safetensors" else (tar_rows, save_tar_shard)
    numbers = range(num_shards(len(dataset), shard_size)) if numbers is None else numbers
    shards, made, kept, dropped = [], 0, 0, 0
    bar = progress(total=sum(min(len(dataset), (n + 1) * shard_size) - n * shard_size for n in numbers), desc=desc,
                   unit="clip")
    for number in numbers:
        path = out / shard_name(number, format)
        lo, hi = number * shard_size, min(len(dataset), (number + 1) * shard_size)
        rows = count_rows(path) if path.is_file() else None
        if rows is not None:
            shards.append({"file": path.name, "num_examples": rows})
            kept += 1
            bar.update(hi - lo)
            continue
        path.unlink(missing_ok=True)  # damaged by a crash or a full disk: written again below
        loader = DataLoader(Subset(dataset, range(lo, hi)), batch_size=batch_size, num_workers=workers,
                            collate_fn=collate_skip_none)
        parts: dict[str, list[torch.Tensor]] = {}
        for step, batch in enumerate(loader):
            bar.update(min(batch_size, hi - lo - step * batch_size))
            if batch is not None:
                for name, value in encode(batch).items():
                    parts.setdefault(name, []).append(value)
        got = sum(len(labels) for labels in parts.get("labels", []))
        dropped += (hi - lo) - got
        if got:
            save(path, {name: torch.cat(values) for name, values in parts.items()})
            shards.append({"file": path.name, "num_examples": got})
            made += 1
    bar.close()
    return shards, made, kept, dropped


# --------------------------------------------------------------------------------------------------------------------
# Several processes writing disjoint shards of one folder (rank r writes shards r, r + W, ...)
# --------------------------------------------------------------------------------------------------------------------
def rank_from_env(rank: int | None, world_size: int | None) -> tuple[int, int]:
    """``(rank, world_size)`` from the arguments, else torchrun's / SLURM's environment, else ``(0, 1)``."""
    env = os.environ
    world = world_size if world_size is not None else int(env.get("WORLD_SIZE", env.get("SLURM_NTASKS", 1)))
    rank = rank if rank is not None else int(env.get("RANK", env.get("SLURM_PROCID", 0)))
    if world < 1 or not 0 <= rank < world:
        raise UsageError(f"--rank must be in [0, --world-size), got rank {rank} of {world}")
    return rank, world


def open_out_dir_ranked(out: Path, plan: dict[str, Any], overwrite: bool, rank: int, world: int,
                        timeout_s: float = 1800.0) -> None:
    """Rank 0 prepares ``out`` (:func:`open_out_dir`); the others wait until its plan is the same as theirs, so no
    rank removes what another already wrote. ``--overwrite`` needs a single process (it removes every shard)."""
    import time

    if world > 1 and overwrite:
        raise UsageError("--overwrite removes every shard of --out: run it as one process (no --world-size)")
    if rank == 0:
        open_out_dir(out, plan, overwrite)
        (out / f".done-0-of-{world}.json").unlink(missing_ok=True)
        return
    check_out_dir(out)
    (out / f".done-{rank}-of-{world}.json").unlink(missing_ok=True)
    deadline = time.monotonic() + timeout_s
    while (_read_plan(out / PLAN_NAME) or {}).get("fingerprint") != plan["fingerprint"]:
        if time.monotonic() > deadline:
            raise UsageError(f"rank {rank}: rank 0 did not prepare {out} within {timeout_s:.0f} s (same inputs and "
                             "settings on every rank?)")
        time.sleep(0.5)


def finish_rank(out: Path, fingerprint_: str, rank: int, world: int,
                shards: list[dict[str, Any]]) -> list[dict[str, Any]] | None:
    """Record this rank's shards; return every rank's (in shard order) once all ``world`` ranks have recorded
    theirs with this plan, else ``None`` (a later rank writes ``meta.json``)."""
    if world == 1:
        return shards
    write_json(out / f".done-{rank}-of-{world}.json", {"fingerprint": fingerprint_, "shards": shards})
    merged = []
    for other in range(world):
        record = _read_plan(out / f".done-{other}-of-{world}.json")
        if record is None or record.get("fingerprint") != fingerprint_:
            return None
        merged.extend(record["shards"])
    return sorted(merged, key=lambda s: s["file"])
