"""Atomic training checkpoints, resume, and export of the EMA weights.

Layout of ``RUN_DIR/checkpoints``::

    step_00001000/            one complete checkpoint
        generator/ ...        DeepSpeed checkpoint of each engine (model, optimizer, LR schedule; per-rank shards)
        discriminator/ ...
        ema.safetensors       EMA of the exported network's weights (fp32)
        trainer_state.json    step, data position, anything else the script adds
        rng_rank00000.json    RNG states of rank 0 (torch, CUDA, numpy, python), one file per rank
        COMPLETE              written last, by rank 0, once every rank has finished
    latest                    name of the newest complete checkpoint, replaced atomically

A checkpoint is first written to ``.tmp-step_...`` and renamed into place only when complete; ``latest`` is
rewritten through a temporary file and ``os.replace``. A crash at any moment therefore leaves the previous
``latest`` pointing at an intact checkpoint; stale temporary folders are removed at the next start. A save
that fails with an I/O error (disk full, read-only folder) removes its temporary folder and raises
:class:`CheckpointError` with one line; the previous checkpoint stays the latest.

Nothing in a checkpoint is unpickled with code execution: DeepSpeed's ``.pt`` files go through
``distributed.safe_torch_load`` (``weights_only=True`` and an allow-list), and every file is checked before any
is loaded, so a planted pickle stops every rank with one line before DeepSpeed reads anything. Our own state is
JSON (trainer state, RNG) and safetensors (EMA).
"""

from __future__ import annotations

import base64
import errno
import json
import os
import pickle
import random
import re
import shutil
from pathlib import Path
from typing import Any, Mapping

import numpy as np
import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

from . import distributed as dist
from .fileio import atomic_path, recover_folder, replace_folder, write_text_atomic
from .ema import EMA

LATEST = "latest"
COMPLETE = "COMPLETE"
TRAINER_STATE = "trainer_state.json"
EMA_FILE = "ema.safetensors"
_TAG_RE = re.compile(r"^step_(\d{8,})$")


class CheckpointError(RuntimeError):
    """A checkpoint cannot be written or read (disk full, read-only folder, damaged or unsafe file). The training
    scripts report it as one line on stderr with exit status 2."""


def _reason(err: BaseException) -> str:
    """One line for an I/O failure; torch's zip writer reports a full disk as ``unexpected pos``."""
    text = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
    full = ("unexpected pos", "PytorchStreamWriter", "No space left", "os error 28")
    if any(marker in text for marker in full) or getattr(err, "errno", None) == errno.ENOSPC:
        text = f"the write failed, is the disk full? ({text})"
    return text


def step_tag(step: int) -> str:
    return f"step_{step:08d}"


# --------------------------------------------------------------------------------------------------------------
# RNG states (JSON, no pickle)
# --------------------------------------------------------------------------------------------------------------
def _b64(t: torch.Tensor) -> str:
    return base64.b64encode(t.cpu().numpy().tobytes()).decode()


def _unb64(s: str) -> torch.Tensor:
    return torch.frombuffer(bytearray(base64.b64decode(s)), dtype=torch.uint8).clone()


def capture_rng_state() -> dict[str, Any]:
    """This process's RNG states (python, numpy, torch CPU, all CUDA devices) as a JSON-able dict."""
    py_version, py_state, py_gauss = random.getstate()
    np_name, np_keys, np_pos, np_has_gauss, np_gauss = np.random.get_state()
    state = {
        "python": [py_version, list(py_state), py_gauss],
        "numpy": [np_name, np_keys.tolist(), int(np_pos), int(np_has_gauss), float(np_gauss)],
        "torch": _b64(torch.get_rng_state()),
    }
    if torch.cuda.is_available():
        state["cuda"] = [_b64(s) for s in torch.cuda.get_rng_state_all()]
    return state


