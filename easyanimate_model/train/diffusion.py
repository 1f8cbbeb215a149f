"""Improved-DDPM training objective with a learned variance (the PixArt/EasyAnimate "hybrid" loss, docs/MODEL.md §D.5).

loss = mean((eps - eps_hat)^2) + L_vb, where L_vb is the variational bound term of the learned-range variance in
bits/dim: KL(q(x_{t-1} | x_t, x_0) || p(x_{t-1} | x_t)) for t > 0 and the discretized Gaussian decoder NLL at t = 0.
The model mean is built from the detached eps_hat, so L_vb trains the variance channels only. As in IDDPM the VB term
is scaled by num_timesteps / 1000 (a no-op for the 1000-step schedule, kept so other step counts match IDDPM).
"""
from __future__ import annotations

import math

import numpy as np
import torch

from ..config import BETA_END, BETA_START, NUM_TRAIN_TIMESTEPS


def linear_betas(num_timesteps: int = NUM_TRAIN_TIMESTEPS) -> np.ndarray:
    # IDDPM's "linear" schedule rescales the 1000-step endpoints so that fewer steps cover the same noise range.
    scale = 1000.0 / num_timesteps
    return np.linspace(scale * BETA_START, scale * BETA_END, num_timesteps, dtype=np.float64)


def normal_kl(mean1, logvar1, mean2, logvar2):
    """KL(N(mean1, e^logvar1) || N(mean2, e^logvar2)), elementwise, in nats."""
    return 0.5 * (-1.0 + logvar2 - logvar1 + torch.exp(logvar1 - logvar2) + (mean1 - mean2) ** 2 * torch.exp(-logvar2))


def _approx_standard_normal_cdf(x):
    # tanh approximation of Phi(x), the one IDDPM uses for its decoder likelihood
    return 0.5 * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x.pow(3))))


def discretized_gaussian_log_likelihood(x, means, log_scales):
    """log-probability of data in [-1, 1] quantised to 256 bins under N(means, e^(2 log_scales)), elementwise."""
    centered = x - means
    inv_std = torch.exp(-log_scales)
    cdf_plus = _approx_standard_normal_cdf(inv_std * (centered + 1.0 / 255.0))
    cdf_min = _approx_standard_normal_cdf(inv_std * (centered - 1.0 / 255.0))
    log_cdf_plus = torch.log(cdf_plus.clamp(min=1e-12))
    log_one_minus_cdf_min = torch.log((1.0 - cdf_min).clamp(min=1e-12))
    log_delta = torch.log((cdf_plus - cdf_min).clamp(min=1e-12))
    # the edge bins extend to -inf / +inf
    return torch.where(x < -0.999, log_cdf_plus, torch.where(x > 0.999, log_one_minus_cdf_min, log_delta))


def _mean_flat(x):
    return x.mean(dim=tuple(range(1, x.ndim)))


class GaussianDiffusion:
    """Noise schedule + hybrid loss for an eps-predicting model with learned-range variance (out channels = 2 * in)."""

    def __init__(self, num_timesteps: int = NUM_TRAIN_TIMESTEPS):
        betas = linear_betas(num_timesteps)
        self.num_timesteps = num_timesteps
        alphas = 1.0 - betas
        acp = np.cumprod(alphas)
        acp_prev = np.append(1.0, acp[:-1])
        posterior_variance = betas * (1.0 - acp_prev) / (1.0 - acp)
        # the posterior variance is 0 at t=0; IDDPM substitutes the t=1 value before taking the log
        posterior_log_var = np.log(np.append(posterior_variance[1], posterior_variance[1:]))
        tables = {
            "sqrt_acp": np.sqrt(acp),
            "sqrt_one_minus_acp": np.sqrt(1.0 - acp),
            "sqrt_recip_acp": np.sqrt(1.0 / acp),
            "sqrt_recipm1_acp": np.sqrt(1.0 / acp - 1.0),
            "posterior_mean_coef1": betas * np.sqrt(acp_prev) / (1.0 - acp),
            "posterior_mean_coef2": (1.0 - acp_prev) * np.sqrt(alphas) / (1.0 - acp),
            "posterior_log_var": posterior_log_var,
            "log_betas": np.log(betas),
        }
        self._tables = {k: torch.from_numpy(v) for k, v in tables.items()}

    def _at(self, name: str, t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        """Table value at timesteps t [B], in float32, shaped to broadcast against `like` [B, ...]."""
        v = self._tables[name].to(t.device)[t].float()
        return v.view(-1, *([1] * (like.ndim - 1)))

    def sample_timesteps(self, batch_size: int, generator=None, device="cpu") -> torch.Tensor:
        return torch.randint(0, self.num_timesteps, (batch_size,), generator=generator, device=device)

    def q_sample(self, x0, t, noise):
        return self._at("sqrt_acp", t, x0) * x0 + self._at("sqrt_one_minus_acp", t, x0) * noise

    def posterior_mean_log_var(self, x0, xt, t):
        mean = self._at("posterior_mean_coef1", t, xt) * x0 + self._at("posterior_mean_coef2", t, xt) * xt
        return mean, self._at("posterior_log_var", t, xt)

    def vb_terms_bpd(self, eps_hat, var_interp, x0, xt, t):
        """Per-sample VB term in bits/dim; `eps_hat` should already be detached for the hybrid loss."""
        min_log = self._at("posterior_log_var", t, xt)
        max_log = self._at("log_betas", t, xt)
        frac = (var_interp + 1.0) / 2.0  # model output in [-1, 1] -> interpolation weight in [0, 1]
        model_log_var = frac * max_log + (1.0 - frac) * min_log
        pred_x0 = self._at("sqrt_recip_acp", t, xt) * xt - self._at("sqrt_recipm1_acp", t, xt) * eps_hat
        model_mean, _ = self.posterior_mean_log_var(pred_x0, xt, t)
        true_mean, true_log_var = self.posterior_mean_log_var(x0, xt, t)
        kl = _mean_flat(normal_kl(true_mean, true_log_var, model_mean, model_log_var)) / math.log(2.0)
        nll = -_mean_flat(discretized_gaussian_log_likelihood(x0, model_mean, 0.5 * model_log_var)) / math.log(2.0)
        return torch.where(t == 0, nll, kl)

    def training_losses(self, model_output, x0, xt, t, noise) -> dict:
        """Per-sample losses {"loss", "mse", "vb"} [B] for `model_output` [B, 2C, ...] predicted at (xt, t)."""
        channels = x0.shape[1]
        if model_output.shape[1] != 2 * channels:
            raise ValueError(f"model output has {model_output.shape[1]} channels, expected {2 * channels} "
                             "(eps + learned variance)")
        model_output = model_output.float()
        x0, xt, noise = x0.float(), xt.float(), noise.float()
        eps_hat, var_interp = model_output[:, :channels], model_output[:, channels:]
        mse = _mean_flat((noise - eps_hat) ** 2)
        vb = self.vb_terms_bpd(eps_hat.detach(), var_interp, x0, xt, t) * (self.num_timesteps / 1000.0)
        return {"loss": mse + vb, "mse": mse, "vb": vb}
