"""What staged fitness did in a run, read back from the journal: stage counts, scoring time
saved, and the audit's false-rejection rate and rank agreement.

Time saved is an estimate from the run's own timings: a candidate scored in full costs about
what a promoted candidate paid to be made (materialising its weights and applying its plan, in
whichever stage did it) plus its last stage's scoring, averaged over the run's promoted
candidates (F); a staged candidate cost what its stages cost (its audit excepted), so
saved = sum over judged candidates of (F - paid), negative when the earlier stages cost more
than the full scorings they spared.
A false rejection is an audited stopped candidate whose full dev score is at least its rival's:
for a stop of the paired test, the member it challenged (merge) or the front member that
stopped it (compress / joint; that member costs no more by construction); for a compress /
joint sibling stop, the sibling that went on in its place. A merge run's sibling stops are
never audited: they were not rejected against the member.
"""
from __future__ import annotations

import math
from statistics import mean

from search.fitness.staged import false_rejection_rate, spearman
from search.run.candidate import Evaluation

STOPPED = "stopped"


def last_stage(config) -> int | None:
    """The index of a run's full-scoring stage; None when its fitness is not staged."""
    fitness = config.fitness
    return len(fitness.stages) - 1 + (fitness.proxy is not None) if fitness.staged else None


def full_dev_rows(rows: list[dict], last: int | None) -> list[dict]:
    """Dev rows that score a candidate on every item: unstaged rows and last-stage rows (a
    staged run's earlier stages and its stops are partial)."""
    return [r for r in rows if r.get("split") == "dev" and r["status"] != STOPPED and r.get("stage") in (None, last)]


def staged_summary(rows: list[dict], last: int | None) -> dict | None:
    """Counts and audit figures of a staged run's dev evaluations; None for an unstaged run."""
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
        return made + full[cid].timing.get("score_s", 0.0)

    promoted = [c for c in judged if c not in stops and c in full]
    full_cost = mean(unstaged_cost(c) for c in promoted) if promoted else math.nan
    paid = sum(cost(e) for (cid, k), e in by_stage.items() if not (cid in stops and k == last))
    audited = [c for c in stops if c in full and stops[c].extra.get("rival") in full]
    # rejections that can be false: the paired test's, and compress / joint sibling stops (a merge
    # run never audits its sibling stops)
    audits = [(stops[c].score, full[c].score, full[stops[c].extra["rival"]].score)
              for c in audited if stops[c].extra.get("rule", "margin") in ("margin", "sibling")]
    first = {cid: e.score for (cid, k), e in by_stage.items() if k == 0}
    both = [c for c in judged if c in first and c in full]
    return {
        "judged": len(judged),
        "stopped": len(stops),
        "fully_scored": len(promoted),
        "stopped_per_stage": [sum(1 for s in stops.values() if s.stage == k) for k in range(last)],
        "audited": len(audited),
        "audited_margin_stops": len(audits),
        "false_rejection_rate": false_rejection_rate(audits) if audits else None,
        "spearman_audited": spearman([stops[c].score for c in audited], [full[c].score for c in audited]) if len(audited) > 1 else None,
        "spearman_first_vs_full": spearman([first[c] for c in both], [full[c].score for c in both]) if len(both) > 1 else None,
        "scoring_s": round(paid, 1),
        "saved_s": round(len(judged) * full_cost - paid, 1) if promoted else None,
    }


def format_staged(summary: dict) -> list[str]:
    """Status lines for a staged run."""
    lines = [f"staged       {summary['judged']} judged, {summary['fully_scored']} scored in full, "
             f"{summary['stopped']} stopped (per stage {summary['stopped_per_stage']})"]
    if summary["saved_s"] is not None:
        saved = summary["saved_s"]
        versus = f"about {saved:.0f} s saved against" if saved >= 0 else f"about {-saved:.0f} s more than"
        lines.append(f"  scoring    {summary['scoring_s']:.0f} s spent, {versus} full scoring")
    if summary["audited"]:
        rate = summary["false_rejection_rate"]
        shown = "-" if rate is None else f"{rate:.1%} of {summary['audited_margin_stops']} that could be false"
        lines.append(f"  audit      {summary['audited']} stopped candidates scored in full: false-rejection rate {shown}")
    return lines


__all__ = ["staged_summary", "format_staged", "full_dev_rows", "last_stage"]
