"""Shared training pieces: LR schedule, weight-decay groups, EMA, non-finite guard, resumable data order, CLI, run
directory and metrics, resume, and the shared training loop."""

from __future__ import annotations

import dataclasses
import json
import math

import pytest
import torch
import yaml

from magvit.cli import UsageError, run_main
from magvit.config import Config, ConfigError
from magvit.tracking import Tracker, TrackingConfig
from magvit import batches, optim, resume, run_config, runlog, trainloop
from magvit.ema import EMA


def test_warmup_cosine_known_values():
    f = lambda s: optim.warmup_cosine(s, warmup_steps=4, max_steps=12, min_lr_ratio=0.1)  # noqa: E731
    assert [f(s) for s in range(4)] == [0.25, 0.5, 0.75, 1.0]
    assert f(4) == pytest.approx(1.0)
    assert f(8) == pytest.approx(0.1 + 0.9 * 0.5)  # half way through the decay
    assert f(12) == pytest.approx(0.1) and f(50) == pytest.approx(0.1)
    values = [f(s) for s in range(4, 13)]
    assert all(a >= b for a, b in zip(values, values[1:]))  # monotone decay
    assert optim.warmup_cosine(0, 0, 10, 0.0) == pytest.approx(1.0)


def test_scheduler_matches_function_and_round_trips():
    p = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([p], lr=2.0)
    sched = optim.WarmupCosineSchedule(opt, warmup_steps=3, max_steps=10, min_lr_ratio=0.0)
    lrs = []
    for _ in range(6):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert lrs == pytest.approx([2.0 * optim.warmup_cosine(s, 3, 10, 0.0) for s in range(6)])
    opt2 = torch.optim.SGD([p], lr=2.0)
    sched2 = optim.WarmupCosineSchedule(opt2, warmup_steps=3, max_steps=10, min_lr_ratio=0.0)
    sched2.load_state_dict(sched.state_dict())
    opt2.param_groups[0]["lr"] = sched2.get_last_lr()[0]
    assert opt2.param_groups[0]["lr"] == pytest.approx(opt.param_groups[0]["lr"])


