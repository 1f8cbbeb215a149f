"""Pluggable layer classes and attention for the transformer.

The model builds every Linear / LayerNorm / GroupNorm / Conv2d from an `operations` object and calls an injected
attention function, so ComfyUI can pass `comfy.ops.*` (weight casting, no init) and its `optimized_attention`.
"""
import torch
import torch.nn.functional as F
from torch import nn


class TorchOps:
    """Plain torch layers (the default `operations`)."""

    Linear = nn.Linear
    LayerNorm = nn.LayerNorm
    GroupNorm = nn.GroupNorm
    Conv2d = nn.Conv2d


def sdpa_attention(q, k, v, heads, mask=None, **kwargs):
    """Multi-head softmax attention with torch's scaled_dot_product_attention (scale 1/sqrt(head_dim)).

    q [B, Nq, heads*dim], k/v [B, Nk, heads*dim] -> [B, Nq, heads*dim]. `mask` is an additive bias broadcastable to
    [B, heads, Nq, Nk]. Same call signature as ComfyUI's `optimized_attention` (extra keyword arguments are ignored).
    """
    b, nq, inner = q.shape
    dim = inner // heads
    q, k, v = (t.view(b, -1, heads, dim).transpose(1, 2) for t in (q, k, v))
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    return out.transpose(1, 2).reshape(b, nq, inner)
