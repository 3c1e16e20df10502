"""How well does the first stage order a member's offspring? Offline, from staged merge runs (issue 14).

A staged merge run with (1 + lambda) promotes, of each member's lambda offspring, the one with the
best first-stage score (`StageJudge.merge_survivors`). The audit (`benchmarks/audit_stops.py
--siblings`) scores a sample of the others in full. For every pair of offspring of one member
(same generation, same items) that both have a full dev score (the promoted one, audited ones),
this counts how often an order read from the first stage agrees with the full scores' order:

- `raw`: the first-stage aggregate itself, as the runs rank;
- `reliability`: each task's deviation from the siblings' mean weighted by that task's
  reliability among them, `r_t = max(0, 1 - noise_t / between_t)`, where `between_t` is the
  variance of the siblings' task scores around their mean and `noise_t` the variance one
  sibling's deviation would have over redraws of the items (from its per-item deviations, the
  items weighted as the task weighs them). A task whose siblings differ no more than item
  sampling explains (4 right/wrong items) then counts for little: empirical-Bayes shrinkage of
  each task's estimate toward the siblings' mean, the best linear predictor of the full score
  when the siblings' true task scores are spread as observed.

    python -m benchmarks.sibling_order benchmarks/results/staged_audit_ranked.json benchmarks/.work/staged
"""
from __future__ import annotations

import argparse
import itertools
import json
from collections import defaultdict
from pathlib import Path

import numpy as np

RESULTS = Path(__file__).resolve().parent / "results"


def task_values(row: dict) -> dict[str, tuple[dict[int, float], dict[int, float]]]:
    """{task: ({item: value}, {item: weight})} of one first-stage row."""
    out = {}
    for task, metrics in row["metrics"].items():
        if isinstance(metrics, dict) and "examples" in metrics:
            e = metrics["examples"]
            out[task] = (dict(zip(e["index"], e["value"])), dict(zip(e["index"], e["weight"])))
    return out


def deviations(family: dict[str, dict]) -> tuple[dict[str, float], dict[str, float], dict[str, float]]:
    """({id: raw deviation of its aggregate from the siblings' mean}, {id: reliability-weighted
    deviation}, {task: reliability}); the aggregate is the tasks' mean, as the demo's."""
    ids = list(family)
    values = {i: task_values(family[i]) for i in ids}
    tasks = list(values[ids[0]])
    raw = dict.fromkeys(ids, 0.0)
    weighted = dict.fromkeys(ids, 0.0)
    reliability = {}
    for task in tasks:
        items = sorted(values[ids[0]][task][0])
        w = np.array([values[ids[0]][task][1][j] for j in items])  # (n,) item weights, shared by the siblings
        x = np.array([[values[i][task][0][j] for j in items] for i in ids])  # (siblings, n)
        total = w.sum()
        delta = x @ w / total - (x @ w / total).mean()  # (siblings,) task score minus the siblings' mean
        per_item = x - x.mean(axis=0)  # each item's deviation from the siblings' mean on it
        n = len(items)
        # variance of a weighted mean over n items redrawn: sum_j w_j^2 (d_j - delta)^2 / W^2, n/(n-1) unbiased
        noise = np.mean([np.sum(w ** 2 * (per_item[k] - delta[k]) ** 2) for k in range(len(ids))]) / total ** 2 \
            * n / max(n - 1, 1)
        between = float(np.mean(delta ** 2))
        r = 0.0 if between == 0 else max(0.0, 1.0 - noise / between)
        reliability[task] = r
        for k, i in enumerate(ids):
            raw[i] += delta[k] / len(tasks)
            weighted[i] += r * delta[k] / len(tasks)
    return raw, weighted, reliability


