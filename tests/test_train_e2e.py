"""End-to-end training runs with the deepspeed launcher, 2 ranks on CPU (gloo): tokenizer and transformer, ZeRO-2
and ZeRO-3, exact resume after SIGKILL, SIGUSR1 preemption (exit status 3), user errors.

Runs are shared between assertions to keep the time down (each 2-rank launch costs ~10 s of start-up).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from magvit.distributed import EXIT_CODE_PREEMPTED, free_port
from magvit.runlog import read_metrics

ROOT = Path(__file__).resolve().parents[1]
DEEPSPEED = Path(sys.executable).parent / "deepspeed"
pytestmark = pytest.mark.slow

# 4x16x16 clips: tokens 2x4x4 with the tiny tokenizer; the discriminator starts at step 2 so both steps run.
TOKENIZER_OVERRIDES = ["data.num_frames=4", "data.image_size=16", "data.batch_size=2", "data.num_workers=0",
                       "data.clips_per_video=1", "data.val_clips=2", "loss.disc_start=2", "train.warmup_steps=2",
                       "logging.log_every=1", "logging.sample_every=0", "logging.tensorboard=false",
                       "logging.progress=false"]


def _env() -> dict[str, str]:
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    env.pop("RANK", None)
    env.pop("WORLD_SIZE", None)
    return env


def _command(script: str, args: list[str], ranks: int = 2) -> list[str]:
    if ranks == 1 and not args.count("--deepspeed-launcher"):
        return [sys.executable, str(ROOT / "launch" / script), *args]
    return [str(DEEPSPEED), "--num_accelerators", str(ranks), "--master_port", str(free_port()),
            str(ROOT / "launch" / script), *args]


def _run(script: str, args: list[str], ranks: int = 2, timeout: float = 240) -> subprocess.CompletedProcess:
    return subprocess.run(_command(script, args, ranks), cwd=ROOT, env=_env(), capture_output=True, text=True,
                          timeout=timeout)


def _start(script: str, args: list[str], ranks: int = 2) -> subprocess.Popen:
    return subprocess.Popen(_command(script, args, ranks), cwd=ROOT, env=_env(), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)


def _losses(run_dir: Path, key: str) -> dict[int, float]:
    """Last logged value of ``key`` per step (a resumed run logs the steps after its checkpoint again)."""
    out = {}
    for record in read_metrics(run_dir / "metrics.jsonl"):
        if key in record:
            out[record["step"]] = record[key]
    return out


def _latest_step(run_dir: Path) -> int:
    pointer = run_dir / "checkpoints" / "latest"
    return int(pointer.read_text().strip().split("_")[1]) if pointer.is_file() else -1


def _wait_for(predicate, proc: subprocess.Popen, timeout: float = 180) -> None:
    deadline = time.time() + timeout
    while not predicate():
        if proc.poll() is not None:
            raise AssertionError(f"run ended (status {proc.returncode}) before the condition:\n{proc.stdout.read()}")
        if time.time() > deadline:
            raise AssertionError("timed out waiting for the run")
        time.sleep(0.05)


def _kill_after_checkpoint_and_resume(script: str, args: list[str], run_dir: Path,
                                      resume_args: list[str] | None = None) -> int:
    """Start ``script`` with ``args``, SIGKILL its whole process group once ``run_dir`` holds a checkpoint at step
    >= 2, then run it again with ``resume_args`` (default ``args``) and ``--resume auto``; checks that the second
    run succeeded and resumed from the checkpoint the first one left. Returns that checkpoint's step."""
    proc = _start(script, args)
    try:
        _wait_for(lambda: _latest_step(run_dir) >= 2, proc)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    killed_at = _latest_step(run_dir)
    result = _run(script, [*(args if resume_args is None else resume_args), "--resume", "auto"])
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert f"resumed from {run_dir / 'checkpoints' / f'step_{killed_at:08d}'}" in result.stderr + result.stdout
    return killed_at


def _rank_processes(proc: subprocess.Popen, script: str):
    import psutil

    return [p for p in psutil.Process(proc.pid).children(recursive=True)
            if any(script in part for part in p.cmdline()) and any("--local_rank" in part for part in p.cmdline())]


