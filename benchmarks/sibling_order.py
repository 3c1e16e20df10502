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
import fnmatch
import itertools
import json
from collections import defaultdict
from pathlib import Path

import numpy as np

from search.run.store import RunStore

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
    """({id: raw deviation of its first-stage aggregate from the siblings' mean}, {id: reliability-
    weighted deviation}, {task: reliability}); the aggregate is the tasks' mean, as the demo's.

    A task's score on the items is R = sum_i v_i / sum_i w_i (search.fitness.staged); linearised,
    R - E[R] ~ mean_i z_i with z_i = (v_i - R w_i) / mean(w), so a sibling's deviation from the
    siblings' mean has item-sampling variance var_i(z_i - mean over siblings of z_i) / n."""
    ids = list(family)
    values = {i: task_values(family[i]) for i in ids}
    tasks = list(values[ids[0]])
    raw = dict.fromkeys(ids, 0.0)
    weighted = dict.fromkeys(ids, 0.0)
    reliability = {}
    for task in tasks:
        items = sorted(values[ids[0]][task][0])
        w = np.array([values[ids[0]][task][1][j] for j in items])  # (n,) item weights, shared by the siblings
        v = np.array([[values[i][task][0][j] for j in items] for i in ids])  # (siblings, n)
        score = v.sum(axis=1) / w.sum()  # (siblings,)
        delta = score - score.mean()
        z = (v - score[:, None] * w) / w.mean()  # (siblings, n) linearised per-item contributions
        per_item = z - z.mean(axis=0)
        n = len(items)
        noise = float(np.mean(per_item.var(axis=1, ddof=1))) / n if n > 1 else float("inf")
        between = float(np.mean(delta ** 2))
        r = 0.0 if between == 0 else max(0.0, 1.0 - noise / between)
        reliability[task] = r
        for k, i in enumerate(ids):
            raw[i] += delta[k] / len(tasks)
            weighted[i] += r * delta[k] / len(tasks)
    return raw, weighted, reliability


def replay(run_dir: Path, audit: dict) -> dict:
    rows = RunStore(run_dir).read_journal()
    full = {r["id"]: r["score"] for r in rows if r.get("split") == "dev" and r.get("status") == "ok" and r.get("stage") == 1}
    full.update({c["id"]: c["full_score"] for c in audit["sibling_candidates"]})
    families: dict[tuple, dict[str, dict]] = defaultdict(dict)
    for r in rows:
        if r.get("split") == "dev" and r.get("stage") == 0 and r.get("metrics") and r.get("target"):
            families[(r["generation"], r["target"])][r["id"]] = r
    agree = {"raw": 0, "reliability": 0}
    pairs = 0
    gaps = []  # |full score difference| of each pair: how far apart a member's offspring really are
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
            gaps.append(abs(full[a] - full[b]))
            agree["raw"] += bool((raw[a] > raw[b]) == (full[a] > full[b]))
            agree["reliability"] += bool((weighted[a] > weighted[b]) == (full[a] > full[b]))
    return {"run": audit["run"], "pairs": pairs, "agree": agree,
            "median_full_gap": round(float(np.median(gaps)), 4) if gaps else None,
            "mean_reliability": {t: round(float(np.mean(v)), 3) for t, v in reliabilities.items()}}


# First-stage cost per item on the demo (2-core CPU, from the staged runs' timings): a 128-token
# piece of Python reference text, a right/wrong item (addition or comparison), and making the
# candidate's weights, which every judged candidate pays once.
PIECE_S, ITEM_S, MATERIALIZE_S = 0.257, 0.109, 0.50
ALLOCATIONS = ((3, 4, 4), (1, 6, 6), (2, 5, 5), (0, 7, 7), (3, 8, 8), (3, 16, 16), (8, 16, 16))  # (pydoc, arith, compare)
CLOSE = 0.02  # pairs this close in full dev score are what a member's offspring look like


def full_examples(run_dir: Path) -> list[tuple[float, dict[str, tuple[np.ndarray, np.ndarray]]]]:
    """(full dev score, {task: (values, weights) in item order}) of a staged run's fully scored candidates."""
    out = []
    for r in RunStore(run_dir).read_journal():
        if r.get("split") == "dev" and r.get("status") == "ok" and r.get("stage") == 1:
            tasks = {}
            for task, (values, weights) in task_values(r).items():
                items = sorted(values)
                tasks[task] = (np.array([values[j] for j in items]), np.array([weights[j] for j in items]))
            out.append((r["score"], tasks))
    return out


