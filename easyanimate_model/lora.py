"""LoRA for EasyAnimate v1 (docs/MODEL.md §B.6): the kohya release format and the diffusers/PEFT layout.

Release (kohya) names: `lora_unet__transformer_blocks_3_attn1_to_q.{lora_down.weight, lora_up.weight, alpha}` for
the DiT (double underscore: the root module's empty name; a single one is accepted too) and
`lora_te_encoder_block_0_layer_0_SelfAttention_q...` for the HF T5 encoder. diffusers/PEFT names:
`transformer.transformer_blocks.0.attn1.to_q.{lora_A.weight, lora_B.weight}` (optional `.alpha`) and `text_encoder.`.

Merge: `W += strength * (alpha / r) * (up @ down)` computed in fp32 and cast to W's dtype, r = up.shape[1].
Absent alpha: kohya files use alpha = 1.0 (what the reference `merge_lora` does); PEFT files use alpha = r (scale 1,
the diffusers convention, whose files keep alpha in a separate adapter config).
"""
from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass, field

import torch
from torch import nn

from .errors import EasyAnimateLoadError
from .files import identify_foreign, load_state_dict_file

TARGETS = ("transformer", "text_encoder")
_KOHYA_PREFIX = {"lora_unet_": "transformer", "lora_te_": "text_encoder"}
_PEFT_PREFIX = {"transformer.": "transformer", "text_encoder.": "text_encoder"}
_SUFFIXES = {  # tensor name suffix -> (layout, role)
    ".lora_down.weight": ("kohya", "down"), ".lora_up.weight": ("kohya", "up"),
    ".lora_A.weight": ("peft", "down"), ".lora_B.weight": ("peft", "up"),
    ".lora.down.weight": ("peft", "down"), ".lora.up.weight": ("peft", "up"),
    ".alpha": (None, "alpha"),
}


def transformer_lora_modules(num_layers: int = 28, temporal_blocks: int = 1, temporal_attentions: int = 2):
    """Module paths (release key names without `.weight`) of every Linear of the Transformer3DModel.

    The first `10 * num_layers + 6` are the DiT modules the reference LoRA network targets (286 at 28 layers); the
    `attn_temporal` ones (video LoRA) follow.
    """
    dit = ["proj_out", "adaln_single.emb.timestep_embedder.linear_1", "adaln_single.emb.timestep_embedder.linear_2",
           "adaln_single.linear", "caption_projection.linear_1", "caption_projection.linear_2"]
    temporal = []
    for i in range(num_layers):
        block = f"transformer_blocks.{i}"
        dit += [f"{block}.attn{a}.{p}" for a in (1, 2) for p in ("to_q", "to_k", "to_v", "to_out.0")]
        dit += [f"{block}.ff.net.0.proj", f"{block}.ff.net.2"]
        mm = f"{block}.attn_temporal.temporal_transformer"
        temporal += [f"{mm}.proj_in", f"{mm}.proj_out"]
        for m in range(temporal_blocks):
            temporal += [f"{mm}.transformer_blocks.{m}.attention_blocks.{a}.{p}"
                         for a in range(temporal_attentions) for p in ("to_q", "to_k", "to_v", "to_out.0")]
            temporal += [f"{mm}.transformer_blocks.{m}.ff.net.0.proj", f"{mm}.transformer_blocks.{m}.ff.net.2"]
    return dit + temporal


def t5_lora_modules(num_blocks: int = 24):
    """Module paths of the HF T5EncoderModel Linears the reference LoRA targets (168 for T5-XXL's 24 blocks);
    `wi` is the non-gated T5 variant."""
    out = []
    for i in range(num_blocks):
        out += [f"encoder.block.{i}.layer.0.SelfAttention.{p}" for p in ("q", "k", "v", "o")]
        out += [f"encoder.block.{i}.layer.1.DenseReluDense.{p}" for p in ("wi_0", "wi_1", "wo", "wi")]
    return out


