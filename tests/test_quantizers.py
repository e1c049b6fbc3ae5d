"""Quantizers: straight-through gradients, nearest codes, EMA arithmetic, k-means init, dead-code restarts, LFQ bits
and entropy, FSQ levels and codes, fp32 under bf16 autocast, save/load, and identical codebooks across 2 gloo ranks."""

from __future__ import annotations

import itertools
import math
import time
from datetime import timedelta

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from safetensors.torch import load_file, load_model, save_file, save_model

from magvit.config import ConfigError
from magvit import TokenizerConfig, VideoTokenizer
from magvit.quantizers import (
    FSQ_LEVELS,
    FiniteScalarQuantizer,
    LookupFreeQuantizer,
    QuantizerConfig,
    QuantizerOutput,
    VectorQuantizer,
    build_quantizer,
)


def _latents(flat: torch.Tensor, b: int = 1, t: int = 1, h: int = 1) -> torch.Tensor:
    """(N, D) rows -> (b, D, t, h, w) latents whose flattening (b, t, h, w order) gives the rows back."""
    n, d = flat.shape
    w = n // (b * t * h)
    return flat.view(b, t, h, w, d).permute(0, 4, 1, 2, 3).contiguous()


def _rows(z: torch.Tensor) -> torch.Tensor:
    return z.permute(0, 2, 3, 4, 1).reshape(-1, z.shape[1])


# --- config ---------------------------------------------------------------------------------------------------------
def test_config_defaults_and_validation():
    cfg = QuantizerConfig()
    assert (cfg.commitment_beta, cfg.ema_decay, cfg.use_ema, cfg.dead_code_threshold) == (0.25, 0.99, False, 0.0)
    assert QuantizerConfig.from_dict(cfg.to_dict()) == cfg
    with pytest.raises(ConfigError, match="ema_decay"):
        QuantizerConfig.from_dict({"ema_decay": 1.0})
    with pytest.raises(ConfigError, match="entropy_temperature"):
        QuantizerConfig.from_dict({"entropy_temperature": 0})
    with pytest.raises(ConfigError, match="commitment_bta"):
        QuantizerConfig.from_dict({"commitment_bta": 0.5})


def test_bad_inputs_raise_value_error():
    vq = VectorQuantizer(8, 4, QuantizerConfig())
    with pytest.raises(ValueError, match=r"\(B, 4, t, h, w\)"):
        vq(torch.randn(2, 3, 1, 2, 2))
    with pytest.raises(ValueError, match=r"\(B, 4, t, h, w\)"):
        vq(torch.randn(2, 4, 2, 2))
    with pytest.raises(ValueError, match="floating"):
        vq(torch.zeros(1, 4, 1, 2, 2, dtype=torch.long))
    with pytest.raises(ValueError, match=r"\[0, 8\)"):
        vq.codes_to_latents(torch.full((1, 1, 2, 2), 8))
    with pytest.raises(ValueError, match="integer"):
        vq.codes_to_latents(torch.zeros(1, 1, 2, 2))
    for bad in (12, 1, 0):
        with pytest.raises(ValueError, match="power of two"):
            LookupFreeQuantizer(bad, QuantizerConfig())
    with pytest.raises(ValueError, match="log2"):
        build_quantizer("lfq", 16, 5, QuantizerConfig())
    with pytest.raises(ValueError, match="expected one of 'vq', 'lfq', 'fsq', 'none', 'kl'"):
        build_quantizer("rvq", 16, 4, QuantizerConfig())  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="len\\(levels\\) = 4"):
        build_quantizer("fsq", 1000, 5, QuantizerConfig())
    assert isinstance(build_quantizer("vq", 16, 5, QuantizerConfig()), VectorQuantizer)
    assert isinstance(build_quantizer("lfq", 16, 4, QuantizerConfig()), LookupFreeQuantizer)


# --- vector quantizer -----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("use_ema", [False, True])
def test_vq_nearest_code_matches_brute_force(use_ema):
    vq = VectorQuantizer(32, 6, QuantizerConfig(use_ema=use_ema)).eval()
    z = torch.randn(2, 6, 2, 3, 4)
    out = vq(z)
    assert isinstance(out, QuantizerOutput)
    assert out.codes.shape == (2, 2, 3, 4) and out.codes.dtype == torch.long
    flat = _rows(z)
    brute = torch.stack([((row[None] - vq.codebook) ** 2).sum(1).argmin() for row in flat])
    assert torch.equal(out.codes.flatten(), brute)
    # z + (e - z) in the straight-through output equals e up to rounding.
    assert torch.allclose(out.quantized, vq.codes_to_latents(out.codes).detach(), atol=1e-6)
    assert torch.allclose(_rows(out.quantized), vq.codebook.detach()[brute], atol=1e-6)
    for key in ("codebook_usage", "perplexity", "commitment_loss", "codebook_loss", "entropy_loss"):
        assert out.stats[key].dim() == 0 and not out.stats[key].requires_grad
    assert out.stats["codebook_usage"] == brute.unique().numel() / 32
    probs = torch.bincount(brute, minlength=32).float() / brute.numel()
    expected_ppl = math.exp(-sum(p * math.log(p) for p in probs.tolist() if p > 0))
    assert out.stats["perplexity"].item() == pytest.approx(expected_ppl, rel=1e-5)
    commit = ((flat - vq.codebook[brute]) ** 2).mean()
    assert out.stats["commitment_loss"].item() == pytest.approx(commit.item(), rel=1e-5)


