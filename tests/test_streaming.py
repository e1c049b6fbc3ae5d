"""Streaming webdataset shards: items equal the source, rank x worker split, exact mid-epoch resume, writers."""

from __future__ import annotations

import json
import re

import pytest
import torch
from torch.utils.data import DataLoader

from magvit.prep.shards import save_tar_shard
from magvit.streaming import ShardStream, decode_sample, encode_sample, iter_tar_samples, resolve_shards, tar_rows

GRID = (2, 4, 4)


def _token_tars(root, shards: int, rows: int, seed: int = 0) -> dict[int, dict[str, torch.Tensor]]:
    """``shards`` tar shards of ``rows`` token samples each (clip index = global row); returns row -> tensors."""
    root.mkdir(parents=True, exist_ok=True)
    gen = torch.Generator().manual_seed(seed)
    source, listed = {}, []
    for n in range(shards):
        tensors = {"codes": torch.randint(0, 64, (rows, *GRID), generator=gen, dtype=torch.int32),
                   "cond.interpolation": torch.randint(0, 64, (rows, *GRID), generator=gen, dtype=torch.int32),
                   "labels": torch.randint(0, 3, (rows,), generator=gen),
                   "clip_index": torch.arange(n * rows, (n + 1) * rows)}
        save_tar_shard(root / f"shard-{n:05d}.tar", tensors)
        listed.append({"file": f"shard-{n:05d}.tar", "num_examples": rows})
        for i in range(rows):
            source[n * rows + i] = {"codes": tensors["codes"][i], "cond.interpolation": tensors["cond.interpolation"][i],
                                    "label": int(tensors["labels"][i])}
    (root / "meta.json").write_text(json.dumps({"token_grid": list(GRID), "codebook_size": 64, "shards": listed,
                                                "classes": ["a", "b", "c"], "num_frames": 4, "image_size": 16,
                                                "tokenizer": {"causal": False}, "num_examples": shards * rows}))
    return source


def _batches(stream: ShardStream, workers: int) -> list[dict[str, torch.Tensor]]:
    return list(DataLoader(stream, batch_size=None, num_workers=workers))


