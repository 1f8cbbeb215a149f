"""The five v1 schedulers and the classifier-free-guidance denoising loop of EasyAnimatePipeline (docs/MODEL.md
§C.5, §C.4).

The loop reproduces the original pipeline step for step: initial noise × init_noise_sigma, CFG batch
`cat([negative, positive])`, `scale_model_input`, the scheduler's own timestep tensor expanded to the batch
(float32 for Euler/Euler A, int64 for the others), CFG mix on all 8 output channels, first 4 channels kept
(learned sigma), `scheduler.step` with `eta=0.0` / `generator` where the step accepts them.
"""
from __future__ import annotations

import functools
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


# Schedulers whose latents live in sigma space (x0 + sigma * eps, the k-diffusion convention); the others keep the
# DDPM latent sqrt(alpha_bar) * x0 + sqrt(1 - alpha_bar) * eps = (x0 + sigma * eps) / sqrt(1 + sigma^2).
SIGMA_SPACE = ("Euler", "Euler A")


def train_sigmas() -> torch.Tensor:
    """[1000] float32 noise levels sigma(t) = sqrt((1 - alpha_bar_t) / alpha_bar_t) of the v1 training schedule,
    computed as the schedulers compute them (float32 cumprod of the linear betas), increasing in t."""
    alphas_cumprod = make_scheduler("DDIM").alphas_cumprod
    return ((1 - alphas_cumprod) / alphas_cumprod) ** 0.5


