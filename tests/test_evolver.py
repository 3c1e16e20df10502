"""Evolver's population logic: reference schedule, deterministic offspring, greedy selection."""
from __future__ import annotations

import random

import numpy as np
import pytest

from evolve.evolver import choose_reference, crossover_strata, make_offspring, random_reference_probability, replaces, step_size
from evolve.population import WORST, make_member, make_toolbox, member_from_json, member_to_json
from evolve.recipe import Recipe


def test_reference_probability_schedule_matches_the_paper_code():
    # p = 0.5 / (G - g) + 0.5: 0.5 + 0.5/15 at the start of 15 generations, 1.0 at the last one
    assert random_reference_probability(0, 15) == pytest.approx(0.5 + 0.5 / 15)
    assert random_reference_probability(14, 15) == 1.0
    assert random_reference_probability(13, 15) == 0.75


def test_best_reference_is_the_best_other_member():
    scores = [0.1, 0.9, 0.5]
    rng = random.Random(0)
    assert choose_reference(0, scores, 0, 10, "best", rng) == 1
    assert choose_reference(1, scores, 0, 10, "best", rng) == 2  # never itself
    assert all(choose_reference(2, scores, 0, 10, "random", rng) != 2 for _ in range(50))


def test_schedule_uses_random_references_at_the_predicted_rate():
    rng = random.Random(1)
    scores = [0.0, 1.0, 0.5, 0.2]
    picks = [choose_reference(0, scores, 0, 2, "schedule", rng) for _ in range(4000)]
    # best other (1) comes with prob (1 - p) + p/3, p = 0.75
    assert picks.count(1) / len(picks) == pytest.approx(0.25 + 0.75 / 3, abs=0.03)


def test_offspring_are_a_pure_function_of_seed_and_generation():
    kw = dict(run_seed=7, generations=5, F=0.5, CR=0.5)
    a = make_offspring(["x", "y", "z"], [0.1, 0.2, 0.3], 2, **kw)
    b = make_offspring(["x", "y", "z"], [0.1, 0.2, 0.3], 2, **kw)
    assert a == b
    assert [o.id for o in a] == ["g002-000", "g002-001", "g002-002"]
    assert [o.recipe.inputs[0] for o in a] == ["x", "y", "z"]
    assert all(o.recipe.inputs[1] != o.recipe.inputs[0] for o in a)
    c = make_offspring(["x", "y", "z"], [0.1, 0.2, 0.3], 3, **kw)
    assert [o.recipe.seed for o in a] != [o.recipe.seed for o in c]


def test_de_rand_1_needs_four_members_and_uses_distinct_others():
    with pytest.raises(ValueError, match="at least 4"):
        make_offspring(["a", "b", "c"], [0, 0, 0], 0, run_seed=0, generations=3, F=0.5, CR=0.5, strategy="de_rand_1")
    out = make_offspring(list("abcd"), [0] * 4, 0, run_seed=0, generations=3, F=0.5, CR=0.5, strategy="de_rand_1")
    for o in out:
        assert len(set(o.recipe.inputs)) == 4 and o.recipe.op == "de_rand_1"


def test_one_to_one_greedy_selection_and_json_round_trip():
    assert replaces(0.6, 0.5) and not replaces(0.5, 0.5) and not replaces(0.4, 0.5)
    toolbox = make_toolbox(0, 3, 0.5, 0.5, "evolver", "schedule")
    parent = make_member("a", Recipe(op="copy", inputs=("a",)), 0.5)
    better = make_member("g000-000", Recipe(op="copy", inputs=("a",)), 0.7)
    nan_child = make_member("g000-001", Recipe(op="copy", inputs=("a",)), float("nan"))
    assert toolbox.select(parent, better) is better
    assert toolbox.select(parent, nan_child) is parent and nan_child.fitness.values[0] == WORST
    back = member_from_json(member_to_json(better))
    assert back == better and back.fitness.values == better.fitness.values


