"""Transformer3DModel against the original EasyAnimate v1 forward (tiny fixture), diffusers' PixArt, §B of
docs/MODEL.md."""
import dataclasses
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from easyanimate_model.config import MotionModuleConfig, TransformerConfig
from easyanimate_model.motion_module import sinusoidal_temporal_pe
from easyanimate_model.transformer import Transformer3DModel

FIXTURE = Path(__file__).parent / "fixtures" / "easyanimate_v1_tiny"


def fixture_config():
    cfg = json.loads((FIXTURE / "config.json").read_text())
    return TransformerConfig.from_diffusers({**cfg["transformer_2d_config"], **cfg["motion_module_kwargs"]})


@pytest.fixture(scope="module")
def reference():
    return load_file(FIXTURE / "forward_reference.safetensors")


@pytest.fixture(scope="module")
def model3d():
    model = Transformer3DModel(fixture_config()).eval()
    sd = {**load_file(FIXTURE / "base_dit.safetensors"), **load_file(FIXTURE / "motion_module.safetensors")}
    model.load_state_dict(sd, strict=True)
    return model


def run(model, ref, **kwargs):
    with torch.no_grad():
        return model(ref["inputs.latents"], ref["inputs.timestep"], ref["inputs.encoder_hidden_states"],
                     ref["inputs.encoder_attention_mask"], **kwargs)


def assert_close_rel(out, ref, rel=1e-4):
    err = (out.float() - ref.float()).abs().max().item()
    assert err <= rel * ref.abs().max().item(), f"max error {err} vs max|ref| {ref.abs().max().item()}"


def test_fixture_full_model_matches_reference(model3d, reference):
    assert model3d.config.motion_module == MotionModuleConfig()
    out = run(model3d, reference)
    assert out.shape == reference["outputs.full"].shape
    assert_close_rel(out, reference["outputs.full"])  # measured ~2e-6 absolute (max|ref| ~4.2)


def test_fixture_2d_model_matches_per_frame_reference(reference):
    model = Transformer3DModel(dataclasses.replace(fixture_config(), motion_module=None)).eval()
    model.load_state_dict(load_file(FIXTURE / "base_dit.safetensors"), strict=True)
    assert not any(Transformer3DModel.is_motion_key(k) for k in model.state_dict())
    assert_close_rel(run(model, reference), reference["outputs.base2d_per_frame"])


def test_temporal_pe_formula_matches_release_buffers(model3d):
    stored = load_file(FIXTURE / "motion_module.safetensors")
    pe_keys = [k for k in stored if k.endswith("pos_encoder.pe")]
    assert len(pe_keys) == 4
    expected = sinusoidal_temporal_pe(4096, 64)
    for k in pe_keys:
        # fp32 angles lose half an ulp of the position (2.4e-4 near 4096) and sin implementations (libm / SIMD)
        # round them differently: tight over the trained 80 frames, within that bound over the whole table
        torch.testing.assert_close(stored[k][:, :80], expected[:, :80], rtol=0, atol=1e-5)
        torch.testing.assert_close(stored[k], expected, rtol=0, atol=5e-4)
    assert set(model3d.temporal_state_dict()) == set(stored)


def tiny_2d_config(**kwargs):
    return TransformerConfig(num_layers=2, num_attention_heads=4, attention_head_dim=16, caption_channels=32,
                             cross_attention_dim=64, motion_module=None, **kwargs)


@pytest.fixture(scope="module")
def diffusers_pixart():
    from diffusers import PixArtTransformer2DModel  # imported here: slow, and only this test needs it

    torch.manual_seed(0)
    model = PixArtTransformer2DModel(num_attention_heads=4, attention_head_dim=16, num_layers=2,
                                     caption_channels=32, cross_attention_dim=64, sample_size=64, in_channels=4,
                                     out_channels=8).eval()
    with torch.no_grad():  # perturb every weight so that each one matters
        for param in model.parameters():
            param.add_(torch.randn_like(param) * 0.05)
    return model


