"""``python -m magvit.evaluate``: tokenizer and transformer metrics on held-out clips, with a report and plots.

Tokenizer: PSNR and SSIM of the reconstructions (per frame, averaged), codebook usage and perplexity over the
dataset, bits per pixel of the codes (fixed-length and entropy-coded). Transformer (``--transformer``, the masked or
the autoregressive prior): masked-token negative log-likelihood and accuracy on held-out tokens (masked prior;
``--tokens`` shards, or the clips tokenized on the fly), and frame prediction: PSNR / SSIM / per-frame MSE of the
generated future frames against the real ones, per clip and per predicted frame, next to baselines that need no model
(the last given frame copied, in pixels and through the tokenizer; all black; the mean given frame). FVD with a
local I3D TorchScript file (``--i3d``). Token shards that hold the evaluated clips (or come from a training split) are
warned about on stderr and in the report's ``warnings``. Writes ``report.json`` and PNG plots.

    python -m magvit.evaluate --tokenizer runs/demo/tokenizer/export --transformer runs/demo/transformer/export \\
        --data data/sample/manifest.jsonl --out runs/demo/eval --run-dir runs/demo/tokenizer

The command checks the flags, loads the models and writes the report; what is read, measured and written is
``magvit.evaluation`` (``inputs``, ``evaluators``, ``report``).
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import time
from pathlib import Path
from typing import Any, Sequence

import torch

from . import metrics
from .cli import ArgumentParser, UsageError, command_name, run_main
from .evaluation.evaluators import (ClipResults, FramePredictionEvaluation, MaskedTokenEvaluation,
                                    TokenizerEvaluation, clip_condition_regions, evaluate_clips,
                                    evaluate_token_shards, fvd_report)
from .evaluation.inputs import (check_token_meta, check_tokenizer_weights, evaluated_videos, held_out_warnings,
                                iterate_clips, open_clips, resolve_data, supported_tasks)
from .evaluation.report import summary_lines, write_plots, write_report
from .fileio import check_writable_dir
from .pipeline import check_pair, load_pretrained, warn_untrained_cond_frames
from .pretrained import is_hub_id, resolve_pretrained, weights_fingerprint, write_record
from .sampling import DECODING_DEFAULTS, check_decoding, decoding_settings
from .tasks import TASK_NAMES
from .transformer import MaskedVideoTransformer

PROG = command_name("python -m magvit.evaluate")


def build_parser() -> argparse.ArgumentParser:
    p = ArgumentParser(
        prog=PROG,
        description="Evaluate a video tokenizer (and a masked transformer) on held-out clips; writes report.json "
                    "and PNG plots.",
    )
    p.add_argument("--tokenizer", metavar="DIR", help="save_pretrained folder of the VideoTokenizer (e.g. RUN/export) "
                   "or its Hub id (org/name)")
    p.add_argument("--transformer", metavar="DIR", help="save_pretrained folder of the prior (MaskedVideoTransformer "
                   "or AutoregressiveTransformer) or its Hub id")
    p.add_argument("--data", metavar="MANIFEST_OR_FOLDER",
                   help="manifest.jsonl, a folder holding one, a folder of videos, or a folder of token shards")
    p.add_argument("--tokens", metavar="DIR", help="held-out token shards for the masked-token NLL "
                                                   "(default: tokenize the clips of --data on the fly)")
    p.add_argument("--out", metavar="DIR", default="runs/eval", help="report folder (default: %(default)s)")
    p.add_argument("--split", default="val", choices=("train", "val", "all"),
                   help="manifest split to evaluate (default: %(default)s)")
    p.add_argument("--max-clips", type=int, metavar="N", help="evaluate at most N clips (and N token grids)")
    p.add_argument("--batch-size", type=int, default=8,
                   help="clips per batch, through the tokenizer and generation alike (one sample per clip; the "
                        "samples of a seed depend on it), and token grids per masked-token batch "
                        "(default: %(default)s)")
    p.add_argument("--run-dir", metavar="RUN_DIR", action="append", default=[],
                   help="training run folder whose metrics.jsonl is plotted (repeatable)")
    p.add_argument("--i3d", metavar="PATH", help="local I3D TorchScript file (i3d_torchscript.pt) for FVD")
    p.add_argument("--cond-frames", type=int, default=1, help="frames given for frame prediction (default: 1)")
    recorded = "default: the masked transformer export's recorded decoding, else %s"
    p.add_argument("--steps", type=int, default=None,
                   help=f"parallel decoding steps ({recorded % DECODING_DEFAULTS['steps']})")
    p.add_argument("--temperature", type=float, default=None,
                   help=f"sampling temperature ({recorded % DECODING_DEFAULTS['temperature']})")
    p.add_argument("--choice-temperature", type=float, default=None,
                   help=f"confidence noise of parallel decoding ({recorded % DECODING_DEFAULTS['choice_temperature']})")
    p.add_argument("--guidance-scale", type=float, default=None,
                   help=f"classifier-free guidance ({recorded % DECODING_DEFAULTS['guidance_scale']})")
    p.add_argument("--record-decoding", action="store_true",
                   help="write the decoding settings of this evaluation into the masked transformer export's "
                        "config.json (a local folder), so that generate and evaluate use them by default: choose "
                        "them on clips no model trained on")
    p.add_argument("--nll-tasks", default="frame_prediction,unconditional",
                   help="comma-separated tasks for the masked-token NLL (default: %(default)s; tasks the data "
                        "lacks are left out)")
    p.add_argument("--num-samples", type=int, default=2, help="clips shown in the sample strip (default: 2)")
    p.add_argument("--seed", type=int, default=0, help="seed of masking and sampling (default: %(default)s)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                   help="torch device (default: cuda when available, else cpu)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    return p


def _check_args(args: argparse.Namespace) -> None:
    if args.tokenizer is None and args.transformer is None:
        raise UsageError("give --tokenizer DIR (and optionally --transformer DIR)")
    if args.data is None and args.tokens is None:
        raise UsageError("give --data MANIFEST_OR_FOLDER (or --tokens DIR for the transformer alone)")
    for name in ("max_clips", "batch_size", "steps", "cond_frames", "num_samples"):
        value = getattr(args, name)
        if value is not None and value < (0 if name == "num_samples" else 1):
            raise UsageError(f"--{name.replace('_', '-')} must be a positive integer, got {value}")
    for name in ("tokenizer", "transformer", "tokens"):
        value = getattr(args, name)
        hub_id = name != "tokens" and is_hub_id(value)  # an org/name the Hub (or its cache) resolves at load
        if value is not None and not Path(value).is_dir() and not hub_id:
            raise UsageError(f"--{name}: no such folder: {value}")
    for run_dir in args.run_dir:
        if not (Path(run_dir) / "metrics.jsonl").is_file():
            raise UsageError(f"--run-dir: no metrics.jsonl in {run_dir}")
    if args.i3d is not None and not Path(args.i3d).is_file():
        raise UsageError(f"--i3d: no such file: {args.i3d}")
    given = {k: getattr(args, k) for k in DECODING_DEFAULTS if getattr(args, k) is not None}
    try:
        check_decoding(given, "the command line")
    except ValueError as err:  # NaN, inf, negative temperatures, scales that overflow float32
        raise UsageError(str(err).replace("the command line: decoding ", "--").replace("_", "-")) from None
    if args.record_decoding and (args.transformer is None or not Path(args.transformer).is_dir()):
        raise UsageError("--record-decoding writes into the masked transformer export: give --transformer as a "
                         "local folder")
    try:
        check_writable_dir(args.out)  # now, not after every clip has been evaluated
    except ValueError as err:
        raise UsageError(f"--out: {err}") from None
    try:
        torch.device(args.device)
    except RuntimeError:
        raise UsageError(f"--device: unknown device '{args.device}'") from None


def load_models(tokenizer_dir: str | None, transformer_dir: str | None, device: torch.device):
    """Load the tokenizer and (optionally) the transformer; check that they belong together."""

    tokenizer = load_pretrained("tokenizer", tokenizer_dir, device) if tokenizer_dir is not None else None
    transformer = load_pretrained("prior", transformer_dir, device) if transformer_dir is not None else None
    if tokenizer is not None and transformer is not None:
        check_pair(tokenizer.config, transformer.config)
    return tokenizer, transformer


def _data_sources(args: argparse.Namespace, out: Path, tokenizer, transformer) -> tuple[Path | None, Path | None]:
    """``(manifest, token shard folder)`` of ``--data`` / ``--tokens``, either ``None``, checked against the models
    given."""
    kind, data_path = ("tokens", Path(args.tokens)) if args.data is None else resolve_data(args.data, out)
    tokens_dir = Path(args.tokens) if args.tokens else (data_path if kind == "tokens" else None)
    manifest = data_path if kind == "manifest" else None
    if manifest is not None and tokenizer is None:
        raise UsageError("clips need --tokenizer to be evaluated")
    if manifest is None and transformer is None:
        raise UsageError("--data holds token shards: give --transformer DIR to evaluate them, or a manifest")
    return manifest, tokens_dir


def _nll_tasks(args: argparse.Namespace, transformer) -> list[str]:
    """The tasks of ``--nll-tasks`` (checked against the task table when a transformer is evaluated)."""

    requested = [t.strip() for t in args.nll_tasks.split(",") if t.strip()]
    unknown = [t for t in requested if t not in TASK_NAMES]
    if transformer is not None and unknown:
        raise UsageError(f"--nll-tasks: unknown task '{unknown[0]}'; expected some of {', '.join(TASK_NAMES)}")
    return requested


def _clip_evaluations(args: argparse.Namespace, tokenizer, transformer, on_the_fly: bool,
                      nll_tasks: Sequence[str]) -> ClipResults:
    """The evaluations one pass over the clips runs: the tokenizer's, and with a transformer frame prediction and
    (without ``--tokens``) the masked tokens of the clips' own codes."""
    results = ClipResults(TokenizerEvaluation(tokenizer, torch.device(args.device), num_samples=args.num_samples))
    if transformer is None:
        return results
    num_frames, num_tokens = tokenizer.config.num_frames, math.prod(transformer.config.token_grid)
    if not 1 <= args.cond_frames < num_frames:
        raise UsageError(f"--cond-frames must be in [1, {num_frames}), got {args.cond_frames}")
    settings = decoding(args, transformer)
    if settings["steps"] > num_tokens:  # each step reveals at least one token
        raise UsageError(f"--steps must be in [1, {num_tokens}] (the tokens of one clip), got {settings['steps']}")
    results.frame_prediction = FramePredictionEvaluation(tokenizer, transformer, args.cond_frames, settings["steps"],
                                                         settings["temperature"], settings["guidance_scale"],
                                                         args.seed, num_samples=args.num_samples,
                                                         choice_temperature=settings["choice_temperature"])
    warn_untrained_cond_frames(transformer, args.cond_frames)
    if on_the_fly and _is_masked(transformer):  # the clips' codes + their frame-prediction condition
        regions = clip_condition_regions(tokenizer, transformer, args.cond_frames) \
            if transformer.config.conditioning == "interior" else None
        results.masked_tokens = MaskedTokenEvaluation(transformer, supported_tasks(nll_tasks, ["frame_prediction"]),
                                                      args.seed, regions)
    return results


