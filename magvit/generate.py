"""``python -m magvit.generate``: generate videos from a condition with a trained tokenizer + prior (the masked
transformer, or the autoregressive one).

Example::

    python -m magvit.generate --cond first_frame.mp4 --out generated.mp4 --task frame_prediction --steps 12

The command reads the condition file, checks the flags, and writes the videos; the generation itself is
``magvit.pipeline`` (``VideoPipeline``): the condition (video or image, any size / fps) is resized (short side) and
centre-cropped to the tokenizer's resolution, turned into the task's COMMIT condition video in pixel space and
tokenized (its codes fill the condition region's slots of an interior model, the prefix of a prefix one), and the
video tokens are decoded in ``--steps`` parallel steps. When ``--transformer`` is an
autoregressive export (``magvit.autoregressive``), the video tokens are drawn one at a time in raster order instead,
with ``--temperature``, ``--top-k`` and ``--top-p``::

    python -m magvit.generate --transformer runs/autoregressive/tiny/export --cond first_frame.mp4 --top-k 32
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path
from typing import Any, Sequence

import torch

from . import tasks
from .cli import ArgumentParser, UsageError, command_name, run_main
from .fileio import check_writable_file
from .sequence import NO_LABEL
from .pipeline import Prior, VideoPipeline, generate, warn_untrained_cond_frames
from .sampling import ARGMAX_TEMPERATURE, DECODING_DEFAULTS, MAX_SCALE, decoding_settings
from .video_io import (MAX_FPS, MIN_FPS, VideoReadError, check_fps, image_size, is_image, save_frame_grid,
                       write_video)
from .sketch import sketch_video

CLI_TASKS = tasks.cli_names()  # --task: one name per row, or per group of rows told apart by --region
REGIONS = tuple(dict.fromkeys(region for name in CLI_TASKS for region in tasks.cli_regions(name)))
DEFAULT_FPS = 8.0  # output frame rate when the condition has none (an image, or no condition at all)
DEFAULT_BATCH = 8  # videos per forward pass: the activations of a batch, not --num-samples, bound the memory
PROG = command_name("python -m magvit.generate")
MAX_SAMPLES = 10_000  # one output file each; more is a typo, not a request
STRIP_ROWS = 9  # a --strip shows the condition and the first samples only
# the sampling flags, each passed to a prior whose sampler takes it (pipeline.Prior.options)
SAMPLING_FLAGS = ("steps", "temperature", "choice_temperature", "top_k", "top_p", "guidance_scale")


def task_from_args(args: argparse.Namespace) -> tasks.Task:
    """The task table's row of ``--task`` / ``--region`` (``outpaint`` + ``vertical`` -> ``outpaint_vertical``)."""
    try:
        return tasks.from_cli(args.task, args.region)
    except ValueError as err:
        raise UsageError(str(err)) from None


