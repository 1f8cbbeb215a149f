"""LoRA node: EasyAnimate (kohya-style) LoRAs as ModelPatcher patches on clones of MODEL and CLIP (chainable,
nothing merged into shared weights). DiT modules map with easyanimate_model.lora; `lora_te_` modules go to the T5
of the CLIP. A LoRA that does not fully apply fails the node (strict), or is applied partly with a warning shown in
the node (web/js/easyanimate_lora.js) and the log."""
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
UI_KEY = "easyanimate_lora_warnings"  # the node's ui output read by web/js/easyanimate_lora.js


def lora_patches(deltas: dict, prefix: str) -> dict:
    """{patch key: LoRAAdapter} from {module weight key: (up, down, scale)} (alpha/rank = scale)."""
    return {prefix + key: LoRAAdapter(set(), (up, down, scale * down.shape[0], None, None, None))
            for key, (up, down, scale) in deltas.items()}


def apply_patches(patcher, patches: dict, strength: float) -> list:
    """Adds the patches; returns the keys that have no matching weight in the patcher's model."""
    applied = set(patcher.add_patches(patches, strength))
    return sorted(set(patches) - applied)


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
            "strict": ("BOOLEAN", {"default": True, "tooltip":
                                   "On: a LoRA that does not fully apply (unknown modules, wrong shapes, T5 part "
                                   "without a clip) fails with the list. Off: apply what fits and show a warning."}),
        }}

    def apply(self, model, lora_name, strength_model, strength_clip, clip=None, strict=True):
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
        # a T5 part with no clip connected is a choice (like core's model-only LoRA loader), not a failure
        unmapped = {**dit.unmapped, **(te.unmapped if clip is not None else {})}
        problems = [f"{k}: {v}" for k, v in sorted(unmapped.items())]
        new_model = model.clone()
        skipped = apply_patches(new_model, lora_patches(dit, "diffusion_model."), strength_model)
        if dit and len(skipped) == len(dit):
            raise ValueError(f"{NODE}: {path}: none of its {len(dit)} transformer modules exists in this MODEL")
        problems += [f"{k}: no matching transformer weight" for k in skipped]
        new_clip = clip
        if te and clip is None:
            log.info("%s: %s has %d T5 modules; connect the clip input to apply them", NODE, path, len(te))
        elif te:
            new_clip = clip.clone()
            problems += [f"{k}: no matching T5 weight" for k in
                         apply_patches(new_clip, lora_patches(te, f"{CLIP_NAME}.transformer."), strength_clip)]
        if problems and strict:
            raise ValueError(f"{NODE}: {path}: {len(problems)} LoRA entries do not apply (strict is on; turn it off "
                             f"to apply the rest): " + "; ".join(problems[:20]) + (" ..." if len(problems) > 20 else ""))
        log.info("%s: %s: %d transformer and %d T5 modules", NODE, lora_name, len(dit), len(te) if clip else 0)
        warnings = []
        if problems:
            warnings.append(f"{lora_name}: {len(problems)} LoRA entries not applied: " + "; ".join(problems[:10])
                            + (" ..." if len(problems) > 10 else ""))
            log.warning("%s: %s", NODE, warnings[0])
        # always sent, so the node's shown warning is cleared by a clean run
        return {"ui": {UI_KEY: warnings}, "result": (new_model, new_clip)}


NODE_CLASS_MAPPINGS = {"EasyAnimateLoraLoader": EasyAnimateLoraLoader}
NODE_DISPLAY_NAME_MAPPINGS = {"EasyAnimateLoraLoader": "EasyAnimate LoRA Loader"}
