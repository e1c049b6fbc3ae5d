"""Atomic writers honour the umask as ``cp`` would: every file and folder the project writes, under umask 002."""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path

import pytest
import torch

from magvit import fileio


@pytest.fixture
def umask_002():
    old = os.umask(0o002)
    try:
        yield
    finally:
        os.umask(old)


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_current_umask_reads_without_changing_it(umask_002):
    assert fileio.current_umask() == 0o002
    assert fileio.default_mode() == 0o664 and fileio.default_mode(directory=True) == 0o775
    assert os.umask(0o002) == 0o002  # unchanged by the reads


def test_atomic_path_replaces_only_on_success(tmp_path, umask_002):
    target = tmp_path / "a.json"
    fileio.write_text_atomic(target, "old")
    with pytest.raises(RuntimeError):
        with fileio.atomic_path(target) as tmp:
            tmp.write_text("half")
            raise RuntimeError("disk full")
    assert target.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["a.json"]  # no temp file left behind
    assert _mode(target) == 0o664


def test_atomic_folder_swaps_and_sets_modes(tmp_path, umask_002):
    from safetensors.torch import save_file

    target = tmp_path / "export"
    for value in (1.0, 2.0):
        with fileio.atomic_folder(target) as tmp:
            save_file({"w": torch.full((2,), value)}, str(tmp / "model.safetensors"))  # safetensors writes 0600
            (tmp / "sub").mkdir()
    from safetensors.torch import load_file

    assert load_file(str(target / "model.safetensors"))["w"][0] == 2.0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["export"]
    assert _mode(target) == 0o775 and _mode(target / "sub") == 0o775
    assert _mode(target / "model.safetensors") == 0o664


def test_every_writer_honours_a_002_umask(tmp_path, umask_002):
    """Exports, token shards, EMA files, manifests, reports, videos and images: 0664 files, 0775 folders."""
    from magvit.cli import write_json
    from magvit.prep.shards import save_shard
    from magvit import TokenizerConfig, VideoTokenizer
    from magvit.data import write_manifest
    from magvit.evaluate import write_report
    from magvit.video_io import write_image, write_video

    frames = torch.zeros(4, 16, 16, 3, dtype=torch.uint8)
    files = [
        write_manifest(tmp_path / "manifest.jsonl", [{"path": "a.mp4", "frames": 1}]),
        write_json(tmp_path / "meta.json", {"a": 1}),
        write_report(tmp_path / "report.json", {"a": 1.0}),
        write_video(tmp_path / "video.mp4", frames, fps=8),
        write_video(tmp_path / "video.gif", frames, fps=8),
        write_image(tmp_path / "image.png", frames[0]),
    ]
    save_shard(tmp_path / "shard-00000.safetensors", {"codes": torch.zeros(2, 3, dtype=torch.int32)})
    files.append(tmp_path / "shard-00000.safetensors")
    export = VideoTokenizer(TokenizerConfig.preset("tiny")).save_pretrained(tmp_path / "export")
    files += [export / "config.json", export / "model.safetensors"]
    for path in files:
        assert _mode(path) == 0o664, path
    assert _mode(export) == 0o775
    # nothing half-written or temporary is left beside the outputs
    assert not [p for p in tmp_path.rglob(".*")]


def test_ema_file_of_a_checkpoint_honours_the_umask(tmp_path, umask_002):
    """The checkpoint's EMA weights go through the same atomic writer (plain-python engine stand-in)."""
    from magvit.checkpoint import EMA_FILE, CheckpointManager
    from magvit.ema import EMA

    class Engine:  # the DeepSpeed engine's save_checkpoint contract: files under save_dir/tag
        def save_checkpoint(self, save_dir, tag, client_state, save_latest):
            Path(save_dir, tag).mkdir(parents=True, exist_ok=True)
            torch.save({"step": client_state["step"]}, Path(save_dir, tag, "model_states.pt"))

    ema = EMA(torch.nn.Linear(2, 2), decay=0.9)
    path = CheckpointManager(tmp_path / "checkpoints").save(3, {"generator": Engine()}, {}, ema=ema)
    assert _mode(path / EMA_FILE) == 0o664
    assert json.loads((path / "trainer_state.json").read_text())["step"] == 3


def _folder(path: Path, text: str) -> Path:
    path.mkdir()
    (path / "weights").write_text(text)
    return path


def test_replace_folder_swaps_in_one_step_where_the_os_can(tmp_path):
    target, new = _folder(tmp_path / "export", "old"), _folder(tmp_path / ".export.tmp", "new")
    if not fileio.exchange_paths(new, target):
        pytest.skip("no atomic exchange on this OS / filesystem")
    assert (target / "weights").read_text() == "new" and (new / "weights").read_text() == "old"
    fileio.replace_folder(_folder(tmp_path / ".export.tmp2", "newer"), target, tmp_path / ".export.old")
    assert (target / "weights").read_text() == "newer" and not (tmp_path / ".export.old").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == [".export.tmp", "export"]  # the exchanged-out one is gone


def test_replace_folder_interrupted_between_renames_loses_nothing(tmp_path, monkeypatch):
    """Without an atomic exchange: an interrupt after the old folder moved aside leaves it under `old`, and the
    next swap (or a trainer's start) puts it back before anything else."""
    target, old = _folder(tmp_path / "export", "old"), tmp_path / ".export.old"
    new = _folder(tmp_path / ".export.tmp", "new")
    monkeypatch.setattr(fileio, "exchange_paths", lambda a, b: False)
    real_rename = Path.rename

    def interrupted(self, dest):
        if self == new:
            raise KeyboardInterrupt
        return real_rename(self, dest)

    monkeypatch.setattr(Path, "rename", interrupted)
    with pytest.raises(KeyboardInterrupt):
        fileio.replace_folder(new, target, old)
    monkeypatch.setattr(Path, "rename", real_rename)
    assert not target.exists() and (old / "weights").read_text() == "old"
    assert fileio.recover_folder(target, old) and (target / "weights").read_text() == "old"
    assert not fileio.recover_folder(target, old)  # nothing left to recover
    fileio.replace_folder(new, target, old)
    assert (target / "weights").read_text() == "new" and not old.exists()


def test_checkpoint_clean_stale_puts_an_interrupted_replacement_back(tmp_path):
    from magvit.checkpoint import CheckpointManager

    root = tmp_path / "checkpoints"
    root.mkdir()
    _folder(root / ".tmp-old-step_00000004", "step 4")  # step_00000004 itself was moved aside, never replaced
    _folder(root / ".tmp-step_00000006", "half-written")
    CheckpointManager(root).clean_stale()
    assert sorted(p.name for p in root.iterdir()) == ["step_00000004"]
    assert (root / "step_00000004" / "weights").read_text() == "step 4"
