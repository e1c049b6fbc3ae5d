"""Train the masked video transformer on token shards with DeepSpeed.

    deepspeed --num_accelerators 2 launch/train_transformer.py --config configs/transformer/tiny.yaml \\
        [--deepspeed_config configs/deepspeed/zero2.json] [--run-dir DIR] \\
        [--resume auto|never] [--overwrite] [key.path=value ...]

Also runs under ``torchrun``, ``srun`` (one process per task) and as plain ``python`` (one process).

The token shards come from ``python -m data_prep.tokenize``; their ``meta.json`` fixes the model's codebook size,
token grid and number of classes (and the frame-prediction given-frame counts it records, ``model.cond_frames``).
Each step draws a task (COMMIT condition, sketch, class, unconditional; for frame prediction one of the shards'
given-frame counts) and a mask ratio from the mask schedule per example (``masking.make_training_batch``) and
minimises the masked-token cross-entropy; an interior model (``model.conditioning``) takes the condition regions of
the shards' clips and tokenizer. The exported weights (``RUN_DIR/export``) are the EMA of the transformer.
SIGTERM/SIGUSR1 finish the step, checkpoint and exit with status 3 (send them to the training processes, as srun
does; see ``train_tokenizer.py``).

With ``data.val_tokens`` (token shards of held-out clips, e.g. ``python -m data_prep.tokenize --split val``), every
``logging.sample_every`` steps and at the end rank 0 scores the EMA weights on a fixed masking of the first
``data.val_clips`` held-out grids (``val/nll`` in nats per code, ``val/accuracy``) and, with the tokenizer named in
their ``meta.json``, writes a few decoded samples to ``RUN_DIR/samples/step_XXXXXXXX.mp4`` and the tracker.
"""

from __future__ import annotations

import dataclasses
import sys
import warnings
from pathlib import Path
from typing import Any, Sequence

if __package__ in (None, ""):  # `python launch/train_transformer.py` / the deepspeed launcher
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import torch

from magvit import code_grids
from magvit import distributed as dist
from magvit.batches import held_out_tokens, token_folder, token_meta
from magvit.cli import UsageError, run_main
from magvit.ema import EMA
from magvit.evaluation.evaluators import MaskedTokenEvaluation
from magvit.masking import MaskingConfig, make_training_batch, masked_token_loss, training_tasks
from magvit.pipeline import check_pair, generate_codes
from magvit.prior_training import PriorCommand, start_prior_run
from magvit.run_config import TransformerTrainConfig
from magvit.sequence import predicted_codes
from magvit.shard_meta import TokenShardMeta
from magvit.tasks import carried_cond_frames, condition_name
from magvit.tokenizer import VideoTokenizer
from magvit.tracking import Tracker
from magvit.video_io import write_video
from magvit.trainloop import NonFiniteGuard, Reporting
from magvit.transformer import MaskedVideoTransformer

COMMAND = PriorCommand(
    __doc__.split("\n")[0], kind="transformer", default_config="configs/transformer/tiny.yaml",
    config_class=TransformerTrainConfig, network=MaskedVideoTransformer, tasks_key="masking.tasks",
    logger_name="magvit.train_transformer",
    reporting=Reporting("MaskedVideoTransformer", loss_key="loss", rate_key="perf/examples_per_s",
                        rate_label="ex_s", lr_keys={"transformer": "lr"}, card_keys=("loss", "masked_accuracy")))
DEFAULT_CONFIG = COMMAND.default_config
load_config = COMMAND.load_config  # (MaskingConfig checks its own options)


def condition_regions(cfg: TransformerTrainConfig) -> dict[str, torch.Tensor] | None:
    """The latent condition regions of an interior model's pixel-condition tasks (``None``: prefix conditioning),
    for the clips, the tokenizer and the given-frame counts of the token shards (their ``meta.json``)."""
    if cfg.model.conditioning != "interior":
        return None
    data = cfg.data
    return shards_regions(token_meta(data), cfg.model.tasks, data.shards if data.format == "webdataset" else
                          token_folder(data))


def shards_regions(meta: TokenShardMeta, tasks: Sequence[str], where: str) -> dict[str, torch.Tensor]:
    """``TokenShardMeta.condition_regions`` of the token shards at ``where``; ``UsageError`` when their meta.json
    lacks what they need."""
    try:
        return meta.condition_regions(tasks)
    except (KeyError, TypeError, ValueError) as err:
        raise UsageError(f"{where}: its meta.json does not tell the clips' size and tokenizer that the condition "
                         f"regions of an interior model need ({type(err).__name__}: {err}); tokenize with "
                         "data_prep.tokenize, or train model.conditioning=prefix") from None


