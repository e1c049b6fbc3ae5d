"""What a training run is told: its run config (the typed sections of ``configs/tokenizer/*.yaml`` and
``configs/transformer/*.yaml``) and its command line (``--config``, ``--run-dir``, ``--resume auto``,
``--overwrite``, ``key.path=value``).

Model sections are typed configs given as ``{preset: NAME, field: value, ...}`` (``magvit.config``); the resolved
config a run records (``config.yaml``, every checkpoint) holds every value.
"""

from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

from . import distributed as dist
from .autoregressive import AutoregressiveConfig, AutoregressiveObjectiveConfig
from .batches import DataConfig
from .cli import ArgumentParser, UsageError
from .config import Config, ConfigError, require_finite
from .discriminator import DiscriminatorConfig
from .losses import TokenizerLossConfig
from .masking import MaskingConfig
from .optim import OptimConfig
from .resources import find_config
from .runlog import RUN_FILES, RUN_SUBDIRS
from .tokenizer import TokenizerConfig
from .precision import PRECISIONS, Precision
from .trainloop import CheckpointConfig, LoggingConfig
from .transformer import TransformerConfig


@dataclasses.dataclass
class TrainConfig(Config):
    """Length, schedule, precision and parallelism of a run."""

    max_steps: int = 1000  # optimizer steps
    # Also stop (checkpoint, export, exit 0) after the first optimizer step that ends this many minutes of wall time
    # after this process's loop started (0: no limit). A resume gets the budget anew. The LR schedule still runs to
    # max_steps, so the stopped run is the start of that schedule, and resuming continues it exactly.
    max_minutes: float = 0.0
    warmup_steps: int = 100
    min_lr_ratio: float = 0.1  # cosine decays to lr * min_lr_ratio at max_steps
    grad_accum_steps: int = 1
    seed: int = 0  # rank r uses seed + r for its own randomness
    # auto: bf16 autocast where the device computes bf16 natively, fp32 elsewhere (magvit.precision); the run
    # records the precision it resolved to
    precision: Precision = "auto"
    deepspeed_config: str = "configs/deepspeed/zero2.json"
    zero_stage: int | None = None  # overrides the stage of the DeepSpeed config when set
    ema_decay: float = 0.999
    ema_warmup: bool = True  # effective decay min(ema_decay, (1 + n) / (10 + n)) after n updates
    # that many non-finite losses, or optimizer steps DeepSpeed skipped for non-finite gradients, in a row stop the run
    max_nonfinite_steps: int = 20
    # torch.compile the trained network (nn.Module.compile: names, checkpoints and exports unchanged). Measured on an
    # AVX2 CPU (BENCHMARKS.md): the Moving MNIST tokenizer's step 1.2x faster after 150-360 s of compilation, so it
    # pays after ~400-900 steps; the 1M-parameter transformer's step not faster at all. Off by default.
    compile: bool = False

    def __post_init__(self):
        require_finite(self, ("min_lr_ratio", "ema_decay", "max_minutes"))
        if self.max_minutes < 0:
            raise ValueError(f"train: max_minutes must be >= 0 (0: no time limit), got {self.max_minutes}")
        if self.max_steps < 1 or self.warmup_steps < 0 or self.grad_accum_steps < 1 or self.max_nonfinite_steps < 1:
            raise ValueError("train: need max_steps >= 1, warmup_steps >= 0, grad_accum_steps >= 1, "
                             "max_nonfinite_steps >= 1")
        if not 0.0 <= self.min_lr_ratio <= 1.0 or not 0.0 <= self.ema_decay < 1.0:
            raise ValueError("train: need 0 <= min_lr_ratio <= 1 and 0 <= ema_decay < 1")
        if self.precision not in PRECISIONS:
            raise ValueError(f"train: precision must be one of {', '.join(PRECISIONS)}, got {self.precision!r}")
        if self.zero_stage not in (None, 0, 1, 2, 3):
            raise ValueError(f"train: zero_stage must be 0, 1, 2 or 3 (or null: the DeepSpeed config's), "
                             f"got {self.zero_stage}")