def decoding(args: argparse.Namespace, transformer) -> dict[str, float]:
    """Each decoding flag given, else the masked transformer export's recorded decoding, else the default."""
    try:
        return decoding_settings(transformer, {k: getattr(args, k) for k in DECODING_DEFAULTS})
    except ValueError as err:  # an untrusted export's record
        raise UsageError(str(err)) from None


def record_decoding(args: argparse.Namespace, transformer) -> dict[str, float]:
    """Write the decoding this evaluation used into ``--transformer``'s config.json (``--record-decoding``)."""
    if not _is_masked(transformer):
        raise UsageError("--record-decoding: only a masked transformer export records its decoding")
    settings = decoding(args, transformer)
    try:
        write_record(args.transformer, "decoding", settings)
    except (OSError, ValueError) as err:
        raise UsageError(f"--record-decoding: {err}") from None
    return settings


def _is_masked(transformer) -> bool:
    """A masked prior: the one with a masked-token NLL (an autoregressive prior is scored by frame prediction)."""

    return isinstance(transformer, MaskedVideoTransformer)


def _warn_held_out(tokens_dir: Path | None, evaluated: list[str] | None, earlier: Sequence[str] = ()) -> list[str]:
    """The report's ``warnings`` (each also one line on stderr, now): ``earlier`` ones, then token shards that hold
    the evaluated clips, or that come from a training split (see ``held_out_warnings``)."""
    warnings = list(earlier) + (held_out_warnings(tokens_dir, evaluated) if tokens_dir is not None else [])
    for warning in warnings:
        print(f"{PROG}: warning: {warning}", file=sys.stderr)
    return warnings


