"""LoRA (docs/MODEL.md §B.6): kohya / PEFT layouts, merge/unmerge against the runtime LoRA math, T5 side, per-key deltas,
unmapped keys and errors, and the 286 DiT / 168 T5 target modules at the real sizes (meta device)."""
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from torch import nn
from transformers import T5Config, T5EncoderModel

from easyanimate_model.config import TransformerConfig
from easyanimate_model.errors import EasyAnimateLoadError
from easyanimate_model.lora import (load_lora, lora_deltas, merge_lora, t5_lora_modules, transformer_lora_modules,
                                    unmerge_lora)
from easyanimate_model.transformer import Transformer3DModel

FIXTURE = Path(__file__).parent / "fixtures" / "easyanimate_v1_tiny"
RANK, ALPHA = 4, 2.0


def tiny_config():
    cfg = json.loads((FIXTURE / "config.json").read_text())
    return TransformerConfig.from_diffusers({**cfg["transformer_2d_config"], **cfg["motion_module_kwargs"]})


@pytest.fixture
def transformer():
    torch.manual_seed(0)
    return Transformer3DModel(tiny_config()).eval()


@pytest.fixture
def t5():
    torch.manual_seed(0)
    config = T5Config(d_model=32, num_layers=2, num_heads=4, d_kv=8, d_ff=64, feed_forward_proj="gated-gelu",
                      vocab_size=100)
    return T5EncoderModel(config).eval()


def kohya_name(prefix, path, double=True):
    return prefix + ("__" if double else "_") + path.replace(".", "_")


def make_lora(model, paths, prefix, alpha=ALPHA, seed=1, dtype=torch.float32):
    """Random kohya LoRA tensors for `paths` of `model`: {kohya name: (down, up, alpha)}."""
    gen = torch.Generator().manual_seed(seed)
    out = {}
    for path in paths:
        weight = model.get_submodule(path).weight
        down = (torch.randn(RANK, weight.shape[1], generator=gen) * 0.1).to(dtype)
        up = (torch.randn(weight.shape[0], RANK, generator=gen) * 0.1).to(dtype)
        out[path] = (down, up, alpha)
    return out


def kohya_sd(modules, prefix, double=True):
    sd = {}
    for path, (down, up, alpha) in modules.items():
        name = kohya_name(prefix, path, double) if prefix == "lora_unet" else f"{prefix}_{path.replace('.', '_')}"
        sd[f"{name}.lora_down.weight"] = down
        sd[f"{name}.lora_up.weight"] = up
        if alpha is not None:
            sd[f"{name}.alpha"] = torch.tensor(alpha)
    return sd


def peft_sd(modules, prefix):
    sd = {}
    for path, (down, up, alpha) in modules.items():
        sd[f"{prefix}.{path}.lora_A.weight"] = down
        sd[f"{prefix}.{path}.lora_B.weight"] = up
        if alpha is not None:
            sd[f"{prefix}.{path}.alpha"] = torch.tensor(alpha)
    return sd


def inputs(seed=0):
    gen = torch.Generator().manual_seed(seed)
    return (torch.randn(1, 4, 2, 8, 8, generator=gen), torch.tensor([500]), torch.randn(1, 5, 32, generator=gen),
            torch.ones(1, 5))


def runtime_lora(model, modules, strength):
    """Hooks giving y = W x + s * (alpha / r) * up(down(x)) (the unmerged training-time LoRA)."""
    handles = []
    for path, (down, up, alpha) in modules.items():
        scale = strength * alpha / up.shape[1]

        def hook(module, args, output, down=down, up=up, scale=scale):
            return output + scale * (args[0] @ down.float().T @ up.float().T)
        handles.append(model.get_submodule(path).register_forward_hook(hook))
    return handles


DIT_TARGETS = transformer_lora_modules(2)[:26]  # the 10 * layers + 6 DiT modules of the reference network


