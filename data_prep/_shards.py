"""Resumable shard folders: a plan fingerprint, atomic safetensors shards, ``meta.json`` written last."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any, Callable

import torch

from data_prep._cli import UsageError, write_json

PLAN_NAME = ".plan.json"


def shard_name(number: int) -> str:
    return f"shard-{number:05d}.safetensors"


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
    from magvit.fileio import check_writable_dir

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
    existing = sorted(out.glob("shard-*.safetensors"))
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

    from magvit.fileio import atomic_path

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


def write_shards(dataset, out: Path, shard_size: int, batch_size: int, workers: int, desc: str,
                 encode: Callable[[dict[str, Any]], dict[str, torch.Tensor]]) -> tuple[list[dict[str, Any]], int, int, int]:
    """Turn ``dataset`` into shards of ``shard_size`` examples under ``out``, skipping shards a previous run finished.

    ``encode(batch)`` maps a collated batch to the tensors to store (each with the batch in dim 0, ``labels``
    among them). A shard whose every clip failed to decode is left out (a rerun retries it).
    Returns ``(shards for meta.json, shards written, shards kept, clips dropped)``.
    """
    from torch.utils.data import DataLoader, Subset

    from data_prep._cli import progress
    from magvit.data import collate_skip_none

    shards, made, kept, dropped = [], 0, 0, 0
    bar = progress(total=len(dataset), desc=desc, unit="clip")
    for number in range(-(-len(dataset) // shard_size)):
        path = out / shard_name(number)
        lo, hi = number * shard_size, min(len(dataset), (number + 1) * shard_size)
        rows = shard_rows(path) if path.is_file() else None
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
            save_shard(path, {name: torch.cat(values) for name, values in parts.items()})
            shards.append({"file": path.name, "num_examples": got})
            made += 1
    bar.close()
    return shards, made, kept, dropped
