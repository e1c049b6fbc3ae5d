"""``python -m magvit.generate``: generate a video from a condition with a trained tokenizer + masked transformer.

Example::

    python -m magvit.generate --cond first_frame.mp4 --out generated.mp4 --task frame_prediction --steps 12

The condition (video or image, any size / fps) is resized (short side) and centre-cropped to the tokenizer's
resolution, turned into the task's COMMIT condition video in pixel space, tokenized into the prefix, and the video
tokens are decoded in ``--steps`` parallel steps (``magvit.sampling.iterative_decode``), then decoded to pixels.
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path
from typing import Sequence

import torch
import torch.nn.functional as F

from .cli import ArgumentParser, UsageError, command_name, run_main
from .masking import CONDITION_TASKS, NO_LABEL, build_condition_video, build_sequence

CLI_TASKS = ("frame_prediction", "interpolation", "outpaint", "inpaint", "sketch", "class", "unconditional")
OUTPAINT_REGIONS = ("central", "vertical", "horizontal")
DEFAULT_FPS = 8.0  # output frame rate when the condition has none (an image, or no condition at all)
DEFAULT_BATCH = 8  # videos per forward pass: the activations of a batch, not --num-samples, bound the memory
PROG = command_name("python -m magvit.generate")
MAX_SAMPLES = 10_000  # one output file each; more is a typo, not a request


# --- models --------------------------------------------------------------------------------------------------------


def load_models(tokenizer_dir: str | Path, transformer_dir: str | Path, device: str | torch.device = "cpu"):
    """Load a ``VideoTokenizer`` and a ``MaskedVideoTransformer`` and check that they belong together."""
    from .tokenizer import VideoTokenizer
    from .transformer import MaskedVideoTransformer

    models = []
    for cls, directory, what in ((VideoTokenizer, tokenizer_dir, "tokenizer"),
                                 (MaskedVideoTransformer, transformer_dir, "transformer")):
        try:
            models.append(cls.from_pretrained(directory, device=device))
        except Exception as err:  # missing folder, foreign or corrupt checkpoint: all user-facing
            raise UsageError(f"cannot load the {what} from {directory}: {err}") from None
    tokenizer, transformer = models
    check_pair(tokenizer.config, transformer.config)
    return tokenizer, transformer


def check_pair(tokenizer_config, transformer_config) -> tuple[int, int, int]:
    """Raise ``UsageError`` unless the transformer was trained on this tokenizer's codes; returns the grid."""
    tc = tokenizer_config
    if tc.codebook_size != transformer_config.codebook_size:
        raise UsageError(f"tokenizer and transformer do not match: codebook size {tc.codebook_size} vs "
                            f"{transformer_config.codebook_size}")
    grid = tuple(tc.token_grid(tc.num_frames, tc.image_size, tc.image_size))
    if grid != tuple(transformer_config.token_grid):
        raise UsageError(f"tokenizer and transformer do not match: token grid {grid} "
                            f"({tc.num_frames}x{tc.image_size}x{tc.image_size} clips) vs "
                            f"{tuple(transformer_config.token_grid)}")
    return grid  # type: ignore[return-value]


# --- inputs --------------------------------------------------------------------------------------------------------


def fit_video(frames: torch.Tensor, image_size: int) -> torch.Tensor:
    """uint8 ``(T, H, W, 3)`` -> float ``(3, T, S, S)`` in [-1, 1]: short side resized to ``S``, centre crop."""
    video = frames.permute(3, 0, 1, 2).float() / 127.5 - 1.0  # (3, T, H, W)
    _, _, h, w = video.shape
    scale = image_size / min(h, w)
    size = (max(image_size, round(h * scale)), max(image_size, round(w * scale)))
    if size != (h, w):
        video = F.interpolate(video, size=size, mode="bilinear", antialias=True, align_corners=False)
    top, left = (size[0] - image_size) // 2, (size[1] - image_size) // 2
    return video[:, :, top:top + image_size, left:left + image_size].clamp(-1, 1).contiguous()


def read_input(path: str | Path, image_size: int, max_frames: int) -> tuple[torch.Tensor, float]:
    """Read a video or image (``UsageError`` if unreadable); returns ``((3, T, S, S), fps)``."""
    from .video_io import VideoReadError, read_video

    try:
        frames, fps = read_video(path, max_frames=max_frames)
    except VideoReadError as err:
        raise UsageError(str(err)) from None
    return fit_video(frames, image_size), float(fps)


