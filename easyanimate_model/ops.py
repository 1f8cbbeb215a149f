"""Pluggable layer classes and attention for the transformer.

The model builds every Linear / LayerNorm / GroupNorm / Conv2d from an `operations` object and calls an injected
attention function, so ComfyUI can pass `comfy.ops.*` (weight casting, no init) and its `optimized_attention`.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

# tokens per feed-forward call: bounds the [tokens, 8C] GEGLU intermediate (80 frames at 512 px = 164k tokens)
FF_CHUNK_TOKENS = 4096


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


def call_attention(attention, q, k, v, heads, mask, transformer_options, name):
    """attention(q, k, v, heads, mask=mask), with the host's transformer_options and the call site's name
    ("attn1", "attn2", "attn_temporal") as keywords when the host passed transformer_options."""
    if transformer_options is None:
        return attention(q, k, v, heads, mask=mask)
    return attention(q, k, v, heads, mask=mask, transformer_options=transformer_options, name=name)


def chunked_rows(fn, x: torch.Tensor, rows: int | None = None) -> torch.Tensor:
    """fn(x) for a row-wise fn, evaluated over at most `rows` (default FF_CHUNK_TOKENS) rows at a time.

    Caps the size of wide intermediates (e.g. the 4C/8C feed-forward hidden state of every token of a video).
    """
    rows = rows or FF_CHUNK_TOKENS
    flat = x.reshape(-1, x.shape[-1])
    if flat.shape[0] <= rows:
        return fn(x)
    out = torch.cat([fn(part) for part in flat.split(rows)])
    return out.view(*x.shape[:-1], out.shape[-1])
