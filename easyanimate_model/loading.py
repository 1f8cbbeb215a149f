"""Loading EasyAnimate v1 transformer weights from every release layout (docs/MODEL.md §A.6, §B).

Accepted, unchanged:
- a PixArt-alpha / EasyAnimate diffusers pipeline folder (`model_index.json` + `transformer/` ...): uses `transformer/`;
- a diffusers transformer folder: `config.json` + `diffusion_pytorch_model.safetensors` (or its sharded
  `.safetensors.index.json`, or `.bin`);
- single files: the full 3D model (B.3), the 2D DiT (B.1, e.g. the portrait checkpoint), original PixArt-key files
  (`blocks.N.attn.qkv`, `x_embedder`, ...; converted on load), a top-level `"state_dict"` wrapper;
- motion-module files (B.4, with or without the `pos_encoder.pe` buffers) passed as `motion_module=`.

Everything is checked on key names and shapes (safetensors headers) before any large tensor is read; errors are
`EasyAnimateLoadError` naming the file, what was expected and what was found. The model is built on the meta device
and filled with `load_state_dict(assign=True)`, and tensors are cast one at a time while reading, so a checkpoint is
held in memory once, in the target dtype.
"""
from __future__ import annotations

import dataclasses
import logging
import os
import re
from pathlib import Path

import torch

from .config import MotionModuleConfig, TransformerConfig
from .errors import EasyAnimateLoadError
from .files import (CheckpointFile, describe, find_weights, first_names, identify_foreign, open_weights, read_json,
                    validate_shapes)
from .motion_module import VanillaTemporalModule
from .transformer import Transformer3DModel

log = logging.getLogger(__name__)

WEIGHTS_NAME = "diffusion_pytorch_model"
# a diffusers model folder's weights, in the order diffusers prefers them
DIFFUSERS_WEIGHTS = (f"{WEIGHTS_NAME}.safetensors.index.json", f"{WEIGHTS_NAME}.safetensors", f"{WEIGHTS_NAME}.bin")
# PixArt-XL-2 is the only released size; heads cannot be read from shapes, so hidden size -> (heads, head dim)
KNOWN_HEADS = {1152: (16, 72)}
DIT_PREFIXES = ("transformer_blocks.", "pos_embed.", "adaln_single.", "caption_projection.", "proj_out.",
                "scale_shift_table")


_is_motion_key = Transformer3DModel.is_motion_key


def check_diffusers_config(cfg: dict, source) -> None:
    """Reject transformer configs of PixArt variants EasyAnimate v1 is not built on (PixArt-Sigma, 1024 models)."""
    if cfg.get("use_additional_conditions"):
        raise EasyAnimateLoadError(
            f"{source}: expected the PixArt-XL-2-512x512 transformer config (no micro-conditions), found "
            f"use_additional_conditions=true (PixArt-alpha 1024 / PixArt-Sigma)")
    if cfg.get("sample_size", 64) != 64:
        raise EasyAnimateLoadError(
            f"{source}: expected sample_size 64 (PixArt-XL-2-512x512, the base of EasyAnimate v1), found "
            f"{cfg['sample_size']} (a PixArt-alpha 1024 / PixArt-Sigma transformer)")
    if cfg.get("interpolation_scale") not in (None, 1):
        raise EasyAnimateLoadError(
            f"{source}: expected interpolation_scale 1 (PixArt-XL-2-512x512), found {cfg['interpolation_scale']} "
            f"(a PixArt-Sigma transformer)")


# ----------------------------------------------------------------------------------------------------------------
# Original PixArt key names -> diffusers names

