"""The one schema of a shard folder's ``meta.json``: read here and nowhere else, written here, validated once.

Token shards (``data_prep.tokenize``) are described by :class:`TokenShardMeta`; callers ask it questions (what sizes
the shards fix for a model, which tasks' condition codes they carry, the latent condition regions of their clips,
whether they fit a prior) instead of parsing the dict. Clip shards (``data_prep.extract``) have a plainer
``meta.json`` that :func:`read_meta_json` returns as a dict. Either may sit in a local folder or at an fsspec URL
(webdataset shards).

Old token shards load: a key added later (``top_grid``, ``cond_frames``, ``has_sketch``, ``tokenizer_weights``) has
the value that shards without it meant.
"""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path
from typing import Any, Mapping, Sequence

import torch

from . import tasks as _tasks
from .cli import write_json
from .conditions import latent_condition_regions

META_NAME = "meta.json"


def meta_location(location: str | os.PathLike) -> str:
    """The ``meta.json`` of a shard folder (a path or an fsspec URL)."""
    return f"{str(location).rstrip('/')}/{META_NAME}"


def read_meta_json(location: str | os.PathLike) -> dict[str, Any]:
    """The ``meta.json`` of the shard folder ``location`` (a local folder or an fsspec URL) as a dict: the one
    parser of the file. ``FileNotFoundError`` when it is missing; ``ValueError`` naming it when it is not a JSON
    object."""
    url = meta_location(location)
    try:
        if "://" in url and not url.startswith("file://"):
            import fsspec  # an optional remote filesystem: only a URL needs it

            with fsspec.open(url, "r") as f:
                text = f.read()
        else:
            text = Path(url[len("file://"):] if url.startswith("file://") else url).read_text()
        meta = json.loads(text)
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as err:
        raise ValueError(f"{url}: not valid JSON ({type(err).__name__}: {str(err)[:200]})") from None
    if not isinstance(meta, dict):
        raise ValueError(f"{url}: not a shard meta.json (a JSON object)")
    return meta


def _grid(value: Any) -> tuple[int, int, int]:
    grid = tuple(int(n) for n in value)
    if len(grid) != 3 or min(grid) < 1:
        raise ValueError(f"a token grid is 3 positive numbers, got {list(value)}")
    return grid  # type: ignore[return-value]


