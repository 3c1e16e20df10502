"""benchmarks/audit_stops.py: whether the full dev sets resolve a false stop (issue 14)."""
import pytest

from benchmarks.audit_stops import resolved_by_full_dev


def test_a_false_stop_is_resolved_only_when_the_full_dev_items_show_it_ahead():
    def examples(values):
        return {"t": {"index": list(range(len(values))), "value": values, "weight": [1.0] * len(values)}}

    holder = examples([1.0] * 20 + [0.0] * 44)
    clearly_ahead = examples([1.0] * 40 + [0.0] * 24)  # 20 more right answers of 64, none fewer
    by_one = examples([1.0] * 21 + [0.0] * 43)
    test = resolved_by_full_dev(clearly_ahead, holder, {"t": 1.0}, 0.9)
    assert test["diff"] == pytest.approx(20 / 64) and test["ahead_beyond_margin"]
    test = resolved_by_full_dev(by_one, holder, {"t": 1.0}, 0.9)
    assert test["diff"] == pytest.approx(1 / 64) and not test["ahead_beyond_margin"]
