"""ClipDataset: known values on real footage, determinism, rank x worker sharding, failures mid-training."""

from __future__ import annotations

import shutil

import pytest
import torch
from torch.utils.data import DataLoader, DistributedSampler

from conftest import load_real_clip
from magvit.data import ClipDataset, collate_skip_none, read_manifest, write_manifest
from magvit.video_io import probe_video, write_video


def _record(path, split, label):
    return {"path": str(path), **probe_video(path), "split": split, "label": label}


@pytest.fixture(scope="module")
def small_manifest(tmp_path_factory, real_video_paths):
    """12 short real clips (carphone, 176x144) in 3 classes, train and val, plus the bikes video in val."""
    root = tmp_path_factory.mktemp("clips")
    carphone = load_real_clip(real_video_paths[1], num_frames=60, size=96)[0]  # (3, 60, 96, 96)
    records = []
    for i in range(12):
        path = write_video(root / f"c{i % 3}" / f"clip{i}.mp4", carphone[:, i * 4:i * 4 + 12], fps=10)
        records.append(_record(path, "val" if i % 4 == 3 else "train", f"c{i % 3}"))
    records.append(_record(real_video_paths[0], "val", None))
    return write_manifest(root / "manifest.jsonl", records)


def test_manifest_round_trip_and_relative_paths(tmp_path, small_manifest):
    records = read_manifest(small_manifest)
    assert len(records) == 13 and len(read_manifest(small_manifest, "val")) == 4
    moved = tmp_path / "m.jsonl"
    rel = [dict(r, path=f"../{r['path'].lstrip('/')}") for r in records[:1]]
    write_manifest(moved, rel)
    assert read_manifest(moved)[0]["path"] == str(tmp_path / rel[0]["path"])  # relative to the manifest folder
    (tmp_path / "bad.jsonl").write_text('{"path": "a.mp4", "frames": 3}\nnot json\n')
    with pytest.raises(ValueError, match="bad.jsonl:2"):
        read_manifest(tmp_path / "bad.jsonl")


def test_val_clip_is_center_of_video_with_center_crop(real_video_path):
    """Known value: a val clip equals the reference loader's clip at the centered start (same resize/crop)."""
    records = [_record(real_video_path, "val", None)]
    dataset = ClipDataset(records, split="val", num_frames=16, image_size=64)
    item = dataset[0]
    start = round((250 - 16) / 2)
    expected = load_real_clip(real_video_path, num_frames=16, size=64, start=start)[0]
    assert item["video"].shape == (3, 16, 64, 64) and item["label"] == -1 and item["index"] == 0
    torch.testing.assert_close(item["video"], expected, atol=1e-5, rtol=0)
    # frame stride and target fps pick the same source frames: 25 fps -> 12.5 fps is a stride of 2
    by_stride = ClipDataset(records, split="val", num_frames=8, image_size=32, frame_stride=2)
    by_fps = ClipDataset(records, split="val", num_frames=8, image_size=32, target_fps=12.5)
    assert by_stride.span(records[0]) == by_fps.span(records[0]) == 15
    torch.testing.assert_close(by_stride[0]["video"], by_fps[0]["video"])
    fractional = ClipDataset(records, split="val", num_frames=5, image_size=32, target_fps=10)  # step 2.5
    assert fractional.clip_indices(records[0], 0, None) == [120, 123, 125, 128, 130]  # start (250 - 11) // 2 rounded


def test_train_items_are_a_function_of_seed_epoch_index(small_manifest):
    make = lambda seed: ClipDataset(small_manifest, "train", num_frames=4, image_size=48, hflip=True, seed=seed)
    a, b = make(0), make(0)
    assert len(a) == 9 and a.classes == ["c0", "c1", "c2"]
    for i in (0, 5):
        torch.testing.assert_close(a[i]["video"], b[i]["video"])
    b[3]  # reading other items or in another order changes nothing
    torch.testing.assert_close(a[7]["video"], b[7]["video"])
    views = [make(0)[2]["video"]]
    for epoch in range(1, 6):
        a.set_epoch(epoch)
        views.append(a[2]["video"])
    assert len({v.sum().item() for v in views}) > 1  # crops / starts / flips change across epochs
    a.set_epoch(0)
    torch.testing.assert_close(a[2]["video"], views[0])
    assert not torch.equal(make(1)[2]["video"], views[0])  # ... and with the seed
    assert a[0]["video"].min() >= -1 and a[0]["video"].max() <= 1


