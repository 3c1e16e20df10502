"""benchmarks/census_draws.py: replaying sibling rules on other draws of the stage items, races
against the stage leader, items chosen where siblings disagree, and siblings ranked by their
estimated full scores, and the floor of the count: full scoring on a fresh draw of the dev sets."""
import numpy as np
import pytest

from benchmarks.census_draws import (Cut, DrawRule, ItemModel, differences, drawn_items, family_cost, fresh_dev_set,
                                     item_ids, on_estimates, on_fresh_dev_sets, on_selected, replay, resampled_score, screen,
                                     selected_items, stage_score)
from search.fitness.staged import stage_sizes

WEIGHTS = {"t": 1.0}
FRACTIONS = [0.25, 0.5, 1.0]
COSTS = {"first": 1.0, "second": 2.0, "full": 10.0}


def examples(values: list[float], ids: list[int] | None = None) -> dict:
    ids = list(range(len(values))) if ids is None else ids
    return {"t": {"index": ids, "value": values, "weight": [1.0] * len(values)}}


def offspring(cid: str, values: list[float]) -> dict:
    return {"id": cid, "full": sum(values) / len(values), "examples": examples(values)}


def family(children: list[dict], member_values: list[float], generation: int = 0) -> dict:
    member = {"id": f"m{generation}", "full": sum(member_values) / len(member_values), "examples": examples(member_values)}
    return {"generation": generation, "member": member, "offspring": children}


def test_draws_are_nested_sized_like_the_run_and_fresh_per_seed_and_generation():
    ids = {"t": [10 * k for k in range(16)]}
    stages = drawn_items(ids, FRACTIONS, 3, seed=0, generation=1)
    first, second = (set(s["t"]) for s in stages)
    assert [len(first), len(second)] == stage_sizes(16, FRACTIONS, 3)[:2] and first <= second <= set(ids["t"])
    assert stages == drawn_items(ids, FRACTIONS, 3, seed=0, generation=1)
    assert stages != drawn_items(ids, FRACTIONS, 3, seed=1, generation=1)
    assert stages != drawn_items(ids, FRACTIONS, 3, seed=0, generation=2)


def test_stage_score_is_the_ratio_of_sums_per_task_weighted_over_tasks():
    ex = {"a": {"index": [0, 1], "value": [-6.0, -2.0], "weight": [4.0, 4.0]},  # a perplexity-like task: -1.0
          "b": {"index": [0, 1, 2, 3], "value": [1.0, 0.0, 1.0, 1.0], "weight": [1.0] * 4}}  # accuracy 0.75
    assert stage_score(ex, {"a": 1.0, "b": 3.0}) == pytest.approx(0.25 * -1.0 + 0.75 * 0.75)


def test_selected_items_take_the_most_disputed_first_and_stay_nested():
    # four offspring of equal means: they agree on items 0-3 and split on items 4-7, on 7 widely
    rows = [[1, 1, 1, 1, 0, 0, -1, 3], [1, 1, 1, 1, 1, 1, 1, -1], [1, 1, 1, 1, 1, 0, 0, 1], [1, 1, 1, 1, 0, 1, 0, 1]]
    calibration = [family([offspring(f"o{k}", [float(x) for x in v]) for k, v in enumerate(rows)], [0.0] * 8)]
    ids = {"t": [100 + k for k in range(8)]}  # stage items are item ids, positions map onto them
    first, second = selected_items(ids, FRACTIONS, 1, [{**f, "offspring": [
        {**o, "examples": examples(o["examples"]["t"]["value"], ids["t"])} for o in f["offspring"]]} for f in calibration])
    assert 107 in first["t"] and len(first["t"]) == 2 and len(second["t"]) == 4
    assert set(first["t"]) <= set(second["t"]) == {104, 105, 106, 107}


def test_a_race_stops_a_clear_loser_keeps_a_near_tie_and_honours_its_cap():
    n = 16
    leader = [1.0] * 12 + [0.0] * 4
    near = [1.0] * 11 + [0.0] * 5  # one answer behind
    loser = [0.0] * 12 + [1.0] * 4  # behind on twelve items
    children = [offspring("a", leader), offspring("b", near), offspring("c", loser)]
    whole = [{"t": list(range(n))}, {"t": list(range(n))}]  # both screens see every item
    race = DrawRule("race", (Cut(0.9), Cut(None)))
    counts, scored = screen(children, whole, race, WEIGHTS, {"t": 32})
    assert counts == [3, 2, 2] and scored == ["a", "b"]
    capped = DrawRule("race, one", (Cut(0.9), Cut(None, cap=1)))
    assert screen(children, whole, capped, WEIGHTS, {"t": 32}) == ([3, 2, 1], ["a"])
    # the whole population seen: the finite-population correction leaves no doubt, the near-tie stops
    assert screen(children, whole, race, WEIGHTS, {"t": n}) == ([3, 1, 1], ["a"])


