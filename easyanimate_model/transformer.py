"""EasyAnimate v1 Transformer3DModel: PixArt-alpha DiT with a VanillaGrid motion module in every block
(docs/MODEL.md §A).

Module paths equal the release state-dict keys (docs/MODEL.md §B), so `load_state_dict(strict=True)` takes base DiT +
motion module files unchanged. `config.motion_module=None` builds the plain 2D PixArt model (no `attn_temporal`).

Host hooks: `forward_frames(transformer_options=...)` hands an opaque dict down to every block (`run_block`, which a
host may override) and every attention call, which then becomes
`attention(q, k, v, heads, mask=mask, transformer_options=..., name="attn1" | "attn2" | "attn_temporal")`.
Without it the attention is called as `attention(q, k, v, heads, mask=mask)`.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from .config import VAE_SCALE, TransformerConfig
from .motion_module import VanillaTemporalModule, sinusoidal_temporal_pe
from .ops import TorchOps, call_attention, chunked_rows, sdpa_attention
from .prompt_schedule import FrameContexts

# timestep sinusoid width of PixArt's `Timesteps(256, flip_sin_to_cos=True, downscale_freq_shift=0)`
TIMESTEP_CHANNELS = 256


def get_2d_sincos_pos_embed(dim: int, height: int, width: int, base_size: int, device=None) -> torch.Tensor:
    """PixArt 2D sin-cos embedding [height*width, dim] (fp32) for a patch grid, token index i*width + j.

    Positions are rescaled to the base grid on each axis (pos = i * base_size / height), so every grid spans the
    same range. First dim/2 channels encode the column, last dim/2 the row; each half is [sin, cos].
    """
    rows = torch.arange(height, dtype=torch.float32, device=device) / (height / base_size)
    cols = torch.arange(width, dtype=torch.float32, device=device) / (width / base_size)
    quarter = dim // 4
    omega = 1.0 / 10000 ** (torch.arange(quarter, dtype=torch.float64, device=device) / quarter)

    def embed(pos):  # [n] -> [n, dim/2], float64 like the reference
        angles = pos.double()[:, None] * omega[None]
        return torch.cat([angles.sin(), angles.cos()], dim=1)

    col_emb = embed(cols).repeat(height, 1)              # token i*width+j -> column j
    row_emb = embed(rows).repeat_interleave(width, dim=0)  # token i*width+j -> row i
    return torch.cat([col_emb, row_emb], dim=1).float()


def timestep_sinusoid(timestep: torch.Tensor, channels: int = TIMESTEP_CHANNELS) -> torch.Tensor:
    """[B] -> [B, channels] fp32, [cos, sin] ordered."""
    half = channels // 2
    freqs = torch.exp(-math.log(10000) * torch.arange(half, dtype=torch.float32, device=timestep.device) / half)
    angles = timestep.float()[:, None] * freqs[None]
    return torch.cat([angles.cos(), angles.sin()], dim=-1)


class PatchEmbed(nn.Module):
    """Conv patchify + 2D sin-cos position embedding; `pos_embed` is the base-grid table (not saved in files)."""

    def __init__(self, config: TransformerConfig, operations, dtype=None, device=None):
        super().__init__()
        p = config.patch_size
        self.base_size = config.base_size
        self.proj = operations.Conv2d(config.in_channels, config.inner_dim, kernel_size=p, stride=p, bias=True,
                                      dtype=dtype, device=device)
        table = get_2d_sincos_pos_embed(config.inner_dim, self.base_size, self.base_size, self.base_size, device)
        self.register_buffer("pos_embed", table[None], persistent=False)
        self._cache = None  # (key, table) of the last non-base grid; recomputing is cheap but not free at 80 frames

    def position_table(self, height: int, width: int, device) -> torch.Tensor:
        if (height, width) == (self.base_size, self.base_size) and self.pos_embed.device == device:
            return self.pos_embed
        key = (height, width, device)
        if self._cache is None or self._cache[0] != key:
            dim = self.pos_embed.shape[-1]
            self._cache = (key, get_2d_sincos_pos_embed(dim, height, width, self.base_size, device)[None])
        return self._cache[1]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """[N, C_in, H, W] -> [N, h*w, C]"""
        tokens = self.proj(x)
        h, w = tokens.shape[-2:]
        tokens = tokens.flatten(2).transpose(1, 2)
        return (tokens + self.position_table(h, w, tokens.device)).to(tokens.dtype)


def mask_bias(keep: torch.Tensor) -> torch.Tensor:
    """Additive attention bias of a token mask: log(keep) clamped at -10000, i.e. exactly the original's
    (1 - keep) * -10000 for 0/1 masks, and a soft weight for the blended masks of prompt schedules."""
    return keep.log().clamp(min=-10000.0)


class TimestepEmbedding(nn.Module):
    def __init__(self, in_dim, dim, operations, dtype=None, device=None):
        super().__init__()
        self.linear_1 = operations.Linear(in_dim, dim, dtype=dtype, device=device)
        self.linear_2 = operations.Linear(dim, dim, dtype=dtype, device=device)

    def forward(self, x):
        return self.linear_2(F.silu(self.linear_1(x)))


class CombinedTimestepEmbedding(nn.Module):
    """PixArt's timestep embedder without the (disabled) resolution / aspect-ratio micro-conditions."""

    def __init__(self, dim, operations, dtype=None, device=None):
        super().__init__()
        self.timestep_embedder = TimestepEmbedding(TIMESTEP_CHANNELS, dim, operations, dtype=dtype, device=device)


