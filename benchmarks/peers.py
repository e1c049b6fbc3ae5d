"""The project's tokenizer and ``magvit2-pytorch``'s at a matched parameter count and the same compression, plus the
design-choice variants of ours that the reconstruction benchmark compares.

All tokenizers compress 4x in time and 8x in space (16x128x128 -> 4x16x16, 17x64x64 -> 5x8x8 with a causal first
frame) with about 2**10 codes. Neither side uses a GAN or a perceptual loss here, so a training step is
reconstruction (MSE) + the quantizer's own loss, forward and backward.

Each side carries its own :class:`Recipe` (optimiser and loss weights as its authors recommend them), so that a
benchmark trains every side the way it is meant to be trained.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F


def count_parameters(module: torch.nn.Module, skip: tuple[str, ...] = ()) -> int:
    return sum(p.numel() for name, p in module.named_parameters() if not name.startswith(skip))


# magvit2-pytorch builds a discriminator even with use_gan=False; it takes no part in these steps.
MAGVIT2_SKIP = ("discr", "multiscale_discrs", "vgg")


# ------------------------------------------------------------------------------------------------------------------
# Optimiser recipes
# ------------------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Recipe:
    """Adam(W) settings, warm-up and where they come from. The LR is linear warm-up, then constant."""

    lr: float
    betas: tuple[float, float]
    weight_decay: float
    grad_clip: float | None  # max global grad norm, None = no clipping
    warmup_steps: int
    source: str  # one line: where these values come from (goes into the table notes)
    decay_matrices_only: bool = False  # weight decay on >= 2-D tensors only (magvit2-pytorch's get_optimizer)

    def __post_init__(self) -> None:
        if self.lr <= 0 or self.warmup_steps < 0:
            raise ValueError(f"lr must be > 0 and warmup_steps >= 0, got {self.lr}, {self.warmup_steps}")

    def optimizer(self, params: list[torch.nn.Parameter]) -> torch.optim.Optimizer:
        if self.weight_decay == 0:
            return torch.optim.Adam(params, lr=self.lr, betas=self.betas)
        if not self.decay_matrices_only:
            return torch.optim.AdamW(params, lr=self.lr, betas=self.betas, weight_decay=self.weight_decay)
        groups = [{"params": [p for p in params if p.ndim >= 2]},
                  {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0}]
        return torch.optim.AdamW(groups, lr=self.lr, betas=self.betas, weight_decay=self.weight_decay)

    def lr_at(self, step: int) -> float:
        """LR of optimiser step ``step`` (0-based)."""
        return self.lr * min(1.0, (step + 1) / self.warmup_steps) if self.warmup_steps else self.lr


# Ours: the optimiser of configs/tokenizer/*.yaml (MAGVIT's Adam betas (0, 0.99), no weight decay, grad clip 1.0,
# tiny.yaml's 20 warm-up steps for short runs) and the quantizer weights of B.yaml (entropy 0.1, commitment 0.25).
# LR 3e-4: the best of 3e-4 / 1e-3 / 3e-3 in the LR check (benchmarks/results/reconstruction_lr.md; tiny.yaml has 1e-3).
OURS_RECIPE = Recipe(lr=3e-4, betas=(0.0, 0.99), weight_decay=0.0, grad_clip=1.0, warmup_steps=20,
                     source="configs/tokenizer/*.yaml optim (Adam betas (0, 0.99), wd 0, grad clip 1.0, tiny.yaml's "
                            "20 warm-up steps) and B.yaml's quantizer weights (entropy 0.1, commitment 0.25); LR 3e-4, "
                            "the best of 3e-4 / 1e-3 / 3e-3 in the LR check")


# ------------------------------------------------------------------------------------------------------------------
# Our tokenizer and its design-choice variants
# ------------------------------------------------------------------------------------------------------------------
# Name -> TokenizerConfig overrides on top of `_base`. "v1" = MAGVIT blocks (average pooling, nearest upsampling, the
# decoder mirroring the encoder), "v2" = magvit.tokenizer.V2 (MAGVIT-v2's blocks); the quantizers are at ~2**10
# codes: VQ 1024 codes, LFQ 10 bits, FSQ (8, 5, 5, 5) = 1000.
_VQ = dict(quantizer="vq", codebook_size=1024, embedding_dim=64)  # 1024 codes of 64 dims (~5M like the others)
_LFQ = dict(quantizer="lfq", codebook_size=1024)  # 10 bits
_FSQ = dict(quantizer="fsq", codebook_size=1000)  # the paper's levels for ~2^10: (8, 5, 5, 5)

def _v2() -> dict[str, Any]:
    from magvit.tokenizer import V2  # strided-conv down, depth-to-space up, adaptive GroupNorm, low-res decoder

    return V2


VARIANTS: dict[str, dict[str, Any]] = {
    "v1-vq": _VQ,
    "v1-lfq": _LFQ,
    "v1-fsq": _FSQ,
    "v2-vq": {"v2": True, **_VQ},
    "v2-lfq": {"v2": True, **_LFQ},
    "v2-fsq": {"v2": True, **_FSQ},
    # continuous latents at the same grid and width as the LFQ side's 10 channels: a plain autoencoder and LDM's
    # KL-VAE (kl_weight 1e-6)
    "v2-ae": {"v2": True, "quantizer": "none", "embedding_dim": 10},
    "v2-kl": {"v2": True, "quantizer": "kl", "embedding_dim": 10},
    # VQ-VAE-2's two grids at the code bits of one 2^10 grid: bottom 8 bits x N + top 8 bits x N/4 = 10 bits x N
    "v2-vq-h2": {"v2": True, **_VQ, "codebook_size": 256, "hierarchy": 2},
    "v2-lfq-h2": {"v2": True, **_LFQ, "codebook_size": 256, "hierarchy": 2},
}

#: the configuration the design-choice run chose (benchmarks/results/reconstruction_design.md: v2 blocks beat v1 by
#: 2.4 dB at 5 minutes; LFQ led VQ / FSQ by 0.2 / 1.1 dB with the highest codebook usage); build_ours builds it
RECOMMENDED = "v2-lfq"


def _base(num_frames: int, image_size: int, base_channels: int, num_res_blocks: int) -> dict[str, Any]:
    return dict(num_frames=num_frames, image_size=image_size, base_channels=base_channels,
                channel_multipliers=(1, 2, 2, 4), num_res_blocks=num_res_blocks,
                temporal_downsample=(True, True, False), causal=num_frames % 2 == 1, norm_groups=8)


def variant_config(name: str, num_frames: int, image_size: int, base_channels: int = 32, num_res_blocks: int = 1):
    """``TokenizerConfig`` of variant ``name`` (a key of :data:`VARIANTS`) at the given width."""
    from magvit.tokenizer import TokenizerConfig

    if name not in VARIANTS:
        raise ValueError(f"unknown tokenizer variant {name!r}; choose from {', '.join(VARIANTS)}")
    options = dict(VARIANTS[name])
    blocks = _v2() if options.pop("v2", False) else {}
    return TokenizerConfig(**{**_base(num_frames, image_size, base_channels, num_res_blocks), **blocks, **options})


def build_variant(name: str, num_frames: int, image_size: int, base_channels: int = 32, num_res_blocks: int = 1):
    from magvit.tokenizer import VideoTokenizer

    return VideoTokenizer(variant_config(name, num_frames, image_size, base_channels, num_res_blocks))


def matched_variant(name: str, num_frames: int, image_size: int, target_params: int,
                    widths: tuple[int, ...] = tuple(range(16, 97, 4))):
    """Variant ``name`` at the base width (multiple of 4) whose parameter count is the closest to ``target_params``."""
    best = None
    for width in widths:  # parameters grow with the width: stop at the first one above the target
        model = build_variant(name, num_frames, image_size, width)
        params = count_parameters(model)
        if best is None or abs(params - target_params) < best[0]:
            best = (abs(params - target_params), model)
        if params > target_params:
            break
    return best[1]


def ours_config(num_frames: int, image_size: int, base_channels: int = 32, num_res_blocks: int = 1):
    """The recommended tokenizer's config at this width."""
    return variant_config(RECOMMENDED, num_frames, image_size, base_channels, num_res_blocks)