def subset_agreement(candidates: list, allocation: dict[str, int], draws: int, seed: int) -> tuple[float, float, int, int]:
    """(share of all pairs, share of close pairs) that a first stage of `allocation` items per task,
    drawn `draws` times (the same items for both of a pair), orders as their full scores do; ties
    count half. Also the numbers of pairs."""
    rng = np.random.default_rng(seed)
    tasks = list(candidates[0][1])
    sizes = {t: candidates[0][1][t][0].shape[0] for t in tasks}
    scores = np.zeros((draws, len(candidates)))  # (draws, candidates) first-stage aggregates
    for d in range(draws):
        for t in tasks:
            n = min(allocation.get(t, 0), sizes[t])
            if n == 0:
                continue
            pick = rng.choice(sizes[t], size=n, replace=False)
            for c, (_, examples) in enumerate(candidates):
                values, weights = examples[t]
                scores[d, c] += np.sum(values[pick]) / np.sum(weights[pick]) / len(tasks)  # the task score on them
    full = np.array([score for score, _ in candidates])
    agree, close_agree, pairs, close = 0.0, 0.0, 0, 0
    for a, b in itertools.combinations(range(len(candidates)), 2):
        if full[a] == full[b]:
            continue
        sign = np.sign(scores[:, a] - scores[:, b]) * np.sign(full[a] - full[b])  # (draws,) +1 agree, 0 tie
        share = float(np.mean((sign + 1) / 2))
        agree += share
        pairs += 1
        if abs(full[a] - full[b]) < CLOSE:
            close_agree += share
            close += 1
    return agree / max(pairs, 1), close_agree / max(close, 1), pairs, close


def allocation_table(run_dirs: list[Path], draws: int = 200) -> list[str]:
    """How a first stage's item allocation orders fully scored candidates, against its cost."""
    runs = [full_examples(d) for d in run_dirs]
    runs = [r for r in runs if len(r) > 1]
    lines = ["", "## Which first-stage items order near-equal candidates", "",
             f"Every pair of fully scored candidates of one run (per-example full dev scores in the journal), "
             f"a first stage of the given items per task drawn {draws} times (the same items for both): the share "
             f"of draws ordering the pair as its full scores do, averaged over all pairs and over the close pairs "
             f"(within {CLOSE} in full, as one member's offspring are). Cost of a judged candidate from the "
             f"runs' timings: {PIECE_S} s a text piece, {ITEM_S} s a right/wrong item, {MATERIALIZE_S} s to "
             "make its weights.", "",
             "| items (pydoc, arith, compare) | s per judged candidate | all pairs | close pairs |", "|---|---|---|---|"]
    for allocation in ALLOCATIONS:
        pieces, arith, compare = allocation
        cost = MATERIALIZE_S + PIECE_S * pieces + ITEM_S * (arith + compare)
        results = [subset_agreement(r, {"pydoc": pieces, "arith": arith, "compare": compare}, draws, seed=i)
                   for i, r in enumerate(runs)]
        pairs = sum(p for _, _, p, _ in results)
        close = sum(c for _, _, _, c in results)
        every = sum(a * p for a, _, p, _ in results) / max(pairs, 1)
        near = sum(b * c for _, b, _, c in results) / max(close, 1)
        lines.append(f"| {pieces}, {arith}, {compare} | {cost:.2f} | {every:.0%} of {pairs} | {near:.0%} of {close} |")
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("audit", type=Path, help="an audit_stops.py result with sibling_candidates")
    parser.add_argument("runs", type=Path, help="the directory holding the audited runs")
    parser.add_argument("--pattern", default="merge*staged*",
                        help="the runs (directory-name glob) whose fully scored candidates the allocation table draws from")
    parser.add_argument("--name", default="sibling_order", help="results file stem")
    args = parser.parse_args()
    results = [replay(args.runs / entry["run"], entry) for entry in json.loads(args.audit.read_text())
               if entry.get("sibling_candidates")]
    pairs = sum(r["pairs"] for r in results)
    lines = ["# Ordering a member's offspring by the first stage, against their full dev scores", "",
             "| run | sibling pairs with full scores | median full-score gap | raw stage score agrees | reliability-weighted agrees | mean reliability per task |",
             "|---|---|---|---|---|---|"]
    for r in results:
        lines.append(f"| {r['run']} | {r['pairs']} | {r.get('median_full_gap')} | {r['agree']['raw']} | {r['agree']['reliability']} | "
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
    lines += allocation_table(sorted(d for d in args.runs.iterdir() if d.is_dir() and (d / "journal.jsonl").is_file()
                                     and fnmatch.fnmatchcase(d.name, args.pattern)))
    lines += ["", "Most pairs of the first table hold the promoted sibling (the raw score's best, scored in full by "
              "the run) and an audited one, so there `raw` counts how often the promoted sibling beat it in full; "
              "the others are two audited stops. A task's reliability is the share of its spread among siblings "
              "that item sampling does not explain (the text task's pieces: high; a few right/wrong items: low). "
              "The second table asks what any first stage could do: it draws subsets of the fully scored "
              "candidates' own items, so it needs no new scoring.",
              "", f"`python -m benchmarks.sibling_order {args.audit} {args.runs}"
              + ("" if args.pattern == "merge*staged*" else f" --pattern '{args.pattern}'")
              + ("" if args.name == "sibling_order" else f" --name {args.name}") + "`", ""]
    stem = args.name
    (RESULTS / f"{stem}.json").write_text(json.dumps(results, indent=1) + "\n")
    (RESULTS / f"{stem}.md").write_text("\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