_PIXART_RENAMES = [  # (original, diffusers) name prefixes; the block entries are below `blocks.N.`
    ("x_embedder.proj.", "pos_embed.proj."),
    ("t_embedder.mlp.0.", "adaln_single.emb.timestep_embedder.linear_1."),
    ("t_embedder.mlp.2.", "adaln_single.emb.timestep_embedder.linear_2."),
    ("t_block.1.", "adaln_single.linear."),
    ("y_embedder.y_proj.fc1.", "caption_projection.linear_1."),
    ("y_embedder.y_proj.fc2.", "caption_projection.linear_2."),
    ("final_layer.linear.", "proj_out."),
    ("final_layer.scale_shift_table", "scale_shift_table"),
]
_PIXART_BLOCK_RENAMES = [
    ("scale_shift_table", ["scale_shift_table"]),
    ("attn.qkv.", ["attn1.to_q.", "attn1.to_k.", "attn1.to_v."]),
    ("attn.proj.", ["attn1.to_out.0."]),
    ("cross_attn.q_linear.", ["attn2.to_q."]),
    ("cross_attn.kv_linear.", ["attn2.to_k.", "attn2.to_v."]),
    ("cross_attn.proj.", ["attn2.to_out.0."]),
    ("mlp.fc1.", ["ff.net.0.proj."]),
    ("mlp.fc2.", ["ff.net.2."]),
]
# not weights of the diffusers model: the learned null caption (classifier-free dropout) and the fixed pos table
_PIXART_DROPPED = ("y_embedder.y_embedding", "pos_embed")


def is_original_pixart(keys) -> bool:
    return any(k.startswith(("blocks.0.attn.qkv.", "x_embedder.", "t_block.")) for k in keys)


def key_plan(shapes: dict[str, tuple]) -> dict[str, tuple[str, int, int]]:
    """{diffusers key: (file key, chunk index, chunks)}: how each model key is read from a file.

    Diffusers/EasyAnimate files map 1:1; original PixArt files are renamed and their fused qkv / kv split on dim 0.
    Keys that do not convert are kept under their own name (reported later as unexpected).
    """
    if not is_original_pixart(shapes):
        return {k: (k, 0, 1) for k in shapes}
    plan = {}
    for key in shapes:
        if key in _PIXART_DROPPED:
            continue
        targets = [key]
        m = re.match(r"blocks\.(\d+)\.(.*)", key)
        if m:
            for old, news in _PIXART_BLOCK_RENAMES:
                if m.group(2).startswith(old):
                    rest = m.group(2)[len(old):]
                    targets = [f"transformer_blocks.{m.group(1)}.{new}{rest}" for new in news]
                    break
        else:
            for old, new in _PIXART_RENAMES:
                if key.startswith(old):
                    targets = [new + key[len(old):]]
                    break
        for i, target in enumerate(targets):
            plan[target] = (key, i, len(targets))
    return plan