class _Net(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = torch.nn.Embedding(10, 4)
        self.conv = torch.nn.Conv3d(4, 4, 3)
        self.norm = torch.nn.GroupNorm(2, 4)
        self.proj = torch.nn.Linear(4, 4)
        self.ln = torch.nn.LayerNorm(4)
        self.codebook = torch.nn.Parameter(torch.randn(8, 4))


def test_weight_decay_groups_exclude_norms_biases_embeddings():
    net = _Net()
    groups = optim.weight_decay_param_groups(net, 0.05)
    decay = {id(p) for p in groups[0]["params"]}
    no_decay = {id(p) for p in groups[1]["params"]}
    assert groups[0]["weight_decay"] == 0.05 and groups[1]["weight_decay"] == 0.0
    assert decay == {id(net.conv.weight), id(net.proj.weight)}
    assert no_decay == {id(p) for p in net.parameters()} - decay
    assert len(decay) + len(no_decay) == len(list(net.parameters()))


def test_ema_matches_closed_form_and_round_trips():
    net = torch.nn.Linear(3, 2)
    w0 = net.weight.detach().clone()
    ema = EMA(net, decay=0.9)
    with torch.no_grad():
        net.weight.fill_(1.0)
    for _ in range(3):
        ema.update(net)
    # shadow_n = 0.9^n w0 + (1 - 0.9^n) * 1
    expected = 0.9 ** 3 * w0 + (1 - 0.9 ** 3)
    torch.testing.assert_close(ema.shadow["weight"], expected)
    other = EMA(torch.nn.Linear(3, 2), decay=0.5)
    other.load_state_dict(ema.state_dict())
    assert other.decay == 0.9 and other.num_updates == 3
    target = torch.nn.Linear(3, 2)
    other.copy_to(target)
    torch.testing.assert_close(target.weight.detach(), expected)
    with pytest.raises(ValueError, match="does not match"):
        EMA(torch.nn.Linear(3, 3, bias=False), 0.9).load_state_dict(ema.state_dict())


def test_ema_warmup_decay_known_values():
    net = torch.nn.Linear(1, 1, bias=False)
    with torch.no_grad():
        net.weight.fill_(0.0)
    ema = EMA(net, decay=0.999, warmup=True)
    assert ema.current_decay() == pytest.approx(0.1)  # (1 + 0) / (10 + 0)
    with torch.no_grad():
        net.weight.fill_(1.0)
    ema.update(net)  # shadow = 0.1 * 0 + 0.9 * 1
    assert ema.shadow["weight"].item() == pytest.approx(0.9)
    assert ema.current_decay() == pytest.approx(2 / 11)
    ema.num_updates = 10**6
    assert ema.current_decay() == 0.999


def test_nonfinite_guard_skips_and_stops():
    guard = trainloop.NonFiniteGuard(max_consecutive=3)
    assert guard.check(1.0, step=0)
    assert not guard.check(float("nan"), step=1)
    assert not guard.check(float("inf"), step=1)
    assert guard.check(0.5, step=1) and guard.consecutive == 0 and guard.total_skipped == 2
    # another rank's NaN (the reduce returns the max over ranks) skips here too
    assert not guard.check(0.5, step=2, reduce_max=lambda v: 1.0)
    guard.check(float("nan"), step=2)
    with pytest.raises(trainloop.NonFiniteLossError, match="3 non-finite losses in a row"):
        guard.check(float("nan"), step=2)


def test_nonfinite_guard_fails_a_short_run_whose_every_step_was_skipped():
    guard = trainloop.NonFiniteGuard(max_consecutive=20)
    for step in (1, 2, 3):
        assert not guard.check_step(False, step)
    with pytest.raises(trainloop.NonFiniteLossError, match="every optimizer step of this run \\(4, to step 4\\)"):
        guard.check_step(False, 4, last=True)
    # one applied step in the run: a finished run, not an error
    guard = trainloop.NonFiniteGuard(max_consecutive=20)
    assert guard.check_step(True, 1) and not guard.check_step(False, 2, last=True)
    # resumed at step 10: only this run's steps count
    guard = trainloop.NonFiniteGuard(max_consecutive=20)
    guard.run_start = 10
    assert guard.check_step(True, 11) and not guard.check_step(False, 12, last=True)
    guard.run_start = 12
    with pytest.raises(trainloop.NonFiniteLossError):
        guard.check_step(False, 13, last=True)


def test_sampler_partitions_and_resumes_mid_epoch():
    samplers = [batches.ResumableDistributedSampler(23, rank=r, world_size=2, batch_size=3, seed=7) for r in range(2)]
    for s in samplers:
        s.set_epoch(1)
    full = [list(s) for s in samplers]
    assert all(len(f) == 9 for f in full)  # 11 per rank -> 3 whole batches
    assert not set(full[0]) & set(full[1])
    samplers[0].set_epoch(1, start_batch=2)
    assert list(samplers[0]) == full[0][6:] and len(samplers[0]) == 3
    samplers[0].set_epoch(2)
    assert list(samplers[0]) != full[0]  # new permutation each epoch
    with pytest.raises(ValueError, match="smaller than one global batch"):
        batches.ResumableDistributedSampler(3, rank=0, world_size=2, batch_size=2)


class _Items(torch.utils.data.Dataset):
    def __init__(self, n):
        self.n, self.epochs = n, []

    def set_epoch(self, epoch):
        self.epochs.append(epoch)

    def __len__(self):
        return self.n

    def __getitem__(self, i):
        return i


def _stream(epoch=0, batch=0):
    data = _Items(10)
    sampler = batches.ResumableDistributedSampler(10, 0, 1, batch_size=3, seed=1)
    loader = lambda s: torch.utils.data.DataLoader(data, batch_size=3, sampler=s, drop_last=True)  # noqa: E731
    return batches.BatchStream(data, sampler, loader, epoch=epoch, batch=batch), data


def test_batch_stream_resume_sees_the_same_batches():
    stream, data = _stream()
    seen = [next(stream).tolist() for _ in range(8)]  # 3 batches per epoch: crosses two epoch ends
    assert data.epochs == [0, 1, 2]
    stream2, _ = _stream()
    for _ in range(4):
        next(stream2)
    state = stream2.state_dict()
    assert state == {"epoch": 1, "batch": 1}
    resumed, _ = _stream(**state)
    assert [next(resumed).tolist() for _ in range(4)] == seen[4:]
    done, _ = _stream(epoch=0, batch=3)  # saved exactly at an epoch end
    assert next(done).tolist() == seen[3]


@dataclasses.dataclass
class _Model(Config):
    PRESETS = {"tiny": {"width": 8}, "B": {"width": 64}}
    width: int = 4
    depth: int = 2


@dataclasses.dataclass
class _RunCfg(Config):
    model: _Model = dataclasses.field(default_factory=lambda: _Model.preset("tiny"))
    train: run_config.TrainConfig = dataclasses.field(default_factory=run_config.TrainConfig)


def test_load_train_config_expands_presets_and_applies_overrides(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump({"model": {"preset": "B", "depth": 3}, "train": {"max_steps": 5}}))
    cfg = run_config.load_train_config(_RunCfg, str(path), ["model.width=16", "train.precision=bf16"],
                                       deepspeed_config="x.json")
    assert cfg.model == _Model(width=16, depth=3) and cfg.to_dict()["model"] == {"width": 16, "depth": 3}
    assert cfg.train.max_steps == 5 and cfg.train.precision == "bf16" and cfg.train.deepspeed_config == "x.json"
    assert not cfg.train.compile  # off by default (BENCHMARKS.md: pays only for long tokenizer runs on CPU)
    assert run_config.load_train_config(_RunCfg, str(path), ["train.compile=true"]).train.compile is True
    switched = run_config.load_train_config(_RunCfg, str(path), ["model.preset=tiny"])
    assert switched.model == _Model(width=8, depth=3)  # the YAML's depth override survives the preset switch
    # the resolved config (what config.yaml and checkpoints record) reads back as the same values
    assert _RunCfg.from_dict(yaml.safe_load(yaml.safe_dump(switched.to_dict()))) == switched
    with pytest.raises(ConfigError, match="model.nope"):
        run_config.load_train_config(_RunCfg, str(path), ["model.nope=1"])
    with pytest.raises(ConfigError, match="unknown _Model preset 'XL'"):
        run_config.load_train_config(_RunCfg, str(path), ["model.preset=XL"])
    with pytest.raises(ConfigError, match="precision"):
        run_config.load_train_config(_RunCfg, str(path), ["train.precision=fp8"])
    with pytest.raises(ConfigError, match="not found"):
        run_config.load_train_config(_RunCfg, str(tmp_path / "missing.yaml"), [])


def test_cli_user_errors_are_one_line_exit_2(capsys):
    parser = run_config.build_arg_parser("x", "c.yaml")

    def main(argv):
        run_config.parse_args(parser, argv)
        raise ConfigError("unknown config key 'train.nope'")

    def status(argv):  # as the console command runs it: argparse errors exit, the others return
        try:
            return run_main("train", main, argv)
        except SystemExit as exit_:
            return exit_.code

    assert status(["--local_rank=1", "a.b=1"]) == 2
    err = capsys.readouterr().err
    assert err.strip() == "train: error: unknown config key 'train.nope'"
    assert status(["--bogus"]) == 2
    assert status(["word"]) == 2
    assert capsys.readouterr().err.count("\n") == 2
    args = run_config.parse_args(parser, ["--config", "a.yaml", "x.y=1", "--resume", "auto", "--local_rank=0"])
    assert args.overrides == ["x.y=1"] and args.resume == "auto" and args.config == "a.yaml"


def test_run_dir_and_metrics(tmp_path):
    cfg = run_config.TokenizerTrainConfig()
    run = runlog.setup_run_dir(tmp_path / "run", cfg, {"zero_optimization": {"stage": 2}}, ["train.py", "a=1"])
    runlog.setup_run_dir(run, cfg, None, ["train.py", "--resume", "auto"])
    assert all((run / d).is_dir() for d in runlog.RUN_SUBDIRS)
    assert run_config.TokenizerTrainConfig.from_dict(yaml.safe_load((run / "config.yaml").read_text())) == cfg
    assert json.loads((run / "deepspeed_config.json").read_text())["zero_optimization"]["stage"] == 2
    assert len((run / "command.txt").read_text().splitlines()) == 2  # one line per launch
    assert "magvit 0.1.0" in (run / "version.txt").read_text()
    tracker = Tracker(TrackingConfig(), run, is_main=True)
    log = runlog.MetricsLogger(run, tracker=tracker)
    log.log(1, {"loss": torch.tensor(0.5).item(), "lr": 1e-3})
    log.log(2, {"loss": math.nan})
    log.close()
    tracker.close()
    with open(run / "metrics.jsonl", "a") as f:
        f.write('{"step": 3, "lo')  # torn line of a killed run
    records = runlog.read_metrics(run / "metrics.jsonl")
    assert [r["step"] for r in records] == [1, 2] and records[0]["loss"] == 0.5
    assert any((run / "tb").iterdir())
    runlog.MetricsLogger(run, enabled=False).log(5, {"x": 1.0})  # other ranks: no-op
    assert len(runlog.read_metrics(run / "metrics.jsonl")) == 2


@pytest.mark.parametrize("kind", ["tokenizer", "transformer"])
def test_repository_configs_load_strictly(kind, monkeypatch):
    """Every shipped YAML resolves (presets expanded, model sizes consistent with the data section)."""
    import importlib
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    monkeypatch.chdir(root)
    module = importlib.import_module(f"magvit.launch.train_{kind}")
    names = sorted(p.stem for p in (root / "configs" / kind).glob("*.yaml"))
    assert names == (["B", "B2", "L", "L2", "demo", "mnist", "tiny"] if kind == "tokenizer"
                     else ["B", "L", "demo", "mnist", "sketch", "tiny"])
    for name in names:
        cfg = module.load_config(f"configs/{kind}/{name}.yaml", [])
        assert cfg.train.deepspeed_config == "configs/deepspeed/zero2.json"
        if kind == "tokenizer":
            assert (cfg.model.num_frames, cfg.model.image_size) == (cfg.data.num_frames, cfg.data.image_size)
            assert (cfg.discriminator.num_frames, cfg.discriminator.image_size) == (cfg.model.num_frames,
                                                                                    cfg.model.image_size)
            if name == "mnist":  # Moving MNIST: 17 frames -> 5 latent frames; the 5 given ones are latent frames 0-1
                from magvit.conditions import latent_condition_region

                grid = cfg.model.token_grid(17, 64, 64)
                region = latent_condition_region("frame_prediction", grid, (17, 64, 64), True, num_cond_frames=5)
                assert grid == (5, 8, 8) and region.flatten(1).all(1).tolist() == [True, True, False, False, False]
            elif name not in ("tiny", "demo"):
                v2 = name.endswith("2")  # MAGVIT-v2's causal 1 + 16 frames
                assert (cfg.data.num_frames, cfg.data.image_size) == (17 if v2 else 16, 128)
                assert (cfg.optim.beta1, cfg.optim.beta2) == (0.0, 0.99)
        else:  # interior (COMMIT) on the COMMIT tasks; the sketch model is the prefix one
            sketch = name == "sketch"
            assert cfg.model.conditioning == ("prefix" if sketch else "interior")
            assert ("sketch" in cfg.model.tasks) is sketch


class _FakeBar:
    def __init__(self):
        self.n, self.postfix = 0, None

    def update(self, n):
        self.n += n

    def set_postfix(self, **kwargs):
        self.postfix = kwargs

    def close(self):
        self.closed = True


def test_metrics_window_means_rate_and_reset(tmp_path):
    times = iter([10.0, 14.0, 14.5, 15.5, 16.0])  # start; each log: its end, the next start
    metrics_log = runlog.MetricsLogger(tmp_path)
    bar = _FakeBar()
    window = runlog.MetricsWindow(metrics_log, bar, items_per_step=8, rate_key="perf/clips_per_s",
                                  loss_key="g/loss", rate_label="clips_s", clock=lambda: next(times))
    window.add({"g/loss": 1.0, "g/recon": 3.0})
    window.add({"g/loss": 2.0})
    window.end_step()
    window.add({"g/loss": 6.0})
    window.end_step()
    means = window.log(2, {"lr/generator": 1e-3}, epoch=1)
    # one process: the means over ranks are this rank's means; 2 steps x 8 clips in 4 s
    assert list(means)[:6] == ["g/loss", "g/recon", "lr/generator", "perf/clips_per_s", "perf/step_s", "epoch"]
    assert means["g/loss"] == pytest.approx(3.0) and means["g/recon"] == 3.0
    assert means["perf/clips_per_s"] == pytest.approx(4.0) and means["perf/step_s"] == pytest.approx(2.0)
    assert means["mem/peak_mb_max"] == means["mem/peak_mb_min"] > 0
    assert bar.n == 2 and bar.postfix == {"loss": "3.0000", "clips_s": "4.0"}
    window.add({"g/recon": 5.0})  # a window without the loss key: the bar shows nan
    window.end_step()
    second = window.log(3, {}, epoch=1)
    assert "g/loss" not in second and second["perf/clips_per_s"] == pytest.approx(8.0)
    assert bar.postfix["loss"] == "nan"
    metrics_log.close()
    records = runlog.read_metrics(tmp_path / "metrics.jsonl")
    assert [r["step"] for r in records] == [2, 3] and records[0]["g/loss"] == pytest.approx(3.0)


def test_make_batch_stream_shards_and_rejects_tiny_data():
    dataset = torch.utils.data.TensorDataset(torch.arange(10))
    data = batches.DataConfig(batch_size=2, num_workers=0)
    seen = []
    for rank in range(2):
        stream = batches.make_batch_stream(dataset, data, rank, 2, seed=3, device=torch.device("cpu"))
        drawn = [next(stream)[0] for _ in range(stream.sampler.batches_per_epoch)]
        assert all(b.shape == (2,) for b in drawn) and stream.state_dict() == {"epoch": 0, "batch": 2}
        seen += torch.cat(drawn).tolist()
    assert len(seen) == len(set(seen)) == 8  # the ranks' shares are disjoint
    with pytest.raises(ValueError, match="global batch"):
        batches.make_batch_stream(dataset, batches.DataConfig(batch_size=6, num_workers=0), 0, 2, 0,
                                  torch.device("cpu"))


def _child_pids() -> list[int]:
    """This process's children (Linux /proc): the DataLoader workers."""
    import os
    from pathlib import Path

    kids = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == os.getpid():
            kids.append(int(stat.parent.name))
    return kids


@pytest.mark.skipif(not __import__("sys").platform.startswith("linux"), reason="reads /proc")
def test_loader_workers_outlive_a_sigterm_to_the_process_group():
    """SLURM and ``kill`` of a process group send SIGTERM to the DataLoader workers too: they must live on, so the
    rank can finish its step and checkpoint (without ``ignore_stop_signals`` the next batch raises "DataLoader
    worker ... is killed by signal: Terminated")."""
    import os
    import signal
    import time

    dataset = torch.utils.data.TensorDataset(torch.arange(64))
    stream = batches.make_batch_stream(dataset, batches.DataConfig(batch_size=2, num_workers=2), 0, 1, seed=3,
                                       device=torch.device("cpu"))
    first = [next(stream)[0] for _ in range(2)]
    workers = _child_pids()
    assert len(workers) >= 2
    for pid in workers:
        os.kill(pid, signal.SIGTERM)
    time.sleep(0.5)
    assert all(os.path.exists(f"/proc/{pid}") for pid in workers)
    rest = [next(stream)[0] for _ in range(stream.sampler.batches_per_epoch - 2)]
    drawn = torch.cat(first + rest).tolist()
    assert sorted(drawn) == list(range(64))  # the whole epoch arrives, nothing lost


def test_parse_train_command_defaults_and_user_errors(monkeypatch):
    from pathlib import Path

    monkeypatch.chdir(Path(__file__).resolve().parents[1])
    calls = []

    def load_config(path, overrides, deepspeed_config):
        calls.append((path, list(overrides), deepspeed_config))
        return run_config.TransformerTrainConfig().with_overrides([f"train.deepspeed_config={deepspeed_config}"]
                                                         if deepspeed_config else [])

    args, cfg, ds_base = run_config.parse_train_command("x", "configs/transformer/tiny.yaml", "transformer",
                                                        load_config, ["train.seed=1"])
    assert calls == [("configs/transformer/tiny.yaml", ["train.seed=1"], None)]
    assert args.run_dir == Path("runs/transformer/tiny") and args.resume == "auto"
    assert isinstance(ds_base, dict) and "zero_optimization" in ds_base
    args, _, _ = run_config.parse_train_command("x", "c.yaml", "tokenizer", load_config, ["--run-dir", "/tmp/r"])
    assert args.run_dir == Path("/tmp/r")
    with pytest.raises(UsageError, match="zero9"):
        run_config.parse_train_command("x", "c.yaml", "tokenizer", load_config,
                                       ["--deepspeed_config", "configs/deepspeed/zero9.json"])


def test_trainer_default_config_paths_are_found_from_any_directory(tmp_path, monkeypatch):
    """The default --config and train.deepspeed_config are packaged files (resources.find_config): a run started
    outside the checkout, or from an installed package, finds them."""
    from magvit.launch import train_transformer

    monkeypatch.chdir(tmp_path)
    args, cfg, ds_base = run_config.parse_train_command("x", train_transformer.DEFAULT_CONFIG, "transformer",
                                                        train_transformer.load_config, [])
    assert cfg.model.hidden_size == 64 and cfg.train.deepspeed_config == "configs/deepspeed/zero2.json"
    assert ds_base["zero_optimization"]["stage"] == 2 and str(args.run_dir) == "runs/transformer/tiny"


def test_resume_latest_loads_the_checkpoint_and_reports_its_position(tmp_path):
    from magvit import distributed as dist
    from magvit.checkpoint import COMPLETE

    class FakeManager:
        root = tmp_path / "checkpoints"

        def load(self, path, engines, ema):
            self.loaded = (path.name, engines, ema)
            return {"step": 12, "data": {"epoch": 2, "batch": 3}, "nonfinite_skipped": 4, "skipped_steps": 5}

    log = dist.rank_zero_logger("magvit.test_training", 0, tmp_path / "rank0.log")
    ckpt = FakeManager()
    assert resume.resume_latest(ckpt, {"m": None}, None, log) is None  # nothing saved yet
    assert "starting fresh" in (tmp_path / "rank0.log").read_text()
    (ckpt.root / "step_00000012").mkdir(parents=True)
    (ckpt.root / "step_00000012" / COMPLETE).write_text("")
    state = resume.resume_latest(ckpt, {"m": None}, "ema", log)
    assert state["step"] == 12 and ckpt.loaded == ("step_00000012", {"m": None}, "ema")
    assert "resumed from" in (tmp_path / "rank0.log").read_text() and "(step 12, epoch 2, batch 3)" in \
        (tmp_path / "rank0.log").read_text()
    guard = trainloop.NonFiniteGuard(3)
    guard.load_state_dict(state)
    assert guard.state_dict() == {"nonfinite_skipped": 4, "skipped_steps": 5}


# --------------------------------------------------------------------------------------------------------------
# The shared loop, with a plain-python engine stand-in
# --------------------------------------------------------------------------------------------------------------
@dataclasses.dataclass
class _TinyConfig(Config):
    dim: int = 2


class _Tiny(torch.nn.Module):
    def __init__(self, config=None):
        super().__init__()
        self.config = config or _TinyConfig()
        self.proj = torch.nn.Linear(self.config.dim, 1)

    def forward(self, x):
        return self.proj(x)


def _exportable(config=None):
    from magvit.pretrained import PretrainedMixin

    class Tiny(_Tiny, PretrainedMixin):
        config_class = _TinyConfig
        model_type = "tiny-test"

    return Tiny(config)


class _Engine:
    """A DeepSpeed engine's contract for the loop: SGD on its module over ``accum`` micro-steps, checkpoints as
    files under ``save_dir/tag``."""

    from types import SimpleNamespace
    checkpoint_engine = SimpleNamespace(loads_safely=True)

    def __init__(self, module, accum):
        self.module, self.accum, self.micro = module, accum, 0
        self.optimizer = torch.optim.SGD(module.parameters(), lr=0.1)

    def is_gradient_accumulation_boundary(self):
        return self.micro % self.accum == self.accum - 1

    def get_lr(self):
        return [0.1]

    def backward(self, loss):
        (loss / self.accum).backward()

    def step(self):
        if self.is_gradient_accumulation_boundary():
            self.optimizer.step()
            self.optimizer.zero_grad()
        self.micro += 1

    def was_step_applied(self):
        return True

    def save_checkpoint(self, save_dir, tag, client_state, save_latest):
        from pathlib import Path

        Path(save_dir, tag).mkdir(parents=True, exist_ok=True)
        torch.save({"model": self.module.state_dict(), "micro": self.micro}, Path(save_dir, tag, "state.pt"))

    def load_checkpoint(self, load_dir, tag, load_optimizer_states, load_lr_scheduler_states):
        from pathlib import Path

        state = torch.load(Path(load_dir, tag, "state.pt"), weights_only=True)
        self.module.load_state_dict(state["model"])
        self.micro = state["micro"]
        return str(Path(load_dir, tag)), {}


def _train(run_dir, max_steps, resume_run=False, nan_from=None, preempted=False, accum=2, max_minutes=0.0,
           clock=None):
    """One run of the loop on the numbers 0..7 (batch 2): returns (exit status, module, EMA, loop)."""
    from magvit import distributed as dist

    cfg = run_config.TransformerTrainConfig().with_overrides([
        f"train.max_steps={max_steps}", f"train.grad_accum_steps={accum}", "train.max_nonfinite_steps=2",
        "logging.log_every=2", "logging.tensorboard=false", "logging.progress=false", "checkpoint.every=3",
        "data.batch_size=2", "data.num_workers=0", f"train.max_minutes={max_minutes}"])
    for sub in runlog.RUN_SUBDIRS:
        (run_dir / sub).mkdir(parents=True, exist_ok=True)
    log = dist.rank_zero_logger("magvit.test_loop", 0, run_dir / "logs" / "rank0.log")
    run = resume.RunContext(0, 1, torch.device("cpu"), {}, 2, dist.PreemptionHandler(), log)
    run.preempt.received = 15 if preempted else None
    torch.manual_seed(0)
    model = _Tiny()
    engine, ema = _Engine(model, accum), EMA(model, 0.5)
    dataset = torch.utils.data.TensorDataset(torch.arange(8.0))
    stream = batches.make_batch_stream(dataset, cfg.data, 0, 1, 0, torch.device("cpu"))
    data = batches.TrainData(stream, "numbers", len(dataset), [])
    reporting = trainloop.Reporting("Tiny", loss_key="loss", rate_key="perf/examples_per_s", rate_label="ex_s",
                                    lr_keys={"net": "lr"}, card_keys=("loss",))
    loop = trainloop.TrainLoop(run, cfg, run_dir, {"net": engine}, ema, data, _exportable, reporting)
    if clock is not None:
        loop.clock = clock

    def micro_step(batch, step):
        (x,) = batch
        loss = (model(x[:, None].repeat(1, 2) / 8 + torch.rand(2, 2)) - 1).pow(2).mean()  # draws from the RNG
        if not loop.guard.check(math.nan if nan_from is not None and step >= nan_from else loss.item(), step):
            return None
        engine.backward(loss)
        engine.step()
        return {"loss": loss.item()}

    return loop.run(micro_step, resume=resume_run), model, ema, loop


def test_train_loop_accumulates_logs_checkpoints_and_resumes_exactly(tmp_path):
    status, model, ema, loop = _train(tmp_path / "ref", max_steps=4)
    assert status == 0 and loop.step == 4 and loop.engine.micro == 8  # 2 micro-steps per optimizer step
    records = runlog.read_metrics(tmp_path / "ref" / "metrics.jsonl")
    assert [r["step"] for r in records] == [2, 4] and all("lr" in r and "loss" in r for r in records)
    assert [p.name for p in sorted((tmp_path / "ref" / "checkpoints").glob("step_*"))] == ["step_00000003",
                                                                                           "step_00000004"]
    assert "Examples (clips): 8" in (tmp_path / "ref" / "export" / "README.md").read_text()
    assert "done: 4 steps" in (tmp_path / "ref" / "logs" / "rank0.log").read_text()
    # stopped after step 3, then resumed with a longer run: the same weights and EMA as the run in one go
    assert _train(tmp_path / "cut", max_steps=3)[0] == 0
    status, resumed, resumed_ema, again = _train(tmp_path / "cut", max_steps=4, resume_run=True)
    assert status == 0 and again.step == 4 and again.data.stream.state_dict() == loop.data.stream.state_dict()
    assert torch.equal(resumed.proj.weight, model.proj.weight) and torch.equal(resumed.proj.bias, model.proj.bias)
    assert all(torch.equal(resumed_ema.shadow[k], ema.shadow[k]) for k in ema.shadow)


def test_train_loop_stops_at_max_minutes_like_a_last_step_and_resumes_exactly(tmp_path):
    """``train.max_minutes``: the first optimizer step that ends past the budget is the run's last (log, checkpoint,
    export, exit 0); a resume continues to ``max_steps`` with the weights of an uncut run."""
    import itertools

    minutes = itertools.count()  # each reading of the clock is one minute later: the loop starts at 0
    status, _, _, loop = _train(tmp_path / "cut", max_steps=4, max_minutes=2.5, clock=lambda: 60.0 * next(minutes))
    assert status == 0 and loop.step == 3 and loop.out_of_time  # 1 and 2 minutes go on, 3 minutes stop
    assert [p.name for p in sorted((tmp_path / "cut" / "checkpoints").glob("step_*"))] == ["step_00000003"]
    assert "Optimizer steps: 3" in (tmp_path / "cut" / "export" / "README.md").read_text()
    assert "done: 3 steps (train.max_minutes=2.5 reached)" in (tmp_path / "cut" / "logs" / "rank0.log").read_text()
    assert [r["step"] for r in runlog.read_metrics(tmp_path / "cut" / "metrics.jsonl")] == [2, 3]
    status, resumed, resumed_ema, again = _train(tmp_path / "cut", max_steps=4, resume_run=True)
    _, model, ema, _ = _train(tmp_path / "ref", max_steps=4)
    assert status == 0 and again.step == 4
    assert torch.equal(resumed.proj.weight, model.proj.weight) and torch.equal(resumed.proj.bias, model.proj.bias)
    assert all(torch.equal(resumed_ema.shadow[k], ema.shadow[k]) for k in ema.shadow)
    status, _, _, loop = _train(tmp_path / "long", max_steps=4, max_minutes=10, clock=lambda: 60.0 * next(minutes))
    assert status == 0 and loop.step == 4 and not loop.out_of_time  # the budget not reached: max_steps ends it
    with pytest.raises(ConfigError, match="max_minutes must be >= 0"):
        run_config.TransformerTrainConfig().with_overrides(["train.max_minutes=-1"])


def test_train_loop_checkpoints_on_preemption_and_stops_on_nonfinite_losses(tmp_path):
    from magvit import distributed as dist

    status, _, _, loop = _train(tmp_path / "pre", max_steps=4, preempted=True)
    assert status == dist.EXIT_CODE_PREEMPTED and loop.step == 0
    assert (tmp_path / "pre" / "checkpoints" / "step_00000000").is_dir()
    assert f"exiting with status {dist.EXIT_CODE_PREEMPTED}" in (tmp_path / "pre" / "logs" / "rank0.log").read_text()
    status, _, _, loop = _train(tmp_path / "nan", max_steps=4, nan_from=1)  # max_nonfinite_steps=2
    assert status == 1 and loop.step == 1
    events = [(r["event"], r["nonfinite_skipped"]) for r in runlog.read_metrics(tmp_path / "nan" / "metrics.jsonl")
              if "event" in r]
    assert events == [("nonfinite_loss", 1), ("nonfinite_stop", 2)]
    text = (tmp_path / "nan" / "logs" / "rank0.log").read_text()
    assert "non-finite loss at step 1: micro-batch skipped (1 in a row)" in text and "done:" not in text


def test_nonfinite_guard_counts_skipped_optimizer_steps():
    guard = trainloop.NonFiniteGuard(3)
    assert guard.check_step(True, 1) and guard.check_step(False, 2) is False and guard.check_step(False, 3) is False
    assert guard.consecutive_skipped_steps == 2 and guard.total_skipped_steps == 2
    assert guard.check(1.0, 4)  # a finite loss does not reset the skipped-step count (the loss was never the issue)
    assert guard.check_step(True, 4) and guard.consecutive_skipped_steps == 0  # an applied step does
    assert guard.check_step(False, 5, reduce_max=lambda v: 1.0) is False  # another rank skipped: all skip
    assert guard.check_step(False, 6) is False
    with pytest.raises(trainloop.NonFiniteLossError, match="3 optimizer steps in a row skipped"):
        guard.check_step(False, 7)
    assert guard.state_dict() == {"nonfinite_skipped": 0, "skipped_steps": 5}


def test_schedule_keeps_its_configured_end_when_loading_a_state():
    """The step counter comes from the state, the shape from the constructor; the optimizer gets the new LR."""
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    old = optim.WarmupCosineSchedule(opt, 2, 10, 0.1)
    for _ in range(6):
        opt.step()
        old.step()
    state = old.state_dict()
    opt2 = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    new = optim.WarmupCosineSchedule(opt2, 2, 20, 0.1)
    new.load_state_dict(state)
    assert new.last_epoch == 6 and new.max_steps == 20
    assert opt2.param_groups[0]["lr"] == optim.warmup_cosine(6, 2, 20, 0.1)
    assert new.get_last_lr() == [opt2.param_groups[0]["lr"]]
    same = optim.WarmupCosineSchedule(torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0), 2, 10, 0.1)
    same.load_state_dict(state)
    assert same.get_last_lr() == old.get_last_lr()  # unchanged config: bit-identical (exact resume)


