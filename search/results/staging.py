"""What staged fitness did in a run, read back from the journal: stage counts, scoring time
saved, and the audit's false-rejection rate and rank agreement.

Time saved is an estimate from the run's own timings: a candidate scored in full costs about
the mean scoring time of the run's last-stage evaluations (F); a staged candidate cost what its
stages cost (its audit excepted), so  saved = sum over judged candidates of (F - paid).
A false rejection is an audited stopped candidate whose full dev score is at least its rival's
(merge: the member it challenged; compress / joint: the front member that stopped it) while
costing no more.
"""
from __future__ import annotations

import math
from statistics import mean

from search.fitness.staged import false_rejection_rate, spearman
from search.run.candidate import Evaluation

STOPPED = "stopped"


def full_dev_rows(rows: list[dict]) -> list[dict]:
    """Dev rows that score a candidate on every item: unstaged rows and last-stage rows (a
    staged run's earlier stages and its stops are partial)."""
    dev = [r for r in rows if r.get("split") == "dev"]
    stages = [r["stage"] for r in dev if r.get("stage") is not None and r["status"] != STOPPED]
    last = max(stages, default=None)
    return [r for r in dev if r["status"] != STOPPED and r.get("stage") in (None, last)]


def staged_summary(rows: list[dict]) -> dict | None:
    """Counts and audit figures of a staged run's dev evaluations; None for an unstaged run."""
    dev = [Evaluation.from_json(r) for r in rows if r.get("split") == "dev"]
    staged = [e for e in dev if e.stage is not None]
    if not staged:
        return None
    last = max(e.stage for e in staged if e.status != STOPPED)
    stops = {e.id: e for e in staged if e.status == STOPPED}
    by_stage: dict[tuple[str, int], Evaluation] = {(e.id, e.stage): e for e in staged if e.status != STOPPED}
    full = {e.id: e for e in dev if e.status == "ok" and e.stage in (None, last)}
    judged = sorted({e.id for e in staged})

    def cost(e: Evaluation) -> float:
        return e.timing.get("score_s", 0.0) + e.timing.get("materialize_s", 0.0)

    promoted = [full[c] for c in judged if c not in stops and c in full]
    full_cost = mean(cost(e) for e in promoted) if promoted else math.nan
    paid = sum(cost(e) for (cid, k), e in by_stage.items() if not (cid in stops and k == last))
    audits = [(stops[c].score, full[c].score, full[stops[c].extra["rival"]].score)
              for c in stops if c in full and stops[c].extra.get("rival") in full]
    first = {cid: e.score for (cid, k), e in by_stage.items() if k == 0}
    both = [c for c in judged if c in first and c in full]
    return {
        "judged": len(judged),
        "stopped": len(stops),
        "fully_scored": len(promoted),
        "stopped_per_stage": [sum(1 for s in stops.values() if s.stage == k) for k in range(last)],
        "audited": len(audits),
        "false_rejection_rate": false_rejection_rate(audits) if audits else None,
        "spearman_audited": spearman([a[0] for a in audits], [a[1] for a in audits]) if len(audits) > 1 else None,
        "spearman_first_vs_full": spearman([first[c] for c in both], [full[c].score for c in both]) if len(both) > 1 else None,
        "scoring_s": round(paid, 1),
        "saved_s": round(len(judged) * full_cost - paid, 1) if promoted else None,
    }


def format_staged(summary: dict) -> list[str]:
    """Status lines for a staged run."""
    lines = [f"staged       {summary['judged']} judged, {summary['fully_scored']} scored in full, "
             f"{summary['stopped']} stopped (per stage {summary['stopped_per_stage']})"]
    if summary["saved_s"] is not None:
        lines.append(f"  scoring    {summary['scoring_s']:.0f} s spent, about {summary['saved_s']:.0f} s saved against full scoring")
    if summary["audited"]:
        rate = summary["false_rejection_rate"]
        lines.append(f"  audit      {summary['audited']} stopped candidates scored in full: false-rejection rate {rate:.1%}")
    return lines


__all__ = ["staged_summary", "format_staged"]
