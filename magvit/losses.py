"""Tokenizer training losses: reconstruction, GAN (hinge / non-saturating), R1, LeCam, GAN weighting, perceptual.

Plain functions, plus small modules where state is held (LeCam's EMA of discriminator outputs, the frozen ResNet of
the perceptual loss). Videos are ``(B, C, T, H, W)`` in [-1, 1]; discriminator logits are ``(B,)``.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Literal

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn

from .config import Config, require_finite
from .distributed import all_reduce_tensor_

GanLossType = Literal["hinge", "non_saturating"]


@dataclasses.dataclass
class TokenizerLossConfig(Config):
    """Generator/discriminator objective of MAGVIT (reconstruction + quantizer + perceptual + GAN)."""

    recon_loss: Literal["mse", "l1"] = "mse"
    recon_weight: float = 1.0
    perceptual_weight: float = 0.0  # > 0 needs perceptual_model (a local weights path)
    perceptual_model: str = ""
    gan_loss: GanLossType = "hinge"
    gan_weight: float = 0.1
    adaptive_gan_weight: bool = True  # VQGAN's ratio of gradient norms at the decoder's last layer
    disc_start: int = 2000  # steps of reconstruction-only training before the discriminator joins
    r1_weight: float = 0.0  # adds r1_weight * E||grad_x D(real)||^2 (MAGVIT: 10)
    lecam_weight: float = 0.0
    lecam_decay: float = 0.999

    def __post_init__(self):
        weights = ("recon_weight", "perceptual_weight", "gan_weight", "r1_weight", "lecam_weight")
        require_finite(self, (*weights, "lecam_decay"))
        if any(getattr(self, name) < 0 for name in weights) or not 0 <= self.lecam_decay < 1 or self.disc_start < 0:
            raise ValueError("loss: need weights >= 0, 0 <= lecam_decay < 1 and disc_start >= 0")
        if self.perceptual_weight > 0 and not self.perceptual_model:
            raise ValueError("perceptual_weight > 0 needs perceptual_model (a local ResNet-50 folder)")


# ImageNet statistics the torchvision / transformers ResNet-50 was trained with.
_IMAGENET_MEAN = (0.485, 0.456, 0.406)
_IMAGENET_STD = (0.229, 0.224, 0.225)


def reconstruction_loss(real: torch.Tensor, fake: torch.Tensor, kind: Literal["mse", "l1"] = "mse") -> torch.Tensor:
    """Mean squared (``mse``, MAGVIT's default) or absolute (``l1``) error, computed in fp32."""
    if real.shape != fake.shape:
        raise ValueError(f"reconstruction_loss: shapes differ, real {tuple(real.shape)} vs fake {tuple(fake.shape)}")
    if kind == "mse":
        return F.mse_loss(fake.float(), real.float())
    if kind == "l1":
        return F.l1_loss(fake.float(), real.float())
    raise ValueError(f"reconstruction loss kind must be 'mse' or 'l1', got {kind!r}")


def generator_loss(fake_logits: torch.Tensor, kind: GanLossType = "non_saturating") -> torch.Tensor:
    """Generator GAN loss on D(fake): non-saturating ``softplus(-D)`` or hinge ``-D``, averaged."""
    fake_logits = fake_logits.float()
    if kind == "non_saturating":
        return F.softplus(-fake_logits).mean()
    if kind == "hinge":
        return -fake_logits.mean()
    raise ValueError(f"GAN loss kind must be 'hinge' or 'non_saturating', got {kind!r}")


def discriminator_loss(real_logits: torch.Tensor, fake_logits: torch.Tensor,
                       kind: GanLossType = "non_saturating") -> torch.Tensor:
    """Discriminator GAN loss: non-saturating ``softplus(-D(real)) + softplus(D(fake))`` or hinge
    ``relu(1 - D(real)) + relu(1 + D(fake))``, each term averaged over the batch."""
    real_logits, fake_logits = real_logits.float(), fake_logits.float()
    if kind == "non_saturating":
        return F.softplus(-real_logits).mean() + F.softplus(fake_logits).mean()
    if kind == "hinge":
        return F.relu(1.0 - real_logits).mean() + F.relu(1.0 + fake_logits).mean()
    raise ValueError(f"GAN loss kind must be 'hinge' or 'non_saturating', got {kind!r}")


def r1_penalty(real_logits: torch.Tensor, real_inputs: torch.Tensor) -> torch.Tensor:
    """R1 gradient penalty ``E_x ||grad_x D(x)||^2`` on real inputs. MAGVIT's discriminator loss adds
    ``r1_weight * r1_penalty`` (weight 10, no StyleGAN-style 1/2 factor).

    ``real_inputs`` must have ``requires_grad=True`` and ``real_logits = D(real_inputs)``; the graph is kept so the
    penalty can be back-propagated into D.
    """
    if not real_inputs.requires_grad:
        raise ValueError("r1_penalty: real_inputs must require grad (call real.requires_grad_(True) before D(real))")
    (grad,) = torch.autograd.grad(real_logits.float().sum(), real_inputs, create_graph=True)
    return grad.float().pow(2).flatten(1).sum(1).mean()


class LeCamRegularizer(nn.Module):
    """LeCam regularisation (Tseng et al. 2021) with EMAs of the discriminator's mean outputs as anchors.

    ``loss = E[relu(D(real) - ema_fake)^2] + E[relu(ema_real - D(fake))^2]``. ``forward`` updates the EMAs from the
    batch (averaged across ranks when torch.distributed is initialised, so every rank holds the same anchors) and
    returns the loss computed with the anchors before this update.
    """

    ema_real: torch.Tensor
    ema_fake: torch.Tensor

    def __init__(self, decay: float = 0.999) -> None:
        super().__init__()
        if not 0.0 <= decay < 1.0:
            raise ValueError(f"LeCam EMA decay must be in [0, 1), got {decay}")
        self.decay = decay
        self.register_buffer("ema_real", torch.zeros(()))
        self.register_buffer("ema_fake", torch.zeros(()))

    def penalty(self, real_logits: torch.Tensor, fake_logits: torch.Tensor) -> torch.Tensor:
        """The regulariser with the current anchors (no update)."""
        real_logits, fake_logits = real_logits.float(), fake_logits.float()
        return (F.relu(real_logits - self.ema_fake).pow(2).mean()
                + F.relu(self.ema_real - fake_logits).pow(2).mean())

    @torch.no_grad()
    def update(self, real_logits: torch.Tensor, fake_logits: torch.Tensor) -> None:
        """``ema <- decay * ema + (1 - decay) * mean(batch)`` for real and fake logits."""
        means = torch.stack([real_logits.detach().float().mean(), fake_logits.detach().float().mean()])
        all_reduce_tensor_(means, op="mean")  # every rank holds the same anchors
        self.ema_real.mul_(self.decay).add_((1 - self.decay) * means[0])
        self.ema_fake.mul_(self.decay).add_((1 - self.decay) * means[1])

    def forward(self, real_logits: torch.Tensor, fake_logits: torch.Tensor) -> torch.Tensor:
        loss = self.penalty(real_logits, fake_logits)
        if self.training:
            self.update(real_logits, fake_logits)
        return loss


def adaptive_gan_weight(rec_loss: torch.Tensor, gan_loss: torch.Tensor, last_layer: torch.Tensor,
                        delta: float = 1e-6, max_weight: float = 1e4) -> torch.Tensor:
    """VQGAN's adaptive weight ``||grad_w rec_loss|| / (||grad_w gan_loss|| + delta)`` at the decoder's last layer
    ``w``, clamped to ``[0, max_weight]`` and detached. ``rec_loss`` is the non-GAN part of the generator loss."""
    (rec_grad,) = torch.autograd.grad(rec_loss, last_layer, retain_graph=True)
    (gan_grad,) = torch.autograd.grad(gan_loss, last_layer, retain_graph=True)
    weight = rec_grad.float().norm() / (gan_grad.float().norm() + delta)
    return weight.clamp(0.0, max_weight).detach()


def discriminator_active(step: int, start_step: int) -> bool:
    """Whether the GAN terms are on at ``step`` (MAGVIT / VQGAN start the discriminator after a warm-up)."""
    return step >= start_step


def gan_weight(step: int, start_step: int, weight: float, *, adaptive: bool = False,
               rec_loss: torch.Tensor | None = None, gan_loss: torch.Tensor | None = None,
               last_layer: torch.Tensor | None = None, delta: float = 1e-6, max_weight: float = 1e4) -> torch.Tensor:
    """The weight of the generator's GAN loss at ``step``: 0 before ``start_step``; then ``weight`` (fixed, MAGVIT)
    or ``weight * adaptive_gan_weight(...)`` (VQGAN) when ``adaptive``."""
    if not discriminator_active(step, start_step):
        return torch.zeros(())
    if not adaptive:
        return torch.tensor(float(weight))
    if rec_loss is None or gan_loss is None or last_layer is None:
        raise ValueError("adaptive GAN weight needs rec_loss, gan_loss and last_layer")
    return weight * adaptive_gan_weight(rec_loss, gan_loss, last_layer, delta=delta, max_weight=max_weight)


class PerceptualLoss(nn.Module):
    """MAGVIT's perceptual loss: mean squared difference of ResNet-50 logits of real and reconstructed frames.

    The network is a ``transformers`` ``ResNetForImageClassification`` loaded from a LOCAL directory (nothing is
    downloaded), frozen and kept in eval mode. With ``path=None`` the loss is off and returns 0. Frames are mapped from
    [-1, 1] to ImageNet normalisation and, if ``resolution`` is set, resized to it (224 for ResNet-50).
    """

    def __init__(self, path: str | os.PathLike | None = None, resolution: int | None = 224) -> None:
        super().__init__()
        self.resolution = resolution
        self.network: nn.Module | None = None
        if path is not None:
            if not os.path.isdir(path):
                raise ValueError(f"perceptual loss: expected a local ResNet directory, got {str(path)!r}")
            from transformers import ResNetForImageClassification

            network = ResNetForImageClassification.from_pretrained(str(path), local_files_only=True)
            network.requires_grad_(False)
            self.network = network.eval()
        self.register_buffer("mean", torch.tensor(_IMAGENET_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(_IMAGENET_STD).view(1, 3, 1, 1), persistent=False)

    @property
    def enabled(self) -> bool:
        return self.network is not None

    def train(self, mode: bool = True) -> "PerceptualLoss":
        super().train(mode)
        if self.network is not None:
            self.network.eval()  # frozen: batch-norm statistics never move
        return self

    def logits(self, video: torch.Tensor) -> torch.Tensor:
        """``(B, 3, T, H, W)`` in [-1, 1] -> logits ``(B * T, num_labels)``."""
        frames = rearrange(video, "b c t h w -> (b t) c h w")
        frames = ((frames + 1) / 2 - self.mean.to(frames.dtype)) / self.std.to(frames.dtype)
        if self.resolution is not None and frames.shape[-2:] != (self.resolution, self.resolution):
            frames = F.interpolate(frames, size=(self.resolution, self.resolution), mode="bilinear",
                                   align_corners=False)
        return self.network(pixel_values=frames).logits

    def forward(self, real: torch.Tensor, fake: torch.Tensor) -> torch.Tensor:
        if self.network is None:
            return torch.zeros((), device=fake.device)
        if real.shape != fake.shape or real.dim() != 5:
            raise ValueError(f"perceptual loss: expected two (B, 3, T, H, W) videos, got {tuple(real.shape)} and "
                             f"{tuple(fake.shape)}")
        with torch.no_grad():
            real_logits = self.logits(real)
        return F.mse_loss(self.logits(fake).float(), real_logits.float())


__all__ = [
    "reconstruction_loss", "generator_loss", "discriminator_loss", "r1_penalty", "LeCamRegularizer",
    "adaptive_gan_weight", "discriminator_active", "gan_weight", "PerceptualLoss",
]
