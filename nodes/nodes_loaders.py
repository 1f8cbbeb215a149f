"""Loader nodes: pipeline folder / single DiT file -> MODEL (+ CLIP, VAE); the motion module and a base checkpoint
give a NEW MODEL built from the input's weights plus the loaded ones (the input MODEL is never changed; see
model_patching.py). Each loader step is a module-level function taking `disable_dynamic`, so it can serve as the
MODEL's `cached_patcher_init` (core re-creates models through it for multi-GPU and non-dynamic clones)."""
from __future__ import annotations

import dataclasses
import logging
import os

from ..easyanimate_model.errors import EasyAnimateLoadError
from ..easyanimate_model.files import CheckpointFile
from ..easyanimate_model.loading import read_motion_module, read_transformer
from ..easyanimate_model.transformer import Transformer3DModel
from . import model_files
from .comfy_model import WEIGHT_DTYPES
from .model_patching import (build_model_patcher, derived_init, easyanimate_model,
                             read_for_model, with_motion_structure, with_weights)
from .comfy_clip import TEXT_ENCODER_DEVICES
from .nodes_text import load_t5_from_pipeline
from .nodes_vae import load_pipeline_vae

log = logging.getLogger("EasyAnimate")

WEIGHT_DTYPE_TOOLTIP = ("Storage dtype of the transformer weights. default: ComfyUI's choice for the device; fp8 "
                        "halves memory (computed in fp16/bf16/fp32).")


def load_pipeline_model(folder: str, weight_dtype: str, disable_dynamic=False):
    """The MODEL of a pipeline folder's transformer/."""
    config, state = read_for_model(lambda dtype: read_transformer(folder, dtype=dtype), weight_dtype)
    return build_model_patcher(config, state, weight_dtype, os.path.join(folder, "transformer"),
                               patcher_init=(load_pipeline_model, (folder, weight_dtype)),
                               disable_dynamic=disable_dynamic)


def load_dit_model(path: str, weight_dtype: str, disable_dynamic=False):
    """The MODEL of a single transformer file (2D, or 3D with the motion module)."""
    config, state = read_for_model(lambda dtype: read_transformer(path, dtype=dtype), weight_dtype)
    return build_model_patcher(config, state, weight_dtype, path, patcher_init=(load_dit_model, (path, weight_dtype)),
                               disable_dynamic=disable_dynamic)


def _load_error(node, e):
    """Errors from reading model files, re-raised with the node name (the message already names the file)."""
    return type(e)(f"{node}: {e}") if isinstance(e, (EasyAnimateLoadError, ValueError)) else e


class EasyAnimateLoadPipeline:
    DESCRIPTION = ("Loads an EasyAnimate / PixArt-alpha diffusers folder from models/diffusers (e.g. "
                   "PixArt-XL-2-512x512): the transformer as MODEL, the T5 encoder as CLIP, the VAE.")
    CATEGORY = "EasyAnimate/loaders"
    FUNCTION = "load"
    RETURN_TYPES = ("MODEL", "CLIP", "VAE")
    RETURN_NAMES = ("model", "clip", "vae")
    OUTPUT_TOOLTIPS = ("The DiT (motion module not loaded unless the folder is a full EasyAnimate model).",
                       "The T5-XXL text encoder with EasyAnimate's tokenization.", "The SD VAE of the folder.")

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "pipeline": (model_files.pipeline_folders(), {"tooltip":
                         "A diffusers pipeline folder in models/diffusers (model_index.json, transformer/, "
                         "text_encoder/, tokenizer/, vae/)."}),
            "weight_dtype": (list(WEIGHT_DTYPES), {"default": "default", "tooltip": WEIGHT_DTYPE_TOOLTIP}),
            "text_encoder_device": (list(TEXT_ENCODER_DEVICES), {"default": "default", "tooltip":
                                    "Where T5 runs: default = ComfyUI's text-encoder device; cpu saves GPU memory."}),
        }}

    def load(self, pipeline, weight_dtype, text_encoder_device):
        folder = model_files.pipeline_path(pipeline)
        try:
            model = load_pipeline_model(folder, weight_dtype)
            clip = load_t5_from_pipeline(folder, text_encoder_device)
            vae = load_pipeline_vae(os.path.join(folder, "vae"))
        except (EasyAnimateLoadError, ValueError) as e:
            raise _load_error("EasyAnimateLoadPipeline", e) from None
        return (model, clip, vae)


class EasyAnimateLoadDiT:
    DESCRIPTION = ("Loads an EasyAnimate / PixArt-alpha transformer from a single file in diffusion_models or "
                   "checkpoints (2D DiT, or a full 3D model with the motion module).")
    CATEGORY = "EasyAnimate/loaders"
    FUNCTION = "load"
    RETURN_TYPES = ("MODEL",)
    RETURN_NAMES = ("model",)
    OUTPUT_TOOLTIPS = ("The DiT as a native MODEL.",)

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "dit_name": (model_files.file_list("diffusion_models", "checkpoints"), {"tooltip":
                         "Transformer weights (.safetensors, or a weights-only .ckpt/.pt/.bin) from "
                         "models/diffusion_models or models/checkpoints."}),
            "weight_dtype": (list(WEIGHT_DTYPES), {"default": "default", "tooltip": WEIGHT_DTYPE_TOOLTIP}),
        }}

    def load(self, dit_name, weight_dtype):
        path = model_files.full_path(dit_name, "diffusion_models", "checkpoints")
        try:
            return (load_dit_model(path, weight_dtype),)
        except (EasyAnimateLoadError, ValueError) as e:
            raise _load_error("EasyAnimateLoadDiT", e) from None