class AdaLayerNormSingle(nn.Module):
    def __init__(self, dim, operations, dtype=None, device=None):
        super().__init__()
        self.emb = CombinedTimestepEmbedding(dim, operations, dtype=dtype, device=device)
        self.linear = operations.Linear(dim, 6 * dim, dtype=dtype, device=device)

    def forward(self, timestep: torch.Tensor, dtype: torch.dtype):
        """-> (T6 [B, 6C] block modulation, E [B, C] embedded timestep)"""
        embedded = self.emb.timestep_embedder(timestep_sinusoid(timestep).to(dtype))
        return self.linear(F.silu(embedded)), embedded


class CaptionProjection(nn.Module):
    def __init__(self, in_dim, dim, operations, dtype=None, device=None):
        super().__init__()
        self.linear_1 = operations.Linear(in_dim, dim, dtype=dtype, device=device)
        self.linear_2 = operations.Linear(dim, dim, dtype=dtype, device=device)

    def forward(self, x):
        return self.linear_2(F.gelu(self.linear_1(x), approximate="tanh"))


class Attention(nn.Module):
    """Multi-head attention with biased q/k/v/out projections (diffusers `Attention` key layout)."""

    def __init__(self, dim, heads, operations, attention, context_dim=None, dtype=None, device=None, name="attn1"):
        super().__init__()
        context_dim = context_dim or dim
        self.heads = heads
        self.attention = attention
        self.name = name
        self.to_q = operations.Linear(dim, dim, dtype=dtype, device=device)
        self.to_k = operations.Linear(context_dim, dim, dtype=dtype, device=device)
        self.to_v = operations.Linear(context_dim, dim, dtype=dtype, device=device)
        self.to_out = nn.ModuleList([operations.Linear(dim, dim, dtype=dtype, device=device)])

    def forward(self, x, context=None, mask=None, transformer_options=None, context_index=None):
        """`context_index` [N] (cross-attention only): query row n attends to context row context_index[n]; keys
        and values are projected once per distinct context and then gathered."""
        context = x if context is None else context
        k, v = self.to_k(context), self.to_v(context)
        if context_index is not None:
            k, v = k[context_index], v[context_index]
            mask = None if mask is None else mask[context_index]
        out = call_attention(self.attention, self.to_q(x), k, v, self.heads, mask, transformer_options, self.name)
        return self.to_out[0](out)


class GELUFeedForward(nn.Module):
    def __init__(self, dim, operations, mult=4, dtype=None, device=None):
        super().__init__()
        proj = nn.Module()
        proj.proj = operations.Linear(dim, dim * mult, dtype=dtype, device=device)
        # index 1 is the (p=0) dropout of the reference; kept as a placeholder so the keys are net.0 / net.2
        self.net = nn.ModuleList([proj, nn.Identity(), operations.Linear(dim * mult, dim, dtype=dtype, device=device)])

    def forward(self, x):
        return chunked_rows(self._forward, x)

    def _forward(self, x):
        return self.net[2](F.gelu(self.net[0].proj(x), approximate="tanh"))


