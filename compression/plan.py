"""Plans: ordered lists of compression steps, validated up front and applied in order.

A plan is plain data (a YAML/JSON list of mappings, each with `op` and its parameters), the
same schema in `evofuse compress --plan` and in a search candidate. Each op registers a
pydantic model of its parameters and a function that applies it:

    @register_op("remove_blocks", RemoveBlocksStep, reshape=removed_shape)
    def remove_blocks(model, step, calibration): ...  -> the changed model

A step model may define `check(self, config)` to reject parameters that do not fit the model
(e.g. removing as many blocks as it has); it raises `PlanError` with a one-line message.

An op may also give `reshape(skeleton, step)`: the same change of shapes on a meta-device
skeleton of the model (no weights, no data; None when the shapes depend on the data). With it,
`predict_num_params` tells a plan's parameter count before any work, which is how a search
skips plans that cannot meet its size budget.

An op changes a model by replacing tensors (a pruned projection is a new layer, a removed block
leaves the list, TT cores and fusion coefficients are new), never by writing into a tensor it
did not make; an op that trains existing weights gives them their own storage first
(`arch.own_parameters`). That is what lets a search apply plans to `copy_sharing_weights` of
its working model instead of a deep copy.
"""
from __future__ import annotations

import copy
import importlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import torch.nn as nn
import yaml
from pydantic import BaseModel, ValidationError
from compression.errors import CompressionError, first_validation_error

PYDANTIC_EXTRA = "Extra inputs are not permitted"  # how a plan step words an unknown key

# Modules that register ops when imported; each is optional while it is being built.
OP_MODULES = ("compression.depth", "compression.width", "compression.ttm")


class PlanError(CompressionError):
    """A plan that cannot be applied; the message is one line naming the step and field."""


@dataclass(frozen=True)
class Op:
    name: str
    params: type[BaseModel]
    apply: Callable[..., nn.Module]
    reshape: Callable[[nn.Module, BaseModel], nn.Module | None] | None = None


_OPS: dict[str, Op] = {}
_ops_loaded = False


def register_op(name: str, params: type[BaseModel], reshape: Callable | None = None) -> Callable:
    def decorate(fn: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
        _OPS[name] = Op(name, params, fn, reshape)
        return fn

    return decorate


def registered_ops() -> dict[str, Op]:
    global _ops_loaded
    if not _ops_loaded:
        for module in OP_MODULES:
            try:
                importlib.import_module(module)
            except ModuleNotFoundError as exc:
                if exc.name != module:
                    raise
        _ops_loaded = True
    return _OPS


def parse_step(raw: Any, where: str = "step") -> BaseModel:
    """Validate one step mapping into its op's parameter model."""
    if isinstance(raw, BaseModel):
        return raw
    if not isinstance(raw, dict) or "op" not in raw:
        raise PlanError(f"{where}: expected a mapping with an 'op' key, got {raw!r}")
    ops = registered_ops()
    if raw["op"] not in ops:
        raise PlanError(f"{where}.op: unknown op {raw['op']!r} (valid: {', '.join(sorted(ops))})")
    try:
        return ops[raw["op"]].params.model_validate(raw)
    except ValidationError as exc:
        raise PlanError(first_validation_error(exc, where, unknown_key=PYDANTIC_EXTRA)) from None


def parse_plan(raw: Any, where: str = "plan") -> list[BaseModel]:
    if raw is None:
        return []
    if not isinstance(raw, list):
        raise PlanError(f"{where}: expected a list of steps, got {type(raw).__name__}")
    return [parse_step(step, f"{where}[{i}]") for i, step in enumerate(raw)]


def load_plan_file(path: str | Path) -> list[BaseModel]:
    path = Path(path)
    if not path.is_file():
        raise PlanError(f"{path}: no such plan file")
    try:
        raw = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        raise PlanError(f"{path}: not valid YAML ({str(exc).splitlines()[0]})") from None
    if isinstance(raw, dict) and "plan" in raw:
        raw = raw["plan"]
    return parse_plan(raw, where=str(path))


def check_plan(plan: Sequence[BaseModel], config) -> None:
    """Reject steps that cannot fit the model described by `config` before any work is done."""
    for i, step in enumerate(plan):
        check = getattr(step, "check", None)
        if check is not None:
            try:
                check(config)
            except PlanError as exc:
                raise PlanError(f"plan[{i}].{exc}") from None


def plan_to_data(plan: Sequence[BaseModel]) -> list[dict]:
    """The plan as plain JSON-able data (the inverse of `parse_plan`)."""
    return [step.model_dump(mode="json") for step in plan]


def apply_plan(model: nn.Module, plan: Sequence[BaseModel], calibration, log: Callable[[str], None] | None = None) -> nn.Module:
    """Apply each step in order and return the changed model (possibly a new object)."""
    ops = registered_ops()
    for i, step in enumerate(plan):
        if log:
            log(f"plan[{i}]: {step.model_dump(mode='json')}")
        model = ops[step.op].apply(model, step, calibration)
    return model


def copy_sharing_weights(model: nn.Module) -> nn.Module:
    """A copy of `model` to apply a plan to, whose tensors are the original's memory.

    The copy has its own modules, config and parameter objects, but each parameter is a detached
    alias of the original's storage and each buffer is the original's own. Since ops replace
    what they change (see the module's docstring), the copy costs only what its plan makes new,
    and the original keeps its weights: a deep copy would first hold a second whole model (for a
    7B search, 28 GiB more per actor in float32). Tied parameters stay tied (one alias each).
    An alias made by `detach` shares the original's version counter, so `weight_versions`
    before and after tells whether an op wrote into the original after all."""
    memo: dict = {id(p): nn.Parameter(p.detach(), requires_grad=p.requires_grad) for p in model.parameters()}
    memo.update({id(b): b for b in model.buffers()})
    return copy.deepcopy(model, memo)  # a deep copy that takes the tensors from `memo`


def weight_versions(model: nn.Module) -> dict[str, int]:
    """Each parameter's in-place write count (torch's version counter, bumped by every in-place
    op on the tensor or an alias of it such as `copy_sharing_weights` makes: an optimizer step,
    `copy_`, `add_`; writes through `.data` are not counted)."""
    return {name: p._version for name, p in model.named_parameters()}


def skeleton(config) -> nn.Module:
    """The model `config` describes with every tensor on the meta device: shapes, no memory."""
    import torch
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(copy.deepcopy(config))


def predict_num_params(plan: Sequence[BaseModel], config) -> int | None:
    """The parameter count `apply_plan` leaves (counted as the search counts it, tied tensors
    once), from shapes alone; None when a step's op cannot tell its shapes without data.
    Raises PlanError for a plan that does not fit the model."""
    check_plan(plan, config)
    ops = registered_ops()
    model = skeleton(config)
    for step in plan:
        reshape = ops[step.op].reshape
        model = reshape(model, step) if reshape is not None else None
        if model is None:
            return None
    return sum(p.numel() for p in model.parameters())
