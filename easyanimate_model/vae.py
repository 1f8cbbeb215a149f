"""The SD-1.x AutoencoderKL of the PixArt folder (docs/MODEL.md §C.6): loading, frame-chunked decode and encode.

v1 decodes latents × (1/0.18215) one frame at a time and returns `(x/2 + 0.5).clamp(0, 1)`; decoding in chunks of
frames gives the same frames while memory stays flat in the frame count. diffusers is imported on use.
"""
from __future__ import annotations

from pathlib import Path

import torch

from .errors import EasyAnimateLoadError
from .files import describe, find_weights, load_state_dict_file, read_json, validate_shapes

# Hard-coded in the v1 pipeline (not read from the VAE config).
SCALING_FACTOR = 0.18215

# stabilityai/sd-vae-ft-ema (= PixArt-XL-2-512x512/vae); the shape-derived fields are overwritten per file.
SD_VAE_CONFIG = {
    "in_channels": 3,
    "out_channels": 3,
    "down_block_types": ["DownEncoderBlock2D"] * 4,
    "up_block_types": ["UpDecoderBlock2D"] * 4,
    "block_out_channels": [128, 256, 512, 512],
    "layers_per_block": 2,
    "act_fn": "silu",
    "latent_channels": 4,
    "norm_num_groups": 32,
    "sample_size": 256,
    "scaling_factor": SCALING_FACTOR,
}


# a diffusers vae/ folder's weights, in the order diffusers prefers them
VAE_WEIGHTS = ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.bin")


def vae_folder(path) -> Path:
    """The diffusers VAE folder of a pipeline folder (its vae/) or of a VAE folder itself."""
    path = Path(path)
    return path / "vae" if (path / "vae").is_dir() else path


def read_vae_folder(folder) -> tuple[dict, dict, Path]:
    """(config, diffusers-layout state dict, weights file) of a diffusers VAE folder, read with the library's file
    reader (a damaged or unsafe file is an EasyAnimateLoadError naming it)."""
    folder = Path(folder)
    config_file = folder / "config.json"
    config = read_json(config_file, "the AutoencoderKL config.json of a diffusers VAE folder")
    if config.get("_class_name", "AutoencoderKL") != "AutoencoderKL":
        raise EasyAnimateLoadError(f"{config_file}: expected _class_name 'AutoencoderKL', found "
                                   f"{config.get('_class_name')!r}")
    weights = find_weights(folder, VAE_WEIGHTS, "VAE weights")
    state, _ = load_state_dict_file(weights)
    return config, _rename_legacy_attention(state), weights


def load_vae(path, dtype: torch.dtype = torch.float32, device="cpu"):
    """AutoencoderKL from a pipeline folder (uses vae/), a diffusers vae folder, or a single SD-VAE file
    (.safetensors/.ckpt/.pt in the original LDM key layout, optionally `first_stage_model.`-prefixed, or in the
    diffusers layout). Keys and shapes are checked before loading; every error is an EasyAnimateLoadError."""
    path = Path(path)
    if path.is_dir():
        folder = vae_folder(path)
        if not (folder / "config.json").is_file():
            raise EasyAnimateLoadError(f"{path}: expected a pipeline folder with vae/ or a diffusers VAE folder "
                                       f"(config.json + weights), found {describe(path)}")
        config, state, weights = read_vae_folder(folder)
        vae = _build_vae(config, state, weights)
    elif path.is_file():
        vae = _vae_from_single_file(path)
    else:
        raise EasyAnimateLoadError(f"{path}: expected a VAE folder or file, found {describe(path)}")
    # nn.Module.to: diffusers' own .to() warns about fp32-kept modules, which AutoencoderKL does not have
    return torch.nn.Module.to(vae, device=device, dtype=dtype).eval().requires_grad_(False)


# diffusers files written before its attention refactor name the mid-block attention projections differently
_LEGACY_ATTENTION = {"query": "to_q", "key": "to_k", "value": "to_v", "proj_attn": "to_out.0"}


def _rename_legacy_attention(state: dict) -> dict:
    out = {}
    for key, value in state.items():
        parts = key.rsplit(".", 2)
        if ".attentions." in key and len(parts) == 3 and parts[1] in _LEGACY_ATTENTION:
            key = f"{parts[0]}.{_LEGACY_ATTENTION[parts[1]]}.{parts[2]}"
        out[key] = value
    return out


