"""SLURM submission: the submit helper (fast, with a recording ``sbatch`` on PATH) and, against real SLURM clusters
started on localhost (one node; two nodes in multiple-slurmd mode), multi-task jobs through the project's batch
scripts, preemption, requeue and cancel."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # launch/ (python -m launch.submit)
from slurm_cluster import SlurmCluster, SlurmUnavailable  # noqa: E402

from magvit.launch import submit  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
PYTHON = sys.executable


def _submit(capsys, *args: str) -> subprocess.CompletedProcess:
    """``python -m launch.submit ARGS`` in this process (imports once): status, stdout and stderr."""
    capsys.readouterr()
    status = submit.cli(list(args))
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
                   "--sbatch-option=--qos=high", "--sbatch-option=--signal=USR1@600", "--dry-run", "train.max_steps=3")
    assert proc.returncode == 0, proc.stderr
    options = re.findall(r"^#SBATCH --([\w-]+)(?:=(\S+))?$", proc.stdout, re.M)
    opts = dict(options)
    assert len(opts) == len(options)  # each option once: template defaults replaced, not repeated
    assert opts["nodes"] == "4" and opts["ntasks-per-node"] == "8" and opts["gpus-per-node"] == "8"
    assert opts["cpus-per-task"] == "6" and opts["time"] == "2-00:00:00" and opts["partition"] == "gpu"
    assert opts["signal"] == "USR1@600" and "requeue" in opts and opts["open-mode"] == "append"
    assert opts["output"] == f"{run_dir}/logs/%x-%j.out" and opts["error"] == f"{run_dir}/logs/%x-%j.err"
    assert opts["qos"] == "high"
    assert f"--config {run_dir}/slurm/config.yaml --run-dir {run_dir}" in proc.stdout
    assert "TRAIN_MODULE=magvit.launch.train_tokenizer" in proc.stdout and "train_job.sh" in proc.stdout
    assert not run_dir.exists()


def test_dry_run_cpu_nodes_request_no_gpus(capsys, tmp_path):
    tokens = tmp_path / "tokens"  # token shards' meta.json: vocabulary and grid of the transformer
    tokens.mkdir()
    (tokens / "meta.json").write_text(json.dumps({"codebook_size": 64, "token_grid": [2, 4, 4], "classes": []}))
    cfg = tmp_path / "tr.yaml"
    cfg.write_text(f"model:\n  preset: tiny\ndata:\n  tokens: {tokens}\n")
    proc = _submit(capsys, "transformer", "--config", str(cfg), "--gpus-per-node", "0", "--ntasks-per-node", "2",
                   "--run-dir", str(tmp_path / "r"), "--dry-run")
    assert proc.returncode == 0, proc.stderr
    assert "--gpus-per-node" not in proc.stdout and "#SBATCH --ntasks-per-node=2" in proc.stdout
    assert "TRAIN_MODULE=magvit.launch.train_transformer" in proc.stdout


def test_dry_run_of_the_autoregressive_prior(capsys, tmp_path):
    tokens = tmp_path / "tokens"
    tokens.mkdir()
    (tokens / "meta.json").write_text(json.dumps({"codebook_size": 64, "token_grid": [2, 4, 4], "classes": []}))
    cfg = tmp_path / "ar.yaml"
    cfg.write_text(f"model:\n  preset: tiny\ndata:\n  tokens: {tokens}\n")
    proc = _submit(capsys, "autoregressive", "--config", str(cfg), "--gpus-per-node", "0", "--ntasks-per-node", "2",
                   "--run-dir", str(tmp_path / "r"), "--dry-run")
    assert proc.returncode == 0, proc.stderr
    assert "TRAIN_MODULE=magvit.launch.train_autoregressive" in proc.stdout


def test_submit_from_any_directory_uses_packaged_templates_and_configs(capsys, monkeypatch, tmp_path):
    """Outside a checkout (as an installed ``magvit-submit`` runs): the default config and its DeepSpeed config are
    the packaged ones, the templates come from ``magvit.resources.SLURM_DIR``, and the job works in the directory
    submitted from (or ``--workdir``), where the default run dir lies too."""
    from magvit.resources import CONFIG_DIR, SLURM_DIR

    monkeypatch.chdir(tmp_path)
    proc = _submit(capsys, "tokenizer", "--gpus-per-node", "0", "--dry-run")
    assert proc.returncode == 0, proc.stderr
    assert f"export MAGVIT_WORKDIR={tmp_path}\n" in proc.stdout
    assert f"export MAGVIT_SLURM_DIR={SLURM_DIR}\n" in proc.stdout
    assert f"from {SLURM_DIR / 'tokenizer.sbatch'}" in proc.stdout
    assert f"--run-dir {tmp_path}/runs/tokenizer/tiny " in proc.stdout
    workdir = tmp_path / "work"
    workdir.mkdir()
    proc = _submit(capsys, "tokenizer", "--gpus-per-node", "0", "--workdir", str(workdir), "--dry-run")
    assert f"export MAGVIT_WORKDIR={workdir}\n" in proc.stdout
    assert f"--run-dir {workdir}/runs/tokenizer/tiny " in proc.stdout
    # The DeepSpeed config is the packaged one too (the trainer finds it as submit does); a missing one is refused.
    config = submit.resolve_config("tokenizer", CONFIG_DIR / "tokenizer" / "tiny.yaml", [], workdir)
    assert config["train"]["deepspeed_config"] == "configs/deepspeed/zero2.json"
    assert submit.check_paths(config, "tokenizer", workdir)[0].startswith("warning: data.manifest")
    config["train"]["deepspeed_config"] = "configs/deepspeed/zero9.json"
    with pytest.raises(submit.UsageError, match="zero9.json"):
        submit.check_paths(config, "tokenizer", workdir)


def test_batch_script_master_port_matches_python(tmp_path):
    """The batch script exports MASTER_PORT (shell arithmetic) before any Python runs; each rank's
    ``magvit.distributed.slurm_master_port`` must give the same port for the same job id."""
    from magvit.distributed import slurm_master_port

    line = re.search(r"^export MASTER_PORT=.*$", (ROOT / "launch" / "slurm" / "train_job.sh").read_text(), re.M)
    assert line is not None
    for job_id in ("1", "4242", "19999", "20000", "35001", "123456789", "1234_5"):
        proc = subprocess.run(["bash", "-c", f'SLURM_JOB_ID={job_id}; {line.group(0)}; echo "$MASTER_PORT"'],
                              capture_output=True, text=True, check=True)
        assert int(proc.stdout) == slurm_master_port(job_id), job_id


@pytest.mark.parametrize("args, message", [
    (["--nodes", "0"], "--nodes"),
    (["--gpus-per-node", "8", "--ntasks-per-node", "4"], "one training process per GPU"),
    (["--time", "forever"], "--time"),
    (["train.max_stepz=3"], "train.max_stepz"),
    (["train.max_steps"], "key.path=value"),
    (["--config", "/nonexistent.yaml"], "not found"),
    (["--workdir", "/nonexistent"], "--workdir"),
])
def test_user_errors_are_one_line_and_status_2(capsys, tmp_path, tiny_config, args, message):
    base = ["tokenizer", "--config", str(tiny_config), "--run-dir", str(tmp_path / "run"), "--dry-run"]
    proc = _submit(capsys, *base, *args)
    assert proc.returncode == 2
    assert proc.stderr.count("\n") == 1 and message in proc.stderr and "Traceback" not in proc.stderr
    assert proc.stdout == ""


@pytest.mark.parametrize("where, value", [
    ("override", "logging.wandb_name=run\nmodel: {preset: B}"),
    ("override", "logging.wandb_name=run\r"),
    ("override", "train.max_steps=3\n"),
    ("override", "logging.wandb_name=a\tb"),
    ("--config", "tok\n.yaml"),
], ids=["newline-in-value", "carriage-return", "trailing-newline", "tab", "config-path"])
def test_values_with_control_characters_are_refused_before_anything_is_written(
        capsys, monkeypatch, tmp_path, tiny_config, fake_sbatch, where, value):
    """The config snapshot's header and the batch script hold each value on one line: a control character in an
    override or a path is one line, status 2, nothing written and no sbatch call."""
    monkeypatch.setenv("PATH", f"{fake_sbatch}:{os.environ['PATH']}")
    config = str(tiny_config)
    if where == "--config":
        config = str(tmp_path / value)
        Path(config).write_text(tiny_config.read_text())
    args = ["tokenizer", "--config", config, "--gpus-per-node", "0", "--run-dir", str(tmp_path / "run")]
    proc = _submit(capsys, *args, *([value] if where == "override" else []))
    assert proc.returncode == 2 and proc.stdout == ""
    assert proc.stderr.count("\n") == 1 and "control character" in proc.stderr, proc.stderr
    assert not (tmp_path / "run").exists() and not (tmp_path / "sbatch_calls.txt").exists()


def test_submit_writes_script_and_config_then_calls_sbatch(capsys, monkeypatch, tmp_path, tiny_config, fake_sbatch):
    run_dir = tmp_path / "run"
    monkeypatch.setenv("PATH", f"{fake_sbatch}:{os.environ['PATH']}")
    args = ["tokenizer", "--config", str(tiny_config), "--gpus-per-node", "0", "--ntasks-per-node", "2",
            "--cpus-per-task", "1", "--run-dir", str(run_dir), f"data.manifest={tmp_path / 'm.jsonl'}",
            "train.max_steps=3", "data.batch_size=1"]
    proc = _submit(capsys, *args)
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr.startswith("warning: data.manifest")  # submitted anyway: compute nodes may see other disks
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


def _wait(cluster: SlurmCluster, predicate, timeout: float, what: str, run_dir: Path) -> None:
    """``cluster.wait`` whose failure message ends with the job's logs as they are at the timeout."""
    try:
        cluster.wait(predicate, timeout, what)
    except TimeoutError as err:
        raise TimeoutError(f"{err}{_job_logs(run_dir) if (run_dir / 'logs').is_dir() else ''}") from None


