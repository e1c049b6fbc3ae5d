"""``python -m magvit.evaluate``: tokenizer and transformer metrics on held-out clips, with a report and plots.

Tokenizer: PSNR and SSIM of the reconstructions (per frame, averaged), codebook usage and perplexity over the
dataset, bits per pixel of the codes (fixed-length and entropy-coded). Transformer (``--transformer``): masked-token
negative log-likelihood and accuracy on held-out tokens (``--tokens`` shards, or the clips tokenized on the fly), and
frame prediction: PSNR / SSIM of the generated future frames against the real ones, next to copying the last
conditioning frame. FVD with a local I3D TorchScript file (``--i3d``). Writes ``report.json`` and PNG plots.

    python -m magvit.evaluate --tokenizer runs/demo/tokenizer/export --transformer runs/demo/transformer/export \\
        --data data/sample/manifest.jsonl --out runs/demo/eval --run-dir runs/demo/tokenizer
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from pathlib import Path
from typing import Any, Iterable, Iterator, Sequence

import torch

from . import metrics
from .cli import ArgumentParser, UsageError, command_name, run_main
from .fileio import check_writable_dir, write_text_atomic
from .pretrained import is_hub_id

PROG = command_name("python -m magvit.evaluate")
MANIFEST_NAME = "manifest.jsonl"


# --------------------------------------------------------------------------------------------------------------------
# Inputs
# --------------------------------------------------------------------------------------------------------------------
def resolve_data(path: str | os.PathLike, scratch: Path) -> tuple[str, Path]:
    """Classify ``--data``: ``("manifest", file)`` or ``("tokens", folder)``.

    Accepts a manifest file, a folder holding ``manifest.jsonl``, a folder of token shards (``meta.json``), or a
    folder of videos (indexed into ``scratch/clips_manifest.jsonl`` with every video in the ``val`` split).
    """
    path = Path(path)
    if path.is_file():
        return "manifest", path
    if not path.is_dir():
        raise UsageError(f"--data: no such file or folder: {path}")
    if (path / MANIFEST_NAME).is_file():
        return "manifest", path / MANIFEST_NAME
    meta = path / "meta.json"
    if meta.is_file():
        try:
            is_tokens = "token_grid" in json.loads(meta.read_text())
        except json.JSONDecodeError as err:
            raise UsageError(f"--data: {meta} is not valid JSON ({err})") from None
        if is_tokens:
            return "tokens", path
        raise UsageError(f"--data: {path} holds clip shards; give the manifest they were extracted from")
    # A plain folder of videos: index it (all clips held out, since nothing here was trained on them).
    from .prep.index import build_manifest

    out = scratch / "clips_manifest.jsonl"  # beside the report, never over a manifest of the user's
    try:
        summary = build_manifest([path], out, val_fraction=0.0, labels=False, show_progress=False)
    except UsageError as err:
        raise UsageError(f"--data: {err}") from None
    if not summary["videos"]:
        raise UsageError(f"--data: no readable video in {path}")
    records = [json.loads(line) for line in out.read_text().splitlines() if line.strip()]
    out.write_text("".join(json.dumps({**r, "split": "val"}) + "\n" for r in records))
    return "manifest", out


def load_models(tokenizer_dir: str | None, transformer_dir: str | None, device: torch.device):
    """Load the tokenizer and (optionally) the transformer; check that they belong together."""
    from .tokenizer import VideoTokenizer
    from .transformer import MaskedVideoTransformer

    tokenizer = transformer = None
    try:
        if tokenizer_dir is not None:
            tokenizer = VideoTokenizer.from_pretrained(tokenizer_dir, device=device)
        if transformer_dir is not None:
            transformer = MaskedVideoTransformer.from_pretrained(transformer_dir, device=device)
    except (FileNotFoundError, ValueError) as err:
        raise UsageError(f"cannot load a model: {err}") from None
    if tokenizer is not None and transformer is not None:
        tc, xc = tokenizer.config, transformer.config
        grid = tuple(tc.token_grid(tc.num_frames, tc.image_size, tc.image_size))
        if tc.codebook_size != xc.codebook_size or grid != tuple(xc.token_grid):
            raise UsageError(
                f"tokenizer (codebook {tc.codebook_size}, token grid {grid}) and transformer (codebook "
                f"{xc.codebook_size}, token grid {tuple(xc.token_grid)}) do not belong together"
            )
    return tokenizer, transformer


def iterate_clips(manifest: Path, split: str, num_frames: int, image_size: int, max_clips: int | None,
                  batch_size: int, progress: bool, lost: dict[str, list] | None = None) -> Iterator[torch.Tensor]:
    """Held-out clips ``(B, 3, T, H, W)`` in [-1, 1] (centred crops, evenly spaced starts).

    Unreadable files are skipped and listed in ``lost``: ``"unreadable"`` gets ``(path, reason)`` of each clip that
    failed to decode (a damaged file, or one shorter than the manifest says), ``"skipped"`` each video left out
    before decoding (missing, too short).
    """
    from torch.utils.data import DataLoader, Subset

    from .data import ClipDataset, collate_skip_none

    lost = {} if lost is None else lost
    try:
        dataset = ClipDataset(manifest, split=split, num_frames=num_frames, image_size=image_size, on_error="skip")
    except (FileNotFoundError, ValueError) as err:
        raise UsageError(f"--data: {err}") from None
    lost.setdefault("skipped", []).extend({"path": path, "reason": reason} for path, reason in dataset.skipped)
    if len(dataset) == 0:
        raise UsageError(f"--data: no usable '{split}' clip of {num_frames} frames in {manifest}"
                            + (" (try --split all)" if split != "all" else ""))
    clips = dataset
    if max_clips is not None:
        dataset = Subset(dataset, range(min(max_clips, len(dataset))))
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=False, collate_fn=collate_skip_none)  # in-process
    from tqdm.auto import tqdm

    with tqdm(total=len(dataset), desc="clips", unit="clip", disable=not progress, file=sys.stderr,
              dynamic_ncols=True) as bar:
        for batch in loader:
            if batch is not None:
                bar.update(batch["video"].shape[0])
                yield batch["video"]
    lost.setdefault("unreadable", []).extend(
        {"path": path, "clips": count, "reason": clips.failure_reasons.get(path, "")}
        for path, count in sorted(clips.failures.items()))


# --------------------------------------------------------------------------------------------------------------------
# Tokenizer
# --------------------------------------------------------------------------------------------------------------------
class TokenizerEvaluation:
    """Accumulates reconstruction quality and code statistics over batches of clips."""

    def __init__(self, tokenizer, device: torch.device, num_samples: int = 1):
        self.tokenizer = tokenizer
        self.device = device
        self.usage = metrics.CodebookUsage(tokenizer.config.codebook_size)
        self.psnr: list[float] = []
        self.ssim: list[float] = []
        self.grid: tuple[int, int, int] | None = None
        self.video_size: tuple[int, int, int] | None = None
        self.num_samples = num_samples
        self.samples: list[tuple[torch.Tensor, torch.Tensor]] = []  # (real, reconstruction), each (3, T, H, W)

    @torch.no_grad()
    def update(self, video: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Reconstruct a batch ``(B, 3, T, H, W)``; returns ``(codes (B, t, h, w), reconstruction)``."""
        video = video.to(self.device)
        codes = self.tokenizer.encode(video)  # (B, t, h, w)
        recon = self.tokenizer.decode(codes).clamp(-1, 1).float()  # (B, 3, T, H, W)
        self.usage.update(codes)
        self.psnr += metrics.video_psnr(recon.cpu(), video.cpu()).tolist()
        self.ssim += metrics.video_ssim(recon.cpu(), video.cpu()).tolist()
        self.grid = tuple(codes.shape[1:])
        self.video_size = tuple(video.shape[2:])
        for i in range(min(video.shape[0], self.num_samples - len(self.samples))):
            self.samples.append((video[i].cpu(), recon[i].cpu()))
        return codes, recon

    def summary(self) -> dict[str, Any]:
        if not self.psnr:
            raise UsageError("no clip could be read: nothing to evaluate")
        tokens, pixels = math.prod(self.grid), math.prod(self.video_size)
        return {
            "num_clips": len(self.psnr),
            "psnr": _mean_finite(self.psnr),
            "ssim": sum(self.ssim) / len(self.ssim),
            "token_grid": list(self.grid),
            "clip_size": list(self.video_size),
            **{f"codebook_{k}" if not k.startswith("codebook") else k: v for k, v in self.usage.summary().items()},
            "bits_per_pixel": metrics.bits_per_pixel(self.usage.codebook_size, self.grid, self.video_size),
            "bits_per_pixel_entropy_coded": self.usage.bits_per_pixel(tokens, pixels),
            "per_clip": {"psnr": self.psnr, "ssim": self.ssim},
        }


