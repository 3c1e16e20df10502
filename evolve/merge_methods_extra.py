"""mergekit's other task-vector merges: DELLA, Model Breadcrumbs, SCE, NearSwap, Arcee Fusion.

Small pure functions over the tensors of ONE name, registered by name like the classic merges
in `evolve.merge_methods` (whose sign election they share); inputs are never written to.
Numerics follow mergekit 0.1.5 (`tests/test_mergekit_methods.py` checks them against it in
fp32); where they cannot be equal it is said below. With `tau_i = x_i - base`:

* `della` / `della_linear` (DELLA-Merging, MAGPRUNE): each `tau_i` is ranked by magnitude
  within each row (along dim 1; a 1-D tensor is one row; equal magnitudes rank by index), and
  entry of 0-based rank r of n is kept with probability
  `p = density - epsilon + 2 epsilon r / (n - 1)` (the smallest `density - epsilon`, the
  largest `density + epsilon`, mean `density`). With `rescale` (default true) the kept entries
  are scaled so the L1 norm of the whole tensor is unchanged (mergekit's rescaling, not the
  paper's per-entry `1 / p`; skipped when either norm is below 1e-7). Then the weighted sum
  (`della_linear`) or the TIES sign election of `evolve.merge_methods` (`della`), the
  normalisation (default true for `della`, false for `della_linear`), `lambda`, `+ base`.
  `density >= 1` keeps `tau_i` untouched, `density <= 0` drops it; otherwise
  `density +- epsilon` must lie in (0, 1). Draws are seeded from (recipe seed, tensor name,
  input id) through `evolve.rng`, as DARE's: the same recipe gives the same weights, and
  mergekit's unseeded `torch.bernoulli` masks agree with ours only in distribution. A row of
  length 1 (mergekit: 0 / 0) is kept with probability `density`.
* `breadcrumbs` / `breadcrumbs_ties`: each `tau_i` sorted by magnitude ascending (with
  torch's unstable sort, as mergekit does, so equal magnitudes at the cuts fall the same way:
  bf16 task vectors have many): the largest `int(gamma * n)` outliers and the smallest are
  removed so that `int(density * n)` remain (when `density + gamma > 1` fewer outliers go,
  never fewer entries stay); `density >= 1` keeps `tau_i` whole. Optional L1 rescale
  (default false), then sum or sign election, normalisation (default false), `lambda`,
  `+ base`. Sorting costs O(n log n) where TIES's O(n) selection would break ties otherwise.
* `sce` (select, calculate, erase): with `select_topk < 1`, only the coordinates with the
  `int(count_nonzero(var) * select_topk)` largest variances across the task vectors are kept
  (chosen by `torch.topk`, as mergekit chooses among equal variances); each input is weighted
  by its mean squared (selected) task vector over the sum of those (uniform if that sum is
  below 1e-6); entries disagreeing with the elected sign (sign of the plain sum) are erased;
  the result is `base + sum_i w_i m_i tau_i / max(sum_i w_i m_i, 1e-6)`.
* `nearswap` (two models: base a and b): `w = clamp(t / max(|a - b|, 1e-6), 0, 1)`,
  `w b + (1 - w) a`: coordinates closer than `t` take b's value, others move `t` towards it.
* `arcee_fusion` (base and one model): importance `|tau| * KL(softmax(x) || softmax(base))`
  (softmax and KL along the last dim, 1e-8 added to both distributions); coordinates with
  importance `>= median + 1.5 IQR` take `base + tau`, the rest keep the base. The quartiles
  are order statistics at `int(q (n - 1))` of the whole tensor. mergekit estimates them from
  1M entries drawn at random (unseeded) when a tensor has more; we always use the exact ones,
  so on such tensors the two differ by mergekit's sampling noise (equal on smaller ones). The
  result is float32 for float16 / bfloat16 inputs (mergekit's mask is float32), which
  `evofuse merge` casts straight to the output dtype as mergekit does.

Computation is in the dtype `evolve.materialize` gives: float32 (float64 for float64 inputs), or
the float16 / bfloat16 of an `evofuse merge` YAML's `dtype`, where every step rounds as mergekit's
does (the task-vector merges combine through `combine_task_vectors_low_precision`; DELLA masks
float16 in float32 as mergekit does), so the results are mergekit's bit for bit
(`tests/test_mergekit_lowdtype.py`).
"""
from __future__ import annotations

from typing import Callable, Sequence

import numpy as np
import torch

from evolve.merge_methods import (
    DENSITY,
    INT8_MASK,
    LAMBDA,
    LOW_PRECISION,
    WEIGHT,
    combine_task_vectors_low_precision,
    sign_consensus_combine,
)
from evolve.recipe import RecipeError
from evolve.registry import Operator, ParamSpec, TensorCall, as_bool, as_float, register_operator
from evolve.rng import DRAW_LEVELS, derive_seed, uniform16_chunks

