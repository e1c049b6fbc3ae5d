"""Precision follows the hardware: ``auto`` is bf16 autocast where the device computes bf16 natively, fp32 elsewhere.

Precisions a run can ask for (``train.precision``, the benchmarks' ``--precision``):

- ``auto`` (the default everywhere): ``autocast-bf16`` on a CUDA device of compute capability 8.0 or newer (A100,
  H100, L40S, RTX 30xx / 40xx) and on a CPU with AMX-BF16 or AVX512-BF16 (or an Arm CPU with the BF16 extension);
  ``fp32`` elsewhere (V100, T4, AVX2-only CPUs, Apple's MPS).
- ``fp32``; ``autocast-bf16`` (fp32 weights, bf16 matmuls and convolutions under ``torch.autocast``); ``bf16``
  (DeepSpeed bf16: bf16 weights with an fp32 master copy in the optimizer).

``MAGVIT_NATIVE_BF16=1`` (or ``0``) in the environment overrides the probe, e.g. where a container hides the CPU's
flags, or to make a test suite resolve ``auto`` alike on every machine.

An explicit bf16 on hardware without native bf16 still runs, but warns once: the CPU then emulates every bf16 matmul
(measured on an AMD EPYC with AVX2 only: one Moving MNIST tokenizer step took 38.9 s under bf16 autocast against 0.83 s
in fp32, 47x slower).
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import logging
import os
import platform
import subprocess
import warnings
from typing import Literal

import torch

Precision = Literal["auto", "fp32", "bf16", "autocast-bf16"]
RESOLVED_PRECISIONS: tuple[str, ...] = ("fp32", "bf16", "autocast-bf16")  # what a run trains in
PRECISIONS: tuple[str, ...] = ("auto", *RESOLVED_PRECISIONS)
_BF16 = ("bf16", "autocast-bf16")
# CPU feature flags (Linux /proc/cpuinfo) that compute bf16 dot products natively: Intel AMX, AVX512-BF16 (Intel
# Cooper Lake and newer, AMD Zen 4 and newer), the Armv8.6 BF16 extension.
_NATIVE_CPU_FLAGS = ("amx_bf16", "avx512_bf16", "bf16")
NATIVE_BF16_ENV = "MAGVIT_NATIVE_BF16"  # "1" / "0": override the hardware probe
EMULATED_SLOWDOWN = ("on a CPU without it every bf16 matmul is emulated (measured on an AMD EPYC with AVX2 only: "
                     "47x slower than fp32 for a tokenizer training step)")


@dataclasses.dataclass(frozen=True)
class Bf16Support:
    """Whether ``device`` computes bf16 natively, named for the log (``device``) with the feature that decided it."""

    native: bool
    device: str  # e.g. "AMD EPYC (cpu)", "NVIDIA H100 80GB HBM3 (cuda:0, sm_90)"
    reason: str  # e.g. "no AMX-BF16 / AVX512-BF16"


@functools.lru_cache(maxsize=1)
def _cpuinfo() -> tuple[str, frozenset[str]]:
    """The CPU's model name and feature flags from /proc/cpuinfo (Linux; elsewhere: platform's name, no flags)."""
    name, flags = "", set()
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            for line in f:
                key, _, value = line.partition(":")
                key = key.strip().lower()
                if key == "model name" and not name:
                    name = value.strip()
                elif key in ("flags", "features"):  # x86 "flags", aarch64 "Features"
                    flags.update(value.split())
    except OSError:
        pass
    if platform.system() == "Darwin" and platform.machine() == "arm64" and _sysctl("hw.optional.arm.FEAT_BF16") == "1":
        flags.add("bf16")
    return name or platform.processor() or platform.machine() or "unknown CPU", frozenset(flags)


def _sysctl(key: str) -> str:
    try:
        return subprocess.run(["sysctl", "-n", key], capture_output=True, text=True, timeout=5).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return ""


def cpu_model() -> str:
    """The CPU's model name, e.g. ``"AMD EPYC"``."""
    return _cpuinfo()[0]


