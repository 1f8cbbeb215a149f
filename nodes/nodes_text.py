"""T5 loader and prompt encoding nodes (the original's tokenization: cleaned / lower-cased, 120 tokens, mask)."""
from __future__ import annotations

import logging

from ..easyanimate_model.errors import EasyAnimateLoadError
from ..easyanimate_model.files import CheckpointFile
from ..easyanimate_model.text import (DEFAULT_NEGATIVE_PROMPT, DEFAULT_PROMPT, MAX_LENGTH, preprocess_prompt,
                                      read_t5_encoder, t5_folders)
from . import model_files
from .comfy_clip import (COMFY_T5_TOKENIZER, TEXT_ENCODER_DEVICES, EasyAnimateTokenizerBase,
                         build_clip, comfy_t5_config)

log = logging.getLogger("EasyAnimate")


def _t5_state_dict(weights) -> dict:
    return weights.read(weights.keys())


def load_t5_from_pipeline(folder: str, device: str, disable_dynamic=False):
    """CLIP from a pipeline folder's text_encoder/ and tokenizer/, found and checked by the library."""
    encoder_dir, tokenizer_dir = t5_folders(folder)
    if not tokenizer_dir.is_dir():
        raise EasyAnimateLoadError(f"{tokenizer_dir}: expected the T5 tokenizer folder, not found")
    hf_config, weights = read_t5_encoder(encoder_dir)
    config = comfy_t5_config(hf_config, str(encoder_dir / "config.json"))
    return build_clip(_t5_state_dict(weights), config, str(tokenizer_dir), device, str(encoder_dir),
                      reload=(load_t5_from_pipeline, (folder, device)), disable_dynamic=disable_dynamic)


def t5_config_from_shapes(shapes: dict, source: str) -> dict:
    """comfy.text_encoders.t5 config of a single T5 encoder file, read from its weight shapes (T5-XXL for the usual
    t5xxl files; other sizes of the T5 v1.1 layout work too). Heads come from the relative-attention bias."""
    embed = shapes.get("shared.weight") or shapes.get("encoder.embed_tokens.weight")
    bias = shapes.get("encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight")
    if embed is None or bias is None:
        raise EasyAnimateLoadError(f"{source}: expected a T5 encoder with 'shared.weight' (or "
                                   f"'encoder.embed_tokens.weight') and the block-0 relative_attention_bias, found "
                                   f"keys like {sorted(shapes)[:3]}")
    gated = "encoder.block.0.layer.1.DenseReluDense.wi_0.weight" in shapes
    wi = "encoder.block.0.layer.1.DenseReluDense." + ("wi_0" if gated else "wi") + ".weight"
    if wi not in shapes:
        raise EasyAnimateLoadError(f"{source}: expected T5 feed-forward weights ({wi}), not found")
    layers = 1 + max(int(k.split(".")[2]) for k in shapes if k.startswith("encoder.block."))
    heads = bias[1]
    inner = shapes["encoder.block.0.layer.0.SelfAttention.q.weight"][0]
    return comfy_t5_config({"model_type": "t5", "vocab_size": embed[0], "d_model": embed[1], "num_layers": layers,
                            "num_heads": heads, "d_kv": inner // heads, "d_ff": shapes[wi][0],
                            "relative_attention_num_buckets": bias[0],
                            "feed_forward_proj": "gated-gelu" if gated else "relu"}, source)


def load_t5_from_file(path: str, device: str, disable_dynamic=False):
    """CLIP from a single T5 encoder file (text_encoders/, e.g. t5xxl_fp16.safetensors; HF T5 key names): the size
    read from the weights and ComfyUI's bundled T5 tokenizer (same vocabulary as PixArt's)."""
    weights = CheckpointFile(path)
    if "encoder.block.0.layer.0.SelfAttention.q.weight" not in weights.shapes:
        raise EasyAnimateLoadError(f"{path}: expected a T5 encoder (keys 'encoder.block.N.layer...'), found keys like "
                                   f"{sorted(weights.keys())[:3]}")
    if "scaled_fp8" in weights.shapes:
        raise EasyAnimateLoadError(f"{path}: scaled-fp8 T5 files are not supported here; use an fp16/bf16/fp8 "
                                   f"t5xxl file")
    config = t5_config_from_shapes(weights.shapes, path)
    return build_clip(_t5_state_dict(weights), config, COMFY_T5_TOKENIZER, device, path,
                      reload=(load_t5_from_file, (path, device)), disable_dynamic=disable_dynamic)


def t5_sources() -> list[str]:
    return ([model_files.PIPELINE_PREFIX + p for p in model_files.pipeline_folders("text_encoder")]
            + [model_files.TEXT_ENCODER_PREFIX + f for f in model_files.file_list("text_encoders")])