def test_resume_changes_rule(tmp_path):
    from magvit.checkpoint import COMPLETE, TRAINER_STATE

    cfg = run_config.TokenizerTrainConfig()
    root = tmp_path / "checkpoints"
    assert resume.resume_changes(cfg, root, 1, 2) == (None, [])  # nothing to resume
    ckpt = root / "step_00000004"
    ckpt.mkdir(parents=True)
    (ckpt / COMPLETE).write_text("")

    def state(**extra):
        (ckpt / TRAINER_STATE).write_text(json.dumps({"step": 4, "world_size": 1, "zero_stage": 2,
                                                      "config": cfg.to_dict(), **extra}))

    state()
    assert resume.resume_changes(cfg, root, 1, 2) == (None, [])
    allowed = cfg.with_overrides(["train.max_steps=50", "logging.log_every=3", "checkpoint.every=7"])
    problem, changes = resume.resume_changes(allowed, root, 1, 2)
    assert problem is None and changes == ["checkpoint.every: 1000 -> 7", "logging.log_every: 10 -> 3",
                                           "train.max_steps: 1000 -> 50"]
    fixed = cfg.with_overrides(["optim.lr=1e30", "data.batch_size=8", "train.max_steps=50"])
    problem, changes = resume.resume_changes(fixed, root, 1, 2)
    assert "with changed data.batch_size (2 -> 8), optim.lr (0.0001 -> 1e+30): only train.max_steps" in problem
    assert changes == [] and "\n" not in problem
    problem, _ = resume.resume_changes(cfg.with_overrides(["train.max_steps=3"]), root, 1, 2)
    assert "below the step" in problem
    assert "written by 1 rank(s), this run has 2" in resume.resume_changes(cfg, root, 2, 2)[0]
    assert "ZeRO-2, this run uses ZeRO-3" in resume.resume_changes(cfg, root, 1, 3)[0]
    (ckpt / TRAINER_STATE).write_text("[")
    assert "cannot read" in resume.resume_changes(cfg, root, 1, 2)[0]


def test_training_configs_reject_non_finite_and_bad_stage():
    from magvit.config import ConfigError

    for override, message in [("optim.lr=.inf", "lr must be a finite number"), ("optim.lr=.nan", "got NaN"),
                              ("train.min_lr_ratio=.nan", "got NaN"), ("train.zero_stage=7", "zero_stage must be"),
                              ("loss.recon_weight=-1", "weights >= 0"), ("loss.gan_weight=.inf", "finite"),
                              ("train.max_nonfinite_steps=0", "max_nonfinite_steps >= 1")]:
        with pytest.raises(ConfigError, match=message):
            run_config.TokenizerTrainConfig().with_overrides([override])
    assert run_config.TokenizerTrainConfig().with_overrides(["loss.recon_weight=3e38"]).loss.recon_weight == 3e38
    with pytest.raises(ConfigError, match="log_every >= 1"):  # `step % 0` used to end the run at step 1
        run_config.TokenizerTrainConfig().with_overrides(["logging.log_every=0"])
    for override in ("masking.cond_dropout_prob=1.5", "masking.label_smoothing=1", "masking.unmasked_weight=.inf"):
        with pytest.raises(ConfigError, match="masking"):
            run_config.TransformerTrainConfig().with_overrides([override])