def _build_vae(config: dict, state: dict, source):
    """An AutoencoderKL of `config` holding `state`, every key and shape checked first (errors name `source`)."""
    from diffusers import AutoencoderKL

    try:
        vae = AutoencoderKL.from_config({k: v for k, v in config.items() if not k.startswith("_")})
    except (TypeError, ValueError) as e:
        raise EasyAnimateLoadError(f"{source}: expected an AutoencoderKL config, could not build it: {e}") from None
    expected = {k: tuple(v.shape) for k, v in vae.state_dict().items()}
    # old files store the attention projections as 1x1 convs [C, C, 1, 1] where diffusers now has Linear [C, C]
    state = {k: v[:, :, 0, 0] if v.ndim == 4 and len(expected.get(k, ())) == 2 else v for k, v in state.items()}
    validate_shapes({k: tuple(v.shape) for k, v in state.items()}, expected, source,
                    what=f"an SD VAE with block_out_channels {list(vae.config.block_out_channels)}")
    vae.load_state_dict(state, strict=True)
    return vae


def _strip_prefix(sd: dict) -> dict:
    for prefix in ("first_stage_model.", "vae."):
        if any(k.startswith(prefix) for k in sd):
            return {k[len(prefix):]: v for k, v in sd.items() if k.startswith(prefix)}
    return sd


def _vae_from_single_file(path: Path):
    sd = _strip_prefix(load_state_dict_file(path)[0])
    if "encoder.conv_in.weight" not in sd or "decoder.conv_out.weight" not in sd:
        raise EasyAnimateLoadError(f"{path}: expected an SD VAE state dict (encoder.conv_in.weight, "
                                   f"decoder.conv_out.weight, ...), found keys like {sorted(sd)[:4]}")
    config = dict(SD_VAE_CONFIG)
    diffusers_layout = any(k.startswith("encoder.down_blocks.") for k in sd)
    block = ("encoder.down_blocks.{}.resnets.{}.conv1.weight" if diffusers_layout
             else "encoder.down.{}.block.{}.conv1.weight")
    levels = [i for i in range(16) if block.format(i, 0) in sd]
    config["block_out_channels"] = [sd[block.format(i, 0)].shape[0] for i in levels]
    config["layers_per_block"] = sum(block.format(0, j) in sd for j in range(8))
    config["down_block_types"] = ["DownEncoderBlock2D"] * len(levels)
    config["up_block_types"] = ["UpDecoderBlock2D"] * len(levels)
    config["latent_channels"] = sd["encoder.conv_out.weight"].shape[0] // 2
    if diffusers_layout:
        sd = _rename_legacy_attention(sd)
    else:
        from diffusers.loaders.single_file_utils import convert_ldm_vae_checkpoint

        sd = convert_ldm_vae_checkpoint(sd, config)
    return _build_vae(config, sd, path)


def map_frame_chunks(fn, frames: torch.Tensor, chunk: int, out_device=None, progress=None) -> torch.Tensor:
    """`fn` applied to `chunk` rows of `frames` at a time, the results concatenated (on `out_device` if given).

    Each chunk's result leaves the compute device before the next chunk runs, so the peak working memory is that of
    one chunk whatever the frame count (only the collected output grows). `progress(done, total)` after each chunk.
    """
    if chunk < 1:
        raise ValueError(f"chunk: expected a positive frame count, found {chunk}")
    total = frames.shape[0]
    if total == 0:
        raise ValueError("frames: expected at least one frame, found none")
    out = None
    for start in range(0, total, chunk):
        rows = frames[start:start + chunk]
        part = fn(rows)
        if part.shape[0] != rows.shape[0]:
            raise ValueError(f"expected one result per frame, found {part.shape[0]} for {rows.shape[0]} frames")
        if out is None:  # filled in place: no second full-size copy from a final cat
            out = part.new_empty((total, *part.shape[1:]), device=part.device if out_device is None else out_device)
        out[start:start + part.shape[0]] = part
        if progress is not None:
            progress(min(start + chunk, total), total)
    return out


FIT_MODES = ("error", "center crop", "resize")


def fit_frames(images: torch.Tensor, multiple: int, mode: str = "error") -> torch.Tensor:
    """Frames [N, H, W, C] (ComfyUI IMAGE layout) brought to a height and width that are multiples of `multiple`.

    "error" raises a ValueError naming the size and the nearest valid one; "center crop" cuts the borders down to
    the multiple below; "resize" scales (bilinear, antialiased) to the nearest multiple (at least one `multiple`).
    """
    if images.ndim != 4:
        raise ValueError(f"expected frames [N, H, W, C], found shape {tuple(images.shape)}")
    if mode not in FIT_MODES:
        raise ValueError(f"size mode: expected one of {FIT_MODES}, found {mode!r}")
    h, w = images.shape[1:3]
    if h % multiple == 0 and w % multiple == 0:
        return images
    if mode == "error":
        near = [max(multiple, round(v / multiple) * multiple) for v in (w, h)]
        raise ValueError(f"frames are {w}x{h} (width x height); EasyAnimate needs multiples of {multiple} pixels: "
                         f"resize to e.g. {near[0]}x{near[1]} or choose 'center crop' / 'resize'")
    if mode == "center crop":
        th, tw = h // multiple * multiple, w // multiple * multiple
        if th == 0 or tw == 0:
            raise ValueError(f"frames are {w}x{h}: smaller than {multiple} pixels, nothing left after cropping")
        top, left = (h - th) // 2, (w - tw) // 2
        return images[:, top:top + th, left:left + tw]
    th, tw = (max(multiple, round(v / multiple) * multiple) for v in (h, w))
    resized = torch.nn.functional.interpolate(images.movedim(-1, 1).float(), size=(th, tw), mode="bilinear",
                                              align_corners=False, antialias=True)
    return resized.movedim(1, -1).clamp(0, 1).to(images.dtype)