@dataclass
class LoraPair:
    """One LoRA module as found in a file."""

    name: str            # its name in the file (without the tensor suffix)
    target: str | None   # "transformer" / "text_encoder", None when the prefix names neither
    path: str            # kohya: the '_'-joined module name; peft: the dotted module path
    layout: str = "kohya"  # from the weight suffixes: "kohya" (lora_down/up) or "peft" (lora_A/B, lora.down/up)
    down: torch.Tensor | None = None
    up: torch.Tensor | None = None
    alpha: float | None = None

    @property
    def rank(self) -> int:
        return self.up.shape[1]

    @property
    def scale(self) -> float:
        """alpha / r, with the layout's default alpha when the file has none (module docstring)."""
        alpha = self.alpha if self.alpha is not None else (1.0 if self.layout == "kohya" else float(self.rank))
        return alpha / self.rank


def parse_lora(lora_sd: dict) -> tuple[dict[str, LoraPair], dict[str, str]]:
    """({module name: LoraPair}, {key: reason} for tensors that are not part of a usable LoRA module)."""
    pairs, bad = {}, {}
    for key, tensor in lora_sd.items():
        suffix = next((s for s in _SUFFIXES if key.endswith(s)), None)
        if suffix is None:
            bad[key] = "not a LoRA tensor (expected .lora_down/.lora_up/.lora_A/.lora_B .weight or .alpha)"
            continue
        name = key[: -len(suffix)]
        layout, role = _SUFFIXES[suffix]
        pair = pairs.get(name)
        if pair is None:
            pair = pairs[name] = LoraPair(name, *_split_name(name))
        if layout is not None:
            pair.layout = layout
        if role == "alpha":
            pair.alpha = float(tensor)
        else:
            setattr(pair, role, tensor)
    for name, pair in list(pairs.items()):
        if pair.down is None or pair.up is None:
            bad[name] = f"incomplete LoRA module: no {'down (lora_down/lora_A)' if pair.down is None else 'up'} weight"
            del pairs[name]
        elif pair.up.shape[1] != pair.down.shape[0]:
            bad[name] = f"rank mismatch: up {list(pair.up.shape)}, down {list(pair.down.shape)}"
            del pairs[name]
    return pairs, bad


def _split_name(name: str) -> tuple[str | None, str]:
    """(target, module path) of a LoRA module name."""
    for prefix, target in _KOHYA_PREFIX.items():
        if name.startswith(prefix):
            rest = name[len(prefix):]
            # the reference joins "lora_unet" + "." + "" + "." + child: a double underscore; accept one too
            return target, rest[1:] if rest.startswith("_") else rest
    if name.startswith("lora_"):
        return None, name  # lora_te1_ / lora_te2_ (SDXL) and other networks
    name = name.removeprefix("base_model.model.")
    for prefix, target in _PEFT_PREFIX.items():
        if name.startswith(prefix):
            return target, name[len(prefix):]
    if name.startswith(("unet.", "text_encoder_2.")):
        return None, name
    return "transformer", name  # a bare PEFT save of the transformer


def _module_table(target: str, pairs, module_names) -> dict[str, str]:
    """{'_'-joined module name: dotted module path} of the modules a LoRA may patch in `target`."""
    if module_names is None:
        # no model at hand: the release structure, as deep as the LoRA's own block indices reach
        pattern = r"(?:transformer_blocks|block)[._](\d+)[._]"
        depth = 1 + max((int(m.group(1)) for p in pairs if (m := re.search(pattern, p.path))), default=0)
        module_names = transformer_lora_modules(max(depth, 1)) if target == "transformer" else t5_lora_modules(depth)
    return {name.replace(".", "_"): name for name in module_names}


class LoraDeltas(dict):
    """{target weight key: (up, down, scale)} with scale = alpha / r; `.unmapped` = {LoRA name: reason}.

    ComfyUI's ("lora", (up, down, alpha, None)) patch divides alpha by the rank itself: pass alpha = scale * rank.
    """

    def __init__(self, *args, unmapped=None, **kwargs):
        super().__init__(*args, **kwargs)
        self.unmapped = unmapped or {}