def test_vq_straight_through_gradient_and_losses():
    cfg = QuantizerConfig(entropy_loss_weight=0.0)
    vq = VectorQuantizer(16, 4, cfg).train()
    z = torch.randn(2, 4, 1, 3, 3, requires_grad=True)
    upstream = torch.randn(2, 4, 1, 3, 3)
    out = vq(z)
    out.quantized.backward(upstream)
    assert torch.equal(z.grad, upstream)  # identity through the straight-through path
    assert vq.codebook.grad is None  # the quantized output itself gives the codebook no gradient

    z.grad = None
    out = vq(z)
    out.loss.backward()
    q = vq.codebook.detach()[out.codes.flatten()]
    flat = _rows(z.detach())
    n = flat.numel()
    # d/dz of beta * mean((z - sg(e))^2) and d/de of mean((sg(z) - e)^2), summed per code.
    assert torch.allclose(_rows(z.grad), 0.25 * 2 * (flat - q) / n, atol=1e-7)
    expected_cb_grad = torch.zeros_like(vq.codebook).index_add_(0, out.codes.flatten(), 2 * (q - flat) / n)
    assert torch.allclose(vq.codebook.grad, expected_cb_grad, atol=1e-7)
    expected = out.stats["codebook_loss"] + 0.25 * out.stats["commitment_loss"]
    assert out.loss.item() == pytest.approx(expected.item(), rel=1e-6)


def test_vq_entropy_loss_matches_magvit_formula_and_prefers_spread_usage():
    cfg = QuantizerConfig(entropy_loss_weight=1.0, entropy_temperature=0.5)
    vq = VectorQuantizer(4, 2, cfg).eval()
    with torch.no_grad():
        vq.codebook.copy_(torch.tensor([[2.0, 0.0], [-2.0, 0.0], [0.0, 2.0], [0.0, -2.0]]))
    spread = _latents(vq.codebook.detach().repeat(2, 1) * 1.1)
    collapsed = _latents(vq.codebook.detach()[:1].repeat(8, 1) * 1.1)
    losses = []
    for z in (spread, collapsed):
        out = vq(z)
        d = torch.cdist(_rows(z), vq.codebook.detach()) ** 2  # full squared distances, as in MAGVIT
        p = torch.softmax(-d / 0.5, dim=1)
        avg = p.mean(0)
        expected = -(p * torch.log_softmax(-d / 0.5, dim=1)).sum(1).mean() + (avg * torch.log(avg + 1e-5)).sum()
        assert out.stats["entropy_loss"].item() == pytest.approx(expected.item(), abs=1e-5)
        losses.append(out.stats["entropy_loss"].item())
    assert losses[0] < losses[1] - 1.0  # spread usage: about -log 4; collapsed: about 0


def test_ema_update_equals_hand_computation():
    cfg = QuantizerConfig(use_ema=True, ema_decay=0.5, ema_epsilon=0.1, entropy_loss_weight=0.0)
    vq = VectorQuantizer(3, 2, cfg).train()
    codebook = torch.tensor([[0.0, 0.0], [10.0, 0.0], [0.0, 10.0]])
    vq.codebook.copy_(codebook)
    vq.ema_embed_sum.copy_(codebook)  # counts start at 1, so sums = codebook
    z = _latents(torch.tensor([[1.0, 0.0], [0.0, 1.0], [9.0, 0.0]]))
    out = vq(z)
    assert out.codes.flatten().tolist() == [0, 0, 1]
    # The output uses the codebook before the update.
    assert torch.allclose(_rows(out.quantized.detach()), codebook[[0, 0, 1]], atol=1e-6)
    # counts [2, 1, 0], sums [(1, 1), (9, 0), (0, 0)]
    # cluster size: 0.5 * 1 + 0.5 * counts = [1.5, 1.0, 0.5]; n = 3
    # embed sum:    0.5 * codebook + 0.5 * sums = [(0.5, 0.5), (9.5, 0), (0, 5)]
    # smoothed:     (size + 0.1) / (3 + 3 * 0.1) * 3 = [1.6, 1.1, 0.6] / 1.1
    # codebook:     [(0.34375, 0.34375), (9.5, 0), (0, 5 * 1.1 / 0.6)]
    assert torch.allclose(vq.ema_cluster_size, torch.tensor([1.5, 1.0, 0.5]))
    assert torch.allclose(vq.ema_embed_sum, torch.tensor([[0.5, 0.5], [9.5, 0.0], [0.0, 5.0]]))
    expected = torch.tensor([[0.34375, 0.34375], [9.5, 0.0], [0.0, 5.5 / 0.6]])
    assert torch.allclose(vq.codebook, expected, atol=1e-6)
    assert out.stats["codebook_loss"] == 0 and out.loss.item() == pytest.approx(0.25 * out.stats["commitment_loss"].item())
    assert not vq.codebook.requires_grad and "codebook" not in dict(vq.named_parameters())

    vq.eval()  # no updates outside training
    vq(z)
    assert torch.allclose(vq.codebook, expected, atol=1e-6)


@pytest.mark.parametrize("use_ema", [False, True])
def test_dead_codes_restart_from_encoder_outputs(use_ema):
    cfg = QuantizerConfig(use_ema=use_ema, dead_code_threshold=1.0, entropy_loss_weight=0.0)
    vq = VectorQuantizer(8, 2, cfg).train()
    with torch.no_grad():
        vq.codebook.copy_(torch.tensor([[0.0, 0.0]] + [[100.0 + i, 100.0] for i in range(7)]))
        if use_ema:
            vq.ema_embed_sum.copy_(vq.codebook)
    flat = torch.randn(16, 2)
    z = _latents(flat).requires_grad_()
    out = vq(z)
    out.loss.backward()  # in-place restarts after the forward must not break autograd
    assert z.grad.abs().sum() > 0
    assert out.stats["codebook_usage"] == 1 / 8  # everything went to code 0
    assert out.stats["restarted_codes"] == 7
    restarted = vq.codebook.detach()[1:]
    # Each restarted code is a distinct encoder output of the batch.
    matches = (restarted[:, None, :] == flat[None]).all(-1)  # (7, 16)
    assert matches.any(1).all() and matches.float().argmax(1).unique().numel() == 7
    assert torch.equal(vq.ema_cluster_size[1:], torch.ones(7))
    assert vq.ema_cluster_size[0] > 1.0  # the used code stays
    if use_ema:
        assert torch.allclose(vq.ema_embed_sum[1:], restarted)
    out = vq(_latents(flat))
    assert out.stats["codebook_usage"] > 1 / 8


