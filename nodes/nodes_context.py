"""EasyAnimate Context Options: sliding context windows over the frames of a video, on core's context-window machinery
(comfy.context_windows, the engine of core "Context Windows (Manual)"), set up for frames-in-batch EasyAnimate latents.

Each window runs as a video of its own (comfy_model.frames_per_video takes the window's length), so the motion
module sees whole videos and its temporal position encoding restarts per window, as in training.
What the subclass of core's IndexListContextHandler adds, and why:
- a batch of several videos is refused up front (windows would cross from one video into the next);
- per-frame conditioning (rows = latent frames) is sliced to the window (0.3.75's handler leaves model_conds whole
  along dim 0);
- the step lookup accepts per-row timesteps and sigmas between the schedule's steps (0.3.75 compares all rows with
  the schedule and fails for batches of frames);
- newer cores' causal-video anchor frame is turned off: EasyAnimate windows are plain frame ranges.
FreeNoise (easyanimate_model.context.freenoise) is applied by a SAMPLER_SAMPLE wrapper to the sampler's noise.
"""
from __future__ import annotations

import inspect
import logging

import torch

import comfy.context_windows as cw
import comfy.patcher_extension

from ..easyanimate_model.context import freenoise
from .keys import FRAMES_KEY
from .model_patching import easyanimate_model

log = logging.getLogger("EasyAnimate")
NODE = "EasyAnimateContextOptions"
TRAINED_FRAMES = 80  # the released motion module's training length
SCHEDULES = [cw.ContextSchedules.STATIC_STANDARD, cw.ContextSchedules.UNIFORM_STANDARD,
             cw.ContextSchedules.UNIFORM_LOOPED, cw.ContextSchedules.BATCHED]
_KEY = "EasyAnimate_context_windows"


class EasyAnimateContextHandler(cw.IndexListContextHandler):
    def __init__(self, *, freenoise: bool, **kwargs):
        if "causal_window_fix" in inspect.signature(cw.IndexListContextHandler.__init__).parameters:
            kwargs["causal_window_fix"] = False
        super().__init__(dim=0, **kwargs)
        self.use_freenoise = freenoise

    def should_use_context(self, model, conds, x_in, timestep, model_options):
        frames = model_options.get("transformer_options", {}).get(FRAMES_KEY) or x_in.size(0)
        if frames <= self.context_length:
            return False
        if x_in.size(0) != frames:
            raise ValueError(f"{NODE}: context windows run one video at a time; the latent holds "
                             f"{x_in.size(0) // frames} videos of {frames} frames (use batch_size 1)")
        return super().should_use_context(model, conds, x_in, timestep, model_options)

    def set_step(self, timestep, model_options):
        sigmas = model_options["transformer_options"]["sample_sigmas"]
        match = torch.nonzero(torch.isclose(sigmas, timestep.reshape(-1)[0].to(sigmas), rtol=1e-4))
        if match.numel():  # else a sub-step of a multi-step sampler: keep the step
            self._step = int(match[0].item())

    def get_resized_cond(self, cond_in, x_in, window, device=None):
        resized = super().get_resized_cond(cond_in, x_in, window, device)
        for cond in resized or ():
            model_conds = cond.get("model_conds")
            if not isinstance(model_conds, dict):
                continue
            cond["model_conds"] = model_conds = dict(model_conds)
            for key, value in model_conds.items():
                tensor = getattr(value, "cond", None)
                if isinstance(tensor, torch.Tensor) and tensor.ndim and tensor.size(0) == x_in.size(0):
                    model_conds[key] = value._copy_with(window.get_tensor(tensor, device))
        return resized


def _freenoise_wrapper(executor, guider, sigmas, extra_args, callback, noise, *args, **kwargs):
    handler = extra_args["model_options"].get("context_handler")
    if isinstance(handler, EasyAnimateContextHandler) and handler.use_freenoise and \
            noise.size(0) > handler.context_length:
        generator = torch.Generator().manual_seed(int(extra_args.get("seed") or 0))
        noise = freenoise(noise, handler.context_length, handler.context_overlap, generator)
    return executor(guider, sigmas, extra_args, callback, noise, *args, **kwargs)


