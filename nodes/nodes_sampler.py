"""The original EasyAnimate v1 schedulers as ComfyUI samplers, and the EasyAnimateSampler node that runs them.

`easyanimate_sampler(name)` is a core KSAMPLER whose sampler function runs the library's step rule
(easyanimate_model.sampling.run_schedule) on the denoised output of ComfyUI's model wrapper, so CFG functions, model
wrappers, patches, context windows and hooks all apply: it works in SamplerCustom / SamplerCustomAdvanced with any
guider. With the sigmas of `EasyAnimateSigmas` (easyanimate_model.sampling.schedule_sigmas) it reproduces the
original pipeline; EasyAnimateSampler is that combination with CFGGuider behind the original node's widgets.
"""
from __future__ import annotations

import logging

import torch

import comfy.model_management
import comfy.utils
import latent_preview

from ..easyanimate_model.sampling import (SCHEDULERS, SIGMA_SPACE, add_noise_at, denoise_start, run_schedule,
                                          schedule_sigmas, scheduler_for_sigmas)
from .keys import FRAMES_KEY
from . import resources
from .model_patching import easyanimate_model, motion_module_enabled

log = logging.getLogger("EasyAnimate")
NODE = "EasyAnimateSampler"


def _sample_original(model, x, sigmas, extra_args=None, callback=None, disable=None, scheduler="DPM++"):
    """k-diffusion-style sampler function: `model(x, sigma)` is ComfyUI's denoiser (x0 + sigma * eps space).

    The scheduler's latents are kept in its own space and layout ([videos, C, F, h, w], so Euler A draws its step
    noise exactly as the library does) and converted for every model call. The whole schedule starts from the
    unscaled noise × init_noise_sigma like the original (DDIM/PNDM start below the top noise level); a tail of it
    (partial denoise) from ComfyUI's noised latent.
    """
    extra_args = dict(extra_args or {})
    try:
        sched, start = scheduler_for_sigmas(scheduler, sigmas, device=x.device)
    except ValueError as e:
        raise ValueError(f"EasyAnimate {scheduler} sampler: {e}") from None
    options = extra_args.get("model_options", {}).get("transformer_options", {})
    frames = int(options.get(FRAMES_KEY) or x.shape[0])
    if x.shape[0] % frames:
        raise ValueError(f"EasyAnimate {scheduler} sampler: {x.shape[0]} latent frames are not whole "
                         f"{frames}-frame videos")
    videos = x.shape[0] // frames

    def to_video(rows):
        return rows.reshape(videos, frames, *rows.shape[1:]).transpose(1, 2)

    def to_rows(video):
        return video.transpose(1, 2).reshape(x.shape)

    sigma_space = scheduler in SIGMA_SPACE

    def model_scale(sigma):  # scheduler latents -> ComfyUI's x (the expression ComfyUI divides by)
        return 1.0 if sigma_space else (sigma ** 2 + 1.0) ** 0.5

    noise = getattr(model, "noise", None)
    latent_image = getattr(model, "latent_image", None)
    if start == 0 and noise is not None:
        latents = to_video(noise.to(x)) * sched.init_noise_sigma
    elif noise is not None and latent_image is not None:  # partial denoise: the img2img start point
        latents = add_noise_at(sched, to_video(latent_image.to(x)), to_video(noise.to(x)), start)
    else:
        latents = to_video(x) / model_scale(sigmas[0])
    # core samplers pass one sigma per latent row; ComfyUI 0.3.75's context windows compare that tensor with the
    # schedule elementwise (IndexListContextHandler.set_step) and need a single value (the model sampling of
    # comfy_model.py spreads it over the rows again)
    s_in = x.new_ones([1 if "context_handler" in extra_args.get("model_options", {}) else x.shape[0]])
    seed = extra_args.get("seed")
    generator = torch.Generator().manual_seed(0 if seed is None else int(seed))

    def predict_eps(i, t, latents):
        sigma = sigmas[i]
        xs = to_rows(latents) * model_scale(sigma)
        denoised = model(xs, sigma * s_in, **extra_args)
        if callback is not None:
            callback({"x": xs, "i": i, "sigma": sigma, "sigma_hat": sigma, "denoised": denoised})
        return to_video((xs - denoised) / sigma)

    return to_rows(run_schedule(sched, latents, predict_eps, generator, start=start))