@pytest.fixture(scope="module")
def tokenizer_reference(tmp_path_factory, sample_manifest) -> Path:
    """Uninterrupted 2-rank ZeRO-2 fp32 run of 6 steps."""
    run_dir = tmp_path_factory.mktemp("tok_ref")
    result = _run("train_tokenizer.py", ["--config", "configs/tokenizer/tiny.yaml", "--deepspeed_config",
                                         "configs/deepspeed/zero2.json", "--run-dir", str(run_dir),
                                         f"data.manifest={sample_manifest}", "train.max_steps=6", "checkpoint.every=2",
                                         "logging.sample_every=3", *TOKENIZER_OVERRIDES[:-3],
                                         "logging.tensorboard=true", "logging.progress=false"])
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return run_dir


def test_tokenizer_zero2_run_dir_contract(tokenizer_reference):
    import yaml

    from magvit.tokenizer import VideoTokenizer

    run = tokenizer_reference
    for name in ("config.yaml", "deepspeed_config.json", "command.txt", "version.txt", "metrics.jsonl"):
        assert (run / name).is_file(), name
    ds = json.loads((run / "deepspeed_config.json").read_text())
    assert ds["zero_optimization"]["stage"] == 2 and ds["train_batch_size"] == 4  # 2 per rank x 2 ranks
    recorded = yaml.safe_load((run / "config.yaml").read_text())["train"]
    assert recorded["max_steps"] == 6
    # precision auto (the config's) resolved for the device, and recorded as resolved (conftest: no native bf16)
    assert recorded["precision"] == "fp32"
    assert "deepspeed" in (run / "version.txt").read_text()
    rank0_log = (run / "logs" / "rank0.log").read_text()
    assert "done: 6 steps" in rank0_log and (run / "logs" / "rank1.log").is_file()
    assert "precision: fp32 (auto: " in rank0_log and "MAGVIT_NATIVE_BF16=0" in rank0_log
    assert "- Precision: fp32 (auto: " in (run / "export" / "README.md").read_text()
    losses = _losses(run, "g/loss")
    assert sorted(losses) == [1, 2, 3, 4, 5, 6]
    assert set(_losses(run, "d/loss")) == {3, 4, 5, 6}  # the discriminator starts at step 2 (0-based)
    assert _losses(run, "g/recon")[6] < _losses(run, "g/recon")[1]  # it learns
    lrs = _losses(run, "lr/generator")
    assert lrs[1] < lrs[2] and lrs[6] < lrs[3]  # warmup, then cosine decay
    assert _latest_step(run) == 6
    assert sorted(p.name for p in (run / "checkpoints").glob("step_*")) == ["step_00000004", "step_00000006"]
    assert {p.name for p in (run / "samples").iterdir()} >= {"step_00000003.mp4", "step_00000003.png",
                                                            "step_00000006.mp4", "step_00000006.png"}
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(run / "tb"), size_guidance={"images": 0})
    events.Reload()  # the samples reach TensorBoard beside the scalars: a video (GIF) and the middle frames
    assert {"val/real_vs_reconstruction", "val/frames"} <= set(events.Tags()["images"])
    assert [e.step for e in events.Images("val/real_vs_reconstruction")] == [3, 6]
    assert "g/loss" in events.Tags()["scalars"]
    psnr = _losses(run, "val/psnr")
    assert set(psnr) == {3, 6} and all(5 < v < 60 for v in psnr.values())
    assert any((run / "tb").iterdir())
    model = VideoTokenizer.from_pretrained(run / "export")
    assert model.config.num_frames == 4 and model.config.image_size == 16


def test_tokenizer_exact_resume_after_sigkill(tokenizer_reference, sample_manifest, tmp_path):
    """Killed (SIGKILL, whole process group) after its first checkpoint, then resumed with --resume auto: the
    losses of every step after the checkpoint equal the uninterrupted run's (fp32, same world size; we expect
    bit-identical values and assert a relative tolerance of 1e-6)."""
    run_dir = tmp_path / "run"
    args = ["--config", "configs/tokenizer/tiny.yaml", "--run-dir", str(run_dir), f"data.manifest={sample_manifest}",
            "train.max_steps=6", "checkpoint.every=2", *TOKENIZER_OVERRIDES]
    killed_at = _kill_after_checkpoint_and_resume("train_tokenizer.py", args, run_dir)
    assert 2 <= killed_at < 6
    for key in ("g/loss", "g/recon", "d/loss"):
        reference, resumed = _losses(tokenizer_reference, key), _losses(run_dir, key)
        steps = [s for s in reference if s > killed_at]
        assert steps and all(s in resumed for s in steps), key
        for s in steps:
            assert resumed[s] == pytest.approx(reference[s], rel=1e-6, abs=1e-9), (key, s)
    assert _latest_step(run_dir) == 6