def _vae_dtype(vae) -> torch.dtype:
    return next(vae.parameters()).dtype


def _vae_device(vae) -> torch.device:
    return next(vae.parameters()).device


@torch.no_grad()
def decode_latents(vae, latents: torch.Tensor, chunk: int = 1, tiled: bool = False) -> torch.Tensor:
    """Latents [B, 4, F, h, w] -> video [B, 3, F, 8h, 8w] float32 in 0..1, on the CPU.

    Frames are decoded `chunk` at a time (v1 used 1) and moved to the CPU at once, so device memory does not grow
    with the frame count. `tiled` decodes each frame in overlapping tiles (diffusers VAE tiling) for large frames.
    """
    if latents.ndim != 5:
        raise ValueError(f"latents: expected [B, C, F, h, w], found shape {tuple(latents.shape)}")
    b, c, f, h, w = latents.shape
    # multiply by the reciprocal and map to 0..1 in the VAE's dtype: the original's exact op order (bit-exact parity)
    frames = (latents * (1 / SCALING_FACTOR)).transpose(1, 2).reshape(b * f, c, h, w)
    frames = frames.to(device=_vae_device(vae), dtype=_vae_dtype(vae))
    was_tiled = vae.use_tiling
    vae.enable_tiling() if tiled else vae.disable_tiling()
    try:
        video = map_frame_chunks(lambda x: (vae.decode(x).sample / 2 + 0.5).clamp(0, 1).cpu().float(), frames, chunk)
    finally:
        vae.enable_tiling() if was_tiled else vae.disable_tiling()
    return video.view(b, f, *video.shape[1:]).transpose(1, 2)


@torch.no_grad()
def latent_distribution(vae, frames: torch.Tensor, chunk: int = 8) -> tuple[torch.Tensor, torch.Tensor]:
    """Frames [N, 3, H, W] in -1..1 -> the VAE posterior (mean, std), each [N, 4, H/8, W/8] float32, unscaled.

    Encoded `chunk` frames at a time (training's `--vae_mini_batch`) in the VAE's dtype and device."""
    def posterior(part):
        dist = vae.encode(part.to(device=_vae_device(vae), dtype=_vae_dtype(vae))).latent_dist
        return torch.cat([dist.mean, dist.std], dim=1).float()

    mean, std = map_frame_chunks(posterior, frames, chunk).chunk(2, dim=1)
    return mean.contiguous(), std.contiguous()  # own storage each: training caches them separately


def sample_latents(mean: torch.Tensor, std: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """A posterior sample `mean + std * noise` times SCALING_FACTOR: the latents training uses (docs/MODEL.md §D.5).

    The noise is drawn for the whole tensor at once (float32, on `mean`'s device), so the result does not depend on
    the encoding chunk size or on whether (mean, std) came from a cache."""
    noise = torch.randn(mean.shape, generator=generator, device=mean.device, dtype=torch.float32)
    return (mean + std * noise) * SCALING_FACTOR


def encode_frames(vae, frames: torch.Tensor, chunk: int = 8, generator: torch.Generator | None = None,
                  sample: bool = True) -> torch.Tensor:
    """Video [B, 3, F, H, W] in 0..1 -> latents [B, 4, F, H/8, W/8] x 0.18215 (float32, the training latents).

    Frames are encoded `chunk` at a time; `sample=False` takes the posterior mean."""
    if frames.ndim != 5 or frames.shape[1] != 3:
        raise ValueError(f"frames: expected [B, 3, F, H, W], found shape {tuple(frames.shape)}")
    b, c, f, h, w = frames.shape
    mean, std = latent_distribution(vae, (frames * 2 - 1).transpose(1, 2).reshape(b * f, c, h, w), chunk)
    latents = sample_latents(mean, std, generator) if sample else mean * SCALING_FACTOR
    return latents.view(b, f, *latents.shape[1:]).transpose(1, 2)
