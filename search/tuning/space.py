"""The plan search space Optuna explores, and how a trial becomes a compression plan.

A plan has up to three steps, each chosen by a categorical parameter that may be "none":
a depth step (remove or fuse blocks), a width step (prune heads / FFN neurons with a
reconstruction) and a tensor-train step (TTM MLPs). Every trial suggests every parameter, also
those of steps it leaves out: NSGA-II breeds (crossover, mutation) only the parameters that all
finished trials share, and samples the rest at random, so a parameter suggested only when its
step is chosen (define-by-run) would never be evolved. Ranges are `[low, high]` pairs; integer
ranges marked log are sampled on a log scale.

With a size budget, the first generation can start from anchors instead of random draws (a
population of three random plans rarely holds the good ones, and NSGA-II only recombines what it
holds): for each combination of step kinds, single steps first, a plan with every chosen step at
one common strength s in [0, 1] (block count and width ratio from the low to the high end of
their range, TT rank from high to low), s the least that fits the budget.

`genes` (`GeneSpace`, off by default) puts structure genes on every candidate: the trial still
suggests every parameter, and its depth and width parameters become the candidate's budget,
which its genes place across blocks and layers (search/tuning/gene_plans.py).
"""
from __future__ import annotations

import math
from itertools import combinations
from typing import Callable, Literal, Optional

from pydantic import Field, field_validator, model_serializer, model_validator

from compression.genes import ridge_field
from search.schema import Strict


class IntRange(Strict):
    low: int = Field(ge=1)
    high: int = Field(ge=1)
    log: bool = False

    @model_validator(mode="after")
    def _ordered(self) -> "IntRange":
        if self.high < self.low:
            raise ValueError(f"high ({self.high}) is below low ({self.low})")
        return self


class FloatRange(Strict):
    low: float = Field(gt=0, lt=1)
    high: float = Field(gt=0, lt=1)

    @model_validator(mode="after")
    def _ordered(self) -> "FloatRange":
        if self.high < self.low:
            raise ValueError(f"high ({self.high}) is below low ({self.low})")
        return self


class CalibrationConfig(Strict):
    data: str = "pydoc:train"
    seq_len: int = Field(128, ge=8)
    num_sequences: int = Field(32, ge=1)


class GeneSpace(Strict):
    """`compress.space.genes`: structure genes on every candidate (`true` for these defaults).

    Width levels lie on a grid: level l removes l * step of a kept layer's targeted parameters
    (the trial's width_target), at most max_level levels per layer."""

    step: float = Field(0.0625, gt=0, lt=1)
    max_level: int = Field(8, ge=1)
    crossover: float = Field(0.5, ge=0, le=1)  # share of bred candidates crossed with a second member
    max_switches: int = Field(3, ge=1)  # level switches per mutation: 1..max_switches, small ones likelier
    prior_strength: float = Field(0.5, ge=0, le=1)  # how much the trial's ranking biases which blocks go out
    importance_samples: int = Field(4, ge=1)  # calibration windows the rankings are scored on

    @model_validator(mode="after")
    def _grid_below_one(self) -> "GeneSpace":
        if self.step * self.max_level >= 1:
            raise ValueError(f"max_level: {self.max_level} levels of step {self.step} remove a whole layer (need step * max_level < 1)")
        return self

    @property
    def widest(self) -> float:
        """The largest width ratio a layer can take."""
        return round(self.step * self.max_level, 10)


