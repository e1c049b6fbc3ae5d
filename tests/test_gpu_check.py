"""benchmarks/gpu_check.py without a GPU: the one line and exit 0 of a machine without CUDA, one-line argument
errors, the table and its arithmetic, the resume comparison on hand-made checkpoints, and the CPU dry run of the
throughput part end to end (the orchestrator, a part's own process, its rows, the table file).

The CPU dry run of the demo and resume parts (five deepspeed launches and two tokenizations, minutes on 2 cores) runs
only with MAGVIT_GPU_CHECK_FULL=1.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "gpu_check.py"
sys.path.insert(0, str(ROOT / "benchmarks"))
import gpu_check  # noqa: E402

no_cuda = pytest.mark.skipif(torch.cuda.is_available(), reason="the behaviour of a machine without CUDA")


def _run(args: list[str], timeout: float = 120, **env) -> subprocess.CompletedProcess:
    return subprocess.run(args, cwd=ROOT, capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, "PYTHONPATH": str(ROOT), **env})


@no_cuda
def test_without_cuda_one_line_and_exit_0(tmp_path):
    out = tmp_path / "table.md"
    result = _run([sys.executable, str(SCRIPT), "--out", str(out)])
    assert result.returncode == 0, result.stderr
    assert result.stdout.count("\n") == 1 and "no CUDA device is available" in result.stdout, result.stdout
    assert not out.exists()


@no_cuda
def test_wrapper_picks_a_python_and_says_the_same(tmp_path):
    """The one command: without a GPU its Python choice falls back to one with torch; no wheels to install."""
    result = _run(["bash", str(ROOT / "benchmarks" / "gpu_check.sh"), "--out", str(tmp_path / "t.md")],
                  WHEELS=str(tmp_path / "no-wheels"), PATH=f"{Path(sys.executable).parent}:{os.environ['PATH']}")
    assert result.returncode == 0, result.stderr
    assert result.stdout.count("\n") == 1 and "no CUDA device is available" in result.stdout, result.stdout


@pytest.mark.parametrize("argv, expected", [
    (["--parts", "demo,nope"], "--parts"),
    (["--parts", "demo,demo"], "without repeats"),
    (["--parts", ","], "--parts"),
    (["--steps", "1"], "--steps must be >= 2"),
    (["--steps", "two"], "invalid int value"),
    (["--time-limit", "10"], "at least 60 seconds"),
    (["--time-limit", "nan"], "at least 60 seconds"),
    (["--device", "tpu"], "invalid choice"),
    (["--bogus"], "unrecognized arguments"),
])
def test_bad_arguments_are_one_line_exit_2(argv, expected, capsys):
    from magvit.cli import run_main

    try:
        status = run_main(gpu_check.PROG, gpu_check.main, argv)
    except SystemExit as exit_:  # argparse's own errors
        status = exit_.code
    err = capsys.readouterr().err
    assert status == 2 and err.count("\n") == 1 and expected in err, (argv, err)
    assert err.startswith("gpu_check: error: ")


def test_bad_out_is_checked_before_anything_runs(tmp_path):
    (tmp_path / "folder.md").mkdir()
    result = _run([sys.executable, str(SCRIPT), "--out", str(tmp_path / "folder.md")])
    assert result.returncode == 2 and result.stderr.count("\n") == 1 and "--out" in result.stderr, result.stderr
    assert not result.stdout


def test_peak_table_by_device_name():
    peak = gpu_check.peak_bf16_tflops
    assert peak("NVIDIA H100 80GB HBM3") == 989 and peak("NVIDIA H100 PCIe") == 756
    assert peak("NVIDIA H200") == 989 and peak("NVIDIA A100-SXM4-80GB") == 312 and peak("NVIDIA L40S") == 362
    assert peak("NVIDIA A10") == 125
    assert peak("NVIDIA A10G") is None and peak("Tesla T4") is None  # not the A10's peak: unknown is n/a


def test_throughput_arithmetic_and_cell():
    assert gpu_check.tflops(2e12, 0.01) == pytest.approx(200.0)
    cell = gpu_check.throughput_numbers(flops=2e12, seconds=0.01, items=8, item="clips", peak=989.0,
                                        peak_bytes=3 * 2**30)
    assert cell == ("10.0 ms/step, 800.0 clips/s; 2 TFLOP/step -> 200.0 TFLOP/s = 20.2% of 989; peak 3.0 GiB")
    assert gpu_check.throughput_numbers(1e9, 0.5, 1, "examples", None, None).endswith("0.0 TFLOP/s (peak n/a)")


def test_markdown_table_and_budgets():
    rows = [gpu_check.Row("demo: tokenizer", "ok", "ok", "2 steps | fast"),
            gpu_check.Row("resume: transformer", "fail", "not exact: max abs diff 1e-06", ""),
            gpu_check.Row("peer: magvit2-pytorch", "skip", gpu_check.NOT_INSTALLED)]
    text = gpu_check.render_markdown("GPU check", ["NVIDIA H100 x1", "torch 2.11"], rows, ["a note"])
    lines = text.splitlines()
    assert lines[0] == "### GPU check" and "- NVIDIA H100 x1" in lines
    assert "| part | result | numbers |" in lines
    assert "| demo: tokenizer | ok | 2 steps \\| fast |" in lines  # a pipe stays inside its cell
    assert "| resume: transformer | FAIL: not exact: max abs diff 1e-06 |  |" in lines
    assert f"| peer: magvit2-pytorch | {gpu_check.NOT_INSTALLED} |  |" in lines and lines[-1] == "a note"
    budgets = gpu_check.part_budgets(["demo", "resume", "throughput", "peer"], 480.0)
    assert budgets == pytest.approx({"demo": 160.0, "resume": 160.0, "throughput": 100.0, "peer": 60.0})
    assert gpu_check.part_budgets(["peer"], 100.0) == {"peer": 100.0}


def _fake_run(root: Path, weight: float, ema: float, losses: dict[int, float], step: int = 4) -> Path:
    """A run folder as the trainers leave it: metrics.jsonl and a checkpoint with two engines' model states."""
    from safetensors.torch import save_file

    checkpoint = root / "checkpoints" / f"step_{step:08d}"
    for engine in ("generator", "discriminator"):
        (checkpoint / engine).mkdir(parents=True)
        torch.save({"module": {"w": torch.full((2, 3), weight), "steps": torch.tensor([step])}},
                   checkpoint / engine / "mp_rank_00_model_states.pt")
    save_file({"w": torch.full((2, 3), ema)}, str(checkpoint / "ema.safetensors"))
    with open(root / "metrics.jsonl", "w") as f:
        for s, v in losses.items():
            f.write(json.dumps({"step": s, "g/loss": v}) + "\n")
    return root