def transformer_step(engine, batch: dict[str, Any], step: int, cfg: TransformerTrainConfig, vocab,
                     guard: NonFiniteGuard, autocast, regions: dict[str, torch.Tensor] | None = None
                     ) -> dict[str, float] | None:
    """One micro-step: mask the batch's video tokens, predict them, back-propagate the masked-token loss.
    Returns metrics, or None when a non-finite loss on any rank made every rank skip it. ``regions``: the latent
    condition regions of an interior model (:func:`condition_regions`)."""
    m = cfg.masking
    tb = make_training_batch(batch, vocab, m, conditioning=cfg.model.conditioning,
                             condition_regions=regions)  # global RNG's draws
    with autocast:
        logits = engine(tb.input_ids)  # (B, L, vocab), or (B, L, F, S) with token_factorization F
    loss = masked_token_loss(logits, tb.labels, tb.loss_mask, vocab.codebook_size, m.label_smoothing)
    with torch.no_grad():
        masked = (tb.input_ids == vocab.mask_token) & (tb.loss_mask > 0)  # (B, L): the positions to predict
        hits = (predicted_codes(logits, vocab.codebook_size) == tb.labels) & masked
        accuracy = hits.sum().item() / max(1, masked.sum().item())
    metrics = {"loss": loss.item(), "masked_accuracy": accuracy}
    if not guard.check(metrics["loss"], step, dist.all_reduce_max):
        return None
    engine.backward(loss)
    engine.step()
    return metrics


# --------------------------------------------------------------------------------------------------------------
# Validation on held-out token grids (rank 0, EMA weights in a plain copy: no collectives)
# --------------------------------------------------------------------------------------------------------------
SAMPLE_VIDEOS = 2  # decoded samples per sample step
SAMPLE_STEPS = 12  # their iterative decoding steps
SAMPLE_FPS = 8.0


@dataclasses.dataclass
class HeldOut:
    """What each sample step scores: the collated held-out grids (``{"codes": (V, t, h, w), "cond.<task>"...,
    "label": (V,)}``, CPU), the trained tasks they carry, the tokenizer that decodes the sample videos (None:
    no videos) and, for an interior model, the latent condition regions of their clips (None: prefix)."""

    batch: dict[str, Any]
    tasks: list[str]
    tokenizer: torch.nn.Module | None
    regions: dict[str, torch.Tensor] | None = None


def open_held_out(cfg: TransformerTrainConfig, classes: list[str], rank: int, device: torch.device, log
                  ) -> HeldOut | None:
    """The held-out grids of ``data.val_tokens`` (None without them). Every rank reads and checks them, so a bad
    folder stops all ranks alike (``UsageError``); rank 0 also loads the tokenizer of their ``meta.json``."""
    held = held_out_tokens(cfg.data, classes)
    if held is None:
        return None
    batch, meta = held
    carried = {row.name for row in training_tasks(batch, cfg.model.vocab)}
    trained = cfg.masking.tasks or cfg.model.tasks
    tasks = [name for name in trained if name in carried]
    if not tasks:
        raise UsageError(f"data.val_tokens: {cfg.data.val_tokens} holds the condition codes of none of the trained "
                         f"tasks ({', '.join(trained)}); tokenize it like the training shards")
    regions = shards_regions(meta, cfg.model.tasks, cfg.data.val_tokens) if cfg.model.layout.interior else None
    return HeldOut(batch, tasks, sample_tokenizer(meta, cfg, device, log) if rank == 0 else None, regions)


def sample_tokenizer(meta: TokenShardMeta, cfg: TransformerTrainConfig, device: torch.device, log):
    """The tokenizer the held-out shards name (``meta.json``'s ``tokenizer_dir``), checked to fit the transformer;
    None, with one warning, when it cannot be loaded: the run then writes no sample videos."""
    directory = meta.tokenizer_dir
    try:
        if not directory or not Path(directory).is_dir():  # never a Hub lookup for a folder that has gone
            raise FileNotFoundError(f"no tokenizer folder {directory!r}")
        with torch.random.fork_rng(devices=[]):  # building it must not move the training RNG (exact resume)
            tokenizer = VideoTokenizer.from_pretrained(directory, device=device)
        check_pair(tokenizer.config, cfg.model)
    except (OSError, ValueError, KeyError, TypeError, UsageError) as err:
        log.warning("no sample videos: the tokenizer of %s cannot be used (%s)", cfg.data.val_tokens,
                    " ".join(str(err).split()))
        return None
    return tokenizer


def ema_transformer(cfg: TransformerTrainConfig, ema: EMA, device: torch.device) -> MaskedVideoTransformer:
    """A plain eval-mode transformer holding the EMA weights (the caller keeps the training RNG aside)."""
    model = MaskedVideoTransformer(cfg.model)
    with torch.no_grad():
        ema.copy_to(model)
    return model.to(device).eval()