def planned_shapes(plan, shapes) -> dict[str, tuple]:
    out = {}
    for new, (old, _, parts) in plan.items():
        shape = shapes[old]
        out[new] = (shape[0] // parts, *shape[1:]) if parts > 1 else shape
    return out


def _read_planned(weights, plan, dtype, device) -> dict[str, torch.Tensor]:
    tensors = weights.read(sorted({old for old, _, _ in plan.values()}), dtype, device)
    # split parts are cloned: views of one fused tensor would share storage (safetensors refuses to save that)
    return {new: tensors[old].chunk(parts, dim=0)[i].clone() if parts > 1 else tensors[old]
            for new, (old, i, parts) in plan.items()}


# ----------------------------------------------------------------------------------------------------------------
# Config


def infer_config(shapes, source="state dict", motion_module: MotionModuleConfig | None = None) -> TransformerConfig:
    """TransformerConfig from the key shapes of a diffusers-layout state dict (values: tensors or shapes).

    Reads hidden size (pos_embed.proj), layers (block count), caption width, in/out channels and patch size. Head
    count is not in the shapes: only the released hidden size 1152 (16 heads x 72) is known; anything else needs an
    explicit `config=`. `motion_module` is used as given, or inferred when motion-module keys are present.
    """
    shapes = {k: tuple(v.shape) if isinstance(v, torch.Tensor) else tuple(v) for k, v in shapes.items()}
    needed = ("pos_embed.proj.weight", "caption_projection.linear_1.weight", "proj_out.weight")
    absent = [k for k in needed if k not in shapes]
    if absent:
        raise EasyAnimateLoadError(
            f"{source}: cannot infer the transformer config: expected the PixArt keys {', '.join(needed)}, "
            f"missing {', '.join(absent)}")
    hidden, in_channels, patch, _ = shapes["pos_embed.proj.weight"]
    if hidden not in KNOWN_HEADS:
        raise EasyAnimateLoadError(
            f"{source}: hidden size {hidden} is not the released PixArt-XL-2 size (1152 = 16 heads x 72); the "
            f"number of attention heads cannot be read from the weights: pass config= (a TransformerConfig or a "
            f"diffusers config dict)")
    heads, head_dim = KNOWN_HEADS[hidden]
    blocks = {int(m.group(1)) for k in shapes if (m := re.match(r"transformer_blocks\.(\d+)\.", k))}
    cross = shapes.get("transformer_blocks.0.attn2.to_k.weight", (hidden, hidden))[1]
    if motion_module is None and any(_is_motion_key(k) for k in shapes):
        motion_module = infer_motion_config(shapes)
    return TransformerConfig(
        num_layers=max(blocks) + 1 if blocks else 0, num_attention_heads=heads, attention_head_dim=head_dim,
        in_channels=in_channels, out_channels=shapes["proj_out.weight"][0] // (patch * patch), patch_size=patch,
        caption_channels=shapes["caption_projection.linear_1.weight"][1], cross_attention_dim=cross,
        motion_module=motion_module)


def infer_motion_config(shapes) -> MotionModuleConfig:
    """Motion-module config from its keys: block and attention counts, PE length; the rest are the v1 values."""
    prefix = r"transformer_blocks\.0\.attn_temporal\.temporal_transformer\.transformer_blocks\."
    blocks = {int(m.group(1)) for k in shapes if (m := re.match(prefix + r"(\d+)\.", k))}
    attns = {int(m.group(1)) for k in shapes if (m := re.match(prefix + r"0\.attention_blocks\.(\d+)\.", k))}
    pe = next((s for k, s in shapes.items() if k.endswith("pos_encoder.pe")), None)
    default = MotionModuleConfig()
    return dataclasses.replace(
        default,
        num_transformer_block=max(blocks) + 1 if blocks else default.num_transformer_block,
        attention_block_types=("Temporal_Self",) * (max(attns) + 1) if attns else default.attention_block_types,
        temporal_position_encoding_max_len=pe[1] if pe else default.temporal_position_encoding_max_len)


# ----------------------------------------------------------------------------------------------------------------
# Sources


def _open_model_path(path: Path):
    """(weights, config dict or None) of a pipeline folder, a transformer folder or a single file."""
    if path.is_file():
        return CheckpointFile(path), None
    if not path.is_dir():
        raise EasyAnimateLoadError(f"{path}: expected a transformer file or a diffusers folder, found nothing there")
    index = path / "model_index.json"
    if index.is_file():
        pipeline_class = read_json(index, "a diffusers model_index.json").get("_class_name", "")
        if "Sigma" in pipeline_class:
            raise EasyAnimateLoadError(
                f"{path}: expected a PixArt-alpha / EasyAnimate pipeline, found a {pipeline_class} (PixArt-Sigma); "
                f"EasyAnimate v1 is built on PixArt-XL-2-512x512 (PixArt-alpha)")
        if not (path / "transformer").is_dir():
            raise EasyAnimateLoadError(
                f"{path}: expected a PixArt/EasyAnimate diffusers pipeline with a transformer/ folder, found a "
                f"{pipeline_class or 'pipeline'} without one")
        path = path / "transformer"
    config_file = path / "config.json"
    config = None
    if config_file.is_file():
        config = read_json(config_file, "a diffusers transformer config.json")
        check_diffusers_config(config, config_file)
    weights = find_weights(path, DIFFUSERS_WEIGHTS, "a diffusers transformer folder")
    return open_weights(weights), config


def _reject_foreign(weights, role: str):
    what = identify_foreign(weights.shapes)
    if what:
        raise EasyAnimateLoadError(f"{weights.path}: expected {role}, found {what}")


def motion_module_keys(weights) -> list[str]:
    """The motion-module keys of a motion-module file (docs/MODEL.md §B.4); a full checkpoint's DiT keys are ignored
    with a warning, anything else is an error naming the file."""
    _reject_foreign(weights, "an EasyAnimate motion module (transformer_blocks.N.attn_temporal... keys)")
    motion = [k for k in weights.keys() if _is_motion_key(k)]
    others = [k for k in weights.keys() if not _is_motion_key(k)]
    if not motion:
        raise EasyAnimateLoadError(
            f"{weights.path}: expected an EasyAnimate motion module (keys 'transformer_blocks.N.attn_temporal...'), "
            f"found no motion-module keys among {len(others)} keys ({first_names(others)})")
    if others:
        unknown = [k for k in others if not k.startswith(DIT_PREFIXES)]
        if unknown:
            raise EasyAnimateLoadError(
                f"{weights.path}: expected a motion module, found {len(unknown)} keys that are neither motion-module "
                f"nor DiT keys: {first_names(unknown)}")
        log.warning("%s holds a full checkpoint (%d DiT keys besides %d motion-module keys): as motion_module only "
                    "its motion-module keys are used", weights.path, len(others), len(motion))
    return motion


def read_motion_module(path, config: TransformerConfig, dtype=None, device="cpu"
                       ) -> tuple[TransformerConfig, dict[str, torch.Tensor]]:
    """(`config` with the motion module of `path`, its motion-module tensors). The file's block/attention counts and
    PE length decide the motion-module config (replacing one `config` may have); the tensors are checked against the
    keys and shapes of a model built from it; files without the `pos_encoder.pe` tables are accepted (§B.4)."""
    weights = open_weights(path)
    keys = motion_module_keys(weights)
    shapes = {k: weights.shapes[k] for k in keys}
    config = dataclasses.replace(config, motion_module=infer_motion_config(shapes))
    model = Transformer3DModel(config, device="meta")
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items() if _is_motion_key(k)}
    optional = {k for k in expected if k.endswith("pos_encoder.pe")}
    validate_shapes(shapes, expected, weights.path, optional, "the model's motion module")
    return config, weights.read(keys, dtype, device)


