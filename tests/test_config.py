from dataclasses import dataclass, field
from typing import Literal, Optional

import pytest

from magvit.config import Config, ConfigError


@dataclass
class Inner(Config):
    rate: float = 1e-4
    betas: tuple[float, float] = (0.0, 0.99)


@dataclass
class Outer(Config):
    PRESETS = {"small": {"width": 8}, "big": {"width": 64, "inner": {"rate": 3e-4}}}
    width: int = 16
    kind: Literal["vq", "lfq"] = "vq"
    path: Optional[str] = None
    mults: tuple[int, ...] = (1, 2)
    inner: Inner = field(default_factory=Inner)


def test_unknown_key_is_named(tmp_path):
    with pytest.raises(ConfigError, match="inner.rte"):
        Outer.from_dict({"inner": {"rte": 1}})
    f = tmp_path / "c.yaml"
    f.write_text("preset: small\nwidht: 3\n")
    with pytest.raises(ConfigError, match="widht"):
        Outer.from_yaml(f)


def test_types_are_checked_and_coerced():
    cfg = Outer.from_dict({"mults": [1, 2, 4], "inner": {"rate": "3e-4", "betas": [0.5, 0.9]}})
    assert cfg.mults == (1, 2, 4) and cfg.inner.rate == 3e-4 and cfg.inner.betas == (0.5, 0.9)
    with pytest.raises(ConfigError, match="kind"):
        Outer.from_dict({"kind": "fsq"})
    with pytest.raises(ConfigError, match="width"):
        Outer.from_dict({"width": "wide"})


def test_presets_yaml_overrides_round_trip(tmp_path):
    big = Outer.preset("big")
    assert big.width == 64 and big.inner.rate == 3e-4 and big.inner.betas == (0.0, 0.99)
    assert Outer.preset("small", width=4).width == 4
    with pytest.raises(ConfigError, match="available"):
        Outer.preset("huge")
    f = tmp_path / "c.yaml"
    f.write_text("preset: big\ninner:\n  betas: [0.9, 0.95]\n")
    cfg = Outer.from_yaml(f)
    assert cfg.width == 64 and cfg.inner.rate == 3e-4 and cfg.inner.betas == (0.9, 0.95)
    cfg2 = cfg.with_overrides(["inner.rate=1e-3", "path=/x", "kind=lfq"])
    assert (cfg2.inner.rate, cfg2.path, cfg2.kind) == (1e-3, "/x", "lfq")
    with pytest.raises(ConfigError, match="inner.nope"):
        cfg.with_overrides(["inner.nope=1"])
    cfg2.to_json(tmp_path / "c.json")
    assert Outer.from_json(tmp_path / "c.json") == cfg2
