"""The operator registry: every recipe `op` (Evolver steps and classic merges) by name.

An operator is a small pure function over the tensors of one name plus a declared parameter
spec; the spec lets recipes be checked before any weights are touched and lets parameters be
resolved per tensor (filters, gradients over depth, per-input values) the way mergekit does.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import torch

from evolve.recipe import RecipeError

REQUIRED = object()  # marks a parameter without a default


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
    inputs: tuple[torch.Tensor, ...]  # the operator's inputs in the compute dtype, recipe order
    input_ids: tuple[str, ...]
    base: torch.Tensor | None  # the base tensor (task-vector methods, SLERP's t = 0 end)
    shared: dict[str, Any]  # shared parameter values for this tensor
    per_input: tuple[dict[str, Any], ...]  # per-input parameter values, aligned with inputs
    seed: int  # derive_seed(recipe.seed, name): the root of this tensor's draws
    out: torch.Tensor | None = None  # a contiguous compute-dtype buffer the op may write into


@dataclass(frozen=True)
class Operator:
    name: str
    apply: Callable[[TensorCall], torch.Tensor]
    params: tuple[ParamSpec, ...]
    base: str = "ignored"  # "required" | "optional" | "ignored"
    min_inputs: int = 1  # counted without the base
    max_inputs: int | None = None
    inputs_doc: str = ""  # what the inputs are, in order

    def param(self, name: str) -> ParamSpec | None:
        return next((p for p in self.params if p.name == name), None)


_OPERATORS: dict[str, Operator] = {}


def register_operator(op: Operator) -> Operator:
    if op.name in _OPERATORS:
        raise ValueError(f"operator {op.name!r} is already registered")
    _OPERATORS[op.name] = op
    return op


def registered_operators() -> dict[str, Operator]:
    # Importing the modules that register is what fills the registry.
    import evolve.merge_methods  # noqa: F401
    import evolve.operators  # noqa: F401

    return dict(_OPERATORS)


def get_operator(name: str) -> Operator:
    operators = registered_operators()
    if name not in operators:
        raise RecipeError(f"unknown op {name!r}; valid: {', '.join(sorted(operators))}")
    return operators[name]
