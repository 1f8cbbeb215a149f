"""Transformer3DModel denoising-step benchmark against a reference-style baseline, measured in the same run.

Baseline: diffusers' PixArtTransformer2DModel run per frame (frames in the batch, caption repeated per frame) with a
naive grid motion module after every block (the reference's rearranges around each attention and
softmax(QK^T)V via baddbmm/bmm, like the original VersatileAttention). Same FLOPs as ours; the motion module sits
after the block instead of between self- and cross-attention, which changes the numbers but not the cost.

Timing: both models live in one process and their steps alternate (best of --rounds), so cores shared with other
work slow both alike. GFLOP/s use an analytic FLOP count of the model and are compared with the best rate of a plain
matmul measured between the rounds. Memory: each (implementation, dtype) runs in a fresh subprocess; the peak RSS
during one step after a warm-up step (kernel high-water mark reset after construction) minus the RSS before it, i.e.
activations and workspace on top of the weights.

    python bench/bench_transformer.py            # mid-size: 8 blocks x 512 wide, 256x256 px, 16 frames, CFG batch 2
    python bench/bench_transformer.py --small    # seconds-long smoke run
"""
from __future__ import annotations

import argparse
import ctypes
import gc
import json
import math
import re
import resource
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from easyanimate_model.config import MotionModuleConfig, TransformerConfig  # noqa: E402
from easyanimate_model.transformer import Transformer3DModel  # noqa: E402

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
SIZES = {
    # config, batch (CFG), frames, latent height/width, text tokens
    "mid": dict(layers=8, heads=8, head_dim=64, caption=4096, batch=2, frames=16, latent=32, text=120),
    "small": dict(layers=2, heads=4, head_dim=32, caption=64, batch=2, frames=4, latent=16, text=16),
}


def make_config(size) -> TransformerConfig:
    return TransformerConfig(num_layers=size["layers"], num_attention_heads=size["heads"],
                             attention_head_dim=size["head_dim"], caption_channels=size["caption"],
                             cross_attention_dim=size["heads"] * size["head_dim"],
                             motion_module=MotionModuleConfig(num_attention_heads=8))