_NO_TARGET = ("its prefix names neither the transformer (lora_unet_ / transformer.) nor the T5 encoder "
              "(lora_te_ / text_encoder.)")


def _resolve(pairs: dict[str, LoraPair], target: str, module=None):
    """([(pair, module path)] of `target`'s LoRA modules that name a module, {name: reason} for those that don't).

    `module`: the target model (names and weight shapes checked), its module paths, or None (release structure).
    """
    names = module
    if isinstance(module, nn.Module):
        names = [n for n, m in module.named_modules() if isinstance(getattr(m, "weight", None), torch.Tensor)]
    mine = [p for p in pairs.values() if p.target == target]
    table = _module_table(target, mine, names)
    dotted = set(table.values())
    found, unmapped = [], {}
    for pair in mine:
        path = table.get(pair.path) or (pair.path if pair.path in dotted else None)
        reason = None if path else f"names no module of the {target.replace('_', ' ')}"
        if path and isinstance(module, nn.Module):
            reason = _shape_problem(pair, module.get_submodule(path).weight.shape)
        if reason:
            unmapped[pair.name] = reason
        else:
            found.append((pair, path))
    return found, unmapped


def lora_deltas(lora_sd: dict, target: str = "transformer", module_names=None) -> LoraDeltas:
    """Per-weight LoRA deltas of one target ("transformer" or "text_encoder"), without touching any model.

    Keys are the target's weight keys, e.g. `transformer_blocks.0.attn1.to_q.weight` or
    `encoder.block.0.layer.0.SelfAttention.q.weight`. `module_names`: the target's module paths, or the module
    itself (names and weight shapes are then checked); without it names resolve against the release structure.
    LoRA modules of the other target are left out; `.unmapped` has this target's modules that resolve to nothing,
    modules of no known target and non-LoRA tensors, each with the reason.
    """
    if target not in TARGETS:
        raise ValueError(f"target must be one of {TARGETS}, got {target!r}")
    pairs, bad = parse_lora(lora_sd)
    found, unmapped = _resolve(pairs, target, module_names)
    unmapped.update(bad)
    unmapped.update({p.name: _NO_TARGET for p in pairs.values() if p.target is None})
    return LoraDeltas({f"{path}.weight": (p.up, p.down, p.scale) for p, path in found}, unmapped=unmapped)


def _shape_problem(pair: LoraPair, shape) -> str | None:
    want = (pair.up.shape[0], pair.down.shape[1])
    if tuple(shape[:2]) != want:
        return f"shape mismatch: LoRA gives {list(want)}, the weight is {list(shape)}"
    kernels = {tuple(shape[2:]), tuple(pair.down.shape[2:]), tuple(pair.up.shape[2:])} - {(), (1, 1)}
    if kernels:
        return f"only 1x1 convolution LoRA is supported; weight {list(shape)}, down {list(pair.down.shape)}"
    return None


def delta_weight(up: torch.Tensor, down: torch.Tensor, scale: float, shape, device=None) -> torch.Tensor:
    """scale * (up @ down) in fp32, shaped like the weight (Linear, or 1x1 conv)."""
    up = up.to(device=device, dtype=torch.float32).flatten(1)
    down = down.to(device=device, dtype=torch.float32).flatten(1)
    return (scale * (up @ down)).view(shape)


@dataclass
class LoraReport:
    """What a merge did: LoRA module name -> target weight key, or -> why not; `missing_modules` are the LoRA modules
    that name no module of the model (also in `not_applied`)."""

    applied: dict[str, str] = field(default_factory=dict)
    not_applied: dict[str, str] = field(default_factory=dict)
    missing_modules: list[str] = field(default_factory=list)


def load_lora(path) -> dict[str, torch.Tensor]:
    """The tensors of a LoRA file; EasyAnimateLoadError when the file holds no LoRA tensors."""
    sd, _ = load_state_dict_file(path)
    _check_is_lora(sd, path)
    return sd


