"""Recipes: how a candidate's weights are made from its parents, as small JSON.

A recipe names an operator (an Evolver step or a classic merge), the weight sets it reads,
the operator's parameters and a seed. Replaying it from the same parents gives the same
weights bit for bit on the same device and dtype (`evolve.materialize.materialize`).

Parameters follow mergekit's conventions so that a mergekit YAML maps onto a recipe unchanged:

* a value is a scalar, or a **gradient** over depth (a list of numbers interpolated over the
  decoder layers: layer i of L sits at t = i / (L - 1), t = 1 when L = 1, every tensor outside
  the layers at t = 0), or a list of **conditional** settings `{"filter": s, "value": v}` where
  the first whose `filter` is missing, `"*"`, or a substring of the tensor name wins;
* `params["per_input"][input_id]` holds settings for one input (mergekit's
  `models[i].parameters`); they take precedence over the top-level ones for per-input
  parameters such as `weight` and `density`;
* `params["num_layers"]` is the number of decoder layers, needed only by gradients.
"""
from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass, field
from typing import Any, Callable

from evolve.rng import derive_seed

__all__ = [
    "Recipe",
    "RecipeError",
    "derive_seed",
    "resolve_setting",
    "layer_fraction",
    "layer_index",
]

RECIPE_KEYS = ("op", "inputs", "params", "seed", "base")

# `model.layers.12.mlp...` (Llama/Mistral/Qwen), `transformer.h.3.attn...` (GPT-2), `blocks.N`.
LAYER_PATTERN = re.compile(r"(?:^|\.)(?:layers|h|blocks)\.(\d+)\.")


class RecipeError(ValueError):
    """A recipe that cannot be materialised; the message is one line naming the field."""


@dataclass(frozen=True)
class Recipe:
    op: str  # registered operator, see evolve.registry.registered_operators()
    inputs: tuple[str, ...]  # ids of the weight sets read, in the operator's order
    params: dict = field(default_factory=dict)  # operator parameters, JSON-able
    seed: int = 0  # root of every random draw (with the tensor name and input id)
    base: str | None = None  # the base for task-vector methods (and SLERP's t = 0 end)

    def __post_init__(self):
        object.__setattr__(self, "inputs", tuple(self.inputs))
        if not isinstance(self.op, str) or not self.op:
            raise RecipeError("recipe field 'op' must be a non-empty string")
        if not self.inputs or not all(isinstance(i, str) and i for i in self.inputs):
            raise RecipeError("recipe field 'inputs' must be a non-empty list of weight-set ids")
        if not isinstance(self.params, dict):
            raise RecipeError("recipe field 'params' must be a mapping")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int):
            raise RecipeError("recipe field 'seed' must be an integer")
        if self.base is not None and not (isinstance(self.base, str) and self.base):
            raise RecipeError("recipe field 'base' must be a weight-set id or null")

    def input_ids(self) -> tuple[str, ...]:
        """Every weight set the recipe reads: its inputs, then the base if it is not one."""
        if self.base is None or self.base in self.inputs:
            return self.inputs
        return self.inputs + (self.base,)

    def to_dict(self) -> dict:
        return {
            "op": self.op,
            "inputs": list(self.inputs),
            "params": json.loads(json.dumps(self.params)),  # a deep, JSON-clean copy
            "seed": self.seed,
            "base": self.base,
        }

    @classmethod
    def from_dict(cls, d: dict) -> "Recipe":
        if not isinstance(d, dict):
            raise RecipeError("a recipe must be a mapping with 'op' and 'inputs'")
        unknown = sorted(set(d) - set(RECIPE_KEYS))
        if unknown:
            raise RecipeError(f"unknown recipe field {unknown[0]!r}; valid: {', '.join(RECIPE_KEYS)}")
        for key in ("op", "inputs"):
            if key not in d:
                raise RecipeError(f"recipe field {key!r} is missing")
        inputs = d["inputs"]
        if isinstance(inputs, str) or not isinstance(inputs, (list, tuple)):
            raise RecipeError("recipe field 'inputs' must be a list of weight-set ids")
        return cls(
            op=d["op"],
            inputs=tuple(inputs),
            params=dict(d.get("params") or {}),
            seed=d.get("seed", 0),
            base=d.get("base"),
        )

    def fingerprint(self) -> str:
        """A short stable hash of the recipe's canonical JSON (for file names and caches)."""
        text = json.dumps(self.to_dict(), sort_keys=True, separators=(",", ":"))
        return hashlib.blake2b(text.encode(), digest_size=10).hexdigest()


def layer_index(name: str) -> int | None:
    """The decoder-layer index in a tensor name, or None for tensors outside the layers."""
    match = LAYER_PATTERN.search(name)
    return int(match.group(1)) if match else None


def layer_fraction(name: str, num_layers: int | None) -> float:
    """mergekit's `t` of a tensor: i / (L - 1) for layer i of L (1 when L = 1), else 0."""
    index = layer_index(name)
    if index is None:
        return 0.0
    if num_layers is None:
        raise RecipeError(
            f"a gradient parameter needs params 'num_layers' to place tensor {name!r}"
        )
    return 1.0 if num_layers <= 1 else index / (num_layers - 1)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def resolve_setting(
    setting: Any,
    tensor_name: str,
    t: Callable[[], float],
    convert: Callable[[Any], Any],
) -> Any:
    """One mergekit parameter setting evaluated for `tensor_name`; None when no filter matches.

    `t` is called only for gradients (it may raise when the depth is unknown). Numeric
    gradients interpolate linearly between neighbouring entries exactly as mergekit does
    (`scaled = t * (n - 1)`, `i0 = int(scaled)`, `(1 - frac) * v[i0] + frac * v[i0 + 1]`, in
    Python floats); non-numeric lists pick `v[int(t * (n - 1))]`.
    """
    if isinstance(setting, dict):
        setting = [setting]
    if isinstance(setting, (bool, int, float, str)):
        return convert(setting)
    if not isinstance(setting, (list, tuple)):
        raise RecipeError(f"parameter setting {setting!r} must be a scalar, list or filter mapping")
    if not setting:
        return None
    if all(isinstance(item, dict) for item in setting):
        for condition in setting:
            unknown = set(condition) - {"filter", "value"}
            if unknown or "value" not in condition:
                raise RecipeError(
                    f"conditional setting {condition!r} must have 'value' and optional 'filter'"
                )
            pattern = condition.get("filter")
            if pattern is None or pattern == "*" or pattern in tensor_name:
                return resolve_setting(condition["value"], tensor_name, t, convert)
        return None
    if any(isinstance(item, (dict, list, tuple)) for item in setting):
        raise RecipeError(f"parameter setting {setting!r} mixes scalars and mappings")
    values = [convert(item) for item in setting]
    position = t()
    if not all(_is_number(v) for v in values):
        return values[int(position * (len(values) - 1))]
    scaled = position * (len(values) - 1)
    low = int(scaled)
    high = min(len(values) - 1, low + 1)
    frac = scaled - low
    return convert((1 - frac) * values[low] + frac * values[high])
