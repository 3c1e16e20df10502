"""The genome of a recipe search (`mode: recipe`): per-layer-group values of one merge method's
numeric parameters, and how a genome compiles to an evolve Recipe.

Who decides what: the config fixes the method, the inputs, the searched parameters with their
ranges, the number of layer groups and every other parameter (`fixed`); Optuna decides the
values. A searched parameter `p` gets `layer_groups` genes per expert when it is per-input
(mergekit's `models[i].parameters`: weight, density, epsilon, gamma, ...) and `per_expert` is
on, else `layer_groups` genes shared by all inputs (`t` of slerp, `lambda`, ...). Gene names
are Optuna parameter names: `weight.arith.2` (parameter, expert, group) or `t.0`.

The `layer_groups` values of one parameter are the anchors of a mergekit gradient: the recipe
carries them as a list, and materialisation interpolates them over depth exactly as mergekit
does (layer i of L sits at t = i / (L - 1); with n anchors, scaled = t (n - 1), value =
(1 - frac) v[floor(scaled)] + frac v[floor(scaled) + 1]; tensors outside the layers take
v[0]; `evolve.recipe.resolve_setting`). One group is a plain scalar. So four groups over 30
layers put anchors at layers 0, 9.67, 19.33 and 29, and every layer between two anchors gets
their linear interpolation: neighbouring layers change together, as the search can afford.

Every candidate of a run shares one random seed (`derive_seed(run seed, "recipe")`): DARE /
DELLA drop masks are then the same for every genome (common random numbers), so the fitness
is a deterministic function of the genome and two genomes differ only by their coefficients.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

from search.errors import ConfigError
from search.schema import beside_config

RECIPE_FILE = "evofuse_recipe.json"  # an export's record (search.results.export)


class RecipeSpaceError(ConfigError):
    """A recipe search or seed recipe that cannot work; one line naming the field."""


@dataclass(frozen=True)
class Gene:
    name: str  # the Optuna parameter name
    param: str  # the merge method's parameter
    input_id: str | None  # the expert it belongs to (per-input parameters), else None
    group: int  # the anchor's index along depth
    low: float
    high: float


@dataclass(frozen=True)
class RecipeSpace:
    method: str
    inputs: tuple[str, ...]
    base: str | None
    groups: int
    num_layers: int
    ranges: Mapping[str, tuple[float, float]]  # searched parameter -> (low, high)
    fixed: Mapping[str, Any]
    per_expert: bool
    seed: int  # the recipes' seed (drop masks), shared by every candidate

    @classmethod
    def from_config(cls, config, num_layers: int) -> "RecipeSpace":
        """The space of a `mode: recipe` RunConfig, for a model of `num_layers` decoder layers."""
        from evolve.recipe import derive_seed
        from evolve.registry import get_operator, RecipeError

        search = config.recipe
        inputs = tuple(search.inputs or [e.name for e in config.parents.experts])
        try:
            op = get_operator(search.method)
        except RecipeError as exc:
            raise RecipeSpaceError(f"recipe.method: {exc}") from None
        base_name = config.parents.base.name
        # A task-vector method merges the experts' differences from the base; SLERP's base is its
        # t = 0 end, used only when a single expert is merged (else the two experts are the ends).
        uses_base = op.base in ("required", "optional") or (op.base == "endpoint" and len(inputs) == 1)
        return cls(
            method=search.method,
            inputs=inputs,
            base=base_name if uses_base else None,
            groups=search.layer_groups,
            num_layers=num_layers,
            ranges={name: (float(b[0]), float(b[1])) for name, b in search.parameters.items()},
            fixed=dict(search.fixed),
            per_expert=search.per_expert,
            seed=derive_seed(config.seed, "recipe"),
        )

    # ---- the genome ----------------------------------------------------------------------
    def operator(self):
        from evolve.registry import get_operator

        return get_operator(self.method)

    def genes(self) -> list[Gene]:
        """Every searched value, in a fixed order (parameter, expert, group)."""
        op, out = self.operator(), []
        for param, (low, high) in self.ranges.items():
            owners = self.operand_ids() if op.param(param).per_input and self.per_expert else (None,)
            for owner in owners:
                for group in range(self.groups):
                    name = f"{param}.{owner}.{group}" if owner is not None else f"{param}.{group}"
                    out.append(Gene(name, param, owner, group, low, high))
        return out

    def operand_ids(self) -> tuple[str, ...]:
        """The inputs that get per-input values: the operator's inputs (not a task-vector base)."""
        from evolve.recipe import Recipe
        from evolve.registry import operands

        return operands(Recipe(self.method, self.recipe_inputs(), base=self.base), self.operator())

    def recipe_inputs(self) -> tuple[str, ...]:
        """The recipe's inputs: an endpoint base (SLERP's t = 0 end) first, then the experts."""
        if self.base is None or self.base in self.inputs or self.operator().base != "endpoint":
            return self.inputs
        return (self.base,) + self.inputs

    def distributions(self) -> dict:
        """{gene name: optuna FloatDistribution}, the search space Optuna samples."""
        from optuna.distributions import FloatDistribution

        return {g.name: FloatDistribution(g.low, g.high) for g in self.genes()}

    def centre(self) -> dict[str, float]:
        return {g.name: (g.low + g.high) / 2 for g in self.genes()}

    def suggest(self, trial) -> dict[str, float]:
        """The genome of an Optuna trial (values already suggested are returned as they were)."""
        return {g.name: trial.suggest_float(g.name, g.low, g.high) for g in self.genes()}

    # ---- genome -> recipe ----------------------------------------------------------------
    def compile(self, genome: Mapping[str, float]):
        """The Recipe a genome stands for: `fixed` plus, per searched parameter, a gradient of
        `layer_groups` anchors (a scalar for one group), per expert or shared."""
        from evolve.recipe import Recipe

        missing = [g.name for g in self.genes() if g.name not in genome]
        if missing:
            raise RecipeSpaceError(f"recipe genome: no value for {missing[0]!r}")
        params: dict[str, Any] = dict(self.fixed)
        per_input: dict[str, dict[str, Any]] = {}
        anchors: dict[tuple[str, str | None], list[float]] = {}
        for g in self.genes():
            anchors.setdefault((g.param, g.input_id), []).append(float(genome[g.name]))
        for (param, owner), values in anchors.items():
            setting = values[0] if len(values) == 1 else values
            if owner is None:
                params[param] = setting
            else:
                per_input.setdefault(owner, {})[param] = setting
        if per_input:
            params["per_input"] = per_input
        if self.groups > 1:
            params["num_layers"] = self.num_layers
        return Recipe(op=self.method, inputs=self.recipe_inputs(), params=params, seed=self.seed, base=self.base)

    def check(self) -> None:
        """Refuse, naming the field, a method without numeric parameters, a parameter the method
        does not have or cannot search, and a recipe the method would refuse."""
        from evolve.registry import COMMON_PARAMS, RecipeError, as_float, validate_recipe

        op = self.operator()
        if not op.merge_method:
            raise RecipeSpaceError(f"recipe.method: {self.method!r} is not a merge method")
        numeric = [p.name for p in op.params if p.convert is as_float]
        if not numeric:
            raise RecipeSpaceError(f"recipe.method: {self.method!r} has no numeric parameter to search")
        for name in self.ranges:
            if name not in numeric:
                raise RecipeSpaceError(f"recipe.parameters.{name}: not a numeric parameter of {self.method!r} "
                                       f"(searchable: {', '.join(numeric)})")
        for name in self.fixed:
            if name in self.ranges:
                raise RecipeSpaceError(f"recipe.fixed.{name}: also searched (in recipe.parameters); keep one")
            if name in COMMON_PARAMS or op.param(name) is None:
                valid = ", ".join(p.name for p in op.params)
                raise RecipeSpaceError(f"recipe.fixed.{name}: not a parameter of {self.method!r} (valid: {valid})")
        try:
            validate_recipe(self.compile(self.centre()))
        except RecipeError as exc:
            raise RecipeSpaceError(f"recipe: {exc}") from None
        if self.groups > self.num_layers:
            raise RecipeSpaceError(f"recipe.layer_groups: {self.groups} is more than the model's {self.num_layers} layers")

    def default_trials(self) -> int:
        """CMA-ES's default population for n values: 4 + floor(3 ln n)."""
        import math

        return 4 + int(3 * math.log(len(self.genes())))


