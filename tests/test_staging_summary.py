"""The staged summary's false-rejection count, on a journal built by hand (issue 14).

A merge run with several offspring per member replaces a member by its best offspring only, so
a stopped offspring was falsely rejected when full scoring would have selected it: it beats
its member *and* every sibling that went on. One that beats its member but not a sibling that
went on is counted apart (`beat_rival_only`).
"""
from __future__ import annotations

import pytest

from search.results.staging import format_staged, selection_bars, selection_holders, staged_summary
from search.run.candidate import Candidate, Evaluation

LAST = 1  # two stages: 0 (subset) and 1 (every item)


def row(cid: str, stage: int, status: str, score: float, generation: int = 1, target: str = "m0", **extra) -> dict:
    candidate = Candidate.copy_of("base", cid, generation=generation, target=target)
    return Evaluation(candidate=candidate, split="dev", status=status, score=score, stage=stage,
                      timing={"score_s": 1.0 if stage == 0 else 10.0, "materialize_s": 0.5}, extra=extra).to_json()


def journal() -> list[dict]:
    """Members m0 (full -0.60) and m1 (full -0.70); generation 1 gives each three offspring."""
    rows = [Evaluation(candidate=Candidate.copy_of("base", m), split="dev", status="ok", score=s).to_json()
            for m, s in (("m0", -0.60), ("m1", -0.70))]
    # family of m0: a went on (full -0.55); b stopped by the paired test, audited: beats m0, not a;
    # c a sibling stop (never audited in a merge run)
    rows += [row("a", 0, "ok", -0.50), row("a", 1, "ok", -0.55),
             row("b", 0, "stopped", -0.90, rival="m0", rule="margin"), row("b", 1, "ok", -0.58),
             row("c", 0, "stopped", -0.52, rival="m0", rule="sibling")]
    # family of m1: d went on (full -0.72, not selected); e stopped, audited: beats m1 and d
    rows += [row("d", 0, "ok", -0.60, target="m1"), row("d", 1, "ok", -0.72, target="m1"),
             row("e", 0, "stopped", -0.95, target="m1", rival="m1", rule="margin"),
             row("e", 1, "ok", -0.65, target="m1")]
    # generation 2, m0 again: f stopped and audited, its only sibling g stopped too: the bar is m0
    rows += [row("f", 0, "stopped", -0.80, generation=2, rival="m0", rule="margin"),
             row("f", 1, "ok", -0.61, generation=2),
             row("g", 0, "stopped", -0.85, generation=2, rival="m0", rule="margin")]
    return rows


def test_selection_bars_by_hand():
    rows = [Evaluation.from_json(r) for r in journal()]
    staged = [e for e in rows if e.stage is not None]
    stops = {e.id: e for e in staged if e.status == "stopped"}
    full = {e.id: e.score for e in rows if e.status == "ok" and e.stage in (None, LAST)}
    assert selection_bars(stops, full, staged, merge=True) == {"b": -0.55, "e": -0.70, "f": -0.60}
    # compress / joint: the rival alone (siblings there are judged on the front, not replaced)
    assert selection_bars(stops, full, staged, merge=False) == {"b": -0.60, "e": -0.70, "f": -0.60}
    # who set each bar: b had to beat the sibling a that went on, e its member (d scored lower)
    assert selection_holders(stops, full, staged, merge=True) == {"b": "a", "e": "m1", "f": "m0"}


def test_merge_summary_counts_a_stop_beaten_by_a_sibling_apart():
    summary = staged_summary(journal(), LAST, merge=True)
    assert summary["audited"] == summary["audited_margin_stops"] == 3
    # e would have been selected (beats m1 and d); b beat m0 but not a; f lost to m0
    assert summary["false_rejection_rate"] == pytest.approx(1 / 3)
    assert summary["beat_rival_only"] == 1
    assert any("1 more beat their member" in line for line in format_staged(summary))


