"""``magvit.pipeline.VideoPipeline``: the model pair checked once, every task on tensors, the file helper."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import load_real_clip
from magvit import MaskedVideoTransformer, TokenizerConfig, TransformerConfig, VideoPipeline, VideoTokenizer
from magvit.cli import UsageError
from magvit.tasks import TASK_NAMES
from magvit.conditions import build_condition_video
from magvit.pipeline import check_pair, fit_video, generate
from magvit.video_io import to_float, to_uint8, write_video

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def pipe() -> VideoPipeline:
    torch.manual_seed(0)
    tokenizer = VideoTokenizer(TokenizerConfig.preset("tiny")).eval()  # 8x32x32 -> 4x8x8 codes of 64
    transformer = MaskedVideoTransformer(TransformerConfig.preset("tiny", num_classes=2)).eval()
    return VideoPipeline(tokenizer, transformer)


@pytest.fixture(scope="module")
def clip(real_video_path) -> torch.Tensor:
    """(3, 10, 48, 48) real footage: larger than the model's 32x32 and longer than its 8 frames."""
    return load_real_clip(real_video_path, num_frames=10, size=48)[0]


def test_a_pair_that_does_not_belong_together_is_refused():
    tokenizer = TokenizerConfig.preset("tiny")
    assert check_pair(tokenizer, TransformerConfig.preset("tiny")) == (4, 8, 8)
    with pytest.raises(UsageError, match="do not belong together: codebook size 64 vs 128"):
        check_pair(tokenizer, TransformerConfig.preset("tiny", codebook_size=128))
    with pytest.raises(UsageError, match=r"token grid \(4, 8, 8\) \(8x32x32 clips\) vs \(2, 8, 8\)"):
        VideoPipeline(VideoTokenizer(tokenizer), MaskedVideoTransformer(TransformerConfig.preset("tiny",
                                                                                               token_grid=(2, 8, 8))))


def test_the_prior_and_its_deprecated_alias(pipe):
    """``pipe.prior`` is the model, ``pipe.prior_kind`` its row of the ``Prior`` table; ``pipe.transformer`` still
    reads the model for one release, with a DeprecationWarning, and cannot be set."""
    assert isinstance(pipe.prior, MaskedVideoTransformer) and pipe.prior_kind.model_class is MaskedVideoTransformer
    with pytest.warns(DeprecationWarning, match="use VideoPipeline.prior"):
        assert pipe.transformer is pipe.prior
    with pytest.raises(AttributeError):
        pipe.transformer = pipe.prior


def test_fit_video_is_the_datasets_centre_crop(clip):
    from magvit.data import preprocess_frames

    frames = to_uint8(clip[:, :, :, 4:])  # (10, 48, 44, 3): not square
    expected = preprocess_frames(frames, (32, 32), None, hflip=False)
    assert torch.equal(fit_video(to_float(frames), 32), expected)
    assert fit_video(expected, 32).equal(expected)  # already fitted: unchanged


@pytest.mark.parametrize("task", ["frame_prediction", "interpolation", "outpaint_vertical", "inpaint_central"])
def test_conditions_are_built_on_the_fitted_clip(pipe, clip, task):
    condition = pipe.prepare_condition(task, clip[None])
    fitted = fit_video(clip, 32)[:, :8]
    assert condition.shape == (3, 8, 32, 32)
    if task == "frame_prediction":  # the first frame, repeated
        assert torch.equal(condition, fitted[:, :1].expand_as(condition))
    elif task == "interpolation":  # first and last of the clip's 8 frames
        assert torch.equal(condition[:, 0], fitted[:, 0]) and torch.equal(condition[:, -1], fitted[:, 7])
    else:
        assert torch.equal(condition, build_condition_video(fitted, task))


def test_condition_errors(pipe, clip):
    with pytest.raises(UsageError, match="unknown task 'outpaint'"):
        pipe.prepare_condition("outpaint", clip)
    with pytest.raises(UsageError, match="task 'class' takes no condition"):
        pipe.prepare_condition("class", clip)
    with pytest.raises(UsageError, match="needs a condition video"):
        pipe("frame_prediction")
    with pytest.raises(UsageError, match="needs a clip of 8 frames, the condition has 3"):
        pipe.prepare_condition("outpaint_central", clip[:, :3])
    with pytest.raises(UsageError, match="float video"):
        pipe.prepare_condition("frame_prediction", to_uint8(clip))
    assert pipe.prepare_condition("unconditional", None) is None


@pytest.mark.parametrize("task", TASK_NAMES)
def test_every_task_generates_videos(pipe, clip, task):
    from magvit.sketch import sketch_video

    condition = {"sketch": sketch_video(clip), "class": None, "unconditional": None}.get(task, clip)
    videos = pipe(task, condition, num_samples=2, steps=2, class_id=1 if task == "class" else -1,
                  generator=torch.Generator().manual_seed(0))
    assert videos.shape == (2, 3, 8, 32, 32) and float(videos.abs().max()) <= 1.0


def test_same_generator_same_videos_as_the_function(pipe, clip):
    kwargs = {"num_samples": 2, "steps": 3, "guidance_scale": 1.0}
    first = pipe("frame_prediction", clip, generator=torch.Generator().manual_seed(5), **kwargs)
    again = pipe("frame_prediction", clip, seed=5, **kwargs)
    by_function = generate(pipe.tokenizer, pipe.prior, "frame_prediction",
                           pipe.prepare_condition("frame_prediction", clip), seed=5, **kwargs)
    assert torch.equal(first, again) and torch.equal(first, by_function)
    with pytest.raises(ValueError, match="not both"):
        pipe("frame_prediction", clip, seed=5, generator=torch.Generator(), **kwargs)


def test_from_pretrained_and_load_video(pipe, clip, tmp_path):
    pipe.tokenizer.save_pretrained(tmp_path / "tokenizer")
    pipe.prior.save_pretrained(tmp_path / "transformer")
    loaded = VideoPipeline.from_pretrained(tmp_path / "tokenizer", tmp_path / "transformer", device="cpu")
    assert loaded.token_grid == (4, 8, 8) and loaded.num_frames == 8 and loaded.image_size == 32
    write_video(tmp_path / "clip.mp4", clip, fps=12.5)
    video, fps = loaded.load_video(tmp_path / "clip.mp4")
    assert video.shape == (3, 8, 32, 32) and fps == pytest.approx(12.5)
    with pytest.raises(UsageError, match="cannot load the transformer from"):
        VideoPipeline.from_pretrained(tmp_path / "tokenizer", tmp_path / "nothing")
    (tmp_path / "broken.mp4").write_bytes(b"not a video" * 10)
    with pytest.raises(UsageError, match="broken.mp4"):
        loaded.load_video(tmp_path / "broken.mp4")


def test_import_magvit_stays_light():
    code = "import sys, magvit; magvit.VideoPipeline; print('torch' in sys.modules)"
    light = "import sys, magvit; print('torch' in sys.modules)"
    out = [subprocess.run([sys.executable, "-c", c], capture_output=True, text=True, cwd=REPO, check=True).stdout
           for c in (light, code)]
    assert out == ["False\n", "True\n"]
