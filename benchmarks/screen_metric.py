"""Would a first stage that scores likelihoods instead of right/wrong answers order a member's
offspring better? Offline, from a staged merge run and its sibling audit (issue 14).

The demo's first stage scores 3-4 items of each right/wrong task: one flipped answer moves the
task's stage score by a quarter, the aggregate by a twelfth, while a member's offspring are a
median 0.02-0.03 apart in full. A smooth per-item score on the same items — the probability the
model gives the right answer — changes by small amounts when two models differ by a little:

- `multiple_choice`: the softmax over the choices' log-likelihoods, at the gold choice;
- `generate`: exp of the teacher-forced log-likelihood of " " + answer after the prompt (the
  probability of writing exactly the answer, whether or not it is the greedy one);
- perplexity tasks are smooth already and stay as they are.

Both are on the accuracy scale (a mean of per-item probabilities in [0, 1]), so the aggregate
keeps the run's task weights. For every family (one member's offspring of one generation) with
at least two offspring scored in full (the promoted one, audited ones:
`benchmarks/audit_stops.py --siblings`), each offspring is replayed from the journal and its
generation's first-stage items are scored both ways in bfloat16 (the demo's `screen_dtype`; the
right/wrong way is checked against the run's own first-stage score). Reported: of the pairs of
offspring with full dev scores, how many each way puts in the full scores' order, all pairs and
those more than 0.02 apart in full.

    python -m benchmarks.screen_metric benchmarks/.work/staged/merge-staged-bf16l24-s0 benchmarks/results/staged_audit_bf16l24.json
"""
from __future__ import annotations

import argparse
import itertools
import json
import math
import sys
import time
from functools import lru_cache
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"
sys.path.insert(0, str(ROOT))

from benchmarks.audit_stops import OfflineScorer  # noqa: E402
from benchmarks.screen_order import families  # noqa: E402
from search.fitness.generate import GenerateTask, generate_rows  # noqa: E402
from search.fitness.kernels import encode_pair, sequence_logprobs  # noqa: E402
from search.fitness.multiple_choice import MultipleChoiceTask  # noqa: E402
from search.fitness.spec import aggregate  # noqa: E402
from search.run.stages import plan_stages  # noqa: E402

WAYS = ("right/wrong", "likelihood")


def gold_probability(lls: list[float], label: int) -> float:
    """P(gold | one of the choices): the softmax of the choices' log-likelihoods at the label."""
    top = max(lls)
    return math.exp(lls[label] - top) / sum(math.exp(v - top) for v in lls)


@lru_cache(maxsize=None)
def rows_of(spec: str) -> list[tuple[str, str]]:
    return generate_rows(spec)


def answer_probabilities(task: GenerateTask, model, indices: list[int]) -> list[float]:
    """Per prompt, exp(log p(" " + answer | prompt)) under teacher forcing."""
    rows = rows_of(task.spec.data)
    pairs = [encode_pair(task.tokenizer, rows[i][0], " " + rows[i][1].strip(), task.prefix) for i in indices]
    lls = sequence_logprobs(model, [(ctx + cont, len(cont)) for ctx, cont in pairs], pad_id=task.pad_id)
    return [math.exp(v) for v in lls]


def likelihood_score(task, model, indices: list[int]) -> float:
    """A task's smooth first-stage score on `indices` (its own score for perplexity tasks)."""
    if isinstance(task, MultipleChoiceTask):
        questions = [task.items[i] for i in indices]
        lls = task.choice_logprobs(model, questions)
        return sum(gold_probability(ll, q.label) for q, ll in zip(questions, lls)) / len(questions)
    if isinstance(task, GenerateTask):
        return sum(answer_probabilities(task, model, indices)) / len(indices)
    return task.evaluate(model, indices=indices)["score"]


