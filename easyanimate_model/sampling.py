"""The five v1 schedulers and the classifier-free-guidance denoising loop of EasyAnimatePipeline (docs/MODEL.md
§C.5, §C.4).

The loop reproduces the original pipeline step for step: initial noise × init_noise_sigma, CFG batch
`cat([negative, positive])`, `scale_model_input`, the scheduler's own timestep tensor expanded to the batch
(float32 for Euler/Euler A, int64 for the others), CFG mix on all 8 output channels, first 4 channels kept
(learned sigma), `scheduler.step` with `eta=0.0` / `generator` where the step accepts them.
"""
from __future__ import annotations

import inspect
from typing import Callable

import torch

from .config import BETA_END, BETA_START, NUM_TRAIN_TIMESTEPS

SCHEDULERS = ("Euler", "Euler A", "DPM++", "PNDM", "DDIM")

# config/easyanimate_video_motion_module_v1.yaml `noise_scheduler_kwargs`. Every other option stays at the diffusers
# class default: the 0.27 defaults (timestep spacing, DPM++ order/final sigma, PNDM PRK warm-up, DDIM clipping) are
# unchanged in current diffusers, which tests/test_sampling.py checks field by field.
NOISE_SCHEDULER_KWARGS = {"beta_start": BETA_START, "beta_end": BETA_END, "beta_schedule": "linear", "steps_offset": 1,
                          "num_train_timesteps": NUM_TRAIN_TIMESTEPS}

_CLASS_NAMES = {
    "Euler": "EulerDiscreteScheduler",
    "Euler A": "EulerAncestralDiscreteScheduler",
    "DPM++": "DPMSolverMultistepScheduler",
    "PNDM": "PNDMScheduler",
    "DDIM": "DDIMScheduler",
}


def make_scheduler(name: str):
    """A fresh diffusers scheduler for one of `SCHEDULERS`, built exactly like the v1 pipeline builds it."""
    if name not in _CLASS_NAMES:
        raise ValueError(f"unknown scheduler {name!r}: expected one of {', '.join(SCHEDULERS)}")
    import diffusers

    return getattr(diffusers, _CLASS_NAMES[name])(**NOISE_SCHEDULER_KWARGS)


def _step_kwargs(scheduler, generator, eta: float = 0.0) -> dict:
    # Not every scheduler's step takes eta / generator; pass each only where the signature has it.
    params = inspect.signature(scheduler.step).parameters
    kwargs = {}
    if "eta" in params:
        kwargs["eta"] = eta
    if "generator" in params:
        kwargs["generator"] = generator
    return kwargs


def _check_inputs(guidance_scale, prompt_embeds, prompt_attention_mask, negative_prompt_embeds,
                  negative_prompt_attention_mask, latents, shape):
    if prompt_embeds.ndim != 3:
        raise ValueError(f"prompt_embeds: expected [batch, tokens, channels], found shape {tuple(prompt_embeds.shape)}")
    batch, tokens = prompt_embeds.shape[:2]
    if prompt_attention_mask is not None and tuple(prompt_attention_mask.shape) != (batch, tokens):
        raise ValueError(f"prompt_attention_mask: expected shape {(batch, tokens)}, "
                         f"found {tuple(prompt_attention_mask.shape)}")
    if guidance_scale > 1.0:
        if negative_prompt_embeds is None:
            raise ValueError(f"guidance_scale {guidance_scale} > 1 needs negative_prompt_embeds, found None")
        if tuple(negative_prompt_embeds.shape) != tuple(prompt_embeds.shape):
            raise ValueError(f"negative_prompt_embeds: expected shape {tuple(prompt_embeds.shape)} (like "
                             f"prompt_embeds), found {tuple(negative_prompt_embeds.shape)}")
        if (negative_prompt_attention_mask is None) != (prompt_attention_mask is None):
            raise ValueError("prompt_attention_mask and negative_prompt_attention_mask: give both or neither")
        if negative_prompt_attention_mask is not None and \
                tuple(negative_prompt_attention_mask.shape) != (batch, tokens):
            raise ValueError(f"negative_prompt_attention_mask: expected shape {(batch, tokens)}, "
                             f"found {tuple(negative_prompt_attention_mask.shape)}")
    if latents is None and shape is None:
        raise ValueError("sample needs either latents (initial noise) or shape [batch, 4, frames, h, w]")
    latent_shape = tuple(latents.shape if latents is not None else shape)
    if len(latent_shape) != 5 or latent_shape[0] != batch:
        raise ValueError(f"latents: expected [batch={batch}, channels, frames, height/8, width/8], "
                         f"found {latent_shape}")


