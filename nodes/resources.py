"""Refuse what cannot fit before it is allocated: the library's estimates (easyanimate_model.memory) against what the
device, or the CPU's RAM, can give after ComfyUI's own reservations.

On a GPU only activations are counted against everything this process could hold there (free memory plus what torch
holds, which includes weights ComfyUI can offload in lowvram mode), so ComfyUI's offloading still gets to run what fits
with offload. On the CPU the limit is the smallest of available RAM, the address-space limit (`ulimit -v`) and the
cgroup memory limit, less ComfyUI's inference reserve.
"""
from __future__ import annotations

import resource

import torch

import comfy.model_management as mm
from comfy.ldm.modules import attention as comfy_attention

from ..easyanimate_model import memory
from .keys import FRAMES_KEY, SCHEDULE_KEY, TEMPORAL_OPTION

# ComfyUI's attention functions by how they hold the score matrix (memory.ATTENTION_BACKENDS)
_CHUNKED = ("attention_sub_quad", "attention_split")


def attention_backend(function=None) -> str:
    """The memory class of an attention function (default: ComfyUI's optimized_attention)."""
    function = function or comfy_attention.optimized_attention
    name = getattr(function, "__name__", "")
    if name in _CHUNKED:
        return "chunked"
    if name == "attention_basic":
        return "math"
    if name == "attention_pytorch" and mm.is_device_cpu(mm.get_torch_device()):
        return "chunked"  # CPU SDPA may fall back to the math kernel; count it as chunked
    return "flash"


def _address_space_left():
    soft, _ = resource.getrlimit(resource.RLIMIT_AS)
    if soft == resource.RLIM_INFINITY:
        return None
    with open("/proc/self/statm") as f:
        used = int(f.read().split()[0]) * resource.getpagesize()
    return soft - used


def _cgroup_left():
    try:
        with open("/sys/fs/cgroup/memory.max") as f:
            limit = f.read().strip()
        with open("/sys/fs/cgroup/memory.current") as f:
            used = int(f.read())
    except (OSError, ValueError):
        return None
    return None if limit == "max" else int(limit) - used


def available_bytes(device) -> int:
    """Bytes this process can still allocate on `device` for activations, after ComfyUI's reserve."""
    device = torch.device(device)
    if device.type == "cpu":
        limits = [mm.get_free_memory(device), _address_space_left(), _cgroup_left()]
        return max(0, int(min(v for v in limits if v is not None) - mm.minimum_inference_memory()))
    free = mm.get_free_memory(device)  # device free + torch's cached blocks
    if device.type == "cuda":
        free += torch.cuda.memory_allocated(device)  # what torch holds, weights included: ComfyUI can offload them
    return max(0, int(free - mm.extra_reserved_memory()))


def device_name(device) -> str:
    device = torch.device(device)
    return "this CPU" if device.type == "cpu" else f"this device ({device})"


def refuse_if_too_big(what: str, needed: int, device, advice: str, node: str):
    """Raise MemoryError "<node>: <what> needs ~N GiB, this device has M GiB free; try <advice>" when it cannot fit."""
    free = available_bytes(device)
    if needed > free:
        raise MemoryError(f"{node}: {what} needs ~{memory.gib(needed)} GiB, {device_name(device)} has "
                          f"{memory.gib(free)} GiB free; try {advice}")