def test_replay_counts_costs_and_the_false_stops_of_a_top_k_rule():
    # stage items: item 0, then items 0-1; "b" looks worst on them but is best in full
    children = [offspring("a", [1.0, 1.0, 0.0, 0.0]), offspring("b", [0.0, 0.0, 1.0, 1.0]), offspring("c", [1.0, 0.0, 0.0, 0.0])]
    stages = [{"t": [0]}, {"t": [0, 1]}]
    rule = DrawRule("top 2 > 1", (Cut(cap=2), Cut(cap=1)))
    result = replay([family(children, [0.0] * 4)], rule, lambda f: stages, WEIGHTS, 0.9, COSTS)
    assert result["actor_s"] == family_cost([3, 2, 1], COSTS) == 3 * 1.0 + 2 * 2.0 + 10.0
    assert result["x"] == pytest.approx(3 * 10.0 / 17.0)
    assert result["stopped"] == 2 and result["false"] == 1  # b ties a in full: a false stop
    assert result["gain"] == pytest.approx(0.5)


def test_items_chosen_on_earlier_generations_never_see_the_family_judged():
    # generation 0 disputes item 0, generation 1 item 3: a generation-1 family is screened on item 0
    gen0 = family([offspring("a", [1.0, 0.5, 0.5, 0.5]), offspring("b", [0.0, 0.5, 0.5, 0.5])], [0.0] * 4, generation=0)
    gen1 = family([offspring("c", [0.5, 0.5, 0.5, 1.0]), offspring("d", [0.5, 0.5, 0.5, 0.0])], [0.0] * 4, generation=1)
    rule = DrawRule("top 1 > 1", (Cut(cap=1), Cut(cap=1)))
    earlier = on_selected([gen0, gen1], rule, True, FRACTIONS, 1, WEIGHTS, 0.9, COSTS)
    assert earlier["judged"] == [gen1]
    # item 0 cannot tell c from d: the tie goes to the first id, c, which is also the best in full
    assert earlier["false"] == 0 and earlier["stopped"] == 1
    every_other = on_selected([gen0, gen1], rule, False, FRACTIONS, 1, WEIGHTS, 0.9, COSTS)
    assert every_other["judged"] == [gen0, gen1]


def test_the_estimate_is_the_conditional_expectation_of_the_unseen_items():
    # item 1 moves half as far as item 0's surprise, item 2 on its own; per unit of weight
    model = ItemModel([("t", 0), ("t", 1), ("t", 2)], np.array([0.1, 0.0, -0.2]),
                      np.array([[1.0, 0.5, 0.0], [0.5, 1.0, 0.0], [0.0, 0.0, 2.0]]))
    member = {"t": {"index": [0, 1, 2], "value": [-2.0, -4.0, -8.0], "weight": [2.0, 4.0, 4.0]}}
    held = {"t": {"index": [0], "value": [-1.0], "weight": [2.0]}}
    # item 0: (-1 - -2) / 2 = 0.5 per unit, a surprise of 0.4 over the mean; item 1: -4 + 4 * 0.5 * 0.4;
    # item 2: -8 + 4 * -0.2; the task score is the sum of values over the sum of weights
    expected = (-1.0 + (-4.0 + 4 * 0.2) + (-8.0 - 0.8)) / 10.0
    assert model.estimate(held, member, WEIGHTS) == pytest.approx(expected)
    # every item seen: the estimate is the score itself
    whole = {"t": {"index": [0, 1, 2], "value": [-1.0, -3.0, -9.0], "weight": [2.0, 4.0, 4.0]}}
    assert model.estimate(whole, member, WEIGHTS) == pytest.approx(stage_score(whole, WEIGHTS))


def test_the_item_model_is_learned_from_offspring_differences_shrunk_toward_the_diagonal():
    families = [family([offspring("a", [1.0, 0.0, 1.0]), offspring("b", [0.0, 1.0, 1.0])], [0.0, 0.0, 1.0]),
                family([offspring("c", [1.0, 1.0, 0.0]), offspring("d", [1.0, 0.0, 0.0])], [1.0, 0.0, 0.0], generation=1)]
    d = np.array([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 0.0]])
    assert np.array_equal(np.concatenate([differences(f) for f in families]), d)
    raw, diagonal = ItemModel.learned(families, 0.0), ItemModel.learned(families, 1.0)
    assert np.allclose(raw.mean, d.mean(axis=0)) and np.allclose(raw.covariance, np.cov(d, rowvar=False))
    assert np.allclose(diagonal.covariance, np.diag(np.diag(np.cov(d, rowvar=False))))
    assert np.allclose(ItemModel.learned(families, 0.5).covariance, (raw.covariance + diagonal.covariance) / 2)


