"""What ``python -m magvit.evaluate`` reads: ``--data`` resolved to a manifest or token shards, held-out clips in
batches (unreadable ones counted, never fatal), token shards checked against the models (and against the evaluated
clips: are the scores held-out?), and the tasks the data can score."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Iterator, Sequence

import torch
from torch.utils.data import DataLoader, Subset
from tqdm.auto import tqdm

from .. import tasks
from ..cli import UsageError
from ..data import ClipDataset, TokenShardDataset, collate_skip_none, read_manifest
from ..prep.index import build_manifest
from ..shard_meta import META_NAME, TokenShardMeta, read_meta_json

MANIFEST_NAME = "manifest.jsonl"


def resolve_data(path: str | os.PathLike, scratch: Path) -> tuple[str, Path]:
    """Classify ``--data``: ``("manifest", file)`` or ``("tokens", folder)``.

    Accepts a manifest file, a folder holding ``manifest.jsonl``, a folder of token shards (``meta.json``), or a
    folder of videos (indexed into ``scratch/clips_manifest.jsonl`` with every video in the ``val`` split).
    """
    path = Path(path)
    if path.is_file():
        return "manifest", path
    if not path.is_dir():
        raise UsageError(f"--data: no such file or folder: {path}")
    if (path / MANIFEST_NAME).is_file():
        return "manifest", path / MANIFEST_NAME
    meta = path / META_NAME
    if meta.is_file():
        try:
            is_tokens = "token_grid" in read_meta_json(path)
        except ValueError as err:
            raise UsageError(f"--data: {err}") from None
        if is_tokens:
            return "tokens", path
        raise UsageError(f"--data: {path} holds clip shards; give the manifest they were extracted from")
    # A plain folder of videos: index it (all clips held out, since nothing here was trained on them).
    out = scratch / "clips_manifest.jsonl"  # beside the report, never over a manifest of the user's
    try:
        summary = build_manifest([path], out, val_fraction=0.0, labels=False, show_progress=False)
    except UsageError as err:
        raise UsageError(f"--data: {err}") from None
    if not summary["videos"]:
        raise UsageError(f"--data: no readable video in {path}")
    records = [json.loads(line) for line in out.read_text().splitlines() if line.strip()]
    out.write_text("".join(json.dumps({**r, "split": "val"}) + "\n" for r in records))
    return "manifest", out


def open_clips(manifest: Path, split: str, num_frames: int, image_size: int):
    """The ``split`` clips of the manifest as a ``ClipDataset`` (centred crops, evenly spaced starts, unreadable
    files skipped); ``UsageError`` when there is none."""
    try:
        dataset = ClipDataset(manifest, split=split, num_frames=num_frames, image_size=image_size, on_error="skip")
    except (FileNotFoundError, ValueError) as err:
        raise UsageError(f"--data: {err}") from None
    if len(dataset) == 0:
        raise UsageError(f"--data: no usable '{split}' clip of {num_frames} frames in {manifest}"
                         + (" (try --split all)" if split != "all" else ""))
    return dataset


def evaluated_videos(clips, max_clips: int | None) -> list[str]:
    """Resolved paths of the videos whose clips :func:`iterate_clips` evaluates (one clip per video)."""
    return [str(Path(r["path"]).resolve()) for r in clips.records[:max_clips]]


def iterate_clips(clips, max_clips: int | None, batch_size: int, progress: bool,
                  lost: dict[str, list] | None = None) -> Iterator[torch.Tensor]:
    """The clips of :func:`open_clips` in batches ``(B, 3, T, H, W)`` in [-1, 1], at most ``max_clips``.

    Unreadable files are skipped and listed in ``lost``: ``"unreadable"`` gets ``(path, reason)`` of each clip that
    failed to decode (a damaged file, or one shorter than the manifest says), ``"skipped"`` each video left out
    before decoding (missing, too short).
    """


    lost = {} if lost is None else lost
    lost.setdefault("skipped", []).extend({"path": path, "reason": reason} for path, reason in clips.skipped)
    dataset = clips if max_clips is None else Subset(clips, range(min(max_clips, len(clips))))
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=False, collate_fn=collate_skip_none)  # in-process

    with tqdm(total=len(dataset), desc="clips", unit="clip", disable=not progress, file=sys.stderr,
              dynamic_ncols=True) as bar:
        for batch in loader:
            if batch is not None:
                bar.update(batch["video"].shape[0])
                yield batch["video"]
    lost.setdefault("unreadable", []).extend(
        {"path": path, "clips": count, "reason": clips.failure_reasons.get(path, "")}
        for path, count in sorted(clips.failures.items()))


def tokenized_videos(meta: TokenShardMeta) -> set[str] | None:
    """Resolved paths of the videos whose clips token shards hold: their ``meta.json``'s ``videos`` (written by
    ``data_prep.tokenize``), else the ``split`` of the ``manifest`` it names (older shards); ``None`` when neither
    tells."""
    if meta.videos is not None:
        return {str(Path(p).resolve()) for p in meta.videos}
    if not meta.manifest or meta.split not in ("train", "val", "all"):
        return None
    try:
        return {str(Path(r["path"]).resolve()) for r in read_manifest(meta.manifest, meta.split)}
    except (OSError, ValueError):  # the manifest moved or changed since: no way to tell
        return None


def held_out_warnings(directory: Path, evaluated: Sequence[str] | None) -> list[str]:
    """Why scores may not be held-out, one line each: the token shards in ``directory`` hold clips of the
    ``evaluated`` videos (resolved paths; ``None``: no clips are evaluated), or come from a manifest's ``train``
    (or ``all``) split, which a transformer trained on these shards has seen."""
    try:
        meta = TokenShardMeta.read(directory)
    except (OSError, ValueError):
        return []  # check_token_meta reports a missing or broken meta.json
    warnings = []
    tokenized = tokenized_videos(meta)
    if evaluated and tokenized:
        shared = [v for v in evaluated if v in tokenized]
        if shared:
            warnings.append(f"the token shards {directory} hold {len(shared)} of the {len(evaluated)} evaluated clips "
                            f"(e.g. {shared[0]}): a transformer trained on them has seen these clips, so its scores "
                            f"on them are not held-out")
    if meta.split in ("train", "all"):
        warnings.append(f"the token shards {directory} were tokenized from the '{meta.split}' split of "
                        f"{meta.manifest or 'their manifest'}: their masked-token NLL is not held-out for a "
                        f"transformer trained on that split")
    return warnings


def check_token_meta(directory: Path, tokenizer, transformer) -> TokenShardMeta:
    """The shards' ``meta.json``; ``UsageError`` unless it says they hold codes of this tokenizer / transformer's
    codebook and grid (and top grid, two code grids; ``TokenShardMeta.fit_problem``): codes of another codebook
    score a meaningless NLL without any other sign."""
    try:
        meta = TokenShardMeta.read(directory)
    except (OSError, ValueError) as err:
        raise UsageError(f"--tokens: {directory}/meta.json is missing or lacks codebook_size / token_grid "
                         f"({type(err).__name__})") from None
    if tokenizer is not None:
        tc = tokenizer.config
        made_by, current = meta.tokenizer, tc.to_dict()
        differ = [k for k in made_by if k in current and made_by[k] != current[k]] if made_by is not None else []
        if differ:  # keys only one side has: options added in another version, not a different tokenizer
            raise UsageError(f"--tokens: {directory} was made by another tokenizer than --tokenizer ({differ[0]} "
                             f"{made_by[differ[0]]!r} in meta.json, {current[differ[0]]!r} in the tokenizer)")
        grid = tc.token_grid(tc.num_frames, tc.image_size, tc.image_size)
        top = tc.top_grid(tc.num_frames, tc.image_size, tc.image_size) if tc.hierarchy == 2 else None
        problem = meta.fit_problem(tc.codebook_size, grid, top, "the tokenizer")
        if problem:
            raise UsageError(f"--tokens: {directory} holds {problem} (meta.json)")
    xc = transformer.config
    problem = meta.fit_problem(xc.codebook_size, xc.token_grid, xc.top_grid, "the transformer")
    if problem:
        raise UsageError(f"--tokens: {directory} holds {problem} (meta.json)")
    return meta


def check_tokenizer_weights(directory: Path, meta: TokenShardMeta, fingerprint: str) -> list[str]:
    """``UsageError`` when the shards' ``meta.json`` records other tokenizer weights than ``fingerprint``
    (``magvit.pretrained.weights_fingerprint`` of ``--tokenizer``): a tokenizer of the same config with other weights
    has other codes. Shards older than the record pass with the one-line warning returned."""
    recorded = meta.tokenizer_weights
    if recorded is None:
        return [f"the token shards {directory} do not record their tokenizer's weights (made before tokenize "
                f"recorded them): they are assumed to come from --tokenizer"]
    if recorded != fingerprint:
        raise UsageError(f"--tokens: {directory} was made by a tokenizer with other weights than --tokenizer "
                         f"({str(recorded)[:20]}... in meta.json, {fingerprint[:20]}... in the tokenizer): "
                         "tokenize the clips again with this tokenizer")
    return []


def token_batches_from_shards(directory: Path, batch_size: int, max_examples: int | None) -> Iterator[dict]:


    try:
        dataset = TokenShardDataset(directory)
    except (FileNotFoundError, ValueError, KeyError) as err:
        raise UsageError(f"token shards at {directory}: {err}") from None
    if max_examples is not None:
        dataset = Subset(dataset, range(min(max_examples, len(dataset))))
    yield from DataLoader(dataset, batch_size=batch_size, shuffle=False)


def supported_tasks(requested: Sequence[str], available: Sequence[str]) -> list[str]:
    """The requested tasks the data can score: a task with a prefix needs its condition codes in the data
    (``available``: the names of the tasks whose shard key the data holds); ``class`` is scored on the labelled
    examples only."""
    keep = [name for name in requested if not tasks.task(name).has_condition_codes or name in available]
    if not keep:
        raise UsageError(f"--nll-tasks: none of {', '.join(requested)} can be evaluated on this data "
                         f"(condition tasks available: {', '.join(available) or 'none'})")
    return keep


def shard_tasks(batch: dict) -> list[str]:
    """The tasks whose condition codes a batch of token shards holds (``cond.<task>`` of any given-frame count,
    ``sketch_codes``)."""
    return [row.name for row in tasks.TASKS if row.shard_key is not None and tasks.carries(batch, row)]