def _mean_finite(values: Sequence[float]) -> float:
    # A perfect reconstruction has infinite PSNR; JSON cannot hold inf, and one such clip would hide the rest.
    finite = [v for v in values if math.isfinite(v)]
    return sum(finite) / len(finite) if finite else float("inf")


# --------------------------------------------------------------------------------------------------------------------
# Transformer
# --------------------------------------------------------------------------------------------------------------------
class MaskedTokenEvaluation:
    """Masked-token NLL (nats) and accuracy per task, on a fixed random masking (seeded) of held-out token grids."""

    def __init__(self, transformer, tasks: Sequence[str], seed: int = 0):
        self.transformer = transformer
        self.tasks = list(tasks)
        self.generator = torch.Generator().manual_seed(seed)
        self.nll = {t: 0.0 for t in self.tasks}
        self.correct = {t: 0 for t in self.tasks}
        self.count = {t: 0 for t in self.tasks}

    @torch.no_grad()
    def update(self, batch: dict[str, torch.Tensor]) -> None:
        """``batch``: collated token items ``{"codes": (B, t, h, w), "cond.<task>": ..., "label": (B,)}``."""
        from .masking import NO_LABEL, code_nll, make_training_batch, predicted_codes

        config = self.transformer.config
        device = next(self.transformer.parameters()).device
        labels = torch.as_tensor(batch.get("label", NO_LABEL)).long().reshape(-1).expand(batch["codes"].shape[0])
        # Labels the model has no class token for are evaluated as unlabelled.
        labels = torch.where((labels >= 0) & (labels < config.num_classes), labels, torch.full_like(labels, NO_LABEL))
        batch = {**batch, "label": labels}
        for task in self.tasks:
            rows = batch
            if task == "class":  # only the examples with a class the model knows
                keep = labels >= 0
                if not bool(keep.any()):
                    continue
                rows = {k: (v[keep] if isinstance(v, torch.Tensor) and v.dim() > 0 else v) for k, v in batch.items()}
            tb = make_training_batch(rows, config.vocab, tasks=[task], cond_dropout_prob=0.0, unmasked_weight=0.0,
                                     schedule="cosine", generator=self.generator)
            logits = self.transformer(tb.input_ids.to(device)).float().cpu()  # (B, L, V) or factorised (B, L, F, S)
            scored = tb.loss_mask > 0  # (B, L): the masked video positions
            target = tb.labels[scored]  # (M,)
            picked = logits[scored]  # (M, V) or (M, F, S)
            # per whole code: a factorised model's sub-token NLLs summed, comparable with a flat model's
            self.nll[task] += float(code_nll(picked, target, config.codebook_size).sum())
            self.correct[task] += int((predicted_codes(picked, config.codebook_size) == target).sum())
            self.count[task] += int(target.numel())

    def summary(self) -> dict[str, Any]:
        per_task = {}
        for t in self.tasks:
            if self.count[t] == 0:  # e.g. "class" without labelled examples
                continue
            n = self.count[t]
            per_task[t] = {"nll": self.nll[t] / n, "accuracy": self.correct[t] / n, "masked_tokens": self.count[t]}
        total = max(sum(self.count.values()), 1)
        nll = sum(self.nll.values()) / total
        return {
            "masked_token_nll": nll,
            "masked_token_perplexity": math.exp(min(nll, 700.0)),
            "masked_token_accuracy": sum(self.correct.values()) / total,
            "masked_tokens": sum(self.count.values()),
            "per_task": per_task,
        }