def test_samples_round_trip_and_the_stream_yields_the_source(tmp_path):
    tensors = {"codes": torch.randint(0, 64, GRID, dtype=torch.int32), "frames": torch.randint(0, 255, (3, 4, 4, 3),
                                                                                                 dtype=torch.uint8)}
    item = decode_sample(encode_sample(17, tensors, 2))
    assert item["index"] == 17 and item["label"] == 2
    assert all(torch.equal(item[k], v) and item[k].dtype == v.dtype for k, v in tensors.items())
    source = _token_tars(tmp_path / "wds", shards=4, rows=6)
    assert tar_rows(tmp_path / "wds" / "shard-00000.tar") == 6
    cut = tmp_path / "cut.tar"  # a shard cut short (a full disk, a copy that died) is written again on rerun
    data = (tmp_path / "wds" / "shard-00000.tar").read_bytes()
    for length in (len(data) // 2, 700, 0):
        cut.write_bytes(data[:length])
        assert tar_rows(cut) is None, length
    # a brace pattern and a file:// URL (any fsspec URL) name the same shards
    meta, urls, counts = resolve_shards(f"file://{tmp_path}/wds/shard-{{00000..00003}}.tar")
    assert counts == [6] * 4 and urls[0] == f"file://{tmp_path}/wds/shard-00000.tar"
    assert [s["__key__"] for s in iter_tar_samples(urls[1])] == [f"{i:09d}" for i in range(6, 12)]
    stream = ShardStream(str(tmp_path / "wds"), "tokens", batch_size=4, seed=3, shuffle_buffer=5)
    seen = {}
    for batch in _batches(stream, 0):
        assert batch["codes"].dtype == torch.long and batch["codes"].shape == (4, *GRID)
        for j, index in enumerate(batch["index"].tolist()):
            seen[index] = {"codes": batch["codes"][j], "cond.interpolation": batch["cond.interpolation"][j],
                           "label": int(batch["label"][j])}
    assert len(seen) == 24 == stream.batches_per_epoch * 4  # every sample once (24 = 6 batches of 4)
    for index, item in seen.items():
        assert torch.equal(item["codes"], source[index]["codes"].long())
        assert torch.equal(item["cond.interpolation"], source[index]["cond.interpolation"].long())
        assert item["label"] == source[index]["label"]
    # the shuffling buffer and the epoch change the order, not the content
    orders = []
    for epoch in (0, 1):
        stream.set_epoch(epoch)
        orders.append([i for b in _batches(stream, 0) for i in b["index"].tolist()])
    assert orders[0] != orders[1] and sorted(orders[0]) == sorted(orders[1]) == list(range(24))
    stream.set_epoch(0)
    assert [i for b in _batches(stream, 0) for i in b["index"].tolist()] == orders[0]  # (seed, epoch) decide


def test_ranks_and_workers_split_the_shards_disjoint_and_complete(tmp_path):
    _token_tars(tmp_path / "wds", shards=8, rows=6)
    seen = []
    for rank in range(2):
        stream = ShardStream(str(tmp_path / "wds"), "tokens", batch_size=3, rank=rank, world_size=2, num_workers=2,
                             seed=1, shuffle_buffer=4)
        batches = _batches(stream, 2)
        assert len(batches) == stream.batches_per_epoch == 8  # equal on every rank: they stay in step
        seen.append([i for b in batches for i in b["index"].tolist()])
    assert not set(seen[0]) & set(seen[1])  # disjoint
    assert sorted(seen[0] + seen[1]) == list(range(48))  # and complete
    with pytest.raises(ValueError, match="8 shards for 2 ranks x 5 loader workers"):
        ShardStream(str(tmp_path / "wds"), "tokens", batch_size=3, rank=0, world_size=2, num_workers=5)


@pytest.mark.parametrize("workers", [0, 2])
def test_resume_mid_epoch_gives_exactly_the_remaining_batches(tmp_path, workers):
    _token_tars(tmp_path / "wds", shards=6, rows=7)  # 7 rows: batches do not end on shard edges
    kwargs = dict(batch_size=2, rank=1, world_size=2, num_workers=workers, seed=4, shuffle_buffer=5)
    stream = ShardStream(str(tmp_path / "wds"), "tokens", **kwargs)
    stream.set_epoch(2)
    whole = _batches(stream, workers)
    assert len(whole) == stream.batches_per_epoch >= 5
    for consumed in (1, 3, len(whole) - 1):
        resumed = ShardStream(str(tmp_path / "wds"), "tokens", **kwargs)
        resumed.set_epoch(2, consumed)
        rest = _batches(resumed, workers)
        assert len(rest) == len(whole) - consumed
        for got, expected in zip(rest, whole[consumed:]):
            assert torch.equal(got["index"], expected["index"]) and torch.equal(got["codes"], expected["codes"])


def test_batch_stream_resumes_a_streaming_run_exactly(tmp_path):
    """The trainer's BatchStream over a ShardStream: a stream restored from ``state_dict()`` mid-epoch (and across
    an epoch boundary) continues with the batches an uninterrupted stream yields."""
    from magvit.batches import DataConfig, make_batch_stream

    _token_tars(tmp_path / "wds", shards=4, rows=5)
    data = DataConfig(format="webdataset", shards=str(tmp_path / "wds"), batch_size=2, num_workers=2,
                      shuffle_buffer=3)

    def stream():
        return make_batch_stream(ShardStream(data.shards, "tokens", 2, 0, 1, 2, seed=7, shuffle_buffer=3), data, 0,
                                 1, 7, torch.device("cpu"))

    whole = stream()
    reference = [next(whole)["index"] for _ in range(14)]  # 8 batches per epoch: crosses into epoch 1
    first = stream()
    for _ in range(5):
        next(first)
    resumed = stream()
    resumed.epoch, resumed.batch = first.state_dict()["epoch"], first.state_dict()["batch"]
    assert all(torch.equal(next(resumed)["index"], expected) for expected in reference[5:])
    with pytest.raises(ValueError, match="needs data.shards"):
        DataConfig(format="webdataset")


# --- damaged shards: checked against meta.json before a stream is planned -------------------------------------------
def _members(path) -> list[tuple[str, bytes]]:
    import tarfile

    with tarfile.open(path) as tar:
        return [(m.name, tar.extractfile(m).read()) for m in tar.getmembers()]


def _write_tar(path, members: list[tuple[str, bytes]]) -> None:
    import io
    import tarfile

    with tarfile.open(path, "w") as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))


def _npy(array) -> bytes:
    import io

    import numpy as np

    buffer = io.BytesIO()
    np.save(buffer, array, allow_pickle=True)
    return buffer.getvalue()


