"""Checkpoint atomicity, latest pointer, pruning, RNG round trip and EMA export (fake engines, one process)."""

from __future__ import annotations

import dataclasses
import json
import os
import random

import numpy as np
import pytest
import torch

from magvit import checkpoint as C
from magvit.config import Config
from magvit.pretrained import PretrainedMixin
from magvit.training import EMA


class FakeEngine:
    """Stands in for a DeepSpeed engine: saves/loads its model and a counter into ``save_dir/tag``."""

    def __init__(self, model, fail_on_save=False):
        self.model, self.fail_on_save, self.counter = model, fail_on_save, 0

    def save_checkpoint(self, save_dir, tag, client_state, save_latest):
        assert save_latest is False
        path = f"{save_dir}/{tag}"
        os.makedirs(path, exist_ok=True)
        torch.save({"model": self.model.state_dict(), "counter": self.counter}, f"{path}/state.pt")
        if self.fail_on_save:
            raise KeyboardInterrupt("crash mid-save")

    def load_checkpoint(self, load_dir, tag, load_optimizer_states, load_lr_scheduler_states):
        state = torch.load(f"{load_dir}/{tag}/state.pt", weights_only=True)
        self.model.load_state_dict(state["model"])
        self.counter = state["counter"]
        return f"{load_dir}/{tag}", {}


def test_rng_state_round_trip():
    C.seed_everything(3)
    state = json.loads(json.dumps(C.capture_rng_state()))  # JSON-able
    first = (random.random(), np.random.rand(), torch.rand(2))
    torch.randn(10), random.random(), np.random.rand()  # move every generator on
    C.restore_rng_state(state)
    second = (random.random(), np.random.rand(), torch.rand(2))
    assert first[0] == second[0] and first[1] == second[1] and torch.equal(first[2], second[2])


def test_save_load_round_trip_and_pruning(tmp_path):
    model = torch.nn.Linear(2, 2)
    engine = FakeEngine(model)
    ema = EMA(model, 0.5)
    mgr = C.CheckpointManager(tmp_path / "ckpt", keep_last=2)
    for step in (2, 4, 6):
        engine.counter = step
        with torch.no_grad():
            model.weight.fill_(step)
        ema.update(model)
        rng_at_save = torch.get_rng_state()
        mgr.save(step, {"generator": engine}, {"data": {"epoch": 1, "batch": step}}, ema=ema)
    assert [s for s, _ in C.list_checkpoints(mgr.root)] == [4, 6]  # kept the last 2
    assert (mgr.root / "latest").read_text().strip() == "step_00000006"
    saved_shadow = {k: v.clone() for k, v in ema.shadow.items()}
    torch.set_rng_state(rng_at_save)
    expected_next = torch.rand(3)  # what the run would have drawn next after its last save

    fresh = torch.nn.Linear(2, 2)
    engine2, ema2 = FakeEngine(fresh), EMA(fresh, 0.9)
    torch.manual_seed(0)
    state = mgr.load(C.latest_checkpoint(mgr.root), {"generator": engine2}, ema=ema2)
    assert state["step"] == 6 and state["data"] == {"epoch": 1, "batch": 6} and engine2.counter == 6
    assert torch.all(fresh.weight == 6)
    assert ema2.decay == 0.5 and ema2.num_updates == 3
    torch.testing.assert_close(ema2.shadow, saved_shadow)
    assert "rng_restored" not in state
    assert torch.equal(torch.rand(3), expected_next)  # RNG restored by the load


def test_crash_mid_save_keeps_last_good_checkpoint(tmp_path):
    model = torch.nn.Linear(2, 2)
    mgr = C.CheckpointManager(tmp_path / "ckpt", keep_last=3)
    good = FakeEngine(model)
    good.counter = 10
    mgr.save(10, {"generator": good}, {})
    crashing = FakeEngine(model, fail_on_save=True)
    crashing.counter = 20
    with pytest.raises(KeyboardInterrupt):
        mgr.save(20, {"generator": good, "discriminator": crashing}, {})
    assert (mgr.root / ".tmp-step_00000020").is_dir()  # half-written, never renamed
    assert C.latest_checkpoint(mgr.root) == mgr.root / "step_00000010"
    assert [s for s, _ in C.list_checkpoints(mgr.root)] == [10]
    mgr.clean_stale()
    assert not (mgr.root / ".tmp-step_00000020").exists()
    restored = FakeEngine(torch.nn.Linear(2, 2))
    assert mgr.load(C.latest_checkpoint(mgr.root), {"generator": restored})["step"] == 10
    assert restored.counter == 10


def test_latest_falls_back_when_pointer_is_stale(tmp_path):
    mgr = C.CheckpointManager(tmp_path, keep_last=5)
    engine = FakeEngine(torch.nn.Linear(1, 1))
    mgr.save(1, {"g": engine}, {})
    mgr.save(2, {"g": engine}, {})
    (tmp_path / "latest").write_text("step_00000009\n")  # points at nothing
    assert C.latest_checkpoint(tmp_path) == tmp_path / "step_00000002"
    (tmp_path / "step_00000002" / "COMPLETE").unlink()  # incomplete folders never count
    assert C.latest_checkpoint(tmp_path) == tmp_path / "step_00000001"
    assert C.latest_checkpoint(tmp_path / "none") is None
    with pytest.raises(ValueError, match="not a complete checkpoint"):
        mgr.load(tmp_path / "step_00000002", {"g": engine})


@dataclasses.dataclass
class _TinyConfig(Config):
    dim: int = 3


class _Tiny(torch.nn.Module, PretrainedMixin):
    config_class = _TinyConfig
    model_type = "tiny-test"

    def __init__(self, config):
        super().__init__()
        self.config = config
        self.proj = torch.nn.Linear(config.dim, config.dim)
        self.register_buffer("codebook_usage", torch.zeros(config.dim))


def test_export_ema_writes_averaged_weights_and_buffers(tmp_path):
    model = _Tiny(_TinyConfig())
    ema = EMA(model, 0.5)
    with torch.no_grad():
        model.proj.weight.add_(2.0)
        model.codebook_usage.fill_(7.0)
    ema.update(model)
    expected = ema.shadow["proj.weight"].clone()
    out = C.export_ema(model, ema, tmp_path / "export")
    loaded = _Tiny.from_pretrained(out)
    torch.testing.assert_close(loaded.proj.weight, expected)
    assert torch.all(loaded.codebook_usage == 7.0)
