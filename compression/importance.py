"""Block importance for depth pruning: one score per decoder block, lower = remove first.

Three criteria (formulas in ../shared/reference/methods.md):

- Block Influence (ShortGPT): `BI_i = 1 - E_t[cos(x_i,t, y_i,t)]`, the block's input vs its
  output, averaged over every calibration token.
- Macro Influence (FuseGPT): `MI_i = 1 - E_t[cos(h_L(t), h_L^{-i}(t))]`, the last block's output
  (before the final norm) of the model vs the same model with block i skipped.
- SLEB: the mean next-token NLL on the calibration windows of the model with block i skipped.

Every function takes `skip`, positions already (virtually) removed: the score is that of the
model without those blocks, without copying or changing the model. Iterative schedules
(`select_blocks(..., iterative=True)`, SLEB's greedy search) are repeated calls with a growing
`skip`. Skipped blocks score +inf. Blocks are replayed one at a time on cached hidden states
(`compression.arch.capture_block_calls`), so the blocks before block i are never recomputed for
its Macro Influence / SLEB score: one call costs about L^2/2 block forwards per batch, plus (SLEB)
one LM head per block. Everything runs under `torch.no_grad` in the model's dtype; cosines and
NLL are accumulated in float32.
"""
from __future__ import annotations

import math
from typing import Callable, Collection, Literal

import torch
import torch.nn as nn
import torch.nn.functional as F

from compression import arch
from compression.calibration import CalibrationData

ImportanceName = Literal["block_influence", "macro_influence", "sleb"]
DEFAULT_BATCH_SIZE = 8