def task_name(task: str, region: str = "central") -> str:
    """CLI task (``outpaint``, ``inpaint``, ...) -> the model's task name (``outpaint_central``, ...)."""
    if task == "outpaint":
        if region not in OUTPAINT_REGIONS:
            raise UsageError(f"--region must be one of {', '.join(OUTPAINT_REGIONS)}, got '{region}'")
        return f"outpaint_{region}"
    if task == "inpaint":
        return "inpaint_central"
    return task


def condition_video(task: str, video: torch.Tensor, num_frames: int, num_cond_frames: int = 1) -> torch.Tensor:
    """The pixel-space condition ``(3, num_frames, S, S)`` of ``task`` from the user's ``video`` ``(3, T, S, S)``.

    Frame prediction uses the first ``num_cond_frames`` frames, interpolation the first and the last of the first
    ``num_frames`` frames, outpainting / inpainting need a whole clip of ``num_frames`` frames.
    """
    available = video.shape[1]
    if task == "frame_prediction":
        if available < num_cond_frames:
            raise UsageError(f"frame_prediction with {num_cond_frames} condition frame(s) needs at least "
                                f"{num_cond_frames} frame(s), the condition has {available}")
        clip = video[:, :num_cond_frames]
        clip = torch.cat([clip, clip[:, -1:].expand(-1, num_frames - num_cond_frames, -1, -1)], dim=1)
        return build_condition_video(clip, task, num_cond_frames=num_cond_frames)
    if task == "interpolation":
        if available < 2:
            raise UsageError(f"interpolation needs a first and a last frame, the condition has {available} frame")
        ends = video[:, [0, min(available, num_frames) - 1]]
        clip = ends[:, [0] * (num_frames - 1) + [1]]
        return build_condition_video(clip, task)
    if available < num_frames:
        raise UsageError(f"{task} needs a clip of {num_frames} frames, the condition has {available}")
    return build_condition_video(video[:, :num_frames], task)


# --- generation ----------------------------------------------------------------------------------------------------


@torch.no_grad()
def generate_codes(
    transformer,
    task: str,
    prefix_codes: torch.Tensor | None,
    *,
    class_id: int = NO_LABEL,
    num_samples: int = 1,
    steps: int = 12,
    temperature: float = 1.0,
    choice_temperature: float = 4.5,
    top_k: int | None = None,
    guidance_scale: float = 0.0,
    schedule: str = "cosine",
    seed: int | None = None,
    progress: bool = False,
) -> torch.Tensor:
    """Sample ``num_samples`` code grids ``(N, t, h, w)`` for ``task`` given prefix codes ``(1, t, h, w)`` (or
    ``None`` for class / unconditional) and a class id (``NO_LABEL``: unconditional class token)."""
    from .sampling import iterative_decode

    config = transformer.config
    vocab, layout = config.vocab, config.layout
    device = next(transformer.parameters()).device
    needs_prefix = task in CONDITION_TASKS or task == "sketch"
    if needs_prefix and prefix_codes is None:
        raise UsageError(f"task '{task}' needs a condition")
    prefix = None
    if needs_prefix:
        prefix = prefix_codes.to(device).expand(num_samples, *layout.token_grid)
    task_tokens = torch.full((num_samples,), vocab.task_token(task), dtype=torch.long, device=device)
    try:
        class_token = vocab.class_token(class_id)
    except ValueError as err:
        raise UsageError(str(err)) from None
    class_tokens = torch.full((num_samples,), class_token, dtype=torch.long, device=device)
    tokens = build_sequence(vocab, layout, task_tokens, class_tokens, prefix, None)
    # The dropped condition of classifier-free guidance: pad prefix and the unconditional class token.
    uncond = build_sequence(vocab, layout, task_tokens, torch.full_like(class_tokens, vocab.unconditional_token),
                            None, None)
    generator = torch.Generator().manual_seed(seed) if seed is not None else None
    out = iterative_decode(transformer, tokens, mask_token=vocab.mask_token, codebook_size=config.codebook_size,
                           steps=steps, temperature=temperature, choice_temperature=choice_temperature, top_k=top_k,
                           schedule=schedule, guidance_scale=guidance_scale,
                           uncond_tokens=uncond if guidance_scale else None, generator=generator, progress=progress)
    return out[:, layout.video].reshape(num_samples, *layout.token_grid)


