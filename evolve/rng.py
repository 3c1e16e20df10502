"""Seeded random masks that are the same on every machine, process and device.

Every random draw in `evolve` comes from here. Two choices, both measured on the 2-core
development machine (135M coordinates, the size of SmolLM2-135M; `benchmarks/bench_merge.py`):

* **Seeds** are derived by hashing (`derive_seed`): blake2b over the parts' canonical text,
  so (run seed, candidate id) or (recipe seed, tensor name, input id) give the same 64-bit seed
  in any process, on any platform, independent of Python's randomised `hash()`.
* **Draws** are 16-bit integers compared with an integer threshold, taken from numpy's
  PCG64DXSM bit generator through `random_raw` (raw 64-bit words, four 16-bit draws each).
  NumPy keeps a bit generator's raw stream fixed across versions and platforms (the
  `Generator` methods are allowed to change; we do not use them), and the words are read as
  little-endian whatever the host. Drawing one float32 per coordinate with `torch.rand` cost
  0.55 s per 135M coordinates here (methods.md saw 4.4 s on a busier machine), `random_raw` as
  16-bit draws 0.08 s. The price is resolution: a probability `p` becomes
  `round(p * 65536) / 65536`, off by at most 7.7e-6, and p = 0 / p = 1 stay exact
  (nothing / everything kept).

Masks are always drawn on the CPU and moved to the tensor's device afterwards, so a CPU actor
and a CUDA actor materialise the same mask for the same seed.

torch is imported by the functions that make tensors, not by the module: `evolve.recipe` needs
`derive_seed`, and `evofuse merge` reads its recipe before torch is loaded (`evolve/prefetch.py`).
"""
from __future__ import annotations

import hashlib
from typing import TYPE_CHECKING, Iterator

import numpy as np

if TYPE_CHECKING:
    import torch

__all__ = [
    "DRAW_LEVELS",
    "CHUNK_DRAWS",
    "derive_seed",
    "draw_threshold",
    "uniform16_chunks",
    "keep_mask_chunks",
    "select_mask_chunks",
    "keep_mask",
]

DRAW_LEVELS = 1 << 16  # each draw is uniform on {0, ..., 65535}
CHUNK_DRAWS = 1 << 20  # draws per chunk: 2 MiB of random words, stays in cache


def derive_seed(*parts: int | str) -> int:
    """A 64-bit seed from ints and strings, stable across processes and platforms.

    Each part is written with its type ("i:" or "s:") and length so that ("ab", "c") and
    ("a", "bc") or 1 and "1" give different seeds.
    """
    digest = hashlib.blake2b(digest_size=8, person=b"evofuse-seed")
    for part in parts:
        if isinstance(part, bool) or not isinstance(part, (int, str)):
            raise TypeError(f"seed parts must be int or str, got {type(part).__name__}")
        text = f"{'i' if isinstance(part, int) else 's'}:{part}".encode()
        digest.update(len(text).to_bytes(4, "little") + text)
    return int.from_bytes(digest.digest(), "little")


def draw_threshold(probability: float) -> int:
    """The integer threshold `k` with P(draw < k) = round(probability * 65536) / 65536."""
    if not 0.0 <= probability <= 1.0:
        raise ValueError(f"probability must be in [0, 1], got {probability}")
    return int(round(probability * DRAW_LEVELS))


def uniform16_chunks(seed: int, count: int, chunk: int = CHUNK_DRAWS) -> Iterator[np.ndarray]:
    """`count` uniform 16-bit draws from `seed`, as consecutive uint16 arrays of `chunk` each.

    The concatenation does not depend on `chunk` (it must be a multiple of 4): the stream is one
    PCG64DXSM sequence of 64-bit words split into four little-endian 16-bit draws each.
    """
    if chunk % 4:
        raise ValueError("chunk must be a multiple of 4")
    bits = np.random.PCG64DXSM(seed)
    for start in range(0, count, chunk):
        n = min(chunk, count - start)
        words = bits.random_raw((n + 3) // 4)  # (ceil(n/4),) uint64
        yield words.astype("<u8", copy=False).view("<u2")[:n]  # (n,) uint16


def keep_mask_chunks(
    seed: int, count: int, probability: float, chunk: int = CHUNK_DRAWS
) -> Iterator[torch.Tensor]:
    """Boolean CPU chunks of a length-`count` mask, True with `probability` per coordinate."""
    import torch

    threshold = draw_threshold(probability)
    if threshold in (0, DRAW_LEVELS):  # p = 0 or 1: no draws needed, and exact
        for start in range(0, count, chunk):
            n = min(chunk, count - start)
            yield torch.full((n,), threshold == DRAW_LEVELS, dtype=torch.bool)
        return
    buffer = np.empty(chunk, dtype=bool)
    for draws in uniform16_chunks(seed, count, chunk):
        kept = np.less(draws, threshold, out=buffer[: draws.shape[0]])
        yield torch.from_numpy(kept)


def select_mask_chunks(
    seed: int, count: int, probability: float, bits: int = 32, chunk: int = CHUNK_DRAWS
) -> Iterator[torch.Tensor]:
    """The same mask as `keep_mask_chunks`, as int32 (or int64) chunks of -1 (kept) and 0.

    An all-ones integer mask lets a caller select between two float tensors bitwise
    (`x ^ ((x ^ y) & mask)`), which is exact and ~10x faster on the CPU than `torch.where`
    with a random boolean mask (branch mispredictions: 11.5 vs 0.9 ns per coordinate here).
    """
    import torch

    dtype = np.int32 if bits == 32 else np.int64
    threshold = draw_threshold(probability)
    if threshold in (0, DRAW_LEVELS):
        fill = -1 if threshold == DRAW_LEVELS else 0
        for start in range(0, count, chunk):
            yield torch.full((min(chunk, count - start),), fill, dtype=torch.int32 if bits == 32 else torch.int64)
        return
    buffer = np.empty(chunk, dtype=dtype)
    for draws in uniform16_chunks(seed, count, chunk):
        part = buffer[: draws.shape[0]]
        np.subtract(draws, threshold, out=part, dtype=dtype, casting="unsafe")  # < 0 where kept
        np.right_shift(part, bits - 1, out=part)  # arithmetic shift: -1 where kept, else 0
        yield torch.from_numpy(part)


def keep_mask(seed: int, shape: torch.Size | tuple[int, ...], probability: float) -> torch.Tensor:
    """A boolean CPU tensor of `shape`, True with `probability` per coordinate (row-major order)."""
    import torch

    count = int(np.prod(shape, dtype=np.int64)) if len(shape) else 1
    mask = torch.empty(count, dtype=torch.bool)
    start = 0
    for part in keep_mask_chunks(seed, count, probability):
        mask[start : start + part.shape[0]] = part
        start += part.shape[0]
    return mask.reshape(shape)
