"""LoRA node: EasyAnimate (kohya-style) LoRAs as ModelPatcher patches on clones of MODEL and CLIP (chainable,
nothing merged into shared weights). DiT modules map with easyanimate_model.lora; `lora_te_` modules go to the T5
of the CLIP. Modules that map to nothing are reported in the log."""
from __future__ import annotations

import logging

from comfy.weight_adapter.lora import LoRAAdapter

from ..easyanimate_model.errors import EasyAnimateLoadError
from ..easyanimate_model.files import load_state_dict_file
from ..easyanimate_model.lora import lora_deltas
from . import model_files
from .comfy_clip import CLIP_NAME
from .model_patching import easyanimate_model

log = logging.getLogger("EasyAnimate")
NODE = "EasyAnimateLoraLoader"


def lora_patches(deltas: dict, prefix: str) -> dict:
    """{patch key: LoRAAdapter} from {module weight key: (up, down, scale)} (alpha/rank = scale)."""
    return {prefix + key: LoRAAdapter(set(), (up, down, scale * down.shape[0], None, None, None))
            for key, (up, down, scale) in deltas.items()}


def apply_patches(patcher, patches: dict, strength: float, what: str, source: str):
    applied = set(patcher.add_patches(patches, strength))
    skipped = sorted(set(patches) - applied)
    if skipped:
        log.warning("%s: %s: %d LoRA modules have no matching %s weight and were not applied: %s", NODE, source,
                    len(skipped), what, ", ".join(skipped[:10]) + (" ..." if len(skipped) > 10 else ""))
    return len(applied)


class EasyAnimateLoraLoader:
    DESCRIPTION = ("Applies an EasyAnimate LoRA (e.g. easyanimate_portrait_lora.safetensors, models/loras) to copies "
                   "of the MODEL and, if connected, the CLIP (T5). Chainable; the inputs are unchanged.")
    CATEGORY = "EasyAnimate/loaders"
    FUNCTION = "apply"
    RETURN_TYPES = ("MODEL", "CLIP")
    RETURN_NAMES = ("model", "clip")
    OUTPUT_TOOLTIPS = ("The MODEL with the LoRA's transformer part.",
                       "The CLIP with the LoRA's T5 part (None when no CLIP is connected).")

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "model": ("MODEL", {"tooltip": "The EasyAnimate MODEL."}),
            "lora_name": (model_files.file_list("loras"), {"tooltip": "The LoRA file in models/loras."}),
            "strength_model": ("FLOAT", {"default": 0.55, "min": -20.0, "max": 20.0, "step": 0.01, "tooltip":
                                         "Strength on the transformer (the original UI's 'LoRA alpha', default "
                                         "0.55)."}),
            "strength_clip": ("FLOAT", {"default": 0.55, "min": -20.0, "max": 20.0, "step": 0.01, "tooltip":
                                        "Strength on the T5 text encoder (the original merges both with one "
                                        "value)."}),
        }, "optional": {
            "clip": ("CLIP", {"tooltip": "The T5 CLIP, for LoRAs that also train the text encoder (lora_te_ keys)."}),
        }}

    def apply(self, model, lora_name, strength_model, strength_clip, clip=None):
        inner = easyanimate_model(model, NODE)
        path = model_files.full_path(lora_name, "loras")
        try:
            state, _ = load_state_dict_file(path)
            # resolved against the actual modules, so names and shapes are checked
            dit = lora_deltas(state, target="transformer", module_names=inner.diffusion_model)
            te = lora_deltas(state, target="text_encoder", module_names=(
                getattr(clip.cond_stage_model, CLIP_NAME).transformer if clip is not None else None))
        except (EasyAnimateLoadError, ValueError) as e:
            raise type(e)(f"{NODE}: {e}") from None
        if not dit and not te:
            raise ValueError(f"{NODE}: {path}: expected an EasyAnimate LoRA (kohya keys 'lora_unet__transformer_"
                             f"blocks_N_...' / 'lora_te_encoder_block_N_...'), found no usable module among keys "
                             f"like {sorted(state)[:3]} (an SD1.5/SDXL LoRA?)")
        unmapped = {**dit.unmapped, **te.unmapped}
        if unmapped:
            log.warning("%s: %s: %d LoRA entries not applied: %s", NODE, path, len(unmapped),
                        "; ".join(f"{k}: {v}" for k, v in sorted(unmapped.items())[:10]))
        new_model = model.clone()
        applied = apply_patches(new_model, lora_patches(dit, "diffusion_model."), strength_model, "transformer", path)
        if dit and not applied:
            raise ValueError(f"{NODE}: {path}: none of its {len(dit)} transformer modules exists in this MODEL")
        new_clip = clip
        if te:
            if clip is None:
                log.warning("%s: %s has %d T5 modules; connect the clip input to apply them", NODE, path, len(te))
            else:
                new_clip = clip.clone()
                apply_patches(new_clip, lora_patches(te, f"{CLIP_NAME}.transformer."), strength_clip, "T5", path)
        log.info("%s: %s: %d transformer and %d T5 modules", NODE, lora_name, len(dit), len(te) if clip else 0)
        return (new_model, new_clip)


NODE_CLASS_MAPPINGS = {"EasyAnimateLoraLoader": EasyAnimateLoraLoader}
NODE_DISPLAY_NAME_MAPPINGS = {"EasyAnimateLoraLoader": "EasyAnimate LoRA Loader"}
