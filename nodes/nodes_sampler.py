"""The EasyAnimate video sampler: the original pipeline's CFG loop and five schedulers (easyanimate_model.sampling)
run on the ComfyUI-managed, patched MODEL, with ComfyUI's progress bar, latent previews and interrupt."""
from __future__ import annotations

import logging

import torch
import torch.nn.functional as F

import comfy.model_management
import comfy.sampler_helpers
import latent_preview

from ..easyanimate_model.sampling import SCHEDULERS, make_scheduler, sample
from . import resources
from .model_patching import easyanimate_model, motion_module_enabled
from .nodes_latent import FRAMES_KEY

log = logging.getLogger("EasyAnimate")
NODE = "EasyAnimateSampler"


def conditioning_tensors(conditioning, name: str, channels: int, batch: int):
    """(embeds [batch, L, channels], mask [batch, L] or None) of the first entry of a CONDITIONING."""
    if not conditioning:
        raise ValueError(f"{NODE}: the {name} conditioning is empty (connect EasyAnimateTextEncode's {name} output)")
    if len(conditioning) > 1:
        log.warning("%s: the %s conditioning has %d entries; only the first is used", NODE, name, len(conditioning))
    embeds, extras = conditioning[0][0], conditioning[0][1]
    if embeds.ndim != 3 or embeds.shape[-1] != channels:
        raise ValueError(f"{NODE}: {name} conditioning: expected T5 embeddings [1, tokens, {channels}] (from "
                         f"EasyAnimateTextEncode), found shape {tuple(embeds.shape)} (another text encoder?)")
    mask = extras.get("attention_mask")
    if mask is not None and tuple(mask.shape[-1:]) != (embeds.shape[1],):
        raise ValueError(f"{NODE}: {name} conditioning: attention_mask shape {tuple(mask.shape)} does not match "
                         f"the {embeds.shape[1]} tokens")
    if embeds.shape[0] not in (1, batch):
        raise ValueError(f"{NODE}: {name} conditioning has {embeds.shape[0]} prompts for {batch} videos")
    embeds = embeds.float().expand(batch, -1, -1)
    if mask is not None:
        mask = mask.reshape(-1, embeds.shape[1]).expand(batch, -1)
    return embeds, mask


def pad_tokens(embeds, mask, length):
    """Zero tokens appended up to `length`, masked out (conds of different lengths batch together)."""
    if embeds.shape[1] == length:
        return embeds, mask
    if mask is None:
        mask = torch.ones(embeds.shape[:2], dtype=torch.long, device=embeds.device)
    pad = length - embeds.shape[1]
    return F.pad(embeds, (0, 0, 0, pad)), F.pad(mask, (0, pad))


class EasyAnimateSampler:
    DESCRIPTION = ("Generates the video latents with EasyAnimate v1's own sampling loop and schedulers (Euler, "
                   "Euler A, DPM++, PNDM, DDIM), as the original pipeline. Core KSampler also works on this MODEL.")
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
            "latent": ("LATENT", {"tooltip": "EasyAnimateEmptyLatent: sets size, frames and batch (its values are "
                                             "not used: text-to-video starts from noise)."}),
            "seed": ("INT", {"default": 43, "min": 0, "max": 0xffffffffffffffff, "control_after_generate": True,
                             "tooltip": "Noise seed (CPU generator: the same seed gives the same video)."}),
            "steps": ("INT", {"default": 30, "min": 1, "max": 1000, "tooltip": "Denoising steps."}),
            "cfg": ("FLOAT", {"default": 6.0, "min": 0.0, "max": 100.0, "step": 0.1, "round": 0.01,
                              "tooltip": "Classifier-free guidance scale; <= 1 disables guidance."}),
            "sampler": (list(SCHEDULERS), {"default": "DPM++", "tooltip":
                        "The original scheduler (DPM++ for landscapes, Euler A / Euler for portraits)."}),
        }}

    def sample(self, model, positive, negative, latent, seed, steps, cfg, sampler):
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
        batch, (height, width) = samples.shape[0] // frames, samples.shape[-2:]
        try:
            dit.check_input_size(frames, height, width)
        except ValueError as e:
            raise ValueError(f"{NODE}: {e}") from None
        resources.check_sampling(model, batch, frames, height, width, NODE)
        if sampler not in SCHEDULERS:
            raise ValueError(f"{NODE}: sampler must be one of {SCHEDULERS}, found {sampler!r}")
        try:  # e.g. PNDM's warm-up needs at least 4 steps
            make_scheduler(sampler).set_timesteps(steps)
        except ValueError as e:
            raise ValueError(f"{NODE}: the {sampler} scheduler cannot run {steps} steps ({e}); use more steps") from None
        channels = dit.config.caption_channels
        embeds, mask = conditioning_tensors(positive, "positive", channels, batch)
        neg_embeds = neg_mask = None
        if cfg > 1.0:
            neg_embeds, neg_mask = conditioning_tensors(negative, "negative", channels, batch)
            length = max(embeds.shape[1], neg_embeds.shape[1])
            if embeds.shape[1] != neg_embeds.shape[1] or (mask is None) != (neg_mask is None):
                embeds, mask = pad_tokens(embeds, mask, length)
                neg_embeds, neg_mask = pad_tokens(neg_embeds, neg_mask, length)
        temporal = motion_module_enabled(model)
        if frames > 1 and not temporal:
            log.warning("%s: the MODEL has no motion module: the %d frames are denoised as independent images "
                        "(add EasyAnimateLoadMotionModule)", NODE, frames)

        # the noise of core KSampler for this seed and latent, from a private generator
        noise = torch.randn(samples.shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float32)
        noise = noise.view(batch, frames, *noise.shape[1:]).transpose(1, 2)

        _, _, extra_models = comfy.sampler_helpers.prepare_sampling(model, samples.shape, {}, model.model_options)
        try:
            device = model.load_device
            dtype = inner.manual_cast_dtype or inner.get_dtype()

            def denoise(x, timestep, context, context_mask):
                comfy.model_management.throw_exception_if_processing_interrupted()
                b, c, f, h, w = x.shape
                rows = x.transpose(1, 2).reshape(b * f, c, h, w).to(device, dtype)
                out = dit.forward_frames(rows, timestep.to(device), context.to(device, dtype),
                                         None if context_mask is None else context_mask.to(device), num_frames=f,
                                         temporal=temporal)
                return out.float().view(b, f, -1, h, w).transpose(1, 2)

            preview = latent_preview.prepare_callback(model, steps)

            def callback(step, total, t, latents):
                preview(step, latents[:, :, 0], latents, total)  # preview: first frame of each video

            out = sample(denoise, scheduler=sampler, steps=steps, guidance_scale=cfg,
                         prompt_embeds=embeds.to(device), prompt_attention_mask=None if mask is None else mask.to(device),
                         negative_prompt_embeds=None if neg_embeds is None else neg_embeds.to(device),
                         negative_prompt_attention_mask=None if neg_mask is None else neg_mask.to(device),
                         latents=noise.to(device), generator=torch.Generator().manual_seed(seed), callback=callback)
        finally:
            comfy.sampler_helpers.cleanup_models({}, extra_models)
        rows = out.transpose(1, 2).reshape(samples.shape).float()
        result = latent.copy()
        result["samples"] = inner.process_latent_out(rows).to(comfy.model_management.intermediate_device())
        result[FRAMES_KEY] = frames
        return (result,)


NODE_CLASS_MAPPINGS = {"EasyAnimateSampler": EasyAnimateSampler}
NODE_DISPLAY_NAME_MAPPINGS = {"EasyAnimateSampler": "EasyAnimate Video Sampler"}