class EasyAnimateLoadT5:
    DESCRIPTION = ("Loads the T5-XXL text encoder as a CLIP, from a pipeline folder (text_encoder/ + tokenizer/) or "
                   "a single text_encoders/ file, tokenizing exactly like EasyAnimate (120 tokens, mask).")
    CATEGORY = "EasyAnimate/loaders"
    FUNCTION = "load"
    RETURN_TYPES = ("CLIP",)
    RETURN_NAMES = ("clip",)
    OUTPUT_TOOLTIPS = ("The T5 text encoder (ComfyUI-managed, LoRA-patchable).",)

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "source": (t5_sources(), {"tooltip": "diffusers/<folder>: a pipeline folder's text_encoder/ and "
                                                 "tokenizer/; text_encoders/<file>: a T5-XXL encoder file."}),
            "device": (list(TEXT_ENCODER_DEVICES), {"default": "default", "tooltip":
                       "Where T5 runs: default = ComfyUI's text-encoder device; cpu saves GPU memory."}),
        }}

    def load(self, source, device):
        try:
            if source.startswith(model_files.PIPELINE_PREFIX):
                folder = model_files.pipeline_path(source[len(model_files.PIPELINE_PREFIX):])
                return (load_t5_from_pipeline(folder, device),)
            if source.startswith(model_files.TEXT_ENCODER_PREFIX):
                name = source[len(model_files.TEXT_ENCODER_PREFIX):]
                return (load_t5_from_file(model_files.full_path(name, "text_encoders"), device),)
        except (EasyAnimateLoadError, ValueError) as e:
            raise type(e)(f"EasyAnimateLoadT5: {e}") from None
        raise ValueError(f"EasyAnimateLoadT5: source must start with {model_files.PIPELINE_PREFIX!r} or "
                         f"{model_files.TEXT_ENCODER_PREFIX!r}, found {source!r}")


def encode(clip, text: str):
    """CONDITIONING [[embeds [1, 120, C], {"attention_mask": [1, 120]}]] for one prompt."""
    if clip is None:
        raise ValueError("EasyAnimateTextEncode: the clip input is None (is a CLIP connected? a LoRA loader without "
                         "its optional clip input outputs None)")
    if not isinstance(clip.tokenizer, EasyAnimateTokenizerBase):
        # a core T5 CLIP (e.g. CLIPLoader type pixart): right weights, but not the original tokenization
        log.warning("EasyAnimateTextEncode: this CLIP is not from EasyAnimateLoadT5/LoadPipeline; its own "
                    "tokenizer is used (no 120-token padding/mask), so results differ from the original")
        tokens = clip.tokenize(preprocess_prompt(text))
    else:
        tokens = clip.tokenize(text)
    out = clip.encode_from_tokens(tokens, return_dict=True)
    cond = out.pop("cond")
    extras = {k: v for k, v in out.items() if k == "attention_mask" or k == "hooks"}
    return [[cond, extras]]


class EasyAnimateTextEncode:
    DESCRIPTION = ("Encodes the prompt and negative prompt like EasyAnimate v1 (caption cleaning/lower-casing, "
                   f"{MAX_LENGTH} T5 tokens with padding mask).")
    CATEGORY = "EasyAnimate/conditioning"
    FUNCTION = "encode"
    RETURN_TYPES = ("CONDITIONING", "CONDITIONING")
    RETURN_NAMES = ("positive", "negative")
    OUTPUT_TOOLTIPS = ("Conditioning of the prompt (T5 embeddings + attention mask).",
                       "Conditioning of the negative prompt.")

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "clip": ("CLIP", {"tooltip": "The T5 encoder from EasyAnimateLoadT5 or EasyAnimateLoadPipeline."}),
            "prompt": ("STRING", {"default": DEFAULT_PROMPT, "multiline": True, "dynamicPrompts": True,
                                  "tooltip": "What the video shows (lower-cased and truncated to 120 tokens, as "
                                             "in the original)."}),
            "negative_prompt": ("STRING", {"default": DEFAULT_NEGATIVE_PROMPT, "multiline": True,
                                           "dynamicPrompts": True,
                                           "tooltip": "What to steer away from (used when cfg > 1)."}),
        }}

    def encode(self, clip, prompt, negative_prompt):
        return (encode(clip, prompt), encode(clip, negative_prompt))


NODE_CLASS_MAPPINGS = {"EasyAnimateLoadT5": EasyAnimateLoadT5, "EasyAnimateTextEncode": EasyAnimateTextEncode}
NODE_DISPLAY_NAME_MAPPINGS = {"EasyAnimateLoadT5": "EasyAnimate Load T5 Text Encoder",
                              "EasyAnimateTextEncode": "EasyAnimate Text Encode"}