def test_tokenizer_zero3_preempted_by_sigusr1_then_resumed(sample_manifest, tmp_path):
    """SIGUSR1 to the ranks (what SLURM sends before preemption): the run finishes its step, checkpoints,
    exports and exits with status 3; --resume auto then completes it (ZeRO-3 checkpoint load)."""
    run_dir = tmp_path / "run"
    args = ["--config", "configs/tokenizer/tiny.yaml", "--deepspeed_config", "configs/deepspeed/zero3.json",
            "--run-dir", str(run_dir), f"data.manifest={sample_manifest}", "train.max_steps=40",
            "checkpoint.every=1000", *TOKENIZER_OVERRIDES]
    proc = _start("train_tokenizer.py", args)
    try:
        _wait_for(lambda: (run_dir / "metrics.jsonl").is_file() and len(_losses(run_dir, "g/loss")) >= 1, proc)
        for rank_process in _rank_processes(proc, "train_tokenizer.py"):
            rank_process.send_signal(signal.SIGUSR1)
        output, _ = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode == EXIT_CODE_PREEMPTED, output[-3000:]
    stopped = _latest_step(run_dir)
    assert 1 <= stopped < 40
    assert (run_dir / "export" / "model.safetensors").is_file()
    assert json.loads((run_dir / "deepspeed_config.json").read_text())["zero_optimization"]["stage"] == 3
    result = _run("train_tokenizer.py", [*args, "--resume", "auto", "train.max_steps=" + str(stopped + 2)])
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert _latest_step(run_dir) == stopped + 2
    assert sorted(s for s in _losses(run_dir, "g/loss") if s > stopped) == [stopped + 1, stopped + 2]


@pytest.mark.parametrize("script", ["train_tokenizer", "train_transformer"])
def test_config_errors_are_one_line_exit_2(script, capsys, monkeypatch):
    import importlib

    monkeypatch.chdir(ROOT)
    module = importlib.import_module(f"magvit.launch.{script}")
    kind = script.split("_")[1]
    cases = [
        ([f"--config=configs/{kind}/tiny.yaml", "train.nope=1"], "train.nope"),
        ([f"--config=configs/{kind}/missing.yaml"], "not found"),
        ([f"--config=configs/{kind}/tiny.yaml", "--deepspeed_config=configs/deepspeed/zero9.json"], "not found"),
        ([f"--config=configs/{kind}/tiny.yaml", "train.precision=fp16"], "precision"),
        ([f"--config=configs/{kind}/tiny.yaml", "model.hidden_size=-"], "model"),
        ([f"--config=configs/{kind}/tiny.yaml", "--bogus"], "unrecognized"),
        ([f"--config=configs/{kind}/tiny.yaml", "data.manifest=/nonexistent.jsonl",
          "data.tokens=/nonexistent"], "not found"),
    ]
    for argv, expected in cases:
        try:
            status = module.run_main(None, module.main, argv)
        except SystemExit as exit_:  # argparse's own errors
            status = exit_.code
        assert status == 2, argv
        err = capsys.readouterr().err
        # config errors: "error: ..."; argparse's own (--bogus): "<prog>: error: ..."; one line either way
        assert err.split(": ", 1)[-1].startswith("error: ") or err.startswith("error: "), (argv, err)
        assert err.count("\n") == 1 and expected in err, (argv, err)


@pytest.fixture(scope="module")
def tokens(tmp_path_factory, tokenizer_reference, sample_manifest) -> Path:
    """Token shards of the sample clips made with the reference run's exported tokenizer (2x4x4 tokens)."""
    from magvit.prep import tokenize

    out = tmp_path_factory.mktemp("tokens")
    assert tokenize.main(["--tokenizer", str(tokenizer_reference / "export"), "--manifest", str(sample_manifest),
                          "--out", str(out), "--split", "all", "--workers", "0"]) == 0  # in-process: no start-up
    return out


def _free_slurm_job_id() -> int:
    """A job id whose derived MASTER_PORT (see magvit.distributed.slurm_master_port) is free right now."""
    import random
    import socket

    from magvit.distributed import slurm_master_port

    for _ in range(100):
        job_id = random.randrange(1, 10**6)
        with socket.socket() as sock:
            try:
                sock.bind(("127.0.0.1", slurm_master_port(job_id)))
                return job_id
            except OSError:
                continue
    raise RuntimeError("no free port")