def replay(run_dir: Path, audit: dict) -> dict:
    rows = [json.loads(line) for line in (run_dir / "journal.jsonl").open()]
    full = {r["id"]: r["score"] for r in rows if r.get("split") == "dev" and r.get("status") == "ok" and r.get("stage") == 1}
    full.update({c["id"]: c["full_score"] for c in audit["sibling_candidates"]})
    families: dict[tuple, dict[str, dict]] = defaultdict(dict)
    for r in rows:
        if r.get("split") == "dev" and r.get("stage") == 0 and r.get("metrics") and r.get("target"):
            families[(r["generation"], r["target"])][r["id"]] = r
    agree = {"raw": 0, "reliability": 0}
    pairs = 0
    reliabilities = defaultdict(list)
    for family in families.values():
        if len(family) < 2:
            continue
        raw, weighted, reliability = deviations(family)
        for task, r in reliability.items():
            reliabilities[task].append(r)
        for a, b in itertools.combinations([i for i in family if i in full], 2):
            if full[a] == full[b] or raw[a] == raw[b]:
                continue
            pairs += 1
            agree["raw"] += bool((raw[a] > raw[b]) == (full[a] > full[b]))
            agree["reliability"] += bool((weighted[a] > weighted[b]) == (full[a] > full[b]))
    return {"run": audit["run"], "pairs": pairs, "agree": agree,
            "mean_reliability": {t: round(float(np.mean(v)), 3) for t, v in reliabilities.items()}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("audit", type=Path, help="an audit_stops.py result with sibling_candidates")
    parser.add_argument("runs", type=Path, help="the directory holding the audited runs")
    args = parser.parse_args()
    results = [replay(args.runs / entry["run"], entry) for entry in json.loads(args.audit.read_text())
               if entry.get("sibling_candidates")]
    pairs = sum(r["pairs"] for r in results)
    lines = ["# Ordering a member's offspring by the first stage, against their full dev scores", "",
             "| run | sibling pairs with full scores | raw stage score agrees | reliability-weighted agrees | mean reliability per task |",
             "|---|---|---|---|---|"]
    for r in results:
        lines.append(f"| {r['run']} | {r['pairs']} | {r['agree']['raw']} | {r['agree']['reliability']} | "
                     + ", ".join(f"{t} {v}" for t, v in r["mean_reliability"].items()) + " |")
    for name in ("raw", "reliability"):
        agreed = sum(r["agree"][name] for r in results)
        lines.append(f"\n{name}: {agreed} of {pairs} pairs ({agreed / max(pairs, 1):.0%}) in the full scores' order.")
    # what a false sibling stop costs: how far its full score beat what went on (the selection bar:
    # the member or the sibling that went on, whichever scored better), against the promoted gain
    sampled = [c for entry in json.loads(args.audit.read_text()) for c in entry.get("sibling_candidates", [])]
    lost = [c["full_score"] - c["selection_bar"] for c in sampled if c["full_score"] > c["selection_bar"]]
    gained = [c["selection_bar"] - c["rival_full_score"] for c in sampled]
    if lost:
        lines.append(f"\nFalse sibling stops: {len(lost)} of {len(sampled)} sampled; their full score beat what went on "
                     f"by a median {np.median(lost):.4f} (mean {np.mean(lost):.4f}, at most {max(lost):.4f}); "
                     f"what went on beat the member by a median {np.median(gained):.4f} (mean {np.mean(gained):.4f}).")
    lines += ["", "Most pairs hold the promoted sibling (the raw score's best, scored in full by the run) and an "
              "audited one, so there `raw` counts how often the promoted sibling beat it in full; the others are "
              "two audited stops. A task's reliability is the share of its spread among siblings that item "
              "sampling does not explain: on 3 pieces of Python reference text the siblings differ for real "
              "(~0.9), on 4 right/wrong items barely (0.1-0.2). The reliability-weighted order is thus "
              "mostly the text task's, and it predicts the full order no better than the raw score: "
              "re-weighting the same first-stage items does not order siblings better; more items on the "
              "right/wrong tasks, or a different signal, would be needed.",
              "", f"`python -m benchmarks.sibling_order {args.audit} {args.runs}`", ""]
    stem = "sibling_order"
    (RESULTS / f"{stem}.json").write_text(json.dumps(results, indent=1) + "\n")
    (RESULTS / f"{stem}.md").write_text("\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