def test_no_duplicates_across_two_ranks_and_two_workers(small_manifest):
    dataset = ClipDataset(small_manifest, "train", num_frames=4, image_size=32, clips_per_video=4, seed=3)
    assert len(dataset) == 36
    dataset.set_epoch(2)
    seen, videos = [], {}
    for rank in range(2):
        sampler = DistributedSampler(dataset, num_replicas=2, rank=rank, shuffle=True, seed=3)
        sampler.set_epoch(2)
        loader = DataLoader(dataset, batch_size=4, sampler=sampler, num_workers=2)
        for batch in loader:
            seen += batch["index"].tolist()
            videos.update(zip(batch["index"].tolist(), batch["video"]))
    assert sorted(seen) == list(range(36))  # every clip exactly once
    for index in (0, 17, 35):  # workers in other processes produced exactly the in-process items
        torch.testing.assert_close(videos[index], dataset[index]["video"])


def test_short_videos_skipped_with_reason_or_padded(small_manifest):
    skipped = ClipDataset(small_manifest, "train", num_frames=13, image_size=32)
    assert len(skipped) == 0 and len(skipped.skipped) == 9
    assert "12 frames, a clip needs 13" in skipped.skipped[0][1]
    padded = ClipDataset(small_manifest, "train", num_frames=13, image_size=32, short_videos="pad")
    video = padded[0]["video"]
    assert video.shape == (3, 13, 32, 32)
    torch.testing.assert_close(video[:, 12], video[:, 11])  # last frame repeated


def test_file_failing_mid_training_is_skipped_and_counted(tmp_path, small_manifest):
    records = read_manifest(small_manifest, "train")
    broken = tmp_path / "broken.mp4"
    shutil.copy(records[0]["path"], broken)
    records[0] = dict(records[0], path=str(broken))
    dataset = ClipDataset(records, "train", num_frames=4, image_size=32, seed=1)
    first = dataset[0]
    broken.write_bytes(b"garbage")  # the file goes bad after indexing
    again = dataset[0]
    assert dataset.num_failures == 1 and dataset.failures[str(broken)] == 1
    assert again["index"] == 0 and again["video"].shape == first["video"].shape
    assert not torch.equal(again["video"], first["video"])  # a substitute clip
    torch.testing.assert_close(dataset[0]["video"], again["video"])  # the substitute is deterministic too
    skip = ClipDataset(records, "train", num_frames=4, image_size=32, on_error="skip")
    batch = collate_skip_none([skip[0], skip[1]])
    assert batch["index"].tolist() == [1]
    with pytest.raises(ValueError, match="broken.mp4"):
        ClipDataset(records, "train", num_frames=4, image_size=32, on_error="raise")[0]


def test_bad_arguments_are_value_errors(small_manifest):
    with pytest.raises(ValueError, match="split"):
        ClipDataset(small_manifest, "test")
    with pytest.raises(ValueError, match="num_frames"):
        ClipDataset(small_manifest, num_frames=0)
    with pytest.raises(FileNotFoundError, match="manifest not found"):
        ClipDataset("/nonexistent/manifest.jsonl")
    with pytest.raises(IndexError):
        ClipDataset(small_manifest, "val", num_frames=4, image_size=32)[99]


# --- token shards, memory-mapped --------------------------------------------------------------------------------------
def _write_token_shards(root, shards: int, rows: int, seed: int = 0):
    """``shards`` token shards of ``rows`` int32 (4, 16, 16) grids (4 KiB a row) with labels and a condition."""
    import json

    from safetensors.torch import save_file

    root.mkdir(parents=True, exist_ok=True)
    gen = torch.Generator().manual_seed(seed)
    listed = []
    for n in range(shards):
        tensors = {"codes": torch.randint(0, 64, (rows, 4, 16, 16), generator=gen, dtype=torch.int32),
                   "cond.prefix": torch.randint(0, 64, (rows, 4, 16, 16), generator=gen, dtype=torch.int32),
                   "labels": torch.randint(0, 3, (rows,), generator=gen), "clip_index": torch.arange(rows) + n * rows}
        save_file(tensors, str(root / f"shard-{n:05d}.safetensors"))
        listed.append({"file": f"shard-{n:05d}.safetensors", "num_examples": rows})
    (root / "meta.json").write_text(json.dumps({"token_grid": [4, 16, 16], "codebook_size": 64, "classes": ["a", "b", "c"],
                                                "shards": listed, "num_examples": shards * rows}))
    return root


