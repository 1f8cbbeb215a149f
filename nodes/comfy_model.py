"""EasyAnimate v1 as a native ComfyUI MODEL: model config + BaseModel + ModelPatcher around Transformer3DModel.

- `EasyAnimateV1` (model config): PixArt-alpha sampling (sqrt_linear betas 1e-4..0.02 == diffusers "linear", eps) and
  the SD1.5 latent format (0.18215), forced: core auto-detection would take the 512 px alpha model for PixArt-Sigma.
- `EasyAnimateDiT`: the library's Transformer3DModel built with BaseModel's `operations` (comfy.ops: manual cast,
  fp8 storage, lowvram) and ComfyUI's `optimized_attention`, called with BaseModel's convention on frames-in-batch
  latents [B*F, 4, h, w]. It always has the motion-module structure; the motion module runs only when the
  ModelPatcher's transformer_options say so (TEMPORAL_OPTION), which the motion-module node sets on a clone
  together with "set" patches carrying the temporal weights. So one base model serves with and without it.
- Frames per video: transformer_options[FRAMES_OPTION] (our sampler sets it), else one video per cond chunk.
"""
from __future__ import annotations

import dataclasses
import logging

import torch

import comfy.conds
import comfy.latent_formats
import comfy.model_base
import comfy.model_management
import comfy.model_patcher
import comfy.supported_models_base
from comfy.ldm.modules import attention as comfy_attention

from ..easyanimate_model.config import MotionModuleConfig, TransformerConfig
from ..easyanimate_model.transformer import Transformer3DModel

log = logging.getLogger("EasyAnimate")

FRAMES_OPTION = "easyanimate_frames"
TEMPORAL_OPTION = "easyanimate_motion_module"
WEIGHT_DTYPES = {
    "default": None,
    "fp16": torch.float16,
    "bf16": torch.bfloat16,
    "fp32": torch.float32,
    "fp8_e4m3fn": getattr(torch, "float8_e4m3fn", None),
    "fp8_e5m2": getattr(torch, "float8_e5m2", None),
}


class EasyAnimateDiT(Transformer3DModel):
    """Transformer3DModel with the diffusion_model call signature of comfy.model_base.BaseModel."""

    def __init__(self, config: TransformerConfig, dtype=None, device=None, operations=None, **kwargs):
        super().__init__(config, operations=operations, attention=comfy_attention.optimized_attention,
                         dtype=dtype, device=device)
        self.dtype = dtype  # BaseModel.get_dtype() reads diffusion_model.dtype

    def forward(self, x, timesteps, context=None, attention_mask=None, transformer_options={}, **kwargs):
        """x [rows, 4, h, w] (rows = chunks * B * F), context [rows, L, C] (one copy per row, as ComfyUI repeats
        conds to the batch), attention_mask [rows, L] or None -> eps [rows, 4, h, w] (learned sigma dropped)."""
        rows = x.shape[0]
        frames = transformer_options.get(FRAMES_OPTION) or rows // max(1, len(transformer_options.get(
            "cond_or_uncond", [None])))
        if rows % frames:
            raise ValueError(f"EasyAnimate: a batch of {rows} latent frames is not a whole number of {frames}-frame "
                             f"videos")
        context = context[::frames]
        if attention_mask is not None:
            attention_mask = attention_mask[::frames]
        out = self.forward_frames(x, timesteps, context, attention_mask, num_frames=frames,
                                  temporal=transformer_options.get(TEMPORAL_OPTION, False))
        return out[:, :self.config.in_channels]


class EasyAnimateBaseModel(comfy.model_base.BaseModel):
    def __init__(self, model_config, device=None):
        super().__init__(model_config, comfy.model_base.ModelType.EPS, device=device, unet_model=EasyAnimateDiT)

    def extra_conds(self, **kwargs):
        out = super().extra_conds(**kwargs)
        cross_attn = kwargs.get("cross_attn")
        if cross_attn is not None:
            # Regular (not CrossAttn): T5 tokens must never be repeated to match another cond's length
            out["c_crossattn"] = comfy.conds.CONDRegular(cross_attn)
        mask = kwargs.get("attention_mask")
        if mask is not None:
            out["attention_mask"] = comfy.conds.CONDRegular(mask)
        return out


class EasyAnimateV1(comfy.supported_models_base.BASE):
    """Model config: PixArt-alpha sampling settings and SD1.5 latents, never auto-detected."""

    unet_config = {}
    unet_extra_config = {}
    sampling_settings = {"beta_schedule": "sqrt_linear", "linear_start": 0.0001, "linear_end": 0.02,
                         "timesteps": 1000}
    latent_format = comfy.latent_formats.SD15
    memory_usage_factor = 0.5
    supported_inference_dtypes = [torch.float16, torch.bfloat16, torch.float32]

    def get_model(self, state_dict=None, prefix="", device=None):
        return EasyAnimateBaseModel(self, device=device).eval()


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