class TransformerBlock(nn.Module):
    """PixArt block (ada_norm_single) with the motion module between self- and cross-attention (docs/MODEL.md §A.4)."""

    def __init__(self, config: TransformerConfig, operations, attention, dtype=None, device=None):
        super().__init__()
        dim = config.inner_dim
        self.eps = config.norm_eps
        self.attn1 = Attention(dim, config.num_attention_heads, operations, attention, dtype=dtype, device=device)
        self.attn_temporal = None if config.motion_module is None else VanillaTemporalModule(
            dim, config.motion_module, operations, attention, dtype=dtype, device=device)
        self.attn2 = Attention(dim, config.num_attention_heads, operations, attention,
                               context_dim=config.cross_attention_dim, dtype=dtype, device=device, name="attn2")
        self.ff = GELUFeedForward(dim, operations, dtype=dtype, device=device)
        self.scale_shift_table = nn.Parameter(torch.empty(6, dim, dtype=dtype, device=device))

    def forward(self, x, t6, context, context_mask, num_frames, height, width, temporal=True,
                transformer_options=None, context_index=None):
        """x [B, F*h*w, C]; t6 [B, 6C]; context [B, L, C]; context_mask bias [B, 1, 1, L] or None.
        Per-frame prompts: context [U, L, C] (+ bias [U, 1, 1, L]) and context_index [B*F] (frame -> context row)."""
        b, _, c = x.shape
        table = self.scale_shift_table.to(device=x.device, dtype=x.dtype)
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = (table[None] + t6.view(b, 6, c)).chunk(6, 1)

        n = F.layer_norm(x, (c,), eps=self.eps) * (1 + scale_msa) + shift_msa
        attn = self.attn1(n.view(b * num_frames, height * width, c),
                          transformer_options=transformer_options).view(b, -1, c)  # per frame
        x = x + gate_msa * attn
        if temporal and self.attn_temporal is not None:
            x = self.attn_temporal(x, num_frames, height, width, transformer_options=transformer_options)
        if context_index is None:
            x = x + self.attn2(x, context, context_mask, transformer_options=transformer_options)
        else:  # cross-attention is per query token, so each frame's tokens may see their own prompt
            frames = x.view(b * num_frames, height * width, c)
            x = x + self.attn2(frames, context, context_mask, transformer_options=transformer_options,
                               context_index=context_index).view(b, -1, c)
        n = F.layer_norm(x, (c,), eps=self.eps) * (1 + scale_mlp) + shift_mlp
        return x + gate_mlp * self.ff(n)