class FramePredictionEvaluation:
    """Frame prediction from the first ``num_cond_frames`` frames: generated vs real future frames, next to copying
    the last conditioning frame (the baseline) and the tokenizer's own reconstruction (an upper bound)."""

    def __init__(self, tokenizer, transformer, num_cond_frames: int = 1, steps: int = 12, temperature: float = 1.0,
                 guidance_scale: float = 0.0, seed: int = 0, num_samples: int = 1):
        self.tokenizer, self.transformer = tokenizer, transformer
        self.num_cond_frames = num_cond_frames
        self.steps, self.temperature, self.guidance_scale, self.seed = steps, temperature, guidance_scale, seed
        self.scores: dict[str, dict[str, list[float]]] = {
            name: {"psnr": [], "ssim": []} for name in ("generated", "copy_baseline", "reconstruction")
        }
        self.num_samples = num_samples
        self.samples: list[torch.Tensor] = []  # generated (3, T, H, W)
        self.generated: list[torch.Tensor] = []  # for FVD, (3, T, H, W) each

    @torch.no_grad()
    def update(self, video: torch.Tensor, reconstruction: torch.Tensor, keep_for_fvd: bool = False) -> None:
        from .generate import condition_video, generate_codes
        from .masking import build_condition_video

        device = next(self.transformer.parameters()).device
        n = self.num_cond_frames
        future = slice(n, None)  # frames to predict
        for i in range(video.shape[0]):
            clip = video[i].to(device)  # (3, T, H, W)
            cond = condition_video("frame_prediction", clip, clip.shape[1], num_cond_frames=n)
            prefix = self.tokenizer.encode(cond.unsqueeze(0))  # (1, t, h, w)
            codes = generate_codes(self.transformer, "frame_prediction", prefix, steps=self.steps,
                                   temperature=self.temperature, guidance_scale=self.guidance_scale,
                                   seed=self.seed + len(self.scores["generated"]["psnr"]))
            generated = self.tokenizer.decode(codes).clamp(-1, 1).float().cpu()  # (1, 3, T, H, W)
            real = clip.unsqueeze(0).cpu()
            baseline = build_condition_video(real, "frame_prediction", num_cond_frames=n)
            for name, pred in (("generated", generated), ("copy_baseline", baseline),
                               ("reconstruction", reconstruction[i : i + 1].cpu())):
                self.scores[name]["psnr"].append(float(metrics.video_psnr(pred[:, :, future], real[:, :, future])))
                self.scores[name]["ssim"].append(float(metrics.video_ssim(pred[:, :, future], real[:, :, future])))
            if len(self.samples) < self.num_samples:
                self.samples.append(generated[0])
            if keep_for_fvd:
                self.generated.append(generated[0])

    def summary(self) -> dict[str, Any]:
        out: dict[str, Any] = {"num_cond_frames": self.num_cond_frames, "steps": self.steps,
                               "num_clips": len(self.scores["generated"]["psnr"])}
        for name, s in self.scores.items():
            out[name] = {"psnr": _mean_finite(s["psnr"]), "ssim": sum(s["ssim"]) / max(len(s["ssim"]), 1),
                         "per_clip": s}
        return out


