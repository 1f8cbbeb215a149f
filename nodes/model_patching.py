"""Building EasyAnimate MODELs the way core builds its own diffusion models (docs/ARCHITECTURE.md, "Loading and
memory"): the model is built without weights (meta device; weightless comfy.ops layers under DynamicVRAM), the state
dict, cast to the chosen weight dtype, is assigned into it (safetensors tensors stay file-backed, nothing is copied
twice), and it is wrapped in core's `CoreModelPatcher` (the dynamic patcher where ComfyUI uses one).

Each weight exists once: a 2D load builds the model without the motion-module structure; adding the motion module or
a personalised base checkpoint builds a NEW model from the input model's tensors (shared storage, own Parameter
objects) plus the loaded ones, so the input MODEL stays as it was for other branches of the graph. Every MODEL carries
`cached_patcher_init` (how core re-creates a loader's model for its multi-GPU and non-dynamic clones). The model
classes are in comfy_model.py.
"""
from __future__ import annotations

import dataclasses
import inspect
import logging

import comfy.model_management
import comfy.model_patcher
import comfy.patcher_extension

from ..easyanimate_model.config import MotionModuleConfig, TransformerConfig
from . import resources
from .comfy_model import WEIGHT_DTYPES, EasyAnimateBaseModel, EasyAnimateV1
from .keys import TEMPORAL_OPTION

log = logging.getLogger("EasyAnimate")
PREFIX = "diffusion_model."


def with_motion_structure(config: TransformerConfig) -> TransformerConfig:
    if config.motion_module is not None:
        return config
    return dataclasses.replace(config, motion_module=MotionModuleConfig())


def patcher_class(disable_dynamic: bool = False):
    """Core's patcher class for diffusion models: CoreModelPatcher (ModelPatcherDynamic when ComfyUI runs DynamicVRAM)
    where it exists, read at call time because main.py switches it after import."""
    if disable_dynamic:
        return comfy.model_patcher.ModelPatcher
    return getattr(comfy.model_patcher, "CoreModelPatcher", comfy.model_patcher.ModelPatcher)


def call_patcher_init(init, disable_dynamic: bool = False):
    """Run a `cached_patcher_init` tuple (factory, args[, index]) like core does."""
    out = init[0](*init[1], disable_dynamic=disable_dynamic)
    return out[init[2]] if len(init) > 2 else out


def _cast(state_dict: dict, dtype) -> dict:
    # same dtype: the (file-backed) tensor itself, no copy
    return {k: v.to(dtype) if v.is_floating_point() else v for k, v in state_dict.items()}


def _build(config: TransformerConfig, state_dict: dict, dtype, manual_cast, source: str, load_device,
           offload_device) -> EasyAnimateBaseModel:
    """An EasyAnimateBaseModel holding exactly `state_dict` (cast to `dtype`), no weight allocated twice."""
    model_config = EasyAnimateV1({"config": config})
    model_config.set_inference_dtype(dtype, manual_cast)
    # meta: plain layers allocate nothing; under DynamicVRAM comfy.ops layers are weightless anyway
    model = model_config.get_model(device="meta")
    state = _cast(state_dict, dtype)
    missing, unexpected = model.diffusion_model.load_state_dict(state, strict=False, assign=True)
    missing = [k for k in missing if not k.endswith("pos_encoder.pe")]  # a formula: files may leave it out
    if missing or unexpected:
        raise ValueError(f"{source}: does not fit the EasyAnimate transformer: missing {missing[:5]}, "
                         f"unexpected {unexpected[:5]}")
    model.diffusion_model.init_buffers(offload_device)
    left = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
    if left:  # guards the meta build against model/loader drift
        raise ValueError(f"{source}: {len(left)} model tensors were not loaded: {left[:5]}")
    return model


def model_dtypes(state_dict: dict, weight_dtype: str):
    """(storage dtype, manual-cast dtype) of a MODEL holding `state_dict` with the loader's `weight_dtype` choice,
    decided by core like for its own models."""
    if weight_dtype not in WEIGHT_DTYPES:
        raise ValueError(f"weight_dtype: expected one of {list(WEIGHT_DTYPES)}, found {weight_dtype!r}")
    dtype = WEIGHT_DTYPES[weight_dtype]
    if weight_dtype.startswith("fp8") and (dtype is None or dtype not in
                                           comfy.model_management.get_supported_float8_types()):
        raise ValueError(f"weight_dtype {weight_dtype}: this PyTorch build has no {weight_dtype} support")
    supported = EasyAnimateV1.supported_inference_dtypes
    if dtype is None:
        params = sum(t.numel() for t in state_dict.values())
        file_dtype = next((t.dtype for t in state_dict.values() if t.is_floating_point()), None)
        dtype = comfy.model_management.unet_dtype(model_params=params, weight_dtype=file_dtype,
                                                  supported_dtypes=supported)
    manual_cast = comfy.model_management.unet_manual_cast(dtype, comfy.model_management.get_torch_device(), supported)
    return dtype, manual_cast