class Transformer3DModel(nn.Module):
    """forward(hidden_states [B,4,F,H,W], timestep [B], encoder_hidden_states [B,L,Ct], encoder_attention_mask [B,L])
    -> [B,8,F,H,W]; `forward_frames` takes/returns the frames-in-batch layout [(B*F),C,H,W] (row b*F+f)."""

    def __init__(self, config: TransformerConfig, operations=None, attention=None, dtype=None, device=None):
        super().__init__()
        operations = operations or TorchOps
        attention = attention or sdpa_attention
        self.config = config
        dim = config.inner_dim
        self.gradient_checkpointing = False
        self.pos_embed = PatchEmbed(config, operations, dtype=dtype, device=device)
        self.transformer_blocks = nn.ModuleList([
            TransformerBlock(config, operations, attention, dtype=dtype, device=device)
            for _ in range(config.num_layers)
        ])
        self.scale_shift_table = nn.Parameter(torch.empty(2, dim, dtype=dtype, device=device))
        self.proj_out = operations.Linear(dim, config.patch_size ** 2 * config.out_channels, dtype=dtype, device=device)
        self.adaln_single = AdaLayerNormSingle(dim, operations, dtype=dtype, device=device)
        self.caption_projection = CaptionProjection(config.caption_channels, dim, operations, dtype=dtype, device=device)
        self._init_tables()

    def _init_tables(self):
        # PixArt's init of the modulation tables (keeps a freshly built model numerically sane)
        with torch.no_grad():
            if not self.scale_shift_table.is_meta:
                for table in [self.scale_shift_table] + [blk.scale_shift_table for blk in self.transformer_blocks]:
                    table.copy_(torch.randn(table.shape, dtype=torch.float32) / table.shape[1] ** 0.5)

    @staticmethod
    def is_motion_key(key: str) -> bool:
        """True for motion-module keys (how the reference splits a motion-module file off a full checkpoint)."""
        return "temporal" in key

    def temporal_state_dict(self) -> dict:
        """The motion-module part of the state dict (the layout of easyanimate_v1_mm.safetensors)."""
        return {k: v for k, v in self.state_dict().items() if self.is_motion_key(k)}

    def init_buffers(self, device=None):
        """Compute `pos_embed.pos_embed` and every `pos_encoder.pe` still on the meta device, on `device`.

        For models built on the meta device and filled with `load_state_dict(assign=True)`: non-persistent buffers
        and pe tables absent from a file stay on meta otherwise.
        """
        device = torch.device(device) if device is not None else self.proj_out.weight.device
        base = self.pos_embed.base_size
        self.pos_embed.pos_embed = get_2d_sincos_pos_embed(self.config.inner_dim, base, base, base, device)[None]
        for name, module in self.named_modules():
            if name.endswith("pos_encoder") and module.pe.is_meta:
                module.pe = sinusoidal_temporal_pe(module.pe.shape[1], module.pe.shape[2], device=device,
                                                   dtype=module.pe.dtype)

    def run_block(self, index, block, x, t6, context, mask, num_frames, height, width, temporal,
                  transformer_options=None, context_index=None):
        """Block `index` on tokens x [B, F*h*w, C]; the place for a host's per-block hooks (override it).
        `context_index`: per-frame prompts (see TransformerBlock.forward)."""
        args = (x, t6, context, mask, num_frames, height, width, temporal, transformer_options, context_index)
        if self.gradient_checkpointing and self.training and torch.is_grad_enabled():
            return checkpoint(block, *args, use_reentrant=False)
        return block(*args)

    def check_input_size(self, num_frames: int, height: int, width: int):
        """Raise ValueError for latent sizes the model cannot run (before any compute)."""
        unit = self.config.latent_multiple()
        if height <= 0 or width <= 0 or height % unit or width % unit:
            raise ValueError(f"height and width must be positive multiples of {unit * VAE_SCALE} pixels (latent "
                             f"multiples of {unit}); got latent {height}x{width}")
        mm = self.config.motion_module
        if mm is not None:
            if num_frames > mm.temporal_position_encoding_max_len:
                raise ValueError(f"at most {mm.temporal_position_encoding_max_len} frames are supported "
                                 f"(temporal position encoding length); got {num_frames}")

    def forward(self, hidden_states, timestep, encoder_hidden_states, encoder_attention_mask=None):
        if hidden_states.ndim != 5:
            raise ValueError(f"hidden_states must be [B, C, F, H, W]; got shape {tuple(hidden_states.shape)}")
        b, c, f, h, w = hidden_states.shape
        frames = hidden_states.transpose(1, 2).reshape(b * f, c, h, w)
        out = self.forward_frames(frames, timestep, encoder_hidden_states, encoder_attention_mask, num_frames=f)
        return out.view(b, f, -1, h, w).transpose(1, 2)

    def _text_contexts(self, embeds, mask, b: int, f: int):
        """-> (embeds [B, L, Ct] or distinct contexts [U, L, Ct], mask, frame index [B*F] or None), checked."""
        channels = self.config.caption_channels
        index = None
        if isinstance(embeds, FrameContexts):
            if mask is not None:
                raise ValueError("encoder_attention_mask must be None with FrameContexts (they carry their masks)")
            if embeds.index.shape != (b * f,):
                raise ValueError(f"FrameContexts index must have one entry per frame row ({b * f}); got shape "
                                 f"{tuple(embeds.index.shape)}")
            if embeds.uniform_per_video(f):  # e.g. a one-keyframe schedule: exactly the single-prompt path
                embeds, mask = embeds.per_video(f)
            else:
                embeds, mask, index = embeds.embeds, embeds.mask, embeds.index
        elif embeds.ndim == 3 and embeds.shape[0] == b * f and f > 1:  # one prompt per frame
            index = torch.arange(b * f, device=embeds.device)
        elif embeds.ndim != 3 or embeds.shape[0] != b:
            raise ValueError(f"encoder_hidden_states must be [B={b}, L, {channels}] or, one per frame, "
                             f"[B*F={b * f}, L, {channels}]; got shape {tuple(embeds.shape)}")
        if embeds.ndim != 3 or embeds.shape[2] != channels:
            raise ValueError(f"encoder_hidden_states must have {channels} channels; got shape {tuple(embeds.shape)}")
        if mask is not None and mask.numel() != embeds.shape[0] * embeds.shape[1]:
            raise ValueError(f"encoder_attention_mask must be {tuple(embeds.shape[:2])}; got {tuple(mask.shape)}")
        return embeds, mask, index

    def forward_frames(self, x, timestep, encoder_hidden_states, encoder_attention_mask=None, num_frames=1,
                       temporal=True, transformer_options=None):
        """x [(B*F), C, H, W] (row b*F+f) -> [(B*F), out_channels, H, W].

        `encoder_hidden_states`: [B, L, Ct] (one prompt per video), [B*F, L, Ct] (one per frame), or a
        `prompt_schedule.FrameContexts` (distinct contexts + a frame index, no per-frame copies).

        `timestep`: a number, [B], or [B*F] (one value per row, as ComfyUI passes it; the first frame's is used).
        `temporal=False` skips the motion module (a host can then run one set of weights with and without it).
        `transformer_options`: an opaque dict for the host, passed to `run_block` and every attention call.
        """
        cfg = self.config
        bf, channels, height, width = x.shape
        f = num_frames
        if bf % f:
            raise ValueError(f"batch of {bf} frames is not a multiple of num_frames={f}")
        if channels != cfg.in_channels:
            raise ValueError(f"latents must have {cfg.in_channels} channels; got {channels}")
        b = bf // f
        self.check_input_size(f, height, width)
        encoder_hidden_states, encoder_attention_mask, context_index = self._text_contexts(
            encoder_hidden_states, encoder_attention_mask, b, f)
        timestep = torch.as_tensor(timestep, device=x.device).reshape(-1)
        if timestep.numel() == bf and f > 1:
            timestep = timestep[::f]
        timestep = timestep.expand(b) if timestep.numel() == 1 else timestep
        if timestep.numel() != b:
            raise ValueError(f"timestep must have 1, B={b} or B*F={bf} values; got {timestep.numel()}")

        dtype = x.dtype
        p, dim = cfg.patch_size, cfg.inner_dim
        hp, wp = height // p, width // p
        tokens = self.pos_embed(x).reshape(b, f * hp * wp, dim)  # frame-major sequence per video
        t6, embedded = self.adaln_single(timestep, dtype)
        context = self.caption_projection(encoder_hidden_states.to(dtype))
        mask = None
        if encoder_attention_mask is not None:
            keep = encoder_attention_mask.to(device=x.device, dtype=dtype).reshape(context.shape[0], 1, 1, -1)
            mask = mask_bias(keep)
        if context_index is not None:
            context_index = context_index.to(x.device)

        for index, block in enumerate(self.transformer_blocks):
            tokens = self.run_block(index, block, tokens, t6, context, mask, f, hp, wp, temporal, transformer_options,
                                    context_index=context_index)

        table = self.scale_shift_table.to(device=x.device, dtype=dtype)
        shift, scale = (table[None] + embedded[:, None]).chunk(2, dim=1)
        tokens = F.layer_norm(tokens, (dim,), eps=cfg.norm_eps) * (1 + scale) + shift
        tokens = self.proj_out(tokens)
        # token vector = (row_in_patch, col_in_patch, channel); unpatchify per frame
        out = tokens.view(bf, hp, wp, p, p, cfg.out_channels).permute(0, 5, 1, 3, 2, 4)
        return out.reshape(bf, cfg.out_channels, height, width)
