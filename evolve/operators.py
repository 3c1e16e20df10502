"""Materialise a recipe: Evolver mutation + crossover and classic merges, tensor by tensor.

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

import fnmatch
import re
from typing import Any, Iterable, Mapping, MutableMapping, Sequence

import torch

from evolve import merge_methods  # noqa: F401  (registers the merge operators)
from evolve.recipe import Recipe, RecipeError, layer_fraction, resolve_setting
from evolve.registry import (
    Operator,
    ParamSpec,
    TensorCall,
    as_float,
    get_operator,
    register_operator,
    registered_operators,
)
from evolve.rng import CHUNK_DRAWS, derive_seed, keep_mask, select_mask_chunks

__all__ = [
    "validate_recipe",
    "materialize_tensor",
    "materialize",
    "evolver_step",
    "de_rand_1_step",
    "is_excluded",
    "registered_operators",
    "population_merge_recipe",
    "seed_recipes",
]

COMMON_PARAMS = ("num_layers", "per_input")  # recipe params that are not operator parameters


# --- Evolver steps ------------------------------------------------------------------------


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


def _apply_evolver(call: TensorCall) -> torch.Tensor:
    target, ref = call.inputs
    return evolver_step(target, ref, call.shared["F"], call.shared["CR"], call.seed, call.out)


def _apply_de_rand_1(call: TensorCall) -> torch.Tensor:
    target, r1, r2, r3 = call.inputs
    return de_rand_1_step(target, r1, r2, r3, call.shared["F"], call.shared["CR"], call.seed, call.out)


def _apply_copy(call: TensorCall) -> torch.Tensor:
    return call.inputs[0].clone() if call.out is None else call.out.copy_(call.inputs[0])


def _probability(value: Any) -> float:
    number = as_float(value)
    if not 0.0 <= number <= 1.0:
        raise ValueError(f"must be in [0, 1], got {number}")
    return number


register_operator(Operator(
    "evolver", _apply_evolver,
    (ParamSpec("F", as_float, 0.5, doc="step toward the reference"),
     ParamSpec("CR", _probability, 0.5, doc="crossover rate")),
    min_inputs=2, max_inputs=2, inputs_doc="(target, reference)",
))
register_operator(Operator(
    "de_rand_1", _apply_de_rand_1,
    (ParamSpec("F", as_float, 0.5), ParamSpec("CR", _probability, 0.5)),
    min_inputs=4, max_inputs=4, inputs_doc="(target, r1, r2, r3)",
))
register_operator(Operator("copy", _apply_copy, (), min_inputs=1, max_inputs=1, inputs_doc="(source,)"))


# --- validation and parameter resolution ------------------------------------------------


def _operands(recipe: Recipe, op: Operator) -> tuple[str, ...]:
    """The operator's inputs: for base-using ops the recipe inputs other than the base."""
    if op.base == "ignored" or recipe.base is None:
        return recipe.inputs
    return tuple(i for i in recipe.inputs if i != recipe.base)


def validate_recipe(recipe: Recipe) -> None:
    """Check op, input counts, base and parameter names/values before touching any weights."""
    op = get_operator(recipe.op)
    if op.base == "required" and recipe.base is None:
        raise RecipeError(f"op {op.name!r} needs recipe field 'base' (the common base model)")
    operands = _operands(recipe, op)
    if len(set(recipe.inputs)) != len(recipe.inputs):
        raise RecipeError(f"recipe field 'inputs' repeats an id: {list(recipe.inputs)}")
    low, high = op.min_inputs, op.max_inputs
    if op.name == "slerp":  # a base plus one other, or two endpoints
        low = high = 1 if recipe.base is not None else 2
    if len(operands) < low or (high is not None and len(operands) > high):
        expected = str(low) if low == high else f"{low}..{high if high is not None else 'n'}"
        raise RecipeError(
            f"op {op.name!r} takes {expected} inputs {op.inputs_doc}, got {len(operands)}"
        )
    known = {p.name for p in op.params}
    for key in recipe.params:
        if key not in known and key not in COMMON_PARAMS:
            raise RecipeError(
                f"unknown parameter {key!r} for op {op.name!r}; valid: {', '.join(sorted(known)) or 'none'}"
            )
    num_layers = recipe.params.get("num_layers")
    if num_layers is not None and (isinstance(num_layers, bool) or not isinstance(num_layers, int) or num_layers < 1):
        raise RecipeError("parameter 'num_layers' must be a positive integer")
    per_input = recipe.params.get("per_input") or {}
    if not isinstance(per_input, dict):
        raise RecipeError("parameter 'per_input' must map input ids to parameter settings")
    for input_id, settings in per_input.items():
        if input_id not in recipe.input_ids():
            raise RecipeError(f"per_input names {input_id!r}, which is not an input of the recipe")
        if not isinstance(settings, dict):
            raise RecipeError(f"per_input[{input_id!r}] must be a mapping of parameters")
        for key in settings:
            spec = op.param(key)
            if spec is None:
                raise RecipeError(
                    f"unknown parameter {key!r} for op {op.name!r} in per_input[{input_id!r}]; "
                    f"valid: {', '.join(sorted(known)) or 'none'}"
                )
            if not spec.per_input:
                raise RecipeError(
                    f"parameter {key!r} of op {op.name!r} is shared by all inputs: set it in params, "
                    f"not per_input[{input_id!r}]"
                )
    for where, settings in [("params", recipe.params)] + [(f"per_input[{i!r}]", v) for i, v in per_input.items()]:
        for key, value in settings.items():  # plain scalar values are checked now, others per tensor
            spec = op.param(key)
            if spec is not None and isinstance(value, (bool, int, float, str)):
                try:
                    spec.convert(value)
                except (TypeError, ValueError) as exc:
                    raise RecipeError(f"parameter {key!r} in {where} of op {op.name!r}: {exc}") from None
    for spec in op.params:  # a required parameter must be set somewhere for each operand
        if not spec.required:
            continue
        if spec.name in recipe.params:
            continue
        if spec.per_input and all(spec.name in per_input.get(i, {}) for i in operands):
            continue
        where = "params" if not spec.per_input else "params or per_input of every input"
        raise RecipeError(f"op {op.name!r} needs parameter {spec.name!r} (in {where})")


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