def test_merge_equals_runtime_lora_and_unmerge_restores(transformer):
    paths = DIT_TARGETS + ["transformer_blocks.1.attn_temporal.temporal_transformer.proj_in"]
    modules = make_lora(transformer, paths, "lora_unet")
    sd = kohya_sd(modules, "lora_unet")
    original = {k: v.clone() for k, v in transformer.state_dict().items()}

    with torch.no_grad():
        plain = transformer(*inputs())
    handles = runtime_lora(transformer, modules, strength=0.8)
    with torch.no_grad():
        expected = transformer(*inputs())
    for h in handles:
        h.remove()

    report = merge_lora(sd, 0.8, transformer=transformer)
    assert len(report.applied) == 27 and not report.not_applied
    assert report.applied["lora_unet__transformer_blocks_1_attn1_to_out_0"] == \
        "transformer_blocks.1.attn1.to_out.0.weight"
    with torch.no_grad():
        merged = transformer(*inputs())
    assert (merged - expected).abs().max() < 1e-4 * expected.abs().max()
    assert (merged - plain).abs().max() > 100 * (merged - expected).abs().max()  # the LoRA matters

    unmerge_lora(sd, 0.8, transformer=transformer)
    worst = max((transformer.state_dict()[k] - v).abs().max().item() for k, v in original.items())
    assert worst < 1e-6


def test_kohya_single_underscore_peft_and_deltas_agree(transformer):
    modules = make_lora(transformer, DIT_TARGETS[:8], "lora_unet")
    w0 = {p: transformer.get_submodule(p).weight.detach().clone() for p in modules}
    results = []
    for sd in (kohya_sd(modules, "lora_unet"), kohya_sd(modules, "lora_unet", double=False),
               peft_sd(modules, "transformer")):
        merge_lora(sd, 1.3, transformer=transformer)
        results.append({p: transformer.get_submodule(p).weight.detach().clone() for p in modules})
        unmerge_lora(sd, 1.3, transformer=transformer)
    for path in modules:
        assert torch.allclose(results[0][path], results[1][path], atol=0, rtol=0)
        assert torch.allclose(results[0][path], results[2][path], atol=1e-7)

    deltas = lora_deltas(kohya_sd(modules, "lora_unet"), "transformer")
    assert set(deltas) == {f"{p}.weight" for p in modules} and not deltas.unmapped
    for path in modules:
        up, down, scale = deltas[f"{path}.weight"]
        assert scale == ALPHA / RANK
        assert torch.allclose(w0[path] + 1.3 * scale * up @ down, results[0][path], atol=1e-6)


def test_alpha_defaults_and_half_precision_weights(transformer):
    modules = make_lora(transformer, ["proj_out"], "lora_unet", alpha=None)
    down, up, _ = modules["proj_out"]
    # kohya without alpha: the reference's alpha = 1.0 -> scale 1/r; PEFT without alpha: scale 1
    assert lora_deltas(kohya_sd(modules, "lora_unet"))["proj_out.weight"][2] == 1.0 / RANK
    assert lora_deltas(peft_sd(modules, "transformer"))["proj_out.weight"][2] == 1.0

    transformer.half()
    w0 = transformer.proj_out.weight.detach().clone()
    merge_lora(kohya_sd(modules, "lora_unet"), 0.5, transformer=transformer)
    expected = (w0.float() + 0.5 / RANK * up @ down).half()  # delta in fp32, one rounding to the weight dtype
    assert transformer.proj_out.weight.dtype == torch.float16
    assert torch.equal(transformer.proj_out.weight, expected)