def build_ours(num_frames: int, image_size: int, base_channels: int = 32, num_res_blocks: int = 1):
    """The project's recommended tokenizer (:data:`RECOMMENDED`) at this width."""
    return build_variant(RECOMMENDED, num_frames, image_size, base_channels, num_res_blocks)


# ------------------------------------------------------------------------------------------------------------------
# magvit2-pytorch
# ------------------------------------------------------------------------------------------------------------------
def magvit2_layers(base: int, res_per_level: int, deep_res: int) -> tuple:
    """MAGVIT-v2-style layer list with our channel plan (b, 2b, 2b, 4b) and 4x time / 8x space compression."""
    r = ("residual",) * res_per_level
    return (*r, ("compress_space", 2 * base), ("compress_time", 2 * base), *r,
            ("compress_space", 2 * base), ("compress_time", 2 * base), *r,
            ("compress_space", 4 * base), *(("residual",) * deep_res))


def build_magvit2(image_size: int, target_params: int, base_channels: int = 32, res_per_level: int = 1):
    """``magvit2_pytorch.VideoTokenizer`` whose parameter count (discriminator excluded) is the closest to
    ``target_params`` when residual units are added at the deepest level. Returns ``(model, layers)``."""
    from magvit2_pytorch import VideoTokenizer

    def make(deep: int):
        layers = magvit2_layers(base_channels, res_per_level, deep)
        model = VideoTokenizer(image_size=image_size, init_dim=base_channels, layers=layers, codebook_size=1024,
                               use_gan=False, perceptual_loss_weight=0.0, flash_attn=False)
        return model, layers

    best = None
    for deep in range(0, 16):
        model, layers = make(deep)
        diff = count_parameters(model, MAGVIT2_SKIP) - target_params
        if best is None or abs(diff) < abs(best[0]):
            best = (diff, model, layers)
        if diff > 0:
            break
    return best[1], best[2]