class SpaceConfig(Strict):
    depth: list[Literal["none", "remove_blocks", "fuse_blocks"]] = ["none", "remove_blocks"]
    block_count: IntRange = IntRange(low=1, high=4)
    importance: list[Literal["block_influence", "macro_influence", "sleb"]] = ["block_influence"]
    fuse_rank: IntRange = IntRange(low=4, high=64, log=True)
    fuse_steps: IntRange = IntRange(low=5, high=40)
    width: list[Literal["none", "prune_width"]] = ["none", "prune_width"]
    width_ratio: FloatRange = FloatRange(low=0.05, high=0.4)
    width_target: list[Literal["ffn", "heads", "both"]] = ["both"]
    criterion: list[str] = ["second_moment"]
    reconstruct: list[Literal["none", "liar", "greedy"]] = ["liar"]
    # The relative ridge of LIAR's / the greedy refit's least squares (λ = ridge · mean diag G;
    # unset: the step's own default, 1e-2). A few thousand correlated calibration tokens for
    # SmolLM2's 1,536-wide MLP inputs want more of it: at 0.1 a plan rebuilds 4-6% closer to the
    # dense model than at 1e-2 (`benchmarks/results/calibration_size.md`).
    ridge: Optional[float] = Field(None, ge=0)
    ttm: list[Literal["none", "ttm"]] = ["none"]
    ttm_rank: IntRange = IntRange(low=8, high=64, log=True)
    ttm_modules: str = "mlp"
    calibration: CalibrationConfig = CalibrationConfig()
    genes: GeneSpace | None = None  # structure genes place each trial's budget (search/tuning/gene_plans.py)

    @field_validator("genes", mode="before")
    @classmethod
    def _genes_switch(cls, value):
        """`genes: true` is the default gene space, `false` (or null) none."""
        if value is True:
            return {}
        return None if value is False else value

    @model_validator(mode="after")
    def _genes_fit_the_space(self) -> "SpaceConfig":
        if self.genes is None:
            return self
        if set(self.depth) == {"none"} and set(self.width) == {"none"}:
            raise ValueError("genes: the space has no depth or width step for genes to place (depth and width are 'none' only)")
        if "prune_width" in self.width and self.width_ratio.high > self.genes.widest:
            raise ValueError(f"width_ratio.high: {self.width_ratio.high} is past the widest gene level "
                             f"(genes.max_level {self.genes.max_level} x genes.step {self.genes.step} = {self.genes.widest})")
        return self

    @model_serializer(mode="wrap")
    def _omit_genes_when_off(self, handler):
        """A space without genes dumps as before genes existed, so its run's fingerprint (and
        the resume of runs made before) stays the same."""
        data = handler(self)
        if data.get("genes", 0) is None:
            data.pop("genes")
        return data


def block_count_range(space: SpaceConfig, num_layers: int) -> tuple[int, int]:
    """The configured block counts, capped so that at least one block remains."""
    high = min(space.block_count.high, num_layers - 1)
    return min(space.block_count.low, high), high


def suggest_plan(trial, space: SpaceConfig, num_layers: int) -> list[dict]:
    """Ask the trial for one plan (a list of plan-step mappings, possibly empty)."""
    depth = {
        "op": trial.suggest_categorical("depth", space.depth),
        "count": trial.suggest_int("block_count", *block_count_range(space, num_layers)),
        "importance": trial.suggest_categorical("importance", space.importance),
        "rank": trial.suggest_int("fuse_rank", space.fuse_rank.low, space.fuse_rank.high, log=space.fuse_rank.log),
        "steps": trial.suggest_int("fuse_steps", space.fuse_steps.low, space.fuse_steps.high),
    }
    width = {
        "op": trial.suggest_categorical("width", space.width),
        "ratio": round(trial.suggest_float("width_ratio", space.width_ratio.low, space.width_ratio.high), 4),
        "target": trial.suggest_categorical("width_target", space.width_target),
        "criterion": trial.suggest_categorical("criterion", space.criterion),
        "reconstruct": trial.suggest_categorical("reconstruct", space.reconstruct),
        **ridge_field(space.ridge),
    }
    ttm = {
        "op": trial.suggest_categorical("ttm", space.ttm),
        "rank": trial.suggest_int("ttm_rank", space.ttm_rank.low, space.ttm_rank.high, log=space.ttm_rank.log),
        "modules": space.ttm_modules,
    }
    if depth["op"] == "remove_blocks":  # fusion's rank and steps do not apply
        depth = {k: v for k, v in depth.items() if k not in ("rank", "steps")}
    return [step for step in (depth, width, ttm) if step["op"] != "none"]