def check_token_meta(directory: Path, tokenizer, transformer) -> None:
    """``UsageError`` unless the shards' ``meta.json`` says they hold codes of this tokenizer / transformer's
    codebook and grid: codes of another codebook score a meaningless NLL without any other sign."""
    try:
        meta = json.loads((directory / "meta.json").read_text())
        codebook, grid = int(meta["codebook_size"]), tuple(int(n) for n in meta["token_grid"])
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise UsageError(f"--tokens: {directory}/meta.json is missing or lacks codebook_size / token_grid "
                            f"({type(err).__name__})") from None
    expected = [("transformer", transformer.config.codebook_size, tuple(transformer.config.token_grid))]
    if tokenizer is not None:
        tc = tokenizer.config
        expected.append(("tokenizer", tc.codebook_size, tuple(tc.token_grid(tc.num_frames, tc.image_size,
                                                                             tc.image_size))))
        made_by, current = meta.get("tokenizer"), tc.to_dict()
        differ = [k for k in made_by if k in current and made_by[k] != current[k]] if isinstance(made_by, dict) else []
        if differ:  # keys only one side has: options added in another version, not a different tokenizer
            raise UsageError(f"--tokens: {directory} was made by another tokenizer than --tokenizer ({differ[0]} "
                                f"{made_by[differ[0]]!r} in meta.json, {current[differ[0]]!r} in the tokenizer)")
    for name, model_codebook, model_grid in expected:
        if (codebook, grid) != (model_codebook, model_grid):
            raise UsageError(f"--tokens: {directory} holds codes of a {codebook}-code book on a {grid} grid "
                                f"(meta.json), the {name} has {model_codebook} codes on {model_grid}")


def token_batches_from_shards(directory: Path, batch_size: int, max_examples: int | None) -> Iterator[dict]:
    from torch.utils.data import DataLoader, Subset

    from .data import TokenShardDataset

    try:
        dataset = TokenShardDataset(directory)
    except (FileNotFoundError, ValueError, KeyError) as err:
        raise UsageError(f"token shards at {directory}: {err}") from None
    if max_examples is not None:
        dataset = Subset(dataset, range(min(max_examples, len(dataset))))
    yield from DataLoader(dataset, batch_size=batch_size, shuffle=False)


# --------------------------------------------------------------------------------------------------------------------
# Plots
# --------------------------------------------------------------------------------------------------------------------
def _pyplot():
    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    return plt


def read_metrics_jsonl(path: Path) -> list[dict[str, Any]]:
    """Records of a ``metrics.jsonl`` (a torn last line from a killed run is ignored)."""
    records = []
    for line in path.read_text().splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(record, dict):
            records.append(record)
    return records


