"""The masked transformer's validation while it trains (``data.val_tokens``): held-out masked-token NLL and accuracy
at the sample steps, decoded sample videos (mp4 and TensorBoard), for interior (tiny.yaml) and prefix models, the
warning instead of videos when the shards' tokenizer is gone, and bit-exact training with validation on: the same
weights as without it, and after a SIGKILL and resume the same as uninterrupted.

The tokenizer is a freshly initialised tiny one (its codes need not be good, only those of one tokenizer); its
token shards are the sample data's train and val splits at 4x16x16 (tokens 2x4x4).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from magvit.data import TokenShardDataset
from test_train_e2e import _kill_after_checkpoint_and_resume, _losses, _run

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def shards(tmp_path_factory, sample_manifest) -> Path:
    """``train/`` and ``val/`` token shards of the sample data, made by an untrained tiny tokenizer."""
    from magvit.tokenizer import TokenizerConfig, VideoTokenizer

    from magvit.prep import tokenize

    root = tmp_path_factory.mktemp("validation")
    torch.manual_seed(0)
    VideoTokenizer(TokenizerConfig.preset("tiny", num_frames=4, image_size=16)).save_pretrained(root / "tokenizer")
    for split in ("train", "val"):
        assert tokenize.main(["--tokenizer", str(root / "tokenizer"), "--manifest",
                              str(sample_manifest), "--out", str(root / split), "--split", split,
                              "--workers", "0"]) == 0
    return root


def _args(shards: Path, run_dir: Path, *extra: str, validation: bool = True) -> list[str]:
    """6 steps of 2 examples per rank, checkpoints at 2, 4, 6; with ``validation`` samples at 3 and 6 (step 3 is
    no checkpoint: a sample that moved the training RNG would change steps 4-6)."""
    return ["--config", "configs/transformer/tiny.yaml", "--run-dir", str(run_dir), f"data.tokens={shards / 'train'}",
            *([f"data.val_tokens={shards / 'val'}"] if validation else []), "data.val_clips=3", "data.batch_size=2",
            "train.max_steps=6", "train.warmup_steps=1", "checkpoint.every=2", "logging.log_every=1",
            "logging.sample_every=3", "logging.tensorboard=true", "logging.progress=false", *extra]


def _weights(run_dir: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(run_dir / "export" / "model.safetensors"))


@pytest.fixture(scope="module")
def reference(shards, tmp_path_factory) -> Path:
    """An uninterrupted 2-rank run with validation."""
    run_dir = tmp_path_factory.mktemp("reference") / "run"
    result = _run("train_transformer.py", _args(shards, run_dir))
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return run_dir


def test_held_out_nll_and_sample_videos_at_the_sample_steps(reference, shards):
    """tiny.yaml's model is interior (MAGVIT's COMMIT layout): scored and sampled in its own sequences."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from magvit.transformer import MaskedVideoTransformer
    from magvit.video_io import probe_video

    assert MaskedVideoTransformer.from_pretrained(reference / "export").config.conditioning == "interior"

    nll, accuracy = _losses(reference, "val/nll"), _losses(reference, "val/accuracy")
    assert set(nll) == set(accuracy) == {3, 6}
    codebook = json.loads((shards / "val" / "meta.json").read_text())["codebook_size"]
    assert all(0 < v < 3 * torch.log(torch.tensor(float(codebook))).item() for v in nll.values())  # nats per code
    assert all(0 <= v <= 1 for v in accuracy.values())
    assert sorted(p.name for p in (reference / "samples").iterdir()) == ["step_00000003.mp4", "step_00000006.mp4"]
    info = probe_video(reference / "samples" / "step_00000006.mp4")
    assert (info["width"], info["height"], info["frames"]) == (32, 16, 8)  # generated | truth, 2 clips of 4 frames
    events = EventAccumulator(str(reference / "tb"), size_guidance={"images": 0, "scalars": 0})
    events.Reload()
    assert [e.step for e in events.Images("samples/generated")] == [3, 6]
    assert [e.step for e in events.Scalars("val/nll")] == [3, 6]
    card = (reference / "export" / "README.md").read_text()
    assert "val/nll" in card