def sample(
    model: Callable,
    scheduler="DPM++",
    steps: int = 30,
    guidance_scale: float = 6.0,
    prompt_embeds: torch.Tensor = None,
    prompt_attention_mask: torch.Tensor | None = None,
    negative_prompt_embeds: torch.Tensor | None = None,
    negative_prompt_attention_mask: torch.Tensor | None = None,
    latents: torch.Tensor | None = None,
    generator: torch.Generator | list | None = None,
    callback: Callable | None = None,
    shape: tuple | None = None,
) -> torch.Tensor:
    """Denoise video latents [B, 4, F, h, w] with the v1 pipeline loop; returns the final latents (unscaled by the VAE).

    model: callable `(hidden_states, timestep, encoder_hidden_states, encoder_attention_mask) -> [B, 8, F, h, w]`.
    scheduler: one of `SCHEDULERS` (or a diffusers scheduler instance; its timesteps are reset here).
    latents: initial unit-variance noise (scaled here by `init_noise_sigma`), else drawn as
        `randn_tensor(shape, generator)` in the dtype of `prompt_embeds`, like the original.
    callback(step_index, total, t, latents): called after every model call; an exception raised in it stops sampling.
    Guidance (batch `cat([negative, positive])`) runs only when guidance_scale > 1.
    """
    if prompt_embeds is None:
        raise ValueError("sample needs prompt_embeds [batch, tokens, channels], found None")
    if not isinstance(steps, int) or steps < 1:
        raise ValueError(f"steps: expected a positive integer, found {steps!r}")
    _check_inputs(guidance_scale, prompt_embeds, prompt_attention_mask, negative_prompt_embeds,
                  negative_prompt_attention_mask, latents, shape)
    if isinstance(scheduler, str):
        scheduler = make_scheduler(scheduler)
    device = prompt_embeds.device
    do_cfg = guidance_scale > 1.0

    embeds, mask = prompt_embeds, prompt_attention_mask
    if do_cfg:
        embeds = torch.cat([negative_prompt_embeds, prompt_embeds])
        if mask is not None:
            mask = torch.cat([negative_prompt_attention_mask, prompt_attention_mask])

    scheduler.set_timesteps(steps, device=device)
    timesteps = scheduler.timesteps

    if latents is None:
        from diffusers.utils.torch_utils import randn_tensor

        latents = randn_tensor(tuple(shape), generator=generator, device=device, dtype=prompt_embeds.dtype)
    else:
        latents = latents.to(device)
    latents = latents * scheduler.init_noise_sigma
    latent_channels = latents.shape[1]
    step_kwargs = _step_kwargs(scheduler, generator)

    with torch.no_grad():
        for i, t in enumerate(timesteps):
            latent_in = torch.cat([latents] * 2) if do_cfg else latents
            latent_in = scheduler.scale_model_input(latent_in, t)
            # The scheduler's own timestep tensor, dtype kept (float Euler, int64 otherwise), one per batch element.
            timestep = t[None].to(device).expand(latent_in.shape[0])
            noise_pred = model(latent_in, timestep, embeds, mask)
            if do_cfg:
                uncond, cond = noise_pred.chunk(2)
                noise_pred = uncond + guidance_scale * (cond - uncond)
            if noise_pred.shape[1] == 2 * latent_channels:
                noise_pred = noise_pred.chunk(2, dim=1)[0]  # learned sigma: keep epsilon
            elif noise_pred.shape[1] != latent_channels:
                raise ValueError(f"model output: expected {2 * latent_channels} (or {latent_channels}) channels, "
                                 f"found shape {tuple(noise_pred.shape)}")
            latents = scheduler.step(noise_pred, t, latents, **step_kwargs, return_dict=False)[0]
            if callback is not None:
                callback(i, len(timesteps), t, latents)
    return latents