def test_kmeans_init_finds_cluster_centres_and_survives_save_load(tmp_path):
    centres = torch.tensor([[5.0, 5.0], [-5.0, 5.0], [5.0, -5.0], [-5.0, -5.0]])
    points = centres.repeat_interleave(64, 0) + 0.05 * torch.randn(256, 2)
    points = points[torch.randperm(256)]
    cfg = QuantizerConfig(kmeans_init=True, kmeans_iters=5)
    vq = VectorQuantizer(4, 2, cfg)
    assert vq.initialized.item() == 0
    before = vq.codebook.detach().clone()
    vq.eval()(_latents(points, b=2, h=8))  # eval: no initialisation
    assert torch.equal(vq.codebook, before)
    vq.train()(_latents(points, b=2, h=8))
    assert vq.initialized.item() == 1
    cluster_of = (points[:, None] - centres[None]).pow(2).sum(-1).argmin(1)
    means = torch.stack([points[cluster_of == c].mean(0) for c in range(4)])
    order = (vq.codebook.detach()[:, None] - means[None]).pow(2).sum(-1).argmin(1)
    assert sorted(order.tolist()) == [0, 1, 2, 3]  # one code per cluster
    assert torch.allclose(vq.codebook.detach(), means[order], atol=1e-5)
    assert torch.equal(vq.ema_cluster_size, torch.full((4,), 64.0))

    save_model(vq, str(tmp_path / "vq.safetensors"))
    fresh = VectorQuantizer(4, 2, cfg)
    load_model(fresh, str(tmp_path / "vq.safetensors"), strict=True)
    assert fresh.initialized.item() == 1
    z = torch.randn(1, 2, 2, 4, 4) * 5
    assert torch.equal(fresh.eval()(z).codes, vq.eval()(z).codes)
    fresh.train()(z)  # already initialised: no second k-means
    assert torch.equal(fresh.codebook, vq.codebook)


def test_kmeans_flag_is_read_on_the_host_only_until_done(no_host_sync):
    """After k-means has run (or a loaded state says so), training steps no longer read ``initialized``."""
    cfg = QuantizerConfig(use_ema=True, kmeans_init=True, kmeans_iters=2)
    vq = VectorQuantizer(4, 2, cfg).train()
    z = torch.randn(1, 2, 2, 4, 4)
    vq(z)
    with no_host_sync("VectorQuantizer.forward"):
        vq(z)
    fresh = VectorQuantizer(4, 2, cfg).train()
    fresh(z)
    fresh.load_state_dict(VectorQuantizer(4, 2, cfg).state_dict())  # not initialised: k-means runs again
    before = fresh.codebook.clone()
    fresh(z * 3)
    assert fresh.initialized.item() == 1 and not torch.equal(fresh.codebook, before)