@dataclasses.dataclass
class TokenizerTrainConfig(Config):
    """``configs/tokenizer/*.yaml``. The clip size of ``model`` and ``discriminator`` (``num_frames``,
    ``image_size``) follows ``data``; a size that does not fit either network is an error."""

    model: TokenizerConfig = dataclasses.field(default_factory=lambda: TokenizerConfig.preset("tiny"))
    discriminator: DiscriminatorConfig = dataclasses.field(default_factory=lambda: DiscriminatorConfig.preset("tiny"))
    data: DataConfig = dataclasses.field(default_factory=DataConfig)
    optim: OptimConfig = dataclasses.field(default_factory=OptimConfig)
    disc_optim: OptimConfig = dataclasses.field(default_factory=OptimConfig)
    loss: TokenizerLossConfig = dataclasses.field(default_factory=TokenizerLossConfig)
    train: TrainConfig = dataclasses.field(default_factory=TrainConfig)
    logging: LoggingConfig = dataclasses.field(default_factory=LoggingConfig)
    checkpoint: CheckpointConfig = dataclasses.field(default_factory=CheckpointConfig)
    # Starting weights (step 0; a resume reads its checkpoint instead): a `save_pretrained` export to fine-tune
    # (names and shapes as `model`), or with `inflate: true` a 2D export (temporal_kernel_size=1) inflated into
    # `model` by central inflation. Empty: random initialisation. `model.init_from` / `model.inflate` are accepted
    # as the same keys (they describe where the model's weights come from) and moved here.
    init_from: str = ""
    inflate: bool = False

    @classmethod
    def _prepare(cls, data: Mapping[str, Any], prefix: str) -> Mapping[str, Any]:
        model = data.get("model")
        if not isinstance(model, Mapping) or not {"init_from", "inflate"} & set(model):
            return data
        data, model = dict(data), dict(model)
        for key, default in (("init_from", ""), ("inflate", False)):
            if key in model:
                value = model.pop(key)
                if data.get(key, default) not in (default, value):
                    raise ConfigError(f"{prefix}{key} and {prefix}model.{key} disagree ({data[key]!r} vs "
                                      f"{value!r}): give one")
                data[key] = value
        return {**data, "model": model}

    def __post_init__(self):
        if self.inflate and not self.init_from:
            raise ValueError("inflate: true needs init_from (the folder of a 2D tokenizer export)")
        clip = {"num_frames": self.data.num_frames, "image_size": self.data.image_size}
        for name in ("model", "discriminator"):
            section = getattr(self, name)
            if any(getattr(section, key) != value for key, value in clip.items()):
                try:
                    setattr(self, name, section.replace(**clip))
                except ConfigError as err:
                    raise ValueError(f"{name} (with data.num_frames/image_size): {err}") from None


@dataclasses.dataclass
class TransformerTrainConfig(Config):
    """``configs/transformer/*.yaml``. The model's ``codebook_size``, ``token_grid`` and ``num_classes`` follow
    the token shards (the trainer sets them from their ``meta.json``)."""

    model: TransformerConfig = dataclasses.field(default_factory=lambda: TransformerConfig.preset("tiny"))
    masking: MaskingConfig = dataclasses.field(default_factory=MaskingConfig)
    data: DataConfig = dataclasses.field(default_factory=DataConfig)
    optim: OptimConfig = dataclasses.field(default_factory=lambda: OptimConfig(lr=1e-4, beta1=0.9, beta2=0.96,
                                                                             weight_decay=0.045))
    train: TrainConfig = dataclasses.field(default_factory=TrainConfig)
    logging: LoggingConfig = dataclasses.field(default_factory=LoggingConfig)
    checkpoint: CheckpointConfig = dataclasses.field(default_factory=CheckpointConfig)


