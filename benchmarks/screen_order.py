"""Does a bfloat16 first stage order a member's offspring as the float32 one does? Offline, from a
staged merge run and its sibling audit (issue 14, `fitness.screen_dtype`).

For every family (one member's offspring of one generation) with at least two offspring scored in
full (the promoted one, audited ones: `benchmarks/audit_stops.py --siblings`), each offspring is
replayed from the journal and its first-stage items are scored three ways on one CPU model:

- `float32`: as the run scored them (checked: equal to the journal's first-stage score);
- `bfloat16`: the same items under torch autocast to bfloat16 (what `screen_dtype` runs);
- `bfloat16 x3`: three times the items in bfloat16 (the next nested stage of `[f, 3f, 1]`), about
  the float32 stage's cost on a CPU with AVX-512 BF16.

Reported: how far the bfloat16 stage score is from the float32 one, whether the same offspring
would have been promoted, and of the pairs of offspring with full scores, how many each ordering
puts in the full scores' order.

    python -m benchmarks.screen_order benchmarks/.work/staged/merge-staged-frange-s1 benchmarks/results/staged_audit_frange.json
"""
from __future__ import annotations

import argparse
import itertools
import json
import sys
import time
from collections import defaultdict
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"
sys.path.insert(0, str(ROOT))

from benchmarks.audit_stops import OfflineScorer  # noqa: E402
from search.fitness.spec import aggregate  # noqa: E402
from search.fitness.staged import spearman  # noqa: E402
from search.run.stages import plan_stages  # noqa: E402
from search.run.store import RunStore  # noqa: E402

WAYS = (("float32", 0, False), ("bfloat16", 0, True), ("bfloat16 x3", 1, True))  # (name, nested stage, autocast)


def families(run_dir: Path, audit: dict) -> tuple[dict[tuple, list[str]], dict[str, float], dict[str, float]]:
    """({(generation, member): offspring ids} with >= 2 full scores, {id: full dev score}, {id: first-stage score})."""
    rows = RunStore(run_dir).read_journal()
    full = {r["id"]: r["score"] for r in rows if r.get("split") == "dev" and r.get("status") == "ok" and r.get("stage") == 1}
    full.update({c["id"]: c["full_score"] for c in audit["sibling_candidates"]})
    first = {r["id"]: r["score"] for r in rows if r.get("split") == "dev" and r.get("stage") == 0 and r.get("status") == "ok"}
    grouped: dict[tuple, list[str]] = defaultdict(list)
    for r in rows:
        if r.get("split") == "dev" and r.get("stage") == 0 and r.get("status") == "ok" and r.get("target"):
            grouped[(r["generation"], r["target"])].append(r["id"])
    return {k: v for k, v in grouped.items() if sum(c in full for c in v) >= 2}, full, first


def rescore(scorer: OfflineScorer, candidate_id: str, items: tuple[dict[str, list[int]], ...]) -> dict[str, float]:
    """{way: first-stage aggregate} of one replayed candidate; `items`: the nested stages' item
    indices per task (its generation's draw)."""
    scorer.load(candidate_id)
    scores = {}
    for way, stage, autocast in WAYS:
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            metrics = {t: task.evaluate(scorer.model, indices=[task.selected(None, 0)[i] for i in items[stage][t]])
                       for t, task in scorer.tasks.items()}
        scores[way] = aggregate({t: m["score"] for t, m in metrics.items()}, scorer.weights)
    return scores


def summarise(grouped: dict[tuple, list[str]], scores: dict[str, dict[str, float]], full: dict[str, float]) -> dict:
    ways = [w for w, _, _ in WAYS]
    agree, pairs, same_promoted, within = dict.fromkeys(ways, 0), 0, 0, []
    for ids in grouped.values():
        same_promoted += max(ids, key=lambda c: scores[c]["float32"]) == max(ids, key=lambda c: scores[c]["bfloat16"])
        within.append(spearman([scores[c]["float32"] for c in ids], [scores[c]["bfloat16"] for c in ids]))
        for a, b in itertools.combinations([c for c in ids if c in full], 2):
            if full[a] == full[b]:
                continue
            pairs += 1
            for way in ways:
                agree[way] += bool((scores[a][way] > scores[b][way]) == (full[a] > full[b]))
    gaps = np.array([abs(s["bfloat16"] - s["float32"]) for s in scores.values()])
    return {"families": len(grouped), "offspring": len(scores), "pairs_with_full_scores": pairs, "agree": agree,
            "same_promoted": same_promoted, "median_spearman_float32_bfloat16": round(float(np.median(within)), 3),
            "median_abs_gap": round(float(np.median(gaps)), 5), "share_gap_over_0.02": round(float(np.mean(gaps > 0.02)), 3)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run", type=Path, help="a staged merge run directory (weights kept)")
    parser.add_argument("audit", type=Path, help="its audit_stops.py result with sibling_candidates")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--name", default="screen_order", help="results file stem")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    audit = next(e for e in json.loads(args.audit.read_text()) if e["run"] == args.run.name)
    grouped, full, first = families(args.run, audit)
    scorer = OfflineScorer(args.run)
    sizes = {t: len(task.selected(None, 0)) for t, task in scorer.tasks.items()}
    fitness = scorer.config.fitness
    # the run's own draws, with a nested stage of three times the first one's items
    plan = plan_stages([fitness.stages[0], min(1.0, 3 * fitness.stages[0]), 1.0], sizes, scorer.config.seed,
                       fitness.min_items, proxy=False, resample=fitness.resample)
    started, scores = time.time(), {}
    for key in sorted(grouped):
        for cid in grouped[key]:
            scores[cid] = rescore(scorer, cid, plan.indices(key[0]))
            if abs(scores[cid]["float32"] - first[cid]) > 1e-9:
                raise SystemExit(f"{cid}: the offline first stage ({scores[cid]['float32']}) is not the run's ({first[cid]})")
        print(f"generation {key[0] + 1}, offspring of {key[1]}: {len(grouped[key])} rescored, {time.time() - started:.0f} s", flush=True)
    summary = {"run": args.run.name, **summarise(grouped, scores, full)}
    lines = [f"# A bfloat16 first stage against the float32 one ({args.run.name})", "",
             f"{summary['families']} families with two or more offspring scored in full, {summary['offspring']} offspring "
             f"rescored on their first-stage items; {summary['pairs_with_full_scores']} pairs with full dev scores.", "",
             "| first stage | pairs in the full scores' order |", "|---|---|"]
    lines += [f"| {way} | {n} of {summary['pairs_with_full_scores']} |" for way, n in summary["agree"].items()]
    lines += ["", f"bfloat16 against float32 on the same items: median |difference| {summary['median_abs_gap']}, "
              f"{summary['share_gap_over_0.02']:.0%} of offspring more than 0.02 apart (a right/wrong item flipped); "
              f"the same offspring promoted in {summary['same_promoted']} of {summary['families']} families; median "
              f"Spearman within a family {summary['median_spearman_float32_bfloat16']}.", "",
             f"`python -m benchmarks.screen_order {args.run} {args.audit}`", ""]
    (RESULTS / f"{args.name}.json").write_text(json.dumps({**summary, "scores": scores}, indent=1) + "\n")
    (RESULTS / f"{args.name}.md").write_text("\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
