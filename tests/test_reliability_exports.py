"""Untrusted exports: a ``config.json`` whose sizes or counts do not fit its weights (``num_layers: 1000000000``,
``num_res_blocks: 1000000000``, ``image_size: 1000000``, ...) is refused by ``from_pretrained`` of every model class
before anything is allocated, and by every command that loads a model in one line with exit status 2."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from magvit import MaskedVideoTransformer, TokenizerConfig, TransformerConfig, VideoTokenizer
from magvit.autoregressive import AutoregressiveConfig, AutoregressiveTransformer

REPO = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
CLASSES = {"tokenizer": VideoTokenizer, "masked": MaskedVideoTransformer, "autoregressive": AutoregressiveTransformer}
TOO_MANY = "parameter tensors"  # the refusal of a count the weights cannot hold
DOES_NOT_FIT = "does not fit the model in config.json"

# (model, config change, what the one-line refusal says)
HOSTILE = [
    ("tokenizer", {"num_res_blocks": 10**9}, TOO_MANY),
    ("tokenizer", {"decoder_res_blocks": [0, 10**9, 1]}, TOO_MANY),
    ("tokenizer", {"image_size": 10**6}, "is beyond the limit of"),
    ("tokenizer", {"num_frames": 2**20, "image_size": 1024}, "is beyond the limit of"),
    ("tokenizer", {"codebook_size": 10**9}, DOES_NOT_FIT),
    ("tokenizer", {"embedding_dim": 2**40}, DOES_NOT_FIT),
    ("tokenizer", {"base_channels": 10**9}, "does not describe a buildable model"),
    ("masked", {"num_layers": 10**9}, TOO_MANY),
    ("masked", {"hidden_size": 2**30, "num_heads": 2}, DOES_NOT_FIT),
    ("masked", {"codebook_size": 10**9}, DOES_NOT_FIT),
    ("masked", {"num_classes": 10**9}, DOES_NOT_FIT),
    ("masked", {"token_grid": [1000, 1000, 1000]}, DOES_NOT_FIT),
    ("autoregressive", {"num_layers": 10**9}, TOO_MANY),
    ("autoregressive", {"token_grid": [1000, 1000, 1000]}, DOES_NOT_FIT),
    ("autoregressive", {"intermediate_size": 2**40}, DOES_NOT_FIT),
    ("autoregressive", {"intermediate_size": 2**62}, "does not describe a buildable model"),
]


@pytest.fixture(scope="module")
def exports(tmp_path_factory) -> Path:
    """Tiny exports of the three model classes, the priors on the tokenizer's code grid."""
    root = tmp_path_factory.mktemp("exports")
    cfg = TokenizerConfig.preset("tiny")
    grid = cfg.token_grid(cfg.num_frames, cfg.image_size, cfg.image_size)
    VideoTokenizer(cfg).save_pretrained(root / "tokenizer")
    MaskedVideoTransformer(TransformerConfig.preset("tiny", codebook_size=cfg.codebook_size, token_grid=grid)
                           ).save_pretrained(root / "masked")
    AutoregressiveTransformer(AutoregressiveConfig.preset("tiny", codebook_size=cfg.codebook_size, token_grid=grid)
                              ).save_pretrained(root / "autoregressive")
    return root


def hostile_copy(exports: Path, model: str, change: dict, out: Path) -> Path:
    """A copy of the ``model`` export whose config.json has ``change`` applied (the weights untouched)."""
    shutil.copytree(exports / model, out)
    meta = json.loads((out / "config.json").read_text())
    meta["config"].update(change)
    (out / "config.json").write_text(json.dumps(meta))
    return out


@pytest.mark.parametrize(("model", "change", "message"), HOSTILE,
                         ids=[f"{m}-{'-'.join(c)}-{i}" for i, (m, c, _) in enumerate(HOSTILE)])
def test_hostile_config_is_refused_before_anything_is_built(exports, tmp_path, model, change, message):
    folder = hostile_copy(exports, model, change, tmp_path / "export")
    start = time.perf_counter()
    with pytest.raises(ValueError, match=message) as refused:
        CLASSES[model].from_pretrained(folder)
    assert time.perf_counter() - start < 10
    assert "\n" not in str(refused.value) and str(folder) in str(refused.value)


