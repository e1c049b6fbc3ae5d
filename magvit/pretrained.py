"""``save_pretrained`` / ``from_pretrained`` / ``push_to_hub`` for the project's networks.

An export is a folder: ``config.json`` + ``model.safetensors`` + ``README.md`` (the model card, see
:mod:`magvit.model_card`). No pickle anywhere: the config is JSON, the weights are safetensors. Saving writes into a
temporary sibling folder and renames it into place, so an interrupted save never leaves a half-written model where a
good one was.

``from_pretrained`` takes a local folder or a Hugging Face Hub id (``org/name``, optionally a ``revision``: branch,
tag or commit sha), resolved through ``huggingface_hub`` with its usual cache (``HF_HUB_CACHE``) and offline mode
(``HF_HUB_OFFLINE=1``: the cache only, no network).

An export is untrusted input (DESIGN 18): before anything is allocated, ``from_pretrained`` reads the weights' header
only (names and shapes), builds the network its ``config.json`` describes on the ``meta`` device (no memory) with a
budget of tensors the header can account for (so ``num_layers: 1000000000`` stops after a few hundred), and compares
names and shapes (:func:`check_export`). Only an export whose config and weights agree is built for real.
"""

from __future__ import annotations

import json
import math
import os
import re
import tempfile
import threading
from contextlib import contextmanager
from pathlib import Path
from typing import Any, ClassVar, Iterator, Sequence, TypeVar

import torch
from safetensors.torch import load_model, save_model

from .config import Config
from .fileio import atomic_folder
from .model_card import TrainingRecord, render_model_card
from . import __version__

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
CARD_NAME = "README.md"
HUB_FILES = [CONFIG_NAME, WEIGHTS_NAME, CARD_NAME]
# "org/name" as the Hub spells repo ids (letters, digits, '-', '_', '.'); anything else is only ever a local path
_HUB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*/[A-Za-z0-9][A-Za-z0-9._-]*$")

MAX_CONFIG_BYTES = 16 << 20  # a config.json is a few KB; this leaves room for 100k class names
# Buffers a network builds from its config that the weights do not hold (e.g. position ids): no more than this
MAX_BUILT_BUFFER_BYTES = 256 << 20
# The input a model kind is made for, which no weight bounds (the tokenizer is convolutional): the config fields whose
# product is the size of one input (a clip's T x H x W), limited because every command allocates inputs of that size.
INPUT_FIELDS: dict[str, tuple[str, ...]] = {"video_tokenizer": ("num_frames", "image_size", "image_size")}
MAX_INPUT_ELEMENTS = 1 << 28  # e.g. 256 frames of 1024 x 1024

M = TypeVar("M", bound="PretrainedMixin")


def read_config_json(path: str | os.PathLike) -> dict[str, Any]:
    """An export's ``config.json`` as a dict, read only up to ``MAX_CONFIG_BYTES`` (the file is untrusted):
    ``ValueError`` for one too large, not JSON, or not a JSON object; ``OSError`` if it cannot be read."""
    path = Path(path)
    size = path.stat().st_size
    if size > MAX_CONFIG_BYTES:
        raise ValueError(f"{path}: {size} bytes, more than a model config holds ({MAX_CONFIG_BYTES})")
    try:
        meta = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as err:  # nesting too deep: RecursionError
        raise ValueError(f"{path}: not valid JSON ({type(err).__name__}: {str(err)[:200]})") from None
    if not isinstance(meta, dict):
        raise ValueError(f"{path}: not a saved model config (a JSON object)")
    return meta


def write_record(directory: str | os.PathLike, key: str, value: dict[str, Any]) -> Path:
    """Set the record ``key`` (a JSON object, e.g. a masked transformer's ``decoding``) in the ``config.json`` of the
    local export ``directory``, replacing the file atomically (a crash leaves the old or the new one whole)."""
    path = Path(directory) / CONFIG_NAME
    if not path.is_file():
        raise FileNotFoundError(f"no export at {directory} (missing {CONFIG_NAME})")
    meta = read_config_json(path)
    meta[key] = value
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{CONFIG_NAME}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            f.write(json.dumps(meta, indent=2) + "\n")
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, path.stat().st_mode & 0o777)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


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