def _as_config(config, motion_module) -> TransformerConfig:
    if isinstance(config, TransformerConfig):
        return config
    if isinstance(config, (str, os.PathLike)):
        config = read_config(config)
    if isinstance(config, dict):
        check_diffusers_config(config, "config")
        try:
            return TransformerConfig.from_diffusers(config, motion_module)
        except ValueError as e:
            raise EasyAnimateLoadError(f"config: {e}") from None
    raise EasyAnimateLoadError(f"config: expected a TransformerConfig, a diffusers config dict or the path of a "
                               f"config.json / transformer / pipeline folder, found {type(config).__name__}")


def read_config(path) -> dict:
    """The diffusers transformer config dict of a config.json, a transformer folder, or a pipeline folder (its
    transformer/config.json), e.g. the PixArt folder's config for a single-file checkpoint like the portrait one."""
    path = Path(path)
    for candidate in (path, path / "config.json", path / "transformer" / "config.json"):
        if candidate.is_file():
            config = read_json(candidate, "a diffusers transformer config.json")
            check_diffusers_config(config, candidate)
            return config
    raise EasyAnimateLoadError(f"{path}: expected a config.json, a transformer folder or a pipeline folder with "
                               f"transformer/config.json, found {describe(path)}")


def _untrained_motion_module(config: TransformerConfig, dtype, device) -> dict[str, torch.Tensor]:
    """Motion-module weights as the reference constructor leaves them: torch default init with proj_out zeroed
    (docs/MODEL.md §A.5), so each untrained module is the identity."""
    out = {}
    for i in range(config.num_layers):
        module = VanillaTemporalModule(config.inner_dim, config.motion_module, dtype=dtype, device=device)
        torch.nn.init.zeros_(module.temporal_transformer.proj_out.weight)
        torch.nn.init.zeros_(module.temporal_transformer.proj_out.bias)
        out.update({f"transformer_blocks.{i}.attn_temporal.{k}": v for k, v in module.state_dict().items()})
    return out


