"""One small adapter over the architectures evofuse changes: where the decoder blocks live.

Llama-family models (Llama, SmolLM2, Mistral, Qwen2) keep their blocks in `model.layers` and
their final norm in `model.norm`; GPT-2 keeps them in `transformer.h` / `transformer.ln_f`.
Everything in `compression/` reaches blocks through this module rather than branching on
`model_type` itself.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch.nn as nn


@dataclass(frozen=True)
class Arch:
    blocks: str  # dotted path of the nn.ModuleList of decoder blocks
    final_norm: str  # dotted path of the norm applied after the last block
    num_layers_field: str  # config field holding the block count


LLAMA_FAMILY = Arch("model.layers", "model.norm", "num_hidden_layers")
ARCHES = {
    "llama": LLAMA_FAMILY,
    "mistral": LLAMA_FAMILY,
    "qwen2": LLAMA_FAMILY,
    "gpt2": Arch("transformer.h", "transformer.ln_f", "n_layer"),
}


class UnsupportedArchitecture(ValueError):
    pass


def arch_of(model_or_config) -> Arch:
    config = getattr(model_or_config, "config", model_or_config)
    model_type = getattr(config, "model_type", None)
    if model_type not in ARCHES:
        raise UnsupportedArchitecture(
            f"model_type {model_type!r} is not supported (supported: {', '.join(sorted(ARCHES))})"
        )
    return ARCHES[model_type]


def get_submodule(model: nn.Module, dotted: str) -> nn.Module:
    return model.get_submodule(dotted)


def decoder_blocks(model: nn.Module) -> nn.ModuleList:
    return model.get_submodule(arch_of(model).blocks)


def final_norm(model: nn.Module) -> nn.Module:
    return model.get_submodule(arch_of(model).final_norm)


def num_blocks(model_or_config) -> int:
    config = getattr(model_or_config, "config", model_or_config)
    return getattr(config, arch_of(config).num_layers_field)
