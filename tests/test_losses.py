"""Known values for the tokenizer's training losses."""

import math

import pytest
import torch
from torch import nn

from magvit.losses import (
    LeCamRegularizer,
    PerceptualLoss,
    adaptive_gan_weight,
    discriminator_active,
    discriminator_loss,
    gan_weight,
    generator_loss,
    r1_penalty,
    reconstruction_loss,
)


def test_reconstruction_losses_known_values():
    real = torch.zeros(1, 3, 1, 1, 2)
    fake = torch.tensor([1.0, -2.0, 3.0, 0.0, 1.0, -1.0]).view(1, 3, 1, 1, 2)
    assert reconstruction_loss(real, fake, "mse").item() == pytest.approx((1 + 4 + 9 + 0 + 1 + 1) / 6)
    assert reconstruction_loss(real, fake, "l1").item() == pytest.approx((1 + 2 + 3 + 0 + 1 + 1) / 6)
    with pytest.raises(ValueError, match="'mse' or 'l1'"):
        reconstruction_loss(real, fake, "l3")
    with pytest.raises(ValueError, match="shapes differ"):
        reconstruction_loss(real, fake[..., :1])


def test_gan_losses_known_values():
    real = torch.tensor([2.0, -0.5])
    fake = torch.tensor([0.5, -3.0])
    sp = lambda x: math.log1p(math.exp(x))  # noqa: E731  softplus
    # hinge: D = mean(relu(1 - real)) + mean(relu(1 + fake)); G = -mean(fake)
    assert discriminator_loss(real, fake, "hinge").item() == pytest.approx((0 + 1.5) / 2 + (1.5 + 0) / 2)
    assert generator_loss(fake, "hinge").item() == pytest.approx(1.25)
    # non-saturating: D = mean(softplus(-real)) + mean(softplus(fake)); G = mean(softplus(-fake))
    d_ns = (sp(-2.0) + sp(0.5)) / 2 + (sp(0.5) + sp(-3.0)) / 2
    assert discriminator_loss(real, fake, "non_saturating").item() == pytest.approx(d_ns, rel=1e-6)
    assert generator_loss(fake, "non_saturating").item() == pytest.approx((sp(-0.5) + sp(3.0)) / 2, rel=1e-6)
    with pytest.raises(ValueError, match="hinge"):
        generator_loss(fake, "wgan")


def test_r1_penalty_on_quadratic_discriminator():
    # D(x) = sum(a * x^2) per sample -> grad = 2 a x -> ||grad||^2 = sum(4 a^2 x^2)
    a = torch.tensor([0.5, -2.0, 1.0])
    x = torch.tensor([[1.0, 2.0, 3.0], [0.0, -1.0, 0.5]], requires_grad=True)
    logits = (a * x.pow(2)).sum(1)
    penalty = r1_penalty(logits, x)
    expected = ((4 * a**2 * x.detach() ** 2).sum(1)).mean()
    assert penalty.item() == pytest.approx(expected.item())
    penalty.backward()  # graph kept for D's update: d/dx of the penalty = 8 a^2 x / B
    assert torch.allclose(x.grad, 8 * a**2 * x.detach() / 2)
    with pytest.raises(ValueError, match="require grad"):
        r1_penalty(logits.detach(), x.detach())


def test_lecam_known_values_and_ema():
    lecam = LeCamRegularizer(decay=0.5)
    real = torch.tensor([1.0, 3.0])
    fake = torch.tensor([-1.0, 1.0])
    # anchors start at 0: relu(real - 0)^2 mean = (1 + 9) / 2; relu(0 - fake)^2 mean = (1 + 0) / 2
    assert lecam(real, fake).item() == pytest.approx(5.0 + 0.5)
    assert lecam.ema_real.item() == pytest.approx(0.5 * 2.0)  # 0.5 * 0 + 0.5 * mean(real)
    assert lecam.ema_fake.item() == pytest.approx(0.0)
    # second call uses the updated anchors: ema_real = 1, ema_fake = 0
    assert lecam(real, fake).item() == pytest.approx(5.0 + ((2.0**2) + 0.0) / 2)
    assert lecam.ema_real.item() == pytest.approx(1.5)
    lecam.eval()
    lecam(real, fake)
    assert lecam.ema_real.item() == pytest.approx(1.5)  # no update in eval mode
    assert set(dict(lecam.named_buffers())) == {"ema_real", "ema_fake"}