def _wait_finished(cluster: SlurmCluster, job: int, timeout: float, run_dir: Path) -> dict[str, str]:
    try:
        return cluster.wait_finished(job, timeout)
    except TimeoutError as err:
        raise TimeoutError(f"{err}{_job_logs(run_dir) if (run_dir / 'logs').is_dir() else ''}") from None


def _static_sbatch_args(run_dir: Path, job_name: str, nodes: int = 1, tasks_per_node: int = 2) -> list[str]:
    """Flags that fit the project's batch script to the test nodes: CPU tasks, no GPUs."""
    (run_dir / "logs").mkdir(parents=True, exist_ok=True)
    return [f"--job-name={job_name}", f"--nodes={nodes}", f"--ntasks-per-node={tasks_per_node}", "--gpus-per-node=0",
            "--cpus-per-task=1", "--time=10", f"--output={run_dir}/logs/%x-%j.out",
            f"--error={run_dir}/logs/%x-%j.err"]


# ----------------------------------------------------------------------------------------------------------------
# The real tokenizer training under SLURM
# ----------------------------------------------------------------------------------------------------------------
TINY_TRAINING = ["data.num_frames=4", "data.image_size=16", "data.batch_size=1", "data.num_workers=0",
                 "data.val_clips=0", "logging.log_every=1", "logging.tensorboard=false", "logging.progress=false"]