def plot_training_curves(run_dirs: Sequence[Path], path: Path, max_panels: int = 12) -> Path | None:
    """One panel per logged scalar of each run's ``metrics.jsonl`` against ``step``; ``None`` if nothing to plot."""
    series: dict[str, tuple[list[float], list[float]]] = {}
    for run_dir in run_dirs:
        prefix = f"{run_dir.name}/" if len(run_dirs) > 1 else ""
        for i, record in enumerate(read_metrics_jsonl(run_dir / "metrics.jsonl")):
            step = record.get("step", i)
            for key, value in record.items():
                if key in ("step", "time") or isinstance(value, bool) or not isinstance(value, (int, float)):
                    continue
                if math.isfinite(value):
                    xs, ys = series.setdefault(prefix + key, ([], []))
                    xs.append(step)
                    ys.append(value)
    if not series:
        return None
    # Quality and loss curves first, then the rest (learning rate, usage, ...), alphabetically within each group.
    important = ("loss", "psnr", "ssim", "nll", "acc", "fvd")
    names = sorted(series, key=lambda k: (not any(w in k.lower() for w in important), k))[:max_panels]
    plt = _pyplot()
    cols = min(3, len(names))
    rows = math.ceil(len(names) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 3.0 * rows), squeeze=False)
    for ax, name in zip(axes.flat, names):
        xs, ys = series[name]
        ax.plot(xs, ys, marker="." if len(xs) < 30 else None, linewidth=1.2)
        ax.set_title(name, fontsize=9)
        ax.set_xlabel("step", fontsize=8)
        ax.tick_params(labelsize=7)
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(names):]:
        ax.axis("off")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_per_clip(report: dict[str, Any], path: Path) -> Path | None:
    """Bars of per-clip PSNR: reconstruction, and (with a transformer) generated vs copy baseline."""
    bars: dict[str, list[float]] = {}
    if "tokenizer" in report:
        bars["reconstruction"] = report["tokenizer"]["per_clip"]["psnr"]
    fp = report.get("frame_prediction")
    if fp:
        bars["generated (future frames)"] = fp["generated"]["per_clip"]["psnr"]
        bars["copy last frame (future frames)"] = fp["copy_baseline"]["per_clip"]["psnr"]
    if not bars:
        return None
    plt = _pyplot()
    n = max(len(v) for v in bars.values())
    width = 0.8 / len(bars)
    fig, ax = plt.subplots(figsize=(max(6.0, 0.5 * n * len(bars) + 2), 3.8))
    for j, (name, values) in enumerate(bars.items()):
        shown = [v if math.isfinite(v) else 100.0 for v in values]  # inf (exact) drawn as 100 dB
        ax.bar([i + j * width for i in range(len(values))], shown, width=width, label=name)
    ax.set_xticks([i + width * (len(bars) - 1) / 2 for i in range(n)], [str(i) for i in range(n)], fontsize=7)
    ax.set_xlabel("clip")
    ax.set_ylabel("PSNR (dB)")
    ax.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.18), ncol=len(bars), frameon=False)
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_sample_strip(rows: Sequence[tuple[str, torch.Tensor]], path: Path, max_frames: int = 8) -> Path:
    """A strip of frames, one labelled row per video (e.g. real | reconstructed | generated), ``(3, T, H, W)`` each."""
    from .video_io import frame_grid

    num_frames = rows[0][1].shape[1]
    keep = sorted({round(i * (num_frames - 1) / max(max_frames - 1, 1)) for i in range(min(max_frames, num_frames))})
    videos = [video[:, keep] for _, video in rows]
    pad = 2
    grid = frame_grid(videos, pad=pad).numpy()  # (H', W', 3) uint8
    plt = _pyplot()
    height = videos[0].shape[2]
    fig, ax = plt.subplots(figsize=(max(4.0, grid.shape[1] / 60 + 1.5), grid.shape[0] / 60 + 0.6))
    ax.imshow(grid, interpolation="nearest")
    ax.set_yticks([pad + r * (height + pad) + height / 2 for r in range(len(rows))], [name for name, _ in rows],
                  fontsize=8)
    ax.set_xticks([pad + c * (videos[0].shape[3] + pad) + videos[0].shape[3] / 2 for c in range(len(keep))],
                  [str(k) for k in keep], fontsize=7)
    ax.set_xlabel("frame", fontsize=8)
    for side in ax.spines.values():
        side.set_visible(False)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