def _damage(shard, case: str) -> None:
    """Damage ``shard`` (6 samples of codes.npy, cond.interpolation.npy, cls) the way ``case`` says."""
    import tarfile

    import numpy as np

    members = _members(shard)
    with tarfile.open(shard) as tar:
        infos = tar.getmembers()
    if case == "cut at a member boundary":  # an interrupted copy: 4 whole samples, no end-of-archive blocks
        shard.write_bytes(shard.read_bytes()[:infos[12].offset])
    elif case == "cut inside a member":
        shard.write_bytes(shard.read_bytes()[:infos[7].offset_data + 10])
    elif case == "fewer samples than declared":  # a complete archive of 4 of its 6 samples
        _write_tar(shard, members[:12])
    elif case == "a member of no sample":
        _write_tar(shard, members[:6] + [("notes.txt", b"hello")] + members[6:])
    elif case == "a member one sample has":
        _write_tar(shard, members[:3] + [(members[0][0].split(".")[0] + ".extra.txt", b"x")] + members[3:])
    elif case == "an object array":
        _write_tar(shard, [(n, _npy(np.array([None, 1], dtype=object)) if i == 4 else d)
                           for i, (n, d) in enumerate(members)])
    elif case == "float codes":
        _write_tar(shard, [(n, _npy(np.zeros(GRID, np.float32)) if n.endswith(".codes.npy") else d)
                           for n, d in members])
    elif case == "another shape":
        _write_tar(shard, [(n, _npy(np.zeros((2, 2, 2), np.int32)) if n.endswith(".codes.npy") else d)
                           for n, d in members])
    elif case == "a label outside the classes":  # meta.json declares 3 classes
        _write_tar(shard, [(n, b"3") if n.endswith(".cls") else (n, d) for n, d in members])
    elif case == "a grid meta.json does not declare":
        meta = json.loads((shard.parent / "meta.json").read_text())
        (shard.parent / "meta.json").write_text(json.dumps({**meta, "token_grid": [4, 4, 4]}))


DAMAGE = {"cut at a member boundary": "shard-00001.tar: cut short after 4 samples",
          "cut inside a member": "shard-00001.tar: cut short inside member 000000008.codes.npy",
          "fewer samples than declared": "shard-00001.tar: holds 4 samples, meta.json declares 6",
          "a member of no sample": "shard-00001.tar: member 'notes.txt' belongs to no sample",
          "a member one sample has": "shard-00001.tar: sample 000000006 has a member the others lack: extra.txt",
          "an object array": "shard-00001.tar: member 000000007.codes.npy: an object array",
          "float codes": "shard-00001.tar: sample 000000006: codes.npy holds float32",
          "another shape": "shard-00001.tar: sample 000000006: codes.npy has shape (2, 2, 2), the others (2, 4, 4)",
          "a label outside the classes": "shard-00001.tar: sample 000000006: class label 3 outside the 3 classes "
                                         "of meta.json",
          "a grid meta.json does not declare": "shard-00000.tar: sample 000000000: codes.npy has shape (2, 4, 4), "
                                               "meta.json's grid is (4, 4, 4)"}


@pytest.mark.parametrize("case", list(DAMAGE))
def test_a_damaged_shard_is_one_line_naming_it_before_training(tmp_path, case):
    """Each damage is found before the first batch, by the stream and by the trainer's data loading (one line),
    instead of an epoch of 4 of 24 samples or a traceback mid-training."""
    from magvit.batches import DataConfig, token_batches
    from magvit.cli import UsageError
    from magvit.streaming import ShardError

    _token_tars(tmp_path / "wds", shards=4, rows=6)
    _damage(tmp_path / "wds" / "shard-00001.tar", case)
    with pytest.raises(ShardError, match=re.escape(DAMAGE[case])):
        ShardStream(str(tmp_path / "wds"), "tokens", batch_size=2)
    data = DataConfig(format="webdataset", shards=str(tmp_path / "wds"), batch_size=2, num_workers=0)
    with pytest.raises(UsageError) as refused:
        token_batches(data, 0, 1, 0, torch.device("cpu"))
    assert DAMAGE[case] in str(refused.value) and "\n" not in str(refused.value)


@pytest.mark.parametrize(("case", "message"), [
    ("fewer samples than declared", "shard-00002.tar: holds 4 samples, meta.json declares 6"),
    ("cut inside a member", "shard-00002.tar: not a readable tar (unexpected end of data)"),
    ("an object array", "shard-00002.tar: sample '000000013': Object arrays cannot be loaded"),
    ("a label outside the classes", "shard-00002.tar: sample '000000012': class label 3 outside the 3 classes")])