def reuse_freed_memory(mmap_threshold: int = 256 << 20, trim_threshold: int = 512 << 20) -> bool:
    """Have glibc's allocator keep freed blocks below ``mmap_threshold`` bytes for reuse; returns whether it took
    the setting (``False`` without glibc: nothing changed).

    By default glibc serves a block above its mmap threshold (adaptive, at most 32 MiB) with a fresh mapping and
    unmaps it when it is freed, so the activations of every batch of clips are page-faulted in anew: at 8 Moving
    MNIST clips a batch the kernel's page-fault work was a quarter of evaluate's CPU time, and it grows with the
    batch. With the blocks kept, the same memory serves every batch; up to ``trim_threshold`` bytes of free memory
    at the top of the heap stay with the process until it exits."""
    try:
        glibc = os.confstr("CS_GNU_LIBC_VERSION")
    except (AttributeError, ValueError, OSError):  # not a POSIX system, or not glibc
        glibc = None
    if not glibc:
        return False
    import ctypes

    m_trim_threshold, m_mmap_threshold = -1, -3  # glibc's malloc.h
    try:
        libc = ctypes.CDLL(None)  # the process's own C library
        return bool(libc.mallopt(m_mmap_threshold, mmap_threshold) and libc.mallopt(m_trim_threshold, trim_threshold))
    except (OSError, AttributeError):
        return False


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Evaluate as the command line says; returns the report (also written to ``OUT/report.json``)."""
    _check_args(args)
    reuse_freed_memory()  # batches of clips through the tokenizer: no page faults per batch
    progress = not args.no_progress
    device = torch.device(args.device)
    out = Path(args.out)  # checked writable by _check_args
    torch.manual_seed(args.seed)
    started = time.time()
    tokenizer, transformer = load_models(args.tokenizer, args.transformer, device)
    report: dict[str, Any] = {"inputs": {k: v for k, v in vars(args).items() if k != "no_progress"}}
    manifest, tokens_dir = _data_sources(args, out, tokenizer, transformer)
    extractor = None
    if args.i3d:
        try:
            extractor = metrics.load_feature_extractor(args.i3d, device)
        except (FileNotFoundError, ValueError) as err:
            raise UsageError(f"--i3d: {err}") from None
    nll_tasks = _nll_tasks(args, transformer)

    clips = masked = dataset = None
    if manifest is not None:
        dataset = open_clips(manifest, args.split, tokenizer.config.num_frames, tokenizer.config.image_size)
    unrecorded: list[str] = []
    if transformer is not None and tokens_dir is not None:  # shards of other models: one error, before any warning
        meta = check_token_meta(Path(tokens_dir), tokenizer, transformer)
        if tokenizer is not None:
            unrecorded = check_tokenizer_weights(Path(tokens_dir), meta,
                                                 weights_fingerprint(resolve_pretrained(args.tokenizer)))
    report["warnings"] = _warn_held_out(tokens_dir if transformer is not None else None,
                                        None if dataset is None else evaluated_videos(dataset, args.max_clips),
                                        unrecorded)
    if dataset is not None:
        clips = _clip_evaluations(args, tokenizer, transformer, tokens_dir is None, nll_tasks)
        batches = iterate_clips(dataset, args.max_clips, args.batch_size, progress, clips.lost)
        report.update(evaluate_clips(batches, clips, args.cond_frames, keep_videos=extractor is not None).report())
        masked = clips.masked_tokens
    if _is_masked(transformer) and tokens_dir is not None:
        masked = evaluate_token_shards(tokens_dir, tokenizer, transformer, nll_tasks, args.batch_size,
                                       args.max_clips, args.seed, progress)
    if masked is not None:
        report["masked_tokens"] = {**masked.summary(),
                                   "source": str(tokens_dir) if tokens_dir else "clips tokenized on the fly"}
    report["fvd"] = fvd_report(extractor, clips, args.batch_size)
    report["plots"] = write_plots(out, report, [Path(d) for d in args.run_dir],
                                  clips.sample_rows() if clips is not None else [])
    if args.record_decoding:
        report["recorded_decoding"] = record_decoding(args, transformer)
    report["seconds"] = round(time.time() - started, 2)
    report["report"] = str(out / "report.json")
    write_report(out / "report.json", report)
    return report


def _main(argv: Sequence[str] | None) -> int:
    report = run(build_parser().parse_args(argv))
    print("\n".join(summary_lines(report)))
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m magvit.evaluate`` / ``magvit-evaluate``: user errors are one line and exit status 2."""
    return run_main(PROG, _main, argv)


if __name__ == "__main__":
    sys.exit(main())
