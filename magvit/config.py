"""Typed configuration: dataclasses with strict loading, named presets and ``key.path=value`` overrides.

Every config in the project (``TokenizerConfig``, ``TransformerConfig``, training configs) subclasses
:class:`Config`. Loading is strict: an unknown key anywhere in a dict or YAML file is a ``ValueError`` that names
the full dotted key and lists the valid ones, so a typo never silently falls back to a default.
"""

from __future__ import annotations

import dataclasses
import json
import math
import types
import typing
from pathlib import Path
from typing import Any, ClassVar, Literal, Mapping, Sequence, TypeVar, Union, get_args, get_origin

import yaml
from .fileio import write_text_atomic

C = TypeVar("C", bound="Config")


class ConfigError(ValueError):
    """A config value or key does not fit the schema."""


def require_finite(cfg: "Config", names: Sequence[str]) -> None:
    """``ValueError`` naming the first of ``names`` that is NaN or infinite (``optim.lr=.inf`` is no learning rate)."""
    for name in names:
        if not math.isfinite(getattr(cfg, name)):
            raise ValueError(f"{name} must be a finite number, got {getattr(cfg, name)}")


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Convert ``value`` (from JSON/YAML) to the annotated type ``tp``; raise ConfigError naming ``key``."""
    origin = get_origin(tp)
    if tp is Any:
        return value
    if origin in (Union, types.UnionType):
        args = get_args(tp)
        if value is None and type(None) in args:
            return None
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, key)
            except ConfigError:
                pass  # try the next member of the union
        raise ConfigError(f"{key}: {value!r} does not fit {_type_name(tp)}")
    if origin is Literal:
        allowed = get_args(tp)
        if value not in allowed:
            raise ConfigError(f"{key}: {value!r} is not one of {list(allowed)}")
        return value
    if origin in (tuple, list):
        if isinstance(value, str) or not isinstance(value, Sequence):
            raise ConfigError(f"{key}: expected a list, got {value!r}")
        args = get_args(tp)
        if origin is tuple and len(args) == 2 and args[1] is Ellipsis:
            items = [_coerce(v, args[0], f"{key}[{i}]") for i, v in enumerate(value)]
        elif origin is tuple and args:
            if len(args) != len(value):
                raise ConfigError(f"{key}: expected {len(args)} items, got {len(value)}")
            items = [_coerce(v, a, f"{key}[{i}]") for i, (v, a) in enumerate(zip(value, args))]
        else:
            inner = args[0] if args else Any
            items = [_coerce(v, inner, f"{key}[{i}]") for i, v in enumerate(value)]
        return tuple(items) if origin is tuple else list(items)
    if origin is dict:
        if not isinstance(value, Mapping):
            raise ConfigError(f"{key}: expected a mapping, got {value!r}")
        return dict(value)
    if isinstance(tp, type) and issubclass(tp, Config):
        return _coerce_section(value, tp, key)
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{key}: expected true/false, got {value!r}")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        raise ConfigError(f"{key}: expected an integer, got {value!r}")
    if tp is float:
        number = None
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            number = float(value)
        elif isinstance(value, str):  # YAML reads "1e-4" as a string
            try:
                number = float(value)
            except ValueError:
                pass
        if number is None:
            raise ConfigError(f"{key}: expected a number, got {value!r}")
        if math.isnan(number):  # NaN passes every `x <= 0` check downstream; no setting means "not a number"
            raise ConfigError(f"{key}: expected a number, got NaN")
        return number
    if tp is str:
        if isinstance(value, str):
            return value
        raise ConfigError(f"{key}: expected a string, got {value!r}")
    return value


def _coerce_section(value: Any, tp: type["Config"], key: str) -> "Config":
    """A nested config section: an instance, or a mapping of its fields, optionally ``{preset: NAME, field: value,
    ...}`` (the preset, then the section's fields)."""
    if isinstance(value, tp):
        return value
    if not isinstance(value, Mapping):
        raise ConfigError(f"{key}: expected a mapping for {tp.__name__}, got {value!r}")
    if "preset" in value:
        rest = {k: v for k, v in value.items() if k != "preset"}
        try:
            value = tp._preset_dict(value["preset"], rest)
        except ConfigError as err:
            raise ConfigError(f"{key}: {err}") from None
    return tp.from_dict(value, _prefix=f"{key}.")


@dataclasses.dataclass
class Config:
    """Base class of every config dataclass.

    Subclasses may define ``PRESETS: ClassVar[dict[str, dict]]`` mapping a preset name to field overrides of the
    defaults; :meth:`preset` builds one. A section typed as such a config may be given in a mapping or YAML file as
    ``{preset: NAME, field: value, ...}``: the preset with the section's fields applied. :meth:`to_dict` always
    writes every field (no ``preset`` key), so a saved config reads back as exactly the values in force.
    """

    PRESETS: ClassVar[dict[str, dict[str, Any]]] = {}

    # --- construction -------------------------------------------------------------------------------------------
    @classmethod
    def from_dict(cls: type[C], data: Mapping[str, Any], *, _prefix: str = "") -> C:
        """Build from a (nested) mapping. Unknown keys raise ``ConfigError`` naming the dotted key."""
        if not isinstance(data, Mapping):
            raise ConfigError(f"{_prefix or cls.__name__}: expected a mapping, got {type(data).__name__}")
        data = cls._prepare(data, _prefix)
        hints = typing.get_type_hints(cls)
        fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
        unknown = sorted(set(data) - set(fields))
        if unknown:
            raise ConfigError(
                f"unknown config key '{_prefix}{unknown[0]}' for {cls.__name__}; valid keys: {', '.join(sorted(fields))}"
            )
        kwargs = {name: _coerce(value, hints[name], f"{_prefix}{name}") for name, value in data.items()}
        try:
            return cls(**kwargs)
        except (TypeError, ValueError) as err:
            name = _prefix[:-1] if _prefix else cls.__name__
            text = str(err) if str(err).startswith(f"{name}:") else f"{name}: {err}"  # no "optim: optim: ..."
            raise ConfigError(text) from err

    @classmethod
    def _prepare(cls, data: Mapping[str, Any], prefix: str) -> Mapping[str, Any]:
        """Hook: rewrite the raw mapping before its keys are checked (e.g. a key accepted in two places moved to
        its one field). ``prefix`` is the dotted path of this section, for errors. The default changes nothing."""
        return data

    @classmethod
    def _preset_dict(cls, name: str, overrides: Mapping[str, Any]) -> dict[str, Any]:
        """The field dict of preset ``name`` with ``overrides`` merged in (nested mappings merge key by key).
        Subclasses override this hook when a preset's fields depend on the overrides."""
        if not isinstance(name, str) or name not in cls.PRESETS:
            raise ConfigError(f"unknown {cls.__name__} preset '{name}'; available: {', '.join(cls.PRESETS)}")
        return _deep_merge(dict(cls.PRESETS[name]), overrides)

    @classmethod
    def preset(cls: type[C], name: str, **overrides: Any) -> C:
        """A named size preset (e.g. ``"tiny"``, ``"B"``, ``"L"``) with optional field overrides."""
        return cls.from_dict(cls._preset_dict(name, overrides))

    @classmethod
    def from_yaml(cls: type[C], path: str | Path) -> C:
        """Load a YAML file (safe loader). A top-level ``preset: NAME`` key starts from that preset."""
        return cls.from_mapping(_read_yaml_mapping(path, cls.__name__), source=str(path))

    @classmethod
    def load(cls: type[C], path: str | Path, overrides: Sequence[str] = ()) -> C:
        """A YAML file, then ``key.path=value`` overrides (:meth:`with_overrides`). ``section.preset=NAME``
        switches the preset of a section typed as a config with presets (``model.preset=B``) before the section is
        expanded, so the file's other fields of that section still apply. Raises ``ConfigError``."""
        data = dict(_read_yaml_mapping(path, cls.__name__))
        rest = []
        for word in overrides:
            key, _, value = word.partition("=")
            parts = key.split(".")
            if parts[-1] == "preset" and _has_presets(cls, parts[:-1]):
                node = data
                for part in parts[:-1]:
                    if not isinstance(node.get(part) or {}, Mapping):
                        raise ConfigError(f"{path}: '{part}' is not a section, cannot apply override '{word}'")
                    child = dict(node.get(part) or {})
                    node[part] = child
                    node = child
                node["preset"] = value
            else:
                rest.append(word)
        return cls.from_mapping(data, source=str(path)).with_overrides(rest)

    @classmethod
    def from_mapping(cls: type[C], data: Mapping[str, Any], source: str = "") -> C:
        """Like :meth:`from_dict`, but a ``preset: NAME`` key starts from that preset; errors name ``source``."""
        data = dict(data)
        name = data.pop("preset", None)
        try:
            return cls.from_dict(data if name is None else cls._preset_dict(name, data))
        except ConfigError as err:
            raise ConfigError(f"{source}: {err}" if source else str(err)) from None

    # --- export -------------------------------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-able dict (tuples become lists)."""
        return json.loads(json.dumps(dataclasses.asdict(self)))

    def to_json(self, path: str | Path) -> None:
        write_text_atomic(path, json.dumps(self.to_dict(), indent=2) + "\n")

    @classmethod
    def from_json(cls: type[C], path: str | Path) -> C:
        return cls.from_dict(json.loads(Path(path).read_text()))

    def replace(self: C, **changes: Any) -> C:
        """Copy with some fields changed, re-validated."""
        return type(self).from_dict({**self.to_dict(), **changes})

    def with_overrides(self: C, overrides: Sequence[str]) -> C:
        """Apply ``key.path=value`` words (values parsed as YAML scalars/lists). Unknown keys raise."""
        data = self.to_dict()
        for word in overrides:
            if "=" not in word:
                raise ConfigError(f"override '{word}' is not of the form key.path=value")
            key, raw = word.split("=", 1)
            try:
                value = yaml.safe_load(raw) if raw != "" else ""
            except yaml.YAMLError as err:  # e.g. a tag (`!!python/...`) or an unclosed `[`
                raise ConfigError(f"override '{word}': not a YAML value ({_one_line(err)})") from None
            node = data
            parts = key.split(".")
            for i, part in enumerate(parts[:-1]):
                if not isinstance(node.get(part), dict):
                    raise ConfigError(f"unknown config key '{'.'.join(parts[: i + 1])}' in override '{word}'")
                node = node[part]
            if parts[-1] not in node:
                raise ConfigError(f"unknown config key '{key}' in override '{word}'")
            node[parts[-1]] = value
        return type(self).from_dict(data)


def _read_yaml_mapping(path: str | Path, name: str) -> Mapping[str, Any]:
    """The top-level mapping of a YAML file; ``ConfigError`` (one line) for anything else."""
    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text())
    except FileNotFoundError:
        raise ConfigError(f"config file not found: {path}") from None
    except (OSError, UnicodeDecodeError) as err:
        raise ConfigError(f"cannot read config file {path}: {err}") from None
    except yaml.YAMLError as err:
        raise ConfigError(f"{path}: invalid YAML: {_one_line(err)}") from None
    if data is None:  # an empty (or comments-only) file is a truncated copy or a wrong path far more often
        raise ConfigError(f"{path}: the config file is empty (write `{{}}` to use every default of {name})")
    if not isinstance(data, Mapping):
        got = "a list" if isinstance(data, list) else f"the scalar {str(data)[:40]!r}"
        raise ConfigError(f"{path}: expected a mapping of keys at the top level, got {got}")
    return data


def _has_presets(cls: type[Config], path: Sequence[str]) -> bool:
    """Whether the section at ``path`` (field names from ``cls``; empty: ``cls`` itself) is a config with presets."""
    for part in path:
        fields = {f.name for f in dataclasses.fields(cls)}
        tp = typing.get_type_hints(cls).get(part) if part in fields else None
        if not (isinstance(tp, type) and issubclass(tp, Config)):
            return False
        cls = tp
    return bool(cls.PRESETS)


def _one_line(err: Exception) -> str:
    """A YAML error (several lines with a caret diagram) as one line."""
    return " ".join(str(err).split())


def _deep_merge(base: dict[str, Any], update: Mapping[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in update.items():
        if isinstance(value, Mapping) and isinstance(out.get(key), Mapping):
            out[key] = _deep_merge(dict(out[key]), value)
        else:
            out[key] = value
    return out
