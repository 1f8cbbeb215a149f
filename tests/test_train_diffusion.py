"""IDDPM hybrid loss (docs/MODEL.md §D.5): schedule, KL/NLL terms, detached mean, scaling."""
import math

import numpy as np
import pytest
import torch

from easyanimate_model.train.diffusion import (GaussianDiffusion, discretized_gaussian_log_likelihood, linear_betas,
                                               normal_kl)


def test_linear_schedule():
    betas = linear_betas()
    assert len(betas) == 1000 and betas[0] == pytest.approx(1e-4) and betas[-1] == pytest.approx(0.02)
    acp = np.cumprod(1 - betas)
    d = GaussianDiffusion()
    x0, noise, t = torch.randn(2, 4, 1, 2, 2), torch.randn(2, 4, 1, 2, 2), torch.tensor([0, 999])
    expected = torch.stack([math.sqrt(acp[i]) * x0[j] + math.sqrt(1 - acp[i]) * noise[j] for j, i in enumerate([0, 999])])
    assert torch.allclose(d.q_sample(x0, t, noise), expected, atol=1e-6)
    assert d.sample_timesteps(10000, torch.Generator().manual_seed(0)).unique().numel() > 990


def test_normal_kl_matches_torch():
    m1, m2, lv1, lv2 = torch.randn(4, 10).unbind(0)
    ref = torch.distributions.kl_divergence(torch.distributions.Normal(m1, (0.5 * lv1).exp()),
                                            torch.distributions.Normal(m2, (0.5 * lv2).exp()))
    assert torch.allclose(normal_kl(m1, lv1, m2, lv2), ref, atol=1e-5)


def test_discretized_likelihood_is_a_bin_probability():
    x = torch.tensor([-1.0, -0.5, 0.0, 0.3, 1.0])
    means, log_scales = torch.full_like(x, 0.1), torch.full_like(x, math.log(0.2))
    normal = torch.distributions.Normal(means, log_scales.exp())
    lo = torch.where(x < -0.999, torch.zeros_like(x), normal.cdf(x - 1 / 255))
    hi = torch.where(x > 0.999, torch.ones_like(x), normal.cdf(x + 1 / 255))
    # IDDPM's tanh approximation of the normal CDF is within ~1e-3 of the exact value
    assert torch.allclose(discretized_gaussian_log_likelihood(x, means, log_scales).exp(), hi - lo, atol=2e-3)


def test_perfect_prediction_has_zero_kl_and_vb_only_trains_the_variance():
    d = GaussianDiffusion()
    g = torch.Generator().manual_seed(0)
    x0 = torch.rand(3, 4, 2, 4, 4, generator=g) * 2 - 1
    noise = torch.randn(x0.shape, generator=g)
    t = torch.tensor([1, 100, 999])
    xt = d.q_sample(x0, t, noise)
    # eps exact and variance at the lower end (v = -1 -> the posterior variance): the KL vanishes
    out = torch.cat([noise, -torch.ones_like(noise)], 1)
    losses = d.training_losses(out, x0, xt, t, noise)
    assert torch.allclose(losses["vb"], torch.zeros(3), atol=1e-4) and torch.allclose(losses["mse"], torch.zeros(3))

    out = torch.randn(3, 8, 2, 4, 4, generator=g, requires_grad=True)
    d.training_losses(out, x0, xt, t, noise)["vb"].sum().backward()
    assert out.grad[:, :4].abs().max() == 0 and out.grad[:, 4:].abs().max() > 0
    # at t = 0 the VB term is the decoder NLL in bits/dim
    t0 = torch.zeros(3, dtype=torch.long)
    xt0 = d.q_sample(x0, t0, noise)
    vb0 = d.training_losses(out.detach(), x0, xt0, t0, noise)["vb"]
    eps, v = out.detach()[:, :4], out.detach()[:, 4:]
    log_var = (v + 1) / 2 * math.log(1e-4) + (1 - (v + 1) / 2) * float(d._tables["posterior_log_var"][0])
    pred_x0 = float(d._tables["sqrt_recip_acp"][0]) * xt0 - float(d._tables["sqrt_recipm1_acp"][0]) * eps
    mean = float(d._tables["posterior_mean_coef1"][0]) * pred_x0 + float(d._tables["posterior_mean_coef2"][0]) * xt0
    nll = -discretized_gaussian_log_likelihood(x0, mean, 0.5 * log_var).mean((1, 2, 3, 4)) / math.log(2)
    assert torch.allclose(vb0, nll, rtol=1e-5)


def test_vb_scaled_by_steps_over_1000_and_channel_check():
    d = GaussianDiffusion(500)
    x0 = torch.zeros(1, 4, 1, 2, 2)
    noise = torch.ones_like(x0)
    t = torch.tensor([250])
    xt = d.q_sample(x0, t, noise)
    out = torch.zeros(1, 8, 1, 2, 2)
    scaled = d.training_losses(out, x0, xt, t, noise)["vb"]
    raw = d.vb_terms_bpd(out[:, :4], out[:, 4:], x0, xt, t)
    assert torch.allclose(scaled, raw * 0.5)
    with pytest.raises(ValueError, match="expected 8"):
        d.training_losses(torch.zeros(1, 4, 1, 2, 2), x0, xt, t, noise)
