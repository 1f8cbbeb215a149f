"""VAE: the pipeline folder's vae/ as a native comfy.sd.VAE, and the chunked video decode and encode nodes."""
from __future__ import annotations

import re

import comfy.sd
import comfy.utils
import comfy.model_management

from ..easyanimate_model.config import SIZE_MULTIPLE
from ..easyanimate_model.errors import EasyAnimateLoadError
from ..easyanimate_model.vae import FIT_MODES, fit_frames, map_frame_chunks, read_vae_folder
from . import resources
from .keys import FRAMES_KEY


def _progress(pbar):
    """map_frame_chunks progress callback: ComfyUI's progress bar, and Cancel honoured between chunks."""
    def update(done, total):
        pbar.update_absolute(done, total)
        comfy.model_management.throw_exception_if_processing_interrupted()
    return update


def _autoencoder_params(cfg: dict, source: str) -> dict:
    """comfy AutoencoderKL params from a diffusers AutoencoderKL config.json (SD-VAE family, any width/depth)."""
    channels = list(cfg.get("block_out_channels", [128, 256, 512, 512]))
    latent = cfg.get("latent_channels", 4)
    # comfy's VAE blocks use GroupNorm(32) and ldm-style channel multipliers
    if cfg.get("norm_num_groups", 32) != 32 or any(c % 32 or c % channels[0] for c in channels):
        raise EasyAnimateLoadError(
            f"{source}: expected an SD-style AutoencoderKL (norm_num_groups 32, block_out_channels multiples of 32 "
            f"and of the first), found norm_num_groups={cfg.get('norm_num_groups')}, block_out_channels={channels}")
    if not 1 <= len(channels) <= 4 or cfg.get("layers_per_block", 2) > 2:
        raise EasyAnimateLoadError(f"{source}: expected at most 4 VAE blocks of at most 2 layers, found "
                                   f"{len(channels)} blocks of {cfg.get('layers_per_block')}")
    return {"embed_dim": latent, "ddconfig": {
        "double_z": True, "z_channels": latent, "resolution": 256, "in_channels": cfg.get("in_channels", 3),
        "out_ch": cfg.get("out_channels", 3), "ch": channels[0], "ch_mult": [c // channels[0] for c in channels],
        "num_res_blocks": cfg.get("layers_per_block", 2), "attn_resolutions": [], "dropout": 0.0}}


def vae_patcher(vae_dir: str, disable_dynamic=False):
    """`cached_patcher_init` factory of the pipeline VAE (core's VAE picks its patcher itself, as in core's
    load_vae_patcher)."""
    return load_pipeline_vae(vae_dir).patcher


def load_pipeline_vae(vae_dir: str):
    """comfy.sd.VAE from a diffusers vae/ folder (config.json + weights, read by the library), config passed
    explicitly."""
    cfg, sd, _ = read_vae_folder(vae_dir)
    params = _autoencoder_params(cfg, f"{vae_dir}/config.json")
    blocks = len(params["ddconfig"]["ch_mult"])
    if blocks < 4:
        # core's diffusers->ldm key map numbers decoder blocks for 4; shift so block i lands on ldm up.{blocks-1-i}
        sd = {re.sub(r"^decoder\.up_blocks\.(\d+)\.", lambda m: f"decoder.up_blocks.{int(m.group(1)) + 4 - blocks}.",
                     k): v for k, v in sd.items()}
    vae = comfy.sd.VAE(sd=sd, config={"params": params})
    vae.downscale_ratio = vae.upscale_ratio = 2 ** (blocks - 1)
    vae.patcher.cached_patcher_init = (vae_patcher, (vae_dir,))  # core's device-selection / multi-GPU nodes use it
    return vae


class EasyAnimateVAEDecode:
    DESCRIPTION = ("Decodes frames-in-batch video latents to frames, a chunk of frames at a time (memory does not "
                   "grow with the frame count), optionally tiled. Same output as core VAE Decode.")
    CATEGORY = "EasyAnimate/video"
    FUNCTION = "decode"
    RETURN_TYPES = ("IMAGE",)
    RETURN_NAMES = ("frames",)
    OUTPUT_TOOLTIPS = ("The decoded frames [batch*frames, H, W, 3] in 0..1, video after video.",)

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "vae": ("VAE", {"tooltip": "The VAE (from EasyAnimateLoadPipeline or a core VAE loader)."}),
            "samples": ("LATENT", {"tooltip": "Video latents from the sampler (frames in the batch dimension)."}),
            "frames_per_chunk": ("INT", {"default": 1, "min": 1, "max": 4096, "tooltip":
                                         "Frames decoded at once. 1 is what the original does; larger is faster "
                                         "and needs more memory."}),
            "tiled": ("BOOLEAN", {"default": False, "tooltip":
                                  "Decode each frame in overlapping tiles (for large sizes on small GPUs)."}),
        }}

    def decode(self, vae, samples, frames_per_chunk, tiled):
        latents = samples["samples"]
        if latents.ndim != 4:
            raise ValueError(f"EasyAnimateVAEDecode: expected frames-in-batch latents [frames, C, h, w], found shape "
                             f"{tuple(latents.shape)}")
        if latents.shape[0] == 0:
            raise ValueError("EasyAnimateVAEDecode: the latent has no frames")
        resources.check_vae_decode(vae, latents.shape[0], latents.shape[-2], latents.shape[-1], frames_per_chunk,
                                   tiled, "EasyAnimateVAEDecode")
        pbar = comfy.utils.ProgressBar(latents.shape[0])
        images = map_frame_chunks(vae.decode_tiled if tiled else vae.decode, latents, frames_per_chunk,
                                  out_device=comfy.model_management.intermediate_device(),
                                  progress=_progress(pbar))
        return (images.reshape(-1, *images.shape[-3:]),)