# --------------------------------------------------------------------------------------------------------------------
# Report
# --------------------------------------------------------------------------------------------------------------------
def _jsonable(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None if math.isnan(value) else ("inf" if value > 0 else "-inf")
    if isinstance(value, dict):
        return {k: _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    return value


def write_report(path: Path, report: dict[str, Any]) -> Path:
    """Write ``report.json`` atomically (inf as the string ``"inf"``: JSON has no infinity)."""
    return write_text_atomic(path, json.dumps(_jsonable(report), indent=2) + "\n")


def compute_fvd(extractor, real: list[torch.Tensor], fake: list[torch.Tensor], batch_size: int) -> float:
    batches = lambda videos: (torch.stack(videos[i : i + batch_size]) for i in range(0, len(videos), batch_size))
    return metrics.frechet_video_distance(extractor, batches(real), batches(fake))


# --------------------------------------------------------------------------------------------------------------------
# CLI
# --------------------------------------------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    p = ArgumentParser(
        prog=PROG,
        description="Evaluate a video tokenizer (and a masked transformer) on held-out clips; writes report.json "
                    "and PNG plots.",
    )
    p.add_argument("--tokenizer", metavar="DIR", help="save_pretrained folder of the VideoTokenizer (e.g. RUN/export) "
                   "or its Hub id (org/name)")
    p.add_argument("--transformer", metavar="DIR", help="save_pretrained folder of the MaskedVideoTransformer or its "
                   "Hub id")
    p.add_argument("--data", metavar="MANIFEST_OR_FOLDER",
                   help="manifest.jsonl, a folder holding one, a folder of videos, or a folder of token shards")
    p.add_argument("--tokens", metavar="DIR", help="held-out token shards for the masked-token NLL "
                                                   "(default: tokenize the clips of --data on the fly)")
    p.add_argument("--out", metavar="DIR", default="runs/eval", help="report folder (default: %(default)s)")
    p.add_argument("--split", default="val", choices=("train", "val", "all"),
                   help="manifest split to evaluate (default: %(default)s)")
    p.add_argument("--max-clips", type=int, metavar="N", help="evaluate at most N clips (and N token grids)")
    p.add_argument("--batch-size", type=int, default=4, help="clips per tokenizer batch (default: %(default)s)")
    p.add_argument("--run-dir", metavar="RUN_DIR", action="append", default=[],
                   help="training run folder whose metrics.jsonl is plotted (repeatable)")
    p.add_argument("--i3d", metavar="PATH", help="local I3D TorchScript file (i3d_torchscript.pt) for FVD")
    p.add_argument("--cond-frames", type=int, default=1, help="frames given for frame prediction (default: 1)")
    p.add_argument("--steps", type=int, default=12, help="parallel decoding steps (default: %(default)s)")
    p.add_argument("--temperature", type=float, default=1.0, help="sampling temperature (default: %(default)s)")
    p.add_argument("--guidance-scale", type=float, default=0.0, help="classifier-free guidance (default: 0)")
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
    for name in ("temperature", "guidance_scale"):  # NaN passes every comparison
        value = getattr(args, name)
        if not math.isfinite(value) or (name == "temperature" and value < 0):
            raise UsageError(f"--{name.replace('_', '-')} must be a finite number"
                                f"{' >= 0' if name == 'temperature' else ''}, got {value}")
    try:
        check_writable_dir(args.out)  # now, not after every clip has been evaluated
    except ValueError as err:
        raise UsageError(f"--out: {err}") from None
    try:
        torch.device(args.device)
    except RuntimeError:
        raise UsageError(f"--device: unknown device '{args.device}'") from None


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Evaluate as the command line says; returns the report (also written to ``OUT/report.json``)."""
    _check_args(args)
    progress = not args.no_progress
    device = torch.device(args.device)
    out = Path(args.out)  # checked writable by _check_args
    torch.manual_seed(args.seed)
    started = time.time()
    tokenizer, transformer = load_models(args.tokenizer, args.transformer, device)
    report: dict[str, Any] = {"inputs": {k: v for k, v in vars(args).items() if k != "no_progress"}}

    kind, data_path = ("tokens", Path(args.tokens)) if args.data is None else resolve_data(args.data, out)
    tokens_dir = Path(args.tokens) if args.tokens else (data_path if kind == "tokens" else None)
    manifest = data_path if kind == "manifest" else None
    if manifest is not None and tokenizer is None:
        raise UsageError("clips need --tokenizer to be evaluated")
    if manifest is None and transformer is None:
        raise UsageError("--data holds token shards: give --transformer DIR to evaluate them, or a manifest")

    extractor = None
    if args.i3d:
        try:
            extractor = metrics.load_feature_extractor(args.i3d, device)
        except (FileNotFoundError, ValueError) as err:
            raise UsageError(f"--i3d: {err}") from None

    nll_tasks = [t.strip() for t in args.nll_tasks.split(",") if t.strip()]
    masked_eval = None
    if transformer is not None:
        from .masking import TASKS

        unknown = [t for t in nll_tasks if t not in TASKS]
        if unknown:
            raise UsageError(f"--nll-tasks: unknown task '{unknown[0]}'; expected some of {', '.join(TASKS)}")

    # --- clips: tokenizer metrics, on-the-fly tokens, frame prediction ---------------------------------------------
    tok_eval = frame_eval = None
    real_videos: list[torch.Tensor] = []
    recon_videos: list[torch.Tensor] = []
    if manifest is not None:
        cfg = tokenizer.config
        tok_eval = TokenizerEvaluation(tokenizer, device, num_samples=args.num_samples)
        if transformer is not None:
            if not 1 <= args.cond_frames < cfg.num_frames:
                raise UsageError(f"--cond-frames must be in [1, {cfg.num_frames}), got {args.cond_frames}")
            num_tokens = math.prod(transformer.config.token_grid)
            if args.steps > num_tokens:  # each step reveals at least one token
                raise UsageError(f"--steps must be in [1, {num_tokens}] (the tokens of one clip), got {args.steps}")
            frame_eval = FramePredictionEvaluation(tokenizer, transformer, args.cond_frames, args.steps,
                                                   args.temperature, args.guidance_scale, args.seed,
                                                   num_samples=args.num_samples)
            if tokens_dir is None:  # tokenize on the fly: codes + the frame-prediction condition
                masked_eval = MaskedTokenEvaluation(transformer, _supported(nll_tasks, ["frame_prediction"]),
                                                    args.seed)
        lost: dict[str, list] = {}
        for video in iterate_clips(manifest, args.split, cfg.num_frames, cfg.image_size, args.max_clips,
                                   args.batch_size, progress, lost):
            codes, recon = tok_eval.update(video)
            if extractor is not None:
                real_videos += list(video.cpu())
                recon_videos += list(recon.cpu())
            if masked_eval is not None:
                from .masking import build_condition_video

                cond = tokenizer.encode(build_condition_video(video.to(device), "frame_prediction",
                                                              num_cond_frames=args.cond_frames))
                masked_eval.update({"codes": codes.cpu(), "cond.frame_prediction": cond.cpu(),
                                    "label": torch.full((codes.shape[0],), -1)})
            if frame_eval is not None:
                frame_eval.update(video, recon, keep_for_fvd=extractor is not None)
        unreadable = lost.get("unreadable", [])
        if not tok_eval.psnr:
            raise UsageError(f"no clip could be read: {len(unreadable)} unreadable"
                                + (f", e.g. {unreadable[0]['path']}: {unreadable[0]['reason']}" if unreadable else ""))
        report["tokenizer"] = {**tok_eval.summary(), "unreadable_clips": sum(u["clips"] for u in unreadable),
                               "skipped_videos": len(lost.get("skipped", []))}
        report["data_problems"] = {"unreadable": unreadable, "skipped": lost.get("skipped", [])}
        if frame_eval is not None:
            report["frame_prediction"] = frame_eval.summary()

    # --- held-out token shards --------------------------------------------------------------------------------------
    if transformer is not None and tokens_dir is not None:
        check_token_meta(tokens_dir, tokenizer, transformer)
        batches = token_batches_from_shards(tokens_dir, args.batch_size, args.max_clips)
        first = next(batches, None)
        if first is None:
            raise UsageError(f"--tokens: no token grid in {tokens_dir}")
        available = [k[len("cond."):] for k in first if k.startswith("cond.")]
        if "sketch_codes" in first:
            available.append("sketch")
        if tuple(first["codes"].shape[1:]) != tuple(transformer.config.token_grid):
            raise UsageError(f"--tokens: token grid {tuple(first['codes'].shape[1:])} does not match the "
                                f"transformer's {tuple(transformer.config.token_grid)}")
        masked_eval = MaskedTokenEvaluation(transformer, _supported(nll_tasks, available), args.seed)
        from tqdm.auto import tqdm

        for batch in tqdm(_chain([first], batches), desc="token grids", unit="batch", disable=not progress,
                          file=sys.stderr, dynamic_ncols=True):
            masked_eval.update(batch)
    if masked_eval is not None:
        report["masked_tokens"] = {**masked_eval.summary(),
                                   "source": str(tokens_dir) if tokens_dir else "clips tokenized on the fly"}

    # --- FVD -----------------------------------------------------------------------------------------------------------
    if extractor is None:
        report["fvd"] = {"skipped": "no --i3d file given: FVD needs a local I3D TorchScript (i3d_torchscript.pt)"}
    elif len(real_videos) < 2:
        report["fvd"] = {"skipped": f"FVD needs at least 2 clips, got {len(real_videos)}"}
    else:
        report["fvd"] = {"num_clips": len(real_videos),
                         "reconstruction": compute_fvd(extractor, real_videos, recon_videos, args.batch_size)}
        if frame_eval is not None and len(frame_eval.generated) >= 2:
            report["fvd"]["frame_prediction"] = compute_fvd(extractor, real_videos, frame_eval.generated,
                                                            args.batch_size)

    # --- plots -------------------------------------------------------------------------------------------------------
    plots = {}
    if args.run_dir:
        curve = plot_training_curves([Path(d) for d in args.run_dir], out / "curves.png")
        if curve is not None:
            plots["curves"] = str(curve)
    bars = plot_per_clip(report, out / "per_clip.png")
    if bars is not None:
        plots["per_clip"] = str(bars)
    if tok_eval is not None and tok_eval.samples:
        rows: list[tuple[str, torch.Tensor]] = []
        for i, (real, recon) in enumerate(tok_eval.samples):
            rows += [(f"real {i}", real), (f"reconstructed {i}", recon)]
            if frame_eval is not None and i < len(frame_eval.samples):
                rows.append((f"generated {i}", frame_eval.samples[i]))
        plots["samples"] = str(plot_sample_strip(rows, out / "samples.png"))
    report["plots"] = plots
    report["seconds"] = round(time.time() - started, 2)
    report["report"] = str(out / "report.json")
    write_report(out / "report.json", report)
    return report


def _supported(requested: Sequence[str], condition_tasks: Sequence[str]) -> list[str]:
    """The requested tasks whose condition the data holds (``sketch`` needs ``sketch_codes``; ``class`` is scored on
    the labelled examples only)."""
    from .masking import CONDITION_TASKS

    keep = [t for t in requested
            if (t in CONDITION_TASKS and t in condition_tasks) or t in ("unconditional", "class")
            or (t == "sketch" and "sketch" in condition_tasks)]
    if not keep:
        raise UsageError(f"--nll-tasks: none of {', '.join(requested)} can be evaluated on this data "
                            f"(condition tasks available: {', '.join(condition_tasks) or 'none'})")
    return keep


def _chain(*iterables: Iterable) -> Iterator:
    for it in iterables:
        yield from it


def print_summary(report: dict[str, Any]) -> None:
    lines = []
    tok = report.get("tokenizer")
    if tok:
        lines.append(f"tokenizer   {tok['num_clips']} clips  PSNR {tok['psnr']:.2f} dB  SSIM {tok['ssim']:.4f}  "
                     f"codebook usage {tok['codebook_usage']:.1%}  perplexity {tok['codebook_perplexity']:.1f}  "
                     f"bpp {tok['bits_per_pixel']:.4f} (entropy-coded {tok['bits_per_pixel_entropy_coded']:.4f})")
    lost = report.get("data_problems", {})
    if lost.get("unreadable") or lost.get("skipped"):
        first = (lost.get("unreadable") or lost.get("skipped"))[0]
        lines.append(f"data        {tok['unreadable_clips']} clips unreadable, {tok['skipped_videos']} videos skipped "
                     f"(e.g. {first['path']}: {first['reason']}); all listed in report.json under data_problems")
    mt = report.get("masked_tokens")
    if mt:
        lines.append(f"transformer masked-token NLL {mt['masked_token_nll']:.3f} nats  "
                     f"accuracy {mt['masked_token_accuracy']:.1%}  ({mt['masked_tokens']} tokens)")
    fp = report.get("frame_prediction")
    if fp:
        lines.append(f"frame prediction ({fp['num_cond_frames']} given, {fp['steps']} steps): "
                     f"generated PSNR {fp['generated']['psnr']:.2f} / SSIM {fp['generated']['ssim']:.4f}  vs  "
                     f"copy-last-frame PSNR {fp['copy_baseline']['psnr']:.2f} / SSIM {fp['copy_baseline']['ssim']:.4f}")
    fvd = report.get("fvd", {})
    if "skipped" in fvd:
        lines.append(f"FVD skipped: {fvd['skipped']}")
    else:
        lines.append("FVD " + "  ".join(f"{k} {v:.2f}" for k, v in fvd.items() if k != "num_clips"))
    for name, path in report.get("plots", {}).items():
        lines.append(f"plot {name}: {path}")
    lines.append(f"report: {report['report']}  ({report['seconds']:.1f} s)")
    print("\n".join(lines))


def _main(argv: Sequence[str] | None) -> int:
    report = run(build_parser().parse_args(argv))
    print_summary(report)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m magvit.evaluate`` / ``magvit-evaluate``: user errors are one line and exit status 2."""
    return run_main(PROG, _main, argv)


if __name__ == "__main__":
    sys.exit(main())