def _run_like_srun(script: str, args: list[str], ntasks: int = 2, timeout: float = 240) -> list[tuple[int, str]]:
    """What ``srun --ntasks N python script ...`` does: N plain processes that only have SLURM variables."""
    job_id = _free_slurm_job_id()
    procs = []
    for rank in range(ntasks):
        env = {k: v for k, v in _env().items() if k not in ("MASTER_ADDR", "MASTER_PORT", "LOCAL_RANK")}
        env.update({"SLURM_PROCID": str(rank), "SLURM_NTASKS": str(ntasks), "SLURM_LOCALID": str(rank),
                    "SLURM_JOB_NODELIST": "localhost", "SLURM_JOB_ID": str(job_id)})
        procs.append(subprocess.Popen([sys.executable, str(ROOT / "launch" / script), *args], cwd=ROOT, env=env,
                                      stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    return [(p.wait(timeout=timeout), p.stdout.read()) for p in procs]


@pytest.mark.parametrize("launcher, stage, precision, accum", [("srun", 2, "fp32", 2), ("deepspeed", 3, "bf16", 1)])
def test_transformer_trains_and_exports_ema(launcher, stage, precision, accum, tokens, tmp_path):
    """2 ranks started by the deepspeed launcher (ZeRO-3, DeepSpeed bf16) or, as srun does, as two plain
    processes with SLURM variables only (ZeRO-2, fp32, 2 micro-batches per optimizer step)."""
    from safetensors.torch import load_file

    from magvit.transformer import MaskedVideoTransformer

    run_dir = tmp_path / "run"
    args = ["--config", "configs/transformer/tiny.yaml", "--deepspeed_config", f"configs/deepspeed/zero{stage}.json",
            "--run-dir", str(run_dir), f"data.tokens={tokens}", "data.batch_size=2", "train.max_steps=4",
            "train.warmup_steps=1", f"train.precision={precision}", f"train.grad_accum_steps={accum}",
            "checkpoint.every=2", "logging.log_every=1", "logging.tensorboard=false"]
    if launcher == "srun":
        for status, output in _run_like_srun("train_transformer.py", args):
            assert status == 0, output[-3000:]
        assert '"SLURM_JOB_ID"' in (run_dir / "command.txt").read_text()
    else:
        result = _run("train_transformer.py", args)
        assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    ds = json.loads((run_dir / "deepspeed_config.json").read_text())
    assert ds["zero_optimization"]["stage"] == stage and ds["bf16"]["enabled"] is (precision == "bf16")
    assert ds["train_batch_size"] == 4 * accum and ds["gradient_accumulation_steps"] == accum  # 2/rank x 2 ranks
    losses = _losses(run_dir, "loss")
    assert sorted(losses) == [1, 2, 3, 4] and all(0 < v < 10 for v in losses.values())
    meta = json.loads((tokens / "meta.json").read_text())
    per_epoch = meta["num_examples"] // 2 // 2  # micro-batches of 2 per rank and epoch
    assert _losses(run_dir, "epoch")[4] == (4 * accum - 1) // per_epoch  # 4 steps consumed 4 * accum of them
    model = MaskedVideoTransformer.from_pretrained(run_dir / "export")
    assert model.config.codebook_size == meta["codebook_size"]
    assert list(model.config.token_grid) == list(meta["token_grid"])
    # tiny.yaml trains MAGVIT's COMMIT (interior) layout on the COMMIT tasks, recording the shards' given-frame counts
    assert model.config.conditioning == "interior" and "sketch" not in model.config.tasks
    assert model.config.cond_frames == (1,)
    ema = load_file(str(run_dir / "checkpoints" / "step_00000004" / "ema.safetensors"))
    for name, param in model.named_parameters():  # the export holds the EMA weights of the last checkpoint
        assert torch.equal(param.detach(), ema[name]), name


def test_sketch_config_trains_a_prefix_model_that_generates_from_a_sketch(tokens, tokenizer_reference, sample_manifest,
                                                                         tmp_path):
    """configs/transformer/sketch.yaml: a prefix model of the sketch and frame-prediction tasks, whose export
    generates from the sketch of a clip through the command line."""
    from magvit.data import read_manifest
    from magvit.generate import main as generate
    from magvit.transformer import MaskedVideoTransformer
    from magvit.video_io import probe_video

    run_dir = tmp_path / "run"
    result = _run("train_transformer.py", ["--config", "configs/transformer/sketch.yaml", "--run-dir", str(run_dir),
                                           f"data.tokens={tokens}", "data.batch_size=2", "train.max_steps=2",
                                           "train.warmup_steps=1", "checkpoint.every=2", "logging.tensorboard=false"],
                  ranks=1)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    config = MaskedVideoTransformer.from_pretrained(run_dir / "export").config
    assert config.conditioning == "prefix" and config.tasks == ("sketch", "frame_prediction")
    clip = read_manifest(sample_manifest)[0]["path"]
    assert generate(["--task", "sketch", "--cond", clip, "--tokenizer", str(tokenizer_reference / "export"),
                     "--transformer", str(run_dir / "export"), "--steps", "2", "--out", str(tmp_path / "sketch.mp4"),
                     "--device", "cpu"]) == 0
    tokenizer_config = json.loads((tokenizer_reference / "export" / "config.json").read_text())["config"]
    assert probe_video(tmp_path / "sketch.mp4")["frames"] == tokenizer_config["num_frames"]


def test_plain_python_run_stops_on_repeated_nonfinite_loss(tokens, tmp_path):
    """One plain `python` process (no launcher). An absurd learning rate makes the loss non-finite from the
    second step on: each such step is skipped and logged, and max_nonfinite_steps in a row stop the run."""
    run_dir = tmp_path / "run"
    result = _run("train_transformer.py", [
        "--config", "configs/transformer/tiny.yaml", "--run-dir", str(run_dir), f"data.tokens={tokens}",
        "data.batch_size=2", "train.max_steps=20", "train.warmup_steps=0", "optim.lr=1e30", "optim.grad_clip=0",
        "train.max_nonfinite_steps=3", "logging.log_every=1", "logging.tensorboard=false"], ranks=1)
    assert result.returncode == 1, result.stdout[-3000:] + result.stderr[-3000:]
    assert "3 non-finite losses in a row" in result.stderr
    records = read_metrics(run_dir / "metrics.jsonl")
    skipped = [r for r in records if r.get("event") in ("nonfinite_loss", "nonfinite_stop")]
    assert [(r["event"], r["nonfinite_skipped"]) for r in skipped] == [
        ("nonfinite_loss", 1), ("nonfinite_loss", 2), ("nonfinite_stop", 3)]
    assert all(r["step"] == skipped[0]["step"] for r in skipped)  # skipped steps do not advance the step count
    assert '"WORLD_SIZE": "1"' in (run_dir / "command.txt").read_text()


def test_short_run_whose_every_step_overflows_fails_without_export(sample_manifest, tmp_path):
    """A finite loss whose gradients overflow: DeepSpeed skips every optimizer step. A run shorter than
    max_nonfinite_steps must still fail (status 1), not export untrained weights as done."""
    run_dir = tmp_path / "run"
    result = _run("train_tokenizer.py", ["--config", "configs/tokenizer/tiny.yaml", "--run-dir", str(run_dir),
                                         f"data.manifest={sample_manifest}", "train.max_steps=3",
                                         "loss.recon_weight=3e38", *TOKENIZER_OVERRIDES], ranks=1)
    assert result.returncode == 1, result.stdout[-3000:] + result.stderr[-3000:]
    assert "every optimizer step of this run (3, to step 3) was skipped" in result.stderr
    assert not list(run_dir.glob("export/*.safetensors")) and not list(run_dir.glob("checkpoints/step_*"))


def test_bad_deepspeed_config_file_is_refused_before_the_run_dir_is_written(sample_manifest, tmp_path):
    bad = tmp_path / "zero.json"
    bad.write_text(json.dumps({"zero_optimization": {"stage": 2, "reduce_bucket_sise": 5}}))  # a typo'd key
    run_dir = tmp_path / "run"
    result = _run("train_tokenizer.py", ["--config", "configs/tokenizer/tiny.yaml", "--deepspeed_config", str(bad),
                                         "--run-dir", str(run_dir), f"data.manifest={sample_manifest}",
                                         *TOKENIZER_OVERRIDES],
                  ranks=1)
    assert result.returncode == 2, result.stdout[-3000:] + result.stderr[-3000:]
    assert "invalid DeepSpeed config: DeepSpeedZeroConfig reduce_bucket_sise: Extra inputs" in result.stderr
    assert not (run_dir / "config.yaml").exists()  # a corrected retry is not refused as a rerun


def test_resume_with_another_world_size_is_refused_in_one_line(tokenizer_reference, sample_manifest, tmp_path):
    """The 2-rank ZeRO-2 reference resumed by one plain process: exit 2 with one line saying how many ranks wrote
    the checkpoint (before: a ZeRORuntimeException traceback from inside DeepSpeed), config.yaml untouched."""
    import shutil

    run_dir = tmp_path / "run"
    shutil.copytree(tokenizer_reference, run_dir)
    recorded = (run_dir / "config.yaml").read_text()
    result = _run("train_tokenizer.py", ["--config", "configs/tokenizer/tiny.yaml", "--deepspeed_config",
                                         "configs/deepspeed/zero2.json", "--run-dir", str(run_dir),
                                         f"data.manifest={sample_manifest}", "train.max_steps=6", "checkpoint.every=2",
                                         "logging.sample_every=3", *TOKENIZER_OVERRIDES[:-3],
                                         "logging.tensorboard=true", "logging.progress=false", "--resume", "auto"],
                  ranks=1)
    assert result.returncode == 2, result.stdout[-3000:] + result.stderr[-3000:]
    assert "Traceback" not in result.stderr
    (line,) = [x for x in result.stderr.splitlines() if x.startswith("error: ")]
    assert "was written by 2 rank(s), this run has 1: resume with 2 rank(s)" in line, line
    assert (run_dir / "config.yaml").read_text() == recorded


def test_pickle_planted_in_one_ranks_shard_stops_both_ranks(tokenizer_reference, sample_manifest, tmp_path):
    """A code-running pickle in rank 1's optimizer shard only: both ranks refuse together (the file check is a
    collective) with one line, exit 2, before DeepSpeed reads anything, and the code never runs."""
    import shutil

    run_dir = tmp_path / "run"
    shutil.copytree(tokenizer_reference, run_dir)
    marker = tmp_path / "code_ran"
    target = run_dir / "checkpoints" / "step_00000006" / "generator" / "zero_pp_rank_1_mp_rank_00_optim_states.pt"
    assert target.is_file()

    class Planted:  # saving it runs nothing; loading it would run `touch marker`
        def __reduce__(self):
            return (os.system, ("touch " + str(marker),))

    torch.save({"optimizer_state_dict": Planted()}, target)
    result = _run("train_tokenizer.py", ["--config", "configs/tokenizer/tiny.yaml", "--deepspeed_config",
                                         "configs/deepspeed/zero2.json", "--run-dir", str(run_dir),
                                         f"data.manifest={sample_manifest}", "train.max_steps=6", "checkpoint.every=2",
                                         "logging.sample_every=3", *TOKENIZER_OVERRIDES[:-3],
                                         "logging.tensorboard=true", "logging.progress=false", "--resume", "auto"])
    assert result.returncode == 2, result.stdout[-3000:] + result.stderr[-3000:]
    output = result.stdout + result.stderr
    assert "Traceback" not in output
    # One line per rank, written by two processes to one pipe: the lines may interleave, and the deepspeed launcher
    # stops the other ranks as soon as one exits, so rank 1's own line may be cut off when rank 0 exits first (the
    # single-process planted-pickle tests check that line's text). Rank 0's refusal must be there.
    assert f"{target.parents[1]}: rank 1 found a damaged or unsafe file (its own error line names it)" in output
    assert output.count("error: ") <= 2, output[-3000:]
    assert not marker.exists()


def test_tokenizer_trains_on_extracted_clip_shards(sample_manifest, tmp_path):
    """One plain process on the clip shards of `data_prep.extract` (data.format=safetensors): no video decoding
    in the loop; the manifest still gives the validation clips."""
    extracted = subprocess.run([sys.executable, "-m", "data_prep.extract", "--manifest", str(sample_manifest), "--out",
                                str(tmp_path / "clips"), "--num-frames", "4", "--image-size", "20", "--workers", "0"],
                               cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=180)
    assert extracted.returncode == 0, extracted.stderr[-3000:]
    run_dir = tmp_path / "run"
    result = _run("train_tokenizer.py", ["--config", "configs/tokenizer/tiny.yaml", "--run-dir", str(run_dir),
                                         "data.format=safetensors", f"data.shards={tmp_path / 'clips'}",
                                         f"data.manifest={sample_manifest}", "train.max_steps=2", "checkpoint.every=2",
                                         *TOKENIZER_OVERRIDES], ranks=1)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert sorted(_losses(run_dir, "g/loss")) == [1, 2] and "val/psnr" in read_metrics(run_dir / "metrics.jsonl")[-1]
    assert str(tmp_path / "clips") in (run_dir / "export" / "README.md").read_text()  # the card names the shards
