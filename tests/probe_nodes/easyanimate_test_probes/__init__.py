"""Test-only ComfyUI nodes (loaded by tests/test_sampling_path.py through an extra model paths yaml's custom_nodes):
probes that count how often core's sampling hooks run, and a conditioning saver so the library can be run on the
server's exact T5 output. Not part of the pack."""
import collections
import math
import os

from safetensors.torch import save_file

import comfy.patcher_extension
import folder_paths
from comfy.ldm.modules import attention as comfy_attention

COUNTS = collections.Counter()  # a test helper's own state; the pack keeps none
PROBES = ("cfg", "post_cfg", "apply_model", "diffusion_model", "attention_override", "attn1", "attn2", "dit")


def _count(name):
    COUNTS[name] += 1


def install(model, probes):
    if "dynamo_reset" in probes:  # compile afresh: dynamo reuses its graphs for any model instance of one class
        import torch._dynamo

        torch._dynamo.reset()
    m = model.clone()
    if "cfg" in probes:
        def cfg(args):  # core's formula on the eps-like "cond"/"uncond": the same result
            _count("cfg")
            return args["uncond"] + (args["cond"] - args["uncond"]) * args["cond_scale"]
        m.set_model_sampler_cfg_function(cfg)
    if "post_cfg" in probes:
        def post_cfg(args):
            _count("post_cfg")
            return args["denoised"]
        m.set_model_sampler_post_cfg_function(post_cfg)
    for name, kind in (("apply_model", comfy.patcher_extension.WrappersMP.APPLY_MODEL),
                       ("diffusion_model", comfy.patcher_extension.WrappersMP.DIFFUSION_MODEL)):
        if name in probes:
            def wrapper(executor, *args, _name=name, **kwargs):
                _count(_name)
                return executor(*args, **kwargs)
            m.add_wrapper_with_key(kind, "easyanimate_test_probe", wrapper)
    if "attention_override" in probes:
        def override(func, *args, **kwargs):
            _count("attention_override")
            return func(*args, **kwargs)
        m.model_options.setdefault("transformer_options", {})["optimized_attention_override"] = override
    blocks = len(m.get_model_object("diffusion_model").transformer_blocks)
    for i in range(blocks):
        for name in ("attn1", "attn2"):
            if name in probes:
                def replace(q, k, v, extra, _name=name):
                    _count(_name)
                    return comfy_attention.optimized_attention(q, k, v, extra["n_heads"], mask=extra["attention_mask"])
                m.set_model_patch_replace(replace, name, "double_block", i)
        if "dit" in probes:
            def block(args, extra):
                _count("dit")
                return extra["original_block"](args)
            m.set_model_patch_replace(block, "dit", "double_block", i)
    return m


class EAProbeHooks:
    CATEGORY = "EasyAnimate/test"
    FUNCTION = "apply"
    RETURN_TYPES = ("MODEL",)

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"model": ("MODEL",), "probes": ("STRING", {"default": ",".join(PROBES)})}}

    def apply(self, model, probes):
        return (install(model, {p.strip() for p in probes.split(",") if p.strip()}),)


class EAProbeCounts:
    """Reports the counts since the last report (runs after `latent`, so after the sampler), then resets them."""
    CATEGORY = "EasyAnimate/test"
    FUNCTION = "report"
    RETURN_TYPES = ()
    OUTPUT_NODE = True

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"latent": ("LATENT",)}}

    @classmethod
    def IS_CHANGED(cls, **kwargs):
        return math.nan

    def report(self, latent):
        counts = dict(COUNTS)
        try:
            import torch._dynamo.utils
            counts["dynamo_graphs"] = int(torch._dynamo.utils.counters["stats"]["unique_graphs"])
        except Exception:  # noqa: BLE001 (a probe: report what is there)
            pass
        COUNTS.clear()
        return {"ui": {"counts": [counts]}}


class EAProbeSaveConditioning:
    """Saves embeddings and attention mask of each CONDITIONING entry to <output>/probe/<name>.safetensors."""
    CATEGORY = "EasyAnimate/test"
    FUNCTION = "save"
    RETURN_TYPES = ()
    OUTPUT_NODE = True

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"conditioning": ("CONDITIONING",), "name": ("STRING", {"default": "cond"})}}

    def save(self, conditioning, name):
        tensors = {}
        for i, (embeds, extras) in enumerate(conditioning):
            tensors[f"{i}.embeds"] = embeds.float().contiguous()
            if extras.get("attention_mask") is not None:
                tensors[f"{i}.mask"] = extras["attention_mask"].contiguous()
        folder = os.path.join(folder_paths.get_output_directory(), "probe")
        os.makedirs(folder, exist_ok=True)
        save_file(tensors, os.path.join(folder, f"{name}.safetensors"))
        return {"ui": {"saved": [name]}}


NODE_CLASS_MAPPINGS = {"EAProbeHooks": EAProbeHooks, "EAProbeCounts": EAProbeCounts,
                       "EAProbeSaveConditioning": EAProbeSaveConditioning}