def test_held_out_nll_and_sample_video_of_a_prefix_model(shards, tmp_path):
    """The same validation for a prefix model (one process, two steps): val/nll and a sample video."""
    from magvit.video_io import probe_video

    run_dir = tmp_path / "run"
    result = _run("train_transformer.py", _args(shards, run_dir, "model.conditioning=prefix", "train.max_steps=2",
                                                "logging.sample_every=2", "logging.tensorboard=false"), ranks=1)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert set(_losses(run_dir, "val/nll")) == {2}
    info = probe_video(run_dir / "samples" / "step_00000002.mp4")
    assert (info["width"], info["height"], info["frames"]) == (32, 16, 8)


def test_validation_leaves_training_bit_exact(reference, shards, tmp_path):
    """The same run without validation: the same losses at every step and the same exported weights."""
    run_dir = tmp_path / "run"
    result = _run("train_transformer.py", _args(shards, run_dir, validation=False))
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert not _losses(run_dir, "val/nll") and not any((run_dir / "samples").iterdir())
    assert _losses(run_dir, "loss") == _losses(reference, "loss")
    plain, validated = _weights(run_dir), _weights(reference)
    assert all(torch.equal(plain[k], validated[k]) for k in validated)


def test_exact_resume_with_validation(reference, shards, tmp_path):
    """Killed (SIGKILL) after its first checkpoint and resumed: the losses after the checkpoint, the held-out NLL
    and the final weights equal the uninterrupted run's."""
    run_dir = tmp_path / "run"
    args = _args(shards, run_dir)
    killed_at = _kill_after_checkpoint_and_resume("train_transformer.py", args, run_dir)
    assert 2 <= killed_at < 6
    for key in ("loss", "val/nll", "val/accuracy"):
        reference_values, resumed = _losses(reference, key), _losses(run_dir, key)
        steps = [s for s in reference_values if s > killed_at]
        assert steps and all(resumed[s] == reference_values[s] for s in steps), key
    resumed_weights, reference_weights = _weights(run_dir), _weights(reference)
    assert all(torch.equal(resumed_weights[k], reference_weights[k]) for k in reference_weights)


def test_unloadable_tokenizer_warns_once_and_keeps_the_held_out_nll(shards, tmp_path):
    """The held-out shards name a tokenizer folder that has gone: one warning, no videos, the NLL still logged."""
    val = tmp_path / "val"
    shutil.copytree(shards / "val", val)
    meta = json.loads((val / "meta.json").read_text())
    (val / "meta.json").write_text(json.dumps({**meta, "tokenizer_dir": str(tmp_path / "gone")}))
    run_dir = tmp_path / "run"
    result = _run("train_transformer.py", _args(shards, run_dir, f"data.val_tokens={val}", "train.max_steps=2",
                                                "logging.sample_every=1", "logging.tensorboard=false"), ranks=1)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    output = result.stdout + result.stderr
    assert output.count("no sample videos") == 1 and str(tmp_path / "gone") in output
    assert set(_losses(run_dir, "val/nll")) == {1, 2}
    assert not any((run_dir / "samples").iterdir())


def test_held_out_shards_of_another_codebook_are_refused(shards, tmp_path):
    from magvit.batches import DataConfig, held_out_tokens
    from magvit.cli import UsageError

    val = tmp_path / "val"
    shutil.copytree(shards / "val", val)
    meta = json.loads((val / "meta.json").read_text())
    (val / "meta.json").write_text(json.dumps({**meta, "codebook_size": meta["codebook_size"] * 2}))
    data = DataConfig(tokens=str(shards / "train"), val_tokens=str(val), val_clips=3)
    with pytest.raises(UsageError, match=f"data.val_tokens: {val} holds codes of a .* same tokenizer"):
        held_out_tokens(data, [])
    batch, _ = held_out_tokens(data.replace(val_tokens=str(shards / "val")), ["outdoor", "indoor"])
    assert batch["codes"].shape[0] == 3 and batch["codes"].dtype == torch.long
    classes = json.loads((shards / "val" / "meta.json").read_text())["classes"]
    original = torch.tensor([d["label"] for d in map(TokenShardDataset(shards / "val").__getitem__, range(3))])
    expected = [["outdoor", "indoor"].index(classes[i]) if i >= 0 else -1 for i in original.tolist()]
    assert batch["label"].tolist() == expected  # held-out class ids mapped by name to the training shards' ids
    assert held_out_tokens(data.replace(val_tokens=""), []) is None
