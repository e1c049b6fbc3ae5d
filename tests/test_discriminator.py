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


@pytest.mark.parametrize("name", ["B", "L"])
def test_presets_build_on_meta(name):
    cfg = DiscriminatorConfig.preset(name)
    with torch.device("meta"):
        disc = Discriminator(cfg)
        out = disc(torch.empty(2, 3, cfg.num_frames, cfg.image_size, cfg.image_size))
    assert out.shape == (2,)
    assert cfg.output_grid == (2, 4)


def test_bad_inputs():
    cfg = DiscriminatorConfig.preset("tiny")
    disc = Discriminator(cfg)
    with pytest.raises(ValueError, match="expected a video of shape"):
        disc(torch.zeros(1, 3, cfg.num_frames, 16, 16))
    with pytest.raises(ValueError, match="divisible"):
        DiscriminatorConfig.preset("tiny", image_size=36)
    with pytest.raises(ValueError, match="one flag per residual block"):
        DiscriminatorConfig.preset("tiny", temporal_downsample=(True,))