def easyanimate_sampler(scheduler: str):
    """A SAMPLER (core KSAMPLER) running one of the original schedulers; pair it with EasyAnimateSigmas."""
    if scheduler not in SCHEDULERS:
        raise ValueError(f"sampler: expected one of {', '.join(SCHEDULERS)}, found {scheduler!r}")
    import comfy.samplers  # imports scipy: not at pack import time (tests/test_packaging.py)

    return comfy.samplers.KSAMPLER(_sample_original, extra_options={"scheduler": scheduler})


def original_sigmas(scheduler: str, steps: int, node: str):
    if scheduler not in SCHEDULERS:
        raise ValueError(f"{node}: sampler must be one of {', '.join(SCHEDULERS)}, found {scheduler!r}")
    try:  # e.g. PNDM's warm-up needs at least 4 steps
        return schedule_sigmas(scheduler, steps)
    except ValueError as e:
        raise ValueError(f"{node}: the {scheduler} scheduler cannot run {steps} steps ({e}); use more steps") from None


class EasyAnimateSamplerSelect:
    DESCRIPTION = ("One of EasyAnimate v1's original schedulers as a SAMPLER for core SamplerCustom / "
                   "SamplerCustomAdvanced (any guider). Use the sigmas of EasyAnimateSigmas with the same scheduler.")
    CATEGORY = "EasyAnimate/sampling"
    FUNCTION = "select"
    RETURN_TYPES = ("SAMPLER",)
    RETURN_NAMES = ("sampler",)
    OUTPUT_TOOLTIPS = ("The scheduler's step rule as a ComfyUI sampler.",)

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"sampler": (list(SCHEDULERS), {
            "default": "DPM++",
            "tooltip": "The original scheduler (DPM++ for landscapes, Euler A / Euler for portraits)."})}}

    def select(self, sampler):
        return (easyanimate_sampler(sampler),)


class EasyAnimateSigmas:
    DESCRIPTION = ("The noise levels of EasyAnimate v1's original scheduler for a step count (one per model call: "
                   "PNDM's warm-up adds calls), for EasyAnimateSamplerSelect in SamplerCustom(Advanced).")
    CATEGORY = "EasyAnimate/sampling"
    FUNCTION = "sigmas"
    RETURN_TYPES = ("SIGMAS",)
    RETURN_NAMES = ("sigmas",)
    OUTPUT_TOOLTIPS = ("Decreasing sigmas ending in 0 (core SplitSigmas gives a tail for a partial denoise).",)

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "sampler": (list(SCHEDULERS), {"default": "DPM++", "tooltip": "The scheduler these sigmas are for."}),
            "steps": ("INT", {"default": 30, "min": 1, "max": 1000, "tooltip": "Denoising steps."}),
        }}

    def sigmas(self, sampler, steps):
        return (original_sigmas(sampler, steps, "EasyAnimateSigmas"),)