def apply_motion_module(model, path: str):
    """A new MODEL: `model`'s weights (shared) plus the motion module of `path` (replacing one already there)."""
    inner = easyanimate_model(model, "EasyAnimateLoadMotionModule")
    config, state = read_motion_module(path, inner.diffusion_model.config, inner.get_dtype())
    return with_weights(model, state, config, path, patcher_init=derived_init(model, apply_motion_module, path))


def apply_base_checkpoint(model, path: str):
    """A new MODEL: `model` with the 2D weights (and the motion module, if the file has one) of `path`."""
    inner = easyanimate_model(model, "EasyAnimateLoadBaseCheckpoint")
    # like the original's load_state_dict(strict=False): a full 3D checkpoint replaces the motion module too
    has_motion = any(Transformer3DModel.is_motion_key(k) for k in CheckpointFile(path).keys())
    ours = inner.diffusion_model.config
    # checked (and original PixArt keys converted) against this model's config
    config = with_motion_structure(ours) if has_motion else dataclasses.replace(ours, motion_module=None)
    config, state = read_transformer(path, config=config, dtype=inner.get_dtype())
    if not has_motion:
        config = ours  # the input's motion module (if any) stays
    return with_weights(model, state, config, path, patcher_init=derived_init(model, apply_base_checkpoint, path))


class EasyAnimateLoadMotionModule:
    DESCRIPTION = ("Adds the EasyAnimate v1 motion module (models/easyanimate, e.g. easyanimate_v1_mm.safetensors) "
                   "to a copy of the MODEL, turning the image DiT into the video model.")
    CATEGORY = "EasyAnimate/loaders"
    FUNCTION = "apply"
    RETURN_TYPES = ("MODEL",)
    RETURN_NAMES = ("model",)
    OUTPUT_TOOLTIPS = ("A copy of the input MODEL with the motion module (the input is unchanged).",)

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "model": ("MODEL", {"tooltip": "The EasyAnimate DiT from an EasyAnimate loader."}),
            "motion_module_name": (model_files.file_list(model_files.EASYANIMATE_FOLDER), {"tooltip":
                                   "Motion-module weights in models/easyanimate (extra_model_paths.yaml "
                                   "'easyanimate' entries are listed too)."}),
        }}

    def apply(self, model, motion_module_name):
        easyanimate_model(model, "EasyAnimateLoadMotionModule")
        path = model_files.full_path(motion_module_name, model_files.EASYANIMATE_FOLDER)
        try:
            return (apply_motion_module(model, path),)
        except (EasyAnimateLoadError, ValueError) as e:
            raise _load_error("EasyAnimateLoadMotionModule", e) from None


class EasyAnimateLoadBaseCheckpoint:
    DESCRIPTION = ("Replaces the image-model (2D) weights of a copy of the MODEL with a personalised PixArt "
                   "checkpoint (e.g. easyanimate_portrait.safetensors); a loaded motion module is kept.")
    CATEGORY = "EasyAnimate/loaders"
    FUNCTION = "apply"
    RETURN_TYPES = ("MODEL",)
    RETURN_NAMES = ("model",)
    OUTPUT_TOOLTIPS = ("A copy of the input MODEL with the checkpoint's weights (the input is unchanged).",)

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "model": ("MODEL", {"tooltip": "The EasyAnimate MODEL (with or without motion module)."}),
            "ckpt_name": (model_files.file_list(model_files.EASYANIMATE_FOLDER, "diffusion_models"), {"tooltip":
                          "A PixArt-alpha 2D checkpoint (diffusers or original keys) from models/easyanimate or "
                          "models/diffusion_models."}),
        }}

    def apply(self, model, ckpt_name):
        easyanimate_model(model, "EasyAnimateLoadBaseCheckpoint")
        path = model_files.full_path(ckpt_name, model_files.EASYANIMATE_FOLDER, "diffusion_models")
        try:
            return (apply_base_checkpoint(model, path),)
        except (EasyAnimateLoadError, ValueError) as e:
            raise _load_error("EasyAnimateLoadBaseCheckpoint", e) from None


NODE_CLASS_MAPPINGS = {
    "EasyAnimateLoadPipeline": EasyAnimateLoadPipeline,
    "EasyAnimateLoadDiT": EasyAnimateLoadDiT,
    "EasyAnimateLoadMotionModule": EasyAnimateLoadMotionModule,
    "EasyAnimateLoadBaseCheckpoint": EasyAnimateLoadBaseCheckpoint,
}
NODE_DISPLAY_NAME_MAPPINGS = {
    "EasyAnimateLoadPipeline": "EasyAnimate Load Pipeline (DiT + T5 + VAE)",
    "EasyAnimateLoadDiT": "EasyAnimate Load DiT (single file)",
    "EasyAnimateLoadMotionModule": "EasyAnimate Load Motion Module",
    "EasyAnimateLoadBaseCheckpoint": "EasyAnimate Load Base Checkpoint (portrait)",
}