def _train_steps(run_dir: Path) -> list[int]:
    """Steps of the per-step training records of metrics.jsonl, in file order."""
    return [r["step"] for r in _read_metrics(run_dir) if "lr/generator" in r]


@pytest.mark.slow
@pytest.mark.slurm
def test_tokenizer_job_on_two_tasks_trains_and_exports(cluster, tmp_path, sample_manifest):
    """`magvit-submit tokenizer` on the local cluster, from a directory outside the checkout (as an installed
    package runs: packaged config, templates and DeepSpeed config): a 2-task DeepSpeed job that finishes with a
    complete checkpoint and exported EMA weights."""
    run_dir = tmp_path / "run"
    proc = subprocess.run(
        [PYTHON, "-m", "magvit.launch.submit", "tokenizer", "--config", "configs/tokenizer/tiny.yaml",
         "--nodes", "1", "--gpus-per-node", "0", "--ntasks-per-node", "2", "--cpus-per-task", "1", "--time", "10",
         "--partition", "debug", "--run-dir", str(run_dir), f"data.manifest={sample_manifest}",
         "train.max_steps=4", "checkpoint.every=2", *TINY_TRAINING],
        cwd=tmp_path, env=cluster.env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    job = int(re.search(r"submitted job (\d+)", proc.stdout).group(1))
    info = _wait_finished(cluster, job, 150, run_dir)
    logs = _job_logs(run_dir)
    assert info["JobState"] == "COMPLETED" and info["ExitCode"] == "0:0", f"{info}{logs}"
    assert _train_steps(run_dir) == [1, 2, 3, 4], logs
    # Both ranks ran in one DeepSpeed world (rank logs from srun, WORLD_SIZE recorded by the trainer).
    assert sorted(p.name for p in (run_dir / "logs").glob(f"tokenizer-run-{job}-rank*.log")) == [
        f"tokenizer-run-{job}-rank0.log", f"tokenizer-run-{job}-rank1.log"]
    batch_log = (run_dir / "logs" / f"tokenizer-run-{job}.out").read_text()
    assert f"master 127.0.0.1:{15000 + job % 20000}," in batch_log, batch_log  # NodeAddr, port from the job id
    command = (run_dir / "command.txt").read_text()
    assert '"WORLD_SIZE": "2"' in command and f'"SLURM_JOB_ID": "{job}"' in command, command
    latest = run_dir / "checkpoints" / (run_dir / "checkpoints" / "latest").read_text().strip()
    assert latest.name == "step_00000004" and (latest / "COMPLETE").exists()
    assert len(list((latest / "generator").glob("zero_pp_rank_*_optim_states.pt"))) == 2  # one shard per rank
    # The export is the EMA of the last checkpoint and loads as a tokenizer.
    from safetensors.torch import load_file

    from magvit.tokenizer import VideoTokenizer

    ema, exported = load_file(latest / "ema.safetensors"), load_file(run_dir / "export" / "model.safetensors")
    assert set(ema) <= set(exported) and all(ema[k].equal(exported[k]) for k in ema)
    tokenizer = VideoTokenizer.from_pretrained(run_dir / "export")
    assert tokenizer.config.num_frames == 4 and tokenizer.config.image_size == 16


@pytest.mark.slow
@pytest.mark.slurm
def test_preempted_tokenizer_job_requeues_and_resumes_from_checkpoint(cluster, tmp_path, sample_manifest):
    """The batch script under plain sbatch flags; SIGUSR1 mid-training (what --signal=USR1@120 sends before the
    time limit) -> checkpoint, status 3, self-requeue -> the restarted job resumes at that step and finishes."""
    run_dir = tmp_path / "run"
    max_steps = 16
    job = cluster.sbatch(*_static_sbatch_args(run_dir, "tok-preempt"),
                         str(ROOT / "launch" / "slurm" / "tokenizer.sbatch"),
                         "--config", "configs/tokenizer/tiny.yaml", "--run-dir", str(run_dir),
                         f"data.manifest={sample_manifest}", f"train.max_steps={max_steps}", "checkpoint.every=1000",
                         *TINY_TRAINING, cwd=ROOT, env={"MAGVIT_PYTHON": PYTHON})
    _wait(cluster, lambda: len(_train_steps(run_dir)) >= 1, 150, f"the first training step of job {job}", run_dir)
    cluster.command("scancel", "--signal=USR1", str(job))
    _wait(cluster, lambda: cluster.job(job).get("Restarts") == "1", 60, f"job {job} to requeue", run_dir)
    info = _wait_finished(cluster, job, 150, run_dir)
    logs = _job_logs(run_dir)
    assert info["JobState"] == "COMPLETED" and info["Restarts"] == "1", f"{info}{logs}"
    steps = _train_steps(run_dir)
    assert steps == list(range(1, max_steps + 1)), f"steps {steps}{logs}"  # no step trained twice or skipped
    rank0 = (run_dir / "logs" / f"tok-preempt-{job}-rank0.log").read_text()
    saved = [int(s) for s in re.findall(r"checkpointing at step (\d+) and exiting with status 3", rank0)]
    resumed = [int(s) for s in re.findall(r"resumed from \S+ \(step (\d+)", rank0)]
    assert len(saved) == 1 and 1 <= saved[0] < max_steps and resumed == saved, logs
    batch_log = (run_dir / "logs" / f"tok-preempt-{job}.out").read_text()
    assert "start 1:" in batch_log and "requeueing" in batch_log and "start 2:" in batch_log, batch_log
    assert "training finished" in batch_log, batch_log



@pytest.mark.slow
@pytest.mark.slurm
def test_requeue_and_cancel_stop_every_rank(cluster, tmp_path, sample_manifest):
    """SIGTERM from SLURM reaches every rank and the batch shell: `scontrol requeue` -> every rank checkpoints
    after the same step and SLURM (not the script: one restart, not two) requeues the job, which resumes there; then
    `scancel` -> every rank checkpoints again and the job stays cancelled (the script must not requeue it) with no
    training process left."""
    run_dir = tmp_path / "run"
    job = cluster.sbatch(*_static_sbatch_args(run_dir, "tok-stop"), str(ROOT / "launch" / "slurm" / "tokenizer.sbatch"),
                         "--config", "configs/tokenizer/tiny.yaml", "--run-dir", str(run_dir),
                         f"data.manifest={sample_manifest}", "train.max_steps=1000", "checkpoint.every=1000",
                         *TINY_TRAINING, cwd=ROOT, env={"MAGVIT_PYTHON": PYTHON})
    rank_logs = [run_dir / "logs" / f"tok-stop-{job}-rank{r}.log" for r in range(2)]

    def saved() -> list[set[str]]:
        return [set(re.findall(r"checkpointing at step (\d+) and exiting", p.read_text()) if p.exists() else set())
                for p in rank_logs]

    _wait(cluster, lambda: len(_train_steps(run_dir)) >= 1, 150, f"the first step of job {job}", run_dir)
    cluster.command("scontrol", "requeue", str(job))
    _wait(cluster, lambda: len(re.findall(r"resumed from", rank_logs[0].read_text())) == 1, 150,
          f"job {job} to resume after the requeue", run_dir)
    first = saved()
    assert first[0] == first[1] and len(first[0]) == 1, _job_logs(run_dir)  # both ranks, the same step
    # A step past the saved one first: a cancel right after the resume would checkpoint the same step again.
    step = int(next(iter(first[0])))
    _wait(cluster, lambda: max(_train_steps(run_dir), default=0) > step, 150,
          f"job {job} to train past step {step}", run_dir)
    cluster.command("scancel", str(job))
    info = _wait_finished(cluster, job, 60, run_dir)

    def training_processes() -> list[str]:  # the ranks and the batch shell (their command lines name the run dir)
        return [p.name for p in Path("/proc").glob("[0-9]*") if str(run_dir).encode() in _cmdline(p)]

    _wait(cluster, lambda: not training_processes(), 30, f"the processes of job {job} to end", run_dir)
    logs = _job_logs(run_dir)
    assert info["JobState"] == "CANCELLED" and info["Restarts"] == "1", f"{info}{logs}"
    second = saved()
    assert second[0] == second[1] and len(second[0]) == 2, logs  # the cancel checkpointed on both ranks too
    batch_log = (run_dir / "logs" / f"tok-stop-{job}.out").read_text()
    assert batch_log.count("stopped by SIGTERM") == 2 and "requeueing" not in batch_log, batch_log
    assert cluster.job(job).get("Restarts") == "1"  # still cancelled, never requeued by the script


def _cmdline(proc: Path) -> bytes:
    try:
        return (proc / "cmdline").read_bytes()
    except OSError:
        return b""


# ----------------------------------------------------------------------------------------------------------------
# Two nodes on this machine (SLURM's multiple-slurmd mode): a job over both, requeued on a signal
# ----------------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def two_nodes():
    try:
        c = SlurmCluster.start(nodes=2)
    except SlurmUnavailable as err:
        if os.environ.get("CI"):
            raise
        pytest.skip(f"no local SLURM cluster: {err}")
    try:
        yield c
    finally:
        c.stop()


def _comparable(records: list[dict]) -> list[dict]:
    """The per-step training records without wall-clock, speed and memory values."""
    return [{k: v for k, v in r.items() if not k.startswith(("time", "perf/", "mem/"))}
            for r in records if "lr/generator" in r]


@pytest.mark.slow
@pytest.mark.slurm
def test_two_node_job_requeued_by_a_signal_resumes_exactly(two_nodes, tmp_path, sample_manifest):
    """The tokenizer's batch script over node[1-2], 2 tasks each (4 ranks, ZeRO-2 across both nodes). Mid-training
    SIGUSR1 reaches only the batch shell (`scancel --batch --signal=USR1`: what `--signal=B:USR1@T` delivers); the
    shell forwards it through srun to every rank on both nodes, which checkpoint after the same step and exit 3; the
    job requeues itself and its second start resumes there. Every step's losses and the exported weights equal
    those of the same job run uninterrupted; the rendezvous is the first node's address and every rank says where
    SLURM placed it."""
    nodes, per_node, max_steps = 2, 2, 12
    overrides = [f"data.manifest={sample_manifest}", f"train.max_steps={max_steps}", "checkpoint.every=1000",
                 "loss.disc_start=2", *TINY_TRAINING]
    script = str(ROOT / "launch" / "slurm" / "tokenizer.sbatch")

    def submit(run_dir: Path, name: str) -> int:
        return two_nodes.sbatch(*_static_sbatch_args(run_dir, name, nodes, per_node), script, "--config",
                                "configs/tokenizer/tiny.yaml", "--run-dir", str(run_dir), *overrides, cwd=ROOT,
                                env={"MAGVIT_PYTHON": PYTHON})

    reference = tmp_path / "reference"
    info = _wait_finished(two_nodes, submit(reference, "ref"), 240, reference)
    assert info["JobState"] == "COMPLETED", f"{info}{_job_logs(reference)}"

    run_dir = tmp_path / "run"
    job = submit(run_dir, "two-node")
    _wait(two_nodes, lambda: len(_train_steps(run_dir)) >= 1, 240, f"the first step of job {job}", run_dir)
    two_nodes.command("scancel", "--batch", "--signal=USR1", str(job))
    info = _wait_finished(two_nodes, job, 300, run_dir)
    logs = _job_logs(run_dir)
    assert info["JobState"] == "COMPLETED" and info["Restarts"] == "1", f"{info}{logs}"
    assert info["NodeList"] == "node[1-2]" and info["NumNodes"] == "2", info

    batch_log = (run_dir / "logs" / f"two-node-{job}.out").read_text()
    port = 15000 + job % 20000
    assert batch_log.count(f"4 tasks on 2 node(s) (node[1-2]), master 127.0.0.11:{port},") == 2, batch_log
    assert "got SIGUSR1: forwarding it to every rank" in batch_log and "requeueing" in batch_log, batch_log
    saved = set()
    for rank in range(nodes * per_node):
        text = (run_dir / "logs" / f"two-node-{job}-rank{rank}.log").read_text()
        node = rank // per_node
        where = (f"rank {rank} of 4 on node node{node + 1} (node rank {node}, local rank {rank % per_node}), "
                 f"master 127.0.0.11:{port}")
        assert text.count(where) == 2, text  # both starts: the same placement
        saved |= set(re.findall(r"checkpointing at step (\d+) and exiting with status 3", text))
    assert len(saved) == 1, logs  # every rank stopped after the same step
    step = int(saved.pop())
    rank0 = (run_dir / "logs" / f"two-node-{job}-rank0.log").read_text()
    assert re.findall(r"resumed from \S+ \(step (\d+)", rank0) == [str(step)], logs
    assert len(list((run_dir / "checkpoints" / f"step_{step:08d}" / "generator").glob("zero_pp_rank_*"))) == 4

    # Exactly the uninterrupted run: every step's losses, then the exported EMA weights bit for bit.
    assert _train_steps(run_dir) == list(range(1, max_steps + 1)), logs
    assert _comparable(_read_metrics(run_dir)) == _comparable(_read_metrics(reference))
    from safetensors.torch import load_file

    resumed, uninterrupted = (load_file(d / "export" / "model.safetensors") for d in (run_dir, reference))
    assert resumed.keys() == uninterrupted.keys()
    assert all(resumed[k].equal(uninterrupted[k]) for k in resumed)