def weights_fingerprint(directory: str | os.PathLike) -> str:
    """``"sha256:<hex>"`` of an export's ``model.safetensors`` (read in 1 MiB blocks): what token shards record of the
    tokenizer that made them, which tells apart two tokenizers of one config with other weights."""
    import hashlib

    digest = hashlib.sha256()
    with open(Path(directory) / WEIGHTS_NAME, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return f"sha256:{digest.hexdigest()}"


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
    #: config.json keys beside ``config`` that a kind keeps of its training run, each the instance attribute of that
    #: name: saved when set, loaded back as saved (a JSON object, validated by its reader), None in an export
    #: written before the record (e.g. the masked transformer's ``training_masking``, ``masking.recorded_masking``)
    records: ClassVar[tuple[str, ...]] = ()

    def save_pretrained(self, directory: str | os.PathLike, training: TrainingRecord | None = None) -> Path:
        """Write ``config.json``, ``model.safetensors`` and the model card ``README.md`` (``training``: what the run
        knows about the data and its last evaluation numbers) into ``directory``, atomically."""
        directory = Path(directory)
        meta: dict[str, Any] = {"model_type": self.model_type, "magvit_version": __version__,
                                "config": self.config.to_dict()}
        if hasattr(self.config, "num_classes"):
            meta["class_names"] = _check_class_names(list(self.class_names), self.config.num_classes,
                                                     type(self).__name__)
        meta.update({key: getattr(self, key) for key in self.records if getattr(self, key, None) is not None})
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
        meta = read_config_json(cfg_path)
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
        :func:`resolve_pretrained`). Exports older than ``class_names`` load with none, older than a record of
        ``records`` with ``None``."""
        directory = resolve_pretrained(name_or_path, revision, cache_dir)
        meta = cls.read_meta(directory)
        config = cls.config_class.from_dict(meta["config"])
        weights = directory / WEIGHTS_NAME
        if not weights.is_file():
            raise FileNotFoundError(f"no {cls.__name__} weights at {weights}")
        class_names = _check_class_names(meta.get("class_names", []), config.num_classes,
                                         str(directory / CONFIG_NAME)) if hasattr(config, "num_classes") else None
        records = {key: meta[key] for key in cls.records if meta.get(key) is not None}
        for key, value in records.items():
            if not isinstance(value, dict):
                raise ValueError(f"{directory / CONFIG_NAME}: {key} must be a JSON object")
        check_export(cls, config, directory / CONFIG_NAME, weights)  # before anything is allocated
        model = cls(config)  # type: ignore[call-arg]
        if class_names is not None:
            model.class_names = class_names
        for key, value in records.items():
            setattr(model, key, value)
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


# --- checks of an untrusted export ---------------------------------------------------------------------------------


def read_weights_header(weights: str | os.PathLike) -> dict[str, tuple[int, ...]]:
    """Tensor name -> shape of a ``model.safetensors``, from its header alone (safetensors bounds the header at
    100 MB and checks that the file holds every byte it announces; no tensor is read). ``ValueError`` (one line)
    for a file that is not safetensors."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(weights), "pt") as f:
            return {name: tuple(f.get_slice(name).get_shape()) for name in f.keys()}
    except SafetensorError as err:  # truncated file, a pickle renamed .safetensors, ...
        raise ValueError(f"{weights}: not a readable safetensors file ({err})") from None


class _TensorBudgetExceeded(Exception):
    pass


@contextmanager
def _tensor_budget(limit: int) -> Iterator[None]:
    """Raise ``_TensorBudgetExceeded`` once this thread registers more than ``limit`` parameters: a loop over
    ``num_layers: 1000000000`` stops after ``limit``, not after a billion meta layers."""
    owner, count = threading.get_ident(), 0

    def hook(module: torch.nn.Module, name: str, param: Any) -> None:
        nonlocal count
        if threading.get_ident() == owner:
            count += 1
            if count > limit:
                raise _TensorBudgetExceeded

    handle = torch.nn.modules.module.register_module_parameter_registration_hook(hook)
    try:
        yield
    finally:
        handle.remove()


def _check_input_size(model_type: str, config: Any, where: str) -> None:
    fields = INPUT_FIELDS.get(model_type, ())
    values = [getattr(config, name) for name in fields]
    if values and math.prod(values) > MAX_INPUT_ELEMENTS:
        sizes = " x ".join(f"{name} {value}" for name, value in zip(fields, values))
        raise ValueError(f"{where}: an input of {sizes} is beyond the limit of {MAX_INPUT_ELEMENTS} elements")


def check_export(cls: type[PretrainedMixin], config: Config, config_path: str | os.PathLike,
                 weights: str | os.PathLike) -> None:
    """``ValueError`` (one line) unless the network ``config`` describes has exactly the tensors (names, shapes)
    of ``weights``' header, builds no more than ``MAX_BUILT_BUFFER_BYTES`` of buffers beyond them and takes inputs of
    at most ``MAX_INPUT_ELEMENTS``. Allocates nothing: the header is read alone and the network is built on the
    ``meta`` device, with a budget of parameters the header can account for (tied weights are stored once, and a
    network may replace a parameter while it is built, hence the slack)."""
    where = str(config_path)
    _check_input_size(cls.model_type, config, where)
    stored = read_weights_header(weights)
    budget = 2 * len(stored) + 64
    try:
        with _tensor_budget(budget), torch.device("meta"):
            model = cls(config)  # type: ignore[call-arg]
    except _TensorBudgetExceeded:
        raise ValueError(f"{where}: the model it describes has more than {budget} parameter tensors, {weights} "
                         f"holds {len(stored)} (a count such as num_layers or num_res_blocks too large)") from None
    except Exception as err:  # sizes torch refuses (overflow, negative) or options the network rejects
        detail = " ".join(str(err).split())[:300] or type(err).__name__
        raise ValueError(f"{where}: does not describe a buildable model ({detail})") from None
    state = model.state_dict(keep_vars=True)  # meta tensors; tied weights are one object under several names
    unexpected = [name for name in stored if name not in state]
    if unexpected:
        raise ValueError(f"{weights} does not fit the model in config.json: {len(unexpected)} tensors it does not "
                         f"have, e.g. {unexpected[0]}")
    names_of: dict[int, list[str]] = {}
    for name, tensor in state.items():
        names_of.setdefault(id(tensor), []).append(name)
    for name, tensor in state.items():
        if name in stored:
            if tuple(tensor.shape) != stored[name]:
                raise ValueError(f"{weights} does not fit the model in config.json: {name} has shape "
                                 f"{list(stored[name])}, config.json implies {list(tensor.shape)}")
        elif not any(other in stored for other in names_of[id(tensor)]):  # saved once under a tied name
            raise ValueError(f"{weights} does not fit the model in config.json: it lacks {name}")
    kept = {id(t) for t in state.values()}
    built = sum(b.numel() * b.element_size() for b in model.buffers() if id(b) not in kept)
    if built > MAX_BUILT_BUFFER_BYTES:
        raise ValueError(f"{where}: the model it describes builds {built} bytes of buffers beyond its weights "
                         f"(limit {MAX_BUILT_BUFFER_BYTES})")