# magvit2-pytorch 0.5.1's own defaults (trainer.py VideoTokenizerTrainer, optimizer.py get_optimizer): AdamW betas
# (0.9, 0.99), eps 1e-8, weight decay 1e-2 on >= 2-D tensors only, no grad clipping (max_grad_norm=None), linear
# warm-up of 1000 steps, LR 1e-5; its VideoTokenizer's loss weights (LFQ entropy 0.1, commitment 1.0, diversity
# gamma 2.5, quantizer aux weight 1.0, MSE reconstruction). Its 1e-5 LR and 1000 warm-up steps are meant for long
# GPU runs and would not finish warming up in a run of minutes, so the LR is the best of 1e-4 / 3e-4 / 1e-3 in the
# LR check (benchmarks/results/reconstruction_lr.md) and the warm-up is ours.
MAGVIT2_RECIPE = Recipe(lr=3e-4, betas=(0.9, 0.99), weight_decay=1e-2, decay_matrices_only=True, grad_clip=None,
                        warmup_steps=20,
                        source="magvit2-pytorch's trainer defaults (AdamW betas (0.9, 0.99), wd 1e-2 on matrices, no "
                               "grad clip) and its VideoTokenizer's loss weights (LFQ entropy 0.1, commitment 1.0, "
                               "diversity gamma 2.5); LR 3e-4, the best of 1e-4 / 3e-4 / 1e-3 in the LR check, 20 "
                               "warm-up steps (its trainer's 1e-5 / 1000 warm-up steps are for long GPU runs)")


# ------------------------------------------------------------------------------------------------------------------
# Uniform calls on both
# ------------------------------------------------------------------------------------------------------------------
class OursSide:
    """Uniform calls on the project's tokenizer."""

    name = "magvit (this project)"
    recon_loss = "mse"  # or "l1" (magvit.losses.reconstruction_loss)

    def __init__(self, model, recipe: Recipe = OURS_RECIPE, name: str | None = None):
        self.model = model
        self.recipe = recipe
        if name is not None:
            self.name = name

    @property
    def codebook_size(self) -> int:
        return self.model.quantizer.codebook_size if hasattr(self.model.quantizer, "codebook_size") \
            else self.model.config.codebook_size

    def parameters(self) -> list[torch.nn.Parameter]:
        return [p for p in self.model.parameters() if p.requires_grad]

    def num_parameters(self) -> int:
        return count_parameters(self.model)

    def train_loss(self, video: torch.Tensor) -> torch.Tensor:
        recon, stats = self.model(video)
        pixel = F.l1_loss if self.recon_loss == "l1" else F.mse_loss
        return pixel(recon.float(), video) + stats["quantizer_loss"]

    def encode(self, video: torch.Tensor) -> torch.Tensor:
        return self.model.encode(video)

    def decode(self, codes: torch.Tensor) -> torch.Tensor:
        return self.model.decode(codes)

    def reconstruct(self, video: torch.Tensor) -> torch.Tensor:
        return self.model.decode(self.model.encode(video))


