"""What staged fitness did in a run, read back from the journal: stage counts, scoring time
saved, and the audit's false-rejection rate and rank agreement.

Time saved is an estimate from the run's own timings: a candidate scored in full costs about
what a promoted candidate paid to be made (materialising its weights and applying its plan, in
whichever stage did it) plus its last stage's scoring (with the stages that scoring joined, when
it scored only the items they lacked), averaged over the run's promoted
candidates (F); a staged candidate cost what its stages cost (its audit excepted), so
saved = sum over judged candidates of (F - paid), negative when the earlier stages cost more
than the full scorings they spared.
A false rejection is an audited stopped candidate that full scoring would have selected: its
full dev score is at least the bar it had to clear. For a stop of the paired test the bar is
its rival's full score — the member it challenged (merge) or the front member that stopped it
(compress / joint; that member costs no more by construction); for a compress / joint sibling
stop, the sibling that went on in its place. A merge run audits its sibling stops only with
`fitness.audit_siblings: true` (they are most stops, and each audit is a full evaluation);
`benchmarks/audit_stops.py --siblings` scores a sample of them after a run.
With several offspring per member (merge, (1 + lambda)), a member is replaced by at most one
of them, the best; so the bar of a merge stop is the best full score among its rival and the
siblings (same member, same generation) that went on and were scored in full. A stop
that beat the member in full but not a sibling that went on would not have been selected by
full scoring either; such stops are counted apart (`beat_rival_only`), so the status shows
both the rate that matters for selection and the paired test's own error against the member.

The rate comes with its one-sided 95% Clopper-Pearson bound (a run audits few stops), and the
false rejections are split by whether the full dev sets themselves resolve them
(`beyond_resolution`): the paired test of `search.fitness.staged.compare`, at the run's
confidence, on every dev item, of the stopped candidate against the one that set its bar. A
false rejection inside that margin is one that full scoring would have made or not by item noise
(most are: near-equal siblings, `benchmarks/results/family_census.md`); the indifference zone
of ranking-and-selection procedures, drawn where the run's own data draws it.
"""
from __future__ import annotations

import math
from statistics import mean
from typing import Callable, Mapping

from search.fitness.staged import compare, false_rejection_rate, rate_upper_bound, spearman
from search.run.candidate import Evaluation

STOPPED = "stopped"


def last_stage(config) -> int | None:
    """The index of a run's full-scoring stage; None when its fitness is not staged."""
    fitness = config.fitness
    return fitness.stages_before_last if fitness.staged else None


def whole_scoring_s(row: Evaluation, stage_row: Callable[[int], Evaluation | None]) -> float:
    """The scoring seconds of `row`'s items: its own, and when it scored only the items its
    stage added (`extends`, `search.run.stages.StagePlan.extends`) those of the stages it
    joined (`stage_row(k)`: the candidate's row of stage k)."""
    seconds, joined = row.timing.get("score_s", 0.0), row.extra.get("extends")
    while joined is not None and (earlier := stage_row(joined)) is not None:
        seconds += earlier.timing.get("score_s", 0.0)
        joined = earlier.extra.get("extends")
    return seconds


def full_dev_rows(rows: list[dict], last: int | None) -> list[dict]:
    """Dev rows that score a candidate on every item: unstaged rows and last-stage rows (a
    staged run's earlier stages and its stops are partial)."""
    return [r for r in rows if r.get("split") == "dev" and r["status"] != STOPPED and r.get("stage") in (None, last)]


def selection_holders(stops: Mapping[str, Evaluation], full: Mapping[str, float],
                      staged: list[Evaluation], merge: bool) -> dict[str, str]:
    """{stopped candidate id: the candidate whose full dev score it had to reach to be selected},
    for the stops scored in full whose rival was too (module docstring): its rival, and in a
    merge run the best of the rival and every sibling (same generation, same member) that went on
    and was scored in full. `full`: full dev scores by candidate id; `staged`: the run's staged rows."""
    families: dict[tuple, set[str]] = {}
    for e in staged:
        families.setdefault((e.candidate.generation, e.candidate.target), set()).add(e.id)
    stopped = {e.id for e in staged if e.status == STOPPED}
    holders = {}
    for cid, stop in stops.items():
        rival = stop.extra.get("rival")
        if cid not in full or rival not in full:
            continue
        holder = rival
        if merge:  # a margin stop or a sibling stop: either had to beat the sibling that went on
            went_on = families[(stop.candidate.generation, stop.candidate.target)] - stopped
            for s in sorted(went_on):
                if s in full and full[s] > full[holder]:
                    holder = s
        holders[cid] = holder
    return holders


def selection_bars(stops: Mapping[str, Evaluation], full: Mapping[str, float],
                   staged: list[Evaluation], merge: bool) -> dict[str, float]:
    """{stopped candidate id: the full dev score it had to reach to be selected}: that of its
    `selection_holders` entry."""
    return {cid: full[holder] for cid, holder in selection_holders(stops, full, staged, merge).items()}


def beyond_resolution(stopped: Evaluation, holder: Evaluation, task_weights: Mapping[str, float],
                      confidence: float) -> bool | None:
    """Whether a false rejection's lead over the candidate that set its bar is one the full dev
    sets resolve: the stopped candidate ahead by more than the paired margin at `confidence` on
    every item both were scored on. None when either full row lacks per-example scores."""
    weighted = [t for t, w in task_weights.items() if w > 0]
    mine, theirs = ({t: e.metrics.get(t, {}).get("examples") for t in weighted} for e in (stopped, holder))
    if not all(mine.values()) or not all(theirs.values()):
        return None
    return not compare(theirs, mine, task_weights, confidence).can_still_win


