"""benchmarks/sibling_order.py: its deviations and subset agreement on hand-made rows."""
import numpy as np
import pytest

from benchmarks.sibling_order import deviations, subset_agreement


def row(values: list[float], weights: list[float]) -> dict:
    examples = {"index": list(range(len(values))), "value": values, "weight": weights}
    return {"metrics": {"t": {"examples": examples}}}


def test_raw_deviation_is_the_task_score_minus_the_siblings_mean():
    weights = [1.0, 2.0, 1.0, 4.0]
    family = {"a": row([1.0, 2.0, 0.0, 4.0], weights), "b": row([0.0, 1.0, 1.0, 2.0], weights)}
    raw, _, _ = deviations(family)
    score_a, score_b = 7.0 / 8.0, 4.0 / 8.0  # sum v / sum w, as search.fitness.staged scores a task
    assert raw["a"] == pytest.approx(score_a - (score_a + score_b) / 2)
    assert raw["b"] == pytest.approx(score_b - (score_a + score_b) / 2)


def test_reliability_is_high_when_siblings_differ_on_every_item_and_low_when_by_one():
    ones = [1.0] * 8
    consistent = {"a": row([1.0] * 8, ones), "b": row([0.0] * 8, ones)}
    _, _, r = deviations(consistent)
    assert r["t"] == pytest.approx(1.0)  # the same difference on every item: no item-sampling noise
    one_item = {"a": row([1.0] + [0.0] * 7, ones), "b": row([0.0] * 8, ones)}
    _, weighted, r = deviations(one_item)
    assert r["t"] == 0.0  # one item of eight explains the whole gap
    assert weighted["a"] == weighted["b"] == 0.0


def test_subset_agreement_with_every_item_orders_every_pair():
    rng = np.random.default_rng(0)
    candidates = []
    for quality in (0.2, 0.5, 0.51, 0.9):
        values = (rng.random(16) < quality).astype(float)
        weights = np.ones(16)
        candidates.append((values.mean(), {"t": (values, weights)}))
    all_pairs, close_pairs, pairs, close = subset_agreement(candidates, {"t": 16}, draws=5, seed=0)
    assert all_pairs == 1.0 and pairs == sum(1 for a in candidates for b in candidates if a[0] < b[0])
    few, _, _, _ = subset_agreement(candidates, {"t": 2}, draws=200, seed=0)
    assert 0.5 < few < 1.0  # two items order most pairs, not all
