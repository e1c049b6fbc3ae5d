"""What a hostile run dir, a broken disk or a careless flag can do to training, end to end with plain `python`
(one process, no launcher): planted pickles, overflowing gradients, overrides on resume, a full or read-only disk,
broken configs and token shards. Each training run is 1-10 steps at 4x16x16 (seconds of training; most of a
run's time is Python and DeepSpeed start-up), and the config cases stop before any model is built.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from magvit.runlog import read_metrics

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow

SMALL = ["data.num_frames=4", "data.image_size=16", "data.batch_size=2", "data.num_workers=0", "data.val_clips=0",
         "loss.disc_start=1", "train.warmup_steps=2", "logging.log_every=1", "logging.sample_every=0",
         "logging.tensorboard=false", "logging.progress=false"]

# torch.save replaced by a writer that puts half of the bytes on disk and then fails as a full disk does; armed
# after MAGVIT_TEST_GOOD_SAVES calls. Only this test's wrapper process has it (the library has no such hook).
FULL_DISK_WRAPPER = textwrap.dedent("""
    import errno, io, os, runpy, sys
    import torch
    real_save, calls = torch.save, [0]
    def full_disk_save(obj, f, *args, **kwargs):
        calls[0] += 1
        if calls[0] <= int(os.environ["MAGVIT_TEST_GOOD_SAVES"]):
            return real_save(obj, f, *args, **kwargs)
        buffer = io.BytesIO()
        real_save(obj, buffer)
        with open(f, "wb") as out:
            out.write(buffer.getvalue()[: len(buffer.getvalue()) // 2])
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(f))
    torch.save = full_disk_save
    sys.argv = sys.argv[1:]
    runpy.run_path(sys.argv[0], run_name="__main__")
""")

def _plant_evil_pickle(target: Path, marker: Path) -> None:
    """Overwrite ``target`` with a pickle whose loading runs ``touch marker`` (saving it runs nothing)."""
    import torch

    class Planted:
        def __reduce__(self):
            return (os.system, ("touch " + str(marker),))

    torch.save({"module": Planted(), "optimizer_state_dict": Planted()}, target)


def _env() -> dict[str, str]:
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        env.pop(key, None)
    return env


def _python(args: list[str], prefix: list[str] | None = None, env: dict[str, str] | None = None,
            timeout: float = 240) -> subprocess.CompletedProcess:
    return subprocess.run([*(prefix or []), sys.executable, *args], cwd=ROOT, env={**_env(), **(env or {})},
                          capture_output=True, text=True, timeout=timeout)


def _tokenizer(run_dir: Path, manifest: Path, *args: str, **kwargs) -> subprocess.CompletedProcess:
    return _python([str(ROOT / "launch" / "train_tokenizer.py"), "--config", "configs/tokenizer/tiny.yaml",
                    "--run-dir", str(run_dir), f"data.manifest={manifest}", *SMALL, *args], **kwargs)


def _error_line(result: subprocess.CompletedProcess) -> str:
    """The run's user-facing error: exactly one `error:` line on stderr and no traceback."""
    assert "Traceback" not in result.stderr, result.stderr[-3000:]
    lines = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert len(lines) == 1, result.stderr[-3000:]
    return lines[0]


def _copy_run(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


@pytest.fixture(scope="module")
def base_run(tmp_path_factory, sample_manifest) -> Path:
    """2 steps, a checkpoint after each."""
    run_dir = tmp_path_factory.mktemp("base") / "run"
    result = _tokenizer(run_dir, sample_manifest, "train.max_steps=2", "checkpoint.every=1")
    assert result.returncode == 0, result.stderr[-3000:]
    return run_dir


# --------------------------------------------------------------------------------------------------------------
# Code execution on resume
# --------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("planted", ["generator/zero_pp_rank_0_mp_rank_00_optim_states.pt",
                                     "discriminator/mp_rank_00_model_states.pt"])
def test_planted_pickle_never_runs_on_resume(planted, base_run, sample_manifest, tmp_path):
    """A pickle whose __reduce__ runs `touch MARKER`, planted as a model-states or optim-states file of the latest
    checkpoint: `--resume auto` stops with exit 2 and one line naming the file, and MARKER never appears."""
    run_dir = _copy_run(base_run, tmp_path / "run")
    marker = tmp_path / "code_ran"
    target = run_dir / "checkpoints" / "step_00000002" / planted
    assert target.is_file()
    _plant_evil_pickle(target, marker)
    result = _tokenizer(run_dir, sample_manifest, "train.max_steps=2", "checkpoint.every=1", "--resume", "auto")
    assert result.returncode == 2
    line = _error_line(result)
    assert str(target) in line and "posix.system" in line and "refusing to load" in line, line
    assert not marker.exists()


