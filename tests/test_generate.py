"""``python -m magvit.generate``: CLI outputs and user errors, sketch conditioning end to end, and frame prediction
on real footage against a copy-the-first-frame baseline."""

from __future__ import annotations

import json

import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from conftest import load_real_clip
from magvit import MaskedVideoTransformer, TokenizerConfig, TransformerConfig, VideoTokenizer
from magvit.generate import main
from magvit.conditions import build_condition_video
from magvit.masking import MaskingConfig, make_training_batch, masked_token_loss
from magvit.pipeline import fit_video, generate, generate_codes
from magvit.video_io import read_video, to_float, write_image, write_video

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def models(tmp_path_factory, real_video_path):
    """Saved tiny tokenizer + transformers (random weights) and condition files written from real footage."""
    root = tmp_path_factory.mktemp("generate")
    torch.manual_seed(0)
    VideoTokenizer(TokenizerConfig.preset("tiny")).save_pretrained(root / "tokenizer")
    MaskedVideoTransformer(TransformerConfig.preset("tiny", num_classes=3)).save_pretrained(root / "transformer")
    MaskedVideoTransformer(TransformerConfig.preset("tiny", token_grid=(2, 8, 8))).save_pretrained(root / "grid")
    MaskedVideoTransformer(TransformerConfig.preset("tiny", codebook_size=128)).save_pretrained(root / "codebook")
    from magvit.autoregressive import AutoregressiveConfig, AutoregressiveTransformer

    AutoregressiveTransformer(AutoregressiveConfig.preset("tiny")).save_pretrained(root / "autoregressive")
    (root / "afile").write_text("not a folder")
    (root / "dir.mp4").mkdir()
    clip = load_real_clip(real_video_path, num_frames=10, size=48)[0]  # (3, 10, 48, 48): cropped to 32 by the CLI
    write_video(root / "clip.mp4", clip, fps=12.5)
    write_video(root / "short.mp4", clip[:, :3], fps=12.5)
    write_image(root / "frame.png", clip[:, 0])
    (root / "broken.mp4").write_bytes(b"this is not a video" * 10)
    (root / "corrupt").mkdir()
    (root / "corrupt" / "config.json").write_text((root / "transformer" / "config.json").read_text())
    (root / "corrupt" / "model.safetensors").write_bytes(b"\0" * 64)
    (root / "pickled").mkdir()  # a pickle under the safetensors name: rejected, never unpickled
    (root / "pickled" / "config.json").write_text((root / "transformer" / "config.json").read_text())
    torch.save({"weights": torch.zeros(2)}, root / "pickled" / "model.safetensors")
    (root / "codebook_weights").mkdir()  # the 128-code model's weights under the 64-code model's config
    (root / "codebook_weights" / "config.json").write_text((root / "transformer" / "config.json").read_text())
    (root / "codebook_weights" / "model.safetensors").write_bytes((root / "codebook" / "model.safetensors").read_bytes())
    for name, record in (("decoding", {"steps": 3, "temperature": 0.0}), ("bad_decoding", {"temperature": -1.0}),
                         ("odd_decoding", {"stepz": 3}), ("many_steps", {"steps": 500})):
        (root / name).mkdir()  # the transformer with a decoding record in its config.json
        meta = json.loads((root / "transformer" / "config.json").read_text())
        (root / name / "config.json").write_text(json.dumps({**meta, "decoding": record}))
        (root / name / "model.safetensors").write_bytes((root / "transformer" / "model.safetensors").read_bytes())
    return root


def _cli(models: Path, *args: str) -> list[str]:
    return ["--tokenizer", str(models / "tokenizer"), "--transformer", str(models / "transformer"), *args]


def test_cli_frame_prediction_from_an_image(models, tmp_path, capsys):
    out = tmp_path / "gen.mp4"
    assert main(_cli(models, "--cond", str(models / "frame.png"), "--out", str(out), "--steps", "4",
                     "--strip", str(tmp_path / "strip.png"))) == 0
    frames, fps = read_video(out)
    assert frames.shape == (8, 32, 32, 3)  # the tokenizer's clip size
    assert fps == pytest.approx(8.0)  # an image has no frame rate: the default
    strip, _ = read_video(tmp_path / "strip.png")
    assert strip.shape[1] == 2 + 2 * (32 + 2)  # two rows: condition | generated
    assert "generated 1 video(s)" in capsys.readouterr().out


