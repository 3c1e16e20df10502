"""search/fitness/items.py and `fitness.items`: stage items chosen where siblings disagree."""
import json

import pytest

from search.config import load_config
from search.errors import ConfigError
from search.fitness.items import checked_order, disagreement, item_order, ordered_stage_items, read_item_order
from search.fitness.staged import stage_sizes
from search.run.stages import plan_stages


def record(values: list[float], ids: list[int] | None = None, weights: list[float] | None = None) -> dict:
    ids = list(range(len(values))) if ids is None else ids
    return {"t": {"index": ids, "value": values, "weight": weights or [1.0] * len(values)}}


def test_disagreement_is_the_variance_of_item_scores_about_each_candidates_own_mean():
    # item 0: every candidate wrong; item 1: every one right; items 2, 3: they split. The third
    # candidate is better by a constant everywhere, which orders nobody on any single item.
    rows = [[0.0, 1.0, 1.0, 0.0], [0.0, 1.0, 0.0, 1.0], [0.5, 1.5, 1.5, 0.5]]
    spread = disagreement([record(r) for r in rows], "t")
    # means 0.5, 0.5, 1.0: centred, item 0 is -0.5 for all three and item 1 +0.5, no spread
    assert spread[0] == pytest.approx(0.0) and spread[1] == pytest.approx(0.0)
    # item 2 centred: 0.5, -0.5, 0.5 -> mean 1/6, variance 1/4 - 1/36 = 2/9; item 3 mirrors it
    assert spread[2] == pytest.approx(2 / 9) and spread[3] == pytest.approx(2 / 9)


def test_disagreement_reads_a_perplexity_item_per_token():
    # values are summed log-likelihoods over `weight` tokens: the item score is their ratio
    a = record([-20.0, -10.0], weights=[10.0, 10.0])  # -2, -1 per token: centred -0.5, +0.5
    b = record([-10.0, -10.0], weights=[10.0, 10.0])  # -1, -1: centred 0, 0
    spread = disagreement([a, b], "t")
    assert spread[0] == pytest.approx(0.0625) and spread[1] == pytest.approx(0.0625)  # var(-0.5, 0), var(0.5, 0)


def test_the_order_lists_positions_most_disputed_first_and_unscored_items_last():
    ids = [10, 20, 30, 40, 50]
    rows = [record([1.0, 0.0, 1.0, 0.0], ids[:4]), record([1.0, 1.0, 0.0, 0.0], ids[:4]), record([1.0, 0.0, 0.0, 1.0], ids[:4])]
    order = item_order(rows, {"t": ids})["t"]
    assert order[-1] == 4  # id 50: scored by nobody
    assert order[0] in (1, 2, 3) and 0 in order[2:4]  # id 10: every candidate right, the least disputed scored item


def test_stages_take_the_orders_first_items_nested_with_every_item_last():
    order = [5, 3, 7, 1, 0, 2, 4, 6]
    stages = ordered_stage_items(order, 8, [0.25, 0.5, 1.0], min_items=1)
    assert stages == [[3, 5], [1, 3, 5, 7], list(range(8))]
    with pytest.raises(ValueError, match="item position 9 but the task has 8 items"):
        ordered_stage_items([9, 1, 2, 3], 8, [0.25, 0.5, 1.0])
    with pytest.raises(ValueError, match="3 item positions, but a stage scores 4"):
        ordered_stage_items([0, 1, 2], 8, [0.25, 0.5, 1.0])


@pytest.mark.parametrize("data, message", [
    ([1, 2], "must map each dev task"),
    ({"t": []}, "non-empty list"),
    ({"t": [1, "a"]}, "must be integers"),
    ({"t": [1, 1]}, "distinct and >= 0"),
    ({"t": [-1]}, "distinct and >= 0"),
])
def test_malformed_orders_are_refused_with_what_is_wrong(data, message):
    with pytest.raises(ValueError, match=message):
        checked_order(data)


def test_an_order_file_is_read_relative_to_the_config(tmp_path):
    (tmp_path / "order.json").write_text(json.dumps({"t": [2, 0, 1]}))
    assert read_item_order("order.json", tmp_path) == {"t": [2, 0, 1]}
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(ValueError, match="not a JSON file"):
        read_item_order(tmp_path / "bad.json")
    with pytest.raises(ValueError, match="no such file"):
        read_item_order("missing.json", tmp_path)


TINY = """
name: tiny-items
seed: 0
parents:
  base: {name: base, source: tiny-llama}
  experts:
    - {name: a, source: tiny-llama}
    - {name: b, source: tiny-llama}
tasks:
  - {name: arith, kind: generate, dev: "arithmetic:dev", test: "arithmetic:test", options: {max_new_tokens: 4}}
  - {name: compare, kind: multiple_choice, dev: "compare:dev", test: "compare:test"}
fitness: {stages: [0.125, 1.0], items: ITEMS}
"""


def write_config(tmp_path, items: str) -> str:
    path = tmp_path / "run.yaml"
    path.write_text(TINY.replace("ITEMS", items))
    return str(path)


def test_a_config_reads_its_order_file_into_itself(tmp_path):
    (tmp_path / "order.json").write_text(json.dumps({"arith": list(range(64))[::-1], "compare": list(range(64))}))
    config = load_config(write_config(tmp_path, "order.json"))
    assert config.fitness.items["arith"][:3] == [63, 62, 61]  # the run's config.yaml carries the order
    inline = load_config(write_config(tmp_path, '{arith: [3, 1, 2, 0], compare: [0, 1, 2, 3]}'))
    assert inline.fitness.items == {"arith": [3, 1, 2, 0], "compare": [0, 1, 2, 3]}


@pytest.mark.parametrize("items, message", [
    ("missing.json", "fitness.items: no such file 'missing.json'"),
    ('{arith: [0, 1, 2, 3]}', "no item order for task 'compare'"),
    ('{arith: [0, 1], compare: [0, 1], other: [0]}', "'other' is not a task of this run"),
    ('{arith: [0, 0], compare: [0, 1]}', "distinct and >= 0"),
])
def test_a_bad_order_is_one_config_error_naming_fitness_items(tmp_path, items, message):
    with pytest.raises(ConfigError, match=message) as caught:
        load_config(write_config(tmp_path, items))
    assert "\n" not in str(caught.value) and "fitness.items" in str(caught.value)


def test_the_plan_takes_the_same_chosen_items_every_generation_and_refuses_one_that_does_not_fit():
    order = {"a": [7, 6, 5, 4, 3, 2, 1, 0], "b": [0, 2, 4, 6, 8, 1, 3, 5, 7, 9]}
    plan = plan_stages([0.25, 0.5, 1.0], {"a": 8, "b": 10}, seed=0, min_items=1, proxy=False, resample=True, item_order=order)
    assert not plan.resample  # chosen items: no fresh draws
    first, second, last = plan.indices(0)
    assert first == {"a": [6, 7], "b": [0, 2, 4]} and second == {"a": [4, 5, 6, 7], "b": [0, 2, 4, 6, 8]} and last is None
    assert plan.indices(5) == plan.indices(0)
    assert [len(first["b"]), len(second["b"])] == stage_sizes(10, [0.25, 0.5, 1.0])[:2]
    with pytest.raises(ConfigError, match="fitness.items: task 'a': item position 7 but the task has 6 items"):
        plan_stages([0.25, 0.5, 1.0], {"a": 6, "b": 10}, seed=0, min_items=1, proxy=False, item_order=order)
