"""Precision follows the hardware: the bf16 probe (mocked both ways, and on this machine), ``auto``'s resolution,
the warning for emulated bf16, and what a run records."""

from __future__ import annotations

import warnings

import pytest
import torch

from magvit import precision
from magvit.config import ConfigError
from magvit.resume import _same_weights_precision


@pytest.fixture
def probe(monkeypatch):
    """Set the CPU the probe sees: ``probe("AMD EPYC", {"avx2"})``; the environment override unset."""
    monkeypatch.delenv(precision.NATIVE_BF16_ENV, raising=False)

    def set_cpu(name: str, flags: set[str]):
        monkeypatch.setattr(precision, "_cpuinfo", lambda: (name, frozenset(flags)))

    return set_cpu


@pytest.mark.parametrize("flags, native", [({"avx2", "fma"}, False), ({"avx512f", "avx512bw"}, False),
                                           ({"avx512f", "avx512_bf16"}, True), ({"amx_bf16", "amx_tile"}, True),
                                           ({"asimd", "bf16"}, True), (set(), False)])
def test_auto_on_cpu_follows_the_bf16_flags(probe, flags, native):
    probe("Some CPU", flags)
    resolved, support = precision.resolve_precision("auto", "cpu")
    assert support.native is native
    assert resolved == ("autocast-bf16" if native else "fp32")
    assert support.device == "Some CPU (cpu)"


@pytest.mark.parametrize("capability, native", [((7, 0), False), ((7, 5), False), ((8, 0), True), ((9, 0), True)])
def test_auto_on_cuda_follows_the_compute_capability(monkeypatch, capability, native):
    monkeypatch.delenv(precision.NATIVE_BF16_ENV, raising=False)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda index=None: capability)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda index=None: "Mock GPU")
    resolved, support = precision.resolve_precision("auto", "cuda:0")
    assert resolved == ("autocast-bf16" if native else "fp32")
    assert support.device == f"Mock GPU (cuda:0, sm_{capability[0]}{capability[1]})"


def test_other_devices_and_explicit_choices(probe):
    probe("AMD EPYC", {"avx2"})
    assert precision.resolve_precision("auto", "mps")[0] == "fp32"
    for explicit in ("fp32", "bf16", "autocast-bf16"):  # kept as asked, whatever the hardware
        assert precision.resolve_precision(explicit, "cpu")[0] == explicit
    with pytest.raises(ValueError, match="precision must be one of"):
        precision.resolve_precision("fp16", "cpu")


def test_environment_overrides_the_probe(probe, monkeypatch):
    probe("Intel Xeon", {"amx_bf16"})
    monkeypatch.setenv(precision.NATIVE_BF16_ENV, "0")
    resolved, support = precision.resolve_precision("auto", "cpu")
    assert resolved == "fp32" and support.reason == "MAGVIT_NATIVE_BF16=0"
    probe("AMD EPYC", {"avx2"})
    monkeypatch.setenv(precision.NATIVE_BF16_ENV, "1")
    assert precision.resolve_precision("auto", "cpu")[0] == "autocast-bf16"


def test_explicit_bf16_without_native_support_warns_once(probe, monkeypatch):
    probe("AMD EPYC", {"avx2"})
    monkeypatch.setattr(precision, "_warned", set())
    _, support = precision.resolve_precision("autocast-bf16", "cpu")
    message = precision.emulation_warning("autocast-bf16", support)
    assert message is not None and "AMD EPYC" in message and "47x" in message and "auto" in message
    with pytest.warns(RuntimeWarning, match="emulated"):
        precision.warn_once(message)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        precision.warn_once(message)  # the second time: silent
    assert precision.emulation_warning("fp32", support) is None
    probe("Intel Xeon", {"amx_bf16"})
    assert precision.emulation_warning("bf16", precision.bf16_support("cpu")) is None


def test_auto_on_this_machine_matches_its_cpu_flags(monkeypatch):
    """The real probe, no mock: /proc/cpuinfo read here independently of the module."""
    monkeypatch.delenv(precision.NATIVE_BF16_ENV, raising=False)
    try:
        text = open("/proc/cpuinfo").read()
    except OSError:
        pytest.skip("no /proc/cpuinfo")
    flags = {f for line in text.splitlines() if line.split(":")[0].strip().lower() in ("flags", "features")
             for f in line.split(":", 1)[1].split()}
    native = bool(flags & {"amx_bf16", "avx512_bf16", "bf16"})
    resolved, support = precision.resolve_precision("auto", "cpu")
    assert resolved == ("autocast-bf16" if native else "fp32"), support
    assert precision.describe("auto", resolved, support).startswith(f"{resolved} (auto: ")


def test_autocast_context():
    with precision.autocast("autocast-bf16", "cpu"):
        assert (torch.ones(2, 2) @ torch.ones(2, 2)).dtype == torch.bfloat16
    with precision.autocast("fp32", "cpu"):
        assert (torch.ones(2, 2) @ torch.ones(2, 2)).dtype == torch.float32
    with pytest.raises(ValueError, match="resolve"):
        precision.autocast("auto", "cpu")


def test_train_config_defaults_to_auto_and_checks_the_value():
    from magvit.run_config import TrainConfig

    assert TrainConfig().precision == "auto"
    with pytest.raises((ConfigError, ValueError), match="precision"):
        TrainConfig(precision="fp16")


def test_resume_may_switch_between_precisions_with_the_same_weights():
    assert _same_weights_precision("train.precision", "autocast-bf16", "fp32")
    assert _same_weights_precision("train.precision", "fp32", "autocast-bf16")
    assert not _same_weights_precision("train.precision", "bf16", "fp32")  # bf16 weights in the checkpoint
    assert not _same_weights_precision("train.seed", 0, 1)


def test_shipped_configs_default_to_auto():
    import yaml

    from magvit.resources import CONFIG_DIR

    paths = sorted(CONFIG_DIR.glob("*/*.yaml"))
    assert len(paths) >= 10
    for path in paths:
        train = yaml.safe_load(path.read_text()).get("train", {})
        assert train.get("precision") == "auto", path
