"""Materialise a recipe: its operator applied to the input weight sets, tensor by tensor.

`materialize_tensor` makes one tensor from the inputs' tensors of that name; `materialize`
walks a list of names, one tensor at a time, either into a new `{name: tensor}` dict or in
place into caller-owned tensors (`out=`: e.g. a working model's parameters, so an actor never
reallocates a model). The recipe is checked first (`evolve.registry.validate_recipe`), then
each tensor's parameters are resolved from the recipe's settings (per_input > params; filters
and gradients over depth as in mergekit, `evolve.recipe.resolve_setting`).

Arithmetic runs in float32 (float64 if an input is) on `out`'s device when given, else on the
first input's, and the result is cast back to the first input's dtype. Integer buffers are
not merged: they are copied from the first input. Inputs are never written to.
"""
from __future__ import annotations

import fnmatch
import re
from typing import Any, Iterable, Mapping, MutableMapping, Sequence

import torch

from evolve.recipe import Recipe, RecipeError, layer_fraction, resolve_setting
from evolve.registry import Operator, ParamSpec, TensorCall, get_operator, operands, validate_recipe
from evolve.rng import derive_seed

__all__ = ["materialize", "materialize_tensor", "resolve_parameters", "is_excluded"]


def _resolve(spec: ParamSpec, scopes: Sequence[Mapping[str, Any]], tensor_name: str,
             num_layers: int | None, who: str) -> Any:
    def convert(value: Any) -> Any:
        try:
            return spec.convert(value)
        except (TypeError, ValueError) as exc:
            raise RecipeError(f"parameter {spec.name!r}{who}: {exc}") from None

    for scope in scopes:
        if spec.name in scope:
            value = resolve_setting(scope[spec.name], tensor_name,
                                    lambda: layer_fraction(tensor_name, num_layers), convert)
            if value is not None:
                return value
    if spec.required:
        raise RecipeError(f"parameter {spec.name!r}{who} has no value for tensor {tensor_name!r}")
    return spec.default


def resolve_parameters(recipe: Recipe, op: Operator, input_ids: Sequence[str], tensor_name: str
                       ) -> tuple[dict[str, Any], tuple[dict[str, Any], ...]]:
    """Shared and per-input parameter values for one tensor (precedence: per_input > params)."""
    num_layers = recipe.params.get("num_layers")
    per_input = recipe.params.get("per_input") or {}
    shared = {p.name: _resolve(p, [recipe.params], tensor_name, num_layers, "")
              for p in op.params if not p.per_input}
    inputs = tuple(
        {p.name: _resolve(p, [per_input.get(i, {}), recipe.params], tensor_name, num_layers,
                          f" of input {i!r}")
         for p in op.params if p.per_input}
        for i in input_ids
    )
    return shared, inputs


def _compute_dtype(tensors: Iterable[torch.Tensor]) -> torch.dtype:
    return torch.float64 if any(t.dtype == torch.float64 for t in tensors) else torch.float32


def _check_shapes(recipe: Recipe, name: str, tensors: Mapping[str, torch.Tensor]) -> torch.Tensor:
    """The first input's tensor, once every input has one of the same shape."""
    missing = [i for i in recipe.input_ids() if i not in tensors]
    if missing:
        raise RecipeError(f"no tensor {name!r} given for input {missing[0]!r}")
    first = tensors[recipe.inputs[0]]
    for input_id in recipe.input_ids():
        if tensors[input_id].shape != first.shape:
            raise RecipeError(
                f"tensor {name!r} has shape {tuple(tensors[input_id].shape)} in {input_id!r} "
                f"but {tuple(first.shape)} in {recipe.inputs[0]!r}"
            )
    return first


def materialize_tensor(recipe: Recipe, name: str, tensors: Mapping[str, torch.Tensor],
                       out: torch.Tensor | None = None, compute_dtype: torch.dtype | None = None) -> torch.Tensor:
    """The recipe's tensor `name` from the inputs' tensors of that name (id -> tensor).

    Computed in float32 (float64 if an input is), or in `compute_dtype` when given (`evofuse
    merge` passes mergekit's for a low-precision `dtype`), on `out`'s device when given, else
    on the first input's; written into `out` (any dtype/device, same shape) when given.
    """
    op = get_operator(recipe.op)
    input_ids = operands(recipe, op)
    first = _check_shapes(recipe, name, tensors)
    if not first.is_floating_point():  # integer buffers are not merged: copied from the first input
        return first.clone() if out is None else out.copy_(first)
    device = out.device if out is not None else first.device
    dtype = compute_dtype or _compute_dtype(tensors[i] for i in recipe.input_ids())
    shared, per_input = resolve_parameters(recipe, op, input_ids, name)
    direct = out is not None and out.dtype == dtype and out.is_contiguous()
    call = TensorCall(
        name=name,
        inputs=tuple(tensors[i].to(device=device, dtype=dtype) for i in input_ids),
        input_ids=input_ids,
        base=tensors[recipe.base].to(device=device, dtype=dtype) if op.base in ("required", "optional") and recipe.base is not None else None,
        shared=shared,
        per_input=per_input,
        seed=derive_seed(recipe.seed, name),
        out=out if direct else None,
    )
    result = op.apply(call)
    if out is None:
        return result.to(first.dtype)
    if result is not out:
        out.copy_(result)
    return out


def is_excluded(name: str, patterns: Sequence[str]) -> bool:
    """fnmatch glob patterns (case-sensitive, `*` crosses dots); a `re:` prefix means a regex
    searched anywhere in the name, e.g. `re:layers\\.(0|1)\\.` or `*lm_head*`."""
    for pattern in patterns:
        if pattern.startswith("re:"):
            if re.search(pattern[3:], name):
                return True
        elif fnmatch.fnmatchcase(name, pattern):
            return True
    return False


def materialize(recipe: Recipe, weights: Mapping[str, Mapping[str, torch.Tensor]], names: Iterable[str],
                exclude: Sequence[str] = (),
                out: MutableMapping[str, torch.Tensor] | None = None) -> MutableMapping[str, torch.Tensor]:
    """Materialise every tensor in `names`, one at a time; excluded names copy the first input.

    `weights` maps weight-set id -> {tensor name -> tensor}. With `out` given, tensors present
    in it are overwritten in place (e.g. a model's parameters); missing ones are added.
    """
    validate_recipe(recipe)
    for input_id in recipe.input_ids():
        if input_id not in weights:
            raise RecipeError(f"no weights given for input {input_id!r}")
    result: MutableMapping[str, torch.Tensor] = {} if out is None else out
    for name in names:
        target = result.get(name)
        if is_excluded(name, exclude):
            source = weights[recipe.inputs[0]][name]
            result[name] = source.clone() if target is None else target.copy_(source)
            continue
        tensors = {i: weights[i][name] for i in recipe.input_ids()}
        result[name] = materialize_tensor(recipe, name, tensors, out=target)
    return result
