"""benchmarks/census_dev_size.py: the census's sibling rule and its floor replayed on dev sets
drawn at other sizes from the census's items."""
import numpy as np
import pytest

from benchmarks.census_dev_size import (DevSize, at_scale, drawn_dev_set, family_matrix, own_dev_set, parse_caps, parse_scales,
                                        scores, screened, stages_of, subset_dev_sets, verdict)
from benchmarks.census_draws import Cut, DrawRule, fresh_dev_set, on_fresh_dev_sets, over_draws
from search.fitness.staged import stage_sizes

WEIGHTS = {"a": 1.0, "b": 3.0}
FRACTIONS = [0.25, 0.5, 1.0]
COSTS = {"first": 1.0, "second": 2.0, "full": 10.0}


def examples(rng: np.random.Generator, p: float, n: int = 16) -> dict:
    """Task a: right/wrong answers with probability p, listed in a shuffled order (the census keeps
    the order the run scored them in); task b: text pieces of unequal length, each a -NLL sum."""
    order = rng.permutation(n)
    tokens = rng.integers(50, 130, size=n).astype(float)
    return {"a": {"index": [int(i) for i in order], "value": [float(v) for v in rng.random(n) < p], "weight": [1.0] * n},
            "b": {"index": list(range(n)), "value": list(-tokens * (3.0 - p + 0.1 * rng.standard_normal(n))),
                  "weight": list(tokens)}}


def full_score(e: dict) -> float:
    by_task = {t: sum(x["value"]) / sum(x["weight"]) for t, x in e.items()}
    return sum(WEIGHTS[t] * s for t, s in by_task.items()) / sum(WEIGHTS.values())


def census(families: int = 3, lam: int = 6, seed: int = 0) -> list[dict]:
    rng = np.random.default_rng(seed)
    out = []
    for g in range(families):
        member = examples(rng, 0.4)
        children = [examples(rng, 0.3 + 0.05 * k) for k in range(lam)]
        out.append({"generation": g, "member": {"id": f"m{g}", "full": full_score(member), "examples": member},
                    "offspring": [{"id": f"g{g}-{k:02d}", "full": full_score(e), "examples": e} for k, e in enumerate(children)]})
    return out


def test_a_family_becomes_matrices_in_the_members_item_order_and_scores_as_the_census_does():
    family = census(1)[0]
    matrix = family_matrix(family)
    assert matrix.ids[0] == "m0" and matrix.sizes == {"a": 16, "b": 16}
    every = own_dev_set(matrix.sizes)
    expected = [family["member"]["full"]] + [o["full"] for o in family["offspring"]]
    assert np.allclose(scores(matrix, every, WEIGHTS), expected)
    unscored = {**family, "offspring": [{**family["offspring"][0], "examples": {
        "a": {k: v[:-1] for k, v in family["offspring"][0]["examples"]["a"].items()}, "b": family["offspring"][0]["examples"]["b"]}}]}
    with pytest.raises(ValueError, match="g0-00 was not scored on the member's a items"):
        family_matrix(unscored)


def test_drawn_dev_sets_are_seeded_sized_by_scale_and_at_scale_one_the_floors_bootstrap():
    sizes = {"a": 16, "b": 16}
    big = drawn_dev_set(sizes, 4.0, 3, (1,))
    assert {t: len(p) for t, p in big.items()} == {"a": 64, "b": 64}
    assert all(p.min() >= 0 and p.max() < 16 for p in big.values())
    assert all(np.array_equal(big[t], drawn_dev_set(sizes, 4.0, 3, (1,))[t]) for t in sizes)
    assert not np.array_equal(big["a"], drawn_dev_set(sizes, 4.0, 3, (2,))["a"])
    ids = {"a": list(range(16)), "b": list(range(16))}
    bootstrap = fresh_dev_set(ids, 5)  # census_draws' floor: {task: {item: times drawn}}
    drawn = drawn_dev_set(sizes, 1.0, 5)
    assert {t: dict(zip(*map(lambda a: a.tolist(), np.unique(p, return_counts=True)))) for t, p in drawn.items()} == bootstrap


