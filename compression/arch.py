"""One small adapter over the architectures evofuse changes: where the decoder blocks live,
how to call one block on its own, and how to drop blocks so the model still saves, reloads
and generates with plain transformers.

Llama-family models (Llama, SmolLM2, Mistral, Qwen2) keep their blocks in `model.layers` and
their final norm in `model.norm`; GPT-2 keeps them in `transformer.h` / `transformer.ln_f`.
Everything in `compression/` reaches blocks through this module rather than branching on
`model_type` itself.

Calling blocks on their own (importance scores, local distillation) needs the extra arguments
the model passes each block (rotary cos/sin, the causal mask, position ids, ...). Rather than
rebuilding them per architecture, `capture_block_calls` records them with forward pre-hooks
during one forward of a single dummy window. Its tensors have batch dimension 1 and broadcast
over any batch of windows of the same length, so the recorded calls are replayed for every
batch (checked in tests against the model's own hidden states). This assumes unpadded windows
(no attention mask), which is what `CalibrationData` holds.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Iterable, Sequence

import torch
import torch.nn as nn
from compression.errors import CompressionError


@dataclass(frozen=True)
class Arch:
    blocks: str  # dotted path of the nn.ModuleList of decoder blocks
    final_norm: str  # dotted path of the norm applied after the last block
    num_layers_field: str  # config field holding the block count
    # config fields holding one entry per block (sliced when blocks are removed)
    per_layer_fields: tuple[str, ...] = ("layer_types",)
    # config flags that tie a block's computation to its index; removal is refused while set
    index_dependent_flags: tuple[str, ...] = field(default=())


LLAMA_FAMILY = Arch("model.layers", "model.norm", "num_hidden_layers")
ARCHES = {
    "llama": LLAMA_FAMILY,
    "mistral": LLAMA_FAMILY,
    "qwen2": LLAMA_FAMILY,
    # GPT-2 can scale attention by 1/(layer_idx+1), fixed at construction: a moved block would
    # compute differently after reload, so removal is refused when that flag is on.
    "gpt2": Arch("transformer.h", "transformer.ln_f", "n_layer", index_dependent_flags=("scale_attn_by_inverse_layer_idx",)),
}


class UnsupportedArchitecture(CompressionError):
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


def model_device_dtype(model: nn.Module) -> tuple[torch.device, torch.dtype]:
    param = next(model.parameters())
    return param.device, param.dtype


# --------------------------------------------------------------------------- block removal


def check_removable(config) -> None:
    """Raise UnsupportedArchitecture if blocks of this model cannot be removed faithfully."""
    arch = arch_of(config)
    for flag in arch.index_dependent_flags:
        if getattr(config, flag, False):
            raise UnsupportedArchitecture(f"{flag}=True ties each block to its index; block removal would change the model")


def _set_submodule(model: nn.Module, dotted: str, module: nn.Module) -> None:
    parent_name, _, child = dotted.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, child, module)


def reindex_blocks(blocks: Iterable[nn.Module]) -> None:
    """Give every submodule carrying a `layer_idx` (attention, cross-attention) its block's
    position: the KV cache is indexed by it."""
    for position, block in enumerate(blocks):
        for module in block.modules():
            if hasattr(module, "layer_idx"):
                module.layer_idx = position


def remove_blocks(model: nn.Module, indices: Iterable[int]) -> nn.Module:
    """Drop the blocks at `indices` (positions in the current model), in place.

    Keeps the model consistent for plain transformers: a fresh ModuleList (contiguous state-dict
    keys), `layer_idx` renumbered, the block count in the config, and per-block config lists
    (e.g. Qwen2's `layer_types`) sliced so each kept block keeps its own entry.
    """
    arch = arch_of(model)
    check_removable(model.config)
    blocks = decoder_blocks(model)
    n = len(blocks)
    drop = set(int(i) for i in indices)
    bad = sorted(i for i in drop if not 0 <= i < n)
    if bad:
        raise IndexError(f"block index {bad[0]} out of range for {n} blocks")
    if len(drop) >= n:
        raise ValueError(f"cannot remove {len(drop)} of {n} blocks (at least one must remain)")
    keep = [i for i in range(n) if i not in drop]
    kept = nn.ModuleList([blocks[i] for i in keep])
    reindex_blocks(kept)
    _set_submodule(model, arch.blocks, kept)
    config = model.config
    for name in arch.per_layer_fields:
        values = getattr(config, name, None)
        if isinstance(values, (list, tuple)) and len(values) == n:
            setattr(config, name, [values[i] for i in keep])
    setattr(config, arch.num_layers_field, len(keep))
    return model


# ------------------------------------------------------------------ calling blocks on their own


@dataclass
class BlockCall:
    """The arguments a model passed one block, besides the hidden states (batch dimension 1)."""

    args: tuple[Any, ...]
    kwargs: dict[str, Any]


class _StopForward(Exception):
    pass


def _hidden_from(args: tuple, kwargs: dict) -> tuple[torch.Tensor, tuple, dict]:
    """Split a block call into (hidden_states, other positional args, other kwargs)."""
    if args:
        return args[0], tuple(args[1:]), dict(kwargs)
    kwargs = dict(kwargs)
    return kwargs.pop("hidden_states"), (), kwargs


def _forward_ids(model: nn.Module, input_ids: torch.Tensor) -> None:
    model(input_ids=input_ids, use_cache=False)


@torch.no_grad()
def capture_block_calls(model: nn.Module, seq_len: int) -> list[BlockCall]:
    """Record the extra arguments each block receives for windows of `seq_len` tokens."""
    device, _ = model_device_dtype(model)
    calls: list[BlockCall | None] = [None] * len(decoder_blocks(model))

    def recorder(position: int):
        def hook(module, args, kwargs):
            _, rest, other = _hidden_from(args, kwargs)
            calls[position] = BlockCall(rest, other)

        return hook

    handles = [b.register_forward_pre_hook(recorder(i), with_kwargs=True) for i, b in enumerate(decoder_blocks(model))]
    try:
        dummy = torch.zeros(1, seq_len, dtype=torch.long, device=device)  # (1, T)
        _forward_ids(model, dummy)
    finally:
        for h in handles:
            h.remove()
    return calls  # type: ignore[return-value]


def run_block(block: nn.Module, call: BlockCall, hidden: torch.Tensor) -> torch.Tensor:
    """One block on hidden states (B, T, H) -> (B, T, H)."""
    out = block(hidden, *call.args, **call.kwargs)
    return out[0] if isinstance(out, tuple) else out


def run_blocks(blocks: Sequence[nn.Module], calls: Sequence[BlockCall], hidden: torch.Tensor) -> torch.Tensor:
    for block, call in zip(blocks, calls):
        hidden = run_block(block, call, hidden)
    return hidden


def block_input(model: nn.Module, input_ids: torch.Tensor, position: int = 0) -> torch.Tensor:
    """Hidden states (B, T, H) entering block `position`; the forward stops there."""
    captured: list[torch.Tensor] = []

    def hook(module, args, kwargs):
        captured.append(_hidden_from(args, kwargs)[0])
        raise _StopForward

    handle = decoder_blocks(model)[position].register_forward_pre_hook(hook, with_kwargs=True)
    try:
        _forward_ids(model, input_ids)
    except _StopForward:
        pass
    finally:
        handle.remove()
    return captured[0]


def output_head(model: nn.Module, hidden: torch.Tensor) -> torch.Tensor:
    """Logits (B, T, V) from the last block's output (B, T, H): final norm, then the LM head."""
    return model.get_output_embeddings()(final_norm(model)(hidden))


def linear_layers(block: nn.Module) -> dict[str, nn.Module]:
    """The block's linear maps by relative name (nn.Linear, GPT-2's Conv1D, or their wrappers).

    Blocks of one model share these names, so 'self_attn.q_proj' of one block pairs with
    'self_attn.q_proj' of another: what FuseGPT fuses, layer type by layer type.
    """
    from transformers.pytorch_utils import Conv1D

    found = {}
    for name, module in block.named_modules():
        if isinstance(module, (nn.Linear, Conv1D)) or getattr(module, "is_fused_linear", False):
            if not any(name.startswith(other + ".") for other in found):
                found[name] = module
    return found


def own_parameters(module: nn.Module) -> list[nn.Parameter]:
    """Give each of `module`'s parameters storage of its own (a copy, as a new parameter object
    of the same name) and return them: what an op trains in place must not be memory it shares
    with another model (`compression.plan.copy_sharing_weights`). A parameter two submodules
    share stays shared."""
    owned: dict[int, nn.Parameter] = {}
    for sub in module.modules():
        for name, param in list(sub._parameters.items()):
            if param is not None:
                if id(param) not in owned:
                    owned[id(param)] = nn.Parameter(param.detach().clone(), requires_grad=param.requires_grad)
                sub._parameters[name] = owned[id(param)]
    return list(owned.values())


def replace_submodule(root: nn.Module, dotted: str, module: nn.Module) -> None:
    _set_submodule(root, dotted, module)
