"""EasyAnimate v1 "VanillaGrid" motion module (docs/MODEL.md §A.5), the `attn_temporal` of every transformer block.

Module paths equal the release keys below `transformer_blocks.N.attn_temporal.`. The reference reshapes between a
per-frame layout and the grid layout around every attention call; all ops except the GroupNorm and the attention are
per token, so here the tokens are put into grid order once after the GroupNorm and back once at the end (same math,
fewer copies), and the temporal position encoding is expanded to grid order instead.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from .config import MotionModuleConfig
from .ops import TorchOps, call_attention, chunked_rows, sdpa_attention


def sinusoidal_temporal_pe(max_len: int, dim: int, device=None, dtype=None) -> torch.Tensor:
    """[1, max_len, dim]: pe[p, 2k] = sin(p * 10000^(-2k/dim)), pe[p, 2k+1] = cos(same) (computed in fp32)."""
    position = torch.arange(max_len, dtype=torch.float32, device=device)[:, None]
    div_term = torch.exp(torch.arange(0, dim, 2, dtype=torch.float32, device=device) * (-math.log(10000.0) / dim))
    pe = torch.zeros(1, max_len, dim, dtype=torch.float32, device=device)
    pe[0, :, 0::2] = torch.sin(position * div_term)
    pe[0, :, 1::2] = torch.cos(position * div_term)
    return pe.to(dtype=dtype) if dtype is not None else pe


class PositionalEncoding(nn.Module):
    def __init__(self, dim: int, max_len: int, dtype=None, device=None):
        super().__init__()
        self.register_buffer("pe", sinusoidal_temporal_pe(max_len, dim, device=device, dtype=dtype), persistent=True)


class TemporalSelfAttention(nn.Module):
    """VersatileAttention ("Temporal_Self"): q/k/v without bias, PE added to the attention input only."""

    def __init__(self, dim, heads, max_len, operations, attention, dtype=None, device=None):
        super().__init__()
        self.heads = heads
        self.attention = attention
        self.to_q = operations.Linear(dim, dim, bias=False, dtype=dtype, device=device)
        self.to_k = operations.Linear(dim, dim, bias=False, dtype=dtype, device=device)
        self.to_v = operations.Linear(dim, dim, bias=False, dtype=dtype, device=device)
        self.to_out = nn.ModuleList([operations.Linear(dim, dim, dtype=dtype, device=device)])
        self.pos_encoder = PositionalEncoding(dim, max_len, dtype=dtype, device=device)

    def forward(self, x: torch.Tensor, num_frames: int, window: int, transformer_options=None) -> torch.Tensor:
        # x: [S, F*window, C] in grid order (frame-major, then the window position) -> token f*window+j gets pe[f]
        pe = self.pos_encoder.pe[:, :num_frames].to(device=x.device, dtype=x.dtype)
        x = x + pe.repeat_interleave(window, dim=1)
        out = call_attention(self.attention, self.to_q(x), self.to_k(x), self.to_v(x), self.heads, None,
                             transformer_options, "attn_temporal")
        return self.to_out[0](out)


class GEGLU(nn.Module):
    def __init__(self, dim_in, dim_out, operations, dtype=None, device=None):
        super().__init__()
        self.proj = operations.Linear(dim_in, dim_out * 2, dtype=dtype, device=device)

    def forward(self, x):
        hidden, gate = self.proj(x).chunk(2, dim=-1)
        return hidden * F.gelu(gate)


class GEGLUFeedForward(nn.Module):
    def __init__(self, dim, operations, mult=4, dtype=None, device=None):
        super().__init__()
        # index 1 is the (p=0) dropout of the reference; kept as a placeholder so the keys are net.0 / net.2
        self.net = nn.ModuleList([
            GEGLU(dim, dim * mult, operations, dtype=dtype, device=device),
            nn.Identity(),
            operations.Linear(dim * mult, dim, dtype=dtype, device=device),
        ])

    def forward(self, x):
        return chunked_rows(self._forward, x)

    def _forward(self, x):
        for layer in self.net:
            x = layer(x)
        return x


class MotionTransformerBlock(nn.Module):
    def __init__(self, dim, cfg: MotionModuleConfig, operations, attention, dtype=None, device=None):
        super().__init__()
        n = len(cfg.attention_block_types)
        self.attention_blocks = nn.ModuleList([
            TemporalSelfAttention(dim, cfg.num_attention_heads, cfg.temporal_position_encoding_max_len, operations,
                                  attention, dtype=dtype, device=device)
            for _ in range(n)
        ])
        self.norms = nn.ModuleList([operations.LayerNorm(dim, dtype=dtype, device=device) for _ in range(n)])
        self.ff = GEGLUFeedForward(dim, operations, dtype=dtype, device=device)
        self.ff_norm = operations.LayerNorm(dim, dtype=dtype, device=device)

    def forward(self, x, num_frames, window, transformer_options=None):
        for attn, norm in zip(self.attention_blocks, self.norms):
            x = x + attn(norm(x), num_frames, window, transformer_options)
        return x + self.ff(self.ff_norm(x))


class TemporalTransformer3DModel(nn.Module):
    def __init__(self, dim, cfg: MotionModuleConfig, operations, attention, dtype=None, device=None):
        super().__init__()
        self.block_size = cfg.block_size
        self.norm = operations.GroupNorm(cfg.norm_num_groups, dim, eps=1e-6, affine=True, dtype=dtype, device=device)
        self.proj_in = operations.Linear(dim, dim, dtype=dtype, device=device)
        self.transformer_blocks = nn.ModuleList([
            MotionTransformerBlock(dim, cfg, operations, attention, dtype=dtype, device=device)
            for _ in range(cfg.num_transformer_block)
        ])
        self.proj_out = operations.Linear(dim, dim, dtype=dtype, device=device)
        if self.proj_out.weight is not None and not self.proj_out.weight.is_meta:  # None: a host's weightless layer
            # zero-initialised like the reference: a fresh module is the identity (training starts from the 2D model)
            nn.init.zeros_(self.proj_out.weight)
            nn.init.zeros_(self.proj_out.bias)

    def forward(self, x: torch.Tensor, num_frames: int, height: int, width: int,
                transformer_options=None) -> torch.Tensor:
        """x: [B, F*h*w, C] tokens (frame-major, row-major within a frame) -> same shape, residual included."""
        b, _, c = x.shape
        f, s = num_frames, self.block_size
        hs, ws = height // s, width // s
        z = self.norm(x.reshape(b * f, height * width, c).transpose(1, 2))  # GroupNorm per frame
        # "(b f) c (hs n ws m) -> (b hs ws) (f n m) c": every s x s window of all frames is one sequence
        z = z.reshape(b, f, c, hs, s, ws, s).permute(0, 3, 5, 1, 4, 6, 2).reshape(b * hs * ws, f * s * s, c)
        z = self.proj_in(z)
        for block in self.transformer_blocks:
            z = block(z, f, s * s, transformer_options)
        z = self.proj_out(z)
        z = z.view(b, hs, ws, f, s, s, c).permute(0, 3, 1, 4, 2, 5, 6).reshape(b, f * height * width, c)
        return x + z


class VanillaTemporalModule(nn.Module):
    """`attn_temporal`: wraps the temporal transformer (grid=True in the reference)."""

    def __init__(self, dim, cfg: MotionModuleConfig, operations=None, attention=None, dtype=None, device=None):
        super().__init__()
        self.temporal_transformer = TemporalTransformer3DModel(
            dim, cfg, operations or TorchOps, attention or sdpa_attention, dtype=dtype, device=device)

    def forward(self, x: torch.Tensor, num_frames: int, height: int, width: int,
                transformer_options=None) -> torch.Tensor:
        return self.temporal_transformer(x, num_frames, height, width, transformer_options)
