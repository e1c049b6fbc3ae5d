"""``save_pretrained`` / ``from_pretrained`` for the project's networks: ``config.json`` + ``model.safetensors``.

No pickle anywhere: the config is JSON, the weights are safetensors. Saving writes into a temporary sibling folder
and renames it into place, so an interrupted save never leaves a half-written model where a good one was.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import TypeVar

import torch
from safetensors.torch import load_model, save_model

from .config import Config
from .fileio import atomic_folder

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"

M = TypeVar("M", bound="PretrainedMixin")


class PretrainedMixin:
    """Mixed into an ``nn.Module`` that has ``self.config`` of type ``config_class``."""

    config_class: type[Config]
    model_type: str  # written into config.json so that a tokenizer dir is never loaded as a transformer

    def save_pretrained(self, directory: str | os.PathLike) -> Path:
        from . import __version__

        directory = Path(directory)
        with atomic_folder(directory) as tmp:  # permissions follow the umask (0755 / 0644 under 022)
            meta = {"model_type": self.model_type, "magvit_version": __version__, "config": self.config.to_dict()}
            (tmp / CONFIG_NAME).write_text(json.dumps(meta, indent=2) + "\n")
            save_model(self, str(tmp / WEIGHTS_NAME))  # handles tied weights (shared storage)
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
        if not isinstance(meta, dict):
            raise ValueError(f"{cfg_path}: not a saved model config (a JSON object)")
        if meta.get("model_type") != cls.model_type:
            raise ValueError(
                f"{directory} holds a '{meta.get('model_type')}' checkpoint, expected '{cls.model_type}'"
            )
        if not isinstance(meta.get("config"), dict):
            raise ValueError(f"{cfg_path}: no 'config' object")
        return cls.config_class.from_dict(meta["config"])

    @classmethod
    def from_pretrained(cls: type[M], directory: str | os.PathLike, device: str | torch.device = "cpu") -> M:
        directory = Path(directory)
        config = cls.read_config(directory)
        weights = directory / WEIGHTS_NAME
        if not weights.is_file():
            raise FileNotFoundError(f"no {cls.__name__} weights at {weights}")
        model = cls(config)  # type: ignore[call-arg]
        load_weights(model, weights, device)
        return model.to(device).eval()


def load_weights(model: torch.nn.Module, weights: str | os.PathLike, device: str | torch.device = "cpu") -> None:
    """Load a ``model.safetensors`` into ``model`` (strict: every key, every shape).

    Raises ``ValueError`` with a one-line reason for a file that is not safetensors (truncated, a pickle, another
    format) or whose tensors do not fit the model, so that every command reports a damaged export the same way.
    """
    from safetensors import SafetensorError

    try:
        load_model(model, str(weights), strict=True, device=str(device))
    except SafetensorError as err:  # truncated file, a pickle renamed .safetensors, ...
        raise ValueError(f"{weights}: not a readable safetensors file ({err})") from None
    except RuntimeError as err:  # load_state_dict: missing / unexpected keys or a size mismatch, one per line
        lines = [line.strip() for line in str(err).splitlines()[1:] if line.strip()]
        detail = lines[0] if lines else str(err)
        more = f" (and {len(lines) - 1} more)" if len(lines) > 1 else ""
        raise ValueError(f"{weights} does not fit the model in config.json: {detail[:300]}{more}") from None