def model_flops(cfg: TransformerConfig, batch, frames, height, width, text) -> float:
    """Multiply-adds x 2 of one forward (matmuls and attention; norms and elementwise ops ignored)."""
    c, p = cfg.inner_dim, cfg.patch_size
    n = (height // p) * (width // p)
    tokens = batch * frames * n
    window = cfg.motion_module.block_size ** 2 * frames  # motion attention sequence length
    spatial = 2 * tokens * 4 * c * c + 4 * tokens * n * c
    motion = (2 * tokens * 2 * c * c  # proj_in, proj_out
              + len(cfg.motion_module.attention_block_types) * (2 * tokens * 4 * c * c + 4 * tokens * window * c)
              + 2 * tokens * 12 * c * c)  # GEGLU: C->8C, 4C->C
    cross = 2 * tokens * 2 * c * c + 2 * batch * text * 2 * c * c + 4 * tokens * text * c
    ff = 2 * tokens * 8 * c * c
    blocks = cfg.num_layers * (spatial + motion + cross + ff)
    io = 2 * tokens * c * cfg.in_channels * p * p + 2 * tokens * c * cfg.out_channels * p * p
    caption = 2 * batch * text * (cfg.caption_channels * c + c * c)
    return float(blocks + io + caption)


class NaiveMotionModule(nn.Module):
    """The reference's grid motion module dataflow: per-attention rearranges, baddbmm + softmax + bmm."""

    def __init__(self, dim, heads=8, frames_max=4096):
        super().__init__()
        self.heads = heads
        self.norm = nn.GroupNorm(32, dim, eps=1e-6)
        self.proj_in, self.proj_out = nn.Linear(dim, dim), nn.Linear(dim, dim)
        self.qkv = nn.ModuleList([nn.ModuleList([nn.Linear(dim, dim, bias=False) for _ in range(3)]) for _ in range(2)])
        self.outs = nn.ModuleList([nn.Linear(dim, dim) for _ in range(2)])
        self.norms = nn.ModuleList([nn.LayerNorm(dim) for _ in range(2)])
        self.ff_norm, self.ff_in, self.ff_out = nn.LayerNorm(dim), nn.Linear(dim, 8 * dim), nn.Linear(4 * dim, dim)
        position = torch.arange(frames_max)[:, None]
        div = torch.exp(torch.arange(0, dim, 2) * (-math.log(10000.0) / dim))
        pe = torch.zeros(1, frames_max, dim)
        pe[0, :, 0::2], pe[0, :, 1::2] = torch.sin(position * div), torch.cos(position * div)
        self.register_buffer("pe", pe)

    def attention(self, a, u, f, h, w):
        b = u.shape[0] // f
        u = rearrange(u, "(b f) d c -> (b d) f c", f=f) + self.pe[:, :f]
        u = rearrange(u, "(b d) f c -> b f d c", b=b)
        u = rearrange(u, "b f (h w) c -> b f h w c", h=h, w=w)
        u = rearrange(u, "b f (h n) (w m) c -> (b h w) (f n m) c", n=2, m=2)
        q, k, v = (rearrange(lin(u), "s l (hd d) -> (s hd) l d", hd=self.heads) for lin in self.qkv[a])
        empty = torch.empty(q.shape[0], q.shape[1], k.shape[1], dtype=q.dtype, device=q.device)
        scores = torch.baddbmm(empty, q, k.transpose(1, 2), beta=0, alpha=q.shape[-1] ** -0.5)
        o = rearrange(torch.bmm(scores.softmax(dim=-1), v), "(s hd) l d -> s l (hd d)", hd=self.heads)
        o = rearrange(self.outs[a](o), "(b d) f c -> (b f) d c", b=b)
        o = rearrange(o, "(b f n m) (h w) c -> (b f) h n w m c", f=f, n=2, m=2, h=h // 2, w=w // 2)
        return rearrange(o, "b h n w m c -> b (h n) (w m) c").flatten(1, 2)

    def forward(self, x):  # [B, C, F, h, w]
        b, c, f, h, w = x.shape
        z = residual = rearrange(x, "b c f h w -> (b f) c h w")
        z = self.norm(z).permute(0, 2, 3, 1).reshape(b * f, h * w, c)
        z = self.proj_in(z)
        for a in range(2):
            z = z + self.attention(a, self.norms[a](z), f, h, w)
        hidden, gate = self.ff_in(self.ff_norm(z)).chunk(2, dim=-1)
        z = z + self.ff_out(hidden * F.gelu(gate))
        z = self.proj_out(z).reshape(b * f, h, w, c).permute(0, 3, 1, 2) + residual
        return rearrange(z, "(b f) c h w -> b c f h w", b=b)


def build_baseline(cfg: TransformerConfig, size, dtype):
    from diffusers import PixArtTransformer2DModel
    from diffusers.utils import logging as diffusers_logging

    diffusers_logging.set_verbosity_error()  # its .to(dtype) advice is about from_pretrained, irrelevant here

    model = PixArtTransformer2DModel(num_attention_heads=cfg.num_attention_heads,
                                     attention_head_dim=cfg.attention_head_dim, num_layers=cfg.num_layers,
                                     caption_channels=cfg.caption_channels, cross_attention_dim=cfg.inner_dim,
                                     sample_size=cfg.sample_size, in_channels=4, out_channels=8)
    model.motion_modules = nn.ModuleList([NaiveMotionModule(cfg.inner_dim) for _ in range(cfg.num_layers)])
    frames, grid = size["frames"], size["latent"] // cfg.patch_size

    def after_block(block_index):
        def hook(module, args, output):
            x = rearrange(output, "(b f) (h w) c -> b c f h w", f=frames, h=grid)
            x = model.motion_modules[block_index](x)
            return rearrange(x, "b c f h w -> (b f) (h w) c")
        return hook

    for i, block in enumerate(model.transformer_blocks):
        block.register_forward_hook(after_block(i))
    model = model.to(dtype).eval()

    def step(latents, t, text, mask):
        b, c, f, h, w = latents.shape
        out = model(latents.transpose(1, 2).reshape(b * f, c, h, w), encoder_hidden_states=text.repeat_interleave(f, 0),
                    timestep=t.repeat_interleave(f), encoder_attention_mask=mask.repeat_interleave(f, 0),
                    added_cond_kwargs={"resolution": None, "aspect_ratio": None}).sample
        return out.view(b, f, -1, h, w).transpose(1, 2)

    return step


def build_ours(cfg, size, dtype):
    model = Transformer3DModel(cfg, dtype=dtype).eval()
    return lambda latents, t, text, mask: model(latents, t, text, mask)


def make_inputs(cfg, size, dtype):
    b, f, lat, text_len = size["batch"], size["frames"], size["latent"], size["text"]
    text = torch.randn(b, text_len, cfg.caption_channels, dtype=dtype)
    mask = torch.ones(b, text_len)
    mask[:, text_len // 2:] = 0
    return torch.randn(b, 4, f, lat, lat, dtype=dtype), torch.tensor([999, 500][:b]), text, mask


def rss_kib(field):
    return int(re.search(rf"Vm{field}:\s+(\d+)", Path("/proc/self/status").read_text()).group(1))


def measure_memory(impl, dtype_name, small) -> dict:
    """Peak RSS of one step over the RSS before it (run in a fresh process per case, after a warm-up step)."""
    size = SIZES["small" if small else "mid"]
    cfg, dtype = make_config(size), DTYPES[dtype_name]
    step = BUILDERS[impl](cfg, size, dtype)
    inputs = make_inputs(cfg, size, dtype)
    with torch.inference_mode():
        step(*inputs)  # warm-up: lazily loaded kernels and thread pools are not the model's memory
    gc.collect()
    ctypes.CDLL("libc.so.6").malloc_trim(0)
    try:
        Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current RSS (Linux >= 4.0)
        exact = True
    except OSError:
        exact = False
    before = rss_kib("RSS")
    with torch.inference_mode():
        step(*inputs)
    peak = rss_kib("HWM") if exact else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return {"peak_extra_mib": (peak - before) / 1024, "exact": exact}


def matmul_gflops(dtype, small, repeats=5):
    """Best rate of a plain matmul shaped like the model's feed-forward input projection."""
    m, k, n = (1024, 128, 512) if small else (4096, 512, 2048)
    a, b = torch.randn(m, k, dtype=dtype), torch.randn(k, n, dtype=dtype)
    a @ b
    best = math.inf
    for _ in range(repeats):
        start = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - start)
    return 2 * m * k * n / best / 1e9


def time_both(dtype_name, small, rounds) -> dict:
    """Best seconds per step of baseline and ours, alternating steps so shared cores hit both alike."""
    size = SIZES["small" if small else "mid"]
    cfg, dtype = make_config(size), DTYPES[dtype_name]
    torch.manual_seed(0)
    steps = {impl: build(cfg, size, dtype) for impl, build in BUILDERS.items()}
    inputs = make_inputs(cfg, size, dtype)
    best = dict.fromkeys(steps, math.inf)
    matmul = 0.0
    with torch.inference_mode():
        for step in steps.values():  # warm-up
            out = step(*inputs)
            assert torch.isfinite(out).all() and out.shape == (size["batch"], 8) + inputs[0].shape[2:]
        for _ in range(rounds):
            matmul = max(matmul, matmul_gflops(dtype, small))
            for impl, step in steps.items():
                start = time.perf_counter()
                step(*inputs)
                best[impl] = min(best[impl], time.perf_counter() - start)
    return {"seconds": best, "matmul_gflops": matmul}


BUILDERS = {"baseline": build_baseline, "ours": build_ours}


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--small", action="store_true", help="tiny sizes, finishes in seconds (smoke test)")
    parser.add_argument("--dtypes", default=None,
                        help="comma list of fp32, bf16 (default: both where the CPU has native bf16, else fp32)")
    parser.add_argument("--rounds", type=int, default=2, help="timed steps per implementation (best is reported)")
    parser.add_argument("--memory-case", nargs=2, metavar=("IMPL", "DTYPE"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.memory_case:
        print(json.dumps(measure_memory(*args.memory_case, args.small)))
        return

    size = SIZES["small" if args.small else "mid"]
    cfg = make_config(size)
    if args.dtypes is None:
        # without avx512_bf16/amx_bf16 torch's CPU bf16 matmul is ~100x slower than fp32: a mid-size step takes hours
        native_bf16 = re.search(r"\b(avx512_bf16|amx_bf16)\b", Path("/proc/cpuinfo").read_text()) is not None
        args.dtypes = "fp32,bf16" if native_bf16 else "fp32"
        if not native_bf16:
            print("CPU has no native bf16 (avx512_bf16/amx_bf16): bf16 skipped; force with --dtypes fp32,bf16")
    flops = model_flops(cfg, size["batch"], size["frames"], size["latent"], size["latent"], size["text"])
    print(f"config: {cfg.num_layers} blocks x {cfg.inner_dim} wide ({cfg.num_attention_heads} heads), motion "
          f"{cfg.motion_module.num_attention_heads} heads; batch {size['batch']} x {size['frames']} frames x "
          f"{size['latent']}x{size['latent']} latent, {size['text']} text tokens; {flops / 1e9:.1f} GFLOP per step; "
          f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    print(f"{'impl':9}{'dtype':6}{'best s/step':>12}{'GFLOP/s':>9}{'matmul GFLOP/s':>16}{'of matmul':>10}"
          f"{'peak MiB':>10}")
    for dtype_name in args.dtypes.split(","):
        timing = time_both(dtype_name, args.small, args.rounds)
        peaks = {}
        for impl in BUILDERS:
            cmd = [sys.executable, __file__, "--memory-case", impl, dtype_name] + (["--small"] if args.small else [])
            proc = subprocess.run(cmd, capture_output=True, text=True)
            if proc.returncode:
                sys.exit(f"memory case {impl} {dtype_name} failed:\n{proc.stderr}")
            peaks[impl] = json.loads(proc.stdout.strip().splitlines()[-1])
            seconds, matmul = timing["seconds"][impl], timing["matmul_gflops"]
            print(f"{impl:9}{dtype_name:6}{seconds:12.3f}{flops / seconds / 1e9:9.1f}{matmul:16.1f}"
                  f"{flops / seconds / 1e9 / matmul:10.0%}{peaks[impl]['peak_extra_mib']:10.0f}"
                  + ("" if peaks[impl]["exact"] else " (peak from maxrss: may be hidden by construction)"))
        print(f"  {dtype_name} ratios baseline/ours (>1 = ours better): time "
              f"{timing['seconds']['baseline'] / timing['seconds']['ours']:.2f}x, peak memory over weights "
              f"{peaks['baseline']['peak_extra_mib'] / max(peaks['ours']['peak_extra_mib'], 1):.2f}x")


if __name__ == "__main__":
    main()