# --------------------------------------------------------------------------------------------------------------
# Training that "succeeds" without learning
# --------------------------------------------------------------------------------------------------------------
def test_overflowing_gradients_stop_the_run(sample_manifest, tmp_path):
    """loss.recon_weight=3e38: every loss is finite but every gradient overflows, so DeepSpeed (ZeRO-2) skips every
    update. The skipped steps are counted and logged, and max_nonfinite_steps of them in a row end the run with
    status 1 and one error line (before: exit 0, "done", an untrained export)."""
    run_dir = tmp_path / "run"
    result = _tokenizer(run_dir, sample_manifest, "train.max_steps=10", "checkpoint.every=100",
                        "loss.recon_weight=3e38", "train.max_nonfinite_steps=3")
    assert result.returncode == 1, result.stderr[-3000:]
    errors = [line for line in result.stderr.splitlines() if " ERROR " in line]
    assert len(errors) == 1 and "3 optimizer steps in a row skipped for non-finite gradients" in errors[0], errors
    assert "done:" not in result.stderr and not (run_dir / "export" / "model.safetensors").exists()
    events = [(r["event"], r["step"], r["skipped_steps"]) for r in read_metrics(run_dir / "metrics.jsonl")
              if "event" in r]
    assert events == [("step_skipped", 1, 1), ("step_skipped", 2, 2), ("nonfinite_stop", 3, 3)]
    losses = [r["g/loss"] for r in read_metrics(run_dir / "metrics.jsonl") if "g/loss" in r]
    assert losses and all(0 < v < float("inf") for v in losses)  # the loss guard alone would never have fired


# --------------------------------------------------------------------------------------------------------------
# Overrides on resume
# --------------------------------------------------------------------------------------------------------------
def test_resume_refuses_overrides_of_fixed_keys(base_run, sample_manifest, tmp_path):
    """`--resume auto optim.lr=1e30 train.seed=3`: one line naming both keys, exit 2, and config.yaml still
    records the values in force (before: trained at the checkpoint's LR while config.yaml said 1e30)."""
    run_dir = _copy_run(base_run, tmp_path / "run")
    recorded = (run_dir / "config.yaml").read_text()
    result = _tokenizer(run_dir, sample_manifest, "train.max_steps=4", "checkpoint.every=1", "optim.lr=1e30",
                        "train.seed=3", "--resume", "auto")
    assert result.returncode == 2
    line = _error_line(result)
    assert "cannot resume" in line and "optim.lr (0.001 -> 1e+30)" in line and "train.seed (0 -> 3)" in line, line
    assert (run_dir / "config.yaml").read_text() == recorded
    assert "step_00000003" not in os.listdir(run_dir / "checkpoints")


def test_resume_applies_and_logs_allowed_overrides(base_run, sample_manifest, tmp_path):
    """train.max_steps and logging.* may change on resume: they are applied, logged and recorded, and the cosine
    schedule ends at the new max_steps (not at the checkpoint's)."""
    import yaml

    from magvit.optim import warmup_cosine

    run_dir = _copy_run(base_run, tmp_path / "run")
    result = _tokenizer(run_dir, sample_manifest, "train.max_steps=4", "checkpoint.every=1", "logging.log_every=2",
                        "--resume", "auto")
    assert result.returncode == 0, result.stderr[-3000:]
    assert "resume: train.max_steps: 2 -> 4" in result.stderr and "resume: logging.log_every: 1 -> 2" in result.stderr
    config = yaml.safe_load((run_dir / "config.yaml").read_text())
    assert config["train"]["max_steps"] == 4 and config["logging"]["log_every"] == 2
    lrs = {r["step"]: r["lr/generator"] for r in read_metrics(run_dir / "metrics.jsonl") if "lr/generator" in r}
    base_lr, floor = config["optim"]["lr"], config["train"]["min_lr_ratio"]
    # step 4 (0-based 3) with the new end; with the old end (2) the schedule would sit at the floor already
    assert lrs[4] == pytest.approx(base_lr * warmup_cosine(3, 2, 4, floor), rel=1e-12)
    assert lrs[4] != pytest.approx(base_lr * warmup_cosine(3, 2, 2, floor), rel=1e-6)


