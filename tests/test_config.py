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


@pytest.mark.parametrize("text, message", [
    ("- 1\n- 2\n", "expected a mapping of keys at the top level, got a list"),
    ("42\n", "got the scalar '42'"),
    ("", "the config file is empty"),
    ("# nothing but a comment\n", "the config file is empty"),
    ("width: [1\n", "invalid YAML"),
    ("width: !!python/object/apply:os.system ['echo ran']\n", "invalid YAML"),
])
def test_yaml_files_that_are_not_mappings_are_one_line_errors(text, message, tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text(text)
    with pytest.raises(ConfigError, match=message) as err:
        Outer.from_yaml(f)
    assert "\n" not in str(err.value) and str(f) in str(err.value)
    f.write_text("{}\n")  # the explicit way to ask for every default
    assert Outer.from_yaml(f) == Outer()


@pytest.mark.parametrize("word", ["inner.rate=!!python/object/apply:os.system ['echo ran']", "inner.rate=[1",
                                  "inner.rate=!!binary aGk="])
def test_overrides_with_yaml_tags_or_bad_syntax_are_one_line_errors(word):
    with pytest.raises(ConfigError) as err:
        Outer().with_overrides([word])
    assert "\n" not in str(err.value) and word.split("=")[0] in str(err.value)


def test_nan_is_never_a_number_but_large_finite_values_are():
    for value in (".nan", "nan", "NaN"):
        with pytest.raises(ConfigError, match="inner.rate: expected a number, got NaN"):
            Outer().with_overrides([f"inner.rate={value}"])
    assert Outer().with_overrides(["inner.rate=3e38"]).inner.rate == 3e38
    assert Outer.from_dict({"inner": {"rate": float("inf")}}).inner.rate == float("inf")  # ranges: each config