def test_valid_exports_still_load_and_a_foreign_tensor_is_refused(exports, tmp_path):
    from safetensors.torch import load_file, save_file

    for model, cls in CLASSES.items():
        assert isinstance(cls.from_pretrained(exports / model), cls)
    folder = shutil.copytree(exports / "tokenizer", tmp_path / "extra")
    tensors = load_file(folder / "model.safetensors")
    save_file({**tensors, "smuggled.weight": tensors["quantizer.codebook"].clone()}, folder / "model.safetensors")
    with pytest.raises(ValueError, match=f"{DOES_NOT_FIT}: 1 tensors it does not have, e.g. smuggled.weight"):
        VideoTokenizer.from_pretrained(folder)


def test_an_oversized_or_deeply_nested_config_json_is_one_error(exports, tmp_path):
    folder = shutil.copytree(exports / "tokenizer", tmp_path / "big")
    with open(folder / "config.json", "a") as f:
        f.truncate(17 << 20)  # sparse: 17 MiB of zeros after the JSON
    with pytest.raises(ValueError, match="more than a model config holds"):
        VideoTokenizer.from_pretrained(folder)
    (folder / "config.json").write_text("[" * 100_000 + "]" * 100_000)
    with pytest.raises(ValueError, match="not valid JSON"):
        VideoTokenizer.from_pretrained(folder)


def _run(module: str, *args) -> tuple[int, str, float, float]:
    """``python -m module args``: (exit status, stderr, seconds, peak resident memory in GB)."""
    start = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-m", module, *map(str, args)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=ENV, cwd=REPO)
    _, status, usage = os.wait4(proc.pid, 0)
    seconds = time.perf_counter() - start
    err = proc.stderr.read()
    proc.stdout.close()
    proc.stderr.close()
    return os.waitstatus_to_exitcode(status), err, seconds, usage.ru_maxrss / 2**20


@pytest.mark.parametrize("command", ["generate", "tokenize", "evaluate"])
def test_every_command_refuses_a_hostile_export_in_one_line(exports, tmp_path, command):
    """The reported cases through the commands: a prior with a billion layers (generate, evaluate), a tokenizer
    with a billion residual blocks or a million-pixel side (tokenize): one line, exit 2, little time and memory."""
    manifest = tmp_path / "manifest.jsonl"
    manifest.write_text("")  # never read: the model is refused first
    if command == "generate":
        prior = hostile_copy(exports, "autoregressive", {"num_layers": 10**9}, tmp_path / "prior")
        code, err, seconds, gb = _run("magvit.generate", "--tokenizer", exports / "tokenizer", "--transformer", prior,
                                      "--task", "unconditional", "--out", tmp_path / "out.mp4")
    elif command == "tokenize":
        tokenizer = hostile_copy(exports, "tokenizer", {"num_res_blocks": 10**9, "image_size": 10**6},
                                 tmp_path / "tokenizer")
        code, err, seconds, gb = _run("data_prep.tokenize", "--tokenizer", tokenizer, "--manifest", manifest,
                                      "--out", tmp_path / "tokens")
    else:
        prior = hostile_copy(exports, "masked", {"num_layers": 10**9}, tmp_path / "prior")
        code, err, seconds, gb = _run("magvit.evaluate", "--tokenizer", exports / "tokenizer", "--transformer", prior,
                                      "--data", manifest, "--out", tmp_path / "report", "--no-progress")
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and "Traceback" not in err, err
    assert ("is beyond the limit of" if command == "tokenize" else TOO_MANY) in lines[0]
    assert gb < 1.0, f"{gb:.2f} GB"
    assert seconds < 60, f"{seconds:.1f} s"  # mostly interpreter start and imports on a busy 2-core machine
    assert not (tmp_path / "out.mp4").exists() and not (tmp_path / "tokens" / "meta.json").exists()


def test_the_prior_kind_is_read_through_the_bounded_config_reader(exports, tmp_path, monkeypatch):
    """``load_pretrained("prior")`` picks the class from config.json's ``model_type`` with the same size limit as
    ``from_pretrained``: an oversized config.json is never read whole, and the load is one error."""
    from magvit import pipeline, pretrained
    from magvit.cli import UsageError

    folder = shutil.copytree(exports / "autoregressive", tmp_path / "big")
    assert pipeline._prior_class(folder) is AutoregressiveTransformer
    reads = []
    monkeypatch.setattr(pretrained.Path, "read_text", lambda self, *a, **k: reads.append(self) or "")
    with open(folder / "config.json", "a") as f:
        f.truncate(17 << 20)  # sparse: 17 MiB of zeros after the JSON
    assert pipeline._prior_class(folder) is MaskedVideoTransformer and reads == []  # refused by its size, unread
    monkeypatch.undo()
    with pytest.raises(UsageError, match="more than a model config holds"):
        pipeline.load_pretrained("prior", folder)