def read_transformer(path, motion_module=None, config=None, dtype=torch.float32, device="cpu"):
    """(TransformerConfig, state dict) ready for `Transformer3DModel(config).load_state_dict(sd, strict=True)`.

    All detection, conversion and validation of `load_transformer`, without building the model (a host that builds
    the model with its own layer classes uses this). See `load_transformer` for the rules.
    """
    path = Path(path)
    base, folder_config = _open_model_path(path)
    _reject_foreign(base, "an EasyAnimate / PixArt-alpha transformer")
    plan = key_plan(base.shapes)
    shapes = planned_shapes(plan, base.shapes)
    source = str(base.path)
    if shapes and all(_is_motion_key(k) for k in shapes):
        raise EasyAnimateLoadError(
            f"{source}: expected a transformer (DiT) checkpoint, found only motion-module keys ({len(shapes)}): "
            f"pass this file as motion_module= together with the PixArt/EasyAnimate transformer")

    mm_weights = mm_plan = None
    if motion_module is not None:
        mm_weights = open_weights(motion_module)
        mm_plan = {k: (k, 0, 1) for k in motion_module_keys(mm_weights)}
        source += f" + {mm_weights.path}"
        shapes = {k: s for k, s in shapes.items() if not _is_motion_key(k)}  # the motion module file replaces them
        shapes.update({k: mm_weights.shapes[k] for k in mm_plan})

    has_motion = any(_is_motion_key(k) for k in shapes)
    if config is not None:
        cfg = _as_config(config, infer_motion_config(shapes) if has_motion else None)
    elif folder_config is not None:
        cfg = _as_config(folder_config, None)
    else:
        cfg = infer_config(shapes, source)
    if config is None and has_motion and cfg.motion_module is None:
        cfg = dataclasses.replace(cfg, motion_module=infer_motion_config(shapes))

    expected_model = Transformer3DModel(cfg, dtype=dtype, device="meta")
    expected = {k: tuple(v.shape) for k, v in expected_model.state_dict().items()}
    # the temporal PE is a fixed formula: files without it are accepted and the buffers recomputed (docs/MODEL.md §B.4)
    optional = {k for k in expected if k.endswith("pos_encoder.pe")}
    untrained = cfg.motion_module is not None and not has_motion
    if untrained:
        optional |= {k for k in expected if _is_motion_key(k)}
    validate_shapes(shapes, expected, source, optional)

    state = _read_planned(base, {k: v for k, v in plan.items() if k in shapes and k not in (mm_plan or {})},
                          dtype, device)
    if mm_plan is not None:
        state.update(_read_planned(mm_weights, mm_plan, dtype, device))
    if untrained:
        log.warning("%s: no motion-module weights (a 2D checkpoint and no motion_module=): the motion module is "
                    "untrained and initialised as the identity (proj_out = 0), as in the reference constructor", source)
        state.update(_untrained_motion_module(cfg, dtype, device))
    return cfg, state


def load_transformer(path, motion_module=None, config=None, dtype=torch.float32, device="cpu",
                     operations=None, attention=None):
    """Load a `Transformer3DModel` from any release layout (module docstring), cast to `dtype`, on `device`.

    Motion module rule: the model is 3D (has `attn_temporal`) when the weights have motion-module keys (a full 3D
    file, a diffusers folder saved by EasyAnimate training, or `motion_module=` given), or when `config` asks for a
    motion module. A 2D checkpoint alone therefore gives the 2D model (per-frame PixArt); with
    `config=TransformerConfig(..., motion_module=MotionModuleConfig())` it gives the 3D model with an untrained,
    identity motion module (with a warning). An explicit 2D config with motion-module weights is an error.

    Config: `config` (TransformerConfig, diffusers dict, or the path of a config.json / transformer folder /
    pipeline folder) if given, else the folder's config.json, else inferred from shapes (real PixArt-XL-2 sizes
    only). `motion_module=` keeps keys containing 'temporal'; a full checkpoint
    given there contributes only those (warning). Missing `pos_encoder.pe` buffers are recomputed.
    """
    cfg, state = read_transformer(path, motion_module, config, dtype, device)
    model = Transformer3DModel(cfg, operations=operations, attention=attention, dtype=dtype, device="meta")
    model.load_state_dict(state, strict=False, assign=True)
    model.init_buffers(device)
    left = [name for name, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
    if left:  # _validate guarantees none; this guards the meta build against model/loader drift
        raise EasyAnimateLoadError(f"{path}: {len(left)} model tensors were not loaded: {first_names(left)}")
    return model.eval()
