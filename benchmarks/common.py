"""Pieces the benchmark scripts share."""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F


@torch.no_grad()
def window_perplexity(model, windows: torch.Tensor, batch_size: int = 2) -> float:
    """exp(mean next-token NLL) over (W, T) token windows, each scored on its own: every token but
    a window's first is predicted, with no context carried over between windows."""
    model.eval()
    nll, predicted = 0.0, 0
    for start in range(0, windows.shape[0], batch_size):
        batch = windows[start : start + batch_size].to(model.device)  # (b, T)
        logits = model(input_ids=batch, use_cache=False).logits[:, :-1].float()  # (b, T-1, V)
        nll += F.cross_entropy(logits.flatten(0, 1), batch[:, 1:].flatten(), reduction="sum").item()
        predicted += batch[:, 1:].numel()
    return math.exp(nll / predicted)
