"""Checkpoint atomicity, latest pointer, pruning, RNG round trip and EMA export (fake engines, one process)."""

from __future__ import annotations

import dataclasses
import json
import os
import random
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from magvit import checkpoint as C
from magvit.config import Config
from magvit.pretrained import PretrainedMixin
from magvit.ema import EMA


class FakeEngine:
    """Stands in for a DeepSpeed engine built by ``distributed.build_engine`` (whose checkpoint engine loads
    safely): saves/loads its model and a counter into ``save_dir/tag``."""

    checkpoint_engine = SimpleNamespace(loads_safely=True)

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
    with pytest.raises(C.CheckpointError, match="not a complete checkpoint"):
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


# Real DeepSpeed engines (one process): ZeRO-0..3 in fp32 and bf16 saved through CheckpointManager, the globals
# each file pickles listed, every checkpoint loaded back through the safe path, and a planted pickle refused.
_SURVEY = r'''
import glob, json, os, pickle, sys
import torch
from magvit import distributed as dist
from magvit.checkpoint import CheckpointError, CheckpointManager
from magvit.optim import OptimConfig, WarmupCosineSchedule, build_adam

def engine(stage, precision, seed):
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.LayerNorm(8), torch.nn.Linear(8, 2))
    opt = build_adam(model, OptimConfig(weight_decay=0.01))
    cfg = dist.make_deepspeed_config({}, micro_batch_size=2, grad_accum_steps=1, grad_clip=1.0, precision=precision,
                                     zero_stage=stage)
    return dist.build_engine(model, opt, cfg, WarmupCosineSchedule(opt, 2, 10, 0.1))

def weights(e, stage):
    with dist.gathered_parameters(e.module, stage):
        return [p.detach().float().clone() for p in e.module.parameters()]

class Planted:
    def __reduce__(self):
        return (os.system, ("touch " + sys.argv[2],))

dist.init_distributed()
report = {}
for stage in (0, 1, 2, 3):
    for precision in ("fp32", "bf16"):
        a = engine(stage, precision, 0)
        x = torch.randn(2, 4, dtype=torch.bfloat16 if precision == "bf16" else torch.float32)
        a.backward(a(x).float().pow(2).mean()); a.step()
        mgr = CheckpointManager(os.path.join(sys.argv[1], f"z{stage}-{precision}"))
        path = mgr.save(1, {"net": a}, {"data": {}})
        files = sorted(glob.glob(f"{path}/net/*.pt"))
        entry = {"default": sorted({g for f in files for g in torch.serialization.get_unsafe_globals_in_checkpoint(f)}),
                 "allowed": sorted({g for f in files for g in dist.unsafe_globals_in(f)})}
        b = engine(stage, precision, 1)
        mgr.load(path, {"net": b})
        entry["weights_equal"] = all(torch.equal(u, v) for u, v in zip(weights(a, stage), weights(b, stage)))
        entry["schedule_step"] = b.lr_scheduler.last_epoch
        torch.save({"module": Planted()}, files[0])
        try:
            b.checkpoint_engine.load(files[0], map_location="cpu")
            entry["engine_load"] = "loaded"
        except pickle.UnpicklingError:
            entry["engine_load"] = "refused"
        try:
            mgr.load(path, {"net": b})
            entry["manager_load"] = "loaded"
        except CheckpointError as err:
            entry["manager_load"] = str(err)
        report[f"z{stage}-{precision}"] = entry
        a.destroy(); b.destroy()
print("REPORT " + json.dumps(report))
'''


@pytest.mark.slow
def test_deepspeed_checkpoints_load_without_unpickling_code(tmp_path):
    """The allow-list of ``distributed.checkpoint_safe_globals`` is exactly what real ZeRO-0..3 fp32/bf16 checkpoints
    need: with it no file references anything else, without it the union is exactly those classes; every
    checkpoint loads back (same weights, schedule position) through the safe path, and a planted pickle is refused
    by the engine's own loader and by ``CheckpointManager.load`` without running (no marker file)."""
    import subprocess
    import sys
    from pathlib import Path

    from magvit import distributed as dist

    script, marker = tmp_path / "survey.py", tmp_path / "code_ran"
    script.write_text(_SURVEY)
    root = Path(__file__).resolve().parents[1]
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1", "PYTHONPATH": str(root)}
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        env.pop(key, None)
    result = subprocess.run([sys.executable, str(script), str(tmp_path / "ckpt"), str(marker)], cwd=root, env=env,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(next(line for line in result.stdout.splitlines() if line.startswith("REPORT "))[7:])
    assert sorted(report) == [f"z{s}-{p}" for s in range(4) for p in ("bf16", "fp32")]
    allow = {f"{c.__module__}.{c.__qualname__}" for c in dist.checkpoint_safe_globals()}
    assert set().union(*(set(e["default"]) for e in report.values())) == allow  # every entry is needed
    for name, entry in report.items():
        assert entry["allowed"] == [], name
        assert entry["weights_equal"] and entry["schedule_step"] == 1, name
        assert entry["engine_load"] == "refused", name
        assert "refusing to load" in entry["manager_load"] and "posix.system" in entry["manager_load"], name
        assert "\n" not in entry["manager_load"]
    assert not marker.exists()


class FullDiskEngine(FakeEngine):
    """Writes half of its state file, then fails as a full disk does: ``OSError(ENOSPC)`` from the file system,
    or torch's zip writer's ``RuntimeError(... unexpected pos ...)`` (what a real full disk gave)."""

    def __init__(self, model, error):
        super().__init__(model)
        self.error = error

    def save_checkpoint(self, save_dir, tag, client_state, save_latest):
        os.makedirs(f"{save_dir}/{tag}", exist_ok=True)
        with open(f"{save_dir}/{tag}/state.pt", "wb") as f:
            f.write(b"PK\x03\x04 half a zip archive")
        raise self.error


@pytest.mark.parametrize("error", [OSError(28, "No space left on device"),
                                   RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 16384 "
                                                "vs 16278")], ids=["ENOSPC", "zip-writer"])