def test_a_shard_changed_after_the_check_is_an_error_while_streaming(tmp_path, case, message):
    """An epoch is a pass over the declared samples: a shard damaged while the run streams (or a remote one, checked
    as it streams) is an error naming it, not a shorter epoch or a traceback from numpy."""
    from magvit.streaming import ShardError

    _token_tars(tmp_path / "wds", shards=4, rows=6)
    stream = ShardStream(str(tmp_path / "wds"), "tokens", batch_size=2, shuffle_buffer=0)
    assert len(_batches(stream, 0)) == 12
    _damage(tmp_path / "wds" / "shard-00002.tar", case)
    with pytest.raises(ShardError, match=re.escape(message)):
        _batches(stream, 0)


def test_a_huge_brace_pattern_is_refused_without_expanding_it(tmp_path):
    import time

    from magvit.streaming import pattern_size

    _token_tars(tmp_path / "wds", shards=4, rows=2)
    assert pattern_size("s-{00000..00003}.tar") == 4 and pattern_size("{a,b}-{0..9..2}-{x,{1..3}}") == 2 * 5 * 2 * 3
    start = time.perf_counter()
    with pytest.raises(ValueError, match=r"names up to 100000000 shards, more than the 4 that .*meta.json lists"):
        resolve_shards(f"{tmp_path}/wds/shard-{{00000..99999999}}.tar")
    assert time.perf_counter() - start < 1
    assert resolve_shards(f"{tmp_path}/wds/shard-{{00001..00002}}.tar")[2] == [2, 2]  # a subset is fine


# --- writers: data_prep.extract / data_prep.tokenize --format webdataset, tokenize on several ranks -------------------
from test_data_prep import cli, sample, sample_cache, small_manifest, tiny_tokenizer  # noqa: E402,F401  (fixtures)


def test_extract_webdataset_streams_the_clips_of_the_safetensors_shards(small_manifest, tmp_path):
    from magvit.prep import extract
    from magvit.data import ClipShardDataset

    args = ["--manifest", small_manifest, "--num-frames", "8", "--image-size", "40", "--clips-per-video", "2",
            "--shard-size", "2", "--workers", "0"]
    assert cli(extract, *args, "--out", tmp_path / "st") == 0
    assert cli(extract, *args, "--out", tmp_path / "wds", "--format", "webdataset") == 0
    assert sorted(p.name for p in (tmp_path / "wds").glob("shard-*")) == [f"shard-{n:05d}.tar" for n in range(4)]
    reference = ClipShardDataset(tmp_path / "st", image_size=32, random_crop=True, hflip=True, seed=2)
    reference.set_epoch(1)
    stream = ShardStream(str(tmp_path / "wds"), "clips", batch_size=2, image_size=32, random_crop=True, hflip=True,
                         seed=2, shuffle_buffer=3)
    stream.set_epoch(1)
    seen = 0
    for batch in _batches(stream, 0):
        for j, index in enumerate(batch["index"].tolist()):  # same clip, same crop and flip as the random access
            expected = reference[index]
            assert torch.equal(batch["video"][j], expected["video"]) and int(batch["label"][j]) == expected["label"]
            seen += 1
    assert seen == len(reference) == 8 and stream.classes == ["indoor", "outdoor"]


def test_tokenize_webdataset_and_two_ranks_write_the_same_tokens(small_manifest, tiny_tokenizer, tmp_path):
    import os
    import subprocess
    import sys

    from magvit.data import TokenShardDataset
    from magvit.prep import tokenize

    args = ["--tokenizer", tiny_tokenizer, "--manifest", small_manifest, "--shard-size", "1", "--batch-size", "2",
            "--workers", "0", "--device", "cpu"]
    assert cli(tokenize, *args, "--out", tmp_path / "one") == 0
    reference = TokenShardDataset(tmp_path / "one")
    # two processes, each writes every other shard; the last one to finish writes meta.json
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.getcwd()}
    procs = [subprocess.Popen([sys.executable, "-m", "data_prep.tokenize", *map(str, args), "--out",
                               str(tmp_path / "two"), "--rank", str(rank), "--world-size", "2"], env=env,
                              stderr=subprocess.PIPE, text=True) for rank in range(2)]
    assert [p.wait(timeout=300) for p in procs] == [0, 0], [p.stderr.read() for p in procs]
    two = TokenShardDataset(tmp_path / "two")
    assert len(two) == len(reference) == 4
    assert two.meta.shards == reference.meta.shards
    for key, value in reference.tensors.items():
        assert torch.equal(two.tensors[key], value), key
    # the streaming format holds the same codes
    assert cli(tokenize, *args, "--out", tmp_path / "wds", "--format", "webdataset") == 0
    stream = ShardStream(str(tmp_path / "wds"), "tokens", batch_size=1, shuffle_buffer=0)
    items = [b for b in _batches(stream, 0)]
    assert len(items) == 4
    for batch in items:
        expected = reference[int(batch["index"])]
        assert set(batch) == set(expected)
        assert all(torch.equal(batch[k][0], expected[k]) for k in expected if k not in ("label", "index"))


