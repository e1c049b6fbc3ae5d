"""``save_pretrained`` / ``from_pretrained`` for the project's networks: ``config.json`` + ``model.safetensors``.

No pickle anywhere: the config is JSON, the weights are safetensors. Saving writes into a temporary sibling folder
and renames it into place, so an interrupted save never leaves a half-written model where a good one was.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import TypeVar

import torch
from safetensors.torch import load_model, save_model

from .config import Config

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"

M = TypeVar("M", bound="PretrainedMixin")


class PretrainedMixin:
    """Mixed into an ``nn.Module`` that has ``self.config`` of type ``config_class``."""

    config_class: type[Config]
    model_type: str  # written into config.json so that a tokenizer dir is never loaded as a transformer

    def save_pretrained(self, directory: str | os.PathLike) -> Path:
        directory = Path(directory)
        directory.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{directory.name}.", dir=directory.parent))
        try:
            from . import __version__

            meta = {"model_type": self.model_type, "magvit_version": __version__, "config": self.config.to_dict()}
            (tmp / CONFIG_NAME).write_text(json.dumps(meta, indent=2) + "\n")
            save_model(self, str(tmp / WEIGHTS_NAME))  # handles tied weights (shared storage)
            if directory.exists():
                old = directory.with_name(f".{directory.name}.old")
                shutil.rmtree(old, ignore_errors=True)
                directory.rename(old)
                tmp.rename(directory)
                shutil.rmtree(old, ignore_errors=True)
            else:
                tmp.rename(directory)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        return directory

    @classmethod
    def read_config(cls, directory: str | os.PathLike) -> Config:
        """The config stored in a ``save_pretrained`` folder; clear errors for a missing or foreign folder."""
        directory = Path(directory)
        cfg_path = directory / CONFIG_NAME
        if not cfg_path.is_file():
            raise FileNotFoundError(f"no {cls.__name__} checkpoint at {directory} (missing {CONFIG_NAME})")
        try:
            meta = json.loads(cfg_path.read_text())
        except json.JSONDecodeError as err:
            raise ValueError(f"{cfg_path}: not valid JSON ({err})") from None
        if meta.get("model_type") != cls.model_type:
            raise ValueError(
                f"{directory} holds a '{meta.get('model_type')}' checkpoint, expected '{cls.model_type}'"
            )
        return cls.config_class.from_dict(meta["config"])

    @classmethod
    def from_pretrained(cls: type[M], directory: str | os.PathLike, device: str | torch.device = "cpu") -> M:
        directory = Path(directory)
        config = cls.read_config(directory)
        weights = directory / WEIGHTS_NAME
        if not weights.is_file():
            raise FileNotFoundError(f"no {cls.__name__} weights at {weights}")
        model = cls(config)  # type: ignore[call-arg]
        load_model(model, str(weights), strict=True, device=str(device))
        return model.to(device).eval()