class EasyAnimateVAEEncodeVideo:
    DESCRIPTION = ("Encodes video frames (any IMAGE batch, e.g. core Load Video + Get Video Components) to a "
                   "frames-in-batch video latent for video-to-video, a chunk of frames at a time. Width and height "
                   "must be multiples of 32, or choose 'center crop' / 'resize'.")
    CATEGORY = "EasyAnimate/video"
    FUNCTION = "encode"
    RETURN_TYPES = ("LATENT",)
    RETURN_NAMES = ("latent",)
    OUTPUT_TOOLTIPS = ("Video latents [frames, 4, H/8, W/8] with the frame count attached (one video).",)

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "vae": ("VAE", {"tooltip": "The VAE (from EasyAnimateLoadPipeline or a core VAE loader)."}),
            "images": ("IMAGE", {"tooltip": "The frames of one video, in order (the IMAGE batch is the frame axis)."}),
            "frames_per_chunk": ("INT", {"default": 8, "min": 1, "max": 4096, "tooltip":
                                         "Frames encoded at once; memory does not grow with the video length."}),
            "size": (list(FIT_MODES), {"default": "error", "tooltip":
                     "When width or height is not a multiple of 32: stop with an error, cut the borders (center "
                     "crop) or resize to the nearest multiple."}),
        }}

    def encode(self, vae, images, frames_per_chunk, size):
        if images.ndim != 4 or images.shape[-1] not in (3, 4):
            raise ValueError(f"EasyAnimateVAEEncodeVideo: images: expected frames [N, H, W, 3], found shape "
                             f"{tuple(images.shape)}")
        try:
            images = fit_frames(images[..., :3], SIZE_MULTIPLE, size)
        except ValueError as e:
            raise ValueError(f"EasyAnimateVAEEncodeVideo: images: {e}") from None
        resources.check_vae_encode(vae, images.shape[0], images.shape[1], images.shape[2], frames_per_chunk,
                                   "EasyAnimateVAEEncodeVideo")
        pbar = comfy.utils.ProgressBar(images.shape[0])
        latents = map_frame_chunks(vae.encode, images, frames_per_chunk,
                                   out_device=comfy.model_management.intermediate_device(),
                                   progress=_progress(pbar))
        return ({"samples": latents, FRAMES_KEY: images.shape[0]},)


NODE_CLASS_MAPPINGS = {"EasyAnimateVAEDecode": EasyAnimateVAEDecode,
                       "EasyAnimateVAEEncodeVideo": EasyAnimateVAEEncodeVideo}
NODE_DISPLAY_NAME_MAPPINGS = {"EasyAnimateVAEDecode": "EasyAnimate VAE Decode (video)",
                              "EasyAnimateVAEEncodeVideo": "EasyAnimate VAE Encode (video)"}