@torch.no_grad()
def generate(
    tokenizer,
    transformer,
    task: str,
    condition: torch.Tensor | None = None,
    **kwargs,
) -> torch.Tensor:
    """Generate videos ``(N, 3, T, H, W)`` in [-1, 1].

    ``condition``: the pixel-space condition video ``(3, T, H, W)`` of a COMMIT task (``condition_video``) or the
    sketch video for ``task="sketch"``; ``None`` for class / unconditional. ``kwargs`` go to :func:`generate_codes`.
    """
    device = next(transformer.parameters()).device
    prefix_codes = None
    if condition is not None and (task in CONDITION_TASKS or task == "sketch"):
        prefix_codes = tokenizer.encode(condition.unsqueeze(0).to(device))  # (1, t, h, w)
    codes = generate_codes(transformer, task, prefix_codes, **kwargs)
    return tokenizer.decode(codes).clamp(-1, 1)


# --- CLI -----------------------------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    p = ArgumentParser(
        prog=PROG,
        description="Generate a video with a trained tokenizer and masked video transformer.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--cond", help="condition video or image (first frame(s), clip to in/outpaint, "
                                  "or a video to sketch for --task sketch)")
    p.add_argument("--out", default="generated.mp4", help="output video; with "
                                                          "--num-samples N > 1, NAME_0.mp4 ... NAME_{N-1}.mp4")
    p.add_argument("--task", default="frame_prediction", choices=CLI_TASKS)
    p.add_argument("--region", default="central", choices=OUTPAINT_REGIONS, help="outpainting: known region")
    p.add_argument("--cond-frames", type=int, default=1, help="frame prediction: number of given frames")
    p.add_argument("--sketch", help="sketch video (edge maps) for --task sketch")
    p.add_argument("--class-id", type=int, default=None, help="class label (class task, or with any other task)")
    p.add_argument("--class", dest="class_name", metavar="NAME", default=None,
                   help="class by name, from the transformer export's class_names (instead of --class-id)")
    p.add_argument("--steps", type=int, default=12, help="parallel decoding steps")
    p.add_argument("--temperature", type=float, default=1.0, help="sampling temperature (0 = argmax)")
    p.add_argument("--choice-temperature", type=float, default=4.5, help="confidence noise, annealed to 0")
    p.add_argument("--top-k", type=int, default=None, help="sample among the k most likely codes")
    p.add_argument("--guidance-scale", type=float, default=0.0, help="classifier-free guidance scale (0 = off)")
    p.add_argument("--num-samples", type=int, default=1, help=f"videos to generate (at most {MAX_SAMPLES})")
    p.add_argument("--batch-size", type=int, default=DEFAULT_BATCH,
                   help="videos generated at once (memory grows with it; samples are written batch by batch)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--fps", type=float, default=None, help="output frame rate (default: the input's)")
    p.add_argument("--strip", default=None, help="also write a PNG strip: condition row | generated rows")
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


def _check_args(args: argparse.Namespace) -> None:
    if args.steps < 1:
        raise UsageError(f"--steps must be >= 1, got {args.steps}")
    if not 1 <= args.num_samples <= MAX_SAMPLES:
        raise UsageError(f"--num-samples must be in [1, {MAX_SAMPLES}], got {args.num_samples}")
    if args.batch_size < 1:
        raise UsageError(f"--batch-size must be >= 1, got {args.batch_size}")
    for flag in ("temperature", "choice_temperature", "guidance_scale"):  # NaN passes every comparison
        value = getattr(args, flag)
        if not math.isfinite(value) or (flag != "guidance_scale" and value < 0):
            bound = "a finite number" if flag == "guidance_scale" else "a finite number >= 0"
            raise UsageError(f"--{flag.replace('_', '-')} must be {bound}, got {value}")
    if args.top_k is not None and args.top_k < 1:
        raise UsageError(f"--top-k must be >= 1, got {args.top_k}")
    if args.cond_frames < 1:
        raise UsageError(f"--cond-frames must be >= 1, got {args.cond_frames}")
    if args.fps is not None:
        from .video_io import check_fps

        try:
            check_fps(args.fps)
        except ValueError as err:
            raise UsageError(f"--{err}") from None
    if Path(args.out).suffix.lower() not in (".mp4", ".mkv", ".mov", ".gif"):
        raise UsageError(f"--out must end in .mp4, .mkv, .mov or .gif, got {args.out}")
    if args.task in ("frame_prediction", "interpolation", "outpaint", "inpaint") and not args.cond:
        raise UsageError(f"--task {args.task} needs --cond (a video or an image)")
    if args.task == "sketch" and not (args.sketch or args.cond):
        raise UsageError("--task sketch needs --sketch (edge-map video) or --cond (a video to sketch)")
    if args.class_id is not None and args.class_name is not None:
        raise UsageError("give --class NAME or --class-id N, not both")
    if args.task == "class" and args.class_id is None and args.class_name is None:
        raise UsageError("--task class needs --class-id N or --class NAME")
    for flag in ("cond", "sketch"):
        path = getattr(args, flag)
        if path and not Path(path).is_file():
            raise UsageError(f"--{flag.replace('_', '-')} {path}: no such file")
    if not args.overwrite:
        for path in _output_paths(Path(args.out), args.num_samples) + ([Path(args.strip)] if args.strip else []):
            if path.exists():
                raise UsageError(f"{path} exists; pass --overwrite to replace it")