def build_parser() -> argparse.ArgumentParser:
    p = ArgumentParser(
        prog=PROG,
        description="Generate a video with a trained tokenizer and prior (masked or autoregressive transformer).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--cond", help="condition video or image (first frame(s), clip to in/outpaint, "
                                  "or a video to sketch for --task sketch)")
    p.add_argument("--out", default="generated.mp4", help="output video; with "
                                                          "--num-samples N > 1, NAME_0.mp4 ... NAME_{N-1}.mp4")
    p.add_argument("--task", default="frame_prediction", choices=CLI_TASKS)
    p.add_argument("--region", default="central", choices=REGIONS,
                   help=f"known region, for --task {' / '.join(n for n in CLI_TASKS if tasks.cli_regions(n))}")
    p.add_argument("--cond-frames", type=int, default=1, help="frame prediction: number of given frames")
    p.add_argument("--sketch", help="sketch video (edge maps) for --task sketch")
    p.add_argument("--class-id", type=int, default=None, help="class label (class task, or with any other task)")
    p.add_argument("--class", dest="class_name", metavar="NAME", default=None,
                   help="class by name, from the transformer export's class_names (instead of --class-id)")
    recorded = "default: the export's recorded decoding, else %s"
    p.add_argument("--steps", type=int, default=None,
                   help=f"parallel decoding steps (masked transformer; {recorded % DECODING_DEFAULTS['steps']})")
    p.add_argument("--temperature", type=float, default=None,
                   help=f"sampling temperature (at most {ARGMAX_TEMPERATURE:g}, 0 included: argmax; "
                        f"{recorded % DECODING_DEFAULTS['temperature']})")
    p.add_argument("--choice-temperature", type=float, default=None,
                   help="confidence noise, annealed to 0 (masked transformer; "
                        f"{recorded % DECODING_DEFAULTS['choice_temperature']})")
    p.add_argument("--top-k", type=int, default=None, help="sample among the k most likely codes")
    p.add_argument("--top-p", type=float, default=None,
                   help="autoregressive transformer: sample within the smallest set of codes whose probability "
                        "reaches p (nucleus)")
    p.add_argument("--guidance-scale", type=float, default=None,
                   help=f"classifier-free guidance scale (0 = off; {recorded % DECODING_DEFAULTS['guidance_scale']})")
    p.add_argument("--num-samples", type=int, default=1, help=f"videos to generate (at most {MAX_SAMPLES})")
    p.add_argument("--batch-size", type=int, default=DEFAULT_BATCH,
                   help="videos generated at once (memory grows with it; samples are written batch by batch)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--fps", type=float, default=None, help="output frame rate (default: the input's)")
    p.add_argument("--strip", default=None, help="also write a PNG strip: condition row | generated rows | the "
                   "real clip (frame prediction from a clip of the model's length)")
    p.add_argument("--tokenizer", default="runs/demo/tokenizer/export", help="tokenizer export folder or Hub id")
    p.add_argument("--transformer", default="runs/demo/transformer/export",
                   help="transformer export folder or Hub id (org/name; HF_HUB_OFFLINE=1 reads the Hub cache only)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--overwrite", action="store_true", help="replace existing output files")
    return p


def _output_paths(out: Path, num_samples: int) -> list[Path]:
    if num_samples == 1:
        return [out]
    return [out.with_name(f"{out.stem}_{i}{out.suffix}") for i in range(num_samples)]


def _check_args(args: argparse.Namespace) -> tasks.Task:
    """Check the flags that need no model; returns the task's row."""
    if args.steps is not None and args.steps < 1:
        raise UsageError(f"--steps must be >= 1, got {args.steps}")
    if not 1 <= args.num_samples <= MAX_SAMPLES:
        raise UsageError(f"--num-samples must be in [1, {MAX_SAMPLES}], got {args.num_samples}")
    if args.batch_size < 1:
        raise UsageError(f"--batch-size must be >= 1, got {args.batch_size}")
    for flag in ("temperature", "choice_temperature", "guidance_scale"):  # NaN passes every comparison
        value = getattr(args, flag)
        if value is None:  # not given: the export's record or the default, filled in by decoding_options
            continue
        low = -MAX_SCALE if flag == "guidance_scale" else 0.0
        high = MAX_SCALE if flag != "temperature" else math.inf  # any temperature is finite math; scales multiply
        if not (math.isfinite(value) and low <= value <= high):  # logits and overflow float32 beyond these
            raise UsageError(f"--{flag.replace('_', '-')} must be a number in [{low:g}, {high:g}], got {value}")
    if args.top_k is not None and args.top_k < 1:
        raise UsageError(f"--top-k must be >= 1, got {args.top_k}")
    if args.top_p is not None and not 0 < args.top_p <= 1:  # also NaN
        raise UsageError(f"--top-p must be in (0, 1], got {args.top_p}")
    if args.cond_frames < 1:
        raise UsageError(f"--cond-frames must be >= 1, got {args.cond_frames}")
    if args.fps is not None:
        try:
            check_fps(args.fps)
        except ValueError as err:
            raise UsageError(f"--{err}") from None
    if Path(args.out).suffix.lower() not in (".mp4", ".mkv", ".mov", ".gif"):
        raise UsageError(f"--out must end in .mp4, .mkv, .mov or .gif, got {args.out}")
    task = task_from_args(args)
    if task.condition == "video" and not args.cond:
        raise UsageError(f"--task {args.task} needs --cond (a video or an image)")
    if task.condition == "sketch" and not (args.sketch or args.cond):
        raise UsageError(f"--task {args.task} needs --sketch (edge-map video) or --cond (a video to sketch)")
    if args.class_id is not None and args.class_name is not None:
        raise UsageError("give --class NAME or --class-id N, not both")
    if task.needs_label and args.class_id is None and args.class_name is None:
        raise UsageError(f"--task {args.task} needs --class-id N or --class NAME")

    for flag in ("cond", "sketch"):
        path = getattr(args, flag)
        if path and not Path(path).is_file():
            raise UsageError(f"--{flag.replace('_', '-')} {path}: no such file")
        if path and is_image(path):  # its header, before any model is loaded: a huge image is refused undecoded
            try:
                image_size(path)
            except VideoReadError as err:
                raise UsageError(f"--{flag} {path}: {err.reason}") from None
    outputs = _output_paths(Path(args.out), args.num_samples) + ([Path(args.strip)] if args.strip else [])
    for path in outputs:  # before any model is loaded: a bad --out fails in a second, not after the work
        if path.exists() and not args.overwrite and not path.is_dir():
            raise UsageError(f"{path} exists; pass --overwrite to replace it")
        try:
            check_writable_file(path)
        except ValueError as err:
            raise UsageError(f"--{'strip' if args.strip and path == Path(args.strip) else 'out'} {path}: {err}"
                             ) from None
    return task