def sigma_to_timestep(sigma: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
    """The exact (fractional) timestep of each sigma: the inverse of sigma(t), linear between integer t.

    Euler/Euler A interpolate sigma linearly between training steps at fractional timesteps, so this inverse gives
    their timestep back (not the nearest integer); a table entry gives its integer t exactly. float64, on CPU.
    """
    s = sigma.detach().to("cpu", torch.float64)
    tab = table.detach().to("cpu", torch.float64)
    hi = torch.searchsorted(tab, s).clamp(1, len(tab) - 1)
    lo_s, hi_s = tab[hi - 1], tab[hi]
    return ((hi - 1) + (s - lo_s) / (hi_s - lo_s)).clamp(0, len(tab) - 1)


def timestep_to_sigma(timestep: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
    """sigma at (fractional) timesteps, linear between training steps like the Euler schedulers; float64, on CPU."""
    t = timestep.detach().to("cpu", torch.float64).clamp(0, len(table) - 1)
    tab = table.detach().to("cpu", torch.float64)
    lo = t.floor().long().clamp(max=len(tab) - 2)
    return tab[lo] + (t - lo) * (tab[lo + 1] - tab[lo])


def schedule_sigmas(scheduler: str, steps: int) -> torch.Tensor:
    """float32 [calls + 1]: sigma of every model call the scheduler makes for `steps` steps, then 0.

    (PNDM's warm-up calls included, so 30 steps give 40 values.) The samplers in ComfyUI take these as SIGMAS and
    give them back to `scheduler_for_sigmas`.
    """
    s = make_scheduler(scheduler)
    s.set_timesteps(steps)
    sigmas = timestep_to_sigma(s.timesteps.double(), train_sigmas()).float()
    return torch.cat([sigmas, sigmas.new_zeros(1)])


def scheduler_for_sigmas(scheduler: str, sigmas: torch.Tensor, device=None, max_steps: int = 1000):
    """(a scheduler set up for N steps, start index) whose model calls from `start` on are at `sigmas[:-1]`.

    `sigmas` is `schedule_sigmas(scheduler, N)` or its tail (a partial denoise starts part-way). ValueError when
    the sigmas are no (tail of a) schedule of this scheduler.
    """
    sigmas = sigmas.detach().to("cpu", torch.float32).reshape(-1)
    calls = len(sigmas) - 1
    if calls < 1 or float(sigmas[-1]) != 0.0:
        raise ValueError(f"sigmas: expected the {scheduler} schedule (decreasing, ending in 0), found "
                         f"{[round(float(v), 4) for v in sigmas[:6]]}{'...' if len(sigmas) > 6 else ''}")
    for steps in range(1, max_steps + 1):
        try:
            full = _schedule_cached(scheduler, steps)
        except ValueError:  # e.g. PNDM below 4 steps
            continue
        if len(full) - 1 < calls or not torch.allclose(full[-calls - 1:], sigmas, rtol=1e-6, atol=0):
            continue
        start = len(full) - 1 - calls
        check_start(scheduler, start)
        s = make_scheduler(scheduler)
        s.set_timesteps(steps, device=device)
        if start and hasattr(s, "set_begin_index"):
            s.set_begin_index(start)
        return s, start
    raise ValueError(f"sigmas: not the {scheduler} schedule of any step count (or its tail): build them with "
                     f"EasyAnimateSigmas for the same scheduler; found {[round(float(v), 4) for v in sigmas[:6]]}"
                     f"{'...' if len(sigmas) > 6 else ''}")


def denoise_start(steps: int, denoise: float, scheduler=None) -> int:
    """Steps skipped for a partial denoise, with the diffusers img2img `strength` rule: the last
    `min(int(steps * denoise), steps)` steps run (denoise 1: all of them; 0: none, the input comes back).
    With `scheduler` (a name or an instance), a start it cannot make is a ValueError (check_start)."""
    if not 0.0 <= denoise <= 1.0:
        raise ValueError(f"denoise: expected a value from 0 to 1, found {denoise}")
    start = steps - min(int(steps * denoise), steps)
    if scheduler is not None:
        check_start(scheduler, start, f"denoise {denoise}")
    return start


def check_start(scheduler, start: int, found: str = ""):
    """ValueError when `scheduler` (a SCHEDULERS name or a scheduler instance) cannot begin `start` steps into its
    schedule: PNDM's PRK warm-up steps come first, so it runs only whole."""
    if start and (scheduler == "PNDM" or type(scheduler).__name__ == _CLASS_NAMES["PNDM"]):
        raise ValueError("PNDM runs only its whole schedule (its warm-up steps come first): use denoise 1 or another "
                         "sampler for video-to-video" + (f", found {found}" if found else ""))


def add_noise_at(scheduler, latents: torch.Tensor, noise: torch.Tensor, start: int) -> torch.Tensor:
    """`latents` noised to the scheduler's timestep at step `start` with the scheduler's own `add_noise`
    (the img2img pipelines' start point); `scheduler` as `scheduler_for_sigmas` returns it."""
    t = scheduler.timesteps[start:start + 1]
    return scheduler.add_noise(latents, noise, t)


# scheduler_for_sigmas searches the step counts: each schedule is computed once per process
_schedule_cached = functools.cache(schedule_sigmas)


def run_schedule(scheduler, latents: torch.Tensor, predict_eps: Callable, generator=None, start: int = 0,
                 callback: Callable | None = None) -> torch.Tensor:
    """The step loop shared by `sample` and the ComfyUI samplers: for each model call from `start` on,
    `eps = predict_eps(i, t, latents)` (the CFG-mixed noise prediction at timestep t for the scheduler's latents),
    then the scheduler's own step (eta 0, `generator` for Euler A's noise). `callback(i, t, latents)` after each."""
    step_kwargs = _step_kwargs(scheduler, generator)
    for i, t in enumerate(scheduler.timesteps[start:]):
        eps = predict_eps(i, t, latents)
        latents = scheduler.step(eps, t, latents, **step_kwargs, return_dict=False)[0]
        if callback is not None:
            callback(i, t, latents)
    return latents


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
    init_latents: torch.Tensor | None = None,
    denoise: float = 1.0,
) -> torch.Tensor:
    """Denoise video latents [B, 4, F, h, w] with the v1 pipeline loop; returns the final latents (unscaled by the VAE).

    model: callable `(hidden_states, timestep, encoder_hidden_states, encoder_attention_mask) -> [B, 8, F, h, w]`.
    scheduler: one of `SCHEDULERS` (or a diffusers scheduler instance; its timesteps are reset here).
    latents: initial unit-variance noise (scaled here by `init_noise_sigma`), else drawn as
        `randn_tensor(shape, generator)` in the dtype of `prompt_embeds`, like the original.
    callback(step_index, total, t, latents): called after every model call; an exception raised in it stops sampling.
    Guidance (batch `cat([negative, positive])`) runs only when guidance_scale > 1.
    init_latents + denoise < 1: video-to-video as the diffusers img2img pipelines (`strength`): the last
        `int(steps * denoise)` steps run, from `init_latents` (VAE latents × 0.18215) noised with the scheduler's
        own `add_noise` at the first of them; denoise 1 starts from pure noise (the same as text-to-video).
    """
    if prompt_embeds is None:
        raise ValueError("sample needs prompt_embeds [batch, tokens, channels], found None")
    if not isinstance(steps, int) or steps < 1:
        raise ValueError(f"steps: expected a positive integer, found {steps!r}")
    if latents is None and shape is None and init_latents is not None:
        shape = tuple(init_latents.shape)
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
    start = 0 if init_latents is None else denoise_start(steps, denoise)
    if start >= steps:
        return init_latents
    check_start(scheduler, start, f"denoise {denoise}")
    if start and hasattr(scheduler, "set_begin_index"):
        scheduler.set_begin_index(start)

    if latents is None:
        from diffusers.utils.torch_utils import randn_tensor

        latents = randn_tensor(tuple(shape), generator=generator, device=device, dtype=prompt_embeds.dtype)
    else:
        latents = latents.to(device)
    if start:
        latents = add_noise_at(scheduler, init_latents.to(latents), latents, start)
    else:
        latents = latents * scheduler.init_noise_sigma
    latent_channels = latents.shape[1]

    def predict_eps(i, t, latents):
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
        return noise_pred

    total = len(timesteps) - start
    with torch.no_grad():
        return run_schedule(scheduler, latents, predict_eps, generator, start=start,
                            callback=None if callback is None else lambda i, t, x: callback(i, total, t, x))