STRENGTH_STEPS = 12  # bisection steps on an anchor's strength (1/4096 of each range)


def first_choices(space: SpaceConfig, num_layers: int) -> dict:
    """Every parameter of the space at its first choice / low end (steps off where allowed)."""
    return {
        "depth": space.depth[0], "block_count": block_count_range(space, num_layers)[0], "importance": space.importance[0],
        "fuse_rank": space.fuse_rank.low, "fuse_steps": space.fuse_steps.low,
        "width": space.width[0], "width_ratio": space.width_ratio.low, "width_target": space.width_target[0],
        "criterion": space.criterion[0], "reconstruct": space.reconstruct[0],
        "ttm": space.ttm[0], "ttm_rank": space.ttm_rank.high,
    }


def step_kinds(space: SpaceConfig) -> dict[str, str]:
    """{kind: its first op} for each kind of step the space can switch on."""
    choices = {"depth": space.depth, "width": space.width, "ttm": space.ttm}
    return {kind: next(op for op in ops if op != "none") for kind, ops in choices.items() if any(op != "none" for op in ops)}


def params_at_strength(space: SpaceConfig, num_layers: int, kinds: dict[str, str], strength: float) -> dict:
    """Optuna parameters with the steps of `kinds` on, each at `strength` along its range, the rest off."""
    params = first_choices(space, num_layers)
    params.update({kind: "none" for kind in ("depth", "width", "ttm") if kind not in kinds and "none" in getattr(space, kind)})
    params.update(kinds)
    if "depth" in kinds:
        low, high = block_count_range(space, num_layers)
        params["block_count"] = round(low + strength * (high - low))
    if "width" in kinds:
        r = space.width_ratio
        params["width_ratio"] = r.low + strength * (r.high - r.low)
    if "ttm" in kinds:  # a lower rank is a stronger compression
        r = space.ttm_rank
        params["ttm_rank"] = round(math.exp(math.log(r.high) - strength * (math.log(r.high) - math.log(r.low)))
                                   if r.log else r.high - strength * (r.high - r.low))
    return params


def budget_anchors(space: SpaceConfig, num_layers: int, fits: Callable[[list[dict]], bool], limit: int,
                   plan_of: Callable[[dict], list[dict]] | None = None) -> list[dict]:
    """Up to `limit` Optuna parameter sets for the first generation (see the module doc).
    `fits(plan)` says whether a plan is known to be within the budget; `plan_of(params)` is the
    plan a parameter set stands for (default: `suggest_plan`'s)."""
    import optuna

    def plan_at(kinds: dict[str, str], strength: float) -> list[dict]:
        params = params_at_strength(space, num_layers, kinds, strength)
        if plan_of is not None:
            return plan_of(params)
        return suggest_plan(optuna.trial.FixedTrial(params), space, num_layers)

    kinds = step_kinds(space)
    anchors = []
    for size in range(1, len(kinds) + 1):
        for chosen in combinations(kinds, size):
            if len(anchors) == limit:
                return anchors
            combo = {kind: kinds[kind] for kind in chosen}
            if not fits(plan_at(combo, 1.0)):
                continue
            weak, strong = 0.0, 1.0  # the least fitting strength lies in (weak, strong]
            if fits(plan_at(combo, 0.0)):
                strong = 0.0
            for _ in range(STRENGTH_STEPS if strong else 0):
                middle = (weak + strong) / 2
                weak, strong = (weak, middle) if fits(plan_at(combo, middle)) else (middle, strong)
            anchors.append(params_at_strength(space, num_layers, combo, strong))
    return anchors
