"""Classic weight merges as small pure functions over tensors, registered by name.

Each function takes the tensors of ONE name (never a whole model) in a floating compute dtype
and returns a new tensor; inputs are never written to (they may be read-only views of the Ray
object store or of a memory-mapped file). Numerics follow mergekit 0.1.5, the reference users
know, and `tests/test_mergekit_parity.py` checks agreement to 1e-6 in fp32:

* `linear`: `sum_i w_i x_i`, divided by `sum_i w_i` when `normalize` (default true).
* `task_arithmetic`: `base + lambda * sum_i w_i tau_i`, `tau_i = x_i - base`; `normalize`
  (default false) divides by `sum_i w_i` (a sum below 1e-8 in magnitude divides by 1).
* `ties`: each `tau_i` trimmed to its `k = max(1, int(density * numel))` largest magnitudes,
  weighted, a sign elected per coordinate from the SUM of the weighted trimmed vectors (>= 0 is
  positive: mergekit's "sum" consensus, the TIES paper's), entries agreeing with it kept;
  `normalize` (default true) divides by the sum of the agreeing entries' weights (0 -> 1).
  Where several entries have exactly the k-th largest magnitude (quantised weights make that
  common), mergekit keeps whichever its unstable `torch.argsort` puts first; we keep the
  lowest indices (O(n)), or with `tie_order: mergekit` run that same sort for such tensors
  only, so the trims are mergekit's bit for bit (this was issue 16's fp32 `normalize: false`
  gap: every differing coordinate had a tied trim entry, and a flipped trim can flip the
  elected sign, so the difference can exceed the tied magnitude).
* `dare_linear` / `dare_ties`: each `tau_i` entry dropped with probability `1 - density`; with
  `rescale` (default true) the kept ones are scaled by `||tau_i||_1 / ||kept||_1`, mergekit
  0.1.5's rescaling (the paper's `1 / density` is its expectation; none when either norm is
  below 1e-7); then task arithmetic / TIES consensus (`normalize` default false). The drop
  mask is seeded from (recipe seed, tensor name, input id), see `evolve.rng`; mergekit draws
  from its unseeded global RNG, so the two agree in distribution (`tests/test_mergekit_examples.py`
  checks the kept fraction per tensor and the rescaling) and exactly at density 1.
* `slerp`: spherical interpolation of the whole tensor between `v0` (t = 0, the base) and
  `v1`, on copies normalised by their L2 norms (norms <= 1e-8 taken as 1); when
  `|cos| > 0.9995` it falls back to `(1 - t) v0 + t v1`.

Computation is in float32 (float64 when an input is float64) unless the caller passes float16
/ bfloat16 inputs to a task-vector merge: then `task_vector_merge_low_precision` rounds where
mergekit 0.1.5 does (it computes this family in the inputs' dtype), which `evofuse merge` uses
for a YAML's `dtype: float16 / bfloat16` so that it gives mergekit's numbers.

Speed (the 2-core CPU, SmolLM2-135M, `benchmarks/bench_merge.py`): the task-vector merges run
in chunks of 2^16 coordinates so that every temporary stays in cache; TIES finds each
threshold in O(n) (`magnitude_cut`) instead of sorting, and selects agreeing entries with
arithmetic rather than boolean masks (`torch.where` / masked ops with random masks cost
~10 ns a coordinate here, branch mispredictions; float and numpy compare/multiply ~0.3-1 ns).
On float32 CPU tensors both TIES passes (the threshold's bracket count and the combine) run in
the native kernel of `evolve/native.py` when a C compiler is at hand: one loop per pass instead
of one torch / numpy operation per step, the same bits (3 x 134.5M coordinates, one thread:
2.4 s -> 1.2 s). The threshold search itself is torch-free (`evolve/magnitude.py`), so
`evofuse merge` runs it in a worker process while the main one imports torch
(`evolve/prefetch.py`); `magnitude_cut` takes those thresholds when they match its inputs.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np
import torch

from evolve import native, prefetch
from evolve.magnitude import Threshold, magnitude_threshold
from evolve.recipe import RecipeError
from evolve.registry import Operator, ParamSpec, TensorCall, as_bool, as_float, register_operator
from evolve.rng import derive_seed, keep_mask_chunks

__all__ = [
    "linear",
    "task_vector",
    "task_vector_merge",
    "MagnitudeCut",
    "magnitude_cut",
    "trim_to_top_magnitude",
    "sign_consensus_combine",
    "drop_chunk",
    "dare_l1_scale",
    "task_vector_merge_low_precision",
    "combine_task_vectors_low_precision",
    "LOW_PRECISION",
    "slerp",
]

SLERP_DOT_THRESHOLD = 0.9995  # mergekit's: above it the inputs count as colinear -> lerp
SLERP_NORM_EPS = 1e-8  # norms at or below this are treated as 1 (mergekit's eps)
MERGE_CHUNK = 1 << 16  # coordinates per chunk of a task-vector merge: temporaries stay in cache
L1_RESCALE_EPS = 1e-7  # mergekit's: no DARE rescaling when either L1 norm is below it


# --- the pure tensor functions ------------------------------------------------------------


def linear(tensors: Sequence[torch.Tensor], weights: Sequence[float], normalize: bool = True) -> torch.Tensor:
    """`sum_i w_i x_i`, optionally divided by `sum_i w_i`."""
    coefficients = torch.tensor(weights, dtype=tensors[0].dtype)  # (N,) as mergekit: in compute dtype
    result = tensors[0] * coefficients[0]
    for tensor, coefficient in zip(tensors[1:], coefficients[1:]):
        result.addcmul_(tensor, coefficient)  # result += x_i * w_i
    if normalize:
        total = coefficients.sum()
        if total == 0:
            raise RecipeError("linear weights sum to 0; set normalize: false or change 'weight'")
        result.div_(total)
    return result


def task_vector(tensor: torch.Tensor, base: torch.Tensor) -> torch.Tensor:
    return tensor - base  # tau = x - base, a new tensor


# TIES trimming. The k-th largest |tau| of a whole tensor is found first (one streaming pass,
# `magnitude_cut`); the merge then runs chunk by chunk with that threshold (`MagnitudeCut.trim`).


class MagnitudeCut:
    """Keep |tau| > threshold, plus `ties` of the entries equal to it.

    That keeps exactly k entries, as mergekit's `torch.argsort(|tau|, descending=True)[:k]`
    does. Which of several entries tied at the threshold that unstable sort keeps depends on
    the whole array. By default the lowest indices are kept (O(n), no sort); with
    `tie_order: mergekit`, `magnitude_cut` runs mergekit's sort once for a tensor with such a
    choice and records the flat indices it keeps (`tied`): bit-identical, at the cost of an
    O(n log n) sort of that tensor (5 s for SmolLM2's 28M-entry embedding).
    Stateful: `trim` must see the chunks in order, once.
    """

    def __init__(self, threshold: float, ties: int, tied: np.ndarray | None = None):
        self.threshold = threshold
        self.ties = ties  # entries equal to the threshold still to keep (lowest index first)
        self.tied = tied  # or: sorted flat indices of the tied entries to keep
        self.position = 0  # flat index of the next chunk's first entry

    def trim(self, delta: torch.Tensor, scratch: np.ndarray | None, keep: np.ndarray | None) -> None:
        """Zero the trimmed entries of a flat chunk in place (CPU: scratch/keep of its length)."""
        start, stop = self.position, self.position + delta.numel()
        self.position = stop
        if delta.device.type != "cpu":
            magnitude = delta.abs()
            kept = magnitude > self.threshold
            if self.tied is not None:
                chosen = self.tied[(self.tied >= start) & (self.tied < stop)] - start
                kept[torch.from_numpy(chosen).to(delta.device)] = True
            elif self.ties > 0:
                tied = (magnitude == self.threshold).nonzero().reshape(-1)[: self.ties]
                kept[tied] = True
                self.ties -= tied.numel()
            delta.mul_(kept)
            return
        delta = delta.numpy()  # numpy's compare/multiply by a mask are ~3x torch's on CPU
        magnitude = np.abs(delta, out=scratch)
        np.greater(magnitude, self.threshold, out=keep)
        if self.tied is not None:
            low, high = np.searchsorted(self.tied, [start, stop])
            keep[self.tied[low:high] - start] = True
        elif self.ties > 0:
            tied = np.flatnonzero(magnitude == self.threshold)[: self.ties]
            keep[tied] = True
            self.ties -= tied.shape[0]
        np.multiply(delta, keep, out=delta)


def _tied_choice(flat_x: torch.Tensor, flat_b: torch.Tensor, k: int, found: Threshold,
                 mergekit_order: bool) -> MagnitudeCut:
    """The cut at `found`; when only some of the entries tied at it stay and `mergekit_order`,
    mergekit's own sort decides which (see MagnitudeCut)."""
    if found.ties >= found.tied or not mergekit_order:
        return MagnitudeCut(found.value, found.ties)
    magnitude = (flat_x - flat_b).abs_()
    order = torch.argsort(magnitude, descending=True)[:k]  # mergekit's selection, exactly
    chosen = order[magnitude[order] == found.value].cpu().numpy()
    return MagnitudeCut(found.value, found.ties, np.sort(chosen))


def magnitude_cut(tensor: torch.Tensor, base: torch.Tensor, density: float,
                  mergekit_order: bool = False) -> MagnitudeCut | None:
    """The cut keeping the `k = max(1, int(density * numel))` largest |tensor - base|; None: all.

    On the CPU the threshold comes from `evolve.magnitude` (O(n), no sort), or ready-made from
    `evofuse merge`'s prefetch when it found this very cut while torch was loading.
    """
    count = tensor.numel()
    if density >= 1:
        return None
    if density <= 0 or count == 0:
        return MagnitudeCut(float("inf"), 0)
    k = max(1, int(density * count))
    flat_x, flat_b = tensor.reshape(-1), base.reshape(-1)
    if tensor.device.type != "cpu":  # on an accelerator: one exact selection on the device
        magnitude = (flat_x - flat_b).abs_()
        value = float(magnitude.kthvalue(count - k + 1).values)
        found = Threshold(value, k - int((magnitude > value).sum()), int((magnitude == value).sum()))
        return _tied_choice(flat_x, flat_b, k, found, mergekit_order)
    x, b = flat_x.detach().numpy(), flat_b.detach().numpy()
    found = prefetch.prefetched_threshold(x, b, density) or magnitude_threshold(x, b, k)
    return _tied_choice(flat_x, flat_b, k, found, mergekit_order)


def trim_to_top_magnitude(delta: torch.Tensor, density: float) -> torch.Tensor:
    """Zero all but the `max(1, int(density * numel))` largest-magnitude entries, in place."""
    cut = magnitude_cut(delta, torch.zeros_like(delta), density)
    if cut is not None:
        flat = delta.reshape(-1)
        cut.trim(flat, np.empty(flat.shape, dtype=np.float64 if flat.dtype == torch.float64 else np.float32),
                 np.empty(flat.shape, dtype=bool))
    return delta


def sign_consensus_combine(deltas: Sequence[torch.Tensor], weights: Sequence[float], normalize: bool,
                           out: torch.Tensor | None = None) -> torch.Tensor:
    """TIES merge of weighted task vectors: elect a sign by their sum, keep agreeing entries.

    `deltas[i]` is already weighted (`w_i tau_i`); an entry agrees when it has the elected
    sign strictly (zeros agree with nothing). The divisor is `sum_i w_i [agrees_i]`, 0 -> 1.
    Branch-free: with `s = +-1` the elected sign, `max(s d, 0) * s` is `d` where it agrees and 0
    elsewhere (exact: multiplying by +-1 loses nothing), and `sign(max(s d, 0))` its indicator.
    The sums run over the inputs in order, as mergekit's do.
    """
    vote = deltas[0].clone()  # (shape) sum of weighted task vectors
    for delta in deltas[1:]:
        vote.add_(delta)
    # s = +1 where vote >= 0 (-0 only when every entry is a zero, where nothing agrees anyway)
    elected = torch.copysign(torch.ones((), dtype=vote.dtype), vote, out=vote)  # (shape)
    mixed = torch.zeros_like(deltas[0]) if out is None else out.zero_()
    divisor = torch.zeros_like(deltas[0]) if normalize else None
    agreeing = torch.empty_like(deltas[0])
    for delta, weight in zip(deltas, weights):
        torch.mul(delta, elected, out=agreeing).clamp_min_(0)  # |d| where it agrees, else 0
        if divisor is not None:
            divisor.add_(torch.sign(agreeing), alpha=weight)  # w_i [agrees_i]
        mixed.addcmul_(agreeing, elected)  # d where it agrees
    if divisor is not None:
        divisor.add_(divisor == 0)  # 0 -> 1, others unchanged
        mixed.div_(divisor)
    return mixed


def task_vector_merge(
    base: torch.Tensor,
    tensors: Sequence[torch.Tensor],
    weights: Sequence[float],
    *,
    densities: Sequence[float] | None = None,
    sparsify: str | None = None,  # None | "magnitude" (TIES) | "random" (DARE)
    consensus: bool = False,  # TIES sign election
    normalize: bool = False,
    scale: float = 1.0,  # lambda
    rescale: bool = True,  # DARE only
    seeds: Sequence[int] | None = None,  # DARE only: one per input
    mergekit_order: bool = False,  # TIES only: equal magnitudes at the cut kept as mergekit's sort keeps them
    out: torch.Tensor | None = None,  # contiguous, base's dtype and shape
    chunk: int = MERGE_CHUNK,
) -> torch.Tensor:
    """mergekit's generalised task arithmetic: the engine of task_arithmetic, TIES and DARE.

    Chunk by chunk (all temporaries of a chunk stay in cache) after the TIES thresholds have
    been found on the whole tensors: for each chunk, `d_i = w_i sparsify(x_i - base)`, then
    the sign consensus or the plain sum, the normalisation, lambda, and `+ base`.
    """
    out = torch.empty_like(base) if out is None else out
    if not tensors:
        return out.copy_(base)
    count = base.numel()
    chunk = chunk if base.device.type == "cpu" else max(count, 1)
    # weights as mergekit holds them: in the compute dtype
    coefficients = [float(w) for w in torch.tensor(weights, dtype=base.dtype)]
    total = float(torch.tensor(coefficients, dtype=base.dtype).sum())
    cuts = [magnitude_cut(t, base, d, mergekit_order) for t, d in zip(tensors, densities)] \
        if sparsify == "magnitude" else [None] * len(tensors)
    if consensus and sparsify in (None, "magnitude") and all(c is None or c.tied is None for c in cuts) \
            and native.available(base, out, *tensors):  # TIES in one fused loop, the same bits
        return native.ties_merge(base, tensors, coefficients, [None if c is None else c.threshold for c in cuts],
                                 [0 if c is None else c.ties for c in cuts], normalize, scale, out)
    masks = [keep_mask_chunks(seed, count, d, chunk) for seed, d in zip(seeds, densities)] \
        if sparsify == "random" else [None] * len(tensors)
    drop_scales = [dare_l1_scale(x, base, seed, d, chunk) if rescale and d < 1 else 1.0
                   for x, seed, d in zip(tensors, seeds, densities)] if sparsify == "random" else None
    flat_b, flat_out = base.reshape(-1), out.view(-1)
    flat_x = [t.reshape(-1) for t in tensors]
    buffers = [torch.empty(min(chunk, count), dtype=base.dtype, device=base.device) for _ in tensors]
    scratch = np.empty(min(chunk, count), dtype=np.float64 if base.dtype == torch.float64 else np.float32)
    keep = np.empty(min(chunk, count), dtype=bool)
    for start in range(0, count, chunk):
        stop = min(start + chunk, count)
        size = stop - start
        deltas = []
        for i, x in enumerate(flat_x):
            delta = torch.sub(x[start:stop], flat_b[start:stop], out=buffers[i][:size])  # tau_i
            if cuts[i] is not None:
                cuts[i].trim(delta, scratch[:size], keep[:size])
            if masks[i] is not None:
                drop_chunk(delta, next(masks[i]).to(delta.device), densities[i], drop_scales[i])
            deltas.append(delta.mul_(coefficients[i]))  # w_i tau_i
        target = flat_out[start:stop]
        if consensus:
            mixed = sign_consensus_combine(deltas, coefficients, normalize, out=target)
        else:
            mixed = target.copy_(deltas[0])
            for delta in deltas[1:]:
                mixed.add_(delta)
            if normalize:
                mixed.div_(total if abs(total) >= 1e-8 else 1.0)
        if scale != 1:
            mixed.mul_(scale)
        mixed.add_(flat_b[start:stop])
    return out


LOW_PRECISION = (torch.float16, torch.bfloat16)


def task_vector_merge_low_precision(
    base: torch.Tensor,
    tensors: Sequence[torch.Tensor],
    weights: Sequence[float],
    *,
    densities: Sequence[float] | None = None,
    sparsify: str | None = None,
    consensus: bool = False,
    normalize: bool = False,
    scale: float = 1.0,
    rescale: bool = True,
    seeds: Sequence[int] | None = None,
    mergekit_order: bool = True,  # always: the sort is needed here anyway
) -> torch.Tensor:
    """`task_vector_merge` for float16 / bfloat16 inputs, rounding where mergekit 0.1.5 does.

    mergekit computes the task-vector family in the inputs' dtype, on whole tensors: every
    `tau_i` and its trim mask are rounded to that dtype, then combined by
    `combine_task_vectors_low_precision` (each sum over the inputs one reduction). Doing the
    same operations in the same order gives its numbers bit for bit (the float32 chunked engine
    would be closer to the exact merge, but not what a mergekit user's fp16/bf16 YAML produced).
    Magnitude trimming keeps mergekit's selection (a sort of the float32 magnitudes); DARE uses
    evofuse's seeded masks with mergekit's L1 rescaling (in float32 for float16 inputs).
    """
    dtype = base.dtype
    if not tensors:
        return base.clone()
    deltas = torch.empty((len(tensors), *base.shape), dtype=dtype, device=base.device)  # (N, shape)
    for i, x in enumerate(tensors):
        delta = x - base  # tau_i, rounded to dtype
        if sparsify == "magnitude" and densities[i] < 1:
            count = delta.numel()
            k = max(1, int(densities[i] * count)) if densities[i] > 0 and count else 0
            keep = torch.zeros(count, dtype=dtype, device=delta.device)
            keep[torch.argsort(delta.abs().reshape(-1).float(), descending=True)[:k]] = 1
            delta = delta * keep.view_as(delta)
        elif sparsify == "random" and densities[i] < 1:
            work = torch.float32 if dtype == torch.float16 else dtype  # mergekit's bernoulli: no fp16 on CPU
            keep = next(keep_mask_chunks(seeds[i], delta.numel(), densities[i], max(delta.numel(), 1)))
            masked = delta.to(work) * keep.to(delta.device).to(work).view_as(delta)
            if rescale:
                before, after = delta.to(work).abs().sum(), masked.abs().sum()  # rounded to `work`
                if before >= L1_RESCALE_EPS and after >= L1_RESCALE_EPS:
                    masked = masked * (before / after)
            delta = masked.to(dtype)
        deltas[i] = delta
    return combine_task_vectors_low_precision(base, deltas, weights, consensus=consensus,
                                              normalize=normalize, scale=scale)


def combine_task_vectors_low_precision(base: torch.Tensor, deltas: torch.Tensor, weights: Sequence[float], *,
                                       consensus: bool, normalize: bool, scale: float) -> torch.Tensor:
    """`base + lambda * combine(w_i d_i)` in base's (float16 / bfloat16) dtype, as mergekit 0.1.5.

    `deltas` (N, shape) holds the sparsified task vectors in that dtype and is weighted in
    place. Every step rounds to the dtype, and each sum over the inputs is one reduction
    (`sum(dim=0)` accumulates in float32 and rounds once), as in mergekit's generalised task
    arithmetic: weights rounded to the dtype, `w_i d_i`, the sign vote (TIES / DELLA /
    breadcrumbs_ties) and the agreeing sum and divisor, or the plain sum and the weights' sum,
    then the division, lambda (a Python float) and `+ base`.
    """
    dtype = base.dtype
    coefficients = torch.tensor(list(weights), dtype=dtype, device=base.device).view(-1, *([1] * base.dim()))
    deltas.mul_(coefficients)  # w_i tau_i, rounded
    if consensus:
        elected = (deltas.sum(dim=0) >= 0).to(dtype) * 2 - 1  # the sign of the summed vote
        agrees = deltas.sign() == elected  # (N, shape): zeros agree with nothing
        mixed = (deltas * agrees).sum(dim=0)
        divisor = (coefficients * agrees).sum(dim=0)
        divisor[divisor == 0] = 1
    else:
        mixed = deltas.sum(dim=0)
        divisor = coefficients.sum(dim=0)
        divisor[divisor.abs() < 1e-8] = 1
    if normalize:
        mixed /= divisor
    if scale != 1:
        mixed *= scale
    return base + mixed


def drop_chunk(delta: torch.Tensor, keep: torch.Tensor, density: float, scale: float) -> torch.Tensor:
    """DARE on one chunk: zero the dropped entries, multiply the kept ones by `scale`."""
    if density >= 1:
        return delta
    delta.mul_(keep)
    if scale != 1:
        delta.mul_(scale)
    return delta


def dare_l1_scale(x: torch.Tensor, base: torch.Tensor, seed: int, density: float, chunk: int) -> float:
    """mergekit's DARE rescaling: ||tau||_1 / ||kept tau||_1 (1 when either is below 1e-7).

    It restores the L1 norm of the whole task vector; its expectation is the paper's
    1 / density. One pass over the same seeded mask the merge then applies.
    """
    before = after = 0.0
    flat_x, flat_b = x.reshape(-1), base.reshape(-1)
    count = flat_b.numel()
    buffer = torch.empty(min(chunk, count), dtype=base.dtype, device=base.device)
    for start, keep in zip(range(0, count, chunk), keep_mask_chunks(seed, count, density, chunk)):
        stop = min(start + chunk, count)
        magnitude = torch.sub(flat_x[start:stop], flat_b[start:stop], out=buffer[: stop - start]).abs_()
        before += float(magnitude.sum(dtype=torch.float64))
        after += float(magnitude.mul_(keep.to(magnitude.device)).sum(dtype=torch.float64))
    if before < L1_RESCALE_EPS or after < L1_RESCALE_EPS:
        return 1.0
    ratio = torch.tensor(before, dtype=base.dtype) / torch.tensor(after, dtype=base.dtype)  # as mergekit: in dtype
    return float(ratio)


def slerp(v0: torch.Tensor, v1: torch.Tensor, t: float) -> torch.Tensor:
    """Spherical interpolation of two tensors as whole vectors; lerp when nearly colinear."""
    t_ = torch.tensor(t, dtype=v0.dtype, device=v0.device)
    norm0 = torch.linalg.vector_norm(v0)
    norm1 = torch.linalg.vector_norm(v1)
    norm0 = torch.where(norm0 > SLERP_NORM_EPS, norm0, 1)
    norm1 = torch.where(norm1 > SLERP_NORM_EPS, norm1, 1)
    dot = ((v0 / norm0) * (v1 / norm1)).sum().clamp(-1, 1)  # cos of the angle between them
    if dot.abs() > SLERP_DOT_THRESHOLD:
        coef0, coef1 = 1 - t_, t_
    else:
        theta = torch.acos(dot)
        sin_theta = torch.sin(theta)
        coef0 = torch.sin((1 - t_) * theta) / sin_theta
        coef1 = torch.sin(t_ * theta) / sin_theta
    return coef0 * v0 + coef1 * v1


# --- registration: parameter specs and the adapters from a TensorCall ----------------------

WEIGHT = ParamSpec("weight", as_float, per_input=True, doc="coefficient of each input")
DENSITY = ParamSpec("density", as_float, 1.0, per_input=True, doc="fraction of each task vector kept")
LAMBDA = ParamSpec("lambda", as_float, 1.0, doc="scale of the combined task vector")
INT8_MASK = ParamSpec("int8_mask", as_bool, False, doc="accepted for mergekit files; no effect")


def as_tie_order(value) -> str:
    if value not in ("index", "mergekit"):
        raise ValueError(f"expected 'index' or 'mergekit', got {value!r}")
    return value


TIE_ORDER = ParamSpec("tie_order", as_tie_order, "index",
                      doc="equal magnitudes at the trim threshold: lowest index first (O(n)), or "
                          "as mergekit's unstable sort keeps them (bit-identical; sorts such tensors)")


def _values(call: TensorCall, name: str) -> list:
    return [p[name] for p in call.per_input]


def _apply_linear(call: TensorCall) -> torch.Tensor:
    return linear(call.inputs, _values(call, "weight"), call.shared["normalize"])


def _gta_adapter(sparsify: str | None, consensus: bool):
    def apply(call: TensorCall) -> torch.Tensor:
        seeds = [derive_seed(call.seed, input_id) for input_id in call.input_ids]
        engine = task_vector_merge_low_precision if call.base.dtype in LOW_PRECISION else task_vector_merge
        return engine(
            call.base,
            call.inputs,
            _values(call, "weight"),
            densities=_values(call, "density") if sparsify else None,
            sparsify=sparsify,
            consensus=consensus,
            normalize=call.shared["normalize"],
            scale=call.shared["lambda"],
            rescale=call.shared.get("rescale", True),
            seeds=seeds,
            mergekit_order=call.shared.get("tie_order", "index") == "mergekit",
        )

    return apply


def _apply_slerp(call: TensorCall) -> torch.Tensor:
    v0, v1 = call.inputs  # with a base, the base is v0 (an "endpoint" base is the first input)
    return slerp(v0, v1, call.shared["t"])


register_operator(Operator(
    "linear", _apply_linear,
    (WEIGHT, ParamSpec("normalize", as_bool, True)),
    merge_method=True, inputs_doc="the models to average (base ignored)",
))
register_operator(Operator(
    "task_arithmetic", _gta_adapter(None, False),
    (WEIGHT, LAMBDA, ParamSpec("normalize", as_bool, False), INT8_MASK),
    base="required", merge_method=True, inputs_doc="the fine-tuned models; base = their common base",
))
register_operator(Operator(
    "ties", _gta_adapter("magnitude", True),
    (WEIGHT, DENSITY, LAMBDA, ParamSpec("normalize", as_bool, True), INT8_MASK, TIE_ORDER),
    base="required", merge_method=True, inputs_doc="the fine-tuned models; base = their common base",
))
for _name, _consensus in (("dare_linear", False), ("dare_ties", True)):
    register_operator(Operator(
        _name, _gta_adapter("random", _consensus),
        (WEIGHT, DENSITY, LAMBDA, ParamSpec("normalize", as_bool, False),
         ParamSpec("rescale", as_bool, True, doc="scale kept entries by 1/density"), INT8_MASK),
        base="required", merge_method=True, inputs_doc="the fine-tuned models; base = their common base",
    ))
register_operator(Operator(
    "slerp", _apply_slerp,
    (ParamSpec("t", as_float, doc="0 gives the base (or the first input), 1 the other"),),
    base="endpoint", min_inputs=2, max_inputs=2, merge_method=True,
    inputs_doc="(v0, v1): the base and one other model, or two endpoints without a base",
))
