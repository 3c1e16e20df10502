"""Evolver (Du et al., 2024): offspring recipes and one-to-one greedy selection.

One generation: for every population member i (the target), pick a reference member and make
the offspring recipe `evolver(target=i, ref)`: mutation `x_new = (1 - F) x_i + F x_ref`, then
binomial crossover with CR (the tensor math is in `evolve.steps`). The offspring replaces
its target only if its dev score is strictly higher.

Reference choice follows the paper's public code, not textbook DE: with probability
`p = 0.5 / (G - g) + 0.5` a random other member, else the best other member, where g is the
0-based generation and G the number of generations. Early generations lean on the best
member; the last one is fully random. DE/rand/1 (`v = x_r1 + F (x_r2 - x_r3)`, three distinct
members other than the target) is offered as the alternative strategy.

Everything random here comes from a `random.Random` seeded by (run seed, generation), so a
resumed run draws exactly what an uninterrupted one does, with no RNG state to persist.

Step sizes per offspring. F and CR may each be a range (lo, hi) instead of one value. With a
population of m and lambda offspring per member, a member's offspring can only differ in their
reference (m - 1 choices) and their crossover mask; over 135M coordinates two masks of the same
CR move the model by the same amount in nearly the same way, so siblings of one reference are
near-copies whose differences no first stage resolves. Drawn per offspring, stratified over the
siblings (the k-th of lambda falls in the k-th of lambda equal slices of the range, at a seeded
place within it), the step sizes spread the family over the expected move F * CR, in the spirit
of jDE's per-individual F and CR: the family tries short and long steps toward its reference and
selection keeps the one that pays. When both are ranges, the pairs form a Latin hypercube: the k-th
sibling takes F's k-th slice and CR's pi(k)-th, pi a permutation seeded per (run, generation,
member) (`crossover_strata`). Each slice of each range is still tried exactly once, but F and CR are
no longer the same rank: without pi the family would span only the diagonal (short steps on few
coordinates up to long steps on many) and never try a long step on few coordinates or a short one
on many. A value is derived from (run seed, offspring id), not from the generation's stream, so
fixed F and CR draw exactly what they always did.
"""
from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Sequence

from .recipe import Recipe, derive_seed

__all__ = [
    "Offspring",
    "random_reference_probability",
    "choose_reference",
    "generation_rng",
    "offspring_id",
    "make_offspring",
    "step_size",
    "crossover_strata",
    "replaces",
]


@dataclass(frozen=True)
class Offspring:
    id: str
    target: str  # id of the member it competes with
    recipe: Recipe


def random_reference_probability(generation: int, generations: int) -> float:
    """p = 0.5 / (G - g) + 0.5: the chance that x_ref is a random other member (g is 0-based)."""
    return 0.5 / max(generations - generation, 1) + 0.5


def choose_reference(target: int, scores: Sequence[float], generation: int, generations: int, mode: str, rng: random.Random) -> int:
    others = [j for j in range(len(scores)) if j != target]
    best_other = max(others, key=lambda j: (scores[j], -j))
    if mode == "best":
        return best_other
    if mode == "random" or rng.random() < random_reference_probability(generation, generations):
        return rng.choice(others)
    return best_other


def generation_rng(run_seed: int, generation: int) -> random.Random:
    return random.Random(derive_seed(run_seed, "generation", generation))


def offspring_id(generation: int, index: int) -> str:
    return f"g{generation:03d}-{index:03d}"


def step_size(value: float | Sequence[float], run_seed: int, offspring: str, stratum: int, strata: int,
              name: str) -> float:
    """`value` itself, or for a range (lo, hi) a draw from its stratum-th of `strata` equal slices:
    lo + (hi - lo) * (stratum + u) / strata with u uniform in [0, 1) from (run seed, offspring, name)."""
    if isinstance(value, (int, float)):
        return float(value)
    lo, hi = (float(v) for v in value)
    u = random.Random(derive_seed(run_seed, offspring, name)).random()
    return round(lo + (hi - lo) * (stratum + u) / strata, 6)


def crossover_strata(run_seed: int, generation: int, member: int, siblings: int) -> list[int]:
    """The slice of the CR range each of a member's `siblings` offspring draws from: a permutation
    of range(siblings), seeded by (run seed, generation, member); F's slices go in sibling order,
    so together the (F, CR) pairs are a Latin hypercube over the two ranges."""
    order = list(range(siblings))
    random.Random(derive_seed(run_seed, "CR strata", generation, member)).shuffle(order)
    return order


def make_offspring(
    member_ids: Sequence[str],
    scores: Sequence[float],
    generation: int,
    *,
    run_seed: int,
    generations: int,
    F: float | Sequence[float],
    CR: float | Sequence[float],
    strategy: str = "evolver",
    reference: str = "schedule",
    per_member: int = 1,
    shared_recipe: bool = False,
) -> list[Offspring]:
    """`per_member` offspring recipes per population member, in member order (deterministic).

    With several per member (EvoPress's (1 + lambda)), each draws its own reference (or DE
    donors) and seed; ids run on, member i's k-th offspring is number i * per_member + k, so
    one offspring per member keeps the ids and draws it always had. `shared_recipe`: a member's
    offspring all carry its first offspring's recipe (joint runs: they differ in their plans).
    F and CR: a value, or a range (lo, hi) drawn per offspring (`step_size`, module docstring)."""
    if len(member_ids) < 2 or (strategy == "de_rand_1" and len(member_ids) < 4):
        need = 4 if strategy == "de_rand_1" else 2
        raise ValueError(f"evolver.strategy {strategy}: needs a population of at least {need}, got {len(member_ids)}")
    rng = generation_rng(run_seed, generation)
    strata = 1 if shared_recipe else per_member  # one shared recipe draws from the whole range
    cr_strata = [crossover_strata(run_seed, generation, i, strata) for i in range(len(member_ids))]
    out = []
    for i, k in ((i, k) for i in range(len(member_ids)) for k in range(per_member)):
        target = member_ids[i]
        cid = offspring_id(generation, i * per_member + k)
        if k > 0 and shared_recipe:
            out.append(Offspring(cid, target, out[-1].recipe))
            continue
        seed = derive_seed(run_seed, cid)
        steps = {"F": step_size(F, run_seed, cid, k, strata, "F"),
                 "CR": step_size(CR, run_seed, cid, cr_strata[i][k], strata, "CR")}
        if strategy == "evolver":
            ref = member_ids[choose_reference(i, scores, generation, generations, reference, rng)]
            recipe = Recipe(op="evolver", inputs=(target, ref), params=steps, seed=seed)
        else:
            r1, r2, r3 = rng.sample([m for m in member_ids if m != target], 3)
            recipe = Recipe(op="de_rand_1", inputs=(target, r1, r2, r3), params=steps, seed=seed)
        out.append(Offspring(cid, target, recipe))
    return out


def replaces(offspring_score: float, target_score: float) -> bool:
    """One-to-one greedy selection: strictly better on the dev aggregate."""
    return offspring_score > target_score
