"""The T5 text encoder as a native comfy.sd.CLIP with the original EasyAnimate tokenization (docs/MODEL.md §C.3).

ComfyUI's own T5 (comfy.text_encoders.t5) runs the weights, so device/offload, dtype and LoRA patches are ComfyUI's.
What differs from core's PixArt T5 is the tokenizer side: our tokenizer pre-processes the prompt like the pipeline
(`preprocess_prompt`: lower-casing / caption cleaning), tokenizes the whole text with the T5 tokenizer, truncates
and pads to 120 tokens (EOS kept), and the encoder honours the padding mask, which is also returned with the
conditioning ("attention_mask") for the transformer's cross-attention. Core CLIPTextEncode on this CLIP therefore
gives the same conditioning as EasyAnimateTextEncode.
"""
from __future__ import annotations

import inspect
import os

import torch

import comfy.sd
import comfy.sd1_clip
import comfy.supported_models_base
import comfy.text_encoders.t5

from ..easyanimate_model.text import load_tokenizer, tokenize

CLIP_NAME = "t5xxl"  # attribute name of the encoder inside the CLIP model (LoRA patch keys start with it)
COMFY_T5_TOKENIZER = os.path.join(os.path.dirname(comfy.text_encoders.t5.__file__), "t5_tokenizer")
TEXT_ENCODER_DEVICES = ("default", "cpu")
# transformers' T5 activation names -> comfy.text_encoders.t5 names
_ACTIVATIONS = {"gelu_new": "gelu_pytorch_tanh", "gelu_pytorch_tanh": "gelu_pytorch_tanh", "relu": "relu"}


def comfy_t5_config(hf_config: dict, source: str) -> dict:
    """comfy.text_encoders.t5.T5 config from a transformers T5 config.json."""
    if hf_config.get("model_type") != "t5":
        raise ValueError(f"{source}: expected a T5 config (model_type 't5'), found {hf_config.get('model_type')!r}")
    ff = hf_config.get("feed_forward_proj", "relu")
    gated = hf_config.get("is_gated_act", ff.startswith("gated-"))
    act = hf_config.get("dense_act_fn") or ("gelu_new" if ff == "gated-gelu" else ff.split("-")[-1])
    if act not in _ACTIVATIONS:
        raise ValueError(f"{source}: T5 activation {act!r} is not supported (expected one of {list(_ACTIVATIONS)})")
    for key, want in (("relative_attention_num_buckets", 32), ("relative_attention_max_distance", 128)):
        if hf_config.get(key, want) != want:
            raise ValueError(f"{source}: {key} must be {want} (T5 v1.1), found {hf_config[key]}")
    return {"d_ff": hf_config["d_ff"], "d_kv": hf_config["d_kv"], "d_model": hf_config["d_model"],
            "num_heads": hf_config["num_heads"], "num_layers": hf_config["num_layers"],
            "vocab_size": hf_config["vocab_size"], "dense_act_fn": _ACTIVATIONS[act], "is_gated_act": gated,
            "model_type": "t5"}


class EasyAnimateTokenizerBase:
    """CLIP tokenizer: {CLIP_NAME: [[(token id, 1.0) x 120]]}, tokenized like EasyAnimatePipeline."""

    hf_tokenizer = None  # set by `tokenizer_class`

    def __init__(self, embedding_directory=None, tokenizer_data={}):
        pass

    def tokenize_with_weights(self, text: str, return_word_ids=False, **kwargs):
        ids = tokenize(self.hf_tokenizer, text)["input_ids"][0]
        if return_word_ids:
            return {CLIP_NAME: [[(t, 1.0, 0) for t in ids]]}
        return {CLIP_NAME: [[(t, 1.0) for t in ids]]}

    def untokenize(self, token_weight_pair):
        return [(p, self.hf_tokenizer.convert_ids_to_tokens([p[0]])[0]) for p in token_weight_pair]

    def state_dict(self):
        return {}