def test_subsets_are_two_disjoint_dev_sets_of_distinct_items():
    first, second = subset_dev_sets({"a": 16, "b": 10}, 0.5, 4)
    assert {t: len(p) for t, p in first.items()} == {"a": 8, "b": 5} == {t: len(p) for t, p in second.items()}
    for t in first:
        assert len(set(first[t])) == len(first[t]) and not set(first[t]) & set(second[t])
    assert all(np.array_equal(first[t], subset_dev_sets({"a": 16, "b": 10}, 0.5, 4)[0][t]) for t in first)


def test_stages_are_nested_drawn_from_the_dev_set_and_sized_like_the_run():
    dev = {"a": np.arange(100, 132), "b": np.arange(200, 232)}
    first, second = stages_of(dev, FRACTIONS, 3, seed=0, generation=1)
    for t in dev:
        assert len(first[t]) == stage_sizes(32, FRACTIONS, 3)[0] and len(second[t]) == stage_sizes(32, FRACTIONS, 3)[1]
        assert set(first[t]) <= set(second[t]) <= set(dev[t])


def test_the_rule_keeps_the_stage_leaders_and_the_verdict_counts_a_stopped_better_sibling():
    family = family_matrix(census(1, lam=6)[0])
    every = own_dev_set(family.sizes)
    full = scores(family, every, WEIGHTS)
    # every stage the whole dev set: the rule keeps the best in full, so no stop is false
    assert screened(family, [every, every], (3, 1), WEIGHTS) == [int(np.argmax(full[1:])) + 1]
    clean = verdict(family, every, [int(np.argmax(full[1:])) + 1], full, WEIGHTS, 0.9)
    assert clean["stopped"] == 5 and clean["false"] == 0 and clean["resolved"] == 0
    # choosing the worst offspring: each stopped one at least as good as it and the member is false
    worst = int(np.argmin(full[1:])) + 1
    wrong = verdict(family, every, [worst], full, WEIGHTS, 0.9)
    holder = max(full[worst], full[0])
    assert wrong["false"] == sum(full[r] >= holder for r in range(1, 7) if r != worst)
    assert wrong["gain"] == pytest.approx(holder - full[0])


def test_on_the_censuss_own_dev_sets_it_reproduces_census_draws():
    families = census(4, lam=8, seed=1)
    draws = 6
    own = at_scale([family_matrix(f) for f in families], DevSize(), (3, 1), FRACTIONS, 2, draws, WEIGHTS, 0.9)
    rule = DrawRule("top 3 > 1", (Cut(cap=3), Cut(cap=1)))
    drawn = over_draws(families, rule, draws, FRACTIONS, 2, WEIGHTS, 0.9, COSTS)
    floor = on_fresh_dev_sets(families, draws, WEIGHTS, 0.9)
    for key in ("false_rate", "false_low", "false_high", "resolved_rate", "gain"):
        assert own["rule"][key] == pytest.approx(drawn[key])
        assert own["floor"][key] == pytest.approx(floor[key])
    assert own["items"] == {"a": 16, "b": 16} and own["stage_items"] == [{"a": 4, "b": 4}, {"a": 8, "b": 8}]


def test_larger_dev_sets_order_near_ties_better():
    """Offspring 0.05 apart in right/wrong rate: on sixteen items the rule's stages are a coin
    toss, on sixteen times as many drawn from them they order the family."""
    families = [family_matrix(f) for f in census(4, lam=8, seed=2)]
    small, large = (at_scale(families, DevSize(s), (3, 1), FRACTIONS, 2, 8, WEIGHTS, 0.9) for s in (1.0, 16.0))
    assert large["rule"]["false_rate"] < small["rule"]["false_rate"]
    assert large["floor"]["false_rate"] < small["floor"]["false_rate"]
    assert large["items"] == {"a": 256, "b": 256}


def test_bad_arguments_are_named():
    assert parse_scales("own, 0.5,subset:0.25") == [DevSize(), DevSize(0.5), DevSize(0.25, subset=True)]
    assert [s.arg for s in parse_scales("own,0.5,subset:0.25")] == ["own", "0.5", "subset:0.25"]
    assert parse_caps("3,1") == (3, 1)
    for text in ("own,x", "0", "subset:0.75", "subset:"):
        with pytest.raises(Exception, match="is not 'own', a size|at most half the items"):
            parse_scales(text)
    for text in ("1,3", "a", "0"):
        with pytest.raises(Exception, match="is not a comma-separated list|must be positive counts"):
            parse_caps(text)
