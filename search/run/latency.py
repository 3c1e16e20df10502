"""Forward-pass latency of a candidate model: a measurement of the model, not a fitness task."""
from __future__ import annotations

import statistics
import time

import torch


@torch.inference_mode()
def forward_latency_ms(
    model, batch_size: int = 1, seq_len: int = 128, repeats: int = 5, warmup: int = 1, seed: int = 0
) -> float:
    """Median wall time (ms) of one forward pass over a fixed (batch_size, seq_len) batch.

    The token ids are drawn from the vocabulary with a fixed seed, so every candidate of a run is
    timed on the same input; no KV cache. The median of `repeats` passes resists the odd slow
    pass a shared machine gives; on CUDA each pass is synchronised before the clock is read.
    """
    device = next(model.parameters()).device
    vocab = model.get_input_embeddings().num_embeddings
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (batch_size, seq_len), generator=generator).to(device)  # (B, T)

    def one_pass() -> float:
        start = time.perf_counter()
        model(input_ids=ids, use_cache=False)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        return (time.perf_counter() - start) * 1e3

    for _ in range(warmup):
        one_pass()
    return statistics.median(one_pass() for _ in range(repeats))


__all__ = ["forward_latency_ms"]