def _token_cosines(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Cosine per token of two (B, T, H) tensors -> (B, T), in float32."""
    return F.cosine_similarity(a.float(), b.float(), dim=-1)


def _next_token_nll_sum(logits: torch.Tensor, input_ids: torch.Tensor) -> torch.Tensor:
    """Summed NLL of tokens 1..T-1 given their prefixes; logits (B, T, V), ids (B, T)."""
    return F.cross_entropy(
        logits[:, :-1].reshape(-1, logits.shape[-1]).float(),  # (B*(T-1), V)
        input_ids[:, 1:].reshape(-1),  # (B*(T-1),)
        reduction="sum",
    )


def _active(model: nn.Module, skip: Collection[int]) -> list[int]:
    return [i for i in range(len(arch.decoder_blocks(model))) if i not in set(skip)]


def _scores(totals: dict[int, float], count: int, n_blocks: int, transform: Callable[[float], float]) -> list[float]:
    return [transform(totals[i] / count) if i in totals else math.inf for i in range(n_blocks)]


def _chain_inputs(model, calls, input_ids, active) -> tuple[dict[int, torch.Tensor], torch.Tensor]:
    """Inputs of every active block and the last active block's output, (B, T, H) each."""
    blocks = arch.decoder_blocks(model)
    hidden = arch.block_input(model, input_ids)  # (B, T, H)
    inputs = {}
    for i in active:
        inputs[i] = hidden
        hidden = arch.run_block(blocks[i], calls[i], hidden)
    return inputs, hidden


def _suffix(model, calls, active, start_after: int, hidden: torch.Tensor) -> torch.Tensor:
    """Run the active blocks after position `start_after` on `hidden`."""
    blocks = arch.decoder_blocks(model)
    for j in active:
        if j > start_after:
            hidden = arch.run_block(blocks[j], calls[j], hidden)
    return hidden


@torch.no_grad()
def block_influence(
    model: nn.Module, calibration: CalibrationData, skip: Collection[int] = (), batch_size: int = DEFAULT_BATCH_SIZE
) -> list[float]:
    """ShortGPT Block Influence per block: 1 - mean token cosine of its input and output."""
    device, _ = arch.model_device_dtype(model)
    calls = arch.capture_block_calls(model, calibration.seq_len)
    blocks = arch.decoder_blocks(model)
    active = _active(model, skip)
    totals = {i: 0.0 for i in active}
    tokens = 0
    for ids in calibration.batches(batch_size, device):
        hidden = arch.block_input(model, ids)  # (B, T, H)
        for i in active:
            out = arch.run_block(blocks[i], calls[i], hidden)
            totals[i] += _token_cosines(hidden, out).sum().item()
            hidden = out
        tokens += ids.numel()
    return _scores(totals, tokens, len(blocks), lambda mean_cos: 1.0 - mean_cos)


def _without_each_block(model: nn.Module, calibration: CalibrationData, skip: Collection[int], batch_size: int):
    """Per calibration batch and active block i: (ids, final hidden state, final hidden state
    with block i skipped). Skipping block i sends its input straight to the blocks after it."""
    device, _ = arch.model_device_dtype(model)
    calls = arch.capture_block_calls(model, calibration.seq_len)
    active = _active(model, skip)
    for ids in calibration.batches(batch_size, device):
        inputs, final = _chain_inputs(model, calls, ids, active)
        for i in active:
            yield i, ids, final, _suffix(model, calls, active, i, inputs[i])  # (B, T, H) each


@torch.no_grad()
def macro_influence(
    model: nn.Module, calibration: CalibrationData, skip: Collection[int] = (), batch_size: int = DEFAULT_BATCH_SIZE
) -> list[float]:
    """FuseGPT Macro Influence per block: 1 - mean token cosine of the final hidden state
    (last block output, before the final norm) with and without the block."""
    totals = {i: 0.0 for i in _active(model, skip)}
    for i, _, final, without in _without_each_block(model, calibration, skip, batch_size):
        totals[i] += _token_cosines(final, without).sum().item()
    tokens = calibration.input_ids.numel()  # every window passes through each active block once
    return _scores(totals, tokens, len(arch.decoder_blocks(model)), lambda mean_cos: 1.0 - mean_cos)


@torch.no_grad()
def sleb_nll(
    model: nn.Module, calibration: CalibrationData, skip: Collection[int] = (), batch_size: int = DEFAULT_BATCH_SIZE
) -> list[float]:
    """SLEB criterion per block: mean next-token NLL of the model without that block."""
    totals = {i: 0.0 for i in _active(model, skip)}
    for i, ids, _, without in _without_each_block(model, calibration, skip, batch_size):
        totals[i] += _next_token_nll_sum(arch.output_head(model, without), ids).item()
    predicted = calibration.num_sequences * (calibration.seq_len - 1)  # every token but each window's first
    return _scores(totals, predicted, len(arch.decoder_blocks(model)), lambda mean_nll: mean_nll)


IMPORTANCE: dict[str, Callable[..., list[float]]] = {
    "block_influence": block_influence,
    "macro_influence": macro_influence,
    "sleb": sleb_nll,
}


def importance_fn(name: str) -> Callable[..., list[float]]:
    if name not in IMPORTANCE:
        raise ValueError(f"importance: unknown criterion {name!r} (valid: {', '.join(sorted(IMPORTANCE))})")
    return IMPORTANCE[name]


def lowest(scores: list[float], count: int) -> list[int]:
    """Positions of the `count` lowest scores (ties broken by position)."""
    return sorted(range(len(scores)), key=lambda i: (scores[i], i))[:count]


def select_blocks(
    model: nn.Module,
    calibration: CalibrationData,
    count: int,
    importance: str = "block_influence",
    iterative: bool = False,
    batch_size: int = DEFAULT_BATCH_SIZE,
) -> list[int]:
    """Positions (in the current model) of `count` blocks to remove, in removal order.

    One-shot: the `count` lowest scores of one call. Iterative: score, drop the lowest, rescore
    the model without it, ... (FuseGPT's `--iterative`; SLEB's greedy search).
    """
    score = importance_fn(importance)
    if not iterative:
        return lowest(score(model, calibration, batch_size=batch_size), count)
    chosen: list[int] = []
    for _ in range(count):
        chosen.append(lowest(score(model, calibration, skip=chosen, batch_size=batch_size), 1)[0])
    return chosen
