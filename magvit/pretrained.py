"""``save_pretrained`` / ``from_pretrained`` / ``push_to_hub`` for the project's networks.

An export is a folder: ``config.json`` + ``model.safetensors`` + ``README.md`` (the model card, see
:mod:`magvit.model_card`). No pickle anywhere: the config is JSON, the weights are safetensors. Saving writes into a
temporary sibling folder and renames it into place, so an interrupted save never leaves a half-written model where a
good one was.

``from_pretrained`` takes a local folder or a Hugging Face Hub id (``org/name``, optionally a ``revision``: branch,
tag or commit sha), resolved through ``huggingface_hub`` with its usual cache (``HF_HUB_CACHE``) and offline mode
(``HF_HUB_OFFLINE=1``: the cache only, no network).
"""

from __future__ import annotations

import json
import os
import re
import tempfile
from pathlib import Path
from typing import Any, Sequence, TypeVar

import torch
from safetensors.torch import load_model, save_model

from .config import Config
from .fileio import atomic_folder
from .model_card import TrainingRecord, render_model_card

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
CARD_NAME = "README.md"
HUB_FILES = [CONFIG_NAME, WEIGHTS_NAME, CARD_NAME]
# "org/name" as the Hub spells repo ids (letters, digits, '-', '_', '.'); anything else is only ever a local path
_HUB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*/[A-Za-z0-9][A-Za-z0-9._-]*$")

M = TypeVar("M", bound="PretrainedMixin")


def _env_true(name: str) -> bool:
    return os.environ.get(name, "").strip().upper() in ("1", "ON", "YES", "TRUE")


def is_hub_id(name: str | os.PathLike | None) -> bool:
    """Whether ``name`` has the form of a Hub repo id (``org/name``), so a missing local folder may be one."""
    return name is not None and bool(_HUB_ID.match(str(name)))


def resolve_pretrained(name_or_path: str | os.PathLike, revision: str | None = None,
                       cache_dir: str | os.PathLike | None = None) -> Path:
    """The local folder of an export: ``name_or_path`` itself when it exists, else the Hub snapshot of the id
    ``name_or_path`` at ``revision`` (downloaded into, or in offline mode only read from, the Hub cache).

    Raises ``FileNotFoundError`` naming ``name_or_path`` when it is neither (e.g. offline and not cached).
    """
    path = Path(name_or_path)
    if path.exists():
        if revision is not None:
            raise ValueError(f"revision={revision!r} applies to Hub ids, but {path} is a local folder")
        return path
    name = str(name_or_path)
    if not is_hub_id(name):
        raise FileNotFoundError(f"{name}: no such local folder (and not a Hub id of the form org/name)")
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError

    # read at call time, so that a variable set after `import huggingface_hub` still counts
    offline = _env_true("HF_HUB_OFFLINE") or _env_true("TRANSFORMERS_OFFLINE")
    cache_dir = cache_dir or os.environ.get("HF_HUB_CACHE") or None
    where = f"revision {revision}" if revision else "its main revision"
    try:
        return Path(snapshot_download(name, revision=revision, cache_dir=cache_dir, allow_patterns=HUB_FILES,
                                      local_files_only=offline))
    except LocalEntryNotFoundError:
        how = "offline (HF_HUB_OFFLINE=1), and it is not" if offline else "it could not be downloaded and is not"
        raise FileNotFoundError(f"{name}: no such local folder; as a Hub id ({where}) {how} in the Hub cache "
                                f"{cache_dir or 'HF_HUB_CACHE'}") from None
    except (HfHubHTTPError, ValueError) as err:  # repo or revision not found, no access, an invalid id
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise FileNotFoundError(f"{name}: no such local folder, and not found on the Hub ({where}): "
                                f"{first}") from None


def _check_class_names(names: Any, num_classes: int, where: str) -> list[str]:
    if not isinstance(names, list) or not all(isinstance(n, str) and n for n in names):
        raise ValueError(f"{where}: class_names must be a list of non-empty strings")
    if names and len(names) != num_classes:
        raise ValueError(f"{where}: {len(names)} class_names for num_classes={num_classes}")
    if len(set(names)) != len(names):
        raise ValueError(f"{where}: class_names repeat a name")
    return list(names)