@dataclasses.dataclass
class AutoregressiveTrainConfig(Config):
    """``configs/autoregressive/*.yaml``: VQGAN's autoregressive prior on the masked transformer's token shards. The
    model's ``codebook_size``, ``token_grid`` and ``num_classes`` follow the token shards (set from their
    ``meta.json``). AdamW with betas (0.9, 0.95), as VQGAN's transformer (minGPT)."""

    model: AutoregressiveConfig = dataclasses.field(default_factory=lambda: AutoregressiveConfig.preset("tiny"))
    objective: AutoregressiveObjectiveConfig = dataclasses.field(default_factory=AutoregressiveObjectiveConfig)
    data: DataConfig = dataclasses.field(default_factory=DataConfig)
    optim: OptimConfig = dataclasses.field(default_factory=lambda: OptimConfig(lr=1e-4, beta1=0.9, beta2=0.95,
                                                                             weight_decay=0.01))
    train: TrainConfig = dataclasses.field(default_factory=TrainConfig)
    logging: LoggingConfig = dataclasses.field(default_factory=LoggingConfig)
    checkpoint: CheckpointConfig = dataclasses.field(default_factory=CheckpointConfig)


# --------------------------------------------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------------------------------------------
def build_arg_parser(description: str, default_config: str) -> argparse.ArgumentParser:
    parser = ArgumentParser(description=description, formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--config", default=default_config, help="training YAML (model, data, optim, train, ...)")
    parser.add_argument("--deepspeed_config", "--deepspeed-config", dest="deepspeed_config", default=None,
                        help="DeepSpeed JSON (ZeRO stage and options); overrides train.deepspeed_config")
    parser.add_argument("--run-dir", "--run_dir", dest="run_dir", default=None,
                        help="where everything of the run goes (default: runs/<kind>/<config name>)")
    parser.add_argument("--resume", choices=["auto", "never"], default="auto",
                        help="'auto': continue from the latest complete checkpoint in the run dir, if any; 'never': "
                             "start at step 0, refused when the run dir already holds a run (see --overwrite)")
    parser.add_argument("--overwrite", action="store_true",
                        help="start over in a run dir that holds a run: first DELETE its previous run "
                             f"({', '.join(s + '/' for s in RUN_SUBDIRS)}, {', '.join(RUN_FILES)}); other files "
                             "stay. Implies a fresh start (no resume)")
    parser.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    parser.add_argument("overrides", nargs="*", metavar="key.path=value", help="config overrides")
    return parser


def parse_args(parser: argparse.ArgumentParser, argv: Sequence[str] | None) -> argparse.Namespace:
    args = parser.parse_intermixed_args(argv)
    for word in args.overrides:
        if "=" not in word or word.startswith("-"):
            raise UsageError(f"expected key.path=value, got '{word}'")
    return args


def load_train_config(config_cls: type[Config], path: str, overrides: Sequence[str],
                      deepspeed_config: str | None = None) -> Config:
    """The YAML at ``path`` with ``key.path=value`` overrides (``Config.load``: ``model.preset=B`` switches a
    section's preset, the YAML's other fields of that section still apply); ``deepspeed_config`` (the command
    line's ``--deepspeed_config``) replaces ``train.deepspeed_config``. Raises ``ConfigError``."""
    cfg = config_cls.load(path, overrides)
    if deepspeed_config:
        cfg = cfg.with_overrides([f"train.deepspeed_config={deepspeed_config}"])
    return cfg


def parse_train_command(description: str, default_config: str, kind: str,
                        load_config: Callable[[str, Sequence[str], str | None], Config],
                        argv: Sequence[str] | None) -> tuple[argparse.Namespace, Config, dict[str, Any]]:
    """Parse a training command line, load its config with ``load_config(path, overrides, deepspeed_config)`` and
    the base DeepSpeed JSON (both paths found through ``resources.find_config``: a packaged ``configs/...`` file
    is found from any directory). ``args.run_dir`` comes back as a ``Path`` (default ``runs/<kind>/<config stem>``).
    Raises ``UsageError`` / ``ConfigError``."""
    args = parse_args(build_arg_parser(description, default_config), argv)
    cfg = load_config(str(find_config(args.config)), args.overrides, args.deepspeed_config)
    try:
        ds_base = dist.load_deepspeed_config(find_config(cfg.train.deepspeed_config))
    except ValueError as err:
        raise UsageError(str(err)) from None
    args.run_dir = Path(args.run_dir or Path("runs") / kind / Path(args.config).stem)
    return args, cfg, ds_base