def test_t5_side_and_file_round_trip(tmp_path, transformer, t5):
    t5_paths = [p for p in t5_lora_modules(2) if not p.endswith(".wi")]
    t5_modules = make_lora(t5, t5_paths, "lora_te", seed=2)
    dit_modules = make_lora(transformer, DIT_TARGETS[:4], "lora_unet", seed=3)
    path = tmp_path / "portrait_lora.safetensors"
    sd = {**kohya_sd(dit_modules, "lora_unet"), **kohya_sd(t5_modules, "lora_te")}
    save_file({k: v.to(torch.bfloat16) for k, v in sd.items()}, path, metadata={"sshs_model_hash": "0"})

    ids = torch.tensor([[5, 6, 7, 1, 0]])
    mask = torch.tensor([[1, 1, 1, 1, 0]])
    with torch.no_grad():
        before = t5(input_ids=ids, attention_mask=mask).last_hidden_state
    w0 = {p: t5.get_submodule(p).weight.detach().clone() for p in t5_paths}
    report = merge_lora(path, 1.0, transformer=transformer, text_encoder=t5, text_encoder_strength=0.7)
    assert len(report.applied) == 4 + 14 and not report.not_applied
    assert report.applied["lora_te_encoder_block_1_layer_1_DenseReluDense_wi_0"] == \
        "encoder.block.1.layer.1.DenseReluDense.wi_0.weight"
    for p, (down, up, alpha) in t5_modules.items():
        want = w0[p] + 0.7 * alpha / RANK * up.to(torch.bfloat16).float() @ down.to(torch.bfloat16).float()
        assert torch.allclose(t5.get_submodule(p).weight, want, atol=1e-6)
    with torch.no_grad():
        after = t5(input_ids=ids, attention_mask=mask).last_hidden_state
    assert (after - before).abs().max() > 1e-3

    te_deltas = lora_deltas(load_lora(path), "text_encoder", t5)
    assert set(te_deltas) == {f"{p}.weight" for p in t5_paths} and not te_deltas.unmapped

    unmerge_lora(path, 1.0, transformer=transformer, text_encoder=t5, text_encoder_strength=0.7)
    assert max((t5.get_submodule(p).weight - w0[p]).abs().max().item() for p in t5_paths) < 1e-6


def test_unmapped_and_not_applied_are_reported(transformer):
    modules = make_lora(transformer, DIT_TARGETS[1:3], "lora_unet")
    sd = kohya_sd(modules, "lora_unet")
    sd["lora_unet_input_blocks_1_1_proj_in.lora_down.weight"] = torch.zeros(RANK, 8)   # an SD1.5 module
    sd["lora_unet_input_blocks_1_1_proj_in.lora_up.weight"] = torch.zeros(8, RANK)
    sd["lora_te1_text_model_encoder_layers_0_mlp_fc1.lora_down.weight"] = torch.zeros(RANK, 8)  # SDXL text encoder
    sd["lora_te1_text_model_encoder_layers_0_mlp_fc1.lora_up.weight"] = torch.zeros(8, RANK)
    sd["lora_unet__transformer_blocks_0_ff_net_2.lora_down.weight"] = torch.zeros(RANK, 256)  # no up
    sd["lora_unet__proj_out.lora_down.weight"] = torch.zeros(RANK, 7)  # wrong width
    sd["lora_unet__proj_out.lora_up.weight"] = torch.zeros(32, RANK)
    sd["lora_te_encoder_block_0_layer_0_SelfAttention_q.lora_down.weight"] = torch.zeros(RANK, 32)
    sd["lora_te_encoder_block_0_layer_0_SelfAttention_q.lora_up.weight"] = torch.zeros(32, RANK)

    report = merge_lora(sd, 1.0, transformer=transformer)
    assert set(report.applied) == {kohya_name("lora_unet", p) for p in modules}
    assert report.not_applied["lora_unet_input_blocks_1_1_proj_in"] == "names no module of the transformer"
    assert "neither the transformer" in report.not_applied["lora_te1_text_model_encoder_layers_0_mlp_fc1"]
    assert "no up weight" in report.not_applied["lora_unet__transformer_blocks_0_ff_net_2"]
    assert "shape mismatch" in report.not_applied["lora_unet__proj_out"]
    assert report.not_applied["lora_te_encoder_block_0_layer_0_SelfAttention_q"] == "no text encoder given"
    assert sorted(report.missing_modules) == ["lora_te1_text_model_encoder_layers_0_mlp_fc1",
                                              "lora_unet_input_blocks_1_1_proj_in"]

    deltas = lora_deltas(sd, "transformer")
    assert "lora_unet_input_blocks_1_1_proj_in" in deltas.unmapped
    assert "proj_out.weight" in deltas  # without the model the width cannot be checked
    assert "proj_out.weight" not in lora_deltas(sd, "transformer", transformer)