def cpu_flags() -> frozenset[str]:
    """The CPU's feature flags (lower case; empty where the OS does not tell)."""
    return _cpuinfo()[1]


def bf16_support(device: torch.device | str) -> Bf16Support:
    """Whether ``device`` does bf16 natively: CUDA from compute capability 8.0 (Ampere), a CPU with AMX-BF16,
    AVX512-BF16 or Arm's BF16 extension; any other device type: no."""
    device = torch.device(device)
    forced = os.environ.get(NATIVE_BF16_ENV, "").strip()
    if forced in ("0", "1"):
        name = f"{cpu_model()} (cpu)" if device.type == "cpu" else device.type
        return Bf16Support(forced == "1", name, f"{NATIVE_BF16_ENV}={forced}")
    if device.type == "cuda":
        index = device.index if device.index is not None else torch.cuda.current_device()
        major, minor = torch.cuda.get_device_capability(index)
        name = f"{torch.cuda.get_device_name(index)} (cuda:{index}, sm_{major}{minor})"
        if major >= 8:
            return Bf16Support(True, name, "bf16 tensor cores (compute capability >= 8.0)")
        return Bf16Support(False, name, "no bf16 tensor cores (compute capability < 8.0)")
    if device.type == "cpu":
        name = f"{cpu_model()} (cpu)"
        found = [flag for flag in _NATIVE_CPU_FLAGS if flag in cpu_flags()]
        if found:
            return Bf16Support(True, name, f"native bf16 ({', '.join(found)})")
        return Bf16Support(False, name, "no AMX-BF16 / AVX512-BF16")
    return Bf16Support(False, f"{device.type}", f"bf16 autocast is not chosen automatically on {device.type}")


def resolve_precision(requested: str, device: torch.device | str) -> tuple[str, Bf16Support]:
    """The precision a run uses for ``requested`` on ``device`` (``auto`` resolved; see the module docstring), and
    the hardware facts behind it. An explicit precision is kept as it is (see :func:`emulation_warning`)."""
    if requested not in PRECISIONS:
        raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}, got {requested!r}")
    support = bf16_support(device)
    if requested == "auto":
        return ("autocast-bf16" if support.native else "fp32"), support
    return requested, support


def emulation_warning(precision: str, support: Bf16Support) -> str | None:
    """The warning for a bf16 ``precision`` on a device without native bf16, else None."""
    if precision not in _BF16 or support.native:
        return None
    return (f"precision {precision} on {support.device}: {support.reason}; {EMULATED_SLOWDOWN}. "
            "Use precision auto (or fp32) unless you are measuring bf16 itself.")


_warned: set[str] = set()


def warn_once(message: str | None, log: logging.Logger | None = None) -> None:
    """``message`` as a ``RuntimeWarning`` (and on ``log``), once per process."""
    if message is None or message in _warned:
        return
    _warned.add(message)
    if log is not None:
        log.warning("%s", message)
    else:
        warnings.warn(message, RuntimeWarning, stacklevel=3)


def describe(requested: str, resolved: str, support: Bf16Support) -> str:
    """One line for a run's log and model card, e.g. ``"fp32 (auto: AMD EPYC (cpu), no AMX-BF16 / AVX512-BF16)"``."""
    origin = "auto" if requested == "auto" else "as configured"
    return f"{resolved} ({origin}: {support.device}, {support.reason})"


def autocast(precision: str, device: torch.device | str) -> contextlib.AbstractContextManager:
    """``torch.autocast`` to bf16 for ``autocast-bf16``, else nothing (DeepSpeed's ``bf16`` casts the weights
    itself; ``fp32`` needs nothing). ``precision`` is a resolved one: ``auto`` is an error here."""
    if precision == "auto":
        raise ValueError("resolve precision 'auto' first (magvit.precision.resolve_precision)")
    if precision == "autocast-bf16":
        return torch.autocast(device_type=torch.device(device).type, dtype=torch.bfloat16)
    return contextlib.nullcontext()