def _check_is_lora(sd: dict, source):
    pairs, _ = parse_lora(sd)
    if pairs:
        return
    found = identify_foreign({k: tuple(v.shape) for k, v in sd.items()})
    found = found or f"{len(sd)} tensors such as {sorted(sd)[:3]}"
    raise EasyAnimateLoadError(f"{source}: expected a LoRA (lora_down/lora_up or lora_A/lora_B tensors), found {found}")


def merge_lora(path_or_sd, strength: float, transformer=None, text_encoder=None,
               text_encoder_strength: float | None = None) -> LoraReport:
    """Merge a LoRA into `transformer` and/or the HF T5 `text_encoder` in place; `unmerge_lora` undoes it.

    `text_encoder_strength` defaults to `strength`. Raises EasyAnimateLoadError when the file is not a LoRA or none
    of its modules names a module of the EasyAnimate transformer or the T5 encoder (an SD/SDXL LoRA).
    """
    return _apply(path_or_sd, strength, transformer, text_encoder, text_encoder_strength, sign=1.0)


def unmerge_lora(path_or_sd, strength: float, transformer=None, text_encoder=None,
                 text_encoder_strength: float | None = None) -> LoraReport:
    """Subtract what `merge_lora` with the same arguments added."""
    return _apply(path_or_sd, strength, transformer, text_encoder, text_encoder_strength, sign=-1.0)


@torch.no_grad()
def _apply(path_or_sd, strength, transformer, text_encoder, text_encoder_strength, sign) -> LoraReport:
    if isinstance(path_or_sd, dict):
        sd, source = path_or_sd, "LoRA state dict"
        _check_is_lora(sd, source)
    else:
        sd, source = load_lora(path_or_sd), str(path_or_sd)
    pairs, bad = parse_lora(sd)
    report = LoraReport(not_applied=dict(bad))
    strengths = {"transformer": strength,
                 "text_encoder": strength if text_encoder_strength is None else text_encoder_strength}
    plans = {}
    for target, model in (("transformer", transformer), ("text_encoder", text_encoder)):
        # a target not given resolves against the release structure: its modules are reported, not called foreign
        plans[target] = (model, *_resolve(pairs, target, model))
    if not any(found for _, found, _ in plans.values()):
        raise EasyAnimateLoadError(
            f"{source}: expected a LoRA for the EasyAnimate/PixArt transformer (lora_unet__transformer_blocks_...) "
            f"or its T5 encoder (lora_te_encoder_block_...), found {len(pairs)} LoRA modules of which none names a "
            f"module of either (e.g. {', '.join(sorted(pairs)[:3])}; an SD/SDXL LoRA?)")
    for target, (model, found, unmapped) in plans.items():
        for pair, path in found:
            if model is None:
                report.not_applied[pair.name] = f"no {target.replace('_', ' ')} given"
                continue
            weight = model.get_submodule(path).weight
            scale = sign * strengths[target] * pair.scale
            weight.add_(delta_weight(pair.up, pair.down, scale, weight.shape, weight.device))
            report.applied[pair.name] = f"{path}.weight"
        report.not_applied.update(unmapped)
        report.missing_modules += [n for n, why in unmapped.items() if why.startswith("names no module")]
    no_target = [p.name for p in pairs.values() if p.target is None]
    report.not_applied.update({name: _NO_TARGET for name in no_target})
    report.missing_modules += no_target
    return report


def kohya_hashes(tensors: dict[str, torch.Tensor]) -> dict[str, str]:
    """sd-webui-additional-networks hashes of the file the tensors make (no ss_ metadata here):
    sshs_model_hash = sha256 of the tensor data section; sshs_legacy_hash = first 8 hex of the sha256 of the
    64 KiB at offset 1 MiB of the whole file."""
    from safetensors.torch import save

    blob = save(tensors, {})
    header_len = int.from_bytes(blob[:8], "little")
    model_hash = hashlib.sha256(blob[8 + header_len:]).hexdigest()
    legacy = hashlib.sha256(blob[0x100000:0x110000]).hexdigest()[:8]
    return {"sshs_model_hash": model_hash, "sshs_legacy_hash": legacy}