def output_fps(args: argparse.Namespace, input_fps: float) -> float:
    """``--fps``, else the condition's own rate brought into what a video file can hold (with a one-line note when
    it had to move), else ``DEFAULT_FPS``."""
    if args.fps:
        return args.fps
    if not input_fps or not math.isfinite(input_fps) or input_fps <= 0:
        return DEFAULT_FPS
    fps = min(max(input_fps, MIN_FPS), MAX_FPS)
    if fps != input_fps:
        print(f"note: the condition's frame rate {input_fps:g} fps is outside [{MIN_FPS:g}, {MAX_FPS:g}]; writing at "
              f"{fps:g} fps (--fps sets it)", file=sys.stderr)
    return fps


def _check_model_args(args: argparse.Namespace, task: tasks.Task, num_frames: int, num_tokens: int,
                      prior: Prior) -> None:
    """The limits that depend on the loaded models: clip length, tokens per video, the prior's own flags."""
    if task.frames == "first" and not args.cond_frames < num_frames:
        raise UsageError(f"--cond-frames must be < {num_frames} (the model's clip length: at least one frame "
                         f"must be predicted), got {args.cond_frames}")
    if "steps" in prior.options and args.steps is not None and args.steps > num_tokens:  # >= 1 token per step
        raise UsageError(f"--steps must be in [1, {num_tokens}] (the tokens of one video), got {args.steps}")
    if args.top_p is not None and "top_p" not in prior.options:
        raise UsageError("--top-p applies to an autoregressive transformer; this transformer export is a "
                         f"{prior.model_class.__name__} (use --top-k)")
    for flag in ("steps", "choice_temperature"):  # given for a prior that ignores them
        if flag not in prior.options and getattr(args, flag) is not None:
            raise UsageError(f"--{flag.replace('_', '-')} applies to a masked transformer (parallel decoding); "
                             f"this transformer export is a {prior.model_class.__name__}, which decodes one token at "
                             "a time")


def sampling_options(args: argparse.Namespace, prior: Prior, model: torch.nn.Module) -> dict[str, Any]:
    """The sampling flags that the loaded prior's sampler takes, as its keywords: each flag given, else the
    export's recorded decoding (a masked transformer's ``decoding``), else ``DECODING_DEFAULTS``."""
    try:
        settings = decoding_settings(model, {flag: getattr(args, flag) for flag in SAMPLING_FLAGS})
    except ValueError as err:  # an untrusted export's record
        raise UsageError(str(err)) from None
    return {flag: settings.get(flag) for flag in SAMPLING_FLAGS if flag in prior.options}


def class_from_args(args: argparse.Namespace, class_names: Sequence[str]) -> int:
    """The class id of ``--class NAME`` (looked up in the export's ``class_names``) or ``--class-id``;
    ``NO_LABEL`` when neither is given."""
    if args.class_name is None:
        return NO_LABEL if args.class_id is None else args.class_id
    if not class_names:
        raise UsageError(f"--class {args.class_name}: the transformer export has no class names (an export "
                         "trained without classes, or older than class names): use --class-id")
    if args.class_name not in class_names:
        raise UsageError(f"--class {args.class_name}: not a class of this transformer; known: "
                         f"{', '.join(class_names)}")
    return list(class_names).index(args.class_name)


