"""VanillaGrid motion module against a literal einops transcription of docs/MODEL.md §A.5."""
import math

import pytest
import torch
import torch.nn.functional as F
from einops import rearrange

from easyanimate_model.config import MotionModuleConfig
from easyanimate_model.motion_module import VanillaTemporalModule


def reference_motion_module(sd, x, heads, eps_gn=1e-6, eps_ln=1e-5):
    """Spec A.5, written op by op with the reference's einops patterns (baddbmm-style softmax attention)."""
    p = "temporal_transformer."
    b, c, f, h, w = x.shape
    z = rearrange(x, "b c f h w -> (b f) c h w")
    residual = z
    z = F.group_norm(z, 32, sd[p + "norm.weight"], sd[p + "norm.bias"], eps_gn)
    z = z.permute(0, 2, 3, 1).reshape(b * f, h * w, c)
    z = F.linear(z, sd[p + "proj_in.weight"], sd[p + "proj_in.bias"])
    blk = p + "transformer_blocks.0."
    for a in (0, 1):
        u = F.layer_norm(z, (c,), sd[f"{blk}norms.{a}.weight"], sd[f"{blk}norms.{a}.bias"], eps_ln)
        ap = f"{blk}attention_blocks.{a}."
        u = rearrange(u, "(b f) d c -> (b d) f c", f=f)
        u = u + sd[ap + "pos_encoder.pe"][:, :f]
        u = rearrange(u, "(b d) f c -> b f d c", b=b)
        u = rearrange(u, "b f (h w) c -> b f h w c", h=h, w=w)
        u = rearrange(u, "b f (h n) (w m) c -> (b h w) (f n m) c", n=2, m=2)
        q, k, v = (F.linear(u, sd[ap + f"to_{n}.weight"]) for n in "qkv")
        q, k, v = (rearrange(t, "s l (hd d) -> (s hd) l d", hd=heads) for t in (q, k, v))
        scores = torch.bmm(q, k.transpose(1, 2)) / math.sqrt(c // heads)
        o = torch.bmm(scores.softmax(dim=-1), v)
        o = rearrange(o, "(s hd) l d -> s l (hd d)", hd=heads)
        o = F.linear(o, sd[ap + "to_out.0.weight"], sd[ap + "to_out.0.bias"])
        o = rearrange(o, "(b d) f c -> (b f) d c", b=b)
        o = rearrange(o, "(b f n m) (h w) c -> (b f) h n w m c", f=f, n=2, m=2, h=h // 2, w=w // 2)
        o = rearrange(o, "b h n w m c -> b (h n) (w m) c")
        o = rearrange(o, "b h w c -> b (h w) c")
        z = z + o
    u = F.layer_norm(z, (c,), sd[blk + "ff_norm.weight"], sd[blk + "ff_norm.bias"], eps_ln)
    hidden, gate = F.linear(u, sd[blk + "ff.net.0.proj.weight"], sd[blk + "ff.net.0.proj.bias"]).chunk(2, dim=-1)
    z = z + F.linear(hidden * F.gelu(gate), sd[blk + "ff.net.2.weight"], sd[blk + "ff.net.2.bias"])
    z = F.linear(z, sd[p + "proj_out.weight"], sd[p + "proj_out.bias"])
    z = z.reshape(b * f, h, w, c).permute(0, 3, 1, 2) + residual
    return rearrange(z, "(b f) c h w -> b c f h w", b=b)


def random_module(dim=64, seed=0):
    torch.manual_seed(seed)
    module = VanillaTemporalModule(dim, MotionModuleConfig()).eval()
    with torch.no_grad():
        for name, param in module.named_parameters():
            param.copy_(torch.randn_like(param) * (0.5 if "norm" in name else 1 / math.sqrt(param.shape[-1])))
            if "norm" in name and name.endswith("weight"):
                param.add_(1.0)
    return module


@pytest.mark.parametrize("shape", [(2, 64, 5, 4, 6), (1, 64, 3, 6, 2)])
def test_matches_spec_transcription(shape):
    module = random_module(shape[1])
    x = torch.randn(shape)
    b, c, f, h, w = shape
    with torch.no_grad():
        out = module(rearrange(x, "b c f h w -> b (f h w) c"), f, h, w)
        ref = reference_motion_module(module.state_dict(), x, heads=8)
    out = rearrange(out, "b (f h w) c -> b c f h w", f=f, h=h, w=w)
    torch.testing.assert_close(out, ref, rtol=0, atol=1e-5)
    assert (out - x).abs().max() > 0.1  # the module is not the identity here


def test_windows_do_not_mix_and_frames_do():
    """Swapping two pixels of one frame (same GroupNorm statistics) changes exactly the two 2x2 windows involved,
    in every frame, and leaves the other windows untouched."""
    module = random_module()
    b, c, f, h, w = 1, 64, 4, 4, 4
    x = torch.randn(b, c, f, h, w)
    y = x.clone()
    y[:, :, 2, 0, 1], y[:, :, 2, 3, 3] = x[:, :, 2, 3, 3], x[:, :, 2, 0, 1]
    with torch.no_grad():
        ox, oy = (rearrange(module(rearrange(t, "b c f h w -> b (f h w) c"), f, h, w), "b (f h w) c -> b c f h w",
                            f=f, h=h, w=w) for t in (x, y))
    diff = (ox - oy).abs().amax(dim=(0, 1))  # [f, h, w]
    windows = rearrange(diff, "f (h n) (w m) -> f h w (n m)", n=2, m=2).amin(-1)  # smallest change per window
    assert (windows[:, 0, 0] > 1e-4).all() and (windows[:, 1, 1] > 1e-4).all()
    assert diff[:, :2, 2:].max() < 1e-5 and diff[:, 2:, :2].max() < 1e-5  # rounding of the norm sums