def check_latent(batch: int, frames: int, height: int, width: int, node: str):
    """An empty latent: refused when the latent a sampler must hold twice (noise and result) cannot fit."""
    needed = 2 * memory.latent_bytes(batch, frames, height, width)
    fit = max(1, frames * available_bytes(mm.intermediate_device()) // max(1, needed))
    refuse_if_too_big(f"{width}x{height}x{frames} (batch {batch})", needed, mm.intermediate_device(),
                      f"fewer frames (at most ~{fit} at this size) or a smaller size", node)


def check_sampling(model, batch: int, frames: int, height: int, width: int, node: str, conds=None):
    """Sampling `batch` videos of `frames` frames at height x width LATENT with the MODEL (a ModelPatcher): the
    latents of all frames, the activations of one model call (a context window's frames when the MODEL has context
    options) and the per-call contexts of prompt schedules in `conds` (core's {name: [cond dict]})."""
    inner = model.model
    dit = inner.diffusion_model
    dtype = inner.manual_cast_dtype or inner.get_dtype()
    backend = attention_backend(dit.transformer_blocks[0].attn1.attention if len(dit.transformer_blocks) else None)
    options = model.model_options
    temporal = bool(options.get("transformer_options", {}).get(TEMPORAL_OPTION, False))
    window = getattr(options.get("context_handler"), "context_length", None)
    window = min(frames, window) if isinstance(window, int) and window > 0 else None
    needed = memory.sampling_bytes(dit.config, batch, frames, height, width, dtype, backend, temporal, window)
    for entries in (conds or {}).values():
        for cond in entries or ():
            schedule = cond.get(SCHEDULE_KEY) if isinstance(cond, dict) else None
            if hasattr(schedule, "memory_estimate"):  # a library PromptSchedule
                needed += schedule.memory_estimate(frames, window)["per_call"] * batch
    call_frames = window or frames
    fit = call_frames * available_bytes(model.load_device) // max(1, needed)
    advice = ("a smaller size" if fit < 1 else f"a shorter context_length (~{fit} fit at this size)" if window
              else f"fewer frames (~{fit} fit at this size)")
    if backend != "flash":
        advice += " or an attention backend that does not hold the score matrix (--use-pytorch-cross-attention on GPU)"
    refuse_if_too_big(f"sampling {width * memory.VAE_SCALE}x{height * memory.VAE_SCALE}x{frames} (batch {batch}"
                      f"{f', windows of {window}' if window else ''})", needed, model.load_device, advice, node)


def memory_required(config, input_shape, dtype) -> int:
    """ComfyUI's BaseModel.memory_required for an EasyAnimate model: one forward of input_shape [rows, 4, h, w]
    (frames-in-batch; counted as one video, which bounds the temporal attention from above)."""
    rows, _, height, width = input_shape
    return memory.transformer_bytes(config, 1, rows, height, width, dtype, attention_backend())


def prepare_sampling_guard(executor, model, noise_shape, conds, model_options=None, **kwargs):
    """PREPARE_SAMPLING wrapper: core KSampler and every sampler built on comfy.samplers is checked before the
    model is loaded (the smallest run: cond and uncond one after the other)."""
    if len(noise_shape) == 4:
        frames = model.model_options.get("transformer_options", {}).get(FRAMES_KEY) or noise_shape[0]
        check_sampling(model, max(1, noise_shape[0] // frames), frames, noise_shape[2], noise_shape[3],
                       "EasyAnimate sampling", conds)
    return executor(model, noise_shape, conds, model_options=model_options, **kwargs)


def check_vae_decode(vae, frames: int, height: int, width: int, frames_per_chunk: int, tiled: bool, node: str):
    """Decoding `frames` latent frames of height x width LATENT with a comfy.sd.VAE, `frames_per_chunk` at a time
    (vae.map_frame_chunks): all decoded frames (filled in place) plus one chunk's output and working memory."""
    scale = getattr(vae, "upscale_ratio", memory.VAE_SCALE)
    scale = scale if isinstance(scale, int) else memory.VAE_SCALE
    h, w = height * scale, width * scale
    chunk = 1 if tiled else min(frames, frames_per_chunk)
    tile = min(h, 512) * min(w, 512) if tiled else h * w  # ComfyUI's decode_tiled works on 512 px tiles
    images = memory.image_bytes(frames + chunk, h, w)
    refuse_if_too_big(f"decoding {w}x{h}x{frames}", images, mm.intermediate_device(), "fewer frames or a smaller size",
                      node)
    refuse_if_too_big(f"decoding {w}x{h} in chunks of {chunk} frames",
                      memory.vae_decode_bytes(chunk, 1, tile, dtype=vae.vae_dtype), vae.device,
                      "frames_per_chunk 1 or tiled", node)


def check_vae_encode(vae, frames: int, height: int, width: int, frames_per_chunk: int, node: str):
    """Encoding `frames` frames of height x width PIXELS, `frames_per_chunk` at a time: the latents plus one chunk's
    work."""
    chunk = min(frames, frames_per_chunk)
    needed = memory.latent_bytes(1, frames, height, width) + memory.vae_encode_bytes(chunk, height, width,
                                                                                     dtype=vae.vae_dtype)
    refuse_if_too_big(f"encoding {width}x{height}x{frames} in chunks of {chunk} frames", needed, vae.device,
                      "fewer frames, a smaller size or a smaller frames_per_chunk", node)
