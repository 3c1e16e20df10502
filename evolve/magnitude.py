"""The TIES trim threshold: the k-th largest |x - base| of a whole tensor, in O(n), numpy only.

Torch-free on purpose: `evofuse merge` finds a TIES merge's thresholds in a process forked
before torch is imported (`evolve/prefetch.py`), and `evolve.merge_methods.magnitude_cut`
finds them here on the CPU, so both give the same numbers from one implementation.

The search never materialises |tau| for a large tensor: every `SAMPLE_STRIDE`-th magnitude is
a sample in which the target's rank is known in expectation (`k m / n` from the top, binomial
spread), so the sample's values at that rank +- 6 standard deviations bracket the k-th
largest with overwhelming probability. One pass then counts the magnitudes above the bracket
and gathers those inside it (the native kernel when it is built: one fused loop), and
`np.partition` (introselect, ~3.5 ns a value here where torch's `kthvalue` takes ~35) picks the
exact value among the few gathered. A bracket that misses (or a small tensor) falls back to
one partition of every magnitude: slower, the same answer.
"""
from __future__ import annotations

import math
from typing import NamedTuple

import numpy as np

from evolve import native

__all__ = ["SAMPLE_STRIDE", "Threshold", "kth_largest", "magnitude_threshold"]

SAMPLE_STRIDE = 64  # every 64th magnitude brackets the k-th largest
BRACKET_CHUNK = 1 << 16  # coordinates per step of the numpy bracket pass: temporaries stay in cache


class Threshold(NamedTuple):
    """Keep |tau| > value plus the first `ties` of the `tied` entries equal to it: k in all."""

    value: float
    ties: int  # entries equal to `value` that stay (k - #|tau| > value)
    tied: int  # entries equal to `value` in the whole tensor


def kth_largest(values: np.ndarray, k: int) -> float:
    """The k-th largest of a 1-D array (1 <= k <= n), by introselect."""
    count = values.shape[0]
    return float(np.partition(values, count - k)[count - k])


def magnitude_threshold(x: np.ndarray, base: np.ndarray, k: int) -> Threshold:
    """The k-th largest of |x - base| over flat arrays of one length (1 <= k <= n), and its ties."""
    count = x.shape[0]
    if count > 64 * SAMPLE_STRIDE:
        sample = np.abs(x[::SAMPLE_STRIDE] - base[::SAMPLE_STRIDE])  # (m,)
        m = sample.shape[0]
        centre = (k / count) * m  # the target's expected rank in the sample, from the top
        margin = 6.0 * math.sqrt(max(centre * (1 - k / count), 1.0)) + 4
        high_rank, low_rank = max(1, int(centre - margin)), min(m, int(centre + margin) + 1)
        bounds = np.partition(sample, [m - low_rank, m - high_rank])
        lower, upper = float(bounds[m - low_rank]), float(bounds[m - high_rank])
        if native.arrays_supported(x, base):  # one fused pass; room for twice the expected count
            room = min(count, 2 * (low_rank - high_rank + 1) * SAMPLE_STRIDE + 4096)
            bracket = native.magnitude_bracket(x, base, lower, upper, room)
        else:
            bracket = _bracket_chunks(x, base, lower, upper)
        if bracket is not None:  # None: more inside than the kernel had room for
            above, inside = bracket
            rank = k - above  # the target's rank among the bracketed values, from the top
            if 1 <= rank <= inside.shape[0]:
                value = inside.dtype.type(np.partition(inside, inside.shape[0] - rank)[inside.shape[0] - rank])
                return Threshold(float(value), k - above - int(np.count_nonzero(inside > value)),
                                 int(np.count_nonzero(inside == value)))
    magnitude = np.abs(x - base)  # a small tensor, or the bracket missed
    value = kth_largest(magnitude, k)
    return Threshold(value, k - int(np.count_nonzero(magnitude > value)), int(np.count_nonzero(magnitude == value)))


def _bracket_chunks(x: np.ndarray, base: np.ndarray, lower: float, upper: float) -> tuple[int, np.ndarray]:
    """(#|x - base| > upper, the values of |x - base| in [lower, upper] in index order), chunk by chunk."""
    count = x.shape[0]
    above, inside = 0, []
    scratch = np.empty(min(BRACKET_CHUNK, count), dtype=np.result_type(x, base))
    for start in range(0, count, BRACKET_CHUNK):
        stop = min(start + BRACKET_CHUNK, count)
        magnitude = scratch[: stop - start]
        np.abs(np.subtract(x[start:stop], base[start:stop], out=magnitude), out=magnitude)
        above += int(np.count_nonzero(magnitude > upper))
        inside.append(magnitude[(magnitude >= lower) & (magnitude <= upper)])
    return above, np.concatenate(inside)
