"""EasyAnimate v1 as a native ComfyUI MODEL: model config + BaseModel around Transformer3DModel (the ModelPatcher is
built in model_patching.py).

- `EasyAnimateV1` (model config): PixArt-alpha sampling (sqrt_linear betas 1e-4..0.02 == diffusers "linear", eps) and
  the SD1.5 latent format (0.18215), forced: core auto-detection would take the 512 px alpha model for PixArt-Sigma.
- `EasyAnimateDiT`: the library's Transformer3DModel built with BaseModel's `operations` (comfy.ops: manual cast,
  fp8 storage, lowvram) and ComfyUI's `optimized_attention`, called with BaseModel's convention on frames-in-batch
  latents [B*F, 4, h, w]. A 2D MODEL has no motion-module structure; the motion-module node builds a new model with
  it (sharing the 2D tensors, model_patching.py) and sets TEMPORAL_OPTION in its transformer_options, which the
  model honours (and the sampler reads).
- Frames per video (`frames_per_video`, the one place that decides it): a core context window's length, else
  transformer_options[FRAMES_KEY] (EasyAnimateSampler sets it from the latent's entry of the same name), else one
  video per cond chunk (rows // len(cond_or_uncond)).
- `EasyAnimateModelSampling`: the original schedulers' noise levels, with sigma -> timestep giving the original's
  exact (fractional, for Euler / Euler A) timesteps, so the samplers of nodes_sampler.py reproduce it.
- Prompt schedules (EasyAnimatePromptSchedule): the conditioning entry SCHEDULE_KEY holds a library PromptSchedule;
  extra_conds passes it on untouched (CONDPromptSchedule: never repeated per row, one per cond chunk) and forward turns
  it into per-frame contexts of the frames being run (the whole video, or transformer_options["context_window"]).
"""
from __future__ import annotations

import logging

import torch

import comfy.conds
import comfy.latent_formats
import comfy.model_base
import comfy.model_sampling
import comfy.patcher_extension
import comfy.supported_models_base
from comfy.ldm.modules import attention as core_attention

from ..easyanimate_model.config import BETA_END, BETA_START, NUM_TRAIN_TIMESTEPS, TransformerConfig
from ..easyanimate_model.prompt_schedule import PromptSchedule, batch_contexts, check_frames
from ..easyanimate_model.sampling import sigma_to_timestep, timestep_to_sigma, train_sigmas
from ..easyanimate_model.transformer import Transformer3DModel
from . import resources
from .keys import FRAMES_KEY, SCHEDULE_KEY, TEMPORAL_OPTION

log = logging.getLogger("EasyAnimate")

WEIGHT_DTYPES = {
    "default": None,
    "fp16": torch.float16,
    "bf16": torch.bfloat16,
    "fp32": torch.float32,
    "fp8_e4m3fn": getattr(torch, "float8_e4m3fn", None),
    "fp8_e5m2": getattr(torch, "float8_e5m2", None),
}


# the block key of patches_replace ("dit" block replace, "attn1" / "attn2" replace), as core's DiT video models
BLOCK_KEY = "double_block"


