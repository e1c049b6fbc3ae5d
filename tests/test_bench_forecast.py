"""benchmarks/bench_forecast.py: code channels as the quantizers number them, the forecaster's level masking, the
level MAE on known values."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
import bench_forecast  # noqa: E402

from magvit.quantizers import FiniteScalarQuantizer, LookupFreeQuantizer  # noqa: E402


def test_fsq_channels_are_the_quantizers_level_indices():
    quantizer = FiniteScalarQuantizer((8, 5, 5, 5))
    codes = torch.randint(0, 1000, (2, 3, 4, 4), generator=torch.Generator().manual_seed(0))
    levels = bench_forecast.split_codes(codes, (8, 5, 5, 5))  # (B, D, t, h, w)
    assert torch.equal(levels.movedim(1, -1), quantizer.codes_to_levels(codes))
    assert torch.equal(bench_forecast.merge_codes(levels, (8, 5, 5, 5)), codes)


def test_lfq_channels_are_the_code_bits():
    quantizer = LookupFreeQuantizer(64)
    codes = torch.arange(64).view(1, 1, 8, 8)
    bits = bench_forecast.split_codes(codes, (2,) * 6)  # (1, 6, 1, 8, 8)
    assert torch.equal(bits.float() * 2 - 1, quantizer.codes_to_latents(codes))
    assert torch.equal(bench_forecast.merge_codes(bits, (2,) * 6), codes)


def test_forecaster_never_predicts_a_level_a_channel_lacks():
    model = bench_forecast.Forecaster((8, 5, 3), given=2, future=3, width=8, blocks=1)
    given = torch.stack([torch.randint(0, n, (4, 2, 6, 6)) for n in (8, 5, 3)], dim=1)  # (B, D, g, h, w)
    logits = model(given)
    assert logits.shape == (4, 3, 3, 8, 6, 6)
    assert torch.isinf(logits[:, 1, :, 5:]).all() and torch.isinf(logits[:, 2, :, 3:]).all()
    assert torch.isfinite(logits[:, 0]).all() and torch.isfinite(logits[:, 1, :, :5]).all()
    assert int(logits.argmax(dim=3)[:, 2].max()) < 3


def test_level_mae_known_values():
    radices = (4, 4)
    truth = torch.zeros(1, 3, 1, 2, dtype=torch.long)  # (B, t, h, w); latent frame 0 given
    truth[0, 1:, 0, 0] = 1 + 4 * 2  # levels (1, 2): not the background code 0
    prediction = truth.clone()
    prediction[0, 1, 0, 0] = 3 + 4 * 2  # levels (3, 2): |3 - 1| + 0 -> 1.0 per channel
    prediction[0, 1, 0, 1] = 3  # a background slot: not counted
    assert bench_forecast.level_mae(prediction, truth, 1, radices, 0) == pytest.approx(0.5)  # (1.0 + 0.0) / 2
    assert bench_forecast.level_mae(truth, truth, 1, radices, 0) == 0.0