class EasyAnimateContextOptions:
    DESCRIPTION = ("Sliding context windows for videos longer than the trained 80 frames: the sampler denoises "
                   "windows of context_length latent frames (each a whole video to the motion module) and blends "
                   "the overlaps. Works with EasyAnimateSampler and core samplers. Memory stays that of one window.")
    CATEGORY = "EasyAnimate/sampling"
    FUNCTION = "apply"
    RETURN_TYPES = ("MODEL",)
    RETURN_NAMES = ("model",)
    OUTPUT_TOOLTIPS = ("A copy of the MODEL that samples long videos window by window.",)

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "model": ("MODEL", {"tooltip": "The EasyAnimate MODEL (with motion module)."}),
            "context_length": ("INT", {"default": TRAINED_FRAMES, "min": 1, "max": 4096, "tooltip":
                               "Frames per window (latent frames = video frames). 80 is what the motion module "
                               "was trained on; videos this long or shorter are sampled without windows."}),
            "context_overlap": ("INT", {"default": 20, "min": 0, "max": 4095, "tooltip":
                                "Frames shared by neighbouring windows (blended). Must be below context_length."}),
            "context_schedule": (SCHEDULES, {"default": cw.ContextSchedules.STATIC_STANDARD, "tooltip":
                                 "How windows are laid out: standard_static (fixed windows), standard_uniform "
                                 "(shifting per step), looped_uniform (windows wrap around: seamless loops), "
                                 "batched (no overlap)."}),
            "fuse_method": (list(cw.ContextFuseMethods.LIST_STATIC), {"default": cw.ContextFuseMethods.PYRAMID,
                            "tooltip": "How overlapping windows are blended: pyramid (weight falls towards a "
                                       "window's ends), flat, relative, overlap-linear (linear cross-fade)."}),
            "freenoise": ("BOOLEAN", {"default": True, "tooltip":
                          "FreeNoise: every window starts from the same noise frames, shuffled, so the windows "
                          "agree on content."}),
            "context_stride": ("INT", {"default": 1, "min": 1, "max": 16, "tooltip":
                               "Uniform schedules only: also use windows of every 2nd, 4th, ... frame."}),
            "closed_loop": ("BOOLEAN", {"default": False, "tooltip":
                            "looped_uniform only: a window also joins the end to the start (for loops)."}),
        }}

    @classmethod
    def VALIDATE_INPUTS(cls, context_length, context_overlap):
        return overlap_error(context_length, context_overlap) or True

    def apply(self, model, context_length, context_overlap, context_schedule, fuse_method, freenoise,
              context_stride, closed_loop):
        easyanimate_model(model, NODE)
        error = overlap_error(context_length, context_overlap)
        if error:
            raise ValueError(f"{NODE}: {error}")
        model = model.clone()
        model.model_options["context_handler"] = EasyAnimateContextHandler(
            context_schedule=cw.get_matching_context_schedule(context_schedule),
            fuse_method=cw.get_matching_fuse_method(fuse_method), context_length=context_length,
            context_overlap=context_overlap, context_stride=context_stride, closed_loop=closed_loop,
            freenoise=freenoise)
        cw.create_prepare_sampling_wrapper(model)  # memory estimates for one window, not the whole video
        model.add_wrapper_with_key(comfy.patcher_extension.WrappersMP.SAMPLER_SAMPLE, _KEY, _freenoise_wrapper)
        return (model,)


def overlap_error(context_length, context_overlap):
    if context_overlap >= context_length:
        return (f"context_overlap {context_overlap} must be smaller than context_length {context_length} "
                f"(neighbouring windows must advance)")
    return None


NODE_CLASS_MAPPINGS = {NODE: EasyAnimateContextOptions}
NODE_DISPLAY_NAME_MAPPINGS = {NODE: "EasyAnimate Context Options"}