def read_for_model(read, weight_dtype: str):
    """(config, state dict) from `read(dtype)` (a read_transformer call), cast to the MODEL's weight dtype while
    reading. The first read only maps the file (nothing is touched); it is read again with the cast only when the
    dtype differs, so casting streams chunk by chunk instead of holding the file's pages and the result at once."""
    config, state = read(None)
    dtype, _ = model_dtypes(state, weight_dtype)
    if any(t.is_floating_point() and t.dtype != dtype for t in state.values()):
        del state
        config, state = read(dtype)
    return config, state


def build_model_patcher(config: TransformerConfig, state_dict: dict, weight_dtype: str, source: str,
                        patcher_init=None, disable_dynamic: bool = False):
    """A MODEL (core's patcher over a new EasyAnimateBaseModel) holding `state_dict` (2D, or 2D + motion module).

    `config` must match the weights: a 2D state dict with a 2D config builds no motion-module structure.
    `patcher_init` (factory, args) re-creates this MODEL; core uses it for multi-GPU and non-dynamic clones.
    """
    load_device = comfy.model_management.get_torch_device()
    offload_device = comfy.model_management.unet_offload_device()
    dtype, manual_cast = model_dtypes(state_dict, weight_dtype)
    model = _build(config, state_dict, dtype, manual_cast, source, load_device, offload_device)
    patcher = patcher_class(disable_dynamic)(model, load_device=load_device, offload_device=offload_device)
    patcher.cached_patcher_init = patcher_init
    has_motion = config.motion_module is not None
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


def original_weights(model) -> dict:
    """The unpatched weights of a MODEL's transformer, {key: tensor} sharing storage with the model's own tensors
    (ComfyUI keeps the originals of patched weights in `backup` while patches are applied)."""
    inner = easyanimate_model(model, "EasyAnimate")
    weights = inner.diffusion_model.state_dict()  # detached tensors: same storage, not the Parameter objects
    for key, saved in getattr(model, "backup", {}).items():
        if key.startswith(PREFIX) and key[len(PREFIX):] in weights:
            weights[key[len(PREFIX):]] = saved.weight
    # a MODEL currently loaded on the GPU gives host copies (the new model starts on the offload device)
    return {k: v.to(model.offload_device) for k, v in weights.items()}


def _rebased_clone(model, new_model):
    """`model.clone()` (patches, options, wrappers, hooks kept) whose model is `new_model`, with fresh backups."""
    # the input's own class (a non-dynamic delegate stays non-dynamic); it also sets up the new model's patcher state
    fresh = type(model)(new_model, load_device=model.load_device, offload_device=model.offload_device)
    if "model_override" in inspect.signature(model.clone).parameters:
        # what core's deepclone_multigpu does: the clone's model and (empty) backup state come from `fresh`
        clone = model.clone(model_override=fresh.get_clone_model_override())
    else:  # ComfyUI without clone(model_override=): the same by hand
        clone = model.clone()
        clone.model = new_model
        clone.backup, clone.object_patches_backup = fresh.backup, fresh.object_patches_backup
        if hasattr(fresh, "backup_buffers"):
            clone.backup_buffers = fresh.backup_buffers
    clone.size = 0  # recomputed for the new model
    return clone


def with_weights(model, state_dict: dict, config: TransformerConfig, source: str, patcher_init=None):
    """A NEW MODEL: `model`'s weights with those in `state_dict` replaced or added, built for `config`.

    The tensors that are not replaced are shared with `model` (no copy); the loaded ones are cast to the model's
    weight dtype. Patches (e.g. a LoRA), options and wrappers of `model` carry over as in `model.clone()`; the input
    MODEL is unchanged.
    """
    inner = easyanimate_model(model, "EasyAnimate")
    weights = original_weights(model)  # a motion module of the input is kept unless `state_dict` replaces it
    weights.update(state_dict)
    new_model = _build(config, weights, inner.get_dtype(), inner.manual_cast_dtype, source, model.load_device,
                       model.offload_device)
    del weights
    clone = _rebased_clone(model, new_model)
    clone.cached_patcher_init = patcher_init
    if config.motion_module is not None:
        clone.model_options.setdefault("transformer_options", {})[TEMPORAL_OPTION] = True
    return clone


def _derived_patcher(base_init, apply, args, disable_dynamic=False):
    """cached_patcher_init factory of a derived MODEL: re-create the input MODEL, then apply the same node step."""
    return apply(call_patcher_init(base_init, disable_dynamic), *args)


def derived_init(model, apply, *args):
    """A `cached_patcher_init` for `apply(model, *args)` (None when `model` has none: core then refuses cleanly)."""
    base = getattr(model, "cached_patcher_init", None)
    return None if base is None else (_derived_patcher, (base, apply, args))