class Magvit2Side:
    """Uniform calls on ``magvit2_pytorch.VideoTokenizer``: an odd frame count holds a separate first frame."""

    name = "magvit2-pytorch"

    def __init__(self, model, recipe: Recipe = MAGVIT2_RECIPE, name: str | None = None):
        self.model = model
        self.recipe = recipe
        if name is not None:
            self.name = name

    @property
    def codebook_size(self) -> int:
        return 1024

    def parameters(self) -> list[torch.nn.Parameter]:
        return [p for n, p in self.model.named_parameters() if not n.startswith(MAGVIT2_SKIP) and p.requires_grad]

    def num_parameters(self) -> int:
        return count_parameters(self.model, MAGVIT2_SKIP)

    def train_loss(self, video: torch.Tensor) -> torch.Tensor:
        loss, _ = self.model(video, return_loss=True, video_contains_first_frame=video.shape[2] % 2 == 1)
        return loss

    def encode(self, video: torch.Tensor) -> torch.Tensor:
        self._frames = video.shape[2]
        return self.model(video, return_codes=True, video_contains_first_frame=video.shape[2] % 2 == 1)

    def decode(self, codes: torch.Tensor) -> torch.Tensor:
        return self.model.decode_from_code_indices(codes, video_contains_first_frame=self._frames % 2 == 1)

    def reconstruct(self, video: torch.Tensor) -> torch.Tensor:
        return self.model(video, video_contains_first_frame=video.shape[2] % 2 == 1)


def with_recipe(side, **changes):
    """``side`` with some recipe fields changed (e.g. ``lr=3e-4``), for LR checks."""
    side.recipe = dataclasses.replace(side.recipe, **changes)
    return side


# ------------------------------------------------------------------------------------------------------------------
# phenaki-pytorch (generation peer of bench_mnist.py)
# ------------------------------------------------------------------------------------------------------------------
#: phenaki's text encoder name, registered with a locally built T5 config: the models here are unconditional on text
#: (its T5 weights cannot be downloaded), so only the config's width is read (``phenaki_pytorch.t5.get_encoded_dim``,
#: which ``Phenaki.__init__`` calls even for an unconditional MaskGit), never any weights
PHENAKI_NO_TEXT = "no-text (unconditional)"


def build_cvivit(token_grid: tuple[int, int, int], num_frames: int, image_size: int, codebook_size: int,
                 dim: int = 128):
    """phenaki-pytorch's C-ViViT mapping causal ``num_frames`` x ``image_size`` clips to ``token_grid`` (first frame
    alone, then tubelets of ``(num_frames - 1) / (t - 1)`` frames of ``image_size / h`` patches), LFQ (its default)
    with ``codebook_size`` codes, 2 spatial + 2 temporal layers; no VGG (its weights download) and no GAN."""
    from phenaki_pytorch import CViViT

    t, h, _ = token_grid
    return CViViT(dim=dim, codebook_size=codebook_size, image_size=image_size, patch_size=image_size // h,
                  temporal_patch_size=(num_frames - 1) // (t - 1), spatial_depth=2, temporal_depth=2, dim_head=32,
                  heads=4, use_vgg_and_gan=False)


def build_phenaki(cvivit, num_tokens: int, dim: int = 128, depth: int = 4, steps: int = 12):
    """``Phenaki`` around an unconditional (no text) ``MaskGit`` of ``depth`` layers of ``dim`` over ``num_tokens``
    video tokens of ``cvivit`` (which ``Phenaki`` copies: build it after training the C-ViViT)."""
    from phenaki_pytorch import MaskGit, Phenaki, t5
    from transformers import T5Config

    t5.T5_CONFIGS.setdefault(PHENAKI_NO_TEXT, {"config": T5Config()})
    maskgit = MaskGit(dim=dim, num_tokens=cvivit.vq.codebook_size, max_seq_len=num_tokens, depth=depth, heads=4,
                      dim_head=32, unconditional=True)
    return Phenaki(maskgit=maskgit, cvivit=cvivit, steps=steps, t5_name=PHENAKI_NO_TEXT)