class EasyAnimateSampler:
    DESCRIPTION = ("Generates the video latents with EasyAnimate v1's schedulers (Euler, Euler A, DPM++, PNDM, DDIM) "
                   "and the original's sigmas through ComfyUI's sampling (CFGGuider), as the original pipeline. "
                   "Core KSampler / SamplerCustomAdvanced also work on this MODEL.")
    CATEGORY = "EasyAnimate/sampling"
    FUNCTION = "sample"
    RETURN_TYPES = ("LATENT",)
    RETURN_NAMES = ("latent",)
    OUTPUT_TOOLTIPS = ("The denoised video latents (frames in the batch dimension).",)

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "model": ("MODEL", {"tooltip": "The EasyAnimate MODEL (with motion module for video)."}),
            "positive": ("CONDITIONING", {"tooltip": "Prompt conditioning from EasyAnimateTextEncode."}),
            "negative": ("CONDITIONING", {"tooltip": "Negative prompt conditioning (used when cfg > 1)."}),
            "latent": ("LATENT", {"tooltip": "EasyAnimateEmptyLatent (text-to-video: only its size, frames and batch "
                                             "are used) or an encoded video (EasyAnimate VAE Encode (video)) for "
                                             "video-to-video with denoise < 1."}),
            "seed": ("INT", {"default": 43, "min": 0, "max": 0xffffffffffffffff, "control_after_generate": True,
                             "tooltip": "Noise seed (CPU generator: the same seed gives the same video)."}),
            "steps": ("INT", {"default": 30, "min": 1, "max": 1000, "tooltip": "Denoising steps."}),
            "cfg": ("FLOAT", {"default": 6.0, "min": 0.0, "max": 100.0, "step": 0.1, "round": 0.01,
                              "tooltip": "Classifier-free guidance scale; <= 1 disables guidance."}),
            "sampler": (list(SCHEDULERS), {"default": "DPM++", "tooltip":
                        "The original scheduler (DPM++ for landscapes, Euler A / Euler for portraits)."}),
        }, "optional": {  # appended after release: optional, so API prompts without it keep working
            "denoise": ("FLOAT", {"default": 1.0, "min": 0.0, "max": 1.0, "step": 0.01, "tooltip":
                        "Video-to-video strength (diffusers img2img): the last int(steps x denoise) steps run on the "
                        "input latent noised to that step. 1: text-to-video (the input is not used); 0: the input "
                        "comes back. PNDM runs only at 1."}),
        }}

    def sample(self, model, positive, negative, latent, seed, steps, cfg, sampler, denoise=1.0):
        inner = easyanimate_model(model, NODE)
        dit = inner.diffusion_model
        samples = latent["samples"]
        if samples.ndim != 4 or samples.shape[1] != dit.config.in_channels:
            raise ValueError(f"{NODE}: expected a video latent [frames, {dit.config.in_channels}, h, w] from "
                             f"EasyAnimateEmptyLatent, found shape {tuple(samples.shape)}")
        frames = int(latent.get(FRAMES_KEY) or samples.shape[0])
        if samples.shape[0] % frames:
            raise ValueError(f"{NODE}: the latent has {samples.shape[0]} frames, not a multiple of its "
                             f"{FRAMES_KEY}={frames}")
        try:
            dit.check_input_size(frames, *samples.shape[-2:])
        except ValueError as e:
            raise ValueError(f"{NODE}: {e}") from None
        resources.check_sampling(model, samples.shape[0] // frames, frames, *samples.shape[-2:], NODE)
        sigmas = original_sigmas(sampler, steps, NODE)
        try:
            start = denoise_start(steps, denoise, sampler)
        except ValueError as e:
            raise ValueError(f"{NODE}: {e}") from None
        if start >= steps:  # nothing to denoise: the input latents come back (as core KSampler at denoise 0)
            return ({**latent, FRAMES_KEY: frames},)
        sigmas = sigmas[start:]
        if not positive:
            raise ValueError(f"{NODE}: the positive conditioning is empty (connect EasyAnimateTextEncode's "
                             f"positive output)")
        if cfg > 1.0 and not negative:
            raise ValueError(f"{NODE}: cfg {cfg} > 1 needs the negative conditioning, found it empty")
        if frames > 1 and not motion_module_enabled(model):
            log.warning("%s: the MODEL has no motion module: the %d frames are denoised as independent images "
                        "(add EasyAnimateLoadMotionModule)", NODE, frames)

        import comfy.sample  # imports scipy: not at pack import time

        model = model.clone()
        model.model_options.setdefault("transformer_options", {})[FRAMES_KEY] = frames
        # core KSampler's noise for this seed (one draw over all rows), the original's cfg <= 1 = no guidance
        noise = comfy.sample.prepare_noise(samples, seed)
        callback = latent_preview.prepare_callback(model, len(sigmas) - 1)
        out = comfy.sample.sample_custom(model, noise, max(cfg, 1.0), easyanimate_sampler(sampler), sigmas,
                                         positive, negative if cfg > 1.0 else [], samples, callback=callback,
                                         disable_pbar=not comfy.utils.PROGRESS_BAR_ENABLED, seed=seed)
        result = latent.copy()
        result["samples"] = out.to(comfy.model_management.intermediate_device())
        result[FRAMES_KEY] = frames
        return (result,)


NODE_CLASS_MAPPINGS = {
    "EasyAnimateSampler": EasyAnimateSampler,
    "EasyAnimateSamplerSelect": EasyAnimateSamplerSelect,
    "EasyAnimateSigmas": EasyAnimateSigmas,
}
NODE_DISPLAY_NAME_MAPPINGS = {
    "EasyAnimateSampler": "EasyAnimate Video Sampler",
    "EasyAnimateSamplerSelect": "EasyAnimate Sampler (original schedulers)",
    "EasyAnimateSigmas": "EasyAnimate Sigmas (original schedule)",
}
