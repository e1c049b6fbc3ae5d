"""The project's tokenizer and ``magvit2-pytorch``'s at a matched parameter count and the same compression.

Both are LFQ tokenizers with a 2**10 codebook that compress 4x in time and 8x in space (16x128x128 -> 4x16x16,
17x64x64 -> 5x8x8 with a causal first frame). Neither side uses a GAN or a perceptual loss here, so a training step
is reconstruction (MSE) + the quantizer's own loss, forward and backward.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def count_parameters(module: torch.nn.Module, skip: tuple[str, ...] = ()) -> int:
    return sum(p.numel() for name, p in module.named_parameters() if not name.startswith(skip))


# magvit2-pytorch builds a discriminator even with use_gan=False; it takes no part in these steps.
MAGVIT2_SKIP = ("discr", "multiscale_discrs", "vgg")


def ours_config(num_frames: int, image_size: int, base_channels: int = 32, num_res_blocks: int = 1):
    from magvit.tokenizer import TokenizerConfig

    return TokenizerConfig(
        num_frames=num_frames, image_size=image_size, base_channels=base_channels,
        channel_multipliers=(1, 2, 2, 4), num_res_blocks=num_res_blocks, temporal_downsample=(True, True, False),
        codebook_size=1024, quantizer="lfq", causal=num_frames % 2 == 1, norm_groups=8,
    )


def build_ours(num_frames: int, image_size: int, base_channels: int = 32, num_res_blocks: int = 1):
    from magvit.tokenizer import VideoTokenizer

    return VideoTokenizer(ours_config(num_frames, image_size, base_channels, num_res_blocks))


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


class OursSide:
    """Uniform calls on the project's tokenizer."""

    name = "magvit (this project)"

    def __init__(self, model):
        self.model = model

    def train_loss(self, video: torch.Tensor) -> torch.Tensor:
        recon, stats = self.model(video)
        return F.mse_loss(recon.float(), video) + stats["quantizer_loss"]

    def encode(self, video: torch.Tensor) -> torch.Tensor:
        return self.model.encode(video)

    def decode(self, codes: torch.Tensor) -> torch.Tensor:
        return self.model.decode(codes)

    def reconstruct(self, video: torch.Tensor) -> torch.Tensor:
        return self.model.decode(self.model.encode(video))


class Magvit2Side:
    """Uniform calls on ``magvit2_pytorch.VideoTokenizer``: an odd frame count holds a separate first frame."""

    name = "magvit2-pytorch"

    def __init__(self, model):
        self.model = model

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