def staged_summary(rows: list[dict], last: int | None, merge: bool = False,
                   task_weights: Mapping[str, float] | None = None, confidence: float | None = None) -> dict | None:
    """Counts and audit figures of a staged run's dev evaluations; None for an unstaged run.
    `merge`: a merge run (one objective), whose margin stops also had to beat the siblings
    that went on (`selection_bars`). With the run's `task_weights` and `confidence`, the false
    rejections the full dev sets resolve are counted too (`beyond_resolution`)."""
    if last is None:
        return None
    dev = [Evaluation.from_json(r) for r in rows if r.get("split") == "dev"]
    staged = [e for e in dev if e.stage is not None]
    stops = {e.id: e for e in staged if e.status == STOPPED}
    by_stage: dict[tuple[str, int], Evaluation] = {(e.id, e.stage): e for e in staged if e.status != STOPPED}
    full = {e.id: e for e in dev if e.status == "ok" and e.stage in (None, last)}
    judged = sorted({e.id for e in staged})

    def cost(e: Evaluation) -> float:
        return e.timing.get("score_s", 0.0) + e.timing.get("materialize_s", 0.0)

    def unstaged_cost(cid: str) -> float:  # what a full-scoring run pays for this candidate
        made = sum(e.timing.get("materialize_s", 0.0) for (c, _), e in by_stage.items() if c == cid)
        # less the screening items it scored apart for later comparisons (a staged run's own cost)
        scored = whole_scoring_s(full[cid], lambda k: by_stage.get((cid, k)))
        return made + scored - full[cid].timing.get("screen_s", 0.0)

    promoted = [c for c in judged if c not in stops and c in full]
    full_cost = mean(unstaged_cost(c) for c in promoted) if promoted else math.nan
    paid = sum(cost(e) for (cid, k), e in by_stage.items() if not (cid in stops and k == last))
    holders = selection_holders(stops, {c: e.score for c, e in full.items()}, staged, merge)
    bars = {c: full[holder].score for c, holder in holders.items()}
    audited = sorted(bars)
    # rejections that can be false: the paired test's, and compress / joint sibling stops (a merge
    # run never audits its sibling stops)
    can_be_false = [c for c in audited if stops[c].extra.get("rule", "margin") in ("margin", "sibling")]
    audits = [(stops[c].score, full[c].score, bars[c]) for c in can_be_false]
    beat_rival_only = sum(full[stops[c].extra["rival"]].score <= full[c].score < bars[c] for c in can_be_false)
    false = [c for c in can_be_false if full[c].score >= bars[c]]
    resolved = None
    if task_weights is not None and confidence is not None:
        verdicts = [beyond_resolution(full[c], full[holders[c]], task_weights, confidence) for c in false]
        resolved = None if None in verdicts else sum(verdicts)
    first = {cid: e.score for (cid, k), e in by_stage.items() if k == 0}
    both = [c for c in judged if c in first and c in full]
    screened = sorted({e.extra["autocast"] for e in staged if e.extra.get("autocast")})
    return {
        "judged": len(judged),
        "screen_dtype": ", ".join(screened) or None,  # the screening stages' autocast (`fitness.screen_dtype`)
        "stopped": len(stops),
        "fully_scored": len(promoted),
        "stopped_per_stage": [sum(1 for s in stops.values() if s.stage == k) for k in range(last)],
        "audited": len(audited),
        "audited_margin_stops": len(audits),
        "false_rejection_rate": false_rejection_rate(audits) if audits else None,
        "false_rejections": len(false),
        "false_rejection_upper_95": rate_upper_bound(len(false), len(audits)) if audits else None,
        "false_beyond_resolution": resolved,
        "beat_rival_only": beat_rival_only,
        "spearman_audited": spearman([stops[c].score for c in audited], [full[c].score for c in audited]) if len(audited) > 1 else None,
        "spearman_first_vs_full": spearman([first[c] for c in both], [full[c].score for c in both]) if len(both) > 1 else None,
        "scoring_s": round(paid, 1),
        "saved_s": round(len(judged) * full_cost - paid, 1) if promoted else None,
    }


def format_staged(summary: dict) -> list[str]:
    """Status lines for a staged run."""
    lines = [f"staged       {summary['judged']} judged, {summary['fully_scored']} scored in full, "
             f"{summary['stopped']} stopped (per stage {summary['stopped_per_stage']})"
             + (f", screened in {summary['screen_dtype']}" if summary.get("screen_dtype") else "")]
    if summary["saved_s"] is not None:
        saved = summary["saved_s"]
        versus = f"about {saved:.0f} s saved against" if saved >= 0 else f"about {-saved:.0f} s more than"
        lines.append(f"  scoring    {summary['scoring_s']:.0f} s spent, {versus} full scoring")
    if summary["audited"]:
        rate = summary["false_rejection_rate"]
        shown = "-" if rate is None else f"{rate:.1%} of {summary['audited_margin_stops']} that could be false"
        if rate is not None and summary.get("false_rejection_upper_95") is not None:
            shown += f" (at most {summary['false_rejection_upper_95']:.1%} at 95%)"
        lines.append(f"  audit      {summary['audited']} stopped candidates scored in full: false-rejection rate {shown}")
        if summary.get("false_rejections") and summary.get("false_beyond_resolution") is not None:
            lines.append(f"             ({summary['false_beyond_resolution']} of the {summary['false_rejections']} false "
                         f"ahead by more than the full dev sets' paired margin)")
        if summary.get("beat_rival_only"):
            lines.append(f"             ({summary['beat_rival_only']} more beat their member in full, but not a sibling that went on)")
    return lines


__all__ = ["staged_summary", "format_staged", "beyond_resolution", "full_dev_rows", "last_stage", "selection_bars", "selection_holders",
           "whole_scoring_s"]