@pytest.mark.parametrize("frames,height,width", [(3, 8, 12), (1, 64, 64)])  # on-the-fly and base-grid pos embed
def test_2d_path_matches_diffusers_pixart_per_frame(diffusers_pixart, frames, height, width):
    model = Transformer3DModel(tiny_2d_config()).eval()
    model.load_state_dict(diffusers_pixart.state_dict(), strict=True)
    b = 2
    x = torch.randn(b, 4, frames, height, width)
    t = torch.tensor([999, 421])
    text = torch.randn(b, 10, 32)
    mask = torch.ones(b, 10)
    mask[1, 6:] = 0
    with torch.no_grad():
        out = model(x, t, text, mask)
        ref = diffusers_pixart(x.transpose(1, 2).reshape(b * frames, 4, height, width),
                               encoder_hidden_states=text.repeat_interleave(frames, 0),
                               timestep=t.repeat_interleave(frames), encoder_attention_mask=mask.repeat_interleave(frames, 0),
                               added_cond_kwargs={"resolution": None, "aspect_ratio": None}).sample
    assert_close_rel(out, ref.view(b, frames, 8, height, width).transpose(1, 2), rel=1e-5)


def test_real_config_key_layout_and_counts_on_meta():
    model = Transformer3DModel(TransformerConfig(), device="meta")
    sd = model.state_dict()
    motion = model.temporal_state_dict()
    assert (len(sd), len(motion), len(sd) - len(motion)) == (1387, 784, 603)
    assert sum(p.numel() for p in model.parameters()) == 1_429_029_536
    assert sum(v.numel() for k, v in sd.items() if k.endswith("pos_encoder.pe")) == 264_241_152
    assert "pos_embed.pos_embed" not in sd and model.pos_embed.pos_embed.shape == (1, 1024, 1152)
    mm = "transformer_blocks.27.attn_temporal.temporal_transformer."
    shapes = {
        "pos_embed.proj.weight": (1152, 4, 2, 2), "scale_shift_table": (2, 1152), "proj_out.weight": (32, 1152),
        "adaln_single.emb.timestep_embedder.linear_1.weight": (1152, 256), "adaln_single.linear.weight": (6912, 1152),
        "caption_projection.linear_1.weight": (1152, 4096), "transformer_blocks.0.scale_shift_table": (6, 1152),
        "transformer_blocks.5.attn2.to_k.weight": (1152, 1152), "transformer_blocks.5.ff.net.0.proj.weight": (4608, 1152),
        "transformer_blocks.5.ff.net.2.weight": (1152, 4608), mm + "norm.weight": (1152,),
        mm + "transformer_blocks.0.attention_blocks.1.to_q.weight": (1152, 1152),
        mm + "transformer_blocks.0.attention_blocks.0.to_out.0.bias": (1152,),
        mm + "transformer_blocks.0.attention_blocks.0.pos_encoder.pe": (1, 4096, 1152),
        mm + "transformer_blocks.0.ff.net.0.proj.weight": (9216, 1152),
        mm + "transformer_blocks.0.ff.net.2.weight": (1152, 4608), mm + "proj_out.weight": (1152, 1152),
    }
    assert {k: tuple(sd[k].shape) for k in shapes} == shapes
    assert mm + "transformer_blocks.0.attention_blocks.0.to_q.bias" not in sd
    model2d = Transformer3DModel(TransformerConfig(motion_module=None), device="meta")
    assert len(model2d.state_dict()) == 603
    assert sum(p.numel() for p in model2d.parameters()) == 610_856_096


def test_meta_build_with_assign_load_and_missing_pe(reference):
    """Loader path: build on meta, assign the file tensors, recompute what the files do not carry."""
    model = Transformer3DModel(fixture_config(), device="meta")
    sd = {**load_file(FIXTURE / "base_dit.safetensors"), **load_file(FIXTURE / "motion_module.safetensors")}
    sd = {k: v for k, v in sd.items() if not k.endswith("pos_encoder.pe")}
    missing = model.load_state_dict(sd, strict=False, assign=True).missing_keys
    assert len(missing) == 4 and all(k.endswith("pos_encoder.pe") for k in missing)
    model.init_buffers("cpu")
    assert_close_rel(run(model.eval(), reference), reference["outputs.full"])