def _check_model_args(args: argparse.Namespace, task: str, num_frames: int, num_tokens: int) -> None:
    """The limits that depend on the loaded models: clip length and tokens per video."""
    if task == "frame_prediction" and not args.cond_frames < num_frames:
        raise UsageError(f"--cond-frames must be < {num_frames} (the model's clip length: at least one frame "
                            f"must be predicted), got {args.cond_frames}")
    if args.steps > num_tokens:  # each step reveals at least one token: more steps than tokens do nothing
        raise UsageError(f"--steps must be in [1, {num_tokens}] (the tokens of one video), got {args.steps}")


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


def run(args: argparse.Namespace) -> list[Path]:
    """Generate and write the outputs of a parsed command line; returns the written video paths."""
    _check_args(args)
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        raise UsageError(f"--device {args.device}: no CUDA device available")
    tokenizer, transformer = load_models(args.tokenizer, args.transformer, args.device)
    num_frames, size = tokenizer.config.num_frames, tokenizer.config.image_size
    task = task_name(args.task, args.region)
    _check_model_args(args, task, num_frames, math.prod(transformer.config.token_grid))
    class_id = class_from_args(args, transformer.class_names)
    fps = DEFAULT_FPS
    condition = shown = None
    if task == "sketch":
        if args.sketch:
            condition, fps = read_input(args.sketch, size, num_frames)
        else:
            video, fps = read_input(args.cond, size, num_frames)
            from .sketch import sketch_video

            condition = sketch_video(video)
        if condition.shape[1] < num_frames:
            raise UsageError(f"the sketch needs {num_frames} frames, it has {condition.shape[1]}")
        condition = condition[:, :num_frames]
        shown = condition
    elif task in CONDITION_TASKS:
        video, fps = read_input(args.cond, size, num_frames)
        condition = condition_video(task, video, num_frames, args.cond_frames)
        shown = condition
    fps = args.fps or fps or DEFAULT_FPS

    from .video_io import save_frame_grid, write_video

    paths = _output_paths(Path(args.out), args.num_samples)
    start = time.perf_counter()
    strip_rows = [shown.cpu()] if shown is not None else []
    for first in range(0, args.num_samples, args.batch_size):
        # batch k is seeded with seed + k: the samples do not depend on how many are asked for after them
        batch = paths[first:first + args.batch_size]
        videos = generate(tokenizer, transformer, task, condition, class_id=class_id, num_samples=len(batch),
                          steps=args.steps, temperature=args.temperature, choice_temperature=args.choice_temperature,
                          top_k=args.top_k, guidance_scale=args.guidance_scale,
                          seed=args.seed + first // args.batch_size, progress=True).cpu()  # (b, 3, T, H, W)
        for path, video in zip(batch, videos):
            write_video(path, video, fps=fps)
        if args.strip and len(strip_rows) < 9:  # a strip shows the first few samples only
            strip_rows += list(videos[:9 - len(strip_rows)])
    elapsed = time.perf_counter() - start
    if args.strip:
        save_frame_grid(args.strip, strip_rows)
    t, h, w = transformer.config.token_grid
    print(f"generated {len(paths)} video(s) of {videos.shape[2]} frames at {videos.shape[3]}x{videos.shape[4]} "
          f"({task}, {args.steps} steps, {t * h * w} tokens each) in {elapsed:.1f} s -> "
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
