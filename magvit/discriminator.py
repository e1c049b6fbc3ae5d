"""MAGVIT's 3D StyleGAN-like discriminator: one logit per clip.

No normalisation layers (so the R1 penalty and LeCam regularisation act on a plain function of the input). The stem
conv3x3x3 + leaky ReLU is followed by residual blocks that each halve H and W (and T where ``temporal_downsample``
says so) by average pooling, then a conv3x3x3, a flatten, and two linear layers down to one logit.

Time is halved rounding up (an odd last frame is averaged alone; a single frame stays), so the B / L presets bring
16 frames to 8, 4, 2, 1, 1 and MAGVIT-v2's 17 frames to 9, 5, 3, 2, 1: the head sees one frame, as in the official
discriminator.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from .config import Config
from .tokenizer import avg_pool3d


@dataclass
class DiscriminatorConfig(Config):
    """Input size and widths of :class:`Discriminator` (the flatten + linear head fixes the clip size)."""

    PRESETS: ClassVar[dict[str, dict[str, Any]]] = {
        "tiny": dict(num_frames=8, image_size=32, base_channels=16, channel_multipliers=(1, 2, 2),
                     temporal_downsample=(True, True, True)),
        # MAGVIT-B/L: 64 filters, multipliers (2, 4, 4, 4, 4) on 16x128x128 clips -> (1, 4, 4) before the head.
        "B": dict(num_frames=16, image_size=128, base_channels=64, channel_multipliers=(2, 4, 4, 4, 4),
                  temporal_downsample=(True, True, True, True, True)),
        "L": dict(num_frames=16, image_size=128, base_channels=128, channel_multipliers=(2, 4, 4, 4, 4),
                  temporal_downsample=(True, True, True, True, True)),
    }

    num_frames: int = 16
    image_size: int = 128
    in_channels: int = 3
    base_channels: int = 64
    channel_multipliers: tuple[int, ...] = (2, 4, 4, 4, 4)
    temporal_downsample: tuple[bool, ...] = (True, True, True, True, True)  # one flag per residual block
    negative_slope: float = 0.2

    def __post_init__(self) -> None:
        if len(self.temporal_downsample) != len(self.channel_multipliers):
            raise ValueError(
                f"temporal_downsample needs one flag per residual block ({len(self.channel_multipliers)}), "
                f"got {tuple(self.temporal_downsample)}"
            )
        sf = self.spatial_factor
        if self.num_frames < 1 or self.image_size % sf:
            raise ValueError(
                f"num_frames must be >= 1 and image_size divisible by {sf}, "
                f"got num_frames={self.num_frames}, image_size={self.image_size}"
            )

    @property
    def spatial_factor(self) -> int:
        """Spatial downsampling factor of the residual blocks (each halves H and W)."""
        return 2 ** len(self.channel_multipliers)

    @property
    def output_grid(self) -> tuple[int, int]:
        """(frames, pixels per side) that reach the linear head; time is halved rounding up where flagged."""
        frames = self.num_frames
        for flag in self.temporal_downsample:
            frames = -(-frames // 2) if flag else frames
        return frames, self.image_size // self.spatial_factor


class DiscriminatorBlock(nn.Module):
    """conv3x3x3 -> lrelu -> avgpool -> conv3x3x3 -> lrelu, plus avgpool -> conv1x1x1 shortcut; sum / sqrt(2)."""

    def __init__(self, in_channels: int, out_channels: int, temporal: bool, negative_slope: float) -> None:
        super().__init__()
        self.conv1 = nn.Conv3d(in_channels, in_channels, 3, padding=1)
        self.conv2 = nn.Conv3d(in_channels, out_channels, 3, padding=1)
        self.shortcut = nn.Conv3d(in_channels, out_channels, 1, bias=False)
        self.pool = (2 if temporal else 1, 2, 2)
        self.negative_slope = negative_slope

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, C, T, H, W) -> (B, C', ceil(T / 2) or T, H/2, W/2)
        pool = self.pool if x.shape[2] > 1 else (1, 2, 2)  # one frame stays one frame
        h = F.leaky_relu(self.conv1(x), self.negative_slope)
        h = avg_pool3d(h, pool, ceil_mode=True)  # odd T: the last frame is averaged alone
        h = F.leaky_relu(self.conv2(h), self.negative_slope)
        residual = self.shortcut(avg_pool3d(x, pool, ceil_mode=True))
        return (h + residual) / math.sqrt(2)  # keeps the activation scale


class Discriminator(nn.Module):
    """Video ``(B, C, T, H, W)`` in [-1, 1] -> logits ``(B,)``."""

    def __init__(self, config: DiscriminatorConfig) -> None:
        super().__init__()
        self.config = config
        width = config.base_channels
        self.conv_in = nn.Conv3d(config.in_channels, width, 3, padding=1)
        blocks = []
        for mult, temporal in zip(config.channel_multipliers, config.temporal_downsample):
            blocks.append(DiscriminatorBlock(width, config.base_channels * mult, temporal, config.negative_slope))
            width = config.base_channels * mult
        self.blocks = nn.Sequential(*blocks)
        self.conv_out = nn.Conv3d(width, width, 3, padding=1)
        t, s = config.output_grid
        self.fc = nn.Linear(width * t * s * s, width)
        self.head = nn.Linear(width, 1)

    def forward(self, video: torch.Tensor) -> torch.Tensor:
        cfg = self.config
        expected = (cfg.in_channels, cfg.num_frames, cfg.image_size, cfg.image_size)
        if video.dim() != 5 or tuple(video.shape[1:]) != expected:
            raise ValueError(f"expected a video of shape (B, {', '.join(map(str, expected))}), got {tuple(video.shape)}")
        slope = cfg.negative_slope
        x = F.leaky_relu(self.conv_in(video), slope)
        x = self.blocks(x)
        x = F.leaky_relu(self.conv_out(x), slope)
        x = F.leaky_relu(self.fc(x.flatten(1)), slope)
        return self.head(x).squeeze(1)


__all__ = ["DiscriminatorConfig", "Discriminator", "DiscriminatorBlock"]