def tokenizer_class(tokenizer_dir: str):
    """A tokenizer class (what comfy.sd.CLIP instantiates) bound to the T5 tokenizer in `tokenizer_dir`.

    A folder with spiece.model (the PixArt release) gets the library's slow SentencePiece T5Tokenizer, as the
    original; ComfyUI's bundled tokenizer folder (tokenizer.json) gets the fast one. Both give the same ids.
    """
    if os.path.isfile(os.path.join(tokenizer_dir, "spiece.model")):
        hf = load_tokenizer(tokenizer_dir)
    else:
        import transformers

        hf = transformers.T5TokenizerFast.from_pretrained(tokenizer_dir)
    return type("EasyAnimateT5Tokenizer", (EasyAnimateTokenizerBase,), {"hf_tokenizer": hf})


def encoder_class(t5_config: dict):
    """An SD1ClipModel-style class (what comfy.sd.CLIP instantiates) running ComfyUI's T5 with `t5_config`."""

    class EasyAnimateT5Encoder(comfy.sd1_clip.SDClipModel):
        def __init__(self, device="cpu", dtype=None, model_options={}):
            super().__init__(device=device, layer="last", layer_idx=None, textmodel_json_config=dict(t5_config),
                             dtype=dtype, special_tokens={"end": 1, "pad": 0},
                             model_class=comfy.text_encoders.t5.T5, enable_attention_masks=True,
                             return_attention_masks=True, model_options=model_options)

    class EasyAnimateT5(comfy.sd1_clip.SD1ClipModel):
        def __init__(self, device="cpu", dtype=None, model_options={}):
            super().__init__(device=device, dtype=dtype, model_options=model_options, name=CLIP_NAME,
                             clip_model=EasyAnimateT5Encoder)

    return EasyAnimateT5


def clip_patcher(loader, *args, disable_dynamic=False):
    """`cached_patcher_init` factory of our CLIPs: the patcher of `loader(*args)` (like core's
    load_clip_model_patcher)."""
    return loader(*args, disable_dynamic=disable_dynamic).patcher


def build_clip(state_dict: dict, t5_config: dict, tokenizer_dir: str, device: str, source: str, reload=None,
               disable_dynamic=False):
    """comfy.sd.CLIP holding the T5 encoder weights `state_dict` (transformers T5EncoderModel keys).

    Core builds the patcher (CoreModelPatcher where it exists) and loads the weights its way (assigned under
    DynamicVRAM). `reload` = (loader, args): how to load this CLIP again, set as the patcher's `cached_patcher_init`
    so core's device-selection / multi-GPU nodes accept it.
    """
    if device not in TEXT_ENCODER_DEVICES:
        raise ValueError(f"text_encoder_device: expected one of {TEXT_ENCODER_DEVICES}, found {device!r}")
    target = comfy.supported_models_base.ClipTarget(tokenizer_class(tokenizer_dir), encoder_class(t5_config))
    model_options = {}
    if device == "cpu":
        model_options["load_device"] = model_options["offload_device"] = torch.device("cpu")
    params = sum(t.numel() for t in state_dict.values())
    kwargs = {"disable_dynamic": True} if disable_dynamic and "disable_dynamic" in inspect.signature(
        comfy.sd.CLIP.__init__).parameters else {}
    clip = comfy.sd.CLIP(target, parameters=params, model_options=model_options, **kwargs)
    missing, unexpected = clip.load_sd(state_dict)
    missing = [k for k in missing if k != "encoder.embed_tokens.weight"]
    unexpected = [k for k in unexpected if k not in ("encoder.embed_tokens.weight", "decoder.embed_tokens.weight")
                  and not k.startswith(("decoder.", "lm_head."))]
    if missing or unexpected:
        raise ValueError(f"{source}: not a T5 encoder with the config's shape: missing {missing[:5]}, "
                         f"unexpected {unexpected[:5]}")
    if reload is not None:
        clip.patcher.cached_patcher_init = (clip_patcher, (reload[0], *reload[1]))
    return clip
