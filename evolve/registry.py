"""The operator registry: every recipe `op` (Evolver steps and classic merges) by name.

An operator is a small pure function over the tensors of one name plus everything a recipe
must satisfy to use it, declared with it: its parameters (`ParamSpec`: converter, default,
per-input or shared), how many inputs it takes, and what it does with a base. `validate_recipe`
is the one check of a recipe against that declaration, run before any weights are touched;
parameters are then resolved per tensor (filters, gradients over depth, per-input values) the
way mergekit does (`evolve.materialize`).

The registry imports none of the modules that register operators: each of them imports this
one and calls `register_operator`; `registered_operators()` imports the modules named in
`OPERATOR_MODULES` once, by name, the first time the table is read. Adding an operator module
means adding its name there.

How a base is used (`Operator.base`):

* `"ignored"`: never read; every recipe input is an operator input (linear, the Evolver steps).
* `"required"`: the common base of task vectors, not counted among the inputs (TIES, DARE, ...).
* `"optional"`: like "required" when given, and the operator works without one (nuslerp and
  multislerp: the origin of the task vectors, else the models themselves are interpolated).
* `"endpoint"`: optional; when given it is the operator's FIRST input and counts as one
  (SLERP's t = 0 end: a base plus one other model, or two endpoints without a base).
"""
from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Any, Callable

import torch

from evolve.recipe import Recipe, RecipeError

__all__ = [
    "REQUIRED",
    "OPERATOR_MODULES",
    "COMMON_PARAMS",
    "as_float",
    "as_bool",
    "ParamSpec",
    "TensorCall",
    "Operator",
    "register_operator",
    "registered_operators",
    "get_operator",
    "merge_method_names",
    "operands",
    "validate_recipe",
]

REQUIRED = object()  # marks a parameter without a default
OPERATOR_MODULES = ("evolve.merge_methods", "evolve.steps",  # the modules that register operators
                    "evolve.merge_methods_extra", "evolve.merge_methods_geometric")
COMMON_PARAMS = ("num_layers", "per_input")  # recipe params that are not operator parameters
BASE_USES = ("ignored", "required", "optional", "endpoint")


def as_float(value: Any) -> float:
    """mergekit's lax float: ints, floats and numeric strings ("1e-3"); not booleans."""
    if isinstance(value, bool):
        raise ValueError(f"expected a number, got {value!r}")
    if isinstance(value, (int, float)):
        return float(value)
    if isinstance(value, str):
        return float(value)
    raise ValueError(f"expected a number, got {value!r}")


def as_bool(value: Any) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.lower() in ("true", "false"):
        return value.lower() == "true"
    if isinstance(value, int) and value in (0, 1):
        return bool(value)
    raise ValueError(f"expected true or false, got {value!r}")


@dataclass(frozen=True)
class ParamSpec:
    name: str
    convert: Callable[[Any], Any]  # as_float / as_bool: checks and normalises one value
    default: Any = REQUIRED
    per_input: bool = False  # may differ per input (mergekit's models[i].parameters)
    doc: str = ""

    @property
    def required(self) -> bool:
        return self.default is REQUIRED


@dataclass(frozen=True)
class TensorCall:
    """Everything one operator needs for one tensor name, parameters already resolved."""

    name: str  # the tensor name
    inputs: tuple[torch.Tensor, ...]  # the operator's inputs in the compute dtype (see `operands`)
    input_ids: tuple[str, ...]
    base: torch.Tensor | None  # the base of task vectors (`base="required"` only)
    shared: dict[str, Any]  # shared parameter values for this tensor
    per_input: tuple[dict[str, Any], ...]  # per-input parameter values, aligned with inputs
    seed: int  # derive_seed(recipe.seed, name): the root of this tensor's draws
    out: torch.Tensor | None = None  # a contiguous compute-dtype buffer the op may write into


@dataclass(frozen=True)
class Operator:
    name: str
    apply: Callable[[TensorCall], torch.Tensor]
    params: tuple[ParamSpec, ...]
    base: str = "ignored"  # how the recipe's base is used: "ignored" | "required" | "optional" | "endpoint"
    min_inputs: int = 1  # operator inputs (see `operands`): a "required" base is not one
    max_inputs: int | None = None
    inputs_doc: str = ""  # what the inputs are, in order
    merge_method: bool = False  # a classic merge: a mergekit `merge_method` of `evofuse merge`

    def __post_init__(self):
        if self.base not in BASE_USES:
            raise ValueError(f"operator {self.name!r}: base must be one of {BASE_USES}, got {self.base!r}")

    def param(self, name: str) -> ParamSpec | None:
        return next((p for p in self.params if p.name == name), None)


