"""Evaluation metrics: PSNR, SSIM, codebook usage / perplexity, bits per pixel, Frechet distance and FVD features.

Videos follow the library contract: float ``(B, 3, T, H, W)`` in ``[-1, 1]``, so the default ``data_range`` is 2.
Frame metrics are computed per frame and averaged over frames (the convention of MAGVIT's reconstruction tables).
SSIM is the Gaussian-window SSIM of Wang et al. (2004) with the constants of scikit-image's
``structural_similarity(gaussian_weights=True, sigma=1.5, use_sample_covariance=False)``, averaged over channels.
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Callable, Iterable, Sequence

import numpy as np
import torch
import torch.nn.functional as F

__all__ = [
    "psnr",
    "ssim",
    "video_psnr",
    "video_ssim",
    "CodebookUsage",
    "bits_per_pixel",
    "entropy_bits",
    "frechet_distance",
    "GaussianStatistics",
    "load_feature_extractor",
    "VideoFeatureExtractor",
    "frechet_video_distance",
]


# --------------------------------------------------------------------------------------------------------------
# PSNR / SSIM
# --------------------------------------------------------------------------------------------------------------
def _check_pair(prediction: torch.Tensor, target: torch.Tensor, ndim: int, layout: str) -> None:
    if not isinstance(prediction, torch.Tensor) or not isinstance(target, torch.Tensor):
        raise ValueError("expected torch tensors for prediction and target")
    if prediction.shape != target.shape:
        raise ValueError(f"prediction {tuple(prediction.shape)} and target {tuple(target.shape)} differ in shape")
    if prediction.ndim != ndim:
        raise ValueError(f"expected {layout} tensors, got shape {tuple(prediction.shape)}")


def psnr(prediction: torch.Tensor, target: torch.Tensor, data_range: float = 2.0) -> torch.Tensor:
    """Peak signal-to-noise ratio of images ``(N, C, H, W)`` -> ``(N,)`` in dB; ``inf`` where they are identical.

    ``data_range`` is max - min of the value range (2 for ``[-1, 1]``, 255 for uint8 values).
    """
    _check_pair(prediction, target, 4, "(N, C, H, W)")
    if data_range <= 0:
        raise ValueError(f"data_range must be > 0, got {data_range}")
    diff = prediction.double() - target.double()
    mse = diff.pow(2).flatten(1).mean(1)  # (N,)
    # mse == 0 gives +inf, which is the right answer for identical images.
    return 10.0 * torch.log10(data_range**2 / mse)


def _gaussian_window(sigma: float, truncate: float = 3.5) -> torch.Tensor:
    # Same radius rule as scipy.ndimage.gaussian_filter (used by scikit-image): int(truncate * sigma + 0.5).
    radius = int(truncate * sigma + 0.5)
    x = torch.arange(-radius, radius + 1, dtype=torch.float64)
    w = torch.exp(-0.5 * (x / sigma) ** 2)
    return w / w.sum()  # (2r+1,)


def ssim(
    prediction: torch.Tensor,
    target: torch.Tensor,
    data_range: float = 2.0,
    sigma: float = 1.5,
    k1: float = 0.01,
    k2: float = 0.03,
) -> torch.Tensor:
    """Structural similarity of images ``(N, C, H, W)`` -> ``(N,)``, mean over channels and valid window positions.

    Gaussian window (sigma 1.5, 11 taps), population covariances; equals scikit-image's
    ``structural_similarity(a, b, gaussian_weights=True, sigma=1.5, use_sample_covariance=False,
    data_range=data_range, channel_axis=0)`` per image. 1 for identical images.
    """
    _check_pair(prediction, target, 4, "(N, C, H, W)")
    if data_range <= 0:
        raise ValueError(f"data_range must be > 0, got {data_range}")
    window = _gaussian_window(sigma).to(prediction.device)
    taps = window.numel()
    n, c, h, w = prediction.shape
    if h < taps or w < taps:
        raise ValueError(f"images must be at least {taps}x{taps} pixels for SSIM, got {h}x{w}")
    x = prediction.double().reshape(n * c, 1, h, w)
    y = target.double().reshape(n * c, 1, h, w)

    def blur(z: torch.Tensor) -> torch.Tensor:
        # Separable Gaussian, 'valid' positions only: identical to scikit-image, which filters with reflection
        # padding and then crops (taps - 1) / 2 pixels from every border before averaging.
        z = F.conv2d(z, window.view(1, 1, taps, 1))
        return F.conv2d(z, window.view(1, 1, 1, taps))

    mu_x, mu_y = blur(x), blur(y)
    var_x = blur(x * x) - mu_x * mu_x
    var_y = blur(y * y) - mu_y * mu_y
    cov_xy = blur(x * y) - mu_x * mu_y
    c1, c2 = (k1 * data_range) ** 2, (k2 * data_range) ** 2
    ssim_map = ((2 * mu_x * mu_y + c1) * (2 * cov_xy + c2)) / ((mu_x**2 + mu_y**2 + c1) * (var_x + var_y + c2))
    return ssim_map.reshape(n, c, -1).mean(dim=(1, 2))  # (N,)


def _frames(video: torch.Tensor) -> torch.Tensor:
    b, c, t, h, w = video.shape
    return video.transpose(1, 2).reshape(b * t, c, h, w)  # (B*T, C, H, W)


def video_psnr(prediction: torch.Tensor, target: torch.Tensor, data_range: float = 2.0) -> torch.Tensor:
    """PSNR of videos ``(B, C, T, H, W)`` -> ``(B,)``: the mean over frames of the per-frame PSNR."""
    _check_pair(prediction, target, 5, "(B, C, T, H, W)")
    b, _, t = prediction.shape[:3]
    return psnr(_frames(prediction), _frames(target), data_range).view(b, t).mean(1)


def video_ssim(prediction: torch.Tensor, target: torch.Tensor, data_range: float = 2.0) -> torch.Tensor:
    """SSIM of videos ``(B, C, T, H, W)`` -> ``(B,)``: the mean over frames of the per-frame SSIM."""
    _check_pair(prediction, target, 5, "(B, C, T, H, W)")
    b, _, t = prediction.shape[:3]
    return ssim(_frames(prediction), _frames(target), data_range).view(b, t).mean(1)


# --------------------------------------------------------------------------------------------------------------
# Codebook usage, perplexity, bits per pixel
# --------------------------------------------------------------------------------------------------------------
def entropy_bits(counts: np.ndarray | torch.Tensor) -> float:
    """Shannon entropy in bits of the empirical distribution given by non-negative ``counts``."""
    counts = np.asarray(counts.cpu() if isinstance(counts, torch.Tensor) else counts, dtype=np.float64)
    if counts.ndim != 1 or (counts < 0).any():
        raise ValueError("counts must be a 1-D array of non-negative numbers")
    total = counts.sum()
    if total <= 0:
        raise ValueError("counts are all zero: no tokens seen")
    p = counts[counts > 0] / total
    return float(-(p * np.log2(p)).sum())


def bits_per_pixel(codebook_size: int, token_grid: Sequence[int], video_size: Sequence[int]) -> float:
    """Bits per pixel of fixed-length codes: ``log2(K) * t*h*w / (T*H*W)``.

    ``token_grid`` is ``(t, h, w)``; ``video_size`` is ``(T, H, W)``. A pixel is one (R, G, B) position.
    """
    if codebook_size < 1:
        raise ValueError(f"codebook_size must be >= 1, got {codebook_size}")
    tokens, pixels = math.prod(token_grid), math.prod(video_size)
    if tokens <= 0 or pixels <= 0:
        raise ValueError(f"token_grid {tuple(token_grid)} and video_size {tuple(video_size)} must be positive")
    return math.log2(codebook_size) * tokens / pixels


class CodebookUsage:
    """Accumulates code counts over a dataset: usage, perplexity and entropy-coded bits per pixel.

    >>> usage = CodebookUsage(1024)
    >>> for codes in loader: usage.update(codes)        # codes: LongTensor (B, t, h, w)
    >>> usage.usage, usage.perplexity
    """

    def __init__(self, codebook_size: int):
        if codebook_size < 1:
            raise ValueError(f"codebook_size must be >= 1, got {codebook_size}")
        self.codebook_size = int(codebook_size)
        self.counts = torch.zeros(self.codebook_size, dtype=torch.long)
        self.num_tokens = 0

    def update(self, codes: torch.Tensor) -> None:
        """Count the codes of one batch (any shape, integer ids in ``[0, codebook_size)``)."""
        if codes.dtype.is_floating_point or codes.dtype == torch.bool:
            raise ValueError(f"codes must be an integer tensor, got {codes.dtype}")
        flat = codes.detach().reshape(-1).to("cpu", torch.long)
        if flat.numel() == 0:
            return
        lo, hi = int(flat.min()), int(flat.max())
        if lo < 0 or hi >= self.codebook_size:
            raise ValueError(f"codes must lie in [0, {self.codebook_size}), got values in [{lo}, {hi}]")
        self.counts += torch.bincount(flat, minlength=self.codebook_size)
        self.num_tokens += flat.numel()

    def merge(self, other: "CodebookUsage") -> None:
        """Add another accumulator's counts (e.g. from another rank)."""
        if other.codebook_size != self.codebook_size:
            raise ValueError(f"cannot merge codebook sizes {self.codebook_size} and {other.codebook_size}")
        self.counts += other.counts
        self.num_tokens += other.num_tokens

    @property
    def used_codes(self) -> int:
        return int((self.counts > 0).sum())

    @property
    def usage(self) -> float:
        """Fraction of the codebook used at least once."""
        return self.used_codes / self.codebook_size

    @property
    def entropy(self) -> float:
        """Entropy in bits of the code frequencies (the ideal entropy-coded cost per token)."""
        return entropy_bits(self.counts)

    @property
    def perplexity(self) -> float:
        """``2 ** entropy``: the effective number of codes (K when all are equally used, 1 when one is)."""
        return float(2.0**self.entropy)

    def bits_per_pixel(self, tokens_per_clip: int, pixels_per_clip: int) -> float:
        """Entropy-coded bits per pixel: ``entropy * tokens / pixels`` (a lower bound for a static code model)."""
        if tokens_per_clip <= 0 or pixels_per_clip <= 0:
            raise ValueError("tokens_per_clip and pixels_per_clip must be positive")
        return self.entropy * tokens_per_clip / pixels_per_clip

    def summary(self) -> dict[str, float]:
        return {
            "codebook_size": self.codebook_size,
            "num_tokens": self.num_tokens,
            "used_codes": self.used_codes,
            "usage": self.usage,
            "perplexity": self.perplexity,
            "entropy_bits": self.entropy,
        }