def test_errors_for_files_that_are_not_usable_loras(tmp_path, transformer):
    sdxl = {"lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q.lora_down.weight": torch.zeros(RANK, 8),
            "lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q.lora_up.weight": torch.zeros(8, RANK),
            "lora_unet_down_blocks_1_attentions_0_proj_in.lora_down.weight": torch.zeros(RANK, 8),
            "lora_unet_down_blocks_1_attentions_0_proj_in.lora_up.weight": torch.zeros(8, RANK)}
    path = tmp_path / "sdxl_style.safetensors"
    save_file(sdxl, path)
    with pytest.raises(EasyAnimateLoadError, match=r"sdxl_style\.safetensors: expected a LoRA for the "
                                                   r"EasyAnimate/PixArt transformer.*found 2 LoRA modules of which "
                                                   r"none"):
        merge_lora(path, 1.0, transformer=transformer)

    model_file = tmp_path / "sd15.safetensors"
    save_file({"model.diffusion_model.input_blocks.0.0.weight": torch.zeros(2, 2)}, model_file)
    with pytest.raises(EasyAnimateLoadError, match=r"sd15\.safetensors: expected a LoRA .*found a Stable Diffusion"):
        merge_lora(model_file, 1.0, transformer=transformer)
    with pytest.raises(EasyAnimateLoadError, match=r"expected a LoRA .*found 1 tensors such as \['proj_out.weight'\]"):
        merge_lora({"proj_out.weight": torch.zeros(2, 2)}, 1.0, transformer=transformer)


def test_conv_1x1_lora():
    conv = nn.Sequential()
    conv.add_module("proj_out", nn.Conv2d(6, 3, 1))
    down, up = torch.randn(2, 6, 1, 1), torch.randn(3, 2, 1, 1)
    w0 = conv.proj_out.weight.detach().clone()
    sd = {"lora_unet__proj_out.lora_down.weight": down, "lora_unet__proj_out.lora_up.weight": up,
          "lora_unet__proj_out.alpha": torch.tensor(1.0)}
    report = merge_lora(sd, 1.0, transformer=conv)
    assert report.applied == {"lora_unet__proj_out": "proj_out.weight"}
    want = w0 + 0.5 * (up.flatten(1) @ down.flatten(1)).view(3, 6, 1, 1)
    assert torch.allclose(conv.proj_out.weight, want, atol=1e-6)


def test_release_target_counts_at_real_size():
    model = Transformer3DModel(TransformerConfig(), device="meta")
    linears = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    dit = [n for n in linears if "attn_temporal" not in n]
    table = transformer_lora_modules(28)
    assert len(dit) == 286 and table[:286] == sorted(dit, key=table.index) and set(table[:286]) == set(dit)
    assert set(table) == set(linears)

    with torch.device("meta"):
        t5 = T5EncoderModel(T5Config(d_model=4096, num_layers=24, num_heads=64, d_kv=64, d_ff=10240,
                                     feed_forward_proj="gated-gelu", vocab_size=32128))
    t5_linears = [n for n, m in t5.named_modules() if isinstance(m, nn.Linear)
                  and (".SelfAttention." in n or ".DenseReluDense." in n)]
    assert len(t5_linears) == 168 and set(t5_linears) <= set(t5_lora_modules(24))

    # the release LoRA's names resolve completely against the tables, without any model
    names = [f"lora_unet__{p.replace('.', '_')}" for p in dit] + [f"lora_te_{p.replace('.', '_')}" for p in t5_linears]
    sd = {}
    for n in names:
        sd[f"{n}.lora_down.weight"] = torch.empty(1, 1, device="meta")
        sd[f"{n}.lora_up.weight"] = torch.empty(1, 1, device="meta")
        sd[f"{n}.alpha"] = torch.tensor(64.0)
    assert len(sd) == 1362
    dit_deltas, te_deltas = lora_deltas(sd, "transformer"), lora_deltas(sd, "text_encoder")
    assert (len(dit_deltas), len(te_deltas)) == (286, 168) and not dit_deltas.unmapped and not te_deltas.unmapped