_OPERATORS: dict[str, Operator] = {}
_modules_loaded = False


def register_operator(op: Operator) -> Operator:
    if op.name in _OPERATORS:
        raise ValueError(f"operator {op.name!r} is already registered")
    _OPERATORS[op.name] = op
    return op


def registered_operators() -> dict[str, Operator]:
    """Every operator by name, in registration order (the modules that register are loaded once)."""
    global _modules_loaded
    if not _modules_loaded:
        for module in OPERATOR_MODULES:
            importlib.import_module(module)
        _modules_loaded = True
    return dict(_OPERATORS)


def get_operator(name: str) -> Operator:
    operators = registered_operators()
    if name not in operators:
        raise RecipeError(f"unknown op {name!r}; valid: {', '.join(sorted(operators))}")
    return operators[name]


def merge_method_names() -> tuple[str, ...]:
    """The registered classic merges, in registration order (linear first)."""
    return tuple(name for name, op in registered_operators().items() if op.merge_method)


# --- the one check of a recipe against its operator's declaration -------------------------


def operands(recipe: Recipe, op: Operator) -> tuple[str, ...]:
    """The ids of the operator's inputs, in order: the recipe inputs without a "required" or
    "optional" base; an "endpoint" base first, then the other inputs; every input for "ignored"."""
    if op.base == "ignored" or recipe.base is None:
        return recipe.inputs
    others = tuple(i for i in recipe.inputs if i != recipe.base)
    return (recipe.base,) + others if op.base == "endpoint" else others


def _check_inputs(recipe: Recipe, op: Operator) -> None:
    if op.base == "required" and recipe.base is None:
        raise RecipeError(f"op {op.name!r} needs recipe field 'base' (the common base model)")
    if len(set(recipe.inputs)) != len(recipe.inputs):
        raise RecipeError(f"recipe field 'inputs' repeats an id: {list(recipe.inputs)}")
    count, low, high = len(operands(recipe, op)), op.min_inputs, op.max_inputs
    if count < low or (high is not None and count > high):
        expected = str(low) if low == high else f"{low}..{high if high is not None else 'n'}"
        raise RecipeError(f"op {op.name!r} takes {expected} inputs {op.inputs_doc}, got {count}")


def _check_param_names(recipe: Recipe, op: Operator, per_input: dict) -> None:
    known = {p.name for p in op.params}
    valid = ", ".join(sorted(known)) or "none"
    for key in recipe.params:
        if key not in known and key not in COMMON_PARAMS:
            raise RecipeError(f"unknown parameter {key!r} for op {op.name!r}; valid: {valid}")
    num_layers = recipe.params.get("num_layers")
    if num_layers is not None and (isinstance(num_layers, bool) or not isinstance(num_layers, int) or num_layers < 1):
        raise RecipeError("parameter 'num_layers' must be a positive integer")
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
                    f"unknown parameter {key!r} for op {op.name!r} in per_input[{input_id!r}]; valid: {valid}")
            if not spec.per_input:
                raise RecipeError(
                    f"parameter {key!r} of op {op.name!r} is shared by all inputs: set it in params, "
                    f"not per_input[{input_id!r}]")


def _check_param_values(recipe: Recipe, op: Operator, per_input: dict) -> None:
    scopes = [("params", recipe.params)] + [(f"per_input[{i!r}]", v) for i, v in per_input.items()]
    for where, settings in scopes:
        for key, value in settings.items():  # plain scalar values are checked now, others per tensor
            spec = op.param(key)
            if spec is not None and isinstance(value, (bool, int, float, str)):
                try:
                    spec.convert(value)
                except (TypeError, ValueError) as exc:
                    raise RecipeError(f"parameter {key!r} in {where} of op {op.name!r}: {exc}") from None
    inputs = operands(recipe, op)
    for spec in op.params:  # a required parameter must be set somewhere for each operand
        if not spec.required or spec.name in recipe.params:
            continue
        if spec.per_input and all(spec.name in per_input.get(i, {}) for i in inputs):
            continue
        where = "params" if not spec.per_input else "params or per_input of every input"
        raise RecipeError(f"op {op.name!r} needs parameter {spec.name!r} (in {where})")


def validate_recipe(recipe: Recipe) -> None:
    """Check op, inputs, base and parameter names/values before touching any weights."""
    op = get_operator(recipe.op)
    _check_inputs(recipe, op)
    per_input = recipe.params.get("per_input") or {}
    _check_param_names(recipe, op, per_input)
    _check_param_values(recipe, op, per_input)