def test_token_shards_items_equal_the_in_memory_concatenation(tmp_path):
    from safetensors.torch import load_file

    from magvit.data import TokenShardDataset

    root = _write_token_shards(tmp_path / "tokens", shards=3, rows=5)
    data = TokenShardDataset(root)
    # the former behaviour: every shard loaded and concatenated in meta.json order
    parts = [load_file(str(root / f"shard-{n:05d}.safetensors")) for n in range(3)]
    whole = {key: torch.cat([p[key] for p in parts]) for key in parts[0]}
    assert len(data) == 15
    for i in range(15):
        item = data[i]
        assert set(item) == {"codes", "cond.prefix", "label", "index"}
        assert torch.equal(item["codes"], whole["codes"][i].long()) and item["codes"].dtype == torch.long
        assert torch.equal(item["cond.prefix"], whole["cond.prefix"][i].long())
        assert item["label"] == int(whole["labels"][i]) and item["index"] == i
    with pytest.raises(IndexError):
        data[15]
    # a shard whose grid differs from the others is refused at open
    from safetensors.torch import save_file

    save_file({"codes": torch.zeros(2, 4, 16, 16, dtype=torch.int32), "labels": torch.zeros(2, dtype=torch.long)},
              str(root / "shard-00002.safetensors"))
    with pytest.raises(ValueError, match="shards do not fit together"):
        TokenShardDataset(root)


_RSS_PROBE = """
import sys
from magvit.data import TokenShardDataset

def anon_kib():  # anonymous memory only: mapped file pages are the page cache's, not this process's
    for line in open("/proc/self/status"):
        if line.startswith("RssAnon:"):
            return int(line.split()[1])

before = anon_kib()
data = TokenShardDataset(sys.argv[1])
total = sum(int(data[i]["codes"][0, 0, 0]) for i in range(0, len(data), 7))
print(len(data), anon_kib() - before)
"""


def test_token_shards_resident_memory_does_not_grow_with_the_shards(tmp_path):
    """2 vs 20 shards of 4 MiB: reading items keeps the same resident memory (loading them would add 72 MiB)."""
    import subprocess
    import sys

    grown = {}
    for shards in (2, 20):
        root = _write_token_shards(tmp_path / f"t{shards}", shards=shards, rows=1024)
        out = subprocess.run([sys.executable, "-c", _RSS_PROBE, str(root)], capture_output=True, text=True,
                             check=True, env={**__import__("os").environ, "OMP_NUM_THREADS": "1"}).stdout.split()
        assert int(out[0]) == shards * 1024
        grown[shards] = int(out[1])  # KiB
    assert grown[20] - grown[2] < 16 * 1024, grown


def test_clip_batches_train_on_the_extracted_clip_shards(small_manifest, tmp_path):
    """``data.format: safetensors`` reads the clip shards of ``data_prep.extract`` (no decoding on the hot path):
    random crops of the stored size, and one-line errors for shards that do not fit the config."""
    import json

    from magvit.batches import DataConfig, clip_batches
    from magvit.cli import UsageError
    from magvit.prep import extract

    out = tmp_path / "clips"
    assert extract.main(["--manifest", str(small_manifest), "--out", str(out), "--num-frames", "8",
                         "--image-size", "40", "--workers", "0"]) == 0
    data = DataConfig(format="safetensors", shards=str(out), num_frames=8, image_size=32, batch_size=2,
                      num_workers=0)
    train = clip_batches(data, rank=0, world_size=1, seed=0, device=torch.device("cpu"))
    batch = next(train.stream)
    assert batch["video"].shape == (2, 3, 8, 32, 32) and batch["video"].abs().max() <= 1
    assert train.num_examples == json.loads((out / "meta.json").read_text())["num_examples"] > 2
    assert train.source == str(out) and train.stream.state_dict() == {"epoch": 0, "batch": 1}
    with pytest.raises(UsageError, match="clips of 8 frames, data.num_frames is 4"):
        clip_batches(data.replace(num_frames=4), 0, 1, 0, torch.device("cpu"))
    with pytest.raises(UsageError, match="larger than the stored clips"):
        clip_batches(data.replace(image_size=48), 0, 1, 0, torch.device("cpu"))
    with pytest.raises(ValueError, match="data.format 'safetensors' needs data.shards"):
        DataConfig(format="safetensors")