# ---- a recipe evolved before, as a seed --------------------------------------------------------
def read_seed_recipe(spec: str, base_dir: Path | None = None) -> dict:
    """The recipe (as a mapping) that `spec` names: a recipe run's directory (its best member),
    an export directory (its evofuse_recipe.json), or a JSON file holding a recipe or an export
    record. Paths may be relative to the config's directory. JSON only, never pickle."""
    from evolve.recipe import Recipe, RecipeError

    path = beside_config(spec, base_dir)
    if path.is_dir():
        if (path / RECIPE_FILE).is_file():
            data = _read_json(path / RECIPE_FILE).get("recipe")
        elif (path / "state.json").is_file():
            data = _best_recipe_of_run(path)
        else:
            raise RecipeSpaceError(f"{spec!r}: a directory without {RECIPE_FILE} (an export) or state.json (a run)")
    elif path.is_file():
        data = _read_json(path)
        data = data.get("recipe", data) if isinstance(data, dict) and "op" not in data else data
    else:
        raise RecipeSpaceError(f"{spec!r}: no such file or directory")
    if not isinstance(data, dict):
        raise RecipeSpaceError(f"{spec!r}: holds no recipe (a mapping with 'op' and 'inputs')")
    try:
        return Recipe.from_dict(data).to_dict()
    except RecipeError as exc:
        raise RecipeSpaceError(f"{spec!r}: {exc}") from None


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise RecipeSpaceError(f"{path}: not readable JSON ({exc})") from None


def _best_recipe_of_run(run_dir: Path) -> dict:
    """The recipe of a run's best evolved member (dev score; population and hall of fame; a
    parent, whose recipe is a copy of itself, is not one)."""
    state = _read_json(run_dir / "state.json")
    members = [m for m in (state.get("hall_of_fame") or []) + (state.get("population") or [])
               if m.get("recipe") and m["recipe"].get("op") != "copy"]
    if not members:
        raise RecipeSpaceError(f"{run_dir}: no evolved member in state.json (no candidate beat the parents)")
    best = max(members, key=lambda m: m.get("score", float("-inf")))
    return best["recipe"]


__all__ = ["RecipeSpace", "RecipeSpaceError", "Gene", "read_seed_recipe"]