@torch.no_grad()
def sample_videos(model: MaskedVideoTransformer, tokenizer, batch: dict[str, Any], seed: int,
                  regions: dict[str, torch.Tensor] | None = None) -> torch.Tensor | None:
    """Up to ``SAMPLE_VIDEOS`` seeded samples ``(N, 3, T, H, W')``: frame prediction from the held-out grids'
    condition codes of the fewest given frames they carry (an interior model: in that count's region of
    ``regions``), generated | truth (the tokenizer's decoding of the held-out codes) side by side (``W' = 2W``);
    unconditional samples (``W' = W``) when the model has no frame prediction. None: neither task."""
    tasks, device, layout = model.config.tasks, next(model.parameters()).device, model.config.layout
    batch, _ = code_grids.pack_batch(batch)  # two grids: packed, as the prior's sequences hold them
    n = min(SAMPLE_VIDEOS, batch["codes"].shape[0])
    counts = carried_cond_frames(batch, "frame_prediction")
    if "frame_prediction" in tasks and counts:
        name = condition_name("frame_prediction", counts[0])
        region = None if regions is None else regions[name]
        pairs = [torch.cat([code_grids.pack_codes(generate_codes(model, "frame_prediction",
                                                                 batch[f"cond.{name}"][i:i + 1], steps=SAMPLE_STEPS,
                                                                 seed=seed + i, condition_region=region)),
                            batch["codes"][i:i + 1].to(device)])
                 for i in range(n)]  # (2, t, h, w) each (two grids: (2, N_top + N)): generated, truth
        codes = code_grids.video_codes(torch.cat(pairs), layout.token_grid, layout.top_grid)
        decoded = tokenizer.decode(codes).clamp(-1, 1).float()  # (2N, 3, T, H, W)
        return torch.cat([decoded[0::2], decoded[1::2]], dim=-1)
    if "unconditional" in tasks:
        codes = generate_codes(model, "unconditional", None, num_samples=n, steps=SAMPLE_STEPS, seed=seed)
        return tokenizer.decode(codes).clamp(-1, 1).float()
    return None


def validate(model: MaskedVideoTransformer, held_out: HeldOut, samples_dir: Path, step: int, tracker: Tracker,
             seed: int, masking: MaskingConfig) -> dict[str, float]:
    """Masked-token NLL (nats per code) and accuracy of the held-out grids on the run's ``masking`` seeded by
    ``seed`` (the same at every step), and the sample videos: ``samples_dir/step_XXXXXXXX.mp4`` (the samples one
    after another) and the tracker's ``samples/generated``."""
    evaluation = MaskedTokenEvaluation(model, held_out.tasks, seed, held_out.regions, masking)
    evaluation.update(held_out.batch)
    summary = evaluation.summary()
    videos = sample_videos(model, held_out.tokenizer, held_out.batch, seed, held_out.regions) \
        if held_out.tokenizer else None
    if videos is not None:
        write_video(samples_dir / f"step_{step:08d}.mp4", torch.cat(list(videos), dim=1), fps=SAMPLE_FPS)
        tracker.log_video(step, "samples/generated", videos, SAMPLE_FPS)
    return {"val/nll": summary["masked_token_nll"], "val/accuracy": summary["masked_token_accuracy"]}


def main(argv: Sequence[str] | None = None) -> int:
    return COMMAND.main(train, argv)


def train(cfg: TransformerTrainConfig, ds_base: dict[str, Any], run_dir: Path, resume: bool,
          argv: Sequence[str], overwrite: bool = False) -> int:
    prior = start_prior_run(COMMAND, cfg, ds_base, run_dir, resume, argv, overwrite)
    run, device = prior.context, prior.context.device
    vocab, regions = cfg.model.vocab, condition_regions(cfg)
    held_out = open_held_out(cfg, prior.data.classes, run.rank, device, run.log)
    loop = prior.loop(records={"training_masking": cfg.masking.to_dict()})  # evaluate masks as training did

    def micro_step(batch: dict[str, Any], step: int) -> dict[str, float] | None:
        return transformer_step(prior.engine, prior.on_device(batch), step, cfg, vocab, loop.guard, prior.autocast,
                                regions)

    def sample(step: int) -> dict[str, float]:
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):  # exact resume: RNG untouched
            model = ema_transformer(cfg, prior.ema, device)
            return validate(model, held_out, run_dir / "samples", step, loop.tracker, cfg.train.seed, cfg.masking)

    return loop.run(micro_step, resume, sample=sample if run.rank == 0 and held_out is not None else None)


def cli() -> int:
    """Console entry point."""
    warnings.filterwarnings("ignore", category=FutureWarning, message=r".*deprecated. Please use")
    return run_main(None, main)


if __name__ == "__main__":
    sys.exit(cli())
