"""EasyAnimate v1 as a native ComfyUI MODEL: model config + BaseModel around Transformer3DModel (the ModelPatcher is
built in model_patching.py).

- `EasyAnimateV1` (model config): PixArt-alpha sampling (sqrt_linear betas 1e-4..0.02 == diffusers "linear", eps) and
  the SD1.5 latent format (0.18215), forced: core auto-detection would take the 512 px alpha model for PixArt-Sigma.
- `EasyAnimateDiT`: the library's Transformer3DModel built with BaseModel's `operations` (comfy.ops: manual cast,
  fp8 storage, lowvram) and ComfyUI's `optimized_attention`, called with BaseModel's convention on frames-in-batch
  latents [B*F, 4, h, w]. A 2D MODEL has no motion-module structure; the motion-module node builds a new model with
  it (sharing the 2D tensors, model_patching.py) and sets TEMPORAL_OPTION in its transformer_options, which the
  model honours (and the sampler reads).
- Frames per video: transformer_options[FRAMES_KEY] (our sampler sets it), else one video per cond chunk.
"""
from __future__ import annotations

import logging

import torch

import comfy.conds
import comfy.latent_formats
import comfy.model_base
import comfy.supported_models_base
from comfy.ldm.modules import attention as comfy_attention

from ..easyanimate_model.config import BETA_END, BETA_START, NUM_TRAIN_TIMESTEPS, TransformerConfig
from ..easyanimate_model.transformer import Transformer3DModel
from . import resources

log = logging.getLogger("EasyAnimate")

# frames per video, under one name in a LATENT dict (the batch holds batch_size * frames rows) and in transformer_options
FRAMES_KEY = "easyanimate_frames"
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
        frames = transformer_options.get(FRAMES_KEY) or rows // max(1, len(transformer_options.get(
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

    def memory_required(self, input_shape, cond_shapes={}):
        # ComfyUI sizes offloading and cond/uncond batching with this; core's area formula ignores the frames
        return resources.memory_required(self.diffusion_model.config, input_shape, self.manual_cast_dtype or self.get_dtype())

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
    # comfy's "sqrt_linear" is linear in beta: the library's schedule
    sampling_settings = {"beta_schedule": "sqrt_linear", "linear_start": BETA_START, "linear_end": BETA_END,
                         "timesteps": NUM_TRAIN_TIMESTEPS}
    latent_format = comfy.latent_formats.SD15
    memory_usage_factor = 0.5
    supported_inference_dtypes = [torch.float16, torch.bfloat16, torch.float32]

    def get_model(self, state_dict=None, prefix="", device=None):
        return EasyAnimateBaseModel(self, device=device).eval()