__all__ = [
    "l1_rescaled",
    "della_prune",
    "breadcrumbs_prune",
    "sparse_task_merge",
    "sce",
    "nearswap",
    "arcee_fusion",
]

RESCALE_EPS = 1e-7  # mergekit's: an L1 norm below it means "do not rescale"
SCE_EPS = 1e-6  # mergekit's: weight sums and divisors below it
NEARSWAP_EPS = 1e-6  # mergekit's floor on |a - b|
FUSION_EPS = 1e-8  # added to both softmax distributions before the KL divergence
FUSION_QUANTILES = (0.25, 0.5, 0.75)


# --- sparsification of one task vector ---------------------------------------------------


def l1_rescaled(delta: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """`delta * keep` scaled to delta's L1 norm; unscaled when either norm is below 1e-7."""
    masked = delta * keep
    before, after = delta.abs().sum(), masked.abs().sum()  # 0-d, in the compute dtype
    if before < RESCALE_EPS or after < RESCALE_EPS:
        return masked
    return masked.mul_(before / after)


def _order_statistics(flat: torch.Tensor, ranks: Sequence[int]) -> list[float]:
    """The values at 0-based ascending `ranks` of a 1-D tensor (introselect on the CPU)."""
    if flat.device.type == "cpu":  # numpy has no bfloat16: float32 holds float16 / bfloat16 values exactly
        values = flat.float() if flat.dtype in LOW_PRECISION else flat
        part = np.partition(values.numpy(), list(ranks))  # a sorted copy at those positions
        return [float(part[r]) for r in ranks]
    return [float(flat.kthvalue(r + 1).values) for r in ranks]


def breadcrumbs_prune(delta: torch.Tensor, density: float, gamma: float, rescale: bool) -> torch.Tensor:
    """Drop the `int(gamma n)` largest and the smallest magnitudes, keeping `int(density n)`."""
    if density >= 1:
        return delta
    count = delta.numel()
    kept = int(density * count)
    outliers = int(gamma * count)
    smallest = max(0, count - kept - outliers)  # fewer outliers go when density + gamma > 1
    # mergekit's ranking: torch's (unstable) ascending sort, of float32 magnitudes on the CPU
    # as mergekit sorts them, so that equal magnitudes at the window's edges are chosen as
    # mergekit chooses them (O(n log n); an O(n) selection would pick among ties differently)
    magnitude = delta.abs().reshape(-1)  # (n,)
    ascending = torch.sort(magnitude.float() if magnitude.device.type == "cpu" else magnitude).indices
    keep = torch.zeros(count, dtype=torch.bool, device=delta.device)
    keep[ascending[smallest:smallest + kept]] = True
    keep = keep.view(delta.shape)
    return l1_rescaled(delta, keep) if rescale else delta * keep


def della_prune(delta: torch.Tensor, density: float, epsilon: float, seed: int, rescale: bool,
                where: str = "") -> torch.Tensor:
    """MAGPRUNE: keep entry of row rank r (of n) with p = density - eps + 2 eps r / (n - 1)."""
    if density >= 1:
        return delta
    if density <= 0:
        return torch.zeros_like(delta)
    if not (density - epsilon > 0 and density + epsilon < 1):
        raise RecipeError(f"{where}epsilon {epsilon} with density {density}: density +- epsilon must lie "
                          f"in (0, 1) (as mergekit requires)")
    rows = delta if delta.dim() >= 2 else delta.reshape(1, -1)  # ranked along dim 1
    n = rows.shape[1]
    order = rows.abs().argsort(dim=1, stable=True)  # ascending magnitude, ties by index
    position = torch.arange(n, device=rows.device).view([1, n] + [1] * (rows.dim() - 2))
    ranks = torch.empty_like(order).scatter_(1, order, position.expand_as(order)).reshape(-1)  # (numel,)
    slope = 2 * epsilon / (n - 1) if n > 1 else 0.0
    offset = density - epsilon if n > 1 else density
    keep = torch.empty(ranks.shape, dtype=torch.bool, device=rows.device)
    start = 0
    for draws in uniform16_chunks(seed, ranks.numel()):  # (c,) uint16, row-major order
        stop = start + draws.shape[0]
        probability = offset + slope * ranks[start:stop].to(torch.float64)  # (c,)
        threshold = torch.round(probability * DRAW_LEVELS)  # P(draw < threshold) = p (to 2^-16)
        keep[start:stop] = torch.from_numpy(draws.astype(np.int32)).to(rows.device) < threshold
        start = stop
    keep = keep.view(rows.shape)
    # mergekit masks and rescales float16 in float32 on the CPU (its bernoulli has no float16
    # kernel there), then rounds: the same here, which also keeps the L1 sums from overflowing
    work = torch.float32 if rows.dtype == torch.float16 and rows.device.type == "cpu" else rows.dtype
    pruned = l1_rescaled(rows.to(work), keep) if rescale else rows.to(work) * keep
    return pruned.to(rows.dtype).reshape(delta.shape)


# --- the merges -----------------------------------------------------------------------------


def sparse_task_merge(base: torch.Tensor, tensors: Sequence[torch.Tensor], weights: Sequence[float],
                      prune: Callable[[int, torch.Tensor], torch.Tensor], *, consensus: bool,
                      normalize: bool, scale: float) -> torch.Tensor:
    """mergekit's generalised task arithmetic around a whole-tensor sparsifier.

    `d_i = w_i prune(i, x_i - base)`; then the TIES sign election (divisor: the weights of the
    agreeing entries, 0 -> 1) or the plain sum (divisor: the weights' sum, |.| < 1e-8 -> 1);
    divided when `normalize`; times `scale` (lambda); plus base.
    """
    if not tensors:
        return base.clone()
    if base.dtype in LOW_PRECISION:  # mergekit's rounding: whole (N, shape) sums in the dtype
        deltas = torch.stack([prune(i, x - base) for i, x in enumerate(tensors)])  # (N, shape)
        return combine_task_vectors_low_precision(base, deltas, weights, consensus=consensus,
                                                  normalize=normalize, scale=scale)
    coefficients = [float(w) for w in torch.tensor(weights, dtype=base.dtype)]  # as mergekit: compute dtype
    deltas = [prune(i, x - base).mul_(c) for i, (x, c) in enumerate(zip(tensors, coefficients))]
    if consensus:
        mixed = sign_consensus_combine(deltas, coefficients, normalize)
    else:
        mixed = deltas[0].clone()
        for delta in deltas[1:]:
            mixed.add_(delta)
        if normalize:
            total = float(torch.tensor(coefficients, dtype=base.dtype).sum())
            mixed.div_(total if abs(total) >= 1e-8 else 1.0)
    if scale != 1:
        mixed.mul_(scale)
    return mixed.add_(base)


def _top_variance_mask(task_vectors: torch.Tensor, fraction: float) -> torch.Tensor:
    """(shape) 1 where the variance across inputs is among the k largest, else 0."""
    variance = torch.var(task_vectors, dim=0, unbiased=False)  # (shape) population variance
    # k in float32 as mergekit computes it (a 0-d integer tensor times a Python float)
    k = int(torch.count_nonzero(variance) * fraction) if fraction > 0 else 0
    mask = torch.zeros_like(variance)
    if k > 0:  # torch.topk as mergekit: equal variances at the cut are chosen as it chooses them
        mask.view(-1)[torch.topk(variance.abs().reshape(-1), k).indices] = 1
    return mask


def sce(base: torch.Tensor, tensors: Sequence[torch.Tensor], select_topk: float = 1.0) -> torch.Tensor:
    """Select (top variance), Calculate (mean-square weights), Erase (sign disagreements)."""
    if not tensors:
        return base.clone()
    task_vectors = torch.stack([x - base for x in tensors])  # (N, shape)
    if select_topk < 1:
        task_vectors.mul_(_top_variance_mask(task_vectors, select_topk))
    elected = torch.where(task_vectors.sum(dim=0) >= 0, 1.0, -1.0).to(base.dtype)  # (shape)
    agrees = (task_vectors.sign() == elected).to(base.dtype)  # (N, shape); zeros agree with nothing
    energy = task_vectors.square().reshape(len(tensors), -1).mean(dim=1)  # (N,) mean tau_i^2
    total = float(energy.sum())
    weights = energy / total if abs(total) >= SCE_EPS else torch.full_like(energy, 1 / len(tensors))
    erased = weights.view([-1] + [1] * base.dim()) * agrees  # (N, shape) w_i m_i
    merged = (task_vectors * erased).sum(dim=0)
    return base + merged / erased.sum(dim=0).clamp(min=SCE_EPS)


def nearswap(a: torch.Tensor, b: torch.Tensor, t: float) -> torch.Tensor:
    """Take b where |a - b| <= t, else move a by t towards b: `w b + (1 - w) a`."""
    weight = (t / (a - b).abs().clamp(min=NEARSWAP_EPS)).clamp(0, 1)  # (shape)
    return weight * b + (1 - weight) * a


def arcee_fusion(base: torch.Tensor, tensor: torch.Tensor) -> torch.Tensor:
    """Keep the task-vector entries whose KL-weighted magnitude is an upper outlier."""
    delta = tensor - base
    p = torch.softmax(tensor, dim=-1) + FUSION_EPS  # (shape) along the last dim
    q = torch.softmax(base, dim=-1) + FUSION_EPS
    divergence = (p * torch.log(p / q)).sum(dim=-1, keepdim=True)  # (..., 1) KL(p || q) per row
    importance = delta.abs() * divergence  # (shape)
    flat = importance.reshape(-1)
    last = flat.numel() - 1
    q1, median, q3 = (torch.tensor(v, dtype=base.dtype) for v in
                      _order_statistics(flat, [int(q * last) for q in FUSION_QUANTILES]))
    threshold = median + 1.5 * (q3 - q1)  # 0-d, in the compute dtype
    # the mask is float32 as mergekit's: for float16 / bfloat16 inputs the kept sum `base + tau`
    # is then formed (and returned) in float32, unrounded, as mergekit returns it
    return base + delta * (importance >= threshold).float()


# --- registration -------------------------------------------------------------------------

EPSILON = ParamSpec("epsilon", as_float, 0.15, per_input=True,
                    doc="keep probabilities span density +- epsilon from the smallest to the largest |tau|")
GAMMA = ParamSpec("gamma", as_float, 0.01, per_input=True, doc="fraction of the largest |tau| removed")
TASK_VECTORS = "the fine-tuned models; base = their common base"


def _sparse_adapter(kind: str, consensus: bool, name: str):
    def apply(call: TensorCall) -> torch.Tensor:
        rescale = call.shared["rescale"]

        def prune(i: int, delta: torch.Tensor) -> torch.Tensor:
            settings = call.per_input[i]
            if kind == "breadcrumbs":
                return breadcrumbs_prune(delta, settings["density"], settings["gamma"], rescale)
            where = f"op {name!r}, input {call.input_ids[i]!r}, tensor {call.name!r}: "
            return della_prune(delta, settings["density"], settings["epsilon"],
                               derive_seed(call.seed, call.input_ids[i]), rescale, where)

        return sparse_task_merge(call.base, call.inputs, [p["weight"] for p in call.per_input], prune,
                                 consensus=consensus, normalize=call.shared["normalize"],
                                 scale=call.shared["lambda"])

    return apply


for _name, _consensus, _normalize in (("della", True, True), ("della_linear", False, False)):
    register_operator(Operator(
        _name, _sparse_adapter("della", _consensus, _name),
        (WEIGHT, DENSITY, EPSILON, LAMBDA, ParamSpec("normalize", as_bool, _normalize),
         ParamSpec("rescale", as_bool, True, doc="restore each pruned task vector's L1 norm"), INT8_MASK),
        base="required", merge_method=True, inputs_doc=TASK_VECTORS,
    ))
for _name, _consensus in (("breadcrumbs", False), ("breadcrumbs_ties", True)):
    register_operator(Operator(
        _name, _sparse_adapter("breadcrumbs", _consensus, _name),
        (WEIGHT, DENSITY, GAMMA, LAMBDA, ParamSpec("normalize", as_bool, False),
         ParamSpec("rescale", as_bool, False, doc="restore each pruned task vector's L1 norm"), INT8_MASK),
        base="required", merge_method=True, inputs_doc=TASK_VECTORS,
    ))
register_operator(Operator(
    "sce", lambda call: sce(call.base, call.inputs, call.shared["select_topk"]),
    (ParamSpec("select_topk", as_float, 1.0, doc="fraction of coordinates kept, by variance across inputs"),
     INT8_MASK),
    base="required", merge_method=True, inputs_doc=TASK_VECTORS,
))
register_operator(Operator(
    "nearswap", lambda call: nearswap(call.base, call.inputs[0], call.shared["t"]),
    (ParamSpec("t", as_float, doc="distance below which the model's value replaces the base's"),),
    base="required", min_inputs=1, max_inputs=1, merge_method=True,
    inputs_doc="(the model whose near values are swapped in; base = the other model)",
))
register_operator(Operator(
    "arcee_fusion", lambda call: arcee_fusion(call.base, call.inputs[0]),
    (),
    base="required", min_inputs=1, max_inputs=1, merge_method=True,
    inputs_doc="(the fine-tuned model; base = the model it is fused into)",
))


def passthrough(tensor: torch.Tensor, scale: float | None) -> torch.Tensor:
    """The one input unchanged (a copy), or times `scale`: mergekit's frankenmerge building block."""
    return tensor.clone() if scale is None else tensor * scale


register_operator(Operator(
    "passthrough", lambda call: passthrough(call.inputs[0], call.per_input[0]["scale"]),
    (ParamSpec("scale", as_float, None, per_input=True, doc="optional factor of the copied tensor"),),
    min_inputs=1, max_inputs=1, merge_method=True,
    inputs_doc="(the one model each slice copies; stack slices to change the depth)",
))
