"""SLURM submission: the submit helper (fast, with a recording ``sbatch`` on PATH) and, against a real one-node
SLURM cluster started on localhost, multi-task jobs through the project's batch scripts, preemption and requeue."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # launch/ (python -m launch.submit)
from slurm_cluster import SlurmCluster, SlurmUnavailable  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
PYTHON = sys.executable

# A stand-in for a training script that keeps the training contract where the batch scripts depend on it: rank
# variables and rendezvous through torch.distributed (gloo), SIGUSR1/SIGTERM -> checkpoint + exit status 3,
# --resume auto, metrics.jsonl. Each step sleeps so the test can preempt mid-run.
CONTRACT_TRAINER = textwrap.dedent('''
    import argparse, json, os, signal, sys, time
    from pathlib import Path
    import torch
    import torch.distributed as dist

    p = argparse.ArgumentParser()
    p.add_argument("--config"); p.add_argument("--run-dir"); p.add_argument("--resume", default="never")
    p.add_argument("overrides", nargs="*")
    a = p.parse_args()
    opts = dict(w.split("=", 1) for w in a.overrides)
    max_steps, step_s = int(opts.get("train.max_steps", 10)), float(opts.get("step_seconds", 0.3))
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    dist.init_process_group("gloo", init_method=f"tcp://{os.environ['MASTER_ADDR']}:{os.environ['MASTER_PORT']}",
                            rank=rank, world_size=world)
    got = []
    for s in (signal.SIGUSR1, signal.SIGTERM):
        signal.signal(s, lambda n, f: got.append(n))
    run = Path(a.run_dir); ckpt = run / "checkpoints" / "latest.json"
    step = json.loads(ckpt.read_text())["step"] if a.resume == "auto" and ckpt.exists() else 0
    print(f"rank {rank}/{world} local {os.environ['LOCAL_RANK']} resume_step {step}", flush=True)
    seen = torch.tensor([float(rank)]); dist.all_reduce(seen)
    assert seen.item() == world * (world - 1) / 2  # every rank joined the same group
    while step < max_steps:
        time.sleep(step_s); step += 1
        if rank == 0:
            with open(run / "metrics.jsonl", "a") as f:
                f.write(json.dumps({"step": step, "world": world}) + "\\n")
        stop = torch.tensor([1.0 if got else 0.0]); dist.all_reduce(stop, op=dist.ReduceOp.MAX)
        if stop.item() > 0:
            break
    if rank == 0:
        ckpt.parent.mkdir(parents=True, exist_ok=True); ckpt.write_text(json.dumps({"step": step}))
    dist.barrier(); dist.destroy_process_group()
    sys.exit(3 if step < max_steps else 0)
''')


def _submit(capsys, *args: str) -> subprocess.CompletedProcess:
    """``python -m launch.submit ARGS`` in this process (imports once): status, stdout and stderr."""
    from launch.submit import cli

    capsys.readouterr()
    status = cli(list(args))
    out, err = capsys.readouterr()
    return subprocess.CompletedProcess(args, status, out, err)


@pytest.fixture
def tiny_config(tmp_path) -> Path:
    path = tmp_path / "tok.yaml"
    path.write_text("model:\n  preset: tiny\ntrain:\n  max_steps: 10\n")
    return path


@pytest.fixture
def fake_sbatch(tmp_path) -> Path:
    """A ``sbatch`` on PATH that records its arguments and prints a job id (no cluster needed)."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    record = tmp_path / "sbatch_calls.txt"
    script = bin_dir / "sbatch"
    script.write_text(f"#!/bin/bash\necho \"$@\" >> {record}\necho 4242\n")
    script.chmod(0o755)
    return bin_dir


# ----------------------------------------------------------------------------------------------------------------
# Submit helper and batch scripts, without a cluster
# ----------------------------------------------------------------------------------------------------------------
def test_batch_scripts_are_valid_bash():
    for name in ("tokenizer.sbatch", "transformer.sbatch", "train_job.sh"):
        proc = subprocess.run(["bash", "-n", str(ROOT / "launch" / "slurm" / name)], capture_output=True, text=True)
        assert proc.returncode == 0, proc.stderr


