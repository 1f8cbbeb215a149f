"""Output files in the release layouts (docs/MODEL.md §B, §D.6) and the weights of training checkpoints.

- `transformer/` diffusers folder: config.json + diffusion_pytorch_model.safetensors (metadata {"format": "pt"}),
  the full model (the 3D model with its `pos_encoder.pe` buffers, or the 603-key 2D model);
- the motion-module file: every key containing "temporal", release names, no metadata (easyanimate_v1_mm layout);
- the 2D checkpoint: the 603 DiT keys (easyanimate_portrait layout);
- kohya LoRA files: lora_unet__* / lora_te_* with alpha, sshs_model_hash / sshs_legacy_hash metadata.
"""
from __future__ import annotations

import json
import os

import numpy as np
import torch
from safetensors.torch import save_file

from ..files import load_state_dict_file
from ..loading import WEIGHTS_NAME
from ..lora import kohya_hashes

MOTION_MODULE_FILE = "easyanimate_v1_mm.safetensors"
CHECKPOINT_2D_FILE = "easyanimate_t2i.safetensors"
LORA_FILE = "easyanimate_lora.safetensors"
CHECKPOINT_LORA_FILE = "lora.safetensors"  # fp32 copy inside checkpoint-<step>/ (exact resume)


def _cpu(state: dict, dtype: torch.dtype | None = None) -> dict:
    return {k: (v.detach().to("cpu", dtype) if dtype is not None and v.is_floating_point() else v.detach().cpu())
            .contiguous() for k, v in state.items()}


def save_diffusers_transformer(model, folder: str) -> str:
    """folder/config.json + folder/diffusion_pytorch_model.safetensors; returns the folder."""
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, "config.json"), "w", encoding="utf-8") as f:
        json.dump(model.config.to_diffusers(), f, indent=2, sort_keys=True)
    save_file(_cpu(model.state_dict()), os.path.join(folder, f"{WEIGHTS_NAME}.safetensors"), {"format": "pt"})
    return folder


def save_motion_module(model, path: str) -> str:
    """The motion-module file exactly as the release's extra_motion_module.py writes it (docs/MODEL.md §B.4)."""
    state = model.temporal_state_dict()
    if not state:
        raise ValueError("the model has no motion module (a 2D model): nothing to save")
    save_file(_cpu(state), path)
    return path


def save_2d_checkpoint(model, path: str) -> str:
    """The 2D DiT weights (603 keys at PixArt-XL size), the layout of the portrait checkpoint (docs/MODEL.md §B.5)."""
    save_file(_cpu({k: v for k, v in model.state_dict().items() if not model.is_motion_key(k)}), path)
    return path


def save_lora(network, path: str, dtype: torch.dtype = torch.float32) -> str:
    """kohya LoRA file with the reference's metadata keys (docs/MODEL.md §B.6)."""
    tensors = network.lora_state_dict(dtype)
    save_file(tensors, path, kohya_hashes(tensors))
    return path


def write_preview(video: torch.Tensor, stem: str, fps: int = 12) -> str:
    """video [3, F, H, W] in 0..1 -> stem.gif (stem.png for one frame); uint8 by truncation like save_videos_grid."""
    import imageio.v3 as iio

    frames = (video.clamp(0, 1).permute(1, 2, 3, 0).float().numpy() * 255).astype(np.uint8)
    if len(frames) == 1:
        iio.imwrite(stem + ".png", frames[0])
        return stem + ".png"
    iio.imwrite(stem + ".gif", frames, duration=1000 / fps, loop=0)
    return stem + ".gif"


# ------------------------------------------------------------------------------------------- training checkpoints

def _is_lora(trainer) -> bool:
    return trainer.models.network is not None


def _weight_dtype(trainer):
    # the training dtype (--mixed_precision), which the reference also writes LoRA files in
    return trainer.autocast_dtype


def save_training_weights(trainer, path: str):
    """checkpoint-<step>/: LoRA modes write lora.safetensors (fp32) and, like the reference,
    <output_dir>/checkpoint-<step>.safetensors in the training dtype; full modes write transformer/ (fp32) and
    transformer_ema/ with EMA."""
    m = trainer.models
    if _is_lora(trainer):
        save_lora(m.network, os.path.join(path, CHECKPOINT_LORA_FILE))
        save_lora(m.network, path.rstrip(os.sep) + ".safetensors", _weight_dtype(trainer))
        return
    save_diffusers_transformer(m.transformer, os.path.join(path, "transformer"))
    if trainer.ema is not None:
        with trainer.ema.applied(m.trainable):
            save_diffusers_transformer(m.transformer, os.path.join(path, "transformer_ema"))


def load_training_weights(trainer, path: str):
    """Put the trainable weights of checkpoint `path` back into the model (fp32, exact)."""
    m = trainer.models
    if _is_lora(trainer):
        m.network.load_lora_state_dict(load_state_dict_file(os.path.join(path, CHECKPOINT_LORA_FILE))[0])
        return
    state, _ = load_state_dict_file(os.path.join(path, "transformer", f"{WEIGHTS_NAME}.safetensors"))
    missing = [n for n in m.trainable if n not in state]
    if missing:
        raise ValueError(f"{path}/transformer: checkpoint lacks {len(missing)} trainable weights, e.g. {missing[:3]}")
    with torch.no_grad():
        for name, p in m.trainable.items():
            p.copy_(state[name])


def save_final(trainer) -> dict[str, str]:
    """The run's outputs in output_dir (EMA weights when --use_ema, as the reference saves them)."""
    args, m = trainer.args, trainer.models
    out = args.output_dir
    os.makedirs(out, exist_ok=True)
    if trainer.ema is not None:
        with torch.no_grad():
            for name, p in m.trainable.items():
                p.copy_(trainer.ema.shadow[name])
    if _is_lora(trainer):
        return {"lora": save_lora(m.network, os.path.join(out, LORA_FILE), _weight_dtype(trainer))}
    files = {"transformer": save_diffusers_transformer(m.transformer, os.path.join(out, "transformer"))}
    if args.video:
        files["motion_module"] = save_motion_module(m.transformer, os.path.join(out, MOTION_MODULE_FILE))
    else:
        files["checkpoint_2d"] = save_2d_checkpoint(m.transformer, os.path.join(out, CHECKPOINT_2D_FILE))
    return files
