"""What ``python -m magvit.evaluate`` writes: PNG plots (training curves, per-clip PSNR, frame prediction's PSNR /
SSIM / MSE per predicted frame, a strip of sample frames), ``report.json`` and the summary printed on the terminal."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Sequence

import torch

from ..fileio import write_text_atomic
from ..runlog import read_metrics
from ..video_io import frame_grid


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    return plt


def plot_training_curves(run_dirs: Sequence[Path], path: Path, max_panels: int = 12) -> Path | None:
    """One panel per logged scalar of each run's ``metrics.jsonl`` against ``step``; ``None`` if nothing to plot."""

    series: dict[str, tuple[list[float], list[float]]] = {}
    for run_dir in run_dirs:
        prefix = f"{run_dir.name}/" if len(run_dirs) > 1 else ""
        for i, record in enumerate(read_metrics(run_dir / "metrics.jsonl")):
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


#: how frame_prediction.png draws each entry: the model bold, the baselines thin, the tokenizer's bound dashed
_FRAME_CURVE_STYLE = {"generated": {"linewidth": 2.2}, "reconstruction": {"linestyle": "--"}}


def plot_frame_prediction(report: dict[str, Any], path: Path) -> Path | None:
    """PSNR, SSIM and MSE per frame against the predicted frame's number, one line per entry of the report's
    ``frame_prediction`` (generated, the baselines, the reconstruction); ``None`` without frame prediction."""
    fp = report.get("frame_prediction")
    if not fp or not fp.get("predicted_frames"):
        return None
    plt = _pyplot()
    frames = fp["predicted_frames"]
    titles = {"psnr": "PSNR (dB)", "ssim": "SSIM", "mse_per_frame": "MSE per frame (gray, [0, 1], sum)"}
    entries = [name for name, value in fp.items() if isinstance(value, dict) and "per_frame" in value]
    fig, axes = plt.subplots(1, len(titles), figsize=(4.6 * len(titles), 3.6), squeeze=False)
    for ax, (metric, title) in zip(axes[0], titles.items()):
        for name in entries:
            values = [v if math.isfinite(v) else 100.0 for v in fp[name]["per_frame"][metric]]  # inf drawn as 100
            ax.plot(frames, values, marker="." if len(frames) < 30 else None, label=name.replace("_", " "),
                    **_FRAME_CURVE_STYLE.get(name, {"linewidth": 1.0}))
        ax.set_title(title, fontsize=9)
        ax.set_xlabel(f"predicted frame ({fp['num_cond_frames']} given)", fontsize=8)
        ax.tick_params(labelsize=7)
        ax.grid(alpha=0.3)
    handles, labels = axes[0][0].get_legend_handles_labels()
    fig.legend(handles, labels, fontsize=7, loc="lower center", ncol=len(entries), frameon=False)
    fig.tight_layout(rect=(0, 0.08, 1, 1))  # room for the legend below the panels
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_sample_strip(rows: Sequence[tuple[str, torch.Tensor]], path: Path, max_frames: int = 8) -> Path:
    """A strip of frames, one labelled row per video (e.g. real | reconstructed | generated), ``(3, T, H, W)`` each."""

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


def write_plots(out: Path, report: dict[str, Any], run_dirs: Sequence[Path],
                samples: Sequence[tuple[str, torch.Tensor]]) -> dict[str, str]:
    """The report's plots in ``out``: ``curves`` (with ``run_dirs``), ``per_clip``, ``frame_prediction`` (with frame
    prediction), ``samples`` (with sample rows); returns ``{name: path}`` of those written."""
    plots = {}
    if run_dirs:
        curves = plot_training_curves(list(run_dirs), out / "curves.png")
        if curves is not None:
            plots["curves"] = str(curves)
    bars = plot_per_clip(report, out / "per_clip.png")
    if bars is not None:
        plots["per_clip"] = str(bars)
    frame_curves = plot_frame_prediction(report, out / "frame_prediction.png")
    if frame_curves is not None:
        plots["frame_prediction"] = str(frame_curves)
    if samples:
        plots["samples"] = str(plot_sample_strip(samples, out / "samples.png"))
    return plots


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


def summary_lines(report: dict[str, Any]) -> list[str]:
    """The report in a few lines for the terminal."""
    lines = []
    tok = report.get("tokenizer")
    if tok:
        codes = (f"codebook usage {tok['codebook_usage']:.1%}  perplexity {tok['codebook_perplexity']:.1f}  "
                 f"bpp {tok['bits_per_pixel']:.4f} (entropy-coded {tok['bits_per_pixel_entropy_coded']:.4f})"
                 if "codebook_usage" in tok else "codes n/a (continuous latents)")
        lines.append(f"tokenizer   {tok['num_clips']} clips  PSNR {tok['psnr']:.2f} dB  SSIM {tok['ssim']:.4f}  {codes}")
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
        lines.append(f"frame prediction ({fp['num_cond_frames']} given, {fp['steps']} steps, {fp['num_clips']} "
                     f"clips; future frames)   PSNR   SSIM    MSE/frame")
        for name, entry in fp.items():
            if isinstance(entry, dict) and "per_frame" in entry:
                lines.append(f"  {name:<24} {entry['psnr']:>7.2f} {entry['ssim']:>7.4f} {entry['mse_per_frame']:>9.2f}")
        codes = fp.get("generated_codes")
        if codes:
            lines.append(f"  generated codes on the {codes['slots']} predicted latent slots: "
                         f"{codes['accuracy']:.1%} the real code; the most common real code is "
                         f"{codes['its_share_of_real']:.1%} of the real codes, {codes['its_share_of_generated']:.1%} "
                         "of the generated")
    fvd = report.get("fvd", {})
    if "skipped" in fvd:
        lines.append(f"FVD skipped: {fvd['skipped']}")
    else:
        lines.append("FVD " + "  ".join(f"{k} {v:.2f}" for k, v in fvd.items() if k != "num_clips"))
    for name, path in report.get("plots", {}).items():
        lines.append(f"plot {name}: {path}")
    lines.append(f"report: {report['report']}  ({report['seconds']:.1f} s)")
    return lines
