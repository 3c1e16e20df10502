"""mergekit's geometric merges: Model Stock, NuSLERP, Multi-SLERP and the Karcher mean.

Small pure functions over the tensors of ONE name, registered by name like the classic merges
in `evolve.merge_methods`; inputs are never written to. Numerics follow mergekit 0.1.5
(`tests/test_mergekit_methods.py` checks them against it in fp32):

* `model_stock` (base w0 and N >= 2 models w_i): `cos` is the mean over pairs i < j of the
  cosine between the offsets `w_i - w0` (each clamped to [-1, 1], norms' product floored at
  1e-6), over the whole flattened tensor, or per row (last dim) with `filter_wise`;
  `t = N cos / (1 + (N - 1) cos)` (0 where the denominator is below 1e-6 in magnitude, i.e.
  keep the base), result `t mean(w_i) + (1 - t) w0`.
* `nuslerp` (two models, weights w_a, w_b; `t = w_b / (w_a + w_b)`, 0.5 when the sum is below
  1e-6): spherical interpolation of the task vectors `x - base` (or of the models themselves
  without a base) as whole flattened vectors (`nuslerp_flatten`, default), or per row of the
  last dim, or with `nuslerp_row_wise` per vector along dim 0. Unit vectors divide by the norm
  floored at 1e-7; where `1 - cos^2 <= 1e-16` it is the lerp `(1 - t) v0 + t v1`; otherwise
  `(sin((1 - t) theta) v0 + sin(t theta) v1) / sin(theta)` of the unnormalised vectors.
* `multislerp` (any number of models with weights): barycentric interpolation on the
  hypersphere: the flattened task vectors (or models) are made unit (`/ (norm + eps)`), their
  weighted mean normalised to a point m on the sphere, the weighted mean of their projections
  onto m's tangent space mapped back with the exponential map, and the result scaled by the
  weighted mean of the norms. `normalize_weights` (default true) makes the weights sum to 1.
  A single model is returned as it is; a zero mean falls back to the weighted sum for two
  models and is an error for more (mergekit's rule).
* `karcher` (any number of models, equal weights): the Riemannian (Karcher) mean of the unit
  directions of the flattened models, by at most `max_iter` (10) fixed-point steps stopped
  when the tangent step's norm is below `tol` (1e-5); directions of norm `<= tol` take no
  part, and one closer than `tol` radians to the current mean adds no tangent; the result is
  scaled by the mean norm. Norms in fp32 (fp64 for fp64 inputs), the rest in the inputs' dtype,
  rounded as mergekit rounds.

Computation is in the dtype `evolve.materialize` gives (float32, float64 for float64 inputs, or
an `evofuse merge` YAML's float16 / bfloat16 `dtype`); each function runs mergekit's operations in
mergekit's order, so in float16 / bfloat16 it rounds where mergekit does and gives its numbers bit
for bit (`tests/test_mergekit_lowdtype.py`).

`nuslerp` and `multislerp` take an optional base in mergekit. The registry has no "optional"
base use yet, so both are declared with a required base (the task-vector form); the functions
here also take `base=None`, and only the declaration changes once the registry grows one.
"""
from __future__ import annotations

from typing import Any, Sequence

import torch

from evolve.merge_methods import WEIGHT
from evolve.recipe import RecipeError
from evolve.registry import Operator, ParamSpec, TensorCall, as_bool, as_float, register_operator

__all__ = ["as_int", "model_stock", "nuslerp", "nuslerp_weight_t", "multislerp", "karcher"]

STOCK_EPS = 1e-6  # floor of the norms' product; below it the denominator counts as singular
NUSLERP_NORM_EPS = 1e-7
NUSLERP_COLINEAR_EPS = 1e-8  # colinear when 1 - cos^2 <= eps^2


def as_int(value: Any) -> int:
    """An integer, also written as an integral float or a numeric string; not a boolean."""
    if isinstance(value, bool):
        raise ValueError(f"expected an integer, got {value!r}")
    if isinstance(value, int):
        return value
    if isinstance(value, float) and value.is_integer():
        return int(value)
    if isinstance(value, str):
        return int(value.strip())
    raise ValueError(f"expected an integer, got {value!r}")


# --- Model Stock --------------------------------------------------------------------------


