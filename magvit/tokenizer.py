"""3D-convolutional VQ video tokenizer (MAGVIT), with MAGVIT-v2's causal convolution and lookup-free quantization.

``VideoTokenizer`` = ``Encoder`` (3D conv, average-pool downsampling) -> quantizer (VQ, LFQ or FSQ,
``magvit.quantizers``) -> ``Decoder`` (3D conv, nearest upsampling + conv). Videos are float ``(B, 3, T, H, W)`` in
``[-1, 1]``; codes are long ``(B, t, h, w)``. With a continuous bottleneck (``quantizer="none"``: a plain
autoencoder; ``"kl"``: LDM's KL-regularised VAE) the same networks make an autoencoder whose ``encode`` gives float
latents ``(B, D, t, h, w)`` instead of codes and whose ``decode`` takes them. ``hierarchy=2`` adds VQ-VAE-2's top
level (Razavi et al. 2019): a second code grid at half the bottom grid's height and width (:class:`TopLevel`).

Architecture (MAGVIT v1, paper and released code): stem conv3x3x3, per level ``num_res_blocks`` residual blocks
(GroupNorm eps 1e-6 -> swish -> conv3x3x3, twice; 1x1x1 shortcut conv when the width changes), average pooling
between levels (time halved only where ``temporal_downsample`` says so), ``num_res_blocks`` more blocks after the
last level, GroupNorm -> swish -> 1x1x1 conv to the latent. The decoder mirrors it with nearest upsampling + conv3x3x3.

Causal mode (MAGVIT-v2): convolutions pad only on the past, normalisation is per frame, and temporal down/upsampling
keeps frame 0 on its own, so a ``1 + k * temporal_factor`` frame clip maps to ``1 + k`` latent frames, latent frame
``j`` sees only input frames ``<= j * temporal_factor``, and a single image (``T = 1``) is a valid input.

MAGVIT-v2 blocks (options of ``TokenizerConfig``, all on with ``**V2``): ``downsample="conv"`` (strided conv3x3x3,
causal in causal mode), ``upsample="depth_to_space"`` (conv to ``r_t * r_h * r_w`` times the channels, then a 3D
pixel shuffle), ``decoder_norm="adaptive_group"`` (GroupNorm whose scale and shift come from the quantized latents),
and ``decoder_channel_multipliers`` / ``decoder_res_blocks`` to move the decoder's work to low resolution.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Literal, Mapping, NamedTuple

import torch
import torch.nn.functional as F
from einops import rearrange
from safetensors import SafetensorError, safe_open
from torch import nn

from .config import Config
from .pretrained import WEIGHTS_NAME, PretrainedMixin, load_weights
from .quantizers import CONTINUOUS_KINDS, GaussianPosterior, QuantizerConfig, build_quantizer

# Tolerance on the [-1, 1] range check: resizing / colour conversion overshoot by a few 1e-4.
_RANGE_TOLERANCE = 1e-3

# MAGVIT-v2's blocks, for the four-level layout (channel_multipliers of length 4) of B, L and the benchmarks:
# strided-conv downsampling, depth-to-space upsampling, adaptive GroupNorm, and a decoder whose width and blocks
# sit at low resolution (no residual block at full resolution: 9.5 vs 36.9 GFLOP for v1 at 17x64x64, base 32).
# ``TokenizerConfig(..., **V2)`` or ``TokenizerConfig.preset("B", **V2)``; the ``B2`` / ``L2`` presets use it.
V2: dict[str, Any] = dict(downsample="conv", upsample="depth_to_space", decoder_norm="adaptive_group",
                          decoder_channel_multipliers=(1, 1, 2, 4), decoder_res_blocks=(0, 1, 2, 1))


@dataclass
class TokenizerConfig(Config):
    """Size and options of a :class:`VideoTokenizer`.

    ``num_frames`` / ``image_size`` are the clip size the model is trained on; the network is convolutional and takes
    any size that fits the down-sampling factors. In causal mode a clip has ``1 + k * temporal_factor`` frames:
    ``preset(name, causal=True)`` therefore uses ``num_frames + 1`` frames unless ``num_frames`` is given
    (MAGVIT-v2's 17-frame clips for B and L).
    """

    PRESETS: ClassVar[dict[str, dict[str, Any]]] = {
        # CI-sized: 8x32x32 -> 4x8x8 tokens.
        "tiny": dict(num_frames=8, image_size=32, base_channels=16, channel_multipliers=(1, 2, 2), num_res_blocks=1,
                     temporal_downsample=(True, False), embedding_dim=16, codebook_size=64, norm_groups=8),
        # MAGVIT-B / -L: 16x128x128 -> 4x16x16 tokens, codebook 1024 x 256.
        "B": dict(num_frames=16, image_size=128, base_channels=64, channel_multipliers=(1, 2, 2, 4), num_res_blocks=2,
                  temporal_downsample=(True, True, False), embedding_dim=256, codebook_size=1024),
        "L": dict(num_frames=16, image_size=128, base_channels=128, channel_multipliers=(1, 2, 2, 4), num_res_blocks=2,
                  temporal_downsample=(True, True, False), embedding_dim=256, codebook_size=1024),
        # MAGVIT-v2-style: causal (1 + 16 frames: the preset hook adds the 1), LFQ with 2**18 codes, the V2 blocks
        # with two blocks per decoder level where V2 has one; 17x128x128 -> 5x16x16 tokens.
        "B2": dict(num_frames=16, image_size=128, base_channels=64, channel_multipliers=(1, 2, 2, 4), num_res_blocks=2,
                   temporal_downsample=(True, True, False), codebook_size=2**18, quantizer="lfq", causal=True,
                   **{**V2, "decoder_res_blocks": (0, 2, 4, 2)}),
        "L2": dict(num_frames=16, image_size=128, base_channels=128, channel_multipliers=(1, 2, 2, 4), num_res_blocks=2,
                   temporal_downsample=(True, True, False), codebook_size=2**18, quantizer="lfq", causal=True,
                   **{**V2, "decoder_res_blocks": (0, 2, 4, 2)}),
    }

    num_frames: int = 16
    image_size: int = 128
    in_channels: int = 3
    base_channels: int = 64
    channel_multipliers: tuple[int, ...] = (1, 2, 2, 4)
    num_res_blocks: int = 2
    temporal_downsample: tuple[bool, ...] = (True, True, False)  # one flag per downsample (len(multipliers) - 1)
    # One flag per downsample: halve H and W there (empty = every downsample does). False keeps a level's H, W, so a
    # finer grid can keep the levels and time's downsampling, e.g. Moving MNIST's 5x16x16 from 17x64x64.
    spatial_downsample: tuple[bool, ...] = ()
    # VQ code dimension, the latent channels of none / kl (LFQ: log2(codebook_size), FSQ: len(levels); `latent_dim`)
    embedding_dim: int = 256
    # FSQ: the product of quantization.fsq_levels (empty levels: the paper's for this size). Continuous latents
    # (none / kl) have no codebook: whatever is given is ignored and stored as 0, so an export says so.
    codebook_size: int = 1024
    causal: bool = False
    quantizer: Literal["vq", "lfq", "fsq", "none", "kl"] = "vq"
    quantization: QuantizerConfig = field(default_factory=QuantizerConfig)
    temporal_kernel_size: int = 3  # 1 gives a 2D (per-frame) image tokenizer, the source of 2D->3D inflation
    norm_groups: int = 32
    # --- MAGVIT-v2 blocks (the defaults are MAGVIT v1; ``V2`` selects the whole v2 set) -------------------------
    downsample: Literal["avg_pool", "conv"] = "avg_pool"  # encoder: average pooling or a strided (causal) conv
    upsample: Literal["nearest", "depth_to_space"] = "nearest"  # decoder: nearest + conv, or conv + 3D pixel shuffle
    decoder_norm: Literal["group", "adaptive_group"] = "group"  # adaptive: scale/shift predicted from the latents
    # Decoder width / depth per level (index i = channel_multipliers[i]'s level; empty = mirror the encoder).
    decoder_channel_multipliers: tuple[int, ...] = ()
    decoder_res_blocks: tuple[int, ...] = ()
    # Code grids: 1 = one grid (MAGVIT); 2 = VQ-VAE-2's top grid at half the bottom grid's H and W (same t) with its
    # own quantizer of the same kind and size, the bottom quantized given the decoded top (discrete quantizers only).
    hierarchy: int = 1
    # Space-to-depth of each frame by ``patch_size`` before the encoder's first conv (depth-to-space after the
    # decoder's last): the full-resolution 3D convs, most of a step's cost, run at (H / p, W / p) with p^2 times the
    # input channels. Part of the spatial factor (BENCHMARKS.md "Tokenizer recipe": Moving MNIST learns faster).
    patch_size: int = 1

    def __post_init__(self) -> None:
        if self.continuous:
            self.codebook_size = 0  # no codebook (see the field's comment)
        if not self.channel_multipliers:
            raise ValueError("channel_multipliers must not be empty")
        if len(self.temporal_downsample) != len(self.channel_multipliers) - 1:
            raise ValueError(
                f"temporal_downsample needs one flag per downsample ({len(self.channel_multipliers) - 1} for "
                f"channel_multipliers={tuple(self.channel_multipliers)}), got {tuple(self.temporal_downsample)}"
            )
        if self.spatial_downsample and len(self.spatial_downsample) != len(self.channel_multipliers) - 1:
            raise ValueError(
                f"spatial_downsample needs one flag per downsample ({len(self.channel_multipliers) - 1} for "
                f"channel_multipliers={tuple(self.channel_multipliers)}) or none, got {tuple(self.spatial_downsample)}"
            )
        for name in ("num_frames", "image_size", "in_channels", "base_channels", "num_res_blocks", "embedding_dim",
                     "norm_groups", "patch_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        levels = len(self.channel_multipliers)
        for name in ("decoder_channel_multipliers", "decoder_res_blocks"):
            value = tuple(getattr(self, name))
            if value and len(value) != levels:
                raise ValueError(f"{name} needs one entry per level ({levels}) or none, got {value}")
        if min(self.decoder_channel_multipliers, default=1) < 1 or min(self.decoder_res_blocks, default=0) < 0:
            raise ValueError("decoder_channel_multipliers must be >= 1 and decoder_res_blocks >= 0")
        if self.temporal_kernel_size < 1 or self.temporal_kernel_size % 2 == 0:
            raise ValueError(f"temporal_kernel_size must be odd and >= 1, got {self.temporal_kernel_size}")
        if not self.continuous and self.codebook_size < 2:
            raise ValueError(f"codebook_size must be >= 2, got {self.codebook_size}")
        if self.quantizer == "lfq" and self.codebook_size & (self.codebook_size - 1):
            raise ValueError(f"LFQ needs a power-of-two codebook_size (2**bits), got {self.codebook_size}")
        if self.quantizer == "fsq":
            self.quantization.fsq_levels_for(self.codebook_size)  # raises unless the levels give codebook_size codes
        if self.hierarchy not in (1, 2):
            raise ValueError(f"hierarchy must be 1 (one code grid) or 2 (VQ-VAE-2's top and bottom), got {self.hierarchy}")
        if self.hierarchy == 2 and self.continuous:
            raise ValueError(f"hierarchy 2 needs a discrete quantizer (vq, lfq or fsq), got {self.quantizer!r}")
        try:
            self.token_grid(self.num_frames, self.image_size, self.image_size)
        except ValueError as err:
            raise ValueError(f"num_frames/image_size do not fit the model: {err}") from None

    # --- presets: causal clips have 1 + k * temporal_factor frames ----------------------------------------------
    @classmethod
    def _preset_dict(cls, name: str, overrides: Mapping[str, Any]) -> dict[str, Any]:
        data = super()._preset_dict(name, overrides)
        if data.get("causal") and "num_frames" not in overrides:
            data["num_frames"] = data.get("num_frames", 16) + 1
        return data

    # --- derived sizes ------------------------------------------------------------------------------------------
    @property
    def temporal_factor(self) -> int:
        return 2 ** sum(bool(flag) for flag in self.temporal_downsample)

    @property
    def spatial_flags(self) -> tuple[bool, ...]:
        """Whether each downsample halves H and W (``spatial_downsample``, else all of them)."""
        return tuple(bool(f) for f in self.spatial_downsample) or (True,) * (len(self.channel_multipliers) - 1)

    @property
    def spatial_factor(self) -> int:
        return self.patch_size * 2 ** sum(self.spatial_flags)

    @property
    def decoder_multipliers(self) -> tuple[int, ...]:
        """Channel multiplier of each decoder level (``decoder_channel_multipliers``, else the encoder's)."""
        return tuple(self.decoder_channel_multipliers or self.channel_multipliers)

    @property
    def decoder_blocks(self) -> tuple[int, ...]:
        """Residual blocks of each decoder level (``decoder_res_blocks``, else ``num_res_blocks`` everywhere)."""
        return tuple(self.decoder_res_blocks or (self.num_res_blocks,) * len(self.channel_multipliers))

    @property
    def continuous(self) -> bool:
        """Whether the latents stay continuous (``quantizer`` none / kl): no codes, ``encode`` gives latents."""
        return self.quantizer in CONTINUOUS_KINDS

    @property
    def latent_dim(self) -> int:
        """Channels of the decoder's input (the quantized latents): ``embedding_dim`` for VQ, none and kl,
        ``log2(codebook_size)`` bits for LFQ, one channel per FSQ level entry."""
        if self.quantizer == "fsq":
            return len(self.quantization.fsq_levels_for(self.codebook_size))
        return int(math.log2(self.codebook_size)) if self.quantizer == "lfq" else self.embedding_dim

    @property
    def encoder_dim(self) -> int:
        """Channels of the encoder output: ``latent_dim``, doubled for kl (the posterior's mean and log-variance)."""
        return 2 * self.latent_dim if self.quantizer == "kl" else self.latent_dim

    def check_frames(self, num_frames: int) -> None:
        """Raise ``ValueError`` unless ``num_frames`` fits the temporal downsampling (and causality)."""
        f = self.temporal_factor
        if self.causal:
            if num_frames < 1 or (num_frames - 1) % f:
                raise ValueError(
                    f"a causal tokenizer expects T = 1 + k * {f} frames (1, {1 + f}, {1 + 2 * f}, ...), got T={num_frames}"
                )
        elif num_frames < 1 or num_frames % f:
            raise ValueError(f"expected T divisible by the temporal factor {f}, got T={num_frames}")

    def token_grid(self, num_frames: int, height: int, width: int) -> tuple[int, int, int]:
        """The ``(t, h, w)`` token grid of a ``num_frames x height x width`` video (``ValueError`` if it does not fit)."""
        self.check_frames(num_frames)
        s = self.spatial_factor
        fit = s * self.hierarchy  # hierarchy 2: the top grid halves the bottom grid's H and W
        if height < 1 or width < 1 or height % fit or width % fit:
            what = "the spatial factor" if self.hierarchy == 1 else "the spatial factor times 2 (the top grid)"
            raise ValueError(f"expected H and W divisible by {what} {fit}, got H={height}, W={width}")
        f = self.temporal_factor
        t = 1 + (num_frames - 1) // f if self.causal else num_frames // f
        return t, height // s, width // s

    def top_grid(self, num_frames: int, height: int, width: int) -> tuple[int, int, int]:
        """hierarchy 2: the ``(t, h / 2, w / 2)`` top code grid of a video whose bottom grid is ``(t, h, w)``."""
        t, h, w = self.token_grid(num_frames, height, width)
        return t, h // 2, w // 2


# ------------------------------------------------------------------------------------------------------------------
# Building blocks
# ------------------------------------------------------------------------------------------------------------------


# PyTorch's CPU rule (ATen's ``use_mkldnn``, made for 2D) runs an fp32 convolution whose input has N * C * T * H <=
# 20480 on its native im2col kernel ("slow_conv3d"), forward and backward; the same input in a batch of 2 goes to
# oneDNN. For a batch-1 input and a 3x3x3 kernel, adding a zero second sample is 2.6-3.4x faster even with the extra
# work (one thread, 64 channels at 9x32x32: 480 -> 146 ms forward + backward; the tiny preset's batch-1 training step
# 314 -> 110 ms); a 1x1x1 kernel stays native at one thread, so there the extra sample only costs (2-3x slower).
_NATIVE_CONV_MAX_ELEMENTS = 20480


def cpu_batch_one_route_pays(x: torch.Tensor, kernel_size: tuple[int, ...]) -> bool:
    """Whether a convolution of ``x`` (1, C, T, H, W) with ``kernel_size`` is faster as sample 0 of a batch of 2."""
    return (x.shape[0] == 1 and x.device.type == "cpu" and x.dtype == torch.float32 and math.prod(kernel_size) > 1
            and x.shape[1:4].numel() <= _NATIVE_CONV_MAX_ELEMENTS)


class Conv3d(nn.Conv3d):
    """3D convolution with 'same' spatial padding; in time either centred ('same') or causal (past only).

    Causal padding puts ``k_t - 1`` zero frames before the clip, so output frame ``i`` sees input frames ``<= i``.
    With a temporal stride of 2 (MAGVIT-v2's strided downsampling) a causal conv maps ``1 + 2k`` frames to
    ``1 + k``: output ``j`` sees input frames ``<= 2j`` (output 0 sees frame 0 alone).

    A batch-1 CPU input where it pays (:func:`cpu_batch_one_route_pays`) runs as sample 0 of a batch of 2; set
    ``Conv3d.cpu_batch_one_route = False`` to measure without.
    """

    cpu_batch_one_route: ClassVar[bool] = True

    def __init__(self, in_channels: int, out_channels: int, kernel_size: tuple[int, int, int], *, causal: bool,
                 bias: bool = True, stride: tuple[int, int, int] = (1, 1, 1)) -> None:
        kt, kh, kw = kernel_size
        self.causal = causal
        self.time_pad = kt - 1 if causal else 0
        super().__init__(in_channels, out_channels, kernel_size, stride=stride,
                         padding=(0 if causal else kt // 2, kh // 2, kw // 2), bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, C, T, H, W) -> (B, C', T / s_t, H / s_h, W / s_w)
        if self.time_pad:
            x = F.pad(x, (0, 0, 0, 0, self.time_pad, 0))
        if self.cpu_batch_one_route and cpu_batch_one_route_pays(x, self.kernel_size):
            return super().forward(torch.cat([x, torch.zeros_like(x)]))[:1]  # sample 0 of a batch of 2
        return super().forward(x)


class GroupNorm(nn.GroupNorm):
    """GroupNorm over (C/G, T, H, W); per frame (over (C/G, H, W)) in causal mode so the future never leaks back."""

    def __init__(self, num_groups: int, num_channels: int, *, per_frame: bool) -> None:
        super().__init__(math.gcd(num_groups, num_channels), num_channels, eps=1e-6)
        self.per_frame = per_frame

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, C, T, H, W)
        if not self.per_frame:
            return super().forward(x)
        b = x.shape[0]
        y = super().forward(rearrange(x, "b c t h w -> (b t) c h w"))
        return rearrange(y, "(b t) c h w -> b c t h w", b=b)


def resize_latents(z: torch.Tensor, size: tuple[int, int, int], causal: bool) -> torch.Tensor:
    """Nearest resize of ``z`` (B, D, t, h, w) to ``size`` = (T, H, W) with integer factors. Causal: frame 0 maps to
    latent 0 and frames ``(j - 1) * r + 1 .. j * r`` to latent ``j`` (the layout of causal upsampling), so a frame
    never reads a later latent."""
    t, h, w = z.shape[2:]
    frames, height, width = size
    if frames != t:
        if causal:
            r = (frames - 1) // (t - 1)
            index = (torch.arange(frames, device=z.device) + r - 1) // r  # ceil(i / r)
        else:
            index = torch.arange(frames, device=z.device) // (frames // t)
        z = z.index_select(2, index)
    return z.repeat_interleave(height // h, dim=3).repeat_interleave(width // w, dim=4)


class AdaptiveGroupNorm(nn.Module):
    """MAGVIT-v2's adaptive GroupNorm: ``GroupNorm(x) * (1 + scale) + shift`` where a 1x1x1 conv of the quantized
    latents, resized to ``x``'s resolution, predicts the per-channel ``scale`` and ``shift`` (StyleGAN-style).

    The conv starts at zero, so a fresh block is exactly a plain :class:`GroupNorm`.
    """

    def __init__(self, num_groups: int, num_channels: int, latent_channels: int, *, causal: bool) -> None:
        super().__init__()
        self.norm = GroupNorm(num_groups, num_channels, per_frame=causal)
        self.scale_shift = Conv3d(latent_channels, 2 * num_channels, (1, 1, 1), causal=causal)
        nn.init.zeros_(self.scale_shift.weight)
        nn.init.zeros_(self.scale_shift.bias)
        self.causal = causal

    def forward(self, x: torch.Tensor, latents: torch.Tensor) -> torch.Tensor:  # (B, C, T, H, W), (B, D, t, h, w)
        # A 1x1x1 conv commutes with nearest resizing: apply it at the latent resolution (cheaper), then resize.
        params = resize_latents(self.scale_shift(latents.to(x.dtype)), x.shape[2:], self.causal)  # (B, 2C, T, H, W)
        scale, shift = params.chunk(2, dim=1)
        return self.norm(x) * (1 + scale) + shift


def _normalize(norm: nn.Module, x: torch.Tensor, latents: torch.Tensor | None) -> torch.Tensor:
    return norm(x) if latents is None else norm(x, latents)


class ResBlock(nn.Module):
    """(GroupNorm -> swish -> conv3x3x3) x 2 plus a shortcut (1x1x1 conv when the width changes).

    With ``latent_channels > 0`` the norms are :class:`AdaptiveGroupNorm` and ``forward`` takes the latents.
    """

    def __init__(self, in_channels: int, out_channels: int, config: TokenizerConfig, latent_channels: int = 0) -> None:
        super().__init__()
        k = (config.temporal_kernel_size, 3, 3)

        def norm(channels: int) -> nn.Module:
            if latent_channels:
                return AdaptiveGroupNorm(config.norm_groups, channels, latent_channels, causal=config.causal)
            return GroupNorm(config.norm_groups, channels, per_frame=config.causal)

        self.norm1 = norm(in_channels)
        self.conv1 = Conv3d(in_channels, out_channels, k, causal=config.causal, bias=False)
        self.norm2 = norm(out_channels)
        self.conv2 = Conv3d(out_channels, out_channels, k, causal=config.causal, bias=False)
        self.shortcut = (
            Conv3d(in_channels, out_channels, (1, 1, 1), causal=config.causal, bias=False)
            if in_channels != out_channels else nn.Identity()
        )

    def forward(self, x: torch.Tensor, latents: torch.Tensor | None = None) -> torch.Tensor:  # (B, C, T, H, W)
        h = self.conv1(F.silu(_normalize(self.norm1, x, latents)))
        h = self.conv2(F.silu(_normalize(self.norm2, h, latents)))
        return self.shortcut(x) + h


def avg_pool3d(x: torch.Tensor, kernel: tuple[int, int, int], ceil_mode: bool = False) -> torch.Tensor:
    """``F.avg_pool3d`` that also runs on bf16 CPU tensors."""
    # avg_pool3d has no bf16 CPU kernel: pool in fp32 (exact for a mean of 8 values) and cast back.
    if x.dtype in (torch.bfloat16, torch.float16) and x.device.type == "cpu":
        return F.avg_pool3d(x.float(), kernel, ceil_mode=ceil_mode).to(x.dtype)
    return F.avg_pool3d(x, kernel, ceil_mode=ceil_mode)


def downsample(x: torch.Tensor, temporal: bool, causal: bool, spatial: bool = True) -> torch.Tensor:
    """Average pooling by 2 in H, W (if ``spatial``) and T (if ``temporal``). Causal: frame 0 is pooled alone in
    space, frames 1.. in pairs, so ``1 + 2k`` frames become ``1 + k`` and frame 0 stays separate."""
    s = 2 if spatial else 1
    if not temporal:
        return avg_pool3d(x, (1, s, s)) if spatial else x
    if causal:
        first = avg_pool3d(x[:, :, :1], (1, s, s)) if spatial else x[:, :, :1]  # (B, C, 1, H/s, W/s)
        rest = avg_pool3d(x[:, :, 1:], (2, s, s)) if x.shape[2] > 1 else x[:, :, :0, ::s, ::s]
        return torch.cat([first, rest], dim=2)
    return avg_pool3d(x, (2, s, s))


def upsample(x: torch.Tensor, temporal: bool, causal: bool, spatial: bool = True) -> torch.Tensor:
    """Nearest upsampling by 2 in H, W (if ``spatial``) and T (if ``temporal``); the inverse layout of
    :func:`downsample`."""
    s = 2 if spatial else 1
    if causal and temporal:  # 1 + k -> 1 + 2k frames: frame 0 is only upsampled in space
        x = F.interpolate(x, scale_factor=(1, s, s), mode="nearest") if spatial else x
        return torch.cat([x[:, :, :1], x[:, :, 1:].repeat_interleave(2, dim=2)], dim=2)
    if not (temporal or spatial):
        return x
    return F.interpolate(x, scale_factor=(2 if temporal else 1, s, s), mode="nearest")


def depth_to_space(x: torch.Tensor, factors: tuple[int, int, int], causal: bool) -> torch.Tensor:
    """3D pixel shuffle: ``(B, C * rt * rh * rw, t, h, w) -> (B, C, t * rt, h * rh, w * rw)``; channel
    ``c * rt * rh * rw + (a * rh + b) * rw + d`` becomes pixel ``(t * rt + a, h * rh + b, w * rw + d)`` of channel
    ``c``. Causal: the first ``rt - 1`` frames are dropped, so latent 0 gives frame 0 alone and latent ``j`` frames
    ``(j - 1) * rt + 1 .. j * rt`` (``1 + k`` -> ``1 + k * rt`` frames, the layout of :func:`upsample`)."""
    rt, rh, rw = factors
    x = rearrange(x, "b (c rt rh rw) t h w -> b c (t rt) (h rh) (w rw)", rt=rt, rh=rh, rw=rw)
    return x[:, :, rt - 1:] if causal else x


class DepthToSpaceUpsample(nn.Module):
    """MAGVIT-v2 upsampling: a conv at the low resolution makes ``rt * rh * rw`` times the output channels, then
    :func:`depth_to_space`. Initialised as nearest upsampling of one conv (each sub-pixel gets the same kernel)."""

    def __init__(self, in_channels: int, out_channels: int, temporal: bool, config: TokenizerConfig,
                 spatial: bool = True) -> None:
        super().__init__()
        self.factors = (2 if temporal else 1, 2 if spatial else 1, 2 if spatial else 1)
        self.causal = config.causal
        r = math.prod(self.factors)
        k = (config.temporal_kernel_size, 3, 3)
        self.conv = Conv3d(in_channels, out_channels * r, k, causal=config.causal)
        with torch.no_grad():  # channel c * r + s for sub-pixel s: the same kernel for every s
            self.conv.weight.copy_(self.conv.weight[::r].repeat_interleave(r, dim=0))
            self.conv.bias.copy_(self.conv.bias[::r].repeat_interleave(r, dim=0))

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, C, t, h, w) -> (B, C', t * rt (causal 1 + ..), 2h, 2w)
        return depth_to_space(self.conv(x), self.factors, self.causal)


class Encoder(nn.Module):
    """Video ``(B, C_in, T, H, W)`` -> latent ``(B, encoder_dim, t, h, w)`` (kl: the posterior's mean and logvar)."""

    def __init__(self, config: TokenizerConfig) -> None:
        super().__init__()
        self.config = config
        k = (config.temporal_kernel_size, 3, 3)
        width = config.base_channels
        p = config.patch_size
        self.conv_in = Conv3d(config.in_channels * p * p, width, k, causal=config.causal, bias=False)
        self.levels = nn.ModuleList()
        # downsample="conv": a strided conv per level (stride 2 in H, W and T where spatial / temporal_downsample say).
        self.downsample_convs = nn.ModuleList() if config.downsample == "conv" else None
        for i, mult in enumerate(config.channel_multipliers):
            blocks = nn.ModuleList()
            for _ in range(config.num_res_blocks):
                blocks.append(ResBlock(width, config.base_channels * mult, config))
                width = config.base_channels * mult
            self.levels.append(blocks)
            if self.downsample_convs is not None and i < len(config.channel_multipliers) - 1:
                s = 2 if config.spatial_flags[i] else 1
                stride = (2 if config.temporal_downsample[i] else 1, s, s)
                self.downsample_convs.append(Conv3d(width, width, k, causal=config.causal, stride=stride))
        self.mid = nn.Sequential(*[ResBlock(width, width, config) for _ in range(config.num_res_blocks)])
        self.norm_out = GroupNorm(config.norm_groups, width, per_frame=config.causal)
        self.conv_out = Conv3d(width, config.encoder_dim, (1, 1, 1), causal=config.causal)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        cfg = self.config
        p = cfg.patch_size
        if p > 1:  # (B, C, T, H, W) -> (B, C * p * p, T, H / p, W / p)
            x = rearrange(x, "b c t (h p) (w q) -> b (c p q) t h w", p=p, q=p)
        x = self.conv_in(x)
        for i, blocks in enumerate(self.levels):
            for block in blocks:
                x = block(x)
            if i < len(self.levels) - 1:
                if self.downsample_convs is not None:
                    x = self.downsample_convs[i](x)
                else:
                    x = downsample(x, cfg.temporal_downsample[i], cfg.causal, cfg.spatial_flags[i])
        x = self.mid(x)
        return self.conv_out(F.silu(self.norm_out(x)))


class Decoder(nn.Module):
    """Latent ``(B, latent_dim, t, h, w)`` -> video ``(B, C_in, T, H, W)``.

    Levels run from the deepest to the first, with ``decoder_multipliers[i]`` channels and ``decoder_blocks[i]``
    residual blocks at level ``i`` (by default the mirror of :class:`Encoder`). ``upsample="nearest"``: nearest
    upsampling then a conv at the new resolution (MAGVIT v1); ``"depth_to_space"``: a conv at the old resolution
    straight to the next level's width, then a pixel shuffle. ``decoder_norm="adaptive_group"`` conditions every
    norm on the latents ``z``.
    """

    def __init__(self, config: TokenizerConfig) -> None:
        super().__init__()
        self.config = config
        k = (config.temporal_kernel_size, 3, 3)
        b, mults, depths = config.base_channels, config.decoder_multipliers, config.decoder_blocks
        cond = config.latent_dim if config.decoder_norm == "adaptive_group" else 0
        width = b * mults[-1]
        self.conv_in = Conv3d(config.latent_dim, width, k, causal=config.causal)
        self.mid = nn.ModuleList([ResBlock(width, width, config, cond) for _ in range(config.num_res_blocks)])
        # levels[j] serves level i = L - 1 - j; upsample_convs[j] goes from level i to level i - 1.
        self.levels = nn.ModuleList()
        self.upsample_convs = nn.ModuleList()
        for i in reversed(range(len(mults))):
            blocks = nn.ModuleList()
            for _ in range(depths[i]):
                blocks.append(ResBlock(width, b * mults[i], config, cond))
                width = b * mults[i]
            self.levels.append(blocks)
            if i == 0:
                continue
            temporal, spatial = config.temporal_downsample[i - 1], config.spatial_flags[i - 1]
            if config.upsample == "depth_to_space":
                self.upsample_convs.append(DepthToSpaceUpsample(width, b * mults[i - 1], temporal, config, spatial))
                width = b * mults[i - 1]
            else:
                self.upsample_convs.append(Conv3d(width, width, k, causal=config.causal))
        self.norm_out = (AdaptiveGroupNorm(config.norm_groups, width, cond, causal=config.causal) if cond
                         else GroupNorm(config.norm_groups, width, per_frame=config.causal))
        p = config.patch_size
        self.conv_out = Conv3d(width, config.in_channels * p * p, k, causal=config.causal)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        cfg = self.config
        latents = z if cfg.decoder_norm == "adaptive_group" else None
        x = self.conv_in(z)
        for block in self.mid:
            x = block(x, latents)
        num_levels = len(self.levels)
        for j, blocks in enumerate(self.levels):
            for block in blocks:
                x = block(x, latents)
            i = num_levels - 1 - j  # index into the multipliers
            if i > 0:
                if cfg.upsample == "depth_to_space":
                    x = self.upsample_convs[j](x)
                else:
                    x = self.upsample_convs[j](upsample(x, cfg.temporal_downsample[i - 1], cfg.causal,
                                                        cfg.spatial_flags[i - 1]))
        x = self.conv_out(F.silu(_normalize(self.norm_out, x, latents)))
        p = cfg.patch_size  # (B, C * p * p, T, H / p, W / p) -> (B, C, T, H, W)
        return rearrange(x, "b (c p q) t h w -> b c t (h p) (w q)", p=p, q=p) if p > 1 else x


class HierarchicalCodes(NamedTuple):
    """The two code grids of a ``hierarchy=2`` tokenizer: ``top`` (B, t, h / 2, w / 2), ``bottom`` (B, t, h, w)."""

    top: torch.Tensor
    bottom: torch.Tensor


class TopLevel(nn.Module):
    """VQ-VAE-2's top level (Razavi et al. 2019) over the bottom encoder's latents ``z`` (B, D, t, h, w).

    ``encoder``: conv, spatial average pooling by 2 (time kept, so causal clips stay causal), a residual block, conv
    to D: the top latents (B, D, t, h / 2, w / 2), quantized by ``quantizer`` (the bottom's kind and size). ``decoder``
    maps the quantized top back to (B, D, t, h, w); the bottom quantizer reads ``condition(cat(z, decoded top))``, and
    the tokenizer's decoder reads ``merge(cat(bottom quantized, nearest-upsampled top quantized))``.
    """

    def __init__(self, config: TokenizerConfig) -> None:
        super().__init__()
        d, width, causal = config.latent_dim, config.base_channels * config.channel_multipliers[-1], config.causal
        k = (config.temporal_kernel_size, 3, 3)
        self.causal = causal
        self.encoder_in = Conv3d(d, width, k, causal=causal)
        self.encoder_block = ResBlock(width, width, config)
        self.encoder_out = nn.Sequential(GroupNorm(config.norm_groups, width, per_frame=causal), nn.SiLU(),
                                         Conv3d(width, d, (1, 1, 1), causal=causal))
        self.quantizer = build_quantizer(config.quantizer, config.codebook_size, d, config.quantization)
        self.decoder_in = Conv3d(d, width, k, causal=causal)
        self.decoder_block = ResBlock(width, width, config)
        self.decoder_out = nn.Sequential(GroupNorm(config.norm_groups, width, per_frame=causal), nn.SiLU(),
                                         Conv3d(width, d, k, causal=causal))
        self.condition = Conv3d(2 * d, d, (1, 1, 1), causal=causal)
        self.merge = Conv3d(2 * d, d, (1, 1, 1), causal=causal)

    def encode(self, z: torch.Tensor) -> torch.Tensor:  # (B, D, t, h, w) -> top latents (B, D, t, h/2, w/2)
        x = downsample(self.encoder_in(z), temporal=False, causal=self.causal)
        return self.encoder_out(self.encoder_block(x))

    def bottom_input(self, z: torch.Tensor, top_quantized: torch.Tensor) -> torch.Tensor:
        """The bottom quantizer's input (B, D, t, h, w): ``z`` with the decoded top."""
        x = upsample(self.decoder_block(self.decoder_in(top_quantized)), temporal=False, causal=self.causal)
        return self.condition(torch.cat([z, self.decoder_out(x).to(z.dtype)], dim=1))

    def decoder_latents(self, top_quantized: torch.Tensor, bottom_quantized: torch.Tensor) -> torch.Tensor:
        """The tokenizer decoder's input (B, D, t, h, w) from both quantized grids."""
        top = upsample(top_quantized.to(bottom_quantized.dtype), temporal=False, causal=self.causal)
        return self.merge(torch.cat([bottom_quantized, top], dim=1))


# ------------------------------------------------------------------------------------------------------------------
# Tokenizer
# ------------------------------------------------------------------------------------------------------------------


class VideoTokenizer(nn.Module, PretrainedMixin):
    """MAGVIT 3D-conv tokenizer: ``encode`` video -> codes, ``decode`` codes -> video, ``forward`` for training.

    With a continuous bottleneck (``config.continuous``: quantizer none / kl) ``encode`` gives float latents
    ``(B, D, t, h, w)`` (kl: the posterior mean; :meth:`encode_posterior` gives mean and log-variance) and ``decode``
    takes them.
    """

    config_class = TokenizerConfig
    model_type = "video_tokenizer"

    def __init__(self, config: TokenizerConfig) -> None:
        super().__init__()
        if not isinstance(config, TokenizerConfig):
            raise ValueError(f"expected a TokenizerConfig, got {type(config).__name__}")
        self.config = config
        self.encoder = Encoder(config)
        self.quantizer = build_quantizer(config.quantizer, config.codebook_size, config.latent_dim,
                                         config.quantization)  # hierarchy 2: the bottom grid's
        self.top = TopLevel(config) if config.hierarchy == 2 else None
        self.decoder = Decoder(config)

    # --- validation ---------------------------------------------------------------------------------------------
    def check_video(self, video: torch.Tensor) -> None:
        """Raise ``ValueError`` unless ``video`` is a float ``(B, C, T, H, W)`` tensor in [-1, 1] that fits.

        Reading the value range waits for the device (a host sync): ``encode`` checks it, ``forward`` (the training
        step) only checks the layout, whose inputs the data loaders have already checked."""
        self.check_video_layout(video)
        if video.device.type != "meta" and video.numel():
            lo, hi = (float(v) for v in torch.aminmax(video.detach()))
            if lo < -1 - _RANGE_TOLERANCE or hi > 1 + _RANGE_TOLERANCE:
                raise ValueError(f"expected video values in [-1, 1], got range [{lo:.4g}, {hi:.4g}]")

    def check_video_layout(self, video: torch.Tensor) -> None:
        """Raise ``ValueError`` unless ``video`` is a float ``(B, C, T, H, W)`` tensor whose shape fits (no host sync:
        only its dtype and shape are read)."""
        cfg = self.config
        if not isinstance(video, torch.Tensor):
            raise ValueError(f"expected a torch.Tensor video, got {type(video).__name__}")
        if video.dim() != 5:
            raise ValueError(f"expected a video of shape (B, {cfg.in_channels}, T, H, W), got shape {tuple(video.shape)}")
        if not video.is_floating_point():
            raise ValueError(f"expected a float video in [-1, 1], got dtype {video.dtype} (convert uint8 with x / 127.5 - 1)")
        if video.shape[1] != cfg.in_channels:
            raise ValueError(f"expected {cfg.in_channels} channels in dim 1 of (B, C, T, H, W), got shape {tuple(video.shape)}")
        cfg.token_grid(*video.shape[2:])  # raises with the expected T / H / W

    def check_codes(self, codes: torch.Tensor) -> None:
        """Raise ``ValueError`` unless ``codes`` is an integer ``(B, t, h, w)`` tensor with values in the codebook."""
        if not isinstance(codes, torch.Tensor) or codes.dim() != 4:
            shape = tuple(codes.shape) if isinstance(codes, torch.Tensor) else type(codes).__name__
            raise ValueError(f"expected codes of shape (B, t, h, w), got {shape}")
        if codes.is_floating_point() or codes.is_complex() or codes.dtype == torch.bool:
            raise ValueError(f"expected integer codes, got dtype {codes.dtype}")
        if min(codes.shape) < 1:
            raise ValueError(f"expected a non-empty code grid, got shape {tuple(codes.shape)}")
        lo, hi = int(codes.min()), int(codes.max())
        if lo < 0 or hi >= self.config.codebook_size:
            raise ValueError(f"expected codes in [0, {self.config.codebook_size}), got range [{lo}, {hi}]")

    def check_hierarchical_codes(self, codes: HierarchicalCodes) -> None:
        """Raise ``ValueError`` unless ``codes`` is a ``(top, bottom)`` pair of code grids that fit each other."""
        if not isinstance(codes, tuple) or len(codes) != 2:
            raise ValueError(f"a hierarchy 2 tokenizer expects (top, bottom) codes, got {type(codes).__name__}")
        top, bottom = codes
        self.check_codes(top)
        self.check_codes(bottom)
        b, t, h, w = bottom.shape
        if tuple(top.shape) != (b, t, h // 2, w // 2) or h % 2 or w % 2:
            raise ValueError(f"expected a top grid of half the bottom's H and W, got top {tuple(top.shape)} and "
                             f"bottom {tuple(bottom.shape)}")

    def check_latents(self, latents: torch.Tensor) -> None:
        """Raise ``ValueError`` unless ``latents`` is a finite float ``(B, latent_dim, t, h, w)`` tensor (the input of
        ``decode`` for continuous latents)."""
        dim = self.config.latent_dim
        if not isinstance(latents, torch.Tensor) or latents.dim() != 5 or latents.shape[1] != dim:
            shape = tuple(latents.shape) if isinstance(latents, torch.Tensor) else type(latents).__name__
            raise ValueError(f"expected latents of shape (B, {dim}, t, h, w), got {shape}")
        if not latents.is_floating_point():
            raise ValueError(f"expected float latents, got dtype {latents.dtype}")
        if min(latents.shape) < 1:
            raise ValueError(f"expected a non-empty latent grid, got shape {tuple(latents.shape)}")
        if latents.device.type != "meta" and not bool(torch.isfinite(latents).all()):
            raise ValueError("expected finite latents, got NaN or infinite values")

    # --- public API -----------------------------------------------------------------------------------------------
    @property
    def decoder_last_layer(self) -> torch.Tensor:
        """Weight of the decoder's final conv: where VQGAN's adaptive GAN weight compares gradient norms."""
        return self.decoder.conv_out.weight

    def encode(self, video: torch.Tensor) -> torch.Tensor:
        """Video ``(B, C, T, H, W)`` float in [-1, 1] -> codes ``(B, t, h, w)`` long; continuous latents (none / kl):
        the latents ``(B, latent_dim, t, h, w)`` float (kl: the posterior mean, no sampling); hierarchy 2:
        :class:`HierarchicalCodes` ``(top (B, t, h / 2, w / 2), bottom (B, t, h, w))``."""
        self.check_video(video)
        if self.config.continuous:
            return self.quantizer.latents(self.encoder(video))
        if self.top is not None:
            return self._encode_hierarchical(self.encoder(video))
        return self.quantizer.latents_to_codes(self.encoder(video))  # no losses or codebook updates

    def _encode_hierarchical(self, z: torch.Tensor) -> HierarchicalCodes:
        """hierarchy 2: the top codes of ``z`` (B, D, t, h, w), then the bottom codes given the decoded top."""
        top = self.top.quantizer.latents_to_codes(self.top.encode(z))
        top_quantized = self.top.quantizer.codes_to_latents(top).to(z.dtype)
        return HierarchicalCodes(top, self.quantizer.latents_to_codes(self.top.bottom_input(z, top_quantized)))

    def encode_posterior(self, video: torch.Tensor) -> GaussianPosterior:
        """kl only: the posterior q(z | x) of ``video`` ``(B, C, T, H, W)`` as ``(mean, logvar)``, each
        ``(B, latent_dim, t, h, w)`` fp32 (sample ``mean + exp(logvar / 2) * eps`` for a draw)."""
        if self.config.quantizer != "kl":
            raise ValueError(f"encode_posterior needs a kl tokenizer, this one's quantizer is {self.config.quantizer!r}")
        self.check_video(video)
        return self.quantizer.posterior(self.encoder(video))

    def decode(self, codes: torch.Tensor) -> torch.Tensor:
        """Codes ``(B, t, h, w)`` (continuous: latents ``(B, latent_dim, t, h, w)``; hierarchy 2: ``(top, bottom)``
        codes) -> video ``(B, C, T, H, W)`` (unclamped decoder output)."""
        if self.config.continuous:
            self.check_latents(codes)
            return self.decoder(codes)
        if self.top is not None:
            self.check_hierarchical_codes(codes)
            top, bottom = (self.top.quantizer.codes_to_latents(codes[0].long()),
                           self.quantizer.codes_to_latents(codes[1].long()))
            return self.decoder(self.top.decoder_latents(top, bottom))
        self.check_codes(codes)
        return self.decoder(self.quantizer.codes_to_latents(codes.long()))

    def forward(self, video: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Reconstruct ``video``; returns ``(reconstruction, stats)`` with ``stats["quantizer_loss"]`` (to add to the
        generator loss) and the quantizer's statistics (codebook usage, perplexity, ...; kl: ``kl_loss``; hierarchy 2:
        the top grid's as ``top_...``) for logging.

        The training step: no host sync, so the value range is not checked here (``encode`` and the data loaders do).
        """
        self.check_video_layout(video)
        z = self.encoder(video)
        if self.top is None:
            q = self.quantizer(z)
            return self.decoder(q.quantized), {"quantizer_loss": q.loss, **q.stats}
        top = self.top.quantizer(self.top.encode(z))
        bottom = self.quantizer(self.top.bottom_input(z, top.quantized))
        reconstruction = self.decoder(self.top.decoder_latents(top.quantized, bottom.quantized))
        # the bottom grid's statistics under the usual keys, the top grid's with a top_ prefix
        stats = {"quantizer_loss": top.loss + bottom.loss, **bottom.stats, **{f"top_{k}": v for k, v in top.stats.items()}}
        return reconstruction, stats


# ------------------------------------------------------------------------------------------------------------------
# 2D -> 3D inflation
# ------------------------------------------------------------------------------------------------------------------


def inflate_tokenizer(image_tokenizer: VideoTokenizer, video_config: TokenizerConfig) -> VideoTokenizer:
    """A 3D tokenizer initialised from a 2D one (``temporal_kernel_size=1``) by "central" inflation.

    Each 2D kernel ``(O, I, 1, kh, kw)`` goes into the central temporal slice of the 3D kernel (the current frame's
    slice, the last one, for causal convs) and the other slices are zero, so on a static video every frame starts
    out encoded as the 2D model encodes it. All other tensors (norms, biases, codebook) are copied.
    """
    _check_inflation_configs(image_tokenizer.config, video_config)
    video = VideoTokenizer(video_config)
    source = image_tokenizer.state_dict()
    target = video.state_dict()
    centre = video_config.temporal_kernel_size - 1 if video_config.causal else video_config.temporal_kernel_size // 2
    subpixels = _subpixels(video)
    for name, tensor in target.items():
        inflated = _inflate_tensor(source[name], tuple(tensor.shape), centre, subpixels.get(name))
        if inflated is None:
            raise ValueError(f"cannot inflate '{name}': 2D shape {tuple(source[name].shape)} vs 3D {tuple(tensor.shape)}")
        tensor.copy_(inflated)
    video.load_state_dict(target, strict=True)
    return video


def _subpixels(model: VideoTokenizer) -> dict[str, int]:
    """Spatial sub-pixels (4, or 1 where ``spatial_downsample`` is False) of each depth-to-space conv's weight and
    bias, by state-dict name."""
    return {f"{n}.conv.{p}": m.factors[1] * m.factors[2] for n, m in model.named_modules()
            if isinstance(m, DepthToSpaceUpsample) for p in ("weight", "bias")}


def _inflate_tensor(src: torch.Tensor, shape: tuple[int, ...], centre: int,
                    subpixels: int | None = None) -> torch.Tensor | None:
    """The 3D tensor of ``shape`` made from the 2D tensor ``src`` (None if there is no such rule): equal shapes are
    copied; a kernel ``(O, I, 1, kh, kw)`` goes into the slice ``centre`` of ``(O, I, kt, kh, kw)``, zeros elsewhere.
    A depth-to-space conv (``subpixels`` r spatial sub-pixels: 4, or 1 where ``spatial_downsample`` is False) that
    gains ``rt`` temporal sub-frames (``C * r`` -> ``C * rt * r`` outputs) gives each sub-frame the 2D sub-pixel's
    kernel, so a static video decodes to the 2D model's image in every frame."""
    if subpixels and src.shape[0] != shape[0] and src.shape[0] % subpixels == 0 and shape[0] % src.shape[0] == 0:
        rt = shape[0] // src.shape[0]  # output channel c * rt * r + a * r + s <- 2D channel c * r + s
        src = src.unflatten(0, (-1, 1, subpixels)).expand(-1, rt, -1, *src.shape[1:]).flatten(0, 2)
    if tuple(src.shape) == shape:
        return src.clone()
    if not _inflatable(tuple(src.shape), shape):
        return None
    out = src.new_zeros(shape)
    out[:, :, centre] = src[:, :, 0]
    return out


def _check_inflation_configs(src_cfg: TokenizerConfig, video_config: TokenizerConfig) -> None:
    if src_cfg.temporal_kernel_size != 1:
        raise ValueError(f"expected a 2D tokenizer (temporal_kernel_size=1), got {src_cfg.temporal_kernel_size}")
    same = ("in_channels", "base_channels", "channel_multipliers", "num_res_blocks", "embedding_dim",
            "codebook_size", "quantizer", "norm_groups", "downsample", "upsample", "decoder_norm",
            "decoder_multipliers", "decoder_blocks", "hierarchy", "spatial_flags")
    diff = [n for n in same if getattr(src_cfg, n) != getattr(video_config, n)]
    if diff:
        raise ValueError(f"2D and 3D configs must agree on {', '.join(diff)} to inflate")


def _inflatable(src: tuple[int, ...], dst: tuple[int, ...]) -> bool:
    """Whether a 2D kernel ``(O, I, 1, kh, kw)`` goes into a 3D kernel ``(O, I, kt, kh, kw)``."""
    return len(src) == 5 and len(dst) == 5 and src[2] == 1 and src[:2] + src[3:] == dst[:2] + dst[3:]


# ------------------------------------------------------------------------------------------------------------------
# Starting weights of a training run: fresh, fine-tuned from an export, or inflated from a 2D export
# ------------------------------------------------------------------------------------------------------------------


def check_init_from(config: TokenizerConfig, path: str | Path, inflate: bool = False) -> None:
    """Raise ``ValueError`` / ``FileNotFoundError`` (one line) unless the ``save_pretrained`` export at ``path`` can
    start a model of ``config``: the same tensor names and shapes (``inflate``: 2D kernels ``(O, I, 1, kh, kw)``
    where the model has ``(O, I, kt, kh, kw)``). Reads only the export's config and safetensors header."""
    source_config = VideoTokenizer.read_config(path)  # a tokenizer export, or a clear error
    if inflate:
        _check_inflation_configs(source_config, config)
    weights = Path(path) / WEIGHTS_NAME
    if not weights.is_file():
        raise FileNotFoundError(f"no tokenizer weights at {weights}")
    try:
        with safe_open(str(weights), framework="pt") as f:
            source = {name: tuple(f.get_slice(name).get_shape()) for name in f.keys()}
    except (SafetensorError, OSError) as err:
        raise ValueError(f"{weights}: not a readable safetensors file ({err})") from None
    with torch.device("meta"):
        model = VideoTokenizer(config)
    target, subpixels = {name: tuple(t.shape) for name, t in model.state_dict().items()}, _subpixels(model)
    problems = [f"'{n}' is missing from the export" for n in target if n not in source]
    problems += [f"'{n}' is in the export but not in the model" for n in source if n not in target]
    problems += [f"'{n}' is {source[n]} in the export but {shape} in the model" for n, shape in target.items()
                 if n in source and source[n] != shape
                 and not (inflate and _inflate_tensor(torch.empty(source[n], device="meta"), shape, 0,
                                                      subpixels.get(n)) is not None)]
    if problems:
        more = f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""
        raise ValueError(f"{path} does not fit the model config: {problems[0]}{more}")


def init_tokenizer(config: TokenizerConfig, init_from: str | Path = "", inflate: bool = False) -> VideoTokenizer:
    """The tokenizer a training run starts from (in train mode): freshly initialised (no ``init_from``), the
    weights of the export at ``init_from`` (fine-tuning; names and shapes must match ``config`` exactly), or, with
    ``inflate``, the 2D export at ``init_from`` inflated into ``config`` (:func:`inflate_tokenizer`)."""
    if not init_from:
        if inflate:
            raise ValueError("inflate needs init_from (the folder of a 2D tokenizer export)")
        return VideoTokenizer(config)
    check_init_from(config, init_from, inflate)
    if inflate:
        return inflate_tokenizer(VideoTokenizer.from_pretrained(init_from), config).train()
    model = VideoTokenizer(config)
    load_weights(model, Path(init_from) / WEIGHTS_NAME)  # safetensors, strict
    return model


__all__ = ["TokenizerConfig", "VideoTokenizer", "Encoder", "Decoder", "TopLevel", "HierarchicalCodes",
           "inflate_tokenizer", "check_init_from", "init_tokenizer", "V2"]