def test_a_members_offspring_can_share_one_recipe():
    kw = dict(run_seed=3, generations=4, F=0.5, CR=0.5, per_member=3)
    own = make_offspring(["x", "y", "z"], [0.1, 0.2, 0.3], 1, **kw)
    shared = make_offspring(["x", "y", "z"], [0.1, 0.2, 0.3], 1, shared_recipe=True, **kw)
    assert [o.id for o in shared] == [o.id for o in own] and [o.target for o in shared] == [o.target for o in own]
    for member in range(3):
        siblings = shared[member * 3:(member + 1) * 3]
        assert len({o.recipe.fingerprint() for o in siblings}) == 1
        assert siblings[0].recipe.seed == own[member * 3].recipe.seed  # drawn as the first offspring's
    assert len({o.recipe.fingerprint() for o in shared}) == 3
    assert len({o.recipe.fingerprint() for o in own}) == 9



def test_step_size_ranges_are_stratified_over_siblings_and_leave_fixed_values_alone():
    kw = dict(run_seed=5, generations=4, per_member=8)
    fixed = make_offspring(["x", "y", "z"], [0.1, 0.2, 0.3], 1, F=0.5, CR=0.5, **kw)
    ranged = make_offspring(["x", "y", "z"], [0.1, 0.2, 0.3], 1, F=(0.1, 0.9), CR=(0.2, 0.6), **kw)
    # the generation's stream is untouched: same ids, references and seeds, only F and CR differ
    assert [(o.id, o.recipe.inputs, o.recipe.seed) for o in ranged] == [(o.id, o.recipe.inputs, o.recipe.seed) for o in fixed]
    assert all(o.recipe.params == {"F": 0.5, "CR": 0.5} for o in fixed)
    cr_orders = []
    for member in range(3):
        family = ranged[member * 8:(member + 1) * 8]
        for k, o in enumerate(family):  # the k-th sibling in the k-th eighth of F's range
            assert 0.1 + 0.1 * k <= o.recipe.params["F"] < 0.1 + 0.1 * (k + 1)
        # CR: every eighth of its range exactly once (a Latin hypercube with F), in a seeded order
        cr_slices = [int((o.recipe.params["CR"] - 0.2) // 0.05) for o in family]
        assert sorted(cr_slices) == list(range(8))
        cr_orders.append(cr_slices)
    assert any(order != list(range(8)) for order in cr_orders)  # not F's order: the pairs fill the square
    assert len({tuple(order) for order in cr_orders}) > 1  # each member's family its own permutation
    again = make_offspring(["x", "y", "z"], [0.1, 0.2, 0.3], 1, F=(0.1, 0.9), CR=(0.2, 0.6), **kw)
    assert again == ranged
    # one offspring per member: a uniform draw over the whole range, seeded by its id
    assert step_size((0.0, 1.0), 5, "g001-000", 0, 1, "F") == step_size((0.0, 1.0), 5, "g001-000", 0, 1, "F")
    assert step_size((0.0, 1.0), 5, "g001-000", 0, 1, "F") != step_size((0.0, 1.0), 5, "g001-001", 0, 1, "F")
    assert step_size(0.7, 5, "g001-000", 3, 8, "F") == 0.7


def test_crossover_strata_are_a_seeded_permutation_and_uncorrelated_with_f_over_many_families():
    assert crossover_strata(3, 1, 2, 16) == crossover_strata(3, 1, 2, 16)
    assert sorted(crossover_strata(3, 1, 2, 16)) == list(range(16))
    assert crossover_strata(3, 1, 2, 1) == [0]
    # over many families, the rank correlation of F's slice (sibling order) and CR's is about 0
    # (it was exactly 1 when both followed the sibling order)
    k = np.arange(16)
    rhos = [np.corrcoef(k, crossover_strata(0, g, m, 16))[0, 1] for g in range(25) for m in range(4)]
    assert abs(float(np.mean(rhos))) < 0.1


def test_a_shared_recipe_draws_its_step_size_from_the_whole_range():
    kw = dict(run_seed=2, generations=4, F=(0.0, 1.0), CR=0.5, per_member=12, shared_recipe=True)
    firsts = [o.recipe.params["F"] for g in range(8)
              for o in make_offspring(["x", "y", "z"], [0.1, 0.2, 0.3], g, **kw)[::12]]
    assert max(firsts) > 1 / 12  # not only the first of twelve strata