def model_stock(base: torch.Tensor, tensors: Sequence[torch.Tensor], filter_wise: bool = False) -> torch.Tensor:
    """`t mean(w_i) + (1 - t) w0`, t from the mean pairwise angle of the offsets w_i - w0."""
    if filter_wise:  # one ratio per row of the last dim; a 1-D tensor is one row
        w0 = base if base.dim() > 1 else base.unsqueeze(0)
        models = [w if w.dim() > 1 else w.unsqueeze(0) for w in tensors]
    else:  # one ratio for the whole tensor
        w0, models = base.reshape(-1), [w.reshape(-1) for w in tensors]
    offsets = [w - w0 for w in models]
    norms = [torch.linalg.vector_norm(o, dim=-1) for o in offsets]  # (rows,) or ()
    cosines = []
    for i in range(len(offsets)):
        for j in range(i + 1, len(offsets)):
            dot = (offsets[i] * offsets[j]).sum(dim=-1)
            cosines.append((dot / (norms[i] * norms[j]).clamp(min=STOCK_EPS)).clamp(-1, 1))
    cos = torch.stack(cosines).mean(dim=0).unsqueeze(-1)  # (rows, 1) or (1,)
    count = len(models)
    denominator = 1 + (count - 1) * cos
    singular = denominator.abs() < STOCK_EPS  # no finite estimate: keep the base there
    t = torch.where(singular, torch.zeros_like(cos),
                    count * cos / torch.where(singular, torch.ones_like(denominator), denominator))
    mean = models[0].clone()
    for w in models[1:]:
        mean.add_(w)
    mean.div_(count)
    return (t * mean + (1 - t) * w0).reshape(base.shape)


# --- NuSLERP ------------------------------------------------------------------------------


def nuslerp_weight_t(weights: Sequence[float]) -> float:
    """The interpolation point of two weights: w_b / (w_a + w_b), 0.5 for a zero sum."""
    total = weights[0] + weights[1]
    return 0.5 if abs(total) < 1e-6 else weights[1] / total


def _slerp_rows(v0: torch.Tensor, v1: torch.Tensor, t: float) -> torch.Tensor:
    """Slerp of each vector along the last dim (lerp where the two are colinear)."""
    unit0 = v0 / torch.linalg.vector_norm(v0, dim=-1, keepdim=True).clamp(min=NUSLERP_NORM_EPS)
    unit1 = v1 / torch.linalg.vector_norm(v1, dim=-1, keepdim=True).clamp(min=NUSLERP_NORM_EPS)
    cos = (unit0 * unit1).sum(dim=-1, keepdim=True).clamp(-1, 1)  # (..., 1)
    colinear = (1 - cos.square()) <= NUSLERP_COLINEAR_EPS**2
    theta = torch.acos(torch.where(colinear, torch.zeros_like(cos), cos))  # finite everywhere
    arc = (torch.sin((1 - t) * theta) * v0 + torch.sin(t * theta) * v1) / torch.sin(theta)
    return torch.where(colinear, (1 - t) * v0 + t * v1, arc)


def nuslerp(tensors: Sequence[torch.Tensor], weights: Sequence[float], base: torch.Tensor | None = None,
            row_wise: bool = False, flatten: bool = True) -> torch.Tensor:
    """Slerp of two models (or of their task vectors) at t = w_b / (w_a + w_b)."""
    t = nuslerp_weight_t(weights)
    v0, v1 = tensors if base is None else (tensors[0] - base, tensors[1] - base)
    if flatten:
        result = _slerp_rows(v0.reshape(-1), v1.reshape(-1), t).reshape(v0.shape)
    elif row_wise:  # vectors along dim 0
        result = _slerp_rows(v0.transpose(0, -1), v1.transpose(0, -1), t).transpose(0, -1)
    else:
        result = _slerp_rows(v0, v1, t)
    return result if base is None else base + result


# --- Multi-SLERP --------------------------------------------------------------------------


def multislerp(tensors: Sequence[torch.Tensor], weights: Sequence[float], base: torch.Tensor | None = None,
               normalize_weights: bool = True, eps: float = 1e-8) -> torch.Tensor:
    """Weighted mean on the hypersphere via the tangent space at the weighted unit mean.

    The inputs are stacked and every weighted sum over them is one reduction (`sum(dim=0)`),
    as mergekit computes it: in float16 / bfloat16 such a sum accumulates in float32 and
    rounds once, where adding the inputs one by one would round after each.
    """
    if len(tensors) == 1:
        return tensors[0].clone()
    shape = tensors[0].shape
    points = torch.stack(list(tensors))  # (N, shape)
    if base is not None:
        points -= base  # task vectors
    flat = points.view(len(tensors), -1)  # (N, n)
    w = torch.tensor(weights, dtype=points.dtype, device=points.device)  # (N,)
    if normalize_weights:
        w = w / w.sum()
    norms = torch.linalg.vector_norm(flat, dim=-1, keepdim=True)  # (N, 1)
    units = flat / (norms + eps)  # (N, n)
    mean = (units * w.view(-1, 1)).sum(dim=0)  # (n,) the weighted mean of the unit vectors
    mean_norm = torch.linalg.vector_norm(mean)
    if mean_norm < eps:
        if len(tensors) != 2:
            raise RecipeError("multislerp: the weighted mean of the inputs' directions is zero "
                              "(opposite inputs with balancing weights); change 'weight'")
        result = points[0] * w[0] + points[1] * w[1]
        return result if base is None else result + base
    mean = mean / mean_norm  # a point on the unit sphere
    tangents = units - (units * mean).sum(dim=-1, keepdim=True) * mean  # (N, n) projections onto m's tangent space
    tangent = (tangents * w.view(-1, 1)).sum(dim=0)  # (n,)
    step = torch.linalg.vector_norm(tangent) + eps
    result = mean * torch.cos(step) + tangent * (torch.sin(step) / step)  # exponential map at m
    result = result * (norms.squeeze(-1) * w).sum()  # back to the weighted mean norm
    return result.view(shape) if base is None else result.view(shape) + base