# --- end to end: the transformer trainer streaming on 2 ranks, killed mid-epoch and resumed ----------------------------
@pytest.mark.slow
def test_streaming_run_resumed_exactly_mid_epoch_on_2_ranks(tmp_path):
    """2 DeepSpeed ranks x 2 loader workers stream 8 tar shards (6 batches per rank and epoch); the run is killed
    (SIGKILL, whole process group) after its first checkpoint and resumed: every later step's loss equals the
    uninterrupted run's, also across the epoch boundary (step 7)."""
    from test_train_e2e import _kill_after_checkpoint_and_resume, _losses, _run

    _token_tars(tmp_path / "wds", shards=8, rows=3)
    args = ["--config", "configs/transformer/tiny.yaml", "data.format=webdataset", f"data.shards={tmp_path}/wds",
            "data.batch_size=2", "data.num_workers=2", "data.shuffle_buffer=4", "train.max_steps=8",
            "train.warmup_steps=1", "checkpoint.every=2", "logging.log_every=1", "logging.tensorboard=false",
            "logging.progress=false"]
    reference = tmp_path / "reference"
    result = _run("train_transformer.py", [*args, "--run-dir", str(reference)])
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert sorted(_losses(reference, "loss")) == list(range(1, 9)) and _losses(reference, "epoch")[8] == 1
    run_dir = tmp_path / "run"
    killed_at = _kill_after_checkpoint_and_resume("train_transformer.py", [*args, "--run-dir", str(run_dir)], run_dir)
    assert 2 <= killed_at < 6  # mid-epoch: 6 batches per epoch
    expected, resumed = _losses(reference, "loss"), _losses(run_dir, "loss")
    steps = [s for s in expected if s > killed_at]
    assert steps and all(s in resumed for s in steps)
    for s in steps:
        assert resumed[s] == pytest.approx(expected[s], rel=1e-6, abs=1e-9), s


@pytest.mark.slow
def test_tokenizer_trains_on_streamed_clips(small_manifest, tmp_path):
    """One plain process, clips streamed from tar shards (no manifest at all: no validation clips)."""
    from magvit.prep import extract
    from test_train_e2e import TOKENIZER_OVERRIDES, _losses, _run

    assert cli(extract, "--manifest", small_manifest, "--out", tmp_path / "wds", "--format", "webdataset",
               "--num-frames", "4", "--image-size", "20", "--clips-per-video", "2", "--shard-size", "2",
               "--workers", "0") == 0
    run_dir = tmp_path / "run"
    result = _run("train_tokenizer.py", ["--config", "configs/tokenizer/tiny.yaml", "--run-dir", str(run_dir),
                                         "data.format=webdataset", f"data.shards={tmp_path}/wds",
                                         f"data.manifest={tmp_path}/none.jsonl", "train.max_steps=2",
                                         "checkpoint.every=2", *TOKENIZER_OVERRIDES], ranks=1)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert sorted(_losses(run_dir, "g/loss")) == [1, 2]
    card = (run_dir / "export" / "README.md").read_text()
    assert str(tmp_path / "wds") in card  # the model card names the streamed data


def test_a_streaming_run_refuses_to_resume_with_other_loader_workers(tmp_path):
    """data.num_workers may change on resume of a random-access run, not of a streaming one (it sets the order)."""
    from magvit.checkpoint import COMPLETE, TRAINER_STATE
    from magvit.resume import resume_changes
    from magvit.run_config import TransformerTrainConfig

    root = tmp_path / "checkpoints"
    (root / "step_00000004").mkdir(parents=True)
    (root / "step_00000004" / COMPLETE).write_text("")
    for fmt, refused in (("files", False), ("webdataset", True)):
        cfg = TransformerTrainConfig().with_overrides([f"data.format={fmt}", "data.shards=s3://b/x"])
        (root / "step_00000004" / TRAINER_STATE).write_text(json.dumps(
            {"step": 4, "world_size": 1, "zero_stage": 2, "config": cfg.to_dict()}))
        problem, changes = resume_changes(cfg.with_overrides(["data.num_workers=4"]), root, 1, 2)
        if refused:
            assert "streaming run" in problem and "data.num_workers (2 -> 4)" in problem and changes == []
        else:
            assert problem is None and changes == ["data.num_workers: 2 -> 4"]