def test_cli_strip_of_a_whole_clip_ends_with_the_truth(models, tmp_path):
    """Frame prediction from a clip of the model's length: the strip is given | predicted | truth."""
    strip_path = tmp_path / "strip.png"
    assert main(_cli(models, "--cond", str(models / "clip.mp4"), "--cond-frames", "2", "--out",
                     str(tmp_path / "gen.mp4"), "--steps", "3", "--strip", str(strip_path))) == 0
    strip, _ = read_video(strip_path)  # (1, H, W, 3)
    assert strip.shape[1] == 2 + 3 * (32 + 2)  # three rows: condition | generated | truth
    clip, _ = read_video(models / "clip.mp4")  # (10, 48, 48, 3): the CLI fits it to 32x32
    truth = (fit_video(to_float(clip), 32)[:, 0].permute(1, 2, 0) + 1) * 127.5  # (32, 32, 3), first frame
    rows = [strip[0, 2 + r * 34: 2 + r * 34 + 32, 2:2 + 32].float() for r in range(3)]  # first frame of each row
    assert (rows[2] - truth).abs().mean() < 3  # the last row is the real clip (PNG rounding only)
    assert (rows[2] - rows[1]).abs().mean() > 3  # not a copy of the generated row


@pytest.mark.parametrize("task", ["interpolation", "outpaint", "inpaint", "sketch", "class", "unconditional"])
def test_cli_tasks_write_videos_at_the_input_fps(models, tmp_path, task):
    out = tmp_path / "gen.mp4"
    extra = ["--class-id", "2"] if task == "class" else []
    assert main(_cli(models, "--cond", str(models / "clip.mp4"), "--task", task, "--out", str(out), "--steps", "3",
                     "--num-samples", "2", "--guidance-scale", "1.5", *extra)) == 0
    for i in range(2):
        frames, fps = read_video(tmp_path / f"gen_{i}.mp4")
        assert frames.shape == (8, 32, 32, 3)
        # class / unconditional samples have no input video: the default frame rate
        assert fps == pytest.approx(8.0 if task in ("class", "unconditional") else 12.5)


