"""The Evolver's tensor steps (`evolver`, `de_rand_1`) and `copy`, registered as operators.

Evolver (Du et al. 2024, the public code's form), per tensor, with parent `x_i` (the target),
a reference individual `x_ref`, scale `F` and crossover rate `CR`:

    x_new = (1 - F) x_i + F x_ref          mutation, computed as torch.lerp(x_i, x_ref, F)
    y     = where(u < CR, x_new, x_i)      binomial crossover, u ~ U[0, 1) per coordinate

`torch.lerp` makes F = 0 return the parent bit for bit and F = 1 the reference. `de_rand_1`
is the textbook DE/rand/1 mutant `v = x_r1 + F (x_r2 - x_r3)` with the same crossover against
the target. The crossover draws come from `evolve.rng` (16-bit draws against an integer
threshold, seeded by (recipe seed, tensor name)), always drawn on the CPU, so a CPU and a CUDA
actor build the same mask; CR = 1 gives the mutant and CR = 0 the parent exactly.

On the CPU the step runs in chunks of 2^20 coordinates: mutant, mask and selection of one
chunk stay in cache, and each coordinate costs one read of each input and one write, which is
the memory-bandwidth floor (`benchmarks/bench_merge.py` times it against that floor).

Inputs are never written to: parents may be read-only arrays from the Ray object store.
"""
from __future__ import annotations

from typing import Any

import torch

from evolve.registry import Operator, ParamSpec, TensorCall, as_float, register_operator
from evolve.rng import CHUNK_DRAWS, keep_mask, select_mask_chunks

__all__ = ["evolver_step", "de_rand_1_step", "probability"]


def _crossover(target: torch.Tensor, mutant_chunk, CR: float, seed: int, out: torch.Tensor) -> torch.Tensor:
    """`out = where(u < CR, mutant, target)`, the mutant computed chunk by chunk.

    `mutant_chunk(start, stop, buffer)` writes the mutant's flat coordinates [start, stop)
    into `buffer`. `out` must be contiguous, of the target's dtype and device. On the CPU the
    selection is bitwise on the floats' bit patterns, `x ^ ((x ^ mutant) & mask)` with an
    all-ones integer mask, exact and branch-free (see `evolve.rng.select_mask_chunks`); `out`
    may be the target itself (each coordinate is read before it is written).
    """
    flat_target = target.reshape(-1)
    flat_out = out.view(-1)
    count = flat_target.numel()
    if target.device.type != "cpu":  # draw the whole mask on the CPU, then compute on device
        mask = keep_mask(seed, (count,), CR).to(target.device)
        buffer = torch.empty_like(flat_target)
        mutant_chunk(0, count, buffer)
        return torch.where(mask, buffer, flat_target, out=flat_out).view(out.shape)
    int_dtype = {torch.float32: torch.int32, torch.float64: torch.int64}[target.dtype]
    buffer = torch.empty(min(count, CHUNK_DRAWS), dtype=target.dtype)
    target_bits, out_bits = flat_target.view(int_dtype), flat_out.view(int_dtype)
    start = 0
    for mask in select_mask_chunks(seed, count, CR, bits=8 * target.element_size()):
        stop = start + mask.numel()
        mutant = buffer[: stop - start]
        mutant_chunk(start, stop, mutant)
        x, flips = target_bits[start:stop], mutant.view(int_dtype)
        flips.bitwise_xor_(x)  # bits where x and the mutant differ
        flips.bitwise_and_(mask)  # ... only where the draw picked the mutant
        torch.bitwise_xor(x, flips, out=out_bits[start:stop])  # the mutant there, x elsewhere
        start = stop
    return out


def evolver_step(target: torch.Tensor, ref: torch.Tensor, F: float, CR: float, seed: int,
                 out: torch.Tensor | None = None) -> torch.Tensor:
    """Evolver offspring of one tensor: lerp toward `ref` by F, binomial crossover with rate CR."""
    target, ref = target.contiguous(), ref.contiguous()
    out = torch.empty_like(target) if out is None else out
    flat_target, flat_ref = target.reshape(-1), ref.reshape(-1)

    def mutant_chunk(start: int, stop: int, buffer: torch.Tensor) -> None:
        torch.lerp(flat_target[start:stop], flat_ref[start:stop], F, out=buffer)  # (1-F) x_i + F x_ref

    return _crossover(target, mutant_chunk, CR, seed, out)


def de_rand_1_step(target: torch.Tensor, r1: torch.Tensor, r2: torch.Tensor, r3: torch.Tensor,
                   F: float, CR: float, seed: int, out: torch.Tensor | None = None) -> torch.Tensor:
    """DE/rand/1: mutant `x_r1 + F (x_r2 - x_r3)`, binomial crossover with the target."""
    target = target.contiguous()
    flats = [t.contiguous().reshape(-1) for t in (r1, r2, r3)]
    out = torch.empty_like(target) if out is None else out

    def mutant_chunk(start: int, stop: int, buffer: torch.Tensor) -> None:
        a, b, c = (f[start:stop] for f in flats)
        torch.sub(b, c, out=buffer)  # x_r2 - x_r3
        torch.add(a, buffer, alpha=F, out=buffer)  # x_r1 + F (x_r2 - x_r3)

    return _crossover(target, mutant_chunk, CR, seed, out)


# --- registration -------------------------------------------------------------------------


def _apply_evolver(call: TensorCall) -> torch.Tensor:
    target, ref = call.inputs
    return evolver_step(target, ref, call.shared["F"], call.shared["CR"], call.seed, call.out)


def _apply_de_rand_1(call: TensorCall) -> torch.Tensor:
    target, r1, r2, r3 = call.inputs
    return de_rand_1_step(target, r1, r2, r3, call.shared["F"], call.shared["CR"], call.seed, call.out)


def _apply_copy(call: TensorCall) -> torch.Tensor:
    return call.inputs[0].clone() if call.out is None else call.out.copy_(call.inputs[0])


def probability(value: Any) -> float:
    """A number in [0, 1] (mergekit's lax float otherwise)."""
    number = as_float(value)
    if not 0.0 <= number <= 1.0:
        raise ValueError(f"must be in [0, 1], got {number}")
    return number


register_operator(Operator(
    "evolver", _apply_evolver,
    (ParamSpec("F", as_float, 0.5, doc="step toward the reference"),
     ParamSpec("CR", probability, 0.5, doc="crossover rate")),
    min_inputs=2, max_inputs=2, inputs_doc="(target, reference)",
))
register_operator(Operator(
    "de_rand_1", _apply_de_rand_1,
    (ParamSpec("F", as_float, 0.5), ParamSpec("CR", probability, 0.5)),
    min_inputs=4, max_inputs=4, inputs_doc="(target, r1, r2, r3)",
))
register_operator(Operator("copy", _apply_copy, (), min_inputs=1, max_inputs=1, inputs_doc="(source,)"))