# --------------------------------------------------------------------------------------------------------------
# Frechet distance
# --------------------------------------------------------------------------------------------------------------
def _psd_sqrt(matrix: np.ndarray) -> np.ndarray:
    vals, vecs = np.linalg.eigh(matrix)
    return (vecs * np.sqrt(np.clip(vals, 0.0, None))) @ vecs.T


def frechet_distance(mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray) -> float:
    """Frechet (2-Wasserstein squared) distance between ``N(mu1, sigma1)`` and ``N(mu2, sigma2)``.

    ``||mu1 - mu2||^2 + Tr(sigma1 + sigma2 - 2 (sigma1 sigma2)^{1/2})``. The trace term is computed from the
    eigenvalues of the symmetric ``sigma1^{1/2} sigma2 sigma1^{1/2}`` (same spectrum as ``sigma1 sigma2``), which
    stays real and stable for the rank-deficient covariances of few samples.
    """
    mu1, mu2 = np.atleast_1d(np.asarray(mu1, np.float64)), np.atleast_1d(np.asarray(mu2, np.float64))
    sigma1, sigma2 = np.atleast_2d(np.asarray(sigma1, np.float64)), np.atleast_2d(np.asarray(sigma2, np.float64))
    d = mu1.shape[0]
    if mu1.shape != (d,) or mu2.shape != (d,) or sigma1.shape != (d, d) or sigma2.shape != (d, d):
        raise ValueError(
            f"expected means (D,) and covariances (D, D) of one D; got {mu1.shape}, {sigma1.shape}, "
            f"{mu2.shape}, {sigma2.shape}"
        )
    if not (np.isfinite(sigma1).all() and np.isfinite(sigma2).all()):
        raise ValueError("covariances must be finite")
    # Symmetrise against round-off before the eigen-decompositions.
    sigma1, sigma2 = (sigma1 + sigma1.T) / 2, (sigma2 + sigma2.T) / 2
    root1 = _psd_sqrt(sigma1)
    cross = root1 @ sigma2 @ root1
    eig = np.linalg.eigvalsh((cross + cross.T) / 2)
    trace_sqrt = np.sqrt(np.clip(eig, 0.0, None)).sum()
    diff = mu1 - mu2
    return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2.0 * trace_sqrt)