def test_adaptive_weight_is_ratio_of_gradient_norms():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 3))
    x = torch.randn(5, 4)
    out = net(x)
    rec = out.pow(2).mean()
    gan = -out[:, 0].mean() * 3.0
    last = net[2].weight
    g_rec = torch.autograd.grad(rec, last, retain_graph=True)[0]
    g_gan = torch.autograd.grad(gan, last, retain_graph=True)[0]
    expected = g_rec.norm() / (g_gan.norm() + 1e-6)
    weight = adaptive_gan_weight(rec, gan, last)
    assert weight.item() == pytest.approx(expected.item(), rel=1e-6)
    assert not weight.requires_grad
    # clamped: a GAN loss with no gradient gives rec_norm / 1e-6, clamped to max_weight
    assert adaptive_gan_weight(rec, out.sum() * 0.0, last, max_weight=10.0).item() == pytest.approx(10.0)


def test_gan_weight_schedule_fixed_and_adaptive():
    assert not discriminator_active(9, 10) and discriminator_active(10, 10)
    assert gan_weight(5, 10, 0.1).item() == 0.0
    assert gan_weight(10, 10, 0.1).item() == pytest.approx(0.1)
    w = torch.tensor([[2.0, -1.0]], requires_grad=True)
    x = torch.tensor([[1.0], [3.0]])
    y = (x @ w)  # (2, 2)
    rec, gan = y.pow(2).sum(), y[:, 0].sum()
    # d rec / dw = 2 * x^T y; d gan / dw = [sum(x), 0]
    expected = (2 * x.T @ y).norm() / (torch.tensor(4.0) + 1e-6)
    got = gan_weight(10, 0, 0.5, adaptive=True, rec_loss=rec, gan_loss=gan, last_layer=w)
    assert got.item() == pytest.approx(0.5 * expected.item(), rel=1e-6)
    with pytest.raises(ValueError, match="last_layer"):
        gan_weight(10, 0, 0.5, adaptive=True)


@pytest.fixture(scope="module")
def tiny_resnet_dir(tmp_path_factory):
    from transformers import ResNetConfig, ResNetForImageClassification

    torch.manual_seed(0)
    config = ResNetConfig(num_channels=3, embedding_size=8, hidden_sizes=[8, 16], depths=[1, 1],
                          layer_type="basic", num_labels=10)
    path = tmp_path_factory.mktemp("resnet")
    ResNetForImageClassification(config).save_pretrained(path)
    return path


def test_perceptual_loss_with_tiny_local_resnet(tiny_resnet_dir):
    loss_fn = PerceptualLoss(tiny_resnet_dir, resolution=32)
    assert loss_fn.enabled
    assert all(not p.requires_grad for p in loss_fn.parameters())
    real = torch.rand(2, 3, 2, 16, 16) * 2 - 1
    fake = (real + 0.3 * torch.randn_like(real)).clamp(-1, 1).requires_grad_(True)
    assert loss_fn(real, real).item() == pytest.approx(0.0, abs=1e-10)
    loss = loss_fn(real, fake)
    # equals the MSE of logits of the frames, computed by hand
    with torch.no_grad():
        expected = (loss_fn.logits(fake) - loss_fn.logits(real)).pow(2).mean()
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5)
    assert loss.item() > 0
    loss.backward()
    assert fake.grad is not None and fake.grad.abs().sum() > 0
    loss_fn.train()
    assert not loss_fn.network.training  # stays frozen in eval mode


def test_perceptual_loss_off_without_path(tmp_path):
    loss_fn = PerceptualLoss(None)
    assert not loss_fn.enabled and loss_fn(torch.zeros(1, 3, 1, 8, 8), torch.ones(1, 3, 1, 8, 8)).item() == 0.0
    with pytest.raises(ValueError, match="local ResNet directory"):
        PerceptualLoss(tmp_path / "missing")