def test_vq_stays_fp32_under_bf16_autocast():
    torch.manual_seed(1)
    vq = VectorQuantizer(64, 16, QuantizerConfig()).eval()
    cb = vq.codebook.detach()
    a, b = torch.randint(64, (2, 200))
    keep = a != b
    a, b = a[keep], b[keep]
    # Near ties: midway between two codes, nudged towards code a.
    flat = (cb[a] + cb[b]) / 2 + 1e-3 * (cb[a] - cb[b])
    z = _latents(flat[: (flat.shape[0] // 4) * 4], h=4)
    reference = vq(z)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = vq(z)
        # What bf16 matmul would pick: the test only means something if it differs.
        bf16_codes = torch.addmm((cb**2).sum(1)[None], _rows(z), cb.t(), alpha=-2.0).argmin(1)
    assert not torch.equal(bf16_codes, reference.codes.flatten())
    assert torch.equal(out.codes, reference.codes)
    exact = torch.cdist(_rows(z).double(), cb.double()).argmin(1)  # float64 brute force
    assert torch.equal(out.codes.flatten(), exact)
    assert out.quantized.dtype == torch.float32 and out.loss.dtype == torch.float32
    assert all(v.dtype == torch.float32 for v in out.stats.values())

    # bf16 latents in, bf16 out; the codes are those of the fp32 values.
    z16 = torch.randn(1, 16, 2, 2, 2).bfloat16()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out16 = vq(z16)
    assert out16.quantized.dtype == torch.bfloat16 and out16.loss.dtype == torch.float32
    assert torch.equal(out16.codes, vq(z16.float()).codes)


def test_ema_state_stays_fp32_when_module_is_cast_to_bf16():
    vq = VectorQuantizer(8, 4, QuantizerConfig(use_ema=True)).to(torch.bfloat16)
    assert vq.codebook.dtype == vq.ema_embed_sum.dtype == vq.ema_cluster_size.dtype == torch.float32
    out = vq.train()(torch.randn(1, 4, 1, 2, 2, dtype=torch.bfloat16))
    assert out.quantized.dtype == torch.bfloat16 and vq.codebook.dtype == torch.float32


# --- lookup-free quantizer ------------------------------------------------------------------------------------------
def test_lfq_index_bits_bijection_and_round_trip():
    k = 64
    lfq = LookupFreeQuantizer(k, QuantizerConfig())
    assert lfq.dim == 6
    all_codes = torch.arange(k).view(1, 1, 1, k)
    latents = lfq.codes_to_latents(all_codes)  # (1, 6, 1, 1, 64)
    assert latents.shape == (1, 6, 1, 1, k)
    assert set(latents.unique().tolist()) == {-1.0, 1.0}
    assert _rows(latents).unique(dim=0).shape[0] == k  # K distinct sign vectors
    assert torch.equal(lfq(latents).codes, all_codes)  # bits -> index inverts index -> bits
    # Channel i is bit i: code 5 = 0b000101.
    assert _rows(lfq.codes_to_latents(torch.tensor(5).view(1, 1, 1, 1))).tolist() == [[1, -1, 1, -1, -1, -1]]

    z = torch.randn(2, 6, 2, 3, 3)
    out = lfq(z)
    assert torch.allclose(out.quantized, torch.where(z > 0, 1.0, -1.0), atol=1e-6)
    assert torch.equal(lfq.codes_to_latents(out.codes), torch.where(z > 0, 1.0, -1.0))
    expected_codes = ((z > 0).long() * torch.tensor([1, 2, 4, 8, 16, 32]).view(1, 6, 1, 1, 1)).sum(1)
    assert torch.equal(out.codes, expected_codes)


def test_lfq_straight_through_and_commitment():
    cfg = QuantizerConfig(entropy_loss_weight=0.0, lfq_commitment_weight=0.25)
    lfq = LookupFreeQuantizer(16, cfg)
    z = torch.randn(2, 4, 1, 2, 2, requires_grad=True)
    upstream = torch.randn_like(z)
    out = lfq(z)
    out.quantized.backward(upstream)
    assert torch.equal(z.grad, upstream)
    z.grad = None
    out = lfq(z)
    out.loss.backward()
    q = torch.where(z.detach() > 0, 1.0, -1.0)
    assert torch.allclose(z.grad, 0.25 * 2 * (z.detach() - q) / z.numel(), atol=1e-7)
    assert out.loss.item() == pytest.approx(0.25 * ((z.detach() - q) ** 2).mean().item(), rel=1e-6)


def test_lfq_entropy_matches_full_softmax_and_prefers_uniform_usage():
    cfg = QuantizerConfig(entropy_loss_weight=1.0, entropy_temperature=0.5)
    lfq = LookupFreeQuantizer(16, cfg)
    z = 0.3 * torch.randn(2, 4, 1, 3, 3)
    out = lfq(z)
    flat = _rows(z)
    codebook = lfq.codes_to_latents(torch.arange(16).view(1, 1, 1, 16))[0, :, 0, 0].t()  # (16, 4)
    logits = -torch.cdist(flat, codebook) ** 2 / 0.5
    p = logits.softmax(1)
    sample = -(p * logits.log_softmax(1)).sum(1).mean()
    avg = p.mean(0)
    codebook_entropy = -(avg * torch.log(avg + 1e-5)).sum()
    assert out.stats["sample_entropy"].item() == pytest.approx(sample.item(), rel=1e-4)
    assert out.stats["codebook_entropy"].item() == pytest.approx(codebook_entropy.item(), rel=1e-5)
    assert out.stats["entropy_loss"].item() == pytest.approx((sample - codebook_entropy).item(), rel=1e-4, abs=1e-6)

    uniform = lfq.codes_to_latents(torch.arange(16).view(1, 1, 1, 16))
    collapsed = lfq.codes_to_latents(torch.zeros(1, 1, 1, 16, dtype=torch.long))
    loss_uniform = lfq(uniform).stats["entropy_loss"].item()
    loss_collapsed = lfq(collapsed).stats["entropy_loss"].item()
    assert loss_uniform == pytest.approx(-math.log(16), abs=0.05)  # small per-bit entropy at T = 0.5
    assert loss_collapsed == pytest.approx(0.0, abs=0.05)
    assert lfq(uniform).stats["codebook_usage"] == 1.0 and lfq(collapsed).stats["codebook_usage"] == 1 / 16

    # The penalty's gradient pushes latents away from the bit boundary and towards using more codes.
    z = (0.05 * torch.randn(1, 4, 1, 4, 4)).requires_grad_()
    lfq(z).loss.backward()
    assert z.grad.abs().sum() > 0


def _dense_lfq_entropies(lfq: LookupFreeQuantizer, flat: torch.Tensor, temperature: float):
    """Reference: both entropy terms from the full (N, K) softmax over all K codes (MAGVIT-v2's definition)."""
    logits = 2.0 * flat @ lfq.code_vectors(flat.device).to(flat.dtype).t() / temperature  # (N, K)
    probs = logits.softmax(dim=1)
    sample = -(probs * logits.log_softmax(dim=1)).sum(dim=1).mean()
    avg = probs.mean(dim=0)
    return sample, -(avg * torch.log(avg + 1e-5)).sum()


@pytest.mark.parametrize("bits", [1, 5, 6, 8])
@pytest.mark.parametrize("scale", [0.002, 0.02, 0.5])
def test_lfq_factorised_entropies_equal_dense_softmax(bits, scale):
    """Values and gradients of the per-bit sample entropy and the half-code GEMM codebook entropy match the (N, K)
    softmax, from near-uniform (z ~ T) to confident (z >> T) latents, for odd and even bit counts."""
    torch.manual_seed(bits)
    lfq = LookupFreeQuantizer(2**bits, QuantizerConfig(entropy_temperature=0.01))
    flat = scale * torch.randn(300, bits)
    ours_flat = flat.clone().requires_grad_()
    ref_flat = flat.double().requires_grad_()
    ours = lfq._entropies(ours_flat)
    ref = _dense_lfq_entropies(lfq, ref_flat, 0.01)
    for a, b in zip(ours, ref):
        assert a.dtype == torch.float32 and abs(a.item() - b.item()) < 1e-5
    weights = (1.0, -0.7)  # a loss mixing both terms, so both gradients are checked
    grad_ours = torch.autograd.grad(sum(w * t for w, t in zip(weights, ours)), ours_flat)[0]
    grad_ref = torch.autograd.grad(sum(w * t for w, t in zip(weights, ref)), ref_flat)[0]
    # fp32 against fp64: measured <= 4e-6 of the largest entry (the fp32 dense softmax itself is off by up to 4e-5).
    assert torch.allclose(grad_ours.double(), grad_ref, rtol=1e-4, atol=1e-5 * grad_ref.abs().max().item())


def test_lfq_codebook_entropy_exact_at_2_18_codes():
    """K = 2^18 against the dense softmax on a handful of tokens (8 x 2^18 entries fit a test)."""
    torch.manual_seed(0)
    lfq = LookupFreeQuantizer(2**18, QuantizerConfig(entropy_temperature=0.01))
    flat = 0.01 * torch.randn(8, 18)
    ours = lfq._entropies(flat)
    ref = _dense_lfq_entropies(lfq, flat.double(), 0.01)
    assert abs(ours[0].item() - ref[0].item()) < 1e-5 and abs(ours[1].item() - ref[1].item()) < 1e-5


class _LargestTensor(torch.utils._python_dispatch.TorchDispatchMode):
    """Records the element count of the largest tensor any op produces (forward and backward)."""

    def __init__(self) -> None:
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # noqa: ANN001 - torch's signature
        out = func(*args, **(kwargs or {}))
        for t in torch.utils._pytree.tree_leaves(out):
            if isinstance(t, torch.Tensor):
                self.largest = max(self.largest, t.numel())
        return out


def test_lfq_2_18_codes_forward_backward_never_builds_n_by_k():
    """MAGVIT-v2's 2^18 codes on a 17x64x64 batch of 2 (5x8x8 latents each): no op output comes near (N, K)."""
    k, n_tokens = 2**18, 2 * 5 * 8 * 8
    lfq = LookupFreeQuantizer(k, QuantizerConfig(entropy_loss_weight=0.1))
    z = (0.05 * torch.randn(2, 18, 5, 8, 8)).requires_grad_()
    with _LargestTensor() as guard:
        out = lfq(z)
        (out.loss + out.quantized.square().mean()).backward()
    assert torch.isfinite(out.loss) and torch.isfinite(z.grad).all() and z.grad.abs().sum() > 0
    # Largest: the K-entry batch-mean table / bincount, or a (N, 2^9) half-code table; (N, K) is 500x larger.
    assert guard.largest <= max(k, n_tokens * 2**9), guard.largest
    assert out.stats["codebook_entropy"] > 0 and 0 < out.stats["codebook_usage"] <= n_tokens / k


def test_lfq_stays_fp32_under_bf16_autocast():
    lfq = LookupFreeQuantizer(256, QuantizerConfig())
    z = torch.randn(1, 8, 2, 4, 4)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = lfq(z)
    ref = lfq(z)
    assert torch.equal(out.codes, ref.codes)
    assert out.loss.dtype == torch.float32 and out.quantized.dtype == torch.float32
    assert out.loss.item() == pytest.approx(ref.loss.item(), rel=1e-6)


# --- finite scalar quantizer ----------------------------------------------------------------------------------------
def _fsq_inverse_bound(fsq: FiniteScalarQuantizer, level_index: torch.Tensor) -> torch.Tensor:
    """A latent (N, d) whose bounded value rounds to the level ``level_index`` (N, d): the bound's inverse at the level
    moved 1/4 towards the centre -offset of the bound's open range (the outermost levels are never reached exactly)."""
    levels = torch.tensor(fsq.levels, dtype=torch.float64)
    half_l = (levels - 1) * (1 - 1e-3) / 2
    offset = torch.where(torch.tensor(fsq.levels) % 2 == 0, 0.5, 0.0).double()
    target = level_index.double() - torch.div(torch.tensor(fsq.levels), 2, rounding_mode="floor")
    target = target - 0.25 * torch.sign(target + offset)
    return (torch.atanh((target + offset) / half_l) - torch.tan(offset / half_l)).float()


def test_fsq_config_levels_and_codebook_size():
    assert QuantizerConfig().fsq_levels == ()
    assert QuantizerConfig().fsq_levels_for(1000) == (8, 5, 5, 5) == FSQ_LEVELS[1000]
    assert QuantizerConfig().fsq_levels_for(64000) == (8, 8, 8, 5, 5, 5)
    assert all(math.prod(levels) == size for size, levels in FSQ_LEVELS.items())
    cfg = QuantizerConfig.from_dict({"fsq_levels": [4, 4, 4]})
    assert cfg.fsq_levels == (4, 4, 4) and cfg.fsq_levels_for(64) == (4, 4, 4)
    assert QuantizerConfig.from_dict(cfg.to_dict()) == cfg
    with pytest.raises(ValueError, match=r"4\*4\*4 = 64, but codebook_size is 1000"):
        cfg.fsq_levels_for(1000)
    with pytest.raises(ValueError, match="needs quantization.fsq_levels"):
        QuantizerConfig().fsq_levels_for(64)
    with pytest.raises(ConfigError, match="fsq_levels"):
        QuantizerConfig.from_dict({"fsq_levels": [8, 1, 5]})
    # The tokenizer config validates the pairing and derives the latent width from it.
    assert TokenizerConfig.preset("tiny", quantizer="fsq", codebook_size=1000).latent_dim == 4
    assert TokenizerConfig.preset("tiny", quantizer="fsq", quantization={"fsq_levels": [4, 4, 4]}).latent_dim == 3
    with pytest.raises(ConfigError, match="product of fsq_levels"):
        TokenizerConfig.preset("tiny", quantizer="fsq", quantization={"fsq_levels": [8, 5, 5, 5]})  # tiny: 64 codes
    with pytest.raises(ConfigError, match="codebook_size 64 needs quantization.fsq_levels"):
        TokenizerConfig.preset("tiny", quantizer="fsq")


@pytest.mark.parametrize("levels", [(8, 5, 5, 5), (2, 3, 4, 7, 6)])
def test_fsq_codes_and_levels_are_a_bijection(levels):
    fsq = FiniteScalarQuantizer(levels)
    k = math.prod(levels)
    assert (fsq.codebook_size, fsq.dim) == (k, len(levels))
    all_codes = torch.arange(k)
    digits = fsq.codes_to_levels(all_codes)  # (K, d)
    assert all(0 <= digits[:, i].min() and digits[:, i].max() < level for i, level in enumerate(levels))
    assert torch.equal(fsq.levels_to_codes(digits), all_codes)  # every code round trips
    every_vector = torch.tensor(list(itertools.product(*[range(level) for level in levels])))  # (K, d)
    codes = fsq.levels_to_codes(every_vector)
    assert torch.equal(codes.sort().values, all_codes)  # onto [0, K) without collisions
    assert torch.equal(fsq.codes_to_levels(codes), every_vector)  # every level vector round trips
    # Mixed radix with channel 0 least significant: digits (1, 2, 0, 0, ...) -> 1 + 2 * L_0.
    assert fsq.levels_to_codes(torch.tensor([1, 2] + [0] * (len(levels) - 2))).item() == 1 + 2 * levels[0]

    # Every code is reached by some latent, and forward's quantized latents are codes_to_latents of its codes.
    z = _latents(_fsq_inverse_bound(fsq, digits))  # (1, d, 1, 1, K)
    out = fsq(z)
    assert torch.equal(out.codes.flatten(), all_codes)
    assert torch.equal(fsq.latents_to_codes(z), out.codes)
    assert torch.allclose(out.quantized, fsq.codes_to_latents(out.codes), atol=1e-6)
    assert out.stats["codebook_usage"].item() == 1.0
    assert out.stats["perplexity"].item() == pytest.approx(k, rel=1e-4)


@pytest.mark.parametrize("level", [2, 3, 4, 5, 7, 8, 16])
def test_fsq_exactly_l_values_per_channel(level):
    fsq = FiniteScalarQuantizer((level, 5))
    z = torch.linspace(-40.0, 40.0, 40001)
    z = _latents(torch.stack([z, -z], dim=1))
    out = fsq(z)
    values = _rows(out.quantized)[:, 0].unique()
    half = level // 2
    expected = (torch.arange(level) - half).float() / half  # -1 .. (L - 1 - L // 2) / (L // 2)
    assert torch.allclose(values, expected, atol=1e-6)
    assert _rows(out.quantized)[:, 1].unique().numel() == 5
    assert _rows(out.quantized).abs().max() <= 1.0
    assert fsq.codes_to_levels(out.codes)[..., 0].unique().numel() == level


def test_fsq_straight_through_gradient_and_no_loss():
    fsq = FiniteScalarQuantizer((8, 5, 5, 5))
    z = torch.randn(2, 4, 2, 3, 3, requires_grad=True)
    upstream = torch.randn_like(z)
    out = fsq(z)
    assert out.loss.item() == 0.0 and not out.loss.requires_grad
    assert {"codebook_usage", "perplexity", "commitment_loss", "codebook_loss", "entropy_loss"} <= set(out.stats)
    out.quantized.backward(upstream)
    # d quantized / dz = tanh'(z + shift) * half_l / (L // 2): the rounding passes the gradient straight through.
    levels = torch.tensor([8.0, 5, 5, 5]).view(1, 4, 1, 1, 1)
    half_l = (levels - 1) * (1 - 1e-3) / 2
    offset = torch.tensor([0.5, 0, 0, 0]).view(1, 4, 1, 1, 1)
    slope = 1 - torch.tanh(z.detach() + torch.tan(offset / half_l)) ** 2
    assert torch.allclose(z.grad, upstream * slope * half_l / torch.floor(levels / 2), atol=1e-6)


def test_fsq_stays_fp32_under_bf16_autocast_and_casts():
    fsq = FiniteScalarQuantizer((8, 5, 5, 5))
    z = torch.randn(1, 4, 2, 4, 4)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = fsq(z)
    assert torch.equal(out.codes, fsq(z).codes) and out.quantized.dtype == torch.float32
    fsq.to(torch.bfloat16)
    assert fsq._levels.dtype == torch.long and fsq.state_dict() == {}
    assert torch.equal(fsq(z.bfloat16()).codes, fsq.latents_to_codes(z.bfloat16()))


def test_fsq_tiny_tokenizer_shapes_and_save_load(tmp_path):
    torch.manual_seed(0)
    cfg = TokenizerConfig.preset("tiny", quantizer="fsq", codebook_size=240)  # levels (8, 6, 5)
    tok = VideoTokenizer(cfg).eval()
    assert isinstance(tok.quantizer, FiniteScalarQuantizer) and tok.quantizer.levels == (8, 6, 5)
    video = torch.rand(2, 3, cfg.num_frames, cfg.image_size, cfg.image_size) * 2 - 1
    grid = cfg.token_grid(cfg.num_frames, cfg.image_size, cfg.image_size)
    assert tok.encoder(video).shape == (2, 3, *grid)
    codes = tok.encode(video)
    assert codes.shape == (2, *grid) and codes.dtype == torch.long and 0 <= codes.min() and codes.max() < 240
    decoded = tok.decode(codes)
    assert decoded.shape == video.shape
    reconstruction, stats = tok(video)
    assert torch.allclose(reconstruction, decoded, atol=1e-5)  # forward's quantized latents == decode's latents
    assert stats["quantizer_loss"].item() == 0.0 and 0 < stats["codebook_usage"] <= 1
    tok.save_pretrained(tmp_path / "tok")
    loaded = VideoTokenizer.from_pretrained(tmp_path / "tok").eval()
    assert loaded.config == cfg and loaded.quantizer.levels == (8, 6, 5)
    assert torch.equal(loaded.encode(video), codes)
    assert torch.equal(loaded.decode(codes), decoded)


# --- two gloo ranks -------------------------------------------------------------------------------------------------
K, D = 8, 3


def _configs() -> dict[str, QuantizerConfig]:
    return {
        "ema": QuantizerConfig(use_ema=True, entropy_loss_weight=0.0),
        # Threshold 5 with 16 vectors per global batch over 8 codes: restarts every step.
        "restart": QuantizerConfig(use_ema=True, kmeans_init=True, kmeans_iters=3, dead_code_threshold=5.0),
    }


def _models() -> dict[str, VectorQuantizer]:
    torch.manual_seed(0)
    return {name: VectorQuantizer(K, D, cfg).train() for name, cfg in _configs().items()}


def _dist_worker(rank: int, world: int, store: str, out_dir: str, data: list[list[torch.Tensor]]) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world,
                            timeout=timedelta(seconds=30))
    try:
        models = _models()
        torch.manual_seed(100 + rank)  # ranks draw different random numbers: only synchronisation keeps them equal
        restarted = []
        for step_data in data:
            models["ema"](step_data[rank])
            restarted.append(models["restart"](step_data[rank]).stats["restarted_codes"])
        tensors = {f"{name}.{k}": v for name, m in models.items() for k, v in m.state_dict().items()}
        tensors["restarted"] = torch.stack(restarted)
        save_file(tensors, f"{out_dir}/rank{rank}.safetensors")
        dist.barrier()
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
@pytest.mark.timeout(120)
def test_two_ranks_keep_identical_codebooks(tmp_path):
    torch.manual_seed(0)
    # 3 steps, 2 ranks, 8 latent vectors each; rank 1's data is shifted so that the ranks really differ.
    data = [[torch.randn(1, D, 1, 2, 4) + 3.0 * r for r in range(2)] for _ in range(3)]
    ctx = mp.spawn(_dist_worker, args=(2, str(tmp_path / "store"), str(tmp_path), data), nprocs=2, join=False)
    deadline = time.monotonic() + 90
    while not ctx.join(timeout=1):
        if time.monotonic() > deadline:
            for p in ctx.processes:
                p.kill()
            pytest.fail("distributed quantizer workers did not finish within 90 s")
    ranks = [load_file(str(tmp_path / f"rank{r}.safetensors")) for r in range(2)]
    for key in ranks[0]:
        assert torch.equal(ranks[0][key], ranks[1][key]), key
    assert (ranks[0]["restarted"] > 0).all()
    assert ranks[0]["restart.initialized"].item() == 1

    # Codes restarted at the last step (their EMA size was reset to the threshold) come from rank 0's batch.
    reset = ranks[0]["restart.ema_cluster_size"] == 5.0
    assert reset.any()
    batch0 = _rows(data[-1][0])
    for row in ranks[0]["restart.codebook"][reset]:
        assert (row[None] == batch0).all(1).any()

    # EMA of the all-reduced statistics equals one process seeing both ranks' data at once.
    single = _models()["ema"]
    for step_data in data:
        single(torch.cat(step_data, dim=0))
    for key, value in single.state_dict().items():
        assert torch.allclose(ranks[0][f"ema.{key}"].to(value.dtype), value, atol=1e-6), key


@pytest.mark.parametrize("kind", ["vq", "lfq", "fsq"])
def test_latents_to_codes_equals_forward_codes(kind):
    """The inference path (no losses, no updates) picks the same codes as the training forward."""
    cfg = QuantizerConfig(entropy_loss_weight=0.1, fsq_levels=(4, 4, 4))
    quantizer = build_quantizer(kind, 64, {"vq": 8, "lfq": 6, "fsq": 3}[kind], cfg).eval()
    z = torch.randn(2, quantizer.dim, 3, 4, 5)
    assert torch.equal(quantizer.latents_to_codes(z), quantizer(z).codes)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert torch.equal(quantizer.latents_to_codes(z), quantizer(z).codes)


# --- LFQ input normalisation and the entropy weight schedule (issue: tokenizers that learn fast) ---------------------
def test_lfq_norm_config_default_and_validation():
    assert QuantizerConfig().lfq_norm == "none" and QuantizerConfig().entropy_anneal_steps == 0
    with pytest.raises(ConfigError, match="lfq_norm"):
        QuantizerConfig.from_dict({"lfq_norm": "batch"})
    with pytest.raises(ConfigError, match="entropy_anneal_steps"):
        QuantizerConfig.from_dict({"entropy_anneal_steps": -1})
    with pytest.raises(ConfigError, match="entropy_anneal_from"):
        QuantizerConfig.from_dict({"entropy_anneal_from": -0.1})


def test_lfq_group_norm_zero_mean_unit_variance_per_channel_and_frame():
    torch.manual_seed(0)
    q = LookupFreeQuantizer(16, QuantizerConfig(lfq_norm="group"))
    z = torch.randn(2, 4, 3, 5, 6) * torch.tensor([0.1, 1.0, 5.0, 20.0]).view(1, 4, 1, 1, 1) + 3.0
    n = q.normalize(z)
    assert n.shape == z.shape
    assert torch.allclose(n.mean(dim=(3, 4)), torch.zeros(2, 4, 3), atol=1e-5)  # every (clip, channel, frame)
    raw = z.var(dim=(3, 4), unbiased=False)  # unit variance up to GroupNorm's eps 1e-5: var / (var + eps)
    assert torch.allclose(n.var(dim=(3, 4), unbiased=False), raw / (raw + 1e-5), atol=1e-5)
    assert torch.allclose(n.var(dim=(3, 4), unbiased=False)[:, 1:], torch.ones(2, 3, 3), atol=1e-3)
    # per frame: changing frame 2 changes neither frame 0's nor frame 1's normalised values (causal models stay causal)
    z2 = z.clone()
    z2[:, :, 2] *= -7.0
    assert torch.equal(q.normalize(z2)[:, :, :2], n[:, :, :2])
    # the codes are the signs of the normalised latents, on the training and the inference path alike
    assert torch.equal(q(z).codes, q.latents_to_codes(z))
    expected = ((_rows(n) > 0).long() * (2 ** torch.arange(4))).sum(1).view(2, 3, 5, 6)
    assert torch.equal(q.latents_to_codes(z), expected)


def test_lfq_layer_norm_per_token_and_none_is_identity():
    torch.manual_seed(0)
    z = torch.randn(2, 6, 2, 3, 3) * 4 + 1
    n = LookupFreeQuantizer(64, QuantizerConfig(lfq_norm="layer")).normalize(z)
    assert torch.allclose(n.mean(dim=1), torch.zeros(2, 2, 3, 3), atol=1e-5)
    assert torch.allclose(n.var(dim=1, unbiased=False), torch.ones(2, 2, 3, 3), atol=1e-3)
    assert LookupFreeQuantizer(64).normalize(z) is z


@pytest.mark.parametrize("norm", ["group", "layer"])
def test_lfq_norm_straight_through_gradient_reaches_the_encoder(norm):
    torch.manual_seed(0)
    cfg = TokenizerConfig.preset("tiny", quantizer="lfq", codebook_size=64,
                                 quantization=QuantizerConfig(lfq_norm=norm, entropy_loss_weight=0.1))
    tok = VideoTokenizer(cfg).train()
    video = torch.rand(2, 3, cfg.num_frames, cfg.image_size, cfg.image_size) * 2 - 1
    reconstruction, stats = tok(video)
    ((reconstruction - video).pow(2).mean() + stats["quantizer_loss"]).backward()
    grads = [p.grad for p in tok.encoder.parameters()]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    assert sum(float(g.abs().sum()) for g in grads) > 0
    tok.eval()
    with torch.no_grad():  # the decoded codes are what forward reconstructs from
        assert torch.allclose(tok.decode(tok.encode(video)), tok(video)[0], atol=1e-5)


def test_entropy_weight_schedule_known_values():
    cfg = QuantizerConfig(entropy_loss_weight=0.02, entropy_anneal_from=0.1, entropy_anneal_steps=100)
    assert cfg.entropy_weight_at(0) == pytest.approx(0.1)
    assert cfg.entropy_weight_at(50) == pytest.approx(0.06)
    assert cfg.entropy_weight_at(100) == pytest.approx(0.02) and cfg.entropy_weight_at(10_000) == pytest.approx(0.02)
    constant = QuantizerConfig(entropy_loss_weight=0.1)
    assert all(constant.entropy_weight_at(s) == 0.1 for s in (0, 5, 10_000))
    # a warm-up of the entropy term (from 0) still computes it
    assert QuantizerConfig(entropy_loss_weight=0.0, entropy_anneal_from=0.1, entropy_anneal_steps=5).uses_entropy
    assert not QuantizerConfig(entropy_loss_weight=0.0).uses_entropy


@pytest.mark.parametrize("kind", ["lfq", "vq"])
def test_annealed_entropy_weight_follows_training_steps(kind):
    """The quantizer's loss uses the weight of its training step: start value at step 0, final after the anneal;
    evaluation passes do not advance the schedule; the step travels in the state dict."""
    torch.manual_seed(0)
    steps = 4
    annealed = QuantizerConfig(entropy_loss_weight=0.02, entropy_anneal_from=0.1, entropy_anneal_steps=steps)
    dim = 4
    q = build_quantizer(kind, 16, dim, annealed).train()
    z = torch.randn(2, dim, 2, 3, 3)

    def expected_loss(weight: float) -> torch.Tensor:
        ref = build_quantizer(kind, 16, dim, QuantizerConfig(entropy_loss_weight=weight)).train()
        if kind == "vq":
            ref.load_state_dict({k: v for k, v in q.state_dict().items() if k != "entropy_step"})
        return ref(z).loss

    assert "entropy_step" in q.state_dict() and "entropy_step" not in build_quantizer(kind, 16, dim).state_dict()
    q.eval()
    q(z)  # evaluation does not count
    q.train()
    for step in range(steps + 2):
        weight = annealed.entropy_weight_at(step)
        expected = expected_loss(weight)
        assert torch.allclose(q(z).loss, expected, atol=1e-6), (step, weight)
    assert weight == pytest.approx(0.02)
    fresh = build_quantizer(kind, 16, dim, annealed)
    fresh.load_state_dict(q.state_dict())
    assert int(fresh.entropy_step) == int(q.entropy_step) >= steps
    assert torch.allclose(fresh.train()(z).loss, expected_loss(0.02), atol=1e-6)