class GaussianStatistics:
    """Streaming mean and covariance of feature vectors (float64 sums), for Frechet distances over a dataset."""

    def __init__(self) -> None:
        self.n = 0
        self._sum: np.ndarray | None = None
        self._outer: np.ndarray | None = None

    def update(self, features: torch.Tensor | np.ndarray) -> None:
        """Add a batch of features ``(N, D)``."""
        x = features.detach().cpu().double().numpy() if isinstance(features, torch.Tensor) else np.asarray(features)
        x = x.astype(np.float64, copy=False)
        if x.ndim != 2:
            raise ValueError(f"features must be (N, D), got shape {x.shape}")
        if self._sum is None:
            self._sum = np.zeros(x.shape[1])
            self._outer = np.zeros((x.shape[1], x.shape[1]))
        elif x.shape[1] != self._sum.shape[0]:
            raise ValueError(f"feature size changed from {self._sum.shape[0]} to {x.shape[1]}")
        self.n += x.shape[0]
        self._sum += x.sum(0)
        self._outer += x.T @ x

    @property
    def mean(self) -> np.ndarray:
        if self.n == 0:
            raise ValueError("no features were added")
        return self._sum / self.n

    @property
    def covariance(self) -> np.ndarray:
        """Unbiased sample covariance (``np.cov`` convention); needs at least 2 samples."""
        if self.n < 2:
            raise ValueError(f"a covariance needs at least 2 feature vectors, got {self.n}")
        mu = self.mean
        return (self._outer - self.n * np.outer(mu, mu)) / (self.n - 1)

    def frechet_distance(self, other: "GaussianStatistics") -> float:
        return frechet_distance(self.mean, self.covariance, other.mean, other.covariance)