# --------------------------------------------------------------------------------------------------------------
# Disk full, read-only disk
# --------------------------------------------------------------------------------------------------------------
def test_full_disk_during_checkpoint_is_one_line_and_keeps_the_previous(sample_manifest, tmp_path):
    """The writer fails as a full disk does (half a file, then ENOSPC) while checkpoint 2 is written: exit 2, one
    line, no .tmp-step folder left, `latest` still names step 1, which resumes."""
    run_dir = tmp_path / "run"
    wrapper = tmp_path / "full_disk.py"
    wrapper.write_text(FULL_DISK_WRAPPER)
    script = str(ROOT / "launch" / "train_tokenizer.py")
    args = ["--config", "configs/tokenizer/tiny.yaml", "--run-dir", str(run_dir), f"data.manifest={sample_manifest}",
            *SMALL]
    # 4 torch.save calls per checkpoint (model + optimizer states of the two engines): the 6th fails, in step 2's
    result = _python([str(wrapper), script, *args, "train.max_steps=2", "checkpoint.every=1"],
                     env={"MAGVIT_TEST_GOOD_SAVES": "5"})
    assert result.returncode == 2, result.stderr[-3000:]
    line = _error_line(result)
    assert "could not write checkpoint step_00000002" in line and "No space left on device" in line, line
    assert "is the disk full?" in line and "the latest checkpoint is still step_00000001" in line
    checkpoints = run_dir / "checkpoints"
    assert sorted(os.listdir(checkpoints)) == ["latest", "step_00000001"]
    assert (checkpoints / "latest").read_text().strip() == "step_00000001"
    (checkpoints / ".tmp-step_00000009").mkdir()  # what a crash (SIGKILL) mid-save leaves behind
    result = _python([script, *args, "train.max_steps=1", "--resume", "auto"])
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"resumed from {checkpoints / 'step_00000001'}" in result.stderr
    assert not (checkpoints / ".tmp-step_00000009").exists()  # stale temp folders go at the next start


def _unshare_works() -> bool:
    try:
        return subprocess.run(["unshare", "-rm", "true"], capture_output=True, timeout=10).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return False


@pytest.mark.skipif(not _unshare_works(), reason="needs `unshare -rm` (user + mount namespaces) for a tmpfs")
def test_really_full_disk_keeps_the_previous_checkpoint(sample_manifest, tmp_path):
    """checkpoints/ on a 14 MB tmpfs (a private mount namespace): checkpoint 1 (~9.5 MB) fits, checkpoint 2 does
    not. Exit 2 with one line, no temp folder, and step 1 resumes (before: a safetensors / `unexpected pos`
    traceback and a half-written .tmp-step folder)."""
    run_dir, errors = tmp_path / "run", tmp_path / "first.err"
    ck = run_dir / "checkpoints"
    ck.mkdir(parents=True)
    args = " ".join(f"'{a}'" for a in [str(ROOT / "launch" / "train_tokenizer.py"), "--config",
                                        "configs/tokenizer/tiny.yaml", "--run-dir", str(run_dir),
                                        f"data.manifest={sample_manifest}", *SMALL, "checkpoint.every=1"])
    script = (f'mount -t tmpfs -o size=14000k tmpfs "{ck}" || exit 99; "$0" {args} train.max_steps=2 2>"{errors}"; '
              f'echo "RC1=$?"; ls -a "{ck}"; "$0" {args} train.max_steps=1 --resume auto; echo "RC2=$?"')
    result = subprocess.run(["unshare", "-rm", "sh", "-c", script, sys.executable], cwd=ROOT, env=_env(),
                            capture_output=True, text=True, timeout=400)
    out = result.stdout
    assert "RC1=2" in out and "RC2=0" in out, out + result.stderr[-3000:]
    first = subprocess.CompletedProcess([], 2, "", errors.read_text())
    line = _error_line(first)
    assert "could not write checkpoint step_00000002" in line and "is the disk full?" in line, line
    listing = out.split("RC1=2", 1)[1].split("RC2", 1)[0].split()
    assert sorted(listing) == [".", "..", "latest", "step_00000001"], listing
    assert f"resumed from {ck / 'step_00000001'}" in result.stderr