def test_resume_comparison_and_verdict(tmp_path):
    reference = _fake_run(tmp_path / "a", 1.0, 0.5, {1: 3.0, 2: 2.0, 3: 1.5, 4: 1.0})
    same = _fake_run(tmp_path / "b", 1.0, 0.5, {1: 9.0, 2: 2.0, 3: 1.5, 4: 1.0})  # step 1: before the stop
    diff = gpu_check.compare_runs(reference, same, step=4, after=2, loss_keys=["g/loss"])
    assert diff == {"weights": 0.0, "ema": 0.0, "losses": {"g/loss": 0.0}, "tensors": 5}
    assert gpu_check.resume_verdict(diff, []) == ("ok", "exact (all differences 0)")
    off = _fake_run(tmp_path / "c", 1.25, 0.5, {3: 1.5, 4: 1.125})
    diff = gpu_check.compare_runs(reference, off, step=4, after=2, loss_keys=["g/loss"])
    assert diff["weights"] == 0.25 and diff["ema"] == 0.0 and diff["losses"] == {"g/loss": 0.125}
    assert gpu_check.resume_verdict(diff, [])[0] == "fail"
    status, result = gpu_check.resume_verdict(diff, ["upsample_nearest3d_backward_out_cuda"])
    assert status == "note" and "0.25" in result
    with pytest.raises(ValueError, match="not logged by both"):
        gpu_check.compare_runs(reference, _fake_run(tmp_path / "d", 1.0, 0.5, {3: 1.5}), 4, 2, ["g/loss"])


def test_nondeterministic_ops_and_errors_read_from_logs(tmp_path):
    log = tmp_path / "rank.log"
    log.write_text("step 1\nUserWarning: upsample_nearest3d_backward_out_cuda does not have a deterministic "
                   "implementation, but you set 'torch.use_deterministic_algorithms(True, warn_only=True)'\n"
                   "Traceback (most recent call last):\n  File \"x.py\", line 1\n"
                   "torch.OutOfMemoryError: CUDA out of memory. Tried to allocate 2.00 GiB\n"
                   "[ERROR] [launch.py:325:sigkill_handler] ['python'] exits with return code = 1\n"
                   "subprocess.CalledProcessError: Command '['python']' returned non-zero exit status 1.\n")
    assert gpu_check.nondeterministic_ops([log]) == ["upsample_nearest3d_backward_out_cuda"]
    assert gpu_check.last_error(log) == "torch.OutOfMemoryError: CUDA out of memory. Tried to allocate 2.00 GiB"
    log.write_text("error: manifest not found: x.jsonl\n")
    assert gpu_check.last_error(log) == "error: manifest not found: x.jsonl"