def restore_rng_state(state: Mapping[str, Any]) -> None:
    py_version, py_state, py_gauss = state["python"]
    random.setstate((py_version, tuple(py_state), py_gauss))
    name, keys, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state((name, np.asarray(keys, dtype=np.uint32), pos, has_gauss, gauss))
    torch.set_rng_state(_unb64(state["torch"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([_unb64(s) for s in state["cuda"]])


def seed_everything(seed: int) -> None:
    """Seed python, numpy and torch (CPU and CUDA) with one number (callers pass seed + rank)."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


# --------------------------------------------------------------------------------------------------------------
# Checkpoints
# --------------------------------------------------------------------------------------------------------------
def list_checkpoints(root: str | os.PathLike) -> list[tuple[int, Path]]:
    """Complete checkpoints under ``root`` as ``(step, path)``, oldest first."""
    root = Path(root)
    found = []
    if root.is_dir():
        for child in root.iterdir():
            match = _TAG_RE.match(child.name)
            if match and (child / COMPLETE).is_file():
                found.append((int(match.group(1)), child))
    return sorted(found)


def latest_checkpoint(root: str | os.PathLike) -> Path | None:
    """The checkpoint named by ``latest`` if it is complete, else the newest complete one, else None."""
    root = Path(root)
    pointer = root / LATEST
    if pointer.is_file():
        candidate = root / pointer.read_text().strip()
        if _TAG_RE.match(candidate.name) and (candidate / COMPLETE).is_file():
            return candidate
    found = list_checkpoints(root)
    return found[-1][1] if found else None


class CheckpointManager:
    """Saves and restores the training state of one or more DeepSpeed engines plus EMA, RNG and loop state.

    Every rank calls ``save``/``load`` (DeepSpeed writes per-rank shards). ``root`` must be on a filesystem all
    ranks share (the usual DeepSpeed assumption).
    """

    def __init__(self, root: str | os.PathLike, keep_last: int = 3):
        if keep_last < 1:
            raise ValueError(f"keep_last must be >= 1, got {keep_last}")
        self.root = Path(root)
        self.keep_last = keep_last
        self.rank = dist.get_rank()

    def clean_stale(self) -> None:
        """Remove half-written checkpoints left by a crash (rank 0; call before training starts)."""
        if self.rank == 0 and self.root.is_dir():
            for child in sorted(self.root.iterdir()):
                if child.name.startswith(".tmp-old-"):  # a replaced step whose swap was interrupted: put it back
                    recover_folder(self.root / child.name[len(".tmp-old-"):], child)
                if child.name.startswith(".tmp-") and child.exists():
                    shutil.rmtree(child, ignore_errors=True)
                elif child.name.startswith(f".{LATEST}.tmp"):
                    child.unlink(missing_ok=True)
        dist.barrier()

    def save(self, step: int, engines: Mapping[str, Any], trainer_state: Mapping[str, Any],
             ema: EMA | None = None) -> Path:
        """Write checkpoint ``step`` and make it the latest. Returns its path.

        An I/O error on this rank (disk full, read-only folder) removes the temporary folder (rank 0; another
        rank's leftovers go at the next start) and raises :class:`CheckpointError`: the previous checkpoint stays
        the latest. Other ranks are then ended by the launcher (they wait in DeepSpeed's collectives)."""
        tag = step_tag(step)
        tmp = self.root / f".tmp-{tag}"
        try:
            return self._write(step, tag, tmp, engines, trainer_state, ema)
        except (OSError, RuntimeError, SafetensorError) as err:  # safetensors' own error for the EMA file
            if self.rank == 0:
                shutil.rmtree(tmp, ignore_errors=True)
            previous = latest_checkpoint(self.root)
            raise CheckpointError(f"could not write checkpoint {tag} in {self.root}: {_reason(err)}; the latest "
                                  f"checkpoint is still {previous.name if previous else 'none'}") from None

    def _write(self, step: int, tag: str, tmp: Path, engines: Mapping[str, Any], trainer_state: Mapping[str, Any],
               ema: EMA | None) -> Path:
        if self.rank == 0:
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
        dist.barrier()
        for name, engine in engines.items():
            engine.save_checkpoint(str(tmp), tag=name, client_state={"step": step}, save_latest=False)
        write_text_atomic(tmp / f"rng_rank{self.rank:05d}.json", json.dumps(capture_rng_state()),
                          fsync=True)
        if self.rank == 0:
            if ema is not None:
                with atomic_path(tmp / EMA_FILE) as part:  # save_file alone writes 0600, whatever the umask
                    save_file({k: v.contiguous() for k, v in ema.shadow.items()}, str(part),
                              metadata={"decay": str(ema.decay), "num_updates": str(ema.num_updates)})
            stages = {name: dist.zero_stage(engine) for name, engine in engines.items()}
            state = {"step": step, "world_size": dist.get_world_size(), "zero_stage": max(stages.values(), default=0),
                     **trainer_state}
            write_text_atomic(tmp / TRAINER_STATE, json.dumps(state, indent=2) + "\n", fsync=True)
        dist.barrier()  # every rank's shards are on disk
        final = self.root / tag
        if self.rank == 0:
            write_text_atomic(tmp / COMPLETE, "", fsync=True)
            # The same step may be saved again (e.g. preempted right after a periodic save): replace it.
            replace_folder(tmp, final, self.root / f".tmp-old-{tag}")
            write_text_atomic(self.root / LATEST, tag + "\n", fsync=True)
            self._prune()
        dist.barrier()
        return final

    def _prune(self) -> None:
        found = list_checkpoints(self.root)
        latest = latest_checkpoint(self.root)
        for _, path in found[:-self.keep_last]:
            if path != latest:
                shutil.rmtree(path, ignore_errors=True)

    def load(self, path: str | os.PathLike, engines: Mapping[str, Any], ema: EMA | None = None) -> dict[str, Any]:
        """Restore engines (model, optimizer, LR schedule), EMA and this rank's RNG; return the trainer state.

        Raises :class:`CheckpointError` (on every rank alike) for a damaged checkpoint or one holding pickled
        code, before any engine reads from it."""
        path = Path(path)
        state = read_trainer_state(path)
        world = dist.get_world_size()
        if state.get("world_size", world) != world:  # ZeRO shards and data positions are per rank
            raise CheckpointError(world_size_mismatch(path, state["world_size"], world))
        problem = _check_engine_files(path, engines, self.rank)
        finder = int(dist.all_reduce_max(self.rank + 1.0 if problem else 0.0)) - 1  # every rank stops, not one
        if finder >= 0:
            raise CheckpointError(problem or f"{path}: rank {finder} found a damaged or unsafe file "
                                             "(its own error line names it)")
        for name, engine in engines.items():
            try:
                load_path, _ = engine.load_checkpoint(str(path), tag=name, load_optimizer_states=True,
                                                      load_lr_scheduler_states=True)
            except (pickle.UnpicklingError, OSError, RuntimeError, KeyError, ValueError) as err:
                raise CheckpointError(f"{path / name}: cannot load ({_reason(err)})") from None
            if load_path is None:
                raise CheckpointError(f"DeepSpeed could not load '{name}' from {path}")
        if ema is not None:
            try:
                tensors = load_file(str(path / EMA_FILE))
                with safe_open(str(path / EMA_FILE), framework="pt") as f:
                    meta = f.metadata() or {}
                ema.load_state_dict({"shadow": tensors, "decay": float(meta.get("decay", ema.decay)),
                                     "num_updates": int(meta.get("num_updates", 0))})
            except (OSError, SafetensorError, ValueError) as err:
                raise CheckpointError(f"{path / EMA_FILE}: cannot load ({_reason(err)})") from None
        rng_file = path / f"rng_rank{self.rank:05d}.json"
        try:
            restore_rng_state(json.loads(rng_file.read_text()))
        except (OSError, ValueError, KeyError, TypeError) as err:
            raise CheckpointError(f"{rng_file}: not an RNG state ({_reason(err)})") from None
        return state


def world_size_mismatch(path: str | os.PathLike, saved: int, current: int) -> str:
    """The one-line refusal to resume a checkpoint of ``saved`` ranks with ``current`` ranks."""
    return (f"{path} was written by {saved} rank(s), this run has {current}: resume with {saved} rank(s) (ZeRO "
            "shards, RNG streams and data positions are per rank), or start a new --run-dir")


def read_trainer_state(path: str | os.PathLike) -> dict[str, Any]:
    """``trainer_state.json`` of a complete checkpoint. Raises :class:`CheckpointError`."""
    path = Path(path)
    if not (path / COMPLETE).is_file():
        raise CheckpointError(f"{path} is not a complete checkpoint")
    try:
        state = json.loads((path / TRAINER_STATE).read_text())
    except (OSError, ValueError) as err:
        raise CheckpointError(f"{path / TRAINER_STATE}: cannot read ({_reason(err)})") from None
    if not isinstance(state, dict) or not isinstance(state.get("step"), int):
        raise CheckpointError(f"{path / TRAINER_STATE}: not a trainer state (no integer 'step')")
    return state


_RANK_FILE_RE = re.compile(r"zero_pp_rank_(\d+)_")


def _check_engine_files(path: Path, engines: Mapping[str, Any], rank: int) -> str | None:
    """Why the engines' files under ``path`` must not be loaded, or None. Reads only the pickles, statically.
    Each rank checks the shared files and its own ZeRO shards (``zero_pp_rank_<rank>_*``), so the work per rank
    does not grow with the number of ranks."""
    for name, engine in engines.items():
        if not getattr(getattr(engine, "checkpoint_engine", None), "loads_safely", False):
            return f"engine '{name}' was not built by magvit.distributed.build_engine (its loads are not safe)"
        folder = path / name
        files = sorted(folder.glob("*.pt")) if folder.is_dir() else []
        if not files:
            return f"{folder}: no DeepSpeed state files"
        for file in files:
            owner = _RANK_FILE_RE.search(file.name)
            if owner is not None and int(owner.group(1)) != rank:
                continue
            try:
                unsafe = dist.unsafe_globals_in(file)
            except Exception as err:  # noqa: BLE001 - any unreadable archive is a damaged checkpoint
                return f"{file}: damaged or not a torch.save file ({_reason(err)})"
            if unsafe:
                return (f"{file}: refusing to load, it references {', '.join(sorted(unsafe)[:3])} (a pickle that "
                        "would run code); delete this checkpoint folder if you did not put it there")
    return None


def export_ema(model: torch.nn.Module, ema: EMA | None, directory: str | os.PathLike,
               training: Any = None) -> Path:
    """``save_pretrained`` of ``model`` with the EMA weights (model's own weights if ``ema`` is None).

    ``model`` is a plain (non-DeepSpeed) copy of the network holding the current buffers; it is modified in place.
    ``training`` (a ``model_card.TrainingRecord``) goes into the export's model card.
    """
    if ema is not None:
        ema.copy_to(model)
    try:
        return model.save_pretrained(directory, training=training)
    except (OSError, RuntimeError, SafetensorError) as err:
        raise CheckpointError(f"could not export the EMA weights to {directory}: {_reason(err)}") from None
