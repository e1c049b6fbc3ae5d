"""Safe reruns: a run dir that holds a run refuses a fresh start (one line, exit 2) unless `--resume auto` (the
default) or `--overwrite` (which deletes the previous run and nothing else)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from magvit import runlog
from magvit.run_config import build_arg_parser, parse_args

ROOT = Path(__file__).resolve().parents[1]


def _previous_run(run_dir: Path) -> None:
    """What a finished run leaves, plus a file of the user's that is no part of any run."""
    for sub in ("checkpoints/step_00000002", "export", "samples", "tb", "logs"):
        (run_dir / sub).mkdir(parents=True)
    (run_dir / "checkpoints" / "latest").write_text("step_00000002")
    (run_dir / "export" / "config.json").write_text("{}")
    (run_dir / "samples" / "step_00000002.png").write_bytes(b"png")
    (run_dir / "tb" / "events.out").write_bytes(b"tb")
    (run_dir / "logs" / "rank0.log").write_text("old log\n")
    (run_dir / "metrics.jsonl").write_text('{"step": 2, "g/loss": 1.0}\n')
    (run_dir / "config.yaml").write_text("old: config\n")
    (run_dir / "command.txt").write_text("old command\n")
    (run_dir / "notes.txt").write_text("mine\n")


def test_what_counts_as_a_previous_run(tmp_path):
    run = tmp_path / "run"
    assert runlog.previous_run(run) is None  # not there yet
    (run / "checkpoints").mkdir(parents=True)
    (run / "metrics.jsonl").write_text("")
    assert runlog.previous_run(run) is None  # an empty layout (e.g. a run refused before its first step)
    (run / "metrics.jsonl").write_text('{"step": 1}\n')
    assert runlog.previous_run(run) == "metrics.jsonl"
    (run / "checkpoints" / "step_00000001").mkdir()
    assert runlog.previous_run(run) == "checkpoints/"
    (run / "config.yaml").write_text("x: 1\n")
    assert runlog.previous_run(run) == "config.yaml"
    line = runlog.rerun_problem(run, resume=False, overwrite=False)
    assert line == (f"{run} already holds a run (config.yaml): pass --resume auto to continue it, --overwrite to "
                    "delete it and start over, or another --run-dir")
    assert runlog.rerun_problem(run, resume=True, overwrite=False) is None
    assert runlog.rerun_problem(run, resume=False, overwrite=True) is None


def test_clear_run_dir_deletes_the_previous_run_only(tmp_path):
    run = tmp_path / "run"
    _previous_run(run)
    (run / ".export.old").mkdir()  # left by an interrupted export swap
    runlog.clear_run_dir(run)
    assert sorted(os.listdir(run)) == ["logs", "notes.txt"] and os.listdir(run / "logs") == []  # emptied
    assert runlog.previous_run(run) is None


def test_clear_run_dir_keeps_the_running_slurm_jobs_logs(tmp_path, monkeypatch):
    run = tmp_path / "run"
    _previous_run(run)
    (run / "logs" / "tok-41.out").write_text("the previous job\n")
    (run / "logs" / "tok-42.out").write_text("this job, open for its output\n")
    (run / "logs" / "tok-42-rank0.log").write_text("this job's rank 0\n")
    monkeypatch.setenv("SLURM_JOB_ID", "42")
    runlog.clear_run_dir(run)
    assert sorted(os.listdir(run)) == ["logs", "notes.txt"]
    assert sorted(os.listdir(run / "logs")) == ["tok-42-rank0.log", "tok-42.out"]


def test_resume_auto_is_the_default_and_overwrite_is_explicit():
    parser = build_arg_parser("x", "c.yaml")
    args = parse_args(parser, [])
    assert args.resume == "auto" and args.overwrite is False
    args = parse_args(parser, ["--resume", "never", "--overwrite"])
    assert args.resume == "never" and args.overwrite is True
    text = " ".join(parser.format_help().split())
    assert "DELETE its previous run (checkpoints/, export/, samples/, tb/, logs/, metrics.jsonl," in text


