"""Population bookkeeping on DEAP: individuals, the toolbox, selection and the hall of fame.

Also the merges that join a population: classic merges of the parents that seed it
(`seed_recipes`) and the paper's "merge the population and score the merge" candidate
(`population_merge_recipe`).

An individual is a small dict (id, recipe, plan, metrics) carrying a DEAP fitness; its weights
live elsewhere (the run store / Ray object store). Everything here serialises to JSON (the
logbook is one JSON line per generation, `generation_record`): a run directory is never read
back with pickle.
"""
from __future__ import annotations

import math
from typing import Any, Iterable, Mapping, Sequence

from deap import base, creator, tools

from .evolver import make_offspring, replaces
from .recipe import Recipe
from .registry import validate_recipe

__all__ = [
    "WORST",
    "finite_or_worst",
    "make_member",
    "member_score",
    "member_to_json",
    "member_from_json",
    "select_pareto",
    "pareto_front_of",
    "make_toolbox",
    "generation_record",
    "make_hall_of_fame",
    "hall_of_fame_from",
    "population_merge_recipe",
    "seed_recipes",
]

WORST = -1e30  # fitness of a failed or non-finite candidate: below every real score

if not hasattr(creator, "EvofuseFitness"):
    creator.create("EvofuseFitness", base.Fitness, weights=(1.0,))
    creator.create("EvofuseMember", dict, fitness=creator.EvofuseFitness)
    # Two objectives for compressing searches: dev score up, parameter count down.
    creator.create("EvofuseParetoFitness", base.Fitness, weights=(1.0, -1.0))
    creator.create("EvofuseParetoMember", dict, fitness=creator.EvofuseParetoFitness)
    # Three, when latency is measured too: dev score up, parameters down, latency down.
    creator.create("EvofuseLatencyFitness", base.Fitness, weights=(1.0, -1.0, -1.0))
    creator.create("EvofuseLatencyMember", dict, fitness=creator.EvofuseLatencyFitness)


def finite_or_worst(value: float | None) -> float:
    return value if value is not None and math.isfinite(value) else WORST


def make_member(
    id: str,
    recipe: Recipe | None,
    score: float,
    metrics: dict | None = None,
    plan: list | None = None,
    params: int | None = None,
    latency_ms: float | None = None,
):
    """A DEAP individual: one objective (score up); with `params` two (parameters down too);
    with `latency_ms` as well, three (latency down too)."""
    fields = dict(id=id, recipe=recipe.to_dict() if recipe else None, plan=plan or [], metrics=metrics or {})
    if params is None:
        member = creator.EvofuseMember(**fields)
        member.fitness.values = (finite_or_worst(score),)
    elif latency_ms is None:
        member = creator.EvofuseParetoMember(**fields, params=int(params))
        member.fitness.values = (finite_or_worst(score), float(params))
    else:
        member = creator.EvofuseLatencyMember(**fields, params=int(params), latency_ms=float(latency_ms))
        member.fitness.values = (finite_or_worst(score), float(params), float(latency_ms))
    return member


def member_score(member) -> float:
    return member.fitness.values[0]


def member_to_json(member) -> dict:
    return {**dict(member), "score": member_score(member)}


def member_from_json(data: dict):
    data = dict(data)
    score = data.pop("score")
    recipe = Recipe.from_dict(data["recipe"]) if data.get("recipe") else None
    return make_member(data["id"], recipe, score, data.get("metrics"), data.get("plan"), data.get("params"), data.get("latency_ms"))


def select_pareto(members: Sequence, size: int) -> list:
    """NSGA-II survivor selection (non-dominated sorting, then crowding distance)."""
    return list(tools.selNSGA2(list(members), size))


def pareto_front_of(members: Iterable) -> list:
    front = tools.ParetoFront(similar=lambda a, b: a["id"] == b["id"])
    front.update([m for m in members if m.fitness.values[0] > WORST])
    return list(front)


def make_toolbox(run_seed: int, generations: int, F: float, CR: float, strategy: str, reference: str,
                 per_member: int = 1, shared_recipe: bool = False) -> base.Toolbox:
    """`toolbox.offspring(population, generation)` and `toolbox.select(target, child) -> winner`."""
    toolbox = base.Toolbox()

    def offspring(population: Sequence, generation: int):
        return make_offspring(
            [m["id"] for m in population],
            [member_score(m) for m in population],
            generation,
            run_seed=run_seed,
            generations=generations,
            F=F,
            CR=CR,
            strategy=strategy,
            reference=reference,
            per_member=per_member,
            shared_recipe=shared_recipe,
        )

    toolbox.register("offspring", offspring)
    toolbox.register("select", lambda target, child: child if replaces(member_score(child), member_score(target)) else target)
    return toolbox


def generation_record(generation: int, population: Sequence, evals: int, replaced: int, wall_s: float) -> dict:
    scores = [member_score(m) for m in population if member_score(m) > WORST]
    return {
        "gen": generation,
        "evals": evals,
        "best": max(scores) if scores else None,
        "mean": sum(scores) / len(scores) if scores else None,
        "replaced": replaced,
        "best_id": max(population, key=member_score)["id"],
        "wall_s": round(wall_s, 3),
    }


def make_hall_of_fame(size: int) -> tools.HallOfFame:
    return tools.HallOfFame(size, similar=lambda a, b: a["id"] == b["id"])


def hall_of_fame_from(members: Iterable, size: int) -> tools.HallOfFame:
    hof = make_hall_of_fame(size)
    hof.update(list(members))
    return hof


# --- merges as population members -------------------------------------------------------


def population_merge_recipe(member_ids: Sequence[str], method: str = "linear", *, base: str | None = None,
                            params: Mapping[str, Any] | None = None, seed: int = 0) -> Recipe:
    """The paper's "merge the population" candidate.

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