@pytest.mark.skipif(not _unshare_works(), reason="needs `unshare -rm` (user + mount namespaces) for a read-only bind")
def test_read_only_checkpoints_dir_fails_at_start(sample_manifest, tmp_path):
    """checkpoints/ on a read-only mount (a bind mount in a private namespace, so it holds for root too): exit 2
    and one line before the first step (before: a traceback at the first checkpoint, after training)."""
    run_dir = tmp_path / "run"
    (run_dir / "checkpoints").mkdir(parents=True)
    ck = str(run_dir / "checkpoints")
    mount = ["unshare", "-rm", "sh", "-c", f'mount --bind "{ck}" "{ck}" && mount -o remount,bind,ro "{ck}" && '
             'exec "$0" "$@"']
    result = _tokenizer(run_dir, sample_manifest, "train.max_steps=2", "checkpoint.every=1", prefix=mount)
    assert result.returncode == 2, result.stderr[-3000:]
    line = _error_line(result)
    assert f"cannot write the run dir {run_dir}" in line and "Read-only file system" in line, line
    assert not (run_dir / "metrics.jsonl").exists()


# --------------------------------------------------------------------------------------------------------------
# Config mistakes: one line, exit 2, from the command line
# --------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("content, overrides, expected", [
    ("- a\n- b\n", [], "expected a mapping of keys at the top level, got a list"),
    ("42\n", [], "got the scalar '42'"),
    ("# only a comment\n", [], "the config file is empty"),
    (None, ["optim.lr=!!python/object/apply:os.system ['touch x']"], "not a YAML value"),
    (None, ["optim.lr=[1"], "not a YAML value"),
    (None, ["train.zero_stage=7"], "zero_stage must be 0, 1, 2 or 3"),
    (None, ["optim.lr=.nan"], "optim.lr: expected a number, got NaN"),
    (None, ["optim.lr=.inf"], "lr must be a finite number"),
], ids=["list", "scalar", "empty", "yaml-tag", "unclosed", "zero-stage-7", "lr-nan", "lr-inf"])
def test_config_mistakes_are_one_line_exit_2(content, overrides, expected, tmp_path):
    config = "configs/tokenizer/tiny.yaml"
    if content is not None:
        config = str(tmp_path / "config.yaml")
        Path(config).write_text(content)
    result = _python([str(ROOT / "launch" / "train_tokenizer.py"), "--config", config, "--run-dir",
                      str(tmp_path / "run"), *overrides], timeout=120)
    assert result.returncode == 2
    assert expected in _error_line(result)
    assert not (tmp_path / "run").exists() and not (ROOT / "x").exists()


# --------------------------------------------------------------------------------------------------------------
# Token shards the transformer cannot train on
# --------------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tokens(tmp_path_factory, base_run, sample_manifest) -> Path:
    from magvit.prep import tokenize

    out = tmp_path_factory.mktemp("tokens")
    assert tokenize.main(["--tokenizer", str(base_run / "export"), "--manifest", str(sample_manifest), "--out",
                          str(out), "--split", "all", "--workers", "0"]) == 0  # in-process: no start-up
    return out


def _damage_truncated(shard: Path) -> None:
    shard.write_bytes(shard.read_bytes()[:300])


def _damage_codes(shard: Path) -> None:
    from safetensors.torch import load_file, save_file

    tensors = load_file(str(shard))
    tensors["codes"][0, 0, 0, 0] = 999  # the codebook has 64 codes
    save_file(tensors, str(shard))


@pytest.mark.parametrize("damage, expected", [(_damage_truncated, "header"),
                                              (_damage_codes, "'codes' holds codes in [0, 999], outside the codebook")],
                         ids=["truncated-shard", "codes-outside-codebook"])
def test_transformer_on_bad_token_shards_is_one_line_exit_2(damage, expected, tokens, tmp_path):
    bad = tmp_path / "tokens"
    shutil.copytree(tokens, bad)
    damage(next(bad.glob("*.safetensors")))
    result = _python([str(ROOT / "launch" / "train_transformer.py"), "--config", "configs/transformer/tiny.yaml",
                      "--run-dir", str(tmp_path / "run"), f"data.tokens={bad}", "data.batch_size=2",
                      "train.max_steps=2", "logging.progress=false", "logging.tensorboard=false"])
    assert result.returncode == 2, result.stderr[-3000:]
    line = _error_line(result)
    assert line.startswith(f"error: {bad}:") and expected in line, line
    assert json.loads((bad / "meta.json").read_text())["codebook_size"] == 64