def test_cli_same_seed_same_video(models, tmp_path):
    outs = [tmp_path / "a.mp4", tmp_path / "b.mp4"]
    for out in outs:
        assert main(_cli(models, "--cond", str(models / "clip.mp4"), "--out", str(out), "--seed", "3",
                         "--steps", "2")) == 0
    assert torch.equal(read_video(outs[0]).frames, read_video(outs[1]).frames)


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--cond", "{m}/missing.mp4"], "no such file"),
        (["--cond", "{m}/broken.mp4"], "broken.mp4"),
        (["--cond", "{m}/frame.png", "--task", "interpolation"], "first and a last frame"),
        (["--cond", "{m}/short.mp4", "--task", "outpaint"], "needs a clip of 8 frames"),
        (["--cond", "{m}/frame.png", "--cond-frames", "2"], "needs at least 2 frame"),
        (["--task", "frame_prediction"], "needs --cond"),
        (["--task", "class"], "needs --class-id"),
        (["--task", "class", "--class-id", "7"], "class id 7 out of range"),
        (["--cond", "{m}/clip.mp4", "--transformer", "{m}/grid"], "token grid"),
        (["--cond", "{m}/clip.mp4", "--transformer", "{m}/codebook"], "codebook size"),
        (["--cond", "{m}/clip.mp4", "--transformer", "{m}/nothing"], "cannot load the transformer"),
        (["--cond", "{m}/clip.mp4", "--transformer", "{m}/tokenizer"], "'video_tokenizer' checkpoint"),
        (["--cond", "{m}/clip.mp4", "--tokenizer", "{m}/nothing"], "cannot load the tokenizer"),
        (["--cond", "{m}/clip.mp4", "--transformer", "{m}/corrupt"], "cannot load the transformer"),
        (["--cond", "{m}/clip.mp4", "--out", "{m}/gen.avi"], "--out must end in"),
        (["--cond", "{m}/clip.mp4", "--out", "{m}/clip.mp4"], "exists; pass --overwrite"),
        (["--cond", "{m}/clip.mp4", "--steps", "0"], "--steps must be >= 1"),
        # legitimate-looking values that crashed or were silently replaced
        (["--cond", "{m}/clip.mp4", "--steps", "1000"], "--steps must be in [1, 256]"),
        (["--cond", "{m}/clip.mp4", "--steps", "100000000000000000000"], "--steps must be in [1, 256]"),
        (["--cond", "{m}/clip.mp4", "--cond-frames", "8"], "--cond-frames must be < 8"),
        (["--cond", "{m}/clip.mp4", "--temperature", "nan"], "--temperature must be a number in [0, inf]"),
        (["--cond", "{m}/clip.mp4", "--temperature", "-1"], "--temperature must be a number in [0, inf]"),
        (["--cond", "{m}/clip.mp4", "--guidance-scale", "nan"], "--guidance-scale must be a number in [-10000, 10000]"),
        (["--cond", "{m}/clip.mp4", "--guidance-scale", "inf"], "--guidance-scale must be a number in [-10000, 10000]"),
        # finite but beyond what float32 logits survive
        (["--cond", "{m}/clip.mp4", "--guidance-scale", "1e300"], "--guidance-scale must be a number in [-10000"),
        (["--cond", "{m}/clip.mp4", "--choice-temperature", "nan"], "--choice-temperature must be a number in [0,"),
        (["--cond", "{m}/clip.mp4", "--choice-temperature", "1e300"], "--choice-temperature must be a number in [0,"),
        # options the autoregressive prior does not use are refused, not ignored
        (["--cond", "{m}/clip.mp4", "--transformer", "{m}/autoregressive", "--steps", "4"],
         "--steps applies to a masked transformer"),
        (["--cond", "{m}/clip.mp4", "--transformer", "{m}/autoregressive", "--choice-temperature", "1"],
         "--choice-temperature applies to a masked transformer"),
        # --out checked before any work
        # /proc: a folder nobody can create files in, root included
        (["--cond", "{m}/clip.mp4", "--out", "/proc/gen.mp4"], "--out /proc/gen.mp4: cannot write in /proc"),
        (["--cond", "{m}/clip.mp4", "--out", "{m}/afile/gen.mp4"], "is a file, not a folder"),
        (["--cond", "{m}/clip.mp4", "--out", "{m}/dir.mp4", "--overwrite"], "is a folder; give a file name"),
        (["--cond", "{m}/clip.mp4", "--strip", "/proc/strip.png"], "--strip /proc/strip.png: cannot write in /proc"),
        (["--cond", "{m}/clip.mp4", "--fps", "1e-9"], "--fps must be a number in [0.01, 1000]"),
        (["--cond", "{m}/clip.mp4", "--fps", "nan"], "--fps must be a number in [0.01, 1000]"),
        (["--cond", "{m}/clip.mp4", "--num-samples", "100000"], "--num-samples must be in [1, 10000]"),
        (["--cond", "{m}/clip.mp4", "--batch-size", "0"], "--batch-size must be >= 1"),
        (["--cond", "{m}/clip.mp4", "--transformer", "{m}/pickled"], "not a readable safetensors file"),
        (["--cond", "{m}/clip.mp4", "--transformer", "{m}/codebook_weights"], "does not fit the model"),
        # an export's decoding record is untrusted input too
        (["--cond", "{m}/clip.mp4", "--transformer", "{m}/bad_decoding"], "decoding temperature must be in [0, "),
        (["--cond", "{m}/clip.mp4", "--transformer", "{m}/odd_decoding"], "unknown decoding setting(s) 'stepz'"),
        (["--cond", "{m}/clip.mp4", "--transformer", "{m}/many_steps"], "recorded decoding steps (500) exceed"),
        # --top-p: the autoregressive prior's nucleus, in (0, 1]
        (["--cond", "{m}/clip.mp4", "--top-p", "0.9"], "--top-p applies to an autoregressive transformer"),
        (["--cond", "{m}/clip.mp4", "--top-p", "0"], "--top-p must be in (0, 1]"),
        (["--cond", "{m}/clip.mp4", "--top-p", "nan"], "--top-p must be in (0, 1]"),
    ],
)
def test_cli_user_errors_one_line_exit_2(models, capsys, args, message):
    if "/proc" in message and not Path("/proc/self").is_dir():
        pytest.skip("no /proc on this OS")
    args = [a.replace("{m}", str(models)) for a in args]
    message = message.replace("{m}", str(models))
    before = (models / "clip.mp4").read_bytes()
    assert main(_cli(models, "--out", str(models / "unused.mp4"), *args)) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: ") and message in err, err
    assert "Traceback" not in err
    assert (models / "clip.mp4").read_bytes() == before  # nothing overwritten
    assert not (models / "unused.mp4").exists()