def test_batch_script_outside_slurm_is_a_user_error(tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
    proc = subprocess.run(["bash", str(ROOT / "launch" / "slurm" / "tokenizer.sbatch")], capture_output=True,
                          text=True, env=env, cwd=tmp_path)
    assert proc.returncode == 2 and "sbatch" in proc.stderr and proc.stderr.count("\n") == 1


def test_dry_run_prints_script_and_writes_nothing(capsys, tmp_path, tiny_config):
    run_dir = tmp_path / "run"
    proc = _submit(capsys, "tokenizer", "--config", str(tiny_config), "--nodes", "4", "--gpus-per-node", "8",
                   "--cpus-per-task", "6", "--time", "2-00:00:00", "--partition", "gpu", "--run-dir", str(run_dir),
                   "--dry-run", "train.max_steps=3")
    assert proc.returncode == 0, proc.stderr
    options = re.findall(r"^#SBATCH --([\w-]+)(?:=(\S+))?$", proc.stdout, re.M)
    opts = dict(options)
    assert len(opts) == len(options)  # each option once: template defaults replaced, not repeated
    assert opts["nodes"] == "4" and opts["ntasks-per-node"] == "8" and opts["gpus-per-node"] == "8"
    assert opts["cpus-per-task"] == "6" and opts["time"] == "2-00:00:00" and opts["partition"] == "gpu"
    assert opts["signal"] == "USR1@120" and "requeue" in opts and opts["open-mode"] == "append"
    assert opts["output"] == f"{run_dir}/logs/%x-%j.out" and opts["error"] == f"{run_dir}/logs/%x-%j.err"
    assert f"--config {run_dir}/slurm/config.yaml --run-dir {run_dir}" in proc.stdout
    assert "launch/train_tokenizer.py" in proc.stdout and "train_job.sh" in proc.stdout
    assert not run_dir.exists()


def test_dry_run_cpu_nodes_request_no_gpus(capsys, tmp_path):
    cfg = tmp_path / "tr.yaml"
    cfg.write_text("model:\n  preset: tiny\n")
    proc = _submit(capsys, "transformer", "--config", str(cfg), "--gpus-per-node", "0", "--ntasks-per-node", "2",
                   "--run-dir", str(tmp_path / "r"), "--dry-run")
    assert proc.returncode == 0, proc.stderr
    assert "--gpus-per-node" not in proc.stdout and "#SBATCH --ntasks-per-node=2" in proc.stdout
    assert "launch/train_transformer.py" in proc.stdout


@pytest.mark.parametrize("args, message", [
    (["--nodes", "0"], "--nodes"),
    (["--gpus-per-node", "8", "--ntasks-per-node", "4"], "one training process per GPU"),
    (["--time", "forever"], "--time"),
    (["train.max_stepz=3"], "train.max_stepz"),
    (["train.max_steps"], "key.path=value"),
    (["--config", "/nonexistent.yaml"], "not found"),
])
def test_user_errors_are_one_line_and_status_2(capsys, tmp_path, tiny_config, args, message):
    base = ["tokenizer", "--config", str(tiny_config), "--run-dir", str(tmp_path / "run"), "--dry-run"]
    proc = _submit(capsys, *base, *args)
    assert proc.returncode == 2
    assert proc.stderr.count("\n") == 1 and message in proc.stderr and "Traceback" not in proc.stderr
    assert proc.stdout == ""


def test_submit_writes_script_and_config_then_calls_sbatch(capsys, monkeypatch, tmp_path, tiny_config, fake_sbatch):
    run_dir = tmp_path / "run"
    monkeypatch.setenv("PATH", f"{fake_sbatch}:{os.environ['PATH']}")
    args = ["tokenizer", "--config", str(tiny_config), "--gpus-per-node", "0", "--ntasks-per-node", "2",
            "--cpus-per-task", "1", "--run-dir", str(run_dir), "train.max_steps=3", "data.batch_size=1"]
    proc = _submit(capsys, *args)
    assert proc.returncode == 0, proc.stderr
    assert "submitted job 4242" in proc.stdout
    script = run_dir / "slurm" / "job.sbatch"
    calls = (tmp_path / "sbatch_calls.txt").read_text().splitlines()
    assert calls == [f"--parsable {script}"]
    config = yaml.safe_load((run_dir / "slurm" / "config.yaml").read_text())
    assert config["train"]["max_steps"] == 3 and config["data"]["batch_size"] == 1
    assert isinstance(config["model"], dict) and "preset" not in config["model"]  # preset expanded to fields
    assert (run_dir / "logs").is_dir()
    assert json.loads((run_dir / "slurm" / "submissions.jsonl").read_text())["job_id"] == 4242
    # The same config again continues the run; a different one is refused and leaves the snapshot alone.
    assert _submit(capsys, *args).returncode == 0
    before = (run_dir / "slurm" / "config.yaml").read_text()
    proc = _submit(capsys, *args[:-1], "data.batch_size=2")
    assert proc.returncode == 2 and "data.batch_size" in proc.stderr
    assert (run_dir / "slurm" / "config.yaml").read_text() == before
    assert len((tmp_path / "sbatch_calls.txt").read_text().splitlines()) == 2


# ----------------------------------------------------------------------------------------------------------------
# A real SLURM cluster on localhost
# ----------------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def cluster():
    try:
        c = SlurmCluster.start()
    except SlurmUnavailable as err:
        if os.environ.get("CI"):
            raise
        pytest.skip(f"no local SLURM cluster: {err}")
    try:
        yield c
    finally:
        c.stop()


def _read_metrics(run_dir: Path) -> list[dict]:
    path = run_dir / "metrics.jsonl"
    if not path.exists():
        return []
    records = []
    for line in path.read_text().splitlines():
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            pass  # a line being written
    return records


def _job_logs(run_dir: Path) -> str:
    return "".join(f"\n--- {p.name} ---\n{p.read_text()[-3000:]}" for p in sorted((run_dir / "logs").glob("*")))


def _static_sbatch_args(run_dir: Path, job_name: str) -> list[str]:
    """Flags that fit the project's batch script to the test node: 2 CPU tasks, no GPUs."""
    (run_dir / "logs").mkdir(parents=True, exist_ok=True)
    return [f"--job-name={job_name}", "--nodes=1", "--ntasks-per-node=2", "--gpus-per-node=0",
            "--cpus-per-task=1", "--time=10", f"--output={run_dir}/logs/%x-%j.out",
            f"--error={run_dir}/logs/%x-%j.err"]


@pytest.mark.slow
@pytest.mark.slurm
def test_requeue_mechanism_with_contract_trainer(cluster, tmp_path):
    """The static batch script under sbatch flags: 2 ranks rendezvous through the exported variables; USR1 ->
    checkpoint + status 3 -> the job requeues itself and resumes from the checkpoint."""
    trainer = tmp_path / "trainer.py"
    trainer.write_text(CONTRACT_TRAINER)
    run_dir = tmp_path / "run"
    job = cluster.sbatch(*_static_sbatch_args(run_dir, "contract"), str(ROOT / "launch" / "slurm" / "tokenizer.sbatch"),
                         "--config", "unused.yaml", "--run-dir", str(run_dir), "train.max_steps=12",
                         "step_seconds=0.4", cwd=ROOT,
                         env={"MAGVIT_TRAIN_SCRIPT": str(trainer), "MAGVIT_PYTHON": PYTHON})
    cluster.wait(lambda: any(r["step"] >= 2 for r in _read_metrics(run_dir)), 60,
                 f"step 2 of job {job}{_job_logs(run_dir) if run_dir.exists() else ''}")
    cluster.command("scancel", "--signal=USR1", str(job))
    info = cluster.wait_finished(job, 90)
    logs = _job_logs(run_dir)
    assert info["JobState"] == "COMPLETED" and info["Restarts"] == "1", f"{info}{logs}"
    steps = [r["step"] for r in _read_metrics(run_dir)]
    assert steps == list(range(1, 13)), f"steps {steps}{logs}"  # no step trained twice, none skipped
    assert all(r["world"] == 2 for r in _read_metrics(run_dir))
    rank_logs = {p.name: p.read_text() for p in (run_dir / "logs").glob("contract-*-rank*.log")}
    assert sorted(rank_logs) == [f"contract-{job}-rank0.log", f"contract-{job}-rank1.log"]
    resume_steps = [int(s) for s in re.findall(r"resume_step (\d+)", rank_logs[f"contract-{job}-rank0.log"])]
    assert resume_steps[0] == 0 and len(resume_steps) == 2 and 2 <= resume_steps[1] < 12, rank_logs
    batch_log = (run_dir / "logs" / f"contract-{job}.out").read_text()
    assert "start 1:" in batch_log and "start 2:" in batch_log and "requeueing" in batch_log, batch_log