def comfy_attention(q, k, v, heads, mask=None, transformer_options=None, name=None):
    """The attention the library calls: an "attn1"/"attn2" patches_replace entry for the current block (called
    like core's: patch(q, k, v, extra_options) -> attention output before to_out), else core's optimized_attention,
    which applies transformer_options["optimized_attention_override"] (wrap_attn)."""
    if transformer_options is None:
        return core_attention.optimized_attention(q, k, v, heads, mask=mask)
    replace = transformer_options.get("patches_replace", {}).get(name, {}).get(transformer_options.get("block"))
    if replace is not None:
        extra = dict(transformer_options, n_heads=heads, dim_head=q.shape[-1] // heads, attention_mask=mask)
        return replace(q, k, v, extra)
    return core_attention.optimized_attention(q, k, v, heads, mask=mask, transformer_options=transformer_options)


class EasyAnimateDiT(Transformer3DModel):
    """Transformer3DModel with the diffusion_model call signature of comfy.model_base.BaseModel, the DIFFUSION_MODEL
    wrapper, "dit" block replace and attention patches, like core's video models."""

    def __init__(self, config: TransformerConfig, dtype=None, device=None, operations=None, **kwargs):
        super().__init__(config, operations=operations, attention=comfy_attention, dtype=dtype, device=device)
        self.dtype = dtype  # BaseModel.get_dtype() reads diffusion_model.dtype

    def forward(self, x, timesteps, context=None, attention_mask=None, transformer_options={}, **kwargs):
        return comfy.patcher_extension.WrapperExecutor.new_class_executor(
            self._forward,
            self,
            comfy.patcher_extension.get_all_wrappers(comfy.patcher_extension.WrappersMP.DIFFUSION_MODEL,
                                                     transformer_options)
        ).execute(x, timesteps, context, attention_mask, transformer_options, **kwargs)

    def _forward(self, x, timesteps, context=None, attention_mask=None, transformer_options={}, **kwargs):
        """x [rows, 4, h, w] (rows = chunks * B * F), context [rows, L, C] (one copy per row, as ComfyUI repeats
        conds to the batch), attention_mask [rows, L] or None -> eps [rows, 4, h, w] (learned sigma dropped)."""
        frames, context, attention_mask, options = self._call_args(x, context, attention_mask, transformer_options,
                                                                   kwargs.get(SCHEDULE_KEY))
        out = self.forward_frames(x, timesteps, context, attention_mask, num_frames=frames,
                                  temporal=options.get(TEMPORAL_OPTION, False), transformer_options=options)
        return out[:, :self.config.in_channels]

    # Python bookkeeping on ComfyUI's options, run eagerly under core TorchCompileModel: traced, dynamo guards on
    # every entry of transformer_options (the copy below reads them all), and entries that differ between samplers
    # (EasyAnimateSampler sets FRAMES_KEY, core samplers do not) break those guards instead of recompiling
    @torch.compiler.disable
    def _call_args(self, x, context, attention_mask, transformer_options, schedules):
        """(frames per video, the call's text contexts, their mask, a copy of transformer_options for the blocks)."""
        rows = x.shape[0]
        frames = frames_per_video(rows, transformer_options)
        if schedules:
            context, attention_mask = self._scheduled_contexts(schedules, rows, frames, transformer_options,
                                                               context.dtype, x.device), None
        else:
            # one text embedding per video: conds come repeated to every row (to the whole video's rows under a core
            # context window, whose conds are not sliced)
            stride = context.shape[0] // (rows // frames)
            context = context[::stride]
            if attention_mask is not None:
                attention_mask = attention_mask[::stride]
        # a copy: the block keys set per block must not leak into the caller's dict
        options = dict(transformer_options, total_blocks=len(self.transformer_blocks), block_type="double")
        return frames, context, attention_mask, options

    def _scheduled_contexts(self, schedules, rows, frames, transformer_options, dtype, device):
        """FrameContexts for the rows of this call: one schedule per cond chunk; the rows' frame numbers come from
        the context window (its indices into the whole latent) or count from 0 (the whole video)."""
        window = transformer_options.get("context_window")
        positions = None if window is None else window_frames(window)
        total = int(transformer_options.get(FRAMES_KEY) or 0) or schedules[0].video_rows
        for s in schedules:
            check_frames(s.schedule, total if positions is not None else frames, "EasyAnimatePromptSchedule")
        return batch_contexts([s.schedule for s in schedules], rows, frames, positions, total, dtype=dtype,
                              device=device)

    def run_block(self, index, block, x, t6, context, mask, num_frames, height, width, temporal,
                  transformer_options=None, context_index=None):
        if transformer_options is None:
            return super().run_block(index, block, x, t6, context, mask, num_frames, height, width, temporal,
                                     context_index=context_index)
        key = (BLOCK_KEY, index)
        transformer_options["block"] = key
        transformer_options["block_index"] = index
        replace = transformer_options.get("patches_replace", {}).get("dit", {}).get(key)
        if replace is None:
            return super().run_block(index, block, x, t6, context, mask, num_frames, height, width, temporal,
                                     transformer_options, context_index)

        def original_block(args):
            return {"img": Transformer3DModel.run_block(self, index, block, args["img"], args["vec"], args["txt"],
                                                        mask, num_frames, height, width, temporal,
                                                        args["transformer_options"], context_index)}

        out = replace({"img": x, "txt": context, "vec": t6, "txt_mask": mask, "num_frames": num_frames,
                       "transformer_options": transformer_options}, {"original_block": original_block})
        return out["img"]


def window_frames(window) -> list:
    """The frames a core context window puts in the model call, in order: newer cores' causal_window_fix (on by
    default in "Context Windows (Manual)") prepends the frame before the window as an anchor."""
    anchor = getattr(window, "causal_anchor_index", None)
    return ([] if anchor is None else [anchor]) + list(window.index_list)


def frames_per_video(rows: int, transformer_options: dict) -> int:
    """Frames per video in a model call of `rows` latent frames (see the module docstring)."""
    frames = transformer_options.get(FRAMES_KEY)
    window = transformer_options.get("context_window")
    if window is not None:
        if frames and max(window.index_list) >= frames:
            raise ValueError(f"EasyAnimate: a context window over frames {window.index_list[0]}..."
                             f"{window.index_list[-1]} crosses the end of a {frames}-frame video: context windows "
                             f"need a batch of one video")
        frames = len(window_frames(window))
    frames = frames or rows // max(1, len(transformer_options.get("cond_or_uncond", [None])))
    if not frames or rows % frames:
        raise ValueError(f"EasyAnimate: a batch of {rows} latent frames is not a whole number of {frames}-frame "
                         f"videos")
    return frames


class EasyAnimateModelSampling(comfy.model_sampling.ModelSamplingDiscrete, comfy.model_sampling.EPS):
    """EPS model sampling on the schedulers' own sigma table, with the exact inverse sigma -> timestep.

    Core's ModelSamplingDiscrete rounds a sigma to the nearest integer timestep; Euler and Euler A run the model at
    fractional timesteps (sigma linear between training steps), which this inverse gives back exactly.
    """

    def __init__(self, model_config=None):
        super().__init__(model_config)
        self.set_sigmas(train_sigmas())

    def timestep(self, sigma):
        return sigma_to_timestep(sigma, self.sigmas).to(device=sigma.device, dtype=torch.float32)

    @staticmethod
    def _per_row(sigma, x):
        # one sigma per cond chunk (see nodes_sampler.py: under 0.3.75's context windows) -> one per latent row
        if sigma.numel() > 1 and sigma.numel() != x.shape[0] and x.shape[0] % sigma.numel() == 0:
            return sigma.reshape(-1).repeat_interleave(x.shape[0] // sigma.numel())
        return sigma

    def calculate_input(self, sigma, noise):
        return super().calculate_input(self._per_row(sigma, noise), noise)

    def calculate_denoised(self, sigma, model_output, model_input):
        return super().calculate_denoised(self._per_row(sigma, model_output), model_output, model_input)

    def sigma(self, timestep):
        return timestep_to_sigma(timestep, self.sigmas).to(device=timestep.device, dtype=torch.float32)


class CONDPromptSchedule(comfy.conds.CONDConstant):
    """A PromptSchedule as a model cond: passed whole to the model (the model picks the frames it runs), one per
    cond chunk; chunks with schedules batch together (concat gives the list). `video_rows` is the latent's row count
    (frames of one video when no frame count is set, as core samplers run one video per chunk)."""

    def __init__(self, cond: PromptSchedule, video_rows: int = 0):
        self.cond, self.schedule, self.video_rows = cond, cond, video_rows

    def _copy_with(self, cond):
        return CONDPromptSchedule(cond, self.video_rows)

    def can_concat(self, other):
        return isinstance(other, CONDPromptSchedule)

    def concat(self, others):
        return [self] + list(others)


class EasyAnimateBaseModel(comfy.model_base.BaseModel):
    def __init__(self, model_config, device=None):
        super().__init__(model_config, comfy.model_base.ModelType.EPS, device=device, unet_model=EasyAnimateDiT)
        self.model_sampling = EasyAnimateModelSampling(model_config)

    def memory_required(self, input_shape, cond_shapes={}):
        # ComfyUI sizes offloading and cond/uncond batching with this; core's area formula ignores the frames
        return resources.memory_required(self.diffusion_model.config, input_shape, self.manual_cast_dtype or self.get_dtype())

    def extra_conds(self, **kwargs):
        out = super().extra_conds(**kwargs)
        cross_attn = kwargs.get("cross_attn")
        if cross_attn is not None:
            channels = self.diffusion_model.config.caption_channels
            if cross_attn.ndim != 3 or cross_attn.shape[-1] != channels:
                raise ValueError(f"EasyAnimate: conditioning: expected T5 embeddings [batch, tokens, {channels}] "
                                 f"(from EasyAnimateTextEncode or CLIPTextEncode on the EasyAnimate CLIP), found "
                                 f"shape {tuple(cross_attn.shape)} (another text encoder?)")
            # Regular (not CrossAttn): T5 tokens must never be repeated to match another cond's length
            out["c_crossattn"] = comfy.conds.CONDRegular(cross_attn)
        mask = kwargs.get("attention_mask")
        if mask is not None:
            out["attention_mask"] = comfy.conds.CONDRegular(mask)
        schedule = kwargs.get(SCHEDULE_KEY)
        if schedule is not None:
            noise = kwargs.get("noise")
            out[SCHEDULE_KEY] = CONDPromptSchedule(schedule, 0 if noise is None else noise.shape[0])
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