def test_ranking_by_the_estimate_follows_the_items_the_stage_did_not_see():
    # on the earlier family, what an offspring gains on item 0 it loses twice over on item 1
    earlier = family([offspring(k, v) for k, v in (("p", [1.0, -2.0]), ("q", [-1.0, 2.0]), ("r", [0.5, -1.0]))], [0.0, 0.0])
    # "a" leads on item 0, the only item the stages see, but is behind in full; "b" is the member's equal
    judged = family([offspring("a", [1.0, -2.0]), offspring("b", [0.0, 0.0])], [0.0, 0.0], generation=1)
    stages, rule = [{"t": [0]}, {"t": [0]}], DrawRule("top 1 > 1", (Cut(cap=1), Cut(cap=1)))
    model = ItemModel.learned([earlier], 0.0)
    assert model.estimate(restricted_to(judged["offspring"][0], [0]), judged["member"]["examples"], WEIGHTS) == pytest.approx(-0.5)
    by_score = replay([judged], rule, lambda f: stages, WEIGHTS, 0.9, COSTS)
    by_estimate = replay([judged], rule, lambda f: stages, WEIGHTS, 0.9, COSTS,
                         rank_of=lambda f: lambda held: model.estimate(held, f["member"]["examples"], WEIGHTS))
    assert by_score["false"] == 1 and by_estimate["false"] == 0 and by_estimate["gain"] == 0.0
    # over seeded draws, learned on the generations before: only the later family is judged, and
    # whichever item a draw shows, the estimate goes to "b"
    estimated, scored = on_estimates([earlier, judged], rule, True, 0.0, 4, FRACTIONS, 1, WEIGHTS, 0.9, COSTS)
    assert estimated["stopped"] == scored["stopped"] == 1 and estimated["false"] == 0
    assert estimated["x"] == scored["x"]


def restricted_to(child: dict, items: list[int]) -> dict:
    e = child["examples"]["t"]
    return {"t": {key: [e[key][i] for i in items] for key in ("index", "value", "weight")}}


def test_a_fresh_dev_set_is_a_seeded_bootstrap_draw_of_each_task():
    ids = {"a": [3, 5, 7, 9], "b": [10 * k for k in range(20)]}
    draw = fresh_dev_set(ids, seed=4)
    assert draw == fresh_dev_set(ids, seed=4) and draw != fresh_dev_set(ids, seed=5)
    for t, v in ids.items():  # n draws with replacement from n items, keyed by item id
        assert sum(draw[t].values()) == len(v) and set(draw[t]) <= set(v) and all(c >= 1 for c in draw[t].values())
    assert len(draw["b"]) < 20  # with replacement: 20 draws from 20 miss some (all hit: p = 20! / 20^20)


def test_a_resampled_score_counts_each_item_as_often_as_it_was_drawn():
    ex = {"a": {"index": [0, 1, 2], "value": [-6.0, -2.0, -1.0], "weight": [4.0, 4.0, 1.0]},
          "b": {"index": [0, 1], "value": [1.0, 0.0], "weight": [1.0, 1.0]}}
    draw = {"a": {0: 2, 2: 1}, "b": {1: 2}}  # item a/1 and b/0 not drawn
    assert resampled_score(ex, draw, {"a": 1.0, "b": 1.0}) == pytest.approx(0.5 * (2 * -6.0 - 1.0) / (2 * 4.0 + 1.0) + 0.5 * 0.0)
    whole = {"a": {0: 1, 1: 1, 2: 1}, "b": {0: 1, 1: 1}}
    assert resampled_score(ex, whole, {"a": 1.0, "b": 1.0}) == pytest.approx(stage_score(ex, {"a": 1.0, "b": 1.0}))


def test_the_floor_counts_near_ties_a_second_dev_set_reverses_and_never_a_clear_lead():
    n = 12
    # "a" leads "b" on every item: every draw of the dev set chooses "a", the floor is zero
    clear = family([offspring("a", [1.0] * n), offspring("b", [0.0] * n)], [0.0] * n)
    assert on_fresh_dev_sets([clear], 16, WEIGHTS, 0.9)["false_rate"] == 0.0
    # "a" leads by one item of twelve: a draw missing it, or drawing b's items more, reverses the pair
    near = family([offspring("a", [1.0] * 7 + [0.0] * 5), offspring("b", [1.0] * 6 + [0.0] * 6)], [0.0] * n)
    floor = on_fresh_dev_sets([near], 64, WEIGHTS, 0.9)
    assert floor["false_low"] == 0.0 < floor["false_rate"] < 1.0 == floor["false_high"]  # one stopped sibling a draw
    assert floor["resolved_rate"] == 0.0  # one item of twelve is within the full dev set's paired margin
    # each draw's rate is that of its choice: a false stop exactly when the draw chose "b"
    chosen_b = [max(near["offspring"], key=lambda o: (resampled_score(o["examples"], fresh_dev_set(item_ids(near), s), WEIGHTS),
                                                      o["id"]))["id"] == "b" for s in range(64)]
    assert floor["false_rate"] == pytest.approx(np.mean(chosen_b))