def test_cli_decodes_as_the_export_records_unless_a_flag_says_otherwise(models, tmp_path, capsys, monkeypatch):
    import magvit.generate as generate_module

    seen = []
    real = generate_module.generate
    monkeypatch.setattr(generate_module, "generate", lambda *a, **kw: seen.append(kw) or real(*a, **kw))
    args = ["--cond", str(models / "frame.png"), "--out", str(tmp_path / "g.mp4"), "--overwrite"]
    assert main(_cli(models, *args)) == 0  # no record: the defaults
    assert "12 steps, temperature 1" in capsys.readouterr().out
    assert main(_cli(models, *args, "--transformer", str(models / "decoding"))) == 0
    assert "3 steps, temperature 0" in capsys.readouterr().out
    assert main(_cli(models, *args, "--transformer", str(models / "decoding"), "--steps", "5")) == 0
    assert "5 steps, temperature 0" in capsys.readouterr().out
    assert [(kw["steps"], kw["temperature"], kw["choice_temperature"]) for kw in seen] == [
        (12, 1.0, 4.5), (3, 0.0, 4.5), (5, 0.0, 4.5)]


def test_output_fps_keeps_the_condition_rate_within_what_a_file_holds(capsys):
    from argparse import Namespace

    from magvit.generate import DEFAULT_FPS, output_fps

    assert output_fps(Namespace(fps=None), 12.5) == 12.5 and capsys.readouterr().err == ""
    assert output_fps(Namespace(fps=None), 240000.0) == 1000.0
    assert "240000 fps is outside [0.01, 1000]; writing at 1000 fps" in capsys.readouterr().err
    assert output_fps(Namespace(fps=None), 1 / 3600) == 0.01
    assert output_fps(Namespace(fps=None), 0.0) == DEFAULT_FPS  # an image: no rate
    assert output_fps(Namespace(fps=None), math.nan) == DEFAULT_FPS
    assert output_fps(Namespace(fps=24.0), 240000.0) == 24.0  # --fps wins


@pytest.mark.parametrize("temperature", [1e-300, 1e-45, 1e-5, 0.0])
def test_tiny_temperatures_take_the_argmax_without_overflow(temperature):
    from magvit.autoregressive_sampling import sample_codes
    from magvit.sampling import _sample

    logits = torch.randn(4, 6, 32) * 3
    best = logits.argmax(-1)
    assert torch.equal(_sample(logits, temperature, None, torch.Generator().manual_seed(0)), best)
    assert torch.equal(sample_codes(logits[:, 0], temperature, generator=torch.Generator().manual_seed(0)),
                       best[:, 0])