def _tokenizer(run_dir: Path, manifest: Path, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        env.pop(key, None)
    return subprocess.run([sys.executable, str(ROOT / "launch" / "train_tokenizer.py"), "--config",
                           "configs/tokenizer/tiny.yaml", "--run-dir", str(run_dir), f"data.manifest={manifest}",
                           "logging.progress=false", *args], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=240)


def _error_line(result: subprocess.CompletedProcess) -> str:
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr[-3000:]
    lines = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert len(lines) == 1, result.stderr[-3000:]
    return lines[0]


@pytest.fixture
def empty_manifest(tmp_path) -> Path:
    """A manifest without clips: a run that gets past the run-dir checks stops at the data with exit 2, so each
    case costs a start-up, not a training run."""
    path = tmp_path / "manifest.jsonl"
    path.write_text("")
    return path


def test_fresh_start_over_a_previous_run_is_refused_and_touches_nothing(tmp_path, empty_manifest):
    run = tmp_path / "run"
    _previous_run(run)
    before = {p: p.read_bytes() for p in run.rglob("*") if p.is_file()}
    line = _error_line(_tokenizer(run, empty_manifest, "--resume", "never"))
    assert f"{run} already holds a run (config.yaml)" in line and "--overwrite" in line, line
    assert {p: p.read_bytes() for p in run.rglob("*") if p.is_file()} == before


def test_overwrite_deletes_the_previous_run_and_starts_over(tmp_path, empty_manifest):
    run = tmp_path / "run"
    _previous_run(run)
    line = _error_line(_tokenizer(run, empty_manifest, "--overwrite"))  # cleared and set up, then: no clips
    assert "already holds a run" not in line and str(empty_manifest) in line, line
    assert (run / "notes.txt").read_text() == "mine\n"
    assert not (run / "metrics.jsonl").exists() and os.listdir(run / "checkpoints") == []
    assert os.listdir(run / "export") == [] and os.listdir(run / "samples") == [] and os.listdir(run / "tb") == []
    assert "old log" not in (run / "logs" / "rank0.log").read_text()
    assert "old: config" not in (run / "config.yaml").read_text()  # the new run's config
    assert len((run / "command.txt").read_text().splitlines()) == 1 and "--overwrite" in (run / "command.txt").read_text()


def test_default_continues_a_run_dir_without_a_checkpoint(tmp_path, empty_manifest):
    """`--resume auto` (the default) accepts a run dir that holds a run; with no checkpoint it starts at step 0."""
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.yaml").write_text("old: config\n")
    line = _error_line(_tokenizer(run, empty_manifest))
    assert "already holds a run" not in line and str(empty_manifest) in line, line


def test_run_lock_refuses_a_second_holder_and_frees_on_exit(tmp_path):
    run = tmp_path / "run"
    first = runlog.RunLock(run)
    assert first.acquire() is None and run.is_dir() and os.listdir(run) == []  # nothing written into it
    second = runlog.RunLock(run).acquire()
    assert second == (f"{run} is in use by another run (pid {os.getpid()}): wait for it to finish, stop it, or use "
                      "another --run-dir")
    named = runlog.RunLock(run, option="--out", holder="tokenize run").acquire()
    assert named == (f"{run} is in use by another tokenize run (pid {os.getpid()}): wait for it to finish, stop it, "
                     "or use another --out")
    assert runlog.lock_holder(run) == os.getpid()
    first.release()
    assert runlog.lock_holder(run) is None
    again = runlog.RunLock(run)
    assert again.acquire() is None
    again.release()


def test_second_training_in_a_run_dir_in_use_is_refused(tmp_path, empty_manifest):
    """Another process holds the run dir (a training in progress): a second one stops in one line before writing
    anything. When the holder dies, the kernel frees the lock: no stale lock."""
    run = tmp_path / "run"
    holder = subprocess.Popen([sys.executable, "-c", "import sys, time; from magvit.runlog import RunLock; "
                               f"assert RunLock({str(run)!r}).acquire() is None; print('held', flush=True); "
                               "time.sleep(600)"], stdout=subprocess.PIPE, text=True, cwd=ROOT,
                              env={**os.environ, "PYTHONPATH": str(ROOT)})
    try:
        assert holder.stdout.readline().strip() == "held"
        line = _error_line(_tokenizer(run, empty_manifest))
        assert line == (f"error: {run} is in use by another run (pid {holder.pid}): wait for it to finish, stop it, "
                        "or use another --run-dir"), line
        assert os.listdir(run) == []
    finally:
        holder.kill()
        holder.wait()
    line = _error_line(_tokenizer(run, empty_manifest))  # the holder is gone: past the lock, stopped by the data
    assert "in use" not in line and str(empty_manifest) in line, line
