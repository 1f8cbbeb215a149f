"""Model configuration: the PixArt-alpha transformer config plus the v1 motion-module settings (docs/MODEL.md §A.2)."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

# The noise schedule every part uses (docs/MODEL.md §C.5, §D.5): betas linear from BETA_START to BETA_END over
# NUM_TRAIN_TIMESTEPS steps (diffusers "linear", ComfyUI "sqrt_linear", IDDPM "linear" at 1000 steps).
NUM_TRAIN_TIMESTEPS = 1000
BETA_START, BETA_END = 1e-4, 0.02

VAE_SCALE = 8  # SD VAE: pixels per latent cell
# pixel multiple of width/height for the released model: patch 2 x motion-module grid block 2 x VAE 8 (docs/MODEL.md §A.5);
# TransformerConfig.size_multiple() gives it for any config
SIZE_MULTIPLE = 32
IMAGE_SIZE_MULTIPLE = 16  # without the motion module (2D training/inference): patch 2 x VAE 8


def size_error(width, height, multiple: int = SIZE_MULTIPLE):
    """None when width and height (pixels) are positive multiples of `multiple`, else one message naming the input(s),
    what was found and the nearest sizes that work."""
    bad = [f"{name} {value!r}" for name, value in (("width", width), ("height", height))
           if not isinstance(value, int) or isinstance(value, bool) or value < multiple or value % multiple]
    if not bad:
        return None
    def near(v):
        return max(multiple, round(v / multiple) * multiple) if isinstance(v, (int, float)) and v == v else multiple
    return (f"{' and '.join(bad)}: EasyAnimate needs width and height as positive multiples of {multiple} pixels "
            f"(try {near(width)}x{near(height)})")


@dataclass
class MotionModuleConfig:
    """VanillaGrid motion module (docs/MODEL.md §A.2 / §A.5). Defaults are the released v1 values."""

    num_attention_heads: int = 8
    num_transformer_block: int = 1
    attention_block_types: tuple = ("Temporal_Self", "Temporal_Self")
    temporal_position_encoding_max_len: int = 4096
    block_size: int = 2
    norm_num_groups: int = 32


@dataclass
class TransformerConfig:
    """The diffusers `transformer/config.json` fields that matter for EasyAnimate v1 (docs/MODEL.md §A.2).

    Defaults are PixArt-XL-2-512x512. `motion_module=None` builds the 2D model (no `attn_temporal`).
    """

    num_layers: int = 28
    num_attention_heads: int = 16
    attention_head_dim: int = 72
    in_channels: int = 4
    out_channels: int = 8
    patch_size: int = 2
    sample_size: int = 64
    caption_channels: int = 4096
    cross_attention_dim: int = 1152
    norm_eps: float = 1e-6
    motion_module: MotionModuleConfig | None = field(default_factory=MotionModuleConfig)

    @property
    def inner_dim(self) -> int:
        return self.num_attention_heads * self.attention_head_dim

    @property
    def base_size(self) -> int:
        # PixArt's position-embedding "base_size" rule: sample_size // patch_size
        return self.sample_size // self.patch_size

    def latent_multiple(self) -> int:
        """Latent height/width multiple: the patch size, times the motion module's grid block when it has one."""
        return self.patch_size * (self.motion_module.block_size if self.motion_module is not None else 1)

    def size_multiple(self) -> int:
        """Pixel width/height multiple (latent multiple x VAE scale)."""
        return self.latent_multiple() * VAE_SCALE

    @classmethod
    def from_diffusers(cls, cfg: dict, motion_module: MotionModuleConfig | None = None) -> "TransformerConfig":
        """Build from a diffusers `Transformer2DModel`/`PixArtTransformer2DModel` config dict.

        Checks the fields EasyAnimate v1 relies on and names the first one that differs.
        """
        expected = {"norm_type": "ada_norm_single", "activation_fn": "gelu-approximate", "attention_bias": True}
        for key, want in expected.items():
            if key in cfg and cfg[key] != want:
                raise ValueError(f"transformer config field '{key}': expected {want!r}, found {cfg[key]!r}")
        names = {f.name for f in dataclasses.fields(cls)} - {"motion_module"}
        kwargs = {k: cfg[k] for k in names if k in cfg and cfg[k] is not None}
        if "caption_channels" not in kwargs:
            raise ValueError("transformer config has no 'caption_channels': not a PixArt-alpha transformer config")
        mm = motion_module
        if mm is None and "motion_module_kwargs" in cfg:
            mm = MotionModuleConfig(**_motion_kwargs(cfg["motion_module_kwargs"]))
        return cls(**kwargs, motion_module=mm)

    def to_diffusers(self) -> dict:
        """The diffusers-style config.json dict (2D fields + EasyAnimate's motion-module kwargs)."""
        out = {
            "_class_name": "Transformer3DModel" if self.motion_module else "Transformer2DModel",
            "activation_fn": "gelu-approximate",
            "attention_bias": True,
            "attention_type": "default",
            "dropout": 0.0,
            "norm_elementwise_affine": False,
            "norm_num_groups": 32,
            "norm_type": "ada_norm_single",
            "num_embeds_ada_norm": 1000,
            "num_vector_embeds": None,
            "only_cross_attention": False,
            "double_self_attention": False,
            "upcast_attention": False,
            "use_linear_projection": False,
        }
        out.update({f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "motion_module"})
        if self.motion_module is not None:
            mm = self.motion_module
            out.update({
                "patch_3d": False, "fake_3d": False, "basic_block_type": "motionmodule",
                "time_position_encoding_before_transformer": False, "motion_module_type": "VanillaGrid",
                "motion_module_kwargs": {
                    "num_attention_heads": mm.num_attention_heads,
                    "num_transformer_block": mm.num_transformer_block,
                    "attention_block_types": list(mm.attention_block_types),
                    "temporal_position_encoding": True,
                    "temporal_position_encoding_max_len": mm.temporal_position_encoding_max_len,
                    "temporal_attention_dim_div": 1,
                    "block_size": mm.block_size,
                },
            })
        return out


def _motion_kwargs(kw: dict) -> dict:
    names = {f.name for f in dataclasses.fields(MotionModuleConfig)}
    out = {k: v for k, v in kw.items() if k in names}
    if "attention_block_types" in out:
        out["attention_block_types"] = tuple(out["attention_block_types"])
    return out
