"""Memory estimates, in bytes, for what a request will allocate: latents, the transformer forward and the VAE.

They are computed from shapes alone, before anything is allocated, so a host can refuse a request that cannot fit
instead of letting the allocator (or the kernel's OOM killer) fail in the middle of a run. They count activations
only: the weights are already loaded (or can be offloaded by the host). The factors are upper-side counts of the
tensors the code keeps alive at once, checked against measured peaks on CPU (README, "What gets refused").
"""
from __future__ import annotations

import math

from .config import VAE_SCALE, TransformerConfig

GiB = 1024 ** 3
LATENT_CHANNELS = 4
TEXT_TOKENS = 120  # the original pads/truncates prompts to 120 T5 tokens

# Attention backends by how much of the score matrix they hold at once:
#   "flash"   none (torch SDPA flash/memory-efficient kernels, xformers, sage, flash-attn)
#   "chunked" query chunks of CHUNK_QUERIES rows (ComfyUI's sub-quadratic and split attention)
#   "math"    all of it, in fp32, plus its softmax
ATTENTION_BACKENDS = ("flash", "chunked", "math")
CHUNK_QUERIES = 512
# hidden-state sized tensors alive at once in a block: residual, norm output, q/k/v (+ the head-major copies some
# backends make), attention output and projection, the motion module's grid-order copies; measured on CPU
HIDDEN_COPIES = 14
# latent-sized fp32 tensors a sampling loop holds besides the model: noise, x, the doubled CFG input, the 8-channel
# model output (x2 with CFG), denoised, and up to 4 earlier outputs of multistep schedulers (PNDM, DPM++)
SAMPLER_LATENT_COPIES = 14


def dtype_bytes(dtype) -> int:
    """Bytes per element of a torch dtype (or an int already)."""
    return dtype if isinstance(dtype, int) else getattr(dtype, "itemsize", 4)


def latent_bytes(batch: int, frames: int, height: int, width: int, channels: int = LATENT_CHANNELS,
                 dtype=4) -> int:
    """A video latent of `batch` videos of `frames` frames at height x width PIXELS."""
    return batch * frames * channels * (height // VAE_SCALE) * (width // VAE_SCALE) * dtype_bytes(dtype)


def image_bytes(frames: int, height: int, width: int, channels: int = 3, dtype=4) -> int:
    """Decoded frames (ComfyUI IMAGE, fp32) at height x width pixels."""
    return frames * height * width * channels * dtype_bytes(dtype)


def attention_bytes(batch_heads: int, queries: int, keys: int, backend: str) -> int:
    """Score-matrix bytes an attention call holds at once (fp32 scores and softmax)."""
    if backend not in ATTENTION_BACKENDS:
        raise ValueError(f"attention backend: expected one of {ATTENTION_BACKENDS}, found {backend!r}")
    if backend == "flash":
        return 0
    if backend == "chunked":
        queries = min(queries, CHUNK_QUERIES)
    return batch_heads * queries * keys * 4 * 2


def transformer_bytes(config: TransformerConfig, videos: int, frames: int, height: int, width: int, dtype=4,
                      attention: str = "flash", temporal: bool = True, text_tokens: int = TEXT_TOKENS) -> int:
    """Peak activation bytes of one forward (no grad) of `videos` videos (x2 for CFG) at height x width LATENT."""
    p, dim, size = config.patch_size, config.inner_dim, dtype_bytes(dtype)
    grid = (height // p) * (width // p)  # tokens per frame
    rows = videos * frames
    hidden = rows * grid * dim * size
    # the conditioning as the model receives it: ComfyUI repeats it for every frame (frames-in-batch)
    context = rows * text_tokens * (config.caption_channels + dim) * size
    heads = config.num_attention_heads
    scores = max(attention_bytes(rows * heads, grid, grid, attention),  # spatial, per frame
                 attention_bytes(rows * heads, grid, text_tokens, attention))  # cross attention
    mm = config.motion_module
    if temporal and mm is not None:
        window = mm.block_size ** 2  # every block x block window of all frames is one sequence
        sequences = videos * grid // window
        scores = max(scores, attention_bytes(sequences * mm.num_attention_heads, frames * window, frames * window,
                                             attention))
    io = rows * (config.in_channels + config.out_channels) * height * width * 4
    return HIDDEN_COPIES * hidden + context + scores + io


def sampling_bytes(config: TransformerConfig, videos: int, frames: int, height: int, width: int, dtype=4,
                   attention: str = "flash", temporal: bool = True, window: int | None = None) -> int:
    """A whole sampling run at height x width LATENT: the sampler's latents plus the transformer's activations
    (of `window` frames per call under context windows, else of all frames).

    Cond and uncond are counted as separate forwards (hosts run them one after the other when both do not fit).
    """
    state = SAMPLER_LATENT_COPIES * videos * frames * config.in_channels * height * width * 4
    return state + transformer_bytes(config, videos, window or frames, height, width, dtype, attention, temporal)


def vae_decode_bytes(frames: int, height: int, width: int, block_out_channels=(128, 256, 512, 512), dtype=4) -> int:
    """Working memory of an SD-VAE decode of `frames` frames at height x width PIXELS (output not included).

    The largest activations are the second-to-last block's channels upsampled to full size, with the conv/norm
    outputs next to them.
    """
    channels = block_out_channels[1] if len(block_out_channels) > 1 else block_out_channels[0]
    return 3 * frames * channels * height * width * dtype_bytes(dtype)


def vae_encode_bytes(frames: int, height: int, width: int, block_out_channels=(128, 256, 512, 512), dtype=4) -> int:
    """Working memory of an SD-VAE encode at height x width PIXELS: the first block runs at full size."""
    return 3 * frames * block_out_channels[0] * height * width * dtype_bytes(dtype) * 2


def gib(n: float) -> str:
    """Bytes as GiB for messages: '17.2', or '<0.1'."""
    value = n / GiB
    return "<0.1" if value < 0.05 else f"{value:.1f}" if value < 100 else f"{math.ceil(value)}"
