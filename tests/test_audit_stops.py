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


def test_sibling_audits_are_counted_by_the_stage_they_stopped_after():
    from benchmarks.audit_stops import by_stage, sibling_cell

    audits = [{"stage": 0, "full_score": -0.60, "selection_bar": -0.62},  # false: beat what went on
              {"stage": 0, "full_score": -0.65, "selection_bar": -0.62},
              {"stage": 1, "full_score": -0.61, "selection_bar": -0.61}]  # a tie counts as false
    assert by_stage(audits) == {0: [2, 1], 1: [1, 1]}
    row = {"siblings_audited": 3, "sibling_stops": 30, "sibling_false_rejections": 2, "sibling_false_upper_95": 0.9,
           "sibling_false_resolved": None, "sibling_false_by_stage": by_stage(audits)}
    assert sibling_cell(row).endswith("by stage 1: 1 of 2, 2: 1 of 1")