def test_against_the_rival_alone_both_count():
    summary = staged_summary(journal(), LAST, merge=False)
    assert summary["false_rejection_rate"] == pytest.approx(2 / 3)
    assert summary["beat_rival_only"] == 0
    assert not any("more beat their member" in line for line in format_staged(summary))


def test_a_full_evaluation_that_joined_its_screen_costs_both_parts():
    """Time saved: what full scoring pays for a promoted candidate is its materialising and the
    scoring of every item, which a last stage that scored only what its screen lacked
    (`extends`) paid in two parts."""
    assert staged_summary(journal(), LAST, merge=True)["saved_s"] == pytest.approx(7 * 11.0 - 24.0)
    joined = row("a", 1, "ok", -0.55, extends=0)
    joined["timing"]["score_s"] = 7.5  # the items the first stage (1.0 s) did not hold
    rows = [r for r in journal() if (r["id"], r.get("stage")) != ("a", 1)] + [joined]
    summary = staged_summary(rows, LAST, merge=True)
    # a: 1.0 s made + 7.5 + 1.0 s scored; d as before, 11.0; paid 1.5 + 8.0 (a) + 1.5 + 10.5 (d)
    assert summary["scoring_s"] == pytest.approx(21.5) and summary["saved_s"] == pytest.approx(7 * (9.5 + 11.0) / 2 - 21.5, abs=0.05)  # rounded to 0.1 s


def with_examples(r: dict, values: list[float]) -> dict:
    """A journal row carrying per-example scores for one task `t` (accuracy-like, weight 1)."""
    examples = {"index": list(range(len(values))), "value": values, "weight": [1.0] * len(values)}
    return {**r, "metrics": {"t": {"score": sum(values) / len(values), "examples": examples}}}


def journal_with_examples(stopped_values: list[float]) -> list[dict]:
    """journal() with per-example full scores for e (the one false rejection) and m1, the
    member whose full score set e's bar; m1 scores 1 on half of 40 items."""
    member = [1.0] * 20 + [0.0] * 20
    rows = []
    for r in journal():
        if r["id"] == "m1":
            r = with_examples(r, member)
        elif r["id"] == "e" and r["status"] == "ok":
            r = with_examples(r, stopped_values)
        rows.append(r)
    return rows


def test_a_false_rejection_the_full_dev_sets_resolve_is_counted_with_the_rate_bound():
    clearly_ahead = [1.0] * 36 + [0.0] * 4  # 0.9 against 0.5, on 40 items
    summary = staged_summary(journal_with_examples(clearly_ahead), LAST, merge=True, task_weights={"t": 1.0}, confidence=0.9)
    assert summary["false_rejections"] == 1 and summary["false_beyond_resolution"] == 1
    # one of three audited stops was false: Clopper-Pearson at 95%, 1 - 0.05^(1/3) for 0 of 3, more for 1 of 3
    assert 1 / 3 < summary["false_rejection_upper_95"] < 1.0
    lines = format_staged(summary)
    assert any("(at most" in line for line in lines)
    assert any("1 of the 1 false ahead by more than the full dev sets' paired margin" in line for line in lines)


def test_a_false_rejection_within_the_dev_sets_noise_is_not_resolved():
    one_more = [1.0] * 21 + [0.0] * 19  # ahead by a single item of 40
    summary = staged_summary(journal_with_examples(one_more), LAST, merge=True, task_weights={"t": 1.0}, confidence=0.9)
    assert summary["false_rejections"] == 1 and summary["false_beyond_resolution"] == 0
    assert any("0 of the 1 false" in line for line in format_staged(summary))


def test_without_per_example_scores_the_resolution_is_unknown_not_zero():
    summary = staged_summary(journal(), LAST, merge=True, task_weights={"t": 1.0}, confidence=0.9)
    assert summary["false_rejections"] == 1 and summary["false_beyond_resolution"] is None
    assert not any("paired margin" in line for line in format_staged(summary))