# --------------------------------------------------------------------------------------------------------------
# Options only the network or the first step would reject: one line, exit 2, before the run dir is written
# --------------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def token_shards(tmp_path_factory) -> Path:
    """One token shard of 4 random (2, 4, 4) grids and its meta.json: what the priors' trainers read before a run
    starts."""
    import torch

    from magvit.cli import write_json
    from magvit.prep.shards import save_shard

    root = tmp_path_factory.mktemp("tokens")
    codes = torch.randint(0, 64, (4, 2, 4, 4), dtype=torch.int32, generator=torch.Generator().manual_seed(0))
    save_shard(root / "shard-00000.safetensors", {"codes": codes, "labels": torch.full((4,), -1)})  # -1: no class
    write_json(root / "meta.json", {"token_grid": [2, 4, 4], "codebook_size": 64, "classes": [], "num_examples": 4,
                                    "condition_tasks": [], "has_sketch": False,  # no condition codes at all
                                    "shards": [{"file": "shard-00000.safetensors", "num_examples": 4}]})
    return root


def _flash_attention_2() -> bool:
    from transformers.utils import is_flash_attn_2_available

    return is_flash_attn_2_available()


@pytest.mark.parametrize("trainer, override, expected", [
    ("transformer", "masking.tasks=[]", "error: masking: tasks is an empty list, which trains nothing"),
    ("transformer", "masking.tasks=[sketch]", "error: masking.tasks: 'sketch' is not one of the model's tasks"),
    ("transformer", "masking.tasks=[interpolation,class]", "error: masking.tasks: the token shards {tokens} hold no "
     "condition codes of 'interpolation'"),
    ("transformer", "model.hidden_act=bogus", "error: model.hidden_act: 'bogus' is not an activation transformers"),
    ("transformer", "model.attn_implementation=flash_attention_2",
     "error: model: MaskedVideoTransformer cannot be built with this config (ImportError: FlashAttention2"),
    ("transformer", "model.attn_implementation=bogus", 'attn_implementation="bogus"` is not supported'),
    ("autoregressive", "objective.tasks=[]", "error: objective: tasks is an empty list, which trains nothing"),
    ("autoregressive", "model.tasks=[class,unconditional] objective.tasks=[sketch]",
     "error: objective.tasks: 'sketch' is not one of the model's tasks (model.tasks: class, unconditional)"),
    ("autoregressive", "objective.tasks=[sketch]", "error: objective.tasks: the token shards {tokens} hold no "
     "condition codes of 'sketch' (they carry class, unconditional)"),
    ("autoregressive", "model.hidden_act=bogus", "error: model.hidden_act: 'bogus' is not an activation"),
    ("autoregressive", "model.attn_implementation=flex_attention",
     "error: model: AutoregressiveTransformer cannot be built with this config (ValueError: GPT2LMHeadModel does "
     "not support"),
    ("tokenizer", "loss.perceptual_model=/nonexistent",
     "error: loss.perceptual_model: perceptual loss: expected a local ResNet directory, got '/nonexistent'"),
], ids=["tasks-empty", "task-not-in-model", "task-not-in-shards", "hidden-act", "flash-attention-2", "attn-bogus",
        "ar-tasks-empty", "ar-task-not-in-model", "ar-task-not-in-shards", "ar-hidden-act", "ar-flex-attention",
        "perceptual-model-missing"])
def test_trainer_option_errors_are_one_line_before_the_run_dir(trainer, override, expected, token_shards, tmp_path,
                                                                capsys, monkeypatch):
    """In-process (the checks come before any process group): ``start_run``, which writes the run dir, is never
    reached."""
    import importlib

    from magvit.cli import run_main

    if "flash_attention_2" in override and _flash_attention_2():
        pytest.skip("flash-attn is installed here")
    module = importlib.import_module(f"magvit.launch.train_{trainer}")
    starts = module if trainer == "tokenizer" else importlib.import_module("magvit.prior_training")  # both priors'
    monkeypatch.setattr(starts, "start_run", lambda *a, **k: pytest.fail("start_run reached: the run dir is written"))
    manifest = tmp_path / "manifest.jsonl"
    manifest.write_text("")  # the tokenizer's main checks it exists; nothing reads it before the option check
    data = f"data.manifest={manifest}" if trainer == "tokenizer" else f"data.tokens={token_shards}"
    run_dir = tmp_path / "run"
    status = run_main(None, module.main, ["--config", f"configs/{trainer}/tiny.yaml", "--run-dir", str(run_dir),
                                          data, *override.split()])
    err = capsys.readouterr().err
    assert status == 2 and "Traceback" not in err, err
    lines = [line for line in err.splitlines() if line.startswith("error: ")]
    assert len(lines) == 1 and expected.format(tokens=token_shards) in lines[0], err
    assert not run_dir.exists()
