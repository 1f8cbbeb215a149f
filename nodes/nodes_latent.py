"""Empty video latent: frames-in-batch [batch*frames, 4, height/8, width/8] + the frame count."""
from __future__ import annotations

import torch

import comfy.model_management

from .comfy_model import FRAMES_KEY  # LATENT dict entry: frames per video (the batch holds batch_size * frames rows)
SIZE_MULTIPLE = 32  # patch 2 x VAE 8 x motion-module grid block 2 (spec A.5)


def size_error(width: int, height: int):
    bad = [f"{name} {value}" for name, value in (("width", width), ("height", height)) if value % SIZE_MULTIPLE]
    if bad:
        return (f"{' and '.join(bad)}: EasyAnimate needs width and height in multiples of {SIZE_MULTIPLE} pixels "
                f"(try {', '.join(str(round(v / SIZE_MULTIPLE) * SIZE_MULTIPLE or SIZE_MULTIPLE) for v in (width, height))})")
    return None


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
        # only width/height named here, so ComfyUI still checks the min/max of frames and batch_size
        return size_error(width, height) or True

    def generate(self, width, height, frames, batch_size):
        error = size_error(width, height)
        if error:
            raise ValueError(f"EasyAnimateEmptyLatent: {error}")
        if frames < 1 or batch_size < 1:
            raise ValueError(f"EasyAnimateEmptyLatent: frames and batch_size must be >= 1, found {frames}, "
                             f"{batch_size}")
        samples = torch.zeros([batch_size * frames, 4, height // 8, width // 8],
                              device=comfy.model_management.intermediate_device())
        return ({"samples": samples, FRAMES_KEY: frames},)


NODE_CLASS_MAPPINGS = {"EasyAnimateEmptyLatent": EasyAnimateEmptyLatent}
NODE_DISPLAY_NAME_MAPPINGS = {"EasyAnimateEmptyLatent": "EasyAnimate Empty Video Latent"}