class PretrainedMixin:
    """Mixed into an ``nn.Module`` that has ``self.config`` of type ``config_class``.

    A model whose config has ``num_classes`` also carries ``class_names`` (index = class id; empty when unknown),
    saved in ``config.json`` beside the config.
    """

    config_class: type[Config]
    model_type: str  # written into config.json so that a tokenizer dir is never loaded as a transformer
    class_names: Sequence[str] = ()  # class id -> name; an instance sets its own list

    def save_pretrained(self, directory: str | os.PathLike, training: TrainingRecord | None = None) -> Path:
        """Write ``config.json``, ``model.safetensors`` and the model card ``README.md`` (``training``: what the run
        knows about the data and its last evaluation numbers) into ``directory``, atomically."""
        from . import __version__

        directory = Path(directory)
        meta: dict[str, Any] = {"model_type": self.model_type, "magvit_version": __version__,
                                "config": self.config.to_dict()}
        if hasattr(self.config, "num_classes"):
            meta["class_names"] = _check_class_names(list(self.class_names), self.config.num_classes,
                                                     type(self).__name__)
        num_parameters = sum(p.numel() for p in self.parameters())  # type: ignore[attr-defined]
        card = render_model_card(type(self).__name__, self.model_type, self.config, num_parameters,
                                 meta.get("class_names"), training, __version__)
        with atomic_folder(directory) as tmp:  # permissions follow the umask (0755 / 0644 under 022)
            (tmp / CONFIG_NAME).write_text(json.dumps(meta, indent=2) + "\n")
            (tmp / CARD_NAME).write_text(card)
            save_model(self, str(tmp / WEIGHTS_NAME))  # handles tied weights (shared storage)
        return directory

    @classmethod
    def read_meta(cls, directory: str | os.PathLike) -> dict[str, Any]:
        """The ``config.json`` of a local ``save_pretrained`` folder; clear errors for a missing or foreign one."""
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
        return meta

    @classmethod
    def read_config(cls, directory: str | os.PathLike) -> Config:
        """The config stored in a local ``save_pretrained`` folder."""
        return cls.config_class.from_dict(cls.read_meta(directory)["config"])

    @classmethod
    def from_pretrained(cls: type[M], name_or_path: str | os.PathLike, device: str | torch.device = "cpu",
                        revision: str | None = None, cache_dir: str | os.PathLike | None = None) -> M:
        """Load an export from a local folder or a Hub id (``revision``: branch, tag or commit; see
        :func:`resolve_pretrained`). Exports older than ``class_names`` load with none."""
        directory = resolve_pretrained(name_or_path, revision, cache_dir)
        meta = cls.read_meta(directory)
        config = cls.config_class.from_dict(meta["config"])
        weights = directory / WEIGHTS_NAME
        if not weights.is_file():
            raise FileNotFoundError(f"no {cls.__name__} weights at {weights}")
        model = cls(config)  # type: ignore[call-arg]
        if hasattr(config, "num_classes"):
            model.class_names = _check_class_names(meta.get("class_names", []), config.num_classes,
                                                   str(directory / CONFIG_NAME))
        load_weights(model, weights, device)
        return model.to(device).eval()

    def push_to_hub(self, repo_id: str, revision: str | None = None, private: bool | None = None,
                    token: str | None = None, commit_message: str = "Upload model",
                    training: TrainingRecord | None = None, create_pr: bool = False) -> Any:
        """Upload a ``save_pretrained`` folder (config, weights, model card) to the Hub repo ``repo_id`` (created if
        missing) on branch ``revision`` (default main; created if missing). Returns ``huggingface_hub``'s commit
        info."""
        from huggingface_hub import HfApi

        api = HfApi(token=token)
        api.create_repo(repo_id, private=private, exist_ok=True)
        if revision is not None and not create_pr:  # a new branch is made from main, as `git push origin HEAD:rev`
            api.create_branch(repo_id, branch=revision, exist_ok=True)
        with tempfile.TemporaryDirectory(prefix="magvit-push-") as tmp:
            folder = self.save_pretrained(Path(tmp) / "export", training=training)
            return api.upload_folder(repo_id=repo_id, folder_path=str(folder), commit_message=commit_message,
                                     revision=revision, create_pr=create_pr)


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