@dataclasses.dataclass(frozen=True)
class TokenShardMeta:
    """What token shards' ``meta.json`` holds (``data_prep.tokenize`` writes it; see ``magvit.data``'s docstring).

    ``shards``: ``({"file", "num_examples"}, ...)`` in order; ``cond_frames``: frame prediction's given-frame counts
    whose condition codes they hold (see :meth:`frame_counts`); ``has_sketch``: None for shards older than the key
    (then whether they hold sketch codes is not known here). Keys this class does not name are kept in ``extra``
    and written back unchanged."""

    token_grid: tuple[int, int, int]
    codebook_size: int
    shards: tuple[dict[str, Any], ...] = ()
    classes: tuple[str, ...] = ()
    condition_tasks: tuple[str, ...] = ()
    cond_frames: tuple[int, ...] | None = None
    has_sketch: bool | None = None
    top_grid: tuple[int, int, int] | None = None
    num_frames: int | None = None
    image_size: int | None = None
    tokenizer: dict[str, Any] | None = None  # the tokenizer's config
    tokenizer_dir: str | None = None
    tokenizer_weights: str | None = None  # pretrained.weights_fingerprint of the tokenizer
    split: str | None = None  # the manifest split the clips came from
    manifest: str | None = None
    videos: tuple[str, ...] | None = None  # clip_index -> its video (older shards: None)
    num_examples: int = 0
    extra: dict[str, Any] = dataclasses.field(default_factory=dict)

    # --- reading and writing ---------------------------------------------------------------------------------------
    @classmethod
    def from_dict(cls, meta: Mapping[str, Any], where: str = META_NAME) -> TokenShardMeta:
        """Validate a parsed ``meta.json`` (``where`` names it in the ``ValueError``)."""
        names = {f.name for f in dataclasses.fields(cls)} - {"extra"}
        try:
            shards = tuple({**s, "file": str(s["file"]), "num_examples": int(s["num_examples"])}
                           for s in meta.get("shards") or [])
            return cls(token_grid=_grid(meta["token_grid"]), codebook_size=int(meta["codebook_size"]), shards=shards,
                       classes=tuple(str(c) for c in meta.get("classes") or []),
                       condition_tasks=tuple(str(t) for t in meta.get("condition_tasks") or []),
                       cond_frames=tuple(int(n) for n in meta["cond_frames"]) if "cond_frames" in meta else None,
                       has_sketch=bool(meta["has_sketch"]) if meta.get("has_sketch") is not None else None,
                       top_grid=_grid(meta["top_grid"]) if meta.get("top_grid") else None,
                       num_frames=int(meta["num_frames"]) if meta.get("num_frames") is not None else None,
                       image_size=int(meta["image_size"]) if meta.get("image_size") is not None else None,
                       tokenizer=dict(meta["tokenizer"]) if isinstance(meta.get("tokenizer"), dict) else None,
                       tokenizer_dir=meta.get("tokenizer_dir"), tokenizer_weights=meta.get("tokenizer_weights"),
                       split=meta.get("split"), manifest=meta.get("manifest"),
                       videos=tuple(meta["videos"]) if isinstance(meta.get("videos"), list) else None,
                       num_examples=int(meta.get("num_examples", sum(s["num_examples"] for s in shards))),
                       extra={k: v for k, v in meta.items() if k not in names})
        except (AttributeError, KeyError, TypeError, ValueError) as err:
            raise ValueError(f"{where}: not a token shard meta.json (needs token_grid and codebook_size; "
                             f"{type(err).__name__}: {err})") from None

    @classmethod
    def read(cls, location: str | os.PathLike) -> TokenShardMeta:
        """The ``meta.json`` of the token shard folder (or URL) ``location``."""
        return cls.from_dict(read_meta_json(location), meta_location(location))

    def to_dict(self) -> dict[str, Any]:
        """The ``meta.json`` object (keys of old shards that this class does not set stay absent)."""
        meta: dict[str, Any] = {"token_grid": list(self.token_grid), "codebook_size": self.codebook_size}
        optional = {"top_grid": None if self.top_grid is None else list(self.top_grid),
                    "cond_frames": None if self.cond_frames is None else list(self.cond_frames),
                    "has_sketch": self.has_sketch, "num_frames": self.num_frames, "image_size": self.image_size,
                    "tokenizer": self.tokenizer, "tokenizer_dir": self.tokenizer_dir,
                    "tokenizer_weights": self.tokenizer_weights, "split": self.split, "manifest": self.manifest,
                    "videos": None if self.videos is None else list(self.videos)}
        meta.update({k: v for k, v in optional.items() if v is not None})
        meta.update(classes=list(self.classes), condition_tasks=list(self.condition_tasks), **self.extra,
                    num_examples=self.num_examples, shards=[dict(s) for s in self.shards])
        return meta

    def write(self, folder: str | os.PathLike) -> Path:
        """Write ``folder/meta.json`` atomically (the last file a tokenize run writes)."""
        return write_json(Path(folder) / META_NAME, self.to_dict())

    # --- questions -------------------------------------------------------------------------------------------------
    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def frame_counts(self) -> tuple[int, ...]:
        """Frame prediction's given-frame counts whose condition codes the shards hold (shards without
        ``cond_frames`` hold the one-frame condition when they hold frame prediction's)."""
        if self.cond_frames is not None:
            return self.cond_frames
        return (1,) if "frame_prediction" in self.condition_tasks else ()

    def sizes(self) -> dict[str, Any]:
        """What the shards fix for a model trained on them: ``codebook_size``, ``token_grid``, ``num_classes``,
        ``cond_frames`` and ``top_grid`` (None: one grid)."""
        return {"codebook_size": self.codebook_size, "token_grid": list(self.token_grid),
                "num_classes": self.num_classes, "cond_frames": list(self.frame_counts()),
                "top_grid": None if self.top_grid is None else list(self.top_grid)}

    def carries(self, name: str) -> bool:
        """Whether the shards hold the condition codes of task ``name`` (tasks without condition codes: always; the
        sketch task of shards older than ``has_sketch``: assumed)."""
        row = _tasks.task(name)
        if row.condition == "video":
            return name in self.condition_tasks
        if row.condition == "sketch":
            return self.has_sketch is not False
        return True

    def condition_regions(self, tasks: Sequence[str]) -> dict[str, torch.Tensor]:
        """``conditions.latent_condition_regions`` of ``tasks`` for the shards' clips, tokenizer, given-frame counts
        and code grids. ``ValueError`` when the meta.json does not record the clips' size."""
        if self.num_frames is None or self.image_size is None:
            raise ValueError("meta.json records no num_frames / image_size of the clips")
        clip = (self.num_frames, self.image_size, self.image_size)
        causal = bool((self.tokenizer or {}).get("causal", False))
        return latent_condition_regions(tasks, self.token_grid, clip, causal, self.frame_counts() or (1,),
                                        self.top_grid)

    def fit_problem(self, codebook_size: int, token_grid: Sequence[int], top_grid: Sequence[int] | None,
                    other: str = "the model") -> str | None:
        """Why the shards' codes do not fit ``other`` (a model, other shards) of this codebook and (top) grid, in a
        few words; None: they fit. The one fit check of trainer and evaluator."""
        if (self.codebook_size, self.token_grid) != (codebook_size, tuple(token_grid)):
            return (f"codes of a {self.codebook_size}-code book on a {self.token_grid} grid, {other} has "
                    f"{codebook_size} codes on {tuple(token_grid)}")
        theirs = None if top_grid is None else tuple(top_grid)
        if self.top_grid != theirs:
            return f"a top code grid {self.top_grid}, {other} has {theirs} (None: one grid)"
        return None
