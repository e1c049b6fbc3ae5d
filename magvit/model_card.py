"""The model card (``README.md``) that every ``save_pretrained`` export carries.

A card says what the model is (class, size, the code grid or vocabulary it works on), what it was trained on and how
far, how well it did by the run's own last numbers, and the full config. It starts with the YAML front matter the
Hugging Face Hub reads (``library_name``, ``license``, ``tags``), so a pushed export is found and labelled there.
What a model kind reports is a table (:data:`SUMMARIES`), one row per ``model_type``.
"""

from __future__ import annotations

import dataclasses
import json
import math
from typing import Any, Callable, Mapping

import yaml

LICENSE = "apache-2.0"


@dataclasses.dataclass
class TrainingRecord:
    """What the training run knows about the weights it exports (every field optional).

    ``data``: the manifest or token-shard folder trained on; ``num_clips``: clips (or token examples) in it;
    ``steps``: optimizer steps done; ``metrics``: the run's last evaluation numbers, e.g. ``{"val/psnr": 27.3}``.
    """

    data: str | None = None
    num_clips: int | None = None
    steps: int | None = None
    metrics: dict[str, float] = dataclasses.field(default_factory=dict)
    precision: str | None = None  # what the run trained in, and why, e.g. "fp32 (auto: AMD EPYC (cpu), ...)"


def _tokenizer_summary(config: Any) -> tuple[list[str], list[str]]:
    try:
        grid = "x".join(map(str, config.token_grid(config.num_frames, config.image_size, config.image_size)))
    except ValueError:
        grid = "?"
    lines = [f"- Clips: {config.num_frames} frames of {config.image_size}x{config.image_size}, "
             f"{config.in_channels} channels",
             f"- Quantizer: {config.quantizer}, " + (f"codebook of {config.codebook_size} codes" if config.codebook_size
                                                     else "continuous latents (no codebook)"),
             f"- Token grid (t x h x w): {grid}",
             f"- Causal in time: {'yes' if config.causal else 'no'}"]
    return lines, ["video-tokenizer", "vq-vae"]


def _transformer_summary(config: Any) -> tuple[list[str], list[str]]:
    grids = "x".join(map(str, config.token_grid))
    if getattr(config, "top_grid", None):  # two code grids (VQ-VAE-2)
        grids += f" and a top grid {'x'.join(map(str, config.top_grid))}, modelled first"
    lines = [f"- Token grid (t x h x w): {grids}, codebook of {config.codebook_size} codes",
             f"- Vocabulary: {config.vocab_size} tokens (codes, mask, task and class tokens)",
             f"- Layers x hidden x heads: {config.num_layers} x {config.hidden_size} x {config.num_heads}",
             f"- Classes: {config.num_classes}"]
    return lines, ["masked-transformer", "video-generation"]


def _autoregressive_summary(config: Any) -> tuple[list[str], list[str]]:
    lines, _ = _transformer_summary(config)
    lines[1] = (f"- Vocabulary: {config.vocab_size} tokens (codes, task and class tokens); next-token prediction "
                "in raster (t, h, w) order")
    return lines, ["autoregressive-transformer", "video-generation"]


# model_type -> (config -> (summary lines, Hub tags))
SUMMARIES: dict[str, Callable[[Any], tuple[list[str], list[str]]]] = {
    "video_tokenizer": _tokenizer_summary,
    "masked_video_transformer": _transformer_summary,
    "autoregressive_transformer": _autoregressive_summary,
}


def _format(value: float) -> str:
    return f"{value:.4g}" if math.isfinite(value) else str(value)


def render_model_card(class_name: str, model_type: str, config: Any, num_parameters: int,
                      class_names: list[str] | None = None, training: TrainingRecord | None = None,
                      version: str = "") -> str:
    """The card's Markdown text (front matter first)."""
    summary, tags = SUMMARIES.get(model_type, lambda c: ([], []))(config)
    front = {"library_name": "magvit", "license": LICENSE, "tags": ["magvit", "video", *tags]}
    out = ["---", yaml.safe_dump(front, sort_keys=False).rstrip(), "---", "", f"# {class_name}", "",
           f"A `{class_name}` ({model_type}) of the magvit library{f' {version}' if version else ''}, "
           f"{num_parameters / 1e6:.2f}M parameters ({num_parameters:,}).", "", *summary]
    if class_names:
        out.append(f"- Class names (id: name): {', '.join(f'{i}: {n}' for i, n in enumerate(class_names))}")
    out += ["", "## Usage", "", "```python", f"from magvit import {class_name}", "",
            f"model = {class_name}.from_pretrained(\"PATH_OR_HUB_ID\")", "```", ""]
    out += ["## Training data", ""] + _training_lines(training)
    out += ["", "## Evaluation", ""]
    metrics: Mapping[str, float] = training.metrics if training is not None else {}
    if metrics:
        out += ["Last values logged by the training run:", "", "| metric | value |", "| --- | --- |"]
        out += [f"| {k} | {_format(float(v))} |" for k, v in metrics.items()]
    else:
        out.append("No evaluation numbers were recorded with this export.")
    out += ["", "## Config", "", "```json", json.dumps(config.to_dict(), indent=2), "```", ""]
    return "\n".join(out)


def _training_lines(training: TrainingRecord | None) -> list[str]:
    if training is None or (training.data is None and training.num_clips is None and training.steps is None
                            and training.precision is None):
        return ["Not recorded with this export."]
    lines = []
    if training.data is not None:
        lines.append(f"- Data: `{training.data}`")
    if training.num_clips is not None:
        lines.append(f"- Examples (clips): {training.num_clips}")
    if training.steps is not None:
        lines.append(f"- Optimizer steps: {training.steps}")
    if training.precision is not None:
        lines.append(f"- Precision: {training.precision}")
    return lines