def test_full_disk_mid_save_is_one_line_and_keeps_the_previous(error, tmp_path):
    model = torch.nn.Linear(2, 2)
    mgr = C.CheckpointManager(tmp_path / "ckpt", keep_last=3)
    good = FakeEngine(model)
    good.counter = 10
    mgr.save(10, {"generator": good}, {})
    with pytest.raises(C.CheckpointError) as err:
        mgr.save(20, {"generator": good, "discriminator": FullDiskEngine(model, error)}, {})
    message = str(err.value)
    assert "\n" not in message and "could not write checkpoint step_00000020" in message
    assert "is the disk full?" in message and "the latest checkpoint is still step_00000010" in message
    assert sorted(p.name for p in mgr.root.iterdir()) == ["latest", "step_00000010"]  # no temp folder left
    restored = FakeEngine(torch.nn.Linear(2, 2))
    assert mgr.load(C.latest_checkpoint(mgr.root), {"generator": restored})["step"] == 10
    assert restored.counter == 10 and torch.equal(restored.model.weight, model.weight)


def test_unreadable_checkpoint_files_are_one_line_errors(tmp_path):
    """A truncated DeepSpeed file, a trainer state that is not JSON, another world size: CheckpointError with one
    line before any engine reads; a planted pickle is named with the global it would call."""
    mgr = C.CheckpointManager(tmp_path, keep_last=5)
    engine = FakeEngine(torch.nn.Linear(1, 1))
    path = mgr.save(1, {"g": engine}, {})
    state_file = path / "g" / "state.pt"
    original = state_file.read_bytes()
    state_file.write_bytes(original[:100])
    with pytest.raises(C.CheckpointError, match="damaged or not a torch.save file") as err:
        mgr.load(path, {"g": engine})
    assert "\n" not in str(err.value)
    state_file.write_bytes(original)

    class Planted:
        def __reduce__(self):
            return (os.system, (f"touch {tmp_path / 'code_ran'}",))

    torch.save({"model": Planted()}, state_file)
    with pytest.raises(C.CheckpointError, match="references posix.system"):
        mgr.load(path, {"g": engine})
    assert not (tmp_path / "code_ran").exists()
    torch.save({"model": engine.model.state_dict(), "counter": 1}, state_file)
    (path / C.TRAINER_STATE).write_text('{"step": 1, "world_size": 2}')
    with pytest.raises(C.CheckpointError, match="written by 2 rank"):
        mgr.load(path, {"g": engine})
    (path / C.TRAINER_STATE).write_text("{not json")
    with pytest.raises(C.CheckpointError, match="trainer_state.json: cannot read"):
        mgr.load(path, {"g": engine})


def test_clean_stale_removes_temp_folders_and_torn_pointers(tmp_path):
    mgr = C.CheckpointManager(tmp_path, keep_last=5)
    mgr.save(1, {"g": FakeEngine(torch.nn.Linear(1, 1))}, {})
    (tmp_path / ".tmp-step_00000002" / "g").mkdir(parents=True)
    (tmp_path / ".latest.tmp123").write_text("step_00000002\n")
    mgr.clean_stale()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["latest", "step_00000001"]


def test_full_disk_while_writing_the_ema_file(tmp_path, monkeypatch):
    """safetensors reports a full disk with its own error type (not OSError): still one CheckpointError line."""
    from safetensors import SafetensorError

    model = torch.nn.Linear(2, 2)
    mgr = C.CheckpointManager(tmp_path / "ckpt", keep_last=3)
    mgr.save(1, {"generator": FakeEngine(model)}, {}, ema=EMA(model, 0.5))

    def full(*args, **kwargs):
        raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")

    monkeypatch.setattr(C, "save_file", full)
    with pytest.raises(C.CheckpointError, match="is the disk full") as err:
        mgr.save(2, {"generator": FakeEngine(model)}, {}, ema=EMA(model, 0.5))
    assert "\n" not in str(err.value) and "still step_00000001" in str(err.value)
    assert sorted(p.name for p in mgr.root.iterdir()) == ["latest", "step_00000001"]


def test_each_rank_checks_the_shared_files_and_its_own_shards(tmp_path):
    """Per-rank work stays constant with the number of ranks: rank r reads ``zero_pp_rank_r_*`` and the files
    without a rank; a bad shard of rank 1 is found by rank 1 (``load`` then stops every rank together)."""
    mgr = C.CheckpointManager(tmp_path, keep_last=5)
    engine = FakeEngine(torch.nn.Linear(1, 1))
    path = mgr.save(1, {"g": engine}, {})
    (path / "g" / "zero_pp_rank_1_mp_rank_00_optim_states.pt").write_bytes(b"not a zip archive")
    assert C._check_engine_files(path, {"g": engine}, rank=0) is None
    assert "zero_pp_rank_1_mp_rank_00_optim_states.pt: damaged" in C._check_engine_files(path, {"g": engine}, rank=1)
    (path / "g" / "zero_pp_rank_0_mp_rank_00_optim_states.pt").write_bytes(b"not a zip archive")
    assert "zero_pp_rank_0_mp_rank_00_optim_states.pt: damaged" in C._check_engine_files(path, {"g": engine}, rank=0)