def test_cli_non_integer_steps_is_one_line(models, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(_cli(models, "--cond", str(models / "clip.mp4"), "--steps", "1e20"))
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and err.count("\n") == 1 and "invalid int value: '1e20'" in err, err


def test_cli_many_samples_are_generated_in_batches(models, tmp_path, monkeypatch):
    """--num-samples N runs ceil(N / --batch-size) batches, each written before the next: memory is one batch's."""
    import magvit.generate as gen

    sizes, written = [], []
    real_generate = gen.generate

    def recording_generate(*args, **kwargs):
        sizes.append(kwargs["num_samples"])
        written.append(len(list(tmp_path.glob("gen_*.mp4"))))  # files on disk when this batch starts
        return real_generate(*args, **kwargs)

    monkeypatch.setattr(gen, "generate", recording_generate)
    assert main(_cli(models, "--cond", str(models / "clip.mp4"), "--out", str(tmp_path / "gen.mp4"), "--steps", "2",
                     "--num-samples", "5", "--batch-size", "2")) == 0
    assert sizes == [2, 2, 1] and written == [0, 2, 4]
    assert sorted(p.name for p in tmp_path.glob("gen_*.mp4")) == [f"gen_{i}.mp4" for i in range(5)]
    assert read_video(tmp_path / "gen_4.mp4").frames.shape == (8, 32, 32, 3)


def test_cli_subprocess_default_checkpoint_missing(tmp_path):
    result = subprocess.run([sys.executable, "-m", "magvit.generate", "--cond", "nothing.png"], cwd=tmp_path,
                            capture_output=True, text=True, env={"PYTHONPATH": str(REPO), "PATH": "/usr/bin"})
    assert result.returncode == 2
    assert result.stderr.startswith("error: ") and result.stderr.count("\n") == 1, result.stderr
    help_text = subprocess.run([sys.executable, "-m", "magvit.generate", "--help"], cwd=tmp_path,
                               capture_output=True, text=True, env={"PYTHONPATH": str(REPO), "PATH": "/usr/bin"})
    assert help_text.returncode == 0 and "runs/demo/transformer/export" in help_text.stdout


# --- trained tiny models on real footage -----------------------------------------------------------------------------


def _psnr(a: torch.Tensor, b: torch.Tensor) -> float:
    return (10 * torch.log10(4.0 / F.mse_loss(a, b))).item()  # values in [-1, 1]: peak-to-peak 2


@pytest.fixture(scope="module")
def real_clip_8(real_video_path) -> torch.Tensor:
    """(1, 3, 8, 32, 32): every other frame, so that the scene moves (copying frame 0 is ~14 dB)."""
    return load_real_clip(real_video_path, num_frames=8, size=32, start=40, stride=2)


@pytest.fixture(scope="module")
def trained_tokenizer(real_clip_8) -> VideoTokenizer:
    torch.manual_seed(0)
    tokenizer = VideoTokenizer(TokenizerConfig.preset("tiny"))
    opt = torch.optim.Adam(tokenizer.parameters(), lr=3e-3)
    for _ in range(60):
        reconstruction, stats = tokenizer(real_clip_8)
        loss = F.mse_loss(reconstruction, real_clip_8) + stats["quantizer_loss"]
        opt.zero_grad()
        loss.backward()
        opt.step()
    return tokenizer.eval()


def _train_transformer(batch: dict, tasks: list[str], steps: int) -> MaskedVideoTransformer:
    torch.manual_seed(0)
    model = MaskedVideoTransformer(TransformerConfig.preset("tiny", dropout=0.0, attention_dropout=0.0))
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    generator = torch.Generator().manual_seed(0)
    for _ in range(steps):
        masking = MaskingConfig(tasks=tasks, cond_dropout_prob=0.0)
        ids, labels, weights = make_training_batch(batch, model.vocab, masking, generator=generator)
        loss = masked_token_loss(model(ids), labels, weights, model.config.codebook_size, 0.0)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model.eval()


@pytest.mark.slow
def test_frame_prediction_beats_copying_the_first_frame(real_clip_8, trained_tokenizer):
    clip, tokenizer = real_clip_8, trained_tokenizer
    with torch.no_grad():
        codes = tokenizer.encode(clip)
        condition = build_condition_video(clip, "frame_prediction")  # first frame, repeated
        cond_codes = tokenizer.encode(condition)
    batch = {"codes": codes.repeat(4, 1, 1, 1), "cond.frame_prediction": cond_codes.repeat(4, 1, 1, 1)}
    transformer = _train_transformer(batch, ["frame_prediction"], steps=100)
    predicted = generate(tokenizer, transformer, "frame_prediction", condition[0], temperature=0.0, seed=0)
    later = slice(1, None)  # frames 1..7 are predicted from frame 0
    psnr_model = _psnr(predicted[:, :, later], clip[:, :, later])
    psnr_copy = _psnr(clip[:, :, :1].expand_as(clip[:, :, later]), clip[:, :, later])
    print(f"frame prediction PSNR: model {psnr_model:.2f} dB, copy-first-frame {psnr_copy:.2f} dB")
    assert psnr_model > psnr_copy + 3.0


@pytest.mark.slow
def test_sketch_conditioning_end_to_end(real_video_path, trained_tokenizer):
    from magvit.sketch import sketch_video

    videos = torch.cat([load_real_clip(real_video_path, num_frames=8, size=32, start=s, stride=2) for s in (40, 160)])
    sketches = sketch_video(videos)  # (2, 3, 8, 32, 32) edges in {-1, 1}
    with torch.no_grad():
        codes = trained_tokenizer.encode(videos)
        sketch_codes = trained_tokenizer.encode(sketches)
    assert not torch.equal(sketch_codes[0], sketch_codes[1])
    batch = {"codes": codes.repeat(2, 1, 1, 1), "sketch_codes": sketch_codes.repeat(2, 1, 1, 1)}
    transformer = _train_transformer(batch, ["sketch"], steps=100)
    accuracy = torch.zeros(2, 2)  # [sketch given, video compared]
    for i in range(2):
        out = generate_codes(transformer, "sketch", sketch_codes[i : i + 1], temperature=0.0, seed=0)
        for j in range(2):
            accuracy[i, j] = (out[0] == codes[j]).float().mean()
    # each sketch yields its own video's tokens, not the other one's
    assert accuracy[0, 0] > 0.9 and accuracy[1, 1] > 0.9
    assert accuracy[0, 1] < accuracy[0, 0] - 0.3 and accuracy[1, 0] < accuracy[1, 1] - 0.3
    videos_out = generate(trained_tokenizer, transformer, "sketch", sketches[0], temperature=0.0, seed=0)
    assert videos_out.shape == (1, 3, 8, 32, 32)


def test_interior_generation_keeps_the_given_frames_condition_codes(models, tmp_path, monkeypatch, capsys):
    """``--cond-frames 3`` with an interior export: the 3 given frames' region (latent frames 0 and 1 of the tiny
    tokenizer's 4) is what the model is shown. A model that echoes what it sees (the mask token as code 0) returns
    exactly the condition codes there and 0 elsewhere, so the output codes show the region used."""
    import torch.nn.functional as F

    from magvit.conditions import latent_condition_region
    from magvit.pipeline import VideoPipeline

    config = TransformerConfig.preset("tiny", conditioning="interior", tasks=["frame_prediction", "unconditional"],
                                      cond_frames=[1, 3])
    MaskedVideoTransformer(config).save_pretrained(tmp_path / "interior")

    def echo(self, input_ids):
        shown = torch.where(input_ids == self.config.vocab.mask_token, 0, input_ids)
        return F.one_hot(shown, self.config.vocab_size).float() * 50.0

    decoded = []
    real_decode = VideoTokenizer.decode
    monkeypatch.setattr(MaskedVideoTransformer, "forward", echo)
    monkeypatch.setattr(VideoTokenizer, "decode", lambda self, codes: decoded.append(codes) or real_decode(self,
                                                                                                            codes))
    root = models
    assert main(["--tokenizer", str(root / "tokenizer"), "--transformer", str(tmp_path / "interior"), "--cond",
                 str(root / "clip.mp4"), "--cond-frames", "3", "--steps", "4", "--out",
                 str(tmp_path / "out.mp4"), "--device", "cpu"]) == 0
    assert "trained on frame prediction" not in capsys.readouterr().err  # 3 is a trained count
    pipe = VideoPipeline.from_pretrained(root / "tokenizer", tmp_path / "interior")
    video, _ = pipe.load_video(root / "clip.mp4")
    with torch.no_grad():
        condition = pipe.tokenizer.encode(pipe.prepare_condition("frame_prediction", video, 3)[None])[0]
    region = latent_condition_region("frame_prediction", (4, 8, 8), (8, 32, 32), causal=False, num_cond_frames=3)
    assert region[:2].all() and not region[2:].any()
    (codes,) = decoded
    assert torch.equal(codes[0][region], condition[region]) and bool((codes[0][~region] == 0).all())