def rescore(scorer: OfflineScorer, candidate_id: str, items: dict[str, list[int]]) -> dict[str, float]:
    """{way: first-stage aggregate} of one replayed candidate on its generation's first-stage items."""
    scorer.load(candidate_id)
    chosen = {t: [task.selected(None, 0)[i] for i in items[t]] for t, task in scorer.tasks.items()}
    with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16):
        exact = {t: task.evaluate(scorer.model, indices=chosen[t])["score"] for t, task in scorer.tasks.items()}
        smooth = {t: likelihood_score(task, scorer.model, chosen[t]) for t, task in scorer.tasks.items()}
    return {"right/wrong": aggregate(exact, scorer.weights), "likelihood": aggregate(smooth, scorer.weights)}


def order_agreement(grouped: dict[tuple, list[str]], scores: dict[str, dict[str, float]], full: dict[str, float],
                    apart: float = 0.0) -> tuple[int, dict[str, int]]:
    """(pairs of offspring of one family with full scores more than `apart` apart, {way: pairs it
    puts in the full scores' order})."""
    agree, pairs = dict.fromkeys(WAYS, 0), 0
    for ids in grouped.values():
        for a, b in itertools.combinations([c for c in ids if c in full], 2):
            if abs(full[a] - full[b]) <= apart:
                continue
            pairs += 1
            for way in WAYS:
                agree[way] += bool((scores[a][way] > scores[b][way]) == (full[a] > full[b]))
    return pairs, agree


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run", type=Path, nargs="+", help="staged merge run directories (weights kept)")
    parser.add_argument("--audit", type=Path, required=True, help="their audit_stops.py result with sibling_candidates")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--name", default="screen_metric", help="results file stem")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    audits = {e["run"]: e for e in json.loads(args.audit.read_text())}
    results, lines = [], []
    for run in args.run:
        grouped, full, first = families(run, audits[run.name])
        grouped = {key: [c for c in ids if c in full] for key, ids in grouped.items()}  # only they make pairs
        scorer = OfflineScorer(run)
        sizes = {t: len(task.selected(None, 0)) for t, task in scorer.tasks.items()}
        fitness = scorer.config.fitness
        plan = plan_stages(fitness.stages, sizes, scorer.config.seed, fitness.min_items, proxy=False, resample=fitness.resample)
        started, scores = time.time(), {}
        for key in sorted(grouped):
            for cid in grouped[key]:
                scores[cid] = rescore(scorer, cid, plan.indices(key[0])[0])
                if abs(scores[cid]["right/wrong"] - first[cid]) > 1e-9:
                    raise SystemExit(f"{cid}: the offline first stage ({scores[cid]['right/wrong']}) is not the run's ({first[cid]})")
            print(f"{run.name}: generation {key[0] + 1}, offspring of {key[1]}: {len(grouped[key])} rescored, "
                  f"{time.time() - started:.0f} s", flush=True)
        pairs, agree = order_agreement(grouped, scores, full)
        far, agree_far = order_agreement(grouped, scores, full, apart=0.02)
        results.append({"run": run.name, "families": len(grouped), "offspring": len(scores), "pairs": pairs, "agree": agree,
                        "pairs_over_0.02": far, "agree_over_0.02": agree_far, "scores": scores})
        lines.append(f"| {run.name} | {len(grouped)} | {pairs} | " + " | ".join(f"{agree[w]} ({agree[w] / pairs:.0%})" for w in WAYS)
                     + f" | {far} | " + " | ".join(f"{agree_far[w]} ({agree_far[w] / max(far, 1):.0%})" for w in WAYS) + " |")
    head = ["# A likelihood first stage against the right/wrong one (bfloat16, the runs' own first-stage items)", "",
            "Pairs of one member's offspring with full dev scores, and how many each first stage puts in the full "
            "scores' order (all pairs; pairs more than 0.02 apart in full).", "",
            "| run | families | pairs | right/wrong | likelihood | pairs > 0.02 apart | right/wrong | likelihood |",
            "|---|---|---|---|---|---|---|---|"]
    tail = ["", f"`python -m benchmarks.screen_metric {' '.join(map(str, args.run))} --audit {args.audit}`", ""]
    (RESULTS / f"{args.name}.json").write_text(json.dumps(results, indent=1) + "\n")
    (RESULTS / f"{args.name}.md").write_text("\n".join(head + lines + tail))
    print("\n".join(head + lines + tail))


if __name__ == "__main__":
    main()
