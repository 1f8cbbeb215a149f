"""Empty video latent: frames-in-batch [batch*frames, 4, height/8, width/8] + the frame count."""
from __future__ import annotations

import torch

import comfy.model_management

from ..easyanimate_model.config import SIZE_MULTIPLE, size_error
from . import resources
from .keys import FRAMES_KEY


class EasyAnimateEmptyLatent:
    DESCRIPTION = ("An empty video latent for text-to-video: batch_size videos of `frames` frames, stored frames-in-"
                   "batch so core latent/VAE nodes work on it.")
    CATEGORY = "EasyAnimate/latent"
    FUNCTION = "generate"
    RETURN_TYPES = ("LATENT",)
    RETURN_NAMES = ("latent",)
    OUTPUT_TOOLTIPS = ("Zero latents [batch_size*frames, 4, height/8, width/8] with the frame count attached.",)

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "width": ("INT", {"default": 512, "min": SIZE_MULTIPLE, "max": 4096, "step": SIZE_MULTIPLE,
                              "tooltip": "Video width in pixels (multiple of 32; the model was trained at 512)."}),
            "height": ("INT", {"default": 512, "min": SIZE_MULTIPLE, "max": 4096, "step": SIZE_MULTIPLE,
                               "tooltip": "Video height in pixels (multiple of 32)."}),
            "frames": ("INT", {"default": 80, "min": 1, "max": 4096, "tooltip":
                               "Frames per video (the released motion module was trained with 80 frames at 12 fps)."}),
            "batch_size": ("INT", {"default": 1, "min": 1, "max": 64, "tooltip":
                                   "Number of videos (EasyAnimateSampler; core KSampler sees the whole batch as one "
                                   "video). The seed's noise is drawn once for the batch: the first video equals the "
                                   "batch_size 1 video of that seed."}),
        }}

    @classmethod
    def VALIDATE_INPUTS(cls, width, height):
        # core skips its min/max check for width/height here; nodes/__init__.py's guard checks them first
        return size_error(width, height) or True

    def generate(self, width, height, frames, batch_size):
        error = size_error(width, height)
        if error:
            raise ValueError(f"EasyAnimateEmptyLatent: {error}")
        resources.check_latent(batch_size, frames, height, width, "EasyAnimateEmptyLatent")
        # one zero frame expanded (no copy): a cached empty latent costs nothing; consumers allocate what they need
        samples = torch.zeros([1, 4, height // 8, width // 8], device=comfy.model_management.intermediate_device())
        samples = samples.expand(batch_size * frames, -1, -1, -1)
        return ({"samples": samples, FRAMES_KEY: frames},)


NODE_CLASS_MAPPINGS = {"EasyAnimateEmptyLatent": EasyAnimateEmptyLatent}
NODE_DISPLAY_NAME_MAPPINGS = {"EasyAnimateEmptyLatent": "EasyAnimate Empty Video Latent"}