def test_training_launch_command():
    """The demo's command as the check launches it: the deepspeed launcher, one rank per GPU, ZeRO-2, each rank
    under deterministic algorithms; a fresh run replaces an old one, a resumed one continues it."""
    fresh = gpu_check.train_command("tokenizer", Path("/w/tok"), ["a=1"], ranks=2, resume=False)
    assert fresh[1:5] == ["-m", "deepspeed.launcher.runner", "--num_accelerators", "2"]
    script = fresh.index(gpu_check.EXEC_DETERMINISTIC)
    assert "--no_local_rank" in fresh[:script] and fresh[script + 1] == str(ROOT / "launch" / "train_tokenizer.py")
    assert fresh[script + 2:script + 4] == ["--config", "configs/tokenizer/demo.yaml"]
    assert fresh[-5:] == ["--resume", "never", "--overwrite", "train.zero_stage=2", "a=1"]
    resumed = gpu_check.train_command("transformer", Path("/w/tr"), [], ranks=1, resume=True)
    assert resumed[-3:] == ["--resume", "auto", "train.zero_stage=2"] and "configs/transformer/demo.yaml" in resumed
    cut, whole = gpu_check.run_overrides(4, 8), gpu_check.run_overrides(8, 8)
    assert cut[0] == "train.max_steps=4" and whole[0] == "train.max_steps=8" and cut[1:] == whole[1:]
    assert "train.min_lr_ratio=1.0" in cut and "checkpoint.every=4" in cut and "logging.sample_every=4" in cut


def test_exec_deterministic_runs_the_script_with_its_arguments(tmp_path):
    script = tmp_path / "train.py"
    script.write_text("import sys, torch\nprint(torch.are_deterministic_algorithms_enabled(), sys.argv[1:])\n"
                      "sys.exit(3)\n")
    result = _run([sys.executable, str(SCRIPT), gpu_check.EXEC_DETERMINISTIC, str(script), "--config", "x.yaml"])
    assert result.returncode == 3 and result.stdout.strip() == "True ['--config', 'x.yaml']", result


def test_peer_without_the_package_is_a_row_not_a_failure(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "magvit2_pytorch", None)  # an import of it fails
    spec = {"part": "peer", "work": str(tmp_path), "steps": 2, "device": "cpu", "deadline": 1e12,
            "rows": str(tmp_path / "rows.json")}
    gpu_check.peer_part(gpu_check.Part(spec))
    (row,) = gpu_check.read_rows(tmp_path / "rows.json")
    assert (row.status, row.result) == ("skip", gpu_check.NOT_INSTALLED)


def test_cpu_dry_run_of_the_throughput_part(tmp_path):
    """The orchestrator runs the part in its own process on the CPU profile (tiny configs, fp32): one row per
    model with its step time and FLOPs, the table in --out, exit 0."""
    out = tmp_path / "gpu_check.md"
    result = _run([sys.executable, str(SCRIPT), "--device", "cpu", "--parts", "throughput", "--out", str(out),
                   "--work", str(tmp_path / "work"), "--time-limit", "300"], timeout=330)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    table = out.read_text()
    assert table in result.stdout and "CPU dry run" in table and "| part | result | numbers |" in table
    rows = [l for l in table.splitlines() if l.startswith("| throughput: ")]
    assert len(rows) == 2 and all(" | ok | " in r and "ms/step" in r and "TFLOP/step" in r for r in rows), rows
    assert "configs/tokenizer/tiny.yaml" in rows[0] and "configs/transformer/tiny.yaml" in rows[1]


@pytest.mark.slow
@pytest.mark.skipif(os.environ.get("MAGVIT_GPU_CHECK_FULL") != "1", reason="minutes on 2 cores: set "
                    "MAGVIT_GPU_CHECK_FULL=1")
def test_cpu_dry_run_of_the_demo_and_resume_parts(tmp_path):
    out = tmp_path / "gpu_check.md"
    result = _run([sys.executable, str(SCRIPT), "--device", "cpu", "--parts", "demo,resume", "--steps", "2",
                   "--out", str(out), "--work", str(tmp_path / "work"), "--time-limit", "1200"], timeout=1300)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    rows = [l for l in out.read_text().splitlines() if l.startswith(("| demo: ", "| resume: "))]
    assert len(rows) == 6 and all(" | FAIL" not in r for r in rows), rows
    assert sum("exact (all differences 0)" in r for r in rows) == 2
