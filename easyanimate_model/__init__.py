"""EasyAnimate v1 as a plain PyTorch library (no ComfyUI imports).

    import easyanimate_model as ea
    model = ea.load_transformer("PixArt-XL-2-512x512", motion_module="easyanimate_v1_mm.safetensors")
    final = ea.sample(model, scheduler="DPM++", steps=30, guidance_scale=6.0, prompt_embeds=..., ...)

Names are resolved lazily so that `import easyanimate_model` stays cheap (diffusers/transformers load on use).
"""
from importlib import import_module

_EXPORTS = {
    "TransformerConfig": "config",
    "MotionModuleConfig": "config",
    "Transformer3DModel": "transformer",
    "TorchOps": "ops",
    "sdpa_attention": "ops",
    "load_transformer": "loading",
    "load_state_dict_file": "files",
    "read_transformer": "loading",
    "read_config": "loading",
    "infer_config": "loading",
    "EasyAnimateLoadError": "errors",
    "merge_lora": "lora",
    "unmerge_lora": "lora",
    "lora_deltas": "lora",
    "load_lora": "lora",
    "LoraReport": "lora",
    "load_text_encoder": "text",
    "load_tokenizer": "text",
    "T5SentencePieceTokenizer": "text",
    "encode_prompt": "text",
    "preprocess_prompt": "text",
    "DEFAULT_NEGATIVE_PROMPT": "text",
    "DEFAULT_PROMPT": "text",
    "MAX_LENGTH": "text",
    "PromptSchedule": "prompt_schedule",
    "parse_schedule": "prompt_schedule",
    "ScheduleError": "prompt_schedule",
    "sample": "sampling",
    "make_scheduler": "sampling",
    "SCHEDULERS": "sampling",
    "load_vae": "vae",
    "decode_latents": "vae",
    "encode_frames": "vae",
    "SCALING_FACTOR": "vae",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name):
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'easyanimate_model' has no attribute {name!r}")
    value = getattr(import_module(f".{module}", __name__), name)
    globals()[name] = value
    return value


def __dir__():
    return __all__
