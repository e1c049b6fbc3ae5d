"""MAGVIT's 3D StyleGAN-like discriminator."""

import pytest
import torch

from magvit.discriminator import Discriminator, DiscriminatorConfig
from magvit.losses import r1_penalty


def test_output_shape_and_gradient():
    cfg = DiscriminatorConfig.preset("tiny")
    disc = Discriminator(cfg)
    assert not any(isinstance(m, (torch.nn.GroupNorm, torch.nn.BatchNorm3d)) for m in disc.modules())
    video = (torch.rand(2, 3, cfg.num_frames, cfg.image_size, cfg.image_size) * 2 - 1).requires_grad_(True)
    logits = disc(video)
    assert logits.shape == (2,)
    # samples are independent (no batch statistics): sample 0's logit does not depend on sample 1
    assert torch.allclose(disc(video[:1]), logits[:1], atol=1e-5)
    penalty = r1_penalty(logits, video)
    assert penalty.item() > 0
    (logits.mean() + penalty).backward()  # the GAN term reaches the head's bias, R1 does not
    grads = [p.grad for p in disc.parameters()]
    assert all(g is not None for g in grads) and sum(g.abs().sum() for g in grads) > 0


@pytest.mark.parametrize("num_frames", [16, 17])
@pytest.mark.parametrize("name", ["B", "L"])
def test_presets_reach_one_frame_at_the_head(name, num_frames):
    """As the official discriminator: 16 (MAGVIT) or 17 (MAGVIT-v2) frames reach the head as T = 1, 4x4 pixels."""
    cfg = DiscriminatorConfig.preset(name, num_frames=num_frames)
    assert cfg.output_grid == (1, 4)
    shapes = []
    with torch.device("meta"):
        disc = Discriminator(cfg)
        hooks = [b.register_forward_hook(lambda m, i, o: shapes.append(tuple(o.shape[2:]))) for b in disc.blocks]
        out = disc(torch.empty(2, 3, cfg.num_frames, cfg.image_size, cfg.image_size))
    assert out.shape == (2,)
    frames = [8, 4, 2, 1, 1] if num_frames == 16 else [9, 5, 3, 2, 1]  # halved rounding up, one frame stays
    assert shapes == [(t, 128 // 2 ** (i + 1), 128 // 2 ** (i + 1)) for i, t in enumerate(frames)]
    assert disc.fc.in_features == disc.conv_out.out_channels * 1 * 4 * 4
    for hook in hooks:
        hook.remove()


def test_odd_frame_count_pools_the_last_frame_alone():
    from magvit.discriminator import DiscriminatorBlock

    block = DiscriminatorBlock(1, 1, temporal=True, negative_slope=0.2)
    x = torch.arange(3.0).view(1, 1, 3, 1, 1).expand(1, 1, 3, 2, 2)
    torch.nn.init.zeros_(block.conv2.weight)
    torch.nn.init.zeros_(block.conv2.bias)
    torch.nn.init.ones_(block.shortcut.weight)
    out = block(x)  # only the shortcut: avgpool of (0, 1), then 2 alone, over 2x2 pixels
    assert out.shape == (1, 1, 2, 1, 1)
    torch.testing.assert_close(out.flatten(), torch.tensor([0.5, 2.0]) / 2 ** 0.5)
    assert block(torch.ones(1, 1, 1, 2, 2)).shape == (1, 1, 1, 1, 1)


class _Engine:
    """The few DeepSpeed engine methods ``discriminator_step`` calls, on a plain module."""

    def __init__(self, module):
        self.module = module
        self.losses = []

    def __call__(self, x):
        return self.module(x)

    def backward(self, loss):
        self.losses.append(loss.detach())
        loss.backward()

    def step(self):
        pass

    def was_step_applied(self):
        return True


class _Linear(torch.nn.Module):
    """D(x) = <w, x>: grad_x D = w for every sample, so E||grad||^2 = ||w||^2 exactly."""

    def __init__(self, shape):
        super().__init__()
        self.w = torch.nn.Parameter(torch.randn(shape))

    def forward(self, x):
        return (x * self.w).flatten(1).sum(1)


@pytest.mark.parametrize("r1_weight", [10.0, 3.0])
def test_trainer_r1_term_is_weight_times_squared_gradient_norm(r1_weight):
    """The trainer's discriminator loss is GAN + r1_weight * E||grad_x D(x)||^2 (MAGVIT, no 1/2 factor)."""
    import contextlib

    from magvit.launch.train_tokenizer import discriminator_step
    from magvit.losses import discriminator_loss
    from magvit.run_config import TokenizerTrainConfig
    from magvit.trainloop import NonFiniteGuard

    torch.manual_seed(0)
    cfg = TokenizerTrainConfig().with_overrides([f"loss.r1_weight={r1_weight}", "loss.lecam_weight=0"])
    d = _Linear((3, 5, 4, 4))
    engine = _Engine(d)
    video, recon = torch.rand(2, 3, 5, 4, 4) * 2 - 1, torch.rand(2, 3, 5, 4, 4) * 2 - 1
    metrics = discriminator_step(engine, video, recon, 0, cfg, None, NonFiniteGuard(5), contextlib.nullcontext())
    squared_norm = d.w.detach().pow(2).sum()
    gan = discriminator_loss(d(video), d(recon), cfg.loss.gan_loss).detach()
    assert metrics["d/r1"] == pytest.approx(squared_norm.item(), rel=1e-5)
    torch.testing.assert_close(engine.losses[0], gan + r1_weight * squared_norm, rtol=1e-5, atol=1e-5)
    # The R1 term's gradient in w is r1_weight * 2w (plus the GAN term's).
    d.w.grad = None
    discriminator_loss(d(video), d(recon), cfg.loss.gan_loss).backward()
    gan_grad = d.w.grad.clone()
    d.w.grad = None
    discriminator_step(engine, video, recon, 0, cfg, None, NonFiniteGuard(5), contextlib.nullcontext())
    torch.testing.assert_close(d.w.grad, gan_grad + r1_weight * 2 * d.w.detach(), rtol=1e-5, atol=1e-5)


def test_bad_inputs():
    cfg = DiscriminatorConfig.preset("tiny")
    disc = Discriminator(cfg)
    with pytest.raises(ValueError, match="expected a video of shape"):
        disc(torch.zeros(1, 3, cfg.num_frames, 16, 16))
    with pytest.raises(ValueError, match="divisible"):
        DiscriminatorConfig.preset("tiny", image_size=36)
    assert DiscriminatorConfig.preset("tiny", num_frames=9).output_grid == (2, 4)  # any clip length: 9 -> 5, 3, 2
    with pytest.raises(ValueError, match="one flag per residual block"):
        DiscriminatorConfig.preset("tiny", temporal_downsample=(True,))


_ENGINE_R1 = r'''
import contextlib, json, sys
import torch
from magvit.launch.train_tokenizer import discriminator_step
from magvit import distributed as dist
from magvit.run_config import TokenizerTrainConfig
from magvit.trainloop import NonFiniteGuard

class Linear(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.w = torch.nn.Parameter(torch.linspace(-1, 1, 3 * 3 * 4 * 4).view(3, 3, 4, 4))
    def forward(self, x):
        return (x * self.w).flatten(1).sum(1)

dist.init_distributed()
torch.manual_seed(0)
video, recon = torch.rand(2, 3, 3, 4, 4) * 2 - 1, torch.rand(2, 3, 3, 4, 4) * 2 - 1
out = {}
for weight in (0.0, 10.0):
    d = Linear()
    w0 = d.w.detach().clone()
    opt = torch.optim.SGD(d.parameters(), lr=0.01)
    ds = dist.make_deepspeed_config({"zero_optimization": {"stage": 2}}, micro_batch_size=2, grad_accum_steps=1,
                                    grad_clip=0.0, precision="fp32")
    engine = dist.build_engine(d, opt, ds)
    cfg = TokenizerTrainConfig().with_overrides([f"loss.r1_weight={weight}", "loss.lecam_weight=0"])
    metrics = discriminator_step(engine, video, recon, 0, cfg, None, NonFiniteGuard(5), contextlib.nullcontext())
    out[str(weight)] = {"step": (w0 - engine.module.w.detach()).div(0.01).flatten().tolist(), "w0": w0.flatten().tolist(),
                        "r1": metrics.get("d/r1")}
print(json.dumps(out))
'''


def test_r1_under_a_zero2_engine_reaches_the_parameters():
    """Under a real DeepSpeed ZeRO-2 engine the R1 term runs (no mid-step gradient reduction) and adds exactly
    r1_weight * 2w to the SGD step of the linear discriminator D(x) = <w, x>."""
    import json
    import os
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1", "PYTHONPATH": str(root)}
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_PORT"):
        env.pop(key, None)
    result = subprocess.run([sys.executable, "-c", _ENGINE_R1], cwd=root, env=env, capture_output=True, text=True,
                            timeout=240)
    assert result.returncode == 0, result.stderr[-3000:]
    out = json.loads(result.stdout.strip().splitlines()[-1])
    w0 = torch.tensor(out["10.0"]["w0"])
    assert out["10.0"]["r1"] == pytest.approx(w0.pow(2).sum().item(), rel=1e-5)
    extra = torch.tensor(out["10.0"]["step"]) - torch.tensor(out["0.0"]["step"])  # gradient of the R1 term alone
    torch.testing.assert_close(extra, 10.0 * 2 * w0, rtol=1e-3, atol=1e-4)
