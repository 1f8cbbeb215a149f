"""Building EasyAnimate MODELs: a ModelPatcher over EasyAnimateBaseModel from loaded weights, and copies of a MODEL
with other weights (motion module, personalised base checkpoint). The model classes are in comfy_model.py."""
from __future__ import annotations

import dataclasses
import logging

import comfy.model_management
import comfy.model_patcher
import comfy.patcher_extension

from ..easyanimate_model.config import MotionModuleConfig, TransformerConfig
from ..easyanimate_model.transformer import Transformer3DModel
from . import resources
from .comfy_model import TEMPORAL_OPTION, WEIGHT_DTYPES, EasyAnimateBaseModel, EasyAnimateV1

log = logging.getLogger("EasyAnimate")


def with_motion_structure(config: TransformerConfig) -> TransformerConfig:
    if config.motion_module is not None:
        return config
    return dataclasses.replace(config, motion_module=MotionModuleConfig())


def build_model_patcher(config: TransformerConfig, state_dict: dict, weight_dtype: str, source: str):
    """A ModelPatcher over a fresh EasyAnimateBaseModel holding `state_dict` (2D, or 2D + motion module).

    The model always has the motion-module structure; when `state_dict` has no motion-module weights they are
    left unset (the motion module stays off until the motion-module node adds them).
    """
    if weight_dtype not in WEIGHT_DTYPES:
        raise ValueError(f"weight_dtype: expected one of {list(WEIGHT_DTYPES)}, found {weight_dtype!r}")
    dtype = WEIGHT_DTYPES[weight_dtype]
    if weight_dtype.startswith("fp8") and (dtype is None or dtype not in
                                           comfy.model_management.get_supported_float8_types()):
        raise ValueError(f"weight_dtype {weight_dtype}: this PyTorch build has no {weight_dtype} support")
    load_device = comfy.model_management.get_torch_device()
    offload_device = comfy.model_management.unet_offload_device()
    model_config = EasyAnimateV1({"config": with_motion_structure(config)})
    if dtype is None:
        params = sum(t.numel() for t in state_dict.values())
        file_dtype = next((t.dtype for t in state_dict.values() if t.is_floating_point()), None)
        dtype = comfy.model_management.unet_dtype(model_params=params, weight_dtype=file_dtype,
                                                  supported_dtypes=model_config.supported_inference_dtypes)
    manual_cast = comfy.model_management.unet_manual_cast(dtype, load_device, model_config.supported_inference_dtypes)
    model_config.set_inference_dtype(dtype, manual_cast)

    model = model_config.get_model(device=offload_device)
    has_motion = any(Transformer3DModel.is_motion_key(k) for k in state_dict)
    missing, unexpected = model.diffusion_model.load_state_dict(state_dict, strict=False)
    # comfy.ops layers skip init: anything not loaded here must be motion-module weights the node adds later
    missing = [k for k in missing if not (Transformer3DModel.is_motion_key(k) and
                                          (not has_motion or k.endswith("pos_encoder.pe")))]
    if missing or unexpected:
        raise ValueError(f"{source}: does not fit the EasyAnimate transformer: missing {missing[:5]}, "
                         f"unexpected {unexpected[:5]}")
    patcher = comfy.model_patcher.ModelPatcher(model, load_device=load_device, offload_device=offload_device)
    # every sampler built on comfy.samplers (core KSampler included) refuses what cannot fit before loading
    patcher.add_wrapper_with_key(comfy.patcher_extension.WrappersMP.PREPARE_SAMPLING, "easyanimate_resources",
                                 resources.prepare_sampling_guard)
    if has_motion:
        patcher.model_options.setdefault("transformer_options", {})[TEMPORAL_OPTION] = True
    log.info("EasyAnimate transformer from %s: weight dtype %s, manual cast %s, motion module %s", source, dtype,
             manual_cast, "loaded" if has_motion else "not loaded")
    return patcher


def easyanimate_model(model, node: str) -> EasyAnimateBaseModel:
    """The EasyAnimateBaseModel inside a MODEL, or a clear error for any other model."""
    inner = getattr(model, "model", None)
    if not isinstance(inner, EasyAnimateBaseModel):
        raise ValueError(f"{node}: expected a MODEL from the EasyAnimate loaders (EasyAnimateLoadPipeline / "
                         f"EasyAnimateLoadDiT), found {type(inner).__name__ if inner is not None else type(model)}")
    return inner


def motion_module_enabled(model) -> bool:
    return bool(model.model_options.get("transformer_options", {}).get(TEMPORAL_OPTION, False))


def add_weight_patches(model, state_dict: dict, enable_motion_module: bool):
    """A clone of `model` whose weights named in `state_dict` are replaced ("set" patches); the input is unchanged."""
    clone = model.clone()
    patches = {"diffusion_model." + k: ("set", (v,)) for k, v in state_dict.items()}
    applied = set(clone.add_patches(patches, 1.0, 1.0))
    not_applied = sorted(set(patches) - applied)
    if not_applied:
        raise ValueError(f"{len(not_applied)} weights have no place in this model: {not_applied[:5]}")
    if enable_motion_module:
        clone.model_options.setdefault("transformer_options", {})[TEMPORAL_OPTION] = True
    return clone
