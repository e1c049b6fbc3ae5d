"""Metrics against known values, closed forms and reference implementations (scikit-image, scipy)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from magvit import metrics


# --- PSNR ---------------------------------------------------------------------------------------------------------
def test_psnr_identical_is_inf():
    x = torch.rand(2, 3, 8, 8) * 2 - 1
    assert torch.isinf(metrics.psnr(x, x)).all()


def test_psnr_known_mse():
    # A constant offset of 0.02 everywhere gives MSE = 4e-4; with range 2: 10 log10(4 / 4e-4) = 40 dB.
    x = torch.zeros(1, 3, 8, 8, dtype=torch.float64)
    assert metrics.psnr(x + 0.02, x).item() == pytest.approx(40.0, abs=1e-9)
    # uint8 scale: MSE 1 over range 255 -> 20 log10(255) = 48.1308... dB.
    y = torch.full((1, 1, 4, 4), 100.0)
    assert metrics.psnr(y + 1, y, data_range=255.0).item() == pytest.approx(20 * math.log10(255), abs=1e-9)


def test_video_psnr_is_mean_of_frame_psnr():
    target = torch.zeros(1, 3, 2, 8, 8, dtype=torch.float64)
    pred = target.clone()
    pred[:, :, 0] += 0.02  # frame 0: 40 dB
    pred[:, :, 1] += 0.2  # frame 1: 10 log10(4 / 0.04) = 20 dB
    assert metrics.video_psnr(pred, target).item() == pytest.approx(30.0, abs=1e-9)


def test_psnr_rejects_bad_input():
    with pytest.raises(ValueError, match="differ in shape"):
        metrics.psnr(torch.zeros(1, 3, 8, 8), torch.zeros(1, 3, 8, 9))
    with pytest.raises(ValueError, match=r"\(N, C, H, W\)"):
        metrics.psnr(torch.zeros(3, 8, 8), torch.zeros(3, 8, 8))
    with pytest.raises(ValueError, match="data_range"):
        metrics.psnr(torch.zeros(1, 3, 8, 8), torch.zeros(1, 3, 8, 8), data_range=0)


# --- SSIM ---------------------------------------------------------------------------------------------------------
def test_ssim_identical_is_one():
    x = torch.rand(2, 3, 16, 16) * 2 - 1
    assert torch.allclose(metrics.ssim(x, x), torch.ones(2, dtype=torch.float64))


def test_ssim_constant_images_closed_form():
    # Constant images a, b: mu_x = a, mu_y = b, all variances 0, so SSIM = (2ab + C1) / (a^2 + b^2 + C1).
    a, b = 0.5, -0.25
    c1 = (0.01 * 2.0) ** 2
    expected = (2 * a * b + c1) / (a * a + b * b + c1)
    value = metrics.ssim(torch.full((1, 3, 12, 12), a), torch.full((1, 3, 12, 12), b)).item()
    assert value == pytest.approx(expected, abs=1e-12)


def test_ssim_matches_scikit_image(real_clip):
    skimage_metrics = pytest.importorskip("skimage.metrics")
    target = real_clip[0, :, 0]  # (3, 64, 64) real frame
    noisy = (target + 0.1 * torch.randn_like(target)).clamp(-1, 1)
    ours = metrics.ssim(noisy[None], target[None]).item()
    ref = skimage_metrics.structural_similarity(
        noisy.double().numpy(), target.double().numpy(), data_range=2.0, channel_axis=0,
        gaussian_weights=True, sigma=1.5, use_sample_covariance=False,
    )
    assert ours == pytest.approx(ref, abs=1e-10)
    assert 0.0 < ours < 1.0


def test_video_ssim_shape_and_order(real_clip):
    clip = real_clip[:, :, :4]
    slightly = (clip + 0.02 * torch.randn_like(clip)).clamp(-1, 1)
    badly = (clip + 0.3 * torch.randn_like(clip)).clamp(-1, 1)
    s1, s2 = metrics.video_ssim(slightly, clip), metrics.video_ssim(badly, clip)
    assert s1.shape == (1,) and s1.item() > s2.item()


def test_ssim_rejects_small_images():
    with pytest.raises(ValueError, match="at least 11x11"):
        metrics.ssim(torch.zeros(1, 3, 8, 8), torch.zeros(1, 3, 8, 8))


# --- codebook usage, perplexity, bits per pixel ------------------------------------------------------------------
def test_codebook_usage_uniform_and_single_code():
    usage = metrics.CodebookUsage(8)
    usage.update(torch.arange(8).view(1, 2, 2, 2))
    usage.update(torch.arange(8).view(1, 2, 2, 2))
    assert usage.usage == 1.0
    assert usage.perplexity == pytest.approx(8.0)
    assert usage.entropy == pytest.approx(3.0)
    single = metrics.CodebookUsage(8)
    single.update(torch.full((2, 1, 2, 2), 3))
    assert single.usage == 1 / 8 and single.perplexity == pytest.approx(1.0) and single.entropy == 0.0


def test_codebook_usage_known_distribution_and_merge():
    # Counts 2, 1, 1 of 4 tokens: entropy = 1.5 bits, perplexity 2^1.5.
    a, b = metrics.CodebookUsage(16), metrics.CodebookUsage(16)
    a.update(torch.tensor([[0, 0]]))
    b.update(torch.tensor([[5, 9]]))
    a.merge(b)
    assert a.num_tokens == 4 and a.used_codes == 3
    assert a.entropy == pytest.approx(1.5) and a.perplexity == pytest.approx(2**1.5)
    # Entropy-coded bits per pixel: 1.5 bits/token * 4 tokens / 64 pixels.
    assert a.bits_per_pixel(tokens_per_clip=4, pixels_per_clip=64) == pytest.approx(1.5 * 4 / 64)


def test_codebook_usage_rejects_out_of_range_codes():
    usage = metrics.CodebookUsage(4)
    with pytest.raises(ValueError, match=r"\[0, 4\)"):
        usage.update(torch.tensor([0, 4]))
    with pytest.raises(ValueError, match="integer"):
        usage.update(torch.tensor([0.0]))


def test_bits_per_pixel_fixed_length():
    # MAGVIT-B on 16x128x128: 4x16x16 tokens of a 1024 codebook = 10 bits * 1024 / 262144 pixels.
    assert metrics.bits_per_pixel(1024, (4, 16, 16), (16, 128, 128)) == pytest.approx(10 * 1024 / 262144)
    assert metrics.bits_per_pixel(2**18, (5, 8, 8), (17, 64, 64)) == pytest.approx(18 * 320 / (17 * 4096))
    with pytest.raises(ValueError):
        metrics.bits_per_pixel(0, (1, 1, 1), (1, 1, 1))


# --- Frechet distance -------------------------------------------------------------------------------------------
def test_frechet_distance_1d_closed_form():
    # For 1-D Gaussians: (m1 - m2)^2 + (s1 - s2)^2.
    d = metrics.frechet_distance(np.array([1.0]), np.array([[4.0]]), np.array([-2.0]), np.array([[9.0]]))
    assert d == pytest.approx((1 + 2) ** 2 + (2 - 3) ** 2)


def test_frechet_distance_diagonal_closed_form():
    mu1, mu2 = np.array([0.0, 1.0, 2.0]), np.array([1.0, 1.0, 0.0])
    v1, v2 = np.array([1.0, 4.0, 0.25]), np.array([4.0, 1.0, 0.25])
    expected = ((mu1 - mu2) ** 2).sum() + ((np.sqrt(v1) - np.sqrt(v2)) ** 2).sum()
    assert metrics.frechet_distance(mu1, np.diag(v1), mu2, np.diag(v2)) == pytest.approx(expected)


def test_frechet_distance_identical_is_zero_and_matches_scipy_sqrtm():
    scipy_linalg = pytest.importorskip("scipy.linalg")
    rng = np.random.default_rng(0)
    a, b = rng.normal(size=(6, 6)), rng.normal(size=(6, 6))
    s1, s2 = a @ a.T + 0.1 * np.eye(6), b @ b.T + 0.1 * np.eye(6)
    mu1, mu2 = rng.normal(size=6), rng.normal(size=6)
    assert metrics.frechet_distance(mu1, s1, mu1, s1) == pytest.approx(0.0, abs=1e-9)
    covmean = scipy_linalg.sqrtm(s1 @ s2).real
    reference = ((mu1 - mu2) ** 2).sum() + np.trace(s1 + s2 - 2 * covmean)
    assert metrics.frechet_distance(mu1, s1, mu2, s2) == pytest.approx(reference, rel=1e-8)


def test_frechet_distance_rejects_mismatched_shapes():
    with pytest.raises(ValueError, match=r"\(D, D\)"):
        metrics.frechet_distance(np.zeros(2), np.eye(3), np.zeros(2), np.eye(2))


def test_gaussian_statistics_streaming_matches_numpy():
    rng = np.random.default_rng(1)
    x = rng.normal(size=(50, 4))
    stats = metrics.GaussianStatistics()
    stats.update(torch.from_numpy(x[:20]))
    stats.update(x[20:])
    np.testing.assert_allclose(stats.mean, x.mean(0), atol=1e-12)
    np.testing.assert_allclose(stats.covariance, np.cov(x, rowvar=False), atol=1e-12)
    other = metrics.GaussianStatistics()
    other.update(x + 3.0)  # shifted copy: distance = ||shift||^2 = 4 * 9
    assert stats.frechet_distance(other) == pytest.approx(36.0, rel=1e-9)


# --- FVD via a TorchScript feature network ----------------------------------------------------------------------
class _TinyI3D(torch.nn.Module):
    """Scripted stand-in with the keyword interface of the common I3D TorchScript."""

    def __init__(self):
        super().__init__()
        self.proj = torch.nn.Conv3d(3, 5, kernel_size=3, padding=1)

    def forward(self, x: torch.Tensor, rescale: bool = True, resize: bool = False,
                return_features: bool = False) -> torch.Tensor:
        if rescale:  # the real network maps [0, 255] to [-1, 1] when asked; we must not ask
            x = x / 127.5 - 1
        feats = self.proj(x).mean(dim=(2, 3, 4))  # (B, 5)
        if not return_features:
            feats = feats.softmax(-1)
        return feats


def test_fvd_with_scripted_feature_network(tmp_path):
    path = tmp_path / "i3d.pt"
    torch.jit.script(_TinyI3D()).save(str(path))
    extractor = metrics.load_feature_extractor(path)
    assert extractor.kwargs == {"rescale": False, "resize": True, "return_features": True}
    real = [torch.rand(4, 3, 4, 8, 8) * 2 - 1 for _ in range(3)]
    feats = extractor(real[0])
    reference = _TinyI3D()
    reference.load_state_dict(extractor.module.state_dict())
    torch.testing.assert_close(feats, reference(real[0], False, True, True))
    assert metrics.frechet_video_distance(extractor, real, real) == pytest.approx(0.0, abs=1e-8)
    shifted = [v + 0.5 for v in real]
    fvd = metrics.frechet_video_distance(extractor, real, shifted)
    # A constant shift of the input shifts each feature by 0.5 * sum of its conv weights (interior pixels) and
    # leaves the covariance nearly unchanged, so the distance is close to the squared mean shift.
    real_stats, fake_stats = metrics.GaussianStatistics(), metrics.GaussianStatistics()
    for r, s in zip(real, shifted):
        real_stats.update(extractor(r))
        fake_stats.update(extractor(s))
    mean_shift = ((real_stats.mean - fake_stats.mean) ** 2).sum()
    assert fvd > 0 and fvd == pytest.approx(mean_shift, rel=0.2)


def test_fvd_missing_file_is_clear(tmp_path):
    with pytest.raises(FileNotFoundError, match="I3D TorchScript"):
        metrics.load_feature_extractor(None)
    with pytest.raises(FileNotFoundError, match="not found"):
        metrics.load_feature_extractor(tmp_path / "absent.pt")
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"not a zip")
    with pytest.raises(ValueError, match="not a TorchScript file"):
        metrics.load_feature_extractor(bad)