def resolve_parameters(recipe: Recipe, op: Operator, operands: Sequence[str], tensor_name: str
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
        for i in operands
    )
    return shared, inputs


# --- materialisation ---------------------------------------------------------------------


def _compute_dtype(tensors: Iterable[torch.Tensor]) -> torch.dtype:
    return torch.float64 if any(t.dtype == torch.float64 for t in tensors) else torch.float32


def materialize_tensor(recipe: Recipe, name: str, tensors: Mapping[str, torch.Tensor],
                       out: torch.Tensor | None = None) -> torch.Tensor:
    """The recipe's tensor `name` from the inputs' tensors of that name (id -> tensor).

    Computed in float32 (float64 if an input is) on `out`'s device when given, else on the
    first input's; written into `out` (any dtype/device, same shape) when given.
    """
    op = get_operator(recipe.op)
    operands = _operands(recipe, op)
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
    if not first.is_floating_point():  # integer buffers are not merged: copied from the first input
        return first.clone() if out is None else out.copy_(first)
    device = out.device if out is not None else first.device
    dtype = _compute_dtype(tensors[i] for i in recipe.input_ids())
    shared, per_input = resolve_parameters(recipe, op, operands, name)
    direct = out is not None and out.dtype == dtype and out.is_contiguous()
    call = TensorCall(
        name=name,
        inputs=tuple(tensors[i].to(device=device, dtype=dtype) for i in operands),
        input_ids=operands,
        base=None if recipe.base is None or op.base == "ignored"
        else tensors[recipe.base].to(device=device, dtype=dtype),
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


# --- merges as population members -------------------------------------------------------


def population_merge_recipe(member_ids: Sequence[str], method: str = "linear", *, base: str | None = None,
                            params: Mapping[str, Any] | None = None, seed: int = 0) -> Recipe:
    """The paper's "merge the population and score the merge" candidate.

    Default: the simple average of the members (`linear`, equal weights, normalised). Another
    registered merge may be named, with its parameters (`weight` defaults to 1 / members).
    """
    chosen = {"weight": 1.0 / len(member_ids), **(params or {})}
    recipe = Recipe(method, tuple(member_ids), chosen, seed=seed, base=base)
    validate_recipe(recipe)
    return recipe


def seed_recipes(parent_ids: Sequence[str], base: str, seed: int = 0) -> list[Recipe]:
    """Classic merges of the parents, to seed a population beside the parents themselves.

    Choices (mergekit's common settings, not tuned): average; task arithmetic of the mean task
    vector; TIES and DARE-TIES at density 0.5 with unit weights, normalised; SLERP halfway
    between the first two parents.
    """
    n = len(parent_ids)
    ids = tuple(parent_ids)
    recipes = [
        Recipe("linear", ids, {"weight": 1.0}, seed=seed),
        Recipe("task_arithmetic", ids, {"weight": 1.0 / n}, seed=seed, base=base),
        Recipe("ties", ids, {"weight": 1.0, "density": 0.5, "normalize": True}, seed=seed, base=base),
        Recipe("dare_ties", ids, {"weight": 1.0, "density": 0.5, "normalize": True}, seed=seed, base=base),
    ]
    if n >= 2:
        recipes.append(Recipe("slerp", ids[:2], {"t": 0.5}, seed=seed))
    for recipe in recipes:
        validate_recipe(recipe)
    return recipes
