"""Replays a staged merge run's paired-test stops under other margin rules, offline (issue 14).

`benchmarks/audit_stops.py` scores every candidate the paired test stopped in full and says which
stops were false (the candidate would have beaten its rival). This script asks what other rules
for the margin would have done with the same first-stage data: for each stop it recomputes the
paired comparison from the journalled per-example scores (the candidate's stage subset against
its rival's items) under

- `current`: `search.fitness.staged.compare` as the run used it (reproduces every stop);
- `floor`: accuracy tasks (values in {0, 1}, weight 1) get a variance of at least the one their
  discordant pairs give with half a pseudo-count each, p10 = (b + 1/2) / (n + 1) and likewise p01:
  Var(d) >= p10 + p01 - (p10 - p01)^2, so two candidates that agree on all of 3-4 items no longer
  count as exactly equal;
- `welch`: the t quantile at Welch-Satterthwaite degrees of freedom (sum of per-task variances
  squared over the sum of their squares divided by n_t - 1) instead of n - #tasks;
- `floor+welch`: both;

and counts, per rule, the false and the true stops it would still make, and, in the
member-generations with margin stops, how many members would have been replaced: under each rule
the sibling that goes on is the best first-stage score among those the margin lets on (the run's
own order), and it replaces its member when its full dev score is higher (every margin stop was
scored in full by the audit, the run's own choice by the run). With `fitness.advance: 1` a rule
that stops less costs no extra full evaluation in those families: one sibling goes on either way.

    python -m benchmarks.margin_rules benchmarks/.work/staged/merge-staged-s2 benchmarks/results/staged_audit_s2.json
"""
from __future__ import annotations

import argparse
import json
import math
from collections import defaultdict
from pathlib import Path

import numpy as np
import yaml
from scipy import stats

from search.fitness.staged import compare

RULES = ("current", "floor", "welch", "floor+welch")


def examples(row: dict) -> dict[str, dict]:
    return {task: m["examples"] for task, m in row["metrics"].items() if isinstance(m, dict) and "examples" in m}


def task_terms(candidate: dict, rival: dict, floor: bool) -> tuple[float, list[tuple[float, int]]]:
    """(aggregate difference, [(variance of task t's term, n_t - 1)]) with equal task weights."""
    share = 1.0 / len(candidate)
    diff, terms = 0.0, []
    for task in candidate:
        own = dict(zip(candidate[task]["index"], zip(candidate[task]["value"], candidate[task]["weight"])))
        other = dict(zip(rival[task]["index"], zip(rival[task]["value"], rival[task]["weight"])))
        shared = sorted(set(own) & set(other))
        n = len(shared)
        vc, wc = (np.array([own[i][k] for i in shared]) for k in (0, 1))
        vr, wr = (np.array([other[i][k] for i in shared]) for k in (0, 1))
        rc, rr = vc.sum() / wc.sum(), vr.sum() / wr.sum()
        diff += share * (rc - rr)
        d = (vc - rc * wc) / wc.mean() - (vr - rr * wr) / wr.mean()  # as in paired_difference
        variance = float(np.var(d, ddof=1)) / n if n > 1 else math.inf
        accuracy = bool(np.all(wc == 1) and set(np.unique(np.concatenate([vc, vr]))) <= {0.0, 1.0})
        if floor and accuracy:
            p10 = (np.sum((vc == 1) & (vr == 0)) + 0.5) / (n + 1)
            p01 = (np.sum((vc == 0) & (vr == 1)) + 0.5) / (n + 1)
            variance = max(variance, (p10 + p01 - (p10 - p01) ** 2) / n)
        terms.append((share * share * variance, n - 1))
    return diff, terms


def stops_under(rule: str, candidate: dict, rival: dict, confidence: float) -> bool:
    if rule == "current":
        return not compare(candidate, rival, {t: 1.0 for t in candidate}, confidence).can_still_win
    diff, terms = task_terms(candidate, rival, floor="floor" in rule)
    variance = sum(v for v, _ in terms)
    if "welch" in rule:
        dof = variance ** 2 / sum(v * v / k for v, k in terms if k > 0 and v > 0)
    else:
        dof = sum(k for _, k in terms)
    return bool(diff < -stats.t.ppf(confidence, max(dof, 1.0)) * math.sqrt(variance))


def replay(run_dir: Path, audit_file: Path) -> dict:
    rows = [json.loads(line) for line in (run_dir / "journal.jsonl").open()]
    confidence = float(yaml.safe_load((run_dir / "config.yaml").read_text())["fitness"]["confidence"])
    audited = {c["id"]: c for entry in json.loads(audit_file.read_text()) for c in entry["candidates"]}
    full = {r["id"]: r for r in rows if r.get("split") == "dev" and r.get("status") == "ok" and r.get("stage") in (1, None)}
    stops = [r for r in rows if r.get("status") == "stopped" and r.get("rule") == "margin"]
    stage_score = {r["id"]: r["score"] for r in rows if r.get("split") == "dev" and r.get("stage") == 0}
    stopped = {r["id"] for r in rows if r.get("status") == "stopped"}
    advanced = {}  # (generation, member) -> the sibling that went on (audits excluded)
    for r in rows:
        if r.get("split") == "dev" and r.get("stage") == 1 and r["id"] not in stopped:
            advanced[(r["id"][:4], r.get("target"))] = r["id"]
    counts = {rule: {"false": 0, "true": 0} for rule in RULES}
    passing = {rule: defaultdict(list) for rule in RULES}  # family -> margin stops the rule lets on
    for stop in stops:
        verdict = "false" if audited[stop["id"]]["full_score"] >= audited[stop["id"]]["rival_full_score"] else "true"
        for rule in RULES:
            if stops_under(rule, examples(stop), examples(full[stop["rival"]]), confidence):
                counts[rule][verdict] += 1
            else:
                passing[rule][(stop["id"][:4], stop["rival"])].append(stop["id"])
    # Which sibling goes on under each rule: the best first-stage score among those that pass (the
    # run's own order, `merge_survivors`); replacing the member means beating it in full.
    families = sorted({(s["id"][:4], s["rival"]) for s in stops})
    replaced = {}
    for rule in RULES:
        wins = 0
        for family in families:
            # the sibling that went on, if any did (every sibling of a family can be stopped)
            contenders = ([advanced[family]] if family in advanced else []) + passing[rule][family]
            if not contenders:
                continue
            leader = max(contenders, key=lambda c: stage_score[c])
            own = audited[leader]["full_score"] if leader in audited else full[leader]["score"]
            wins += own > full[family[1]]["score"]
        replaced[rule] = wins
    return {"run": run_dir.name, "paired_test_stops": len(stops),
            "false_stops_audited": sum(1 for s in stops if audited[s["id"]]["full_score"] >= audited[s["id"]]["rival_full_score"]),
            "stops_kept": counts, "families_with_margin_stops": len(families),
            "members_replaced_in_those_families": replaced}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run", type=Path, help="a finished staged merge run directory")
    parser.add_argument("audit", type=Path, help="its audit_stops results (JSON)")
    args = parser.parse_args()
    print(json.dumps(replay(args.run, args.audit), indent=1))


if __name__ == "__main__":
    main()