def test_forward_frames_equals_forward_on_non_square_latents(model3d):
    b, f, h, w = 2, 3, 8, 16
    x = torch.randn(b, 4, f, h, w)
    text = torch.randn(b, 7, 32)
    t = torch.tensor([10.5, 700.0])  # float timesteps (Euler samplers)
    with torch.no_grad():
        out = model3d(x, t, text)
        frames = model3d.forward_frames(x.transpose(1, 2).reshape(b * f, 4, h, w), t, text, num_frames=f)
        per_row_t = model3d.forward_frames(x.transpose(1, 2).reshape(b * f, 4, h, w), t.repeat_interleave(f), text,
                                           num_frames=f)
    assert out.shape == (b, 8, f, h, w)
    expected = out.transpose(1, 2).reshape(b * f, 8, h, w)
    torch.testing.assert_close(frames, expected, rtol=0, atol=1e-5)
    torch.testing.assert_close(per_row_t, expected, rtol=0, atol=1e-5)


def test_odd_patch_grid_and_bad_inputs_raise_clear_errors(model3d):
    text = torch.randn(1, 5, 32)
    with pytest.raises(ValueError, match=r"multiples of 32 pixels \(latent multiples of 4\); got latent 6x8"):
        model3d(torch.randn(1, 4, 2, 6, 8), torch.tensor([1]), text)
    with pytest.raises(ValueError, match="encoder_hidden_states must be"):
        model3d(torch.randn(2, 4, 2, 8, 8), torch.tensor([1, 2]), text)
    with pytest.raises(ValueError, match="not a multiple of num_frames"):
        model3d.forward_frames(torch.randn(5, 4, 8, 8), torch.tensor([1]), text, num_frames=2)


def test_bf16_forward_close_to_fp32(model3d, reference):
    model = Transformer3DModel(fixture_config(), dtype=torch.bfloat16).eval()
    model.load_state_dict(model3d.state_dict())
    with torch.no_grad():
        out = model(reference["inputs.latents"].bfloat16(), reference["inputs.timestep"],
                    reference["inputs.encoder_hidden_states"].bfloat16(), reference["inputs.encoder_attention_mask"])
    assert out.dtype == torch.bfloat16
    assert_close_rel(out, reference["outputs.full"], rel=5e-2)


def test_injected_operations_and_attention_are_used(model3d, reference):
    built = []

    class Linear(torch.nn.Linear):
        def __init__(self, *args, dtype=None, device=None, **kwargs):
            built.append((dtype, device))
            super().__init__(*args, dtype=dtype, device=device, **kwargs)

    class Ops:
        LayerNorm, GroupNorm, Conv2d = torch.nn.LayerNorm, torch.nn.GroupNorm, torch.nn.Conv2d

    Ops.Linear = Linear
    calls = []

    def attention(q, k, v, heads, mask=None):
        calls.append(heads)
        from easyanimate_model.ops import sdpa_attention
        return sdpa_attention(q, k, v, heads, mask=mask)

    model = Transformer3DModel(fixture_config(), operations=Ops, attention=attention, dtype=torch.float32,
                               device="cpu").eval()
    model.load_state_dict(model3d.state_dict())
    assert len(built) == sum(isinstance(m, torch.nn.Linear) for m in model.modules())
    assert set(built) == {(torch.float32, "cpu")}
    assert_close_rel(run(model, reference), reference["outputs.full"])
    assert calls == [4, 8, 8, 4] * 2  # per block: attn1, two motion attentions, attn2


def test_gradient_checkpointing_gives_same_gradients(model3d):
    x = torch.randn(1, 4, 2, 4, 4)
    text = torch.randn(1, 3, 32)
    grads = []
    for checkpointing in (False, True):
        model = Transformer3DModel(fixture_config()).train()
        model.load_state_dict(model3d.state_dict())
        model.gradient_checkpointing = checkpointing
        model(x, torch.tensor([500]), text).square().mean().backward()
        grads.append(torch.cat([p.grad.flatten() for p in model.parameters()]))
    torch.testing.assert_close(grads[1], grads[0])


def test_feed_forward_chunking_is_exact(model3d, reference, monkeypatch):
    import easyanimate_model.ops as ops

    monkeypatch.setattr(ops, "FF_CHUNK_TOKENS", 37)  # uneven split of the 1152 tokens per video
    assert_close_rel(run(model3d, reference), reference["outputs.full"])