def read_condition(args: argparse.Namespace, pipe: VideoPipeline,
                   task: tasks.Task) -> tuple[torch.Tensor | None, float, torch.Tensor | None]:
    """The prefix video ``(3, T, S, S)`` of ``task`` from ``--cond`` / ``--sketch`` (``None`` for the tasks
    without one: class, unconditional), the input's frame rate (0 when it has none) and, for frame prediction
    from a whole clip of the model's length, that clip ``(3, T, S, S)`` (the truth the prediction is shown
    against; ``None`` otherwise)."""
    if not task.has_condition_codes:
        return None, 0.0, None
    video, fps = pipe.load_video(args.sketch if task.condition == "sketch" and args.sketch else args.cond)
    truth = video if task.frames == "first" and video.shape[1] == pipe.num_frames else None
    if task.condition == "sketch" and not args.sketch:  # the sketch of --cond, at the model's resolution

        video = sketch_video(video)
    return pipe.prepare_condition(task.name, video, args.cond_frames), fps, truth


def run(args: argparse.Namespace) -> list[Path]:
    """Generate and write the outputs of a parsed command line; returns the written video paths."""
    task = _check_args(args)
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        raise UsageError(f"--device {args.device}: no CUDA device available")
    pipe = VideoPipeline.from_pretrained(args.tokenizer, args.transformer, device=args.device)
    _check_model_args(args, task, pipe.num_frames, math.prod(pipe.token_grid), pipe.prior_kind)
    if task.frames == "first":
        warn_untrained_cond_frames(pipe.prior, args.cond_frames)
    options = sampling_options(args, pipe.prior_kind, pipe.prior)
    if options.get("steps", 0) > math.prod(pipe.token_grid):  # a recorded number of steps
        raise UsageError(f"the export's recorded decoding steps ({options['steps']}) exceed the tokens of one "
                         f"video ({math.prod(pipe.token_grid)}): pass --steps")
    class_id = class_from_args(args, pipe.class_names)
    condition, fps, truth = read_condition(args, pipe, task)
    fps = output_fps(args, fps)


    paths = _output_paths(Path(args.out), args.num_samples)
    start = time.perf_counter()
    strip_rows = [condition.cpu()] if condition is not None else []
    for first in range(0, args.num_samples, args.batch_size):
        # batch k is seeded with seed + k: the samples do not depend on how many are asked for after them
        batch = paths[first:first + args.batch_size]
        videos = generate(pipe.tokenizer, pipe.prior, task.name, condition, class_id=class_id,
                          num_cond_frames=args.cond_frames, num_samples=len(batch), seed=args.seed + first // args.batch_size, progress=True,
                          **options).cpu()  # (b, 3, T, H, W)
        for path, video in zip(batch, videos):
            write_video(path, video, fps=fps)
        if args.strip and len(strip_rows) < STRIP_ROWS:
            strip_rows += list(videos[:STRIP_ROWS - len(strip_rows)])
    elapsed = time.perf_counter() - start
    decoding = (f"{options['steps']} steps, temperature {options['temperature']:g}" if "steps" in options
                else f"autoregressive, temperature {options['temperature']:g}")
    if args.strip:  # given | predicted | truth (frame prediction from a whole clip)
        save_frame_grid(args.strip, strip_rows + ([truth.cpu()] if truth is not None else []))
    print(f"generated {len(paths)} video(s) of {videos.shape[2]} frames at {videos.shape[3]}x{videos.shape[4]} "
          f"({task.name}, {decoding}, {math.prod(pipe.token_grid)} tokens each) in {elapsed:.1f} s -> "
          f"{', '.join(map(str, paths))}" + (f"; strip {args.strip}" if args.strip else ""))
    return paths


def _main(argv: Sequence[str] | None) -> int:
    run(build_parser().parse_args(argv))
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m magvit.generate`` / ``magvit-generate``: user errors (bad input, models that do not fit, an
    output folder that cannot be written) are one line and exit status 2."""
    return run_main(None, _main, argv)


if __name__ == "__main__":
    sys.exit(main())
