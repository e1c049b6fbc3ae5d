"""Hub conventions: loading a Hub id offline from a hand-filled cache (with revisions), push_to_hub (HfApi mocked: nothing
leaves the machine), the generated model card, and class names saved with a transformer export."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
import yaml

from magvit import MaskedVideoTransformer, TokenizerConfig, TransformerConfig, VideoTokenizer
from magvit.model_card import TrainingRecord
from magvit.pretrained import resolve_pretrained

SHA_MAIN = "a" * 40
SHA_V2 = "b" * 40


def _fill_cache(cache: Path, repo_id: str, snapshots: dict[str, Path], refs: dict[str, str]) -> Path:
    """The layout huggingface_hub writes: models--ORG--NAME/{refs/REF -> sha, snapshots/SHA/files}."""
    repo = cache / f"models--{repo_id.replace('/', '--')}"
    for sha, export in snapshots.items():
        shutil.copytree(export, repo / "snapshots" / sha)
    (repo / "refs").mkdir(parents=True)
    for ref, sha in refs.items():
        (repo / "refs" / ref).write_text(sha)
    return repo


@pytest.fixture
def offline_cache(tmp_path, monkeypatch):
    """A Hub cache holding lab/tiny-transformer at two revisions (main, and tag v2 with other weights)."""
    a = MaskedVideoTransformer(TransformerConfig.preset("tiny", num_classes=2))
    a.class_names = ["cat", "dog"]
    b = MaskedVideoTransformer(TransformerConfig.preset("tiny"))
    a.save_pretrained(tmp_path / "a")
    b.save_pretrained(tmp_path / "b")
    cache = tmp_path / "hub"
    _fill_cache(cache, "lab/tiny-transformer", {SHA_MAIN: tmp_path / "a", SHA_V2: tmp_path / "b"},
                {"main": SHA_MAIN, "v2": SHA_V2})
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    return cache, a, b


def _same_weights(x: torch.nn.Module, y: torch.nn.Module) -> bool:
    sx, sy = x.state_dict(), y.state_dict()
    return sx.keys() == sy.keys() and all(torch.equal(sx[k], sy[k]) for k in sx)


def test_hub_id_loads_offline_from_the_cache_at_each_revision(offline_cache):
    cache, a, b = offline_cache
    main = MaskedVideoTransformer.from_pretrained("lab/tiny-transformer")
    assert _same_weights(main, a) and main.config.num_classes == 2 and main.class_names == ["cat", "dog"]
    for revision in ("v2", SHA_V2):  # a tag (refs/v2) and the commit sha itself
        other = MaskedVideoTransformer.from_pretrained("lab/tiny-transformer", revision=revision)
        assert _same_weights(other, b) and other.config.num_classes == 0 and other.class_names == []
    assert resolve_pretrained("lab/tiny-transformer", revision=SHA_MAIN) == (
        cache / "models--lab--tiny-transformer" / "snapshots" / SHA_MAIN).resolve()


def test_missing_hub_id_or_revision_offline_is_one_clear_error(offline_cache):
    with pytest.raises(FileNotFoundError, match=r"lab/absent: no such local folder.*offline \(HF_HUB_OFFLINE=1\)"):
        MaskedVideoTransformer.from_pretrained("lab/absent")
    with pytest.raises(FileNotFoundError, match=r"lab/tiny-transformer.*revision nope"):
        MaskedVideoTransformer.from_pretrained("lab/tiny-transformer", revision="nope")
    with pytest.raises(FileNotFoundError, match="not a Hub id"):
        MaskedVideoTransformer.from_pretrained("no/such/folder")
    with pytest.raises(ValueError, match="holds a 'masked_video_transformer' checkpoint"):
        VideoTokenizer.from_pretrained("lab/tiny-transformer")  # the cached snapshot is checked like a folder


def test_local_folder_wins_and_takes_no_revision(tmp_path, offline_cache):
    _, a, _ = offline_cache
    a.save_pretrained(tmp_path / "lab" / "tiny-transformer")
    local = tmp_path / "lab" / "tiny-transformer"
    assert _same_weights(MaskedVideoTransformer.from_pretrained(local), a)
    with pytest.raises(ValueError, match="applies to Hub ids"):
        MaskedVideoTransformer.from_pretrained(local, revision="v2")


def test_push_to_hub_uploads_the_export_folder_with_its_card(monkeypatch):
    import huggingface_hub

    calls: dict[str, object] = {}

    class FakeApi:  # stands in for the network: records what would be uploaded
        def __init__(self, token=None):
            calls["token"] = token

        def create_repo(self, repo_id, private=None, exist_ok=False):
            calls["create"] = (repo_id, private, exist_ok)

        def create_branch(self, repo_id, branch, exist_ok=False):
            calls["branch"] = (repo_id, branch, exist_ok)

        def upload_folder(self, repo_id, folder_path, commit_message, revision=None, create_pr=False):
            folder = Path(folder_path)
            calls["upload"] = (repo_id, revision, sorted(p.name for p in folder.iterdir()))
            calls["card"] = (folder / "README.md").read_text()
            calls["config"] = json.loads((folder / "config.json").read_text())
            return "commit-info"

    monkeypatch.setattr(huggingface_hub, "HfApi", FakeApi)
    model = VideoTokenizer(TokenizerConfig.preset("tiny"))
    out = model.push_to_hub("lab/tok", revision="dev", private=True, token="t0k",
                            training=TrainingRecord(data="data/manifest.jsonl", num_clips=7, steps=5,
                                                    metrics={"val/psnr": 21.5}))
    assert out == "commit-info"
    assert calls["create"] == ("lab/tok", True, True) and calls["token"] == "t0k"
    assert calls["branch"] == ("lab/tok", "dev", True)
    assert calls["upload"] == ("lab/tok", "dev", ["README.md", "config.json", "model.safetensors"])
    assert calls["config"]["model_type"] == "video_tokenizer"
    assert "| val/psnr | 21.5 |" in calls["card"]


def _front_matter(card: str) -> dict:
    assert card.startswith("---\n")
    return yaml.safe_load(card.split("---\n")[1])


def test_model_card_of_a_tokenizer_export(tmp_path):
    cfg = TokenizerConfig.preset("tiny")
    model = VideoTokenizer(cfg)
    model.save_pretrained(tmp_path / "tok", training=TrainingRecord(
        data="data/clips/manifest.jsonl", num_clips=12, steps=40, metrics={"val/psnr": 24.123456}))
    card = (tmp_path / "tok" / "README.md").read_text()
    front = _front_matter(card)
    assert front["library_name"] == "magvit" and front["license"] == "apache-2.0"
    assert {"magvit", "video-tokenizer"} <= set(front["tags"])
    n = sum(p.numel() for p in model.parameters())
    t, h, w = cfg.token_grid(cfg.num_frames, cfg.image_size, cfg.image_size)
    assert "# VideoTokenizer" in card and f"({n:,})" in card
    assert f"codebook of {cfg.codebook_size} codes" in card and f"Token grid (t x h x w): {t}x{h}x{w}" in card
    assert "`data/clips/manifest.jsonl`" in card and "Examples (clips): 12" in card and "Optimizer steps: 40" in card
    assert "| val/psnr | 24.12 |" in card
    config_block = card.split("```json\n")[1].split("```")[0]
    assert json.loads(config_block) == cfg.to_dict()


def test_model_card_without_a_run_and_of_a_transformer(tmp_path):
    model = MaskedVideoTransformer(TransformerConfig.preset("tiny", num_classes=2))
    model.class_names = ["walk", "run"]
    model.save_pretrained(tmp_path / "x")
    card = (tmp_path / "x" / "README.md").read_text()
    assert "masked-transformer" in _front_matter(card)["tags"]
    assert f"Vocabulary: {model.config.vocab_size} tokens" in card and "Classes: 2" in card
    assert "0: walk, 1: run" in card
    assert "Not recorded with this export." in card and "No evaluation numbers were recorded" in card


def test_model_card_of_an_autoregressive_prior(tmp_path):
    from magvit.autoregressive import AutoregressiveConfig, AutoregressiveTransformer

    model = AutoregressiveTransformer(AutoregressiveConfig.preset("tiny"))
    model.save_pretrained(tmp_path / "ar")
    card = (tmp_path / "ar" / "README.md").read_text()
    assert "autoregressive-transformer" in _front_matter(card)["tags"]
    assert f"Vocabulary: {model.config.vocab_size} tokens" in card and "raster (t, h, w) order" in card


def test_class_names_round_trip_and_old_exports(tmp_path):
    model = MaskedVideoTransformer(TransformerConfig.preset("tiny", num_classes=3))
    model.class_names = ["a", "b", "c"]
    model.save_pretrained(tmp_path / "new")
    assert json.loads((tmp_path / "new" / "config.json").read_text())["class_names"] == ["a", "b", "c"]
    assert MaskedVideoTransformer.from_pretrained(tmp_path / "new").class_names == ["a", "b", "c"]
    # an export written before class names existed: no key, loads with none
    meta = json.loads((tmp_path / "new" / "config.json").read_text())
    del meta["class_names"]
    shutil.copytree(tmp_path / "new", tmp_path / "old")
    (tmp_path / "old" / "config.json").write_text(json.dumps(meta))
    assert MaskedVideoTransformer.from_pretrained(tmp_path / "old").class_names == []
    model.class_names = ["a", "b"]  # must name every class
    with pytest.raises(ValueError, match="2 class_names for num_classes=3"):
        model.save_pretrained(tmp_path / "bad")
    assert "class_names" not in json.loads((tmp_path / "old" / "config.json").read_text())


# --- the command lines take class names and Hub ids ------------------------------------------------------------------
@pytest.fixture
def named_models(tmp_path):
    VideoTokenizer(TokenizerConfig.preset("tiny")).save_pretrained(tmp_path / "tokenizer")
    model = MaskedVideoTransformer(TransformerConfig.preset("tiny", num_classes=3))
    model.class_names = ["walk", "run", "jump"]
    model.save_pretrained(tmp_path / "transformer")
    return tmp_path


def _generate(models: Path, out: Path, *args: str) -> int:
    from magvit.generate import main

    return main(["--tokenizer", str(models / "tokenizer"), "--transformer", str(models / "transformer"),
                 "--task", "class", "--out", str(out), "--steps", "2", "--seed", "1", *args])


def test_generate_class_by_name_is_the_class_id(named_models, tmp_path, monkeypatch):
    import magvit.generate as G
    from magvit.video_io import read_video

    seen = []  # the class id each run hands to the sampler
    real = G.generate
    monkeypatch.setattr(G, "generate", lambda *a, **k: seen.append(k["class_id"]) or real(*a, **k))
    assert _generate(named_models, tmp_path / "name.mp4", "--class", "jump") == 0
    assert _generate(named_models, tmp_path / "id.mp4", "--class-id", "2") == 0
    assert _generate(named_models, tmp_path / "walk.mp4", "--class", "walk") == 0
    assert seen == [2, 2, 0]
    assert torch.equal(read_video(tmp_path / "name.mp4").frames, read_video(tmp_path / "id.mp4").frames)


def test_generate_unknown_class_name_lists_the_known_ones(named_models, tmp_path, capsys):
    assert _generate(named_models, tmp_path / "x.mp4", "--class", "swim") == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["error: --class swim: not a class of this transformer; known: walk, run, jump"]
    assert _generate(named_models, tmp_path / "x.mp4", "--class", "run", "--class-id", "1") == 2
    assert "not both" in capsys.readouterr().err
    assert not (tmp_path / "x.mp4").exists()


def test_generate_class_name_with_an_export_without_names(tmp_path, capsys):
    VideoTokenizer(TokenizerConfig.preset("tiny")).save_pretrained(tmp_path / "tokenizer")
    MaskedVideoTransformer(TransformerConfig.preset("tiny", num_classes=2)).save_pretrained(tmp_path / "transformer")
    assert _generate(tmp_path, tmp_path / "x.mp4", "--class", "walk") == 2
    assert "has no class names" in capsys.readouterr().err


def test_generate_and_evaluate_take_hub_ids_from_the_cache(named_models, tmp_path, monkeypatch, capsys):
    from magvit.evaluate import main as evaluate_main
    from magvit.generate import main as generate_main

    cache = tmp_path / "hub"
    _fill_cache(cache, "lab/tok", {SHA_MAIN: named_models / "tokenizer"}, {"main": SHA_MAIN})
    _fill_cache(cache, "lab/gen", {SHA_V2: named_models / "transformer"}, {"main": SHA_V2})
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    out = tmp_path / "hub.mp4"
    assert generate_main(["--tokenizer", "lab/tok", "--transformer", "lab/gen", "--task", "class", "--class", "run",
                          "--out", str(out), "--steps", "2"]) == 0
    assert out.is_file()
    assert generate_main(["--tokenizer", "lab/tok", "--transformer", "lab/missing", "--task", "unconditional",
                          "--out", str(tmp_path / "y.mp4")]) == 2
    assert "lab/missing: no such local folder" in capsys.readouterr().err
    # evaluate no longer refuses a Hub id before loading it: the error is about the model, not "no such folder"
    assert evaluate_main(["--tokenizer", "lab/missing", "--data", str(tmp_path), "--out", str(tmp_path / "ev")]) == 2
    err = capsys.readouterr().err
    assert "lab/missing: no such local folder; as a Hub id" in err and "--tokenizer: no such folder" not in err


def test_tokenize_takes_a_hub_id_from_the_cache(tmp_path, monkeypatch, capsys):
    from magvit.prep import tokenize
    from magvit.cli import run_main

    VideoTokenizer(TokenizerConfig.preset("tiny")).save_pretrained(tmp_path / "tokenizer")
    cache = tmp_path / "hub"
    _fill_cache(cache, "lab/tok", {SHA_MAIN: tmp_path / "tokenizer"}, {"main": SHA_MAIN})
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    manifest = tmp_path / "manifest.jsonl"
    manifest.write_text("")  # no clips: the run stops after loading the tokenizer, at the data
    base = ["--manifest", str(manifest), "--out", str(tmp_path / "tokens"), "--device", "cpu"]
    assert run_main(tokenize.PROG, tokenize.main, ["--tokenizer", "lab/missing", *base]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "lab/missing: no such local folder; as a Hub id" in err[0], err
    status = run_main(tokenize.PROG, tokenize.main, ["--tokenizer", "lab/tok", *base])
    err = capsys.readouterr().err
    assert "lab/tok" not in err and "Traceback" not in err, err  # resolved and loaded; what stops it is the data
    assert status == 2 and "no train videos" in err, err