# --------------------------------------------------------------------------------------------------------------
# FVD: features from a TorchScript I3D the user supplies
# --------------------------------------------------------------------------------------------------------------
# Keyword arguments of the common I3D TorchScript (the one used by StyleGAN-V / DIGAN): input in [-1, 1]
# (no rescale), resized to 224 inside, 400-d logits replaced by the 400-d pre-softmax features.
I3D_KWARGS = {"rescale": False, "resize": True, "return_features": True}


class VideoFeatureExtractor:
    """Wraps a TorchScript video network loaded from a local file: ``(B, 3, T, H, W) in [-1, 1] -> (B, D)``.

    When the module's ``forward`` accepts the I3D keyword arguments (``rescale``, ``resize``, ``return_features``),
    they are passed as in the common FVD implementation; otherwise the module is called with the video alone.
    """

    def __init__(self, module: torch.jit.ScriptModule, device: str | torch.device = "cpu"):
        self.module = module.eval()
        self.device = torch.device(device)
        try:
            names = {arg.name for arg in module.forward.schema.arguments}
        except AttributeError:  # not a scripted method (e.g. a traced function): plain call
            names = set()
        self.kwargs = {k: v for k, v in I3D_KWARGS.items() if k in names}

    @torch.no_grad()
    def __call__(self, video: torch.Tensor) -> torch.Tensor:
        if video.ndim != 5 or video.shape[1] != 3:
            raise ValueError(f"expected videos (B, 3, T, H, W), got shape {tuple(video.shape)}")
        features = self.module(video.to(self.device, torch.float32), **self.kwargs)
        if isinstance(features, (tuple, list)):
            features = features[0]
        return features.reshape(features.shape[0], -1).float().cpu()  # (B, D)


def load_feature_extractor(path: str | os.PathLike | None, device: str | torch.device = "cpu") -> VideoFeatureExtractor:
    """Load a local TorchScript feature network (e.g. ``i3d_torchscript.pt``) with ``torch.jit.load``.

    Raises ``FileNotFoundError`` with a clear message when ``path`` is None or missing: FVD then cannot be computed
    (no weights can be downloaded by this library).
    """
    if path is None:
        raise FileNotFoundError("FVD needs a local I3D TorchScript file (pass its path); none was given")
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"FVD feature network not found: {path}")
    try:
        module = torch.jit.load(str(path), map_location=device)
    except RuntimeError as err:
        raise ValueError(f"{path} is not a TorchScript file: {str(err).splitlines()[0]}") from None
    return VideoFeatureExtractor(module, device)


def frechet_video_distance(
    extractor: Callable[[torch.Tensor], torch.Tensor],
    real_batches: Iterable[torch.Tensor],
    fake_batches: Iterable[torch.Tensor],
) -> float:
    """FVD: Frechet distance between the feature Gaussians of real and generated video batches ``(B, 3, T, H, W)``."""
    real, fake = GaussianStatistics(), GaussianStatistics()
    for batch in real_batches:
        real.update(extractor(batch))
    for batch in fake_batches:
        fake.update(extractor(batch))
    return real.frechet_distance(fake)
