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
``latest`` pointing at an intact checkpoint; stale temporary folders are removed at the next start.
"""

from __future__ import annotations

import base64
import json
import os
import random
import re
import shutil
from pathlib import Path
from typing import Any, Mapping

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from . import distributed as dist
from .training import EMA

LATEST = "latest"
COMPLETE = "COMPLETE"
TRAINER_STATE = "trainer_state.json"
EMA_FILE = "ema.safetensors"
_TAG_RE = re.compile(r"^step_(\d{8,})$")


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
def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


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
            for child in self.root.iterdir():
                if child.name.startswith(".tmp-"):
                    shutil.rmtree(child, ignore_errors=True)
        dist.barrier()

    def save(self, step: int, engines: Mapping[str, Any], trainer_state: Mapping[str, Any],
             ema: EMA | None = None) -> Path:
        """Write checkpoint ``step`` and make it the latest. Returns its path."""
        tag = step_tag(step)
        tmp = self.root / f".tmp-{tag}"
        if self.rank == 0:
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
        dist.barrier()
        for name, engine in engines.items():
            engine.save_checkpoint(str(tmp), tag=name, client_state={"step": step}, save_latest=False)
        (tmp / f"rng_rank{self.rank:05d}.json").write_text(json.dumps(capture_rng_state()))
        if self.rank == 0:
            if ema is not None:
                from .fileio import atomic_path

                with atomic_path(tmp / EMA_FILE) as part:  # save_file alone writes 0600, whatever the umask
                    save_file({k: v.contiguous() for k, v in ema.shadow.items()}, str(part),
                              metadata={"decay": str(ema.decay), "num_updates": str(ema.num_updates)})
            state = {"step": step, "world_size": dist.get_world_size(), **trainer_state}
            (tmp / TRAINER_STATE).write_text(json.dumps(state, indent=2) + "\n")
        dist.barrier()  # every rank's shards are on disk
        final = self.root / tag
        if self.rank == 0:
            _write_atomic(tmp / COMPLETE, "")
            if final.exists():  # same step saved again (e.g. preempted right after a periodic save)
                old = self.root / f".tmp-old-{tag}"
                shutil.rmtree(old, ignore_errors=True)
                final.rename(old)
                tmp.rename(final)
                shutil.rmtree(old, ignore_errors=True)
            else:
                tmp.rename(final)
            _write_atomic(self.root / LATEST, tag + "\n")
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
        """Restore engines (model, optimizer, LR schedule), EMA and this rank's RNG; return the trainer state."""
        path = Path(path)
        if not (path / COMPLETE).is_file():
            raise ValueError(f"{path} is not a complete checkpoint")
        state = json.loads((path / TRAINER_STATE).read_text())
        for name, engine in engines.items():
            load_path, _ = engine.load_checkpoint(str(path), tag=name, load_optimizer_states=True,
                                                  load_lr_scheduler_states=True)
            if load_path is None:
                raise RuntimeError(f"DeepSpeed could not load '{name}' from {path}")
        if ema is not None:
            tensors = load_file(str(path / EMA_FILE))
            from safetensors import safe_open

            with safe_open(str(path / EMA_FILE), framework="pt") as f:
                meta = f.metadata() or {}
            ema.load_state_dict({"shadow": tensors, "decay": float(meta.get("decay", ema.decay)),
                                 "num_updates": int(meta.get("num_updates", 0))})
        rng_file = path / f"rng_rank{self.rank:05d}.json"
        if rng_file.is_file() and state.get("world_size") == dist.get_world_size():
            restore_rng_state(json.loads(rng_file.read_text()))
        else:  # another world size: the run continues, but not bit-exactly
            state["rng_restored"] = False
        return state


def export_ema(model: torch.nn.Module, ema: EMA | None, directory: str | os.PathLike) -> Path:
    """``save_pretrained`` of ``model`` with the EMA weights (model's own weights if ``ema`` is None).

    ``model`` is a plain (non-DeepSpeed) copy of the network holding the current buffers; it is modified in place.
    """
    if ema is not None:
        ema.copy_to(model)
    return model.save_pretrained(directory)
