"""Replays a staged merge run's first-stage decisions under other rules, offline (issue 14).

`benchmarks/audit_stops.py` scores every candidate the paired test stopped in full. With those
scores and the run's journal, this script asks what other rules would have done with the same
first-stage data. A rule is a variance estimate and an order:

- variance `plug-in`: the per-item paired differences' sample variance, as the runs before
  2026-12-01 used it (zero for a right/wrong task on which two candidates agree on every item);
  `floor`: `search.fitness.staged.compare` as it is now, whose right/wrong tasks' variance is at
  least `discordance_variance_floor` (half a pseudo-count per cell of the 2 x 2 table);
- order `filter`: the paired test first, then the best stage score among the siblings that pass
  goes on (the runs' order before 2026-12-01); `ranked`: the best stage score among all siblings
  is the one contender, and goes on if it passes the test (`StageJudge.merge_survivors` now).

Per rule, over the (generation, member) families of the run: how many promote a sibling (one
full evaluation each), how many members the promoted sibling replaces (its full dev score beats
the member's), and the paired-test stops with their false ones (a stop whose full score beats the
member and the promoted sibling: full scoring would have selected it). Every candidate these
rules promote or stop by the test has a full score: the run scored its promoted ones, the audit
every one the run's test stopped, and a rule here only ever promotes or tests a sibling ranked
at or above the run's promoted one (or one the run's test stopped).

    python -m benchmarks.margin_rules benchmarks/.work/staged/merge-staged-s3 benchmarks/results/staged_audit_s3.json
"""
from __future__ import annotations

import argparse
import json
import math
from collections import defaultdict
from pathlib import Path

import yaml

from search.fitness.staged import compare
from search.run.store import RunStore

VARIANCES = ("plug-in", "floor")
ORDERS = ("filter", "ranked")


def examples(row: dict) -> dict[str, dict]:
    return {task: m["examples"] for task, m in row["metrics"].items() if isinstance(m, dict) and "examples" in m}


def stops(variance: str, candidate: dict, rival: dict, confidence: float) -> bool:
    """Whether the paired test stops `candidate` against `rival` (equal task weights, as the demo's)."""
    verdict = compare(candidate, rival, {t: 1.0 for t in candidate}, confidence, accuracy_floor=variance == "floor")
    return not verdict.can_still_win


def replay(run_dir: Path, audit_file: Path) -> dict:
    store = RunStore(run_dir)
    rows = store.read_journal()
    confidence = float(yaml.safe_load(store.config_path.read_text())["fitness"]["confidence"])
    full = {r["id"]: r["score"] for r in rows if r.get("split") == "dev" and r.get("status") == "ok" and r.get("stage") in (1, None)}
    member_rows = {r["id"]: r for r in rows if r.get("split") == "dev" and r.get("status") == "ok" and r.get("stage") in (1, None)}
    for entry in json.loads(audit_file.read_text()):
        full.update({c["id"]: c["full_score"] for c in entry["candidates"]})
    first = {}  # candidate id -> its first-stage row (the stop row for stopped ones)
    for r in rows:
        if r.get("split") == "dev" and r.get("stage") == 0:
            first[r["id"]] = r
    families = defaultdict(list)
    for r in first.values():
        families[(r["id"][:4], r.get("target"))].append(r)
    results = {}
    for variance in VARIANCES:
        for order in ORDERS:
            promoted = replaced = test_stops = false_stops = unknown = 0
            for (_, member), siblings in sorted(families.items()):
                if member not in member_rows:
                    continue
                theirs = examples(member_rows[member])
                ranked = sorted(siblings, key=lambda r: (-r["score"], r["id"]))
                fails = {r["id"]: stops(variance, examples(r), theirs, confidence) for r in ranked}
                contenders = ranked if order == "filter" else ranked[:1]
                stopped = [r["id"] for r in contenders if fails[r["id"]]]
                going_on = next((r["id"] for r in contenders if not fails[r["id"]]), None)
                bar = full[member]
                if going_on is not None:
                    promoted += 1
                    if going_on not in full:
                        unknown += 1
                        continue
                    replaced += full[going_on] > full[member]
                    bar = max(bar, full[going_on])
                test_stops += len(stopped)
                unknown += sum(s not in full for s in stopped)
                false_stops += sum(full.get(s, -math.inf) >= bar for s in stopped)
            results[f"{variance}, {order}"] = {"families": len(families), "promoted": promoted,
                                               "members_replaced": replaced, "test_stops": test_stops,
                                               "false_test_stops": false_stops, "unknown": unknown}
    return {"run": run_dir.name, "rules": results}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run", type=Path, help="a finished staged merge run directory")
    parser.add_argument("audit", type=Path, help="its audit_stops results (JSON)")
    args = parser.parse_args()
    print(json.dumps(replay(args.run, args.audit), indent=1))


if __name__ == "__main__":
    main()
