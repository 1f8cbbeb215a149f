"""Trainable kohya-style LoRA on the DiT (and optionally T5), saved in the release layout (docs/MODEL.md §B.6).

Module names follow the reference `LoRANetwork`: "lora_unet" + "." + "" + "." + <module path>, dots -> "_" (hence
the double underscore, `lora_unet__transformer_blocks_3_attn1_to_q`), and "lora_te_" + <T5 module path> for the
T5 Linear layers of self-attention and feed-forward blocks. Every module has `lora_down.weight` [r, in],
`lora_up.weight` [out, r] and a 0-d `alpha`; the forward adds multiplier * (alpha / r) * up(down(x)).
"""
from __future__ import annotations

import math

import torch
from torch import nn

from ..lora import t5_lora_modules, transformer_lora_modules

UNET_PREFIX = "lora_unet"
TEXT_ENCODER_PREFIX = "lora_te"


def lora_name(prefix: str, module_path: str) -> str:
    if prefix == UNET_PREFIX:
        # the DiT is the root module of the reference network, whose name is the empty string
        return f"{prefix}..{module_path}".replace(".", "_")
    return f"{prefix}.{module_path}".replace(".", "_")


def dit_targets(transformer: nn.Module, include_temporal: bool = False) -> dict[str, nn.Module]:
    """The DiT Linears the reference network targets (lora.py's release list: 10 per block + 6 global), plus the
    motion-module Linears when asked; the 2x2 patch conv never gets LoRA."""
    layers = len(transformer.transformer_blocks)
    paths = transformer_lora_modules(layers)
    if not include_temporal:
        paths = paths[:10 * layers + 6]
    names = dict(transformer.named_modules())
    return {p: names[p] for p in paths if p in names}


def text_encoder_targets(text_encoder: nn.Module) -> dict[str, nn.Module]:
    """T5 self-attention q/k/v/o and feed-forward wi_0/wi_1/wo (or wi) Linears of every encoder block."""
    names = dict(text_encoder.named_modules())
    return {p: names[p] for p in t5_lora_modules(len(text_encoder.encoder.block)) if p in names}


class LoRAModule(nn.Module):
    def __init__(self, target: nn.Linear, rank: int, alpha: float, multiplier: float = 1.0):
        super().__init__()
        self.rank, self.multiplier = rank, multiplier
        self.lora_down = nn.Linear(target.in_features, rank, bias=False)
        self.lora_up = nn.Linear(rank, target.out_features, bias=False)
        self.register_buffer("alpha", torch.tensor(float(alpha)))
        # kohya init: the network starts as the identity (up = 0)
        nn.init.kaiming_uniform_(self.lora_down.weight, a=math.sqrt(5))
        nn.init.zeros_(self.lora_up.weight)
        self._target = [target]  # a list keeps the target out of this module's state dict
        self._original_forward = None

    def apply_to(self):
        target = self._target[0]
        self._original_forward = target.forward
        target.forward = self.forward

    def remove(self):
        if self._original_forward is not None:
            self._target[0].forward = self._original_forward
            self._original_forward = None

    def forward(self, x):
        scale = self.multiplier * float(self.alpha) / self.rank
        delta = self.lora_up(self.lora_down(x.to(self.lora_down.weight.dtype)))
        return self._original_forward(x) + (delta * scale).to(x.dtype)


class LoRANetwork(nn.Module):
    """All LoRA modules, keyed by their kohya names, so `state_dict()` is the release file's key set."""

    def __init__(self, transformer: nn.Module, rank: int, alpha: float, text_encoder: nn.Module | None = None,
                 include_temporal: bool = False):
        super().__init__()
        modules = {lora_name(UNET_PREFIX, p): LoRAModule(m, rank, alpha)
                   for p, m in dit_targets(transformer, include_temporal).items()}
        if text_encoder is not None:
            modules.update({lora_name(TEXT_ENCODER_PREFIX, p): LoRAModule(m, rank, alpha)
                            for p, m in text_encoder_targets(text_encoder).items()})
        self.loras = nn.ModuleDict(modules)
        for m in self.loras.values():
            m.apply_to()

    def remove(self):
        for m in self.loras.values():
            m.remove()

    def parameter_groups(self, lr: float, text_encoder_lr: float):
        unet = [p for n, m in self.loras.items() if n.startswith(UNET_PREFIX + "_") for p in m.parameters()]
        te = [p for n, m in self.loras.items() if n.startswith(TEXT_ENCODER_PREFIX + "_") for p in m.parameters()]
        return [g for g in ({"params": unet, "lr": lr}, {"params": te, "lr": text_encoder_lr}) if g["params"]]

    def lora_state_dict(self, dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
        """{"<name>.lora_down.weight", "<name>.lora_up.weight", "<name>.alpha"} as contiguous CPU tensors."""
        out = {}
        for name, module in self.loras.items():
            for key, value in module.state_dict().items():
                value = value.detach().to("cpu")
                out[f"{name}.{key}"] = (value.to(dtype) if dtype is not None else value).contiguous()
        return out

    def load_lora_state_dict(self, state: dict[str, torch.Tensor]):
        for name, module in self.loras.items():
            module.load_state_dict({k: state[f"{name}.{k}"] for k in module.state_dict()})