# --- Karcher mean -------------------------------------------------------------------------


def karcher(tensors: Sequence[torch.Tensor], max_iter: int = 10, tol: float = 1e-5) -> torch.Tensor:
    """Equal-weight Karcher mean of the directions, scaled by the mean norm.

    Rounding as mergekit's: norms (and the steps' lengths) in float32 (float64 for float64
    inputs), as 0-d tensors; every tensor-sized value in the inputs' dtype, each step rounded
    to it, tensors in their own shapes, as mergekit keeps them.
    """
    if len(tensors) == 1:
        return tensors[0].clone()
    dtype = tensors[0].dtype
    norm_dtype = torch.float64 if dtype == torch.float64 else torch.float32

    def norm(x: torch.Tensor) -> torch.Tensor:  # 0-d, in norm_dtype
        return torch.linalg.vector_norm(x.to(norm_dtype))

    def unit(x: torch.Tensor, length: torch.Tensor) -> torch.Tensor:  # x / |x|, rounded to the dtype
        return (x / length).to(dtype)

    alpha = 1.0 / len(tensors)
    norms = [norm(x) for x in tensors]  # 0-d each
    active = [unit(x, n) for x, n in zip(tensors, norms) if n.item() > tol]
    if not active:
        return torch.zeros_like(tensors[0])
    share = alpha / sum([alpha] * len(active))  # the equal weights renormalised over the active ones
    mean = torch.zeros_like(active[0])
    for direction in active:
        mean += share * direction
    mean_norm = norm(mean)
    mean = active[0].clone() if mean_norm.item() < tol else unit(mean, mean_norm)
    for _ in range(max_iter):
        tangent = torch.zeros_like(mean)  # the Riemannian gradient: sum of weighted log maps
        for direction in active:
            cos = torch.dot(mean.reshape(-1), direction.reshape(-1)).clamp(-1.0, 1.0)  # 0-d, in the dtype
            theta = torch.arccos(cos)
            if theta.item() < tol:
                continue
            tangent += share * (theta / torch.sin(theta)) * (direction - cos * mean)
        step = norm(tangent)
        if step.item() < tol:
            break
        mean = (torch.cos(step) * mean + torch.sin(step) * (tangent / step)).to(dtype)  # exponential map
        length = norm(mean)
        if length.item() > tol:
            mean = unit(mean, length)
    scale = sum(alpha * n for n in norms)  # the mean norm (0-d), zero-norm inputs included
    return scale * mean


# --- registration -------------------------------------------------------------------------


def _weights(call: TensorCall) -> list[float]:
    return [p["weight"] for p in call.per_input]


register_operator(Operator(
    "model_stock", lambda call: model_stock(call.base, call.inputs, call.shared["filter_wise"]),
    (ParamSpec("filter_wise", as_bool, False, doc="one interpolation ratio per row instead of per tensor"),),
    base="required", min_inputs=2, merge_method=True,
    inputs_doc="(at least two fine-tuned models; base = their common base)",
))
register_operator(Operator(
    "nuslerp",
    lambda call: nuslerp(call.inputs, _weights(call), call.base, call.shared["nuslerp_row_wise"],
                         call.shared["nuslerp_flatten"]),
    (WEIGHT,
     ParamSpec("nuslerp_row_wise", as_bool, False, doc="slerp vectors along dim 0 (when not flattened)"),
     ParamSpec("nuslerp_flatten", as_bool, True, doc="slerp whole tensors as one vector")),
    base="optional", min_inputs=2, max_inputs=2, merge_method=True,
    inputs_doc="(two models; base, when given, the origin of their task vectors)",
))
register_operator(Operator(
    "multislerp",
    lambda call: multislerp(call.inputs, _weights(call), call.base, call.shared["normalize_weights"],
                            call.shared["eps"]),
    (WEIGHT, ParamSpec("normalize_weights", as_bool, True, doc="scale the weights to sum to 1"),
     ParamSpec("eps", as_float, 1e-8, doc="added to norms before dividing")),
    base="optional", min_inputs=1, merge_method=True,
    inputs_doc="(the models; base, when given, the origin of their task vectors)",
))
register_operator(Operator(
    "karcher", lambda call: karcher(call.inputs, call.shared["max_iter"], call.shared["tol"]),
    (ParamSpec("max_iter", as_int, 10, doc="at most this many fixed-point steps"),
     ParamSpec("tol", as_float, 1e-5, doc="stop when the step is shorter; smaller norms and angles are ignored")),
    merge_method=True, inputs_doc="(the models to average; a base is one more of them)",
))
