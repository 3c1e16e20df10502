"""Every offspring of a few families scored in full: the cost and the error of each way of
choosing among siblings, measured exactly instead of sampled (issue 14).

A family is one member's lambda offspring of one generation. `audit_stops --siblings` scores a
tenth of a run's sibling stops, so it can say how often a stopped sibling beat the one that went
on, but not what another advance rule would have done. Here every offspring of a seeded sample
of families of a finished staged merge run is replayed from the journal and scored

- on the full dev sets in float32, per example (the run's last stage), and
- on its generation's second-stage items in bfloat16, per example (the run's screen);

its first-stage score is the journal's. With the whole family known, any rule that narrows the
family by these scores can be replayed without scoring anything again:

- `top k1 > k2`: the best k1 of the first stage meet the second, the best k2 of those are
  scored in full, and the best of them in full is the family's choice (the demo: `[3, 1]`);
- `top k`: one step, the best k of the first stage scored in full;
- `smoothed`: the first stage ranked not by each offspring's own score but by a least-squares
  fit of the family's scores on its step sizes (F, CR, their squares and product) and a level per
  reference: siblings with nearby steps toward the same reference are nearby models, so pooling
  them could average out the item noise of a few right/wrong answers;
- `all in full`: every offspring scored in full (what full scoring would choose).

For each rule, pooled over the families: the false sibling stops as `audit_stops` counts them (a
stopped offspring whose full dev score is at least the member's and the chosen one's), how many
of those the full dev sets resolve (the paired test on every dev item at the run's confidence),
the regret (how far the family's best offspring is ahead of what the rule kept: the chosen one or
the member), and the actor seconds a family costs at the run's own median timings.

    python -m benchmarks.family_census benchmarks/.work/staged/merge-staged-brood-s0 --families 6

Scores are appended per family to the results JSON, so a killed census resumes where it stopped.
"""
from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"
sys.path.insert(0, str(ROOT))

from benchmarks.audit_stops import OfflineScorer, resolved_by_full_dev  # noqa: E402
from search.fitness.spec import aggregate  # noqa: E402
from search.run.stages import plan_stages  # noqa: E402
from search.run.store import RunStore  # noqa: E402


# ---------------------------------------------------------------------------------------------
# Reading the run
# ---------------------------------------------------------------------------------------------

def dev_rows(run_dir: Path) -> list[dict]:
    return [r for r in RunStore(run_dir).read_journal() if r["split"] == "dev"]


def families(rows: list[dict]) -> dict[tuple[int, str], list[str]]:
    """{(generation, member): its offspring ids in id order}, from the first-stage rows (a stopped
    offspring has two: its score, then its stop)."""
    out: dict[tuple[int, str], set[str]] = {}
    for r in rows:
        if r.get("stage") == 0 and r.get("target") and r.get("generation") is not None:
            out.setdefault((r["generation"], r["target"]), set()).add(r["id"])
    return {k: sorted(v) for k, v in out.items()}


def full_rows(rows: list[dict], last: int) -> dict[str, dict]:
    """{id: the row of its full dev evaluation} (members, parents, promoted offspring, audits)."""
    return {r["id"]: r for r in rows if r.get("status") == "ok" and r.get("stage") in (None, last)}


def median_seconds(rows: list[dict], stage: int) -> float:
    """Median actor seconds of a stage's rows of offspring (making the weights and scoring)."""
    spent = [sum(r["timing"].values()) for r in rows
             if r.get("stage") == stage and r.get("target") and r.get("timing") and r.get("status") in ("ok", "stopped")]
    return statistics.median(spent) if spent else float("nan")


def sample_families(keys: list[tuple[int, str]], count: int, seed: int) -> list[tuple[int, str]]:
    """A seeded sample of families, spread over the generations: one per generation in turn."""
    rng = random.Random(seed)
    by_generation: dict[int, list] = {}
    for key in sorted(keys):
        by_generation.setdefault(key[0], []).append(key)
    for members in by_generation.values():
        rng.shuffle(members)
    chosen: list[tuple[int, str]] = []
    while len(chosen) < min(count, len(keys)):
        for generation in sorted(by_generation):
            if by_generation[generation] and len(chosen) < count:
                chosen.append(by_generation[generation].pop())
    return chosen


# ---------------------------------------------------------------------------------------------
# Scoring a family
# ---------------------------------------------------------------------------------------------

def subset_score(scorer: OfflineScorer, items: dict[str, list[int]], bfloat16: bool) -> float:
    """The loaded candidate's aggregate on a stage's items (positions in each task's dev list),
    under the run's screening precision when `bfloat16`."""
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=bfloat16):
        scores = {t: task.evaluate(scorer.model, indices=[task.selected(None, 0)[i] for i in items[t]])["score"]
                  for t, task in scorer.tasks.items()}
    return aggregate(scores, scorer.weights)


def census_of(scorer: OfflineScorer, ids: list[str], stage_items: tuple, bfloat16: bool) -> dict[str, dict]:
    """{offspring id: its first and second stage (the screen's precision) and full dev scores,
    the full per-example scores}."""
    out = {}
    for cid in ids:
        full, examples = scorer.dev_score(cid)  # loads the weights
        first = subset_score(scorer, stage_items[0], bfloat16)
        second = subset_score(scorer, stage_items[1], bfloat16)
        out[cid] = {"first_offline": first, "second": second, "full": full, "examples": examples}
    return out


# ---------------------------------------------------------------------------------------------
# Replaying selection rules on a whole family
# ---------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Rule:
    name: str
    first: int | None  # how many of the first stage meet the second (None: no second step)
    full: int  # how many are scored in full
    smoothed: bool = False


def step_features(offspring: list[dict]) -> np.ndarray:
    """Design matrix of the smoothed ranking: a level per reference, F, CR, their squares and
    their product (F and CR are the offspring's step sizes, `evolve.evolver.step_size`)."""
    refs = sorted({o["reference"] for o in offspring})
    rows = []
    for o in offspring:
        f, cr = o["F"], o["CR"]
        rows.append([float(o["reference"] == r) for r in refs] + [f, cr, f * f, cr * cr, f * cr])
    return np.asarray(rows)


def smoothed_first(offspring: list[dict]) -> list[float]:
    """The first-stage scores fitted on the step sizes (least squares, minimum norm)."""
    x, y = step_features(offspring), np.asarray([o["first"] for o in offspring])
    coef, *_ = np.linalg.lstsq(x, y, rcond=None)
    return list(x @ coef)


def choose(rule: Rule, offspring: list[dict]) -> tuple[list[str], str]:
    """(ids scored in full, the chosen one: the best of them in full) under `rule`."""
    first = smoothed_first(offspring) if rule.smoothed else [o["first"] for o in offspring]
    ranked = [o for _, o in sorted(zip(first, offspring), key=lambda p: (-p[0], p[1]["id"]))]
    if rule.first is not None:
        ranked = sorted(ranked[:rule.first], key=lambda o: (-o["second"], o["id"]))
    scored = ranked[:rule.full]
    return [o["id"] for o in scored], max(scored, key=lambda o: (o["full"], o["id"]))["id"]


def judge(rule: Rule, family: dict, weights: dict, confidence: float) -> dict:
    """A rule's outcome on one family (`outcome`)."""
    return outcome(family, *choose(rule, family["offspring"]), weights, confidence)


def outcome(family: dict, scored: list[str], chosen: str, weights: dict, confidence: float) -> dict:
    """What choosing `chosen` among the `scored` offspring (scored in full) does to a family: false
    stops (a stopped offspring at least as good in full as the member and the chosen one), the
    ones the full dev sets resolve, the regret and the gain over the member."""
    offspring = family["offspring"]
    by_id = {o["id"]: o for o in offspring}
    member = family["member"]
    holder_score, holder_examples = max((by_id[chosen]["full"], by_id[chosen]["examples"]),
                                        (member["full"], member["examples"]), key=lambda p: p[0])
    stopped = [o for o in offspring if o["id"] not in scored]
    false = [o for o in stopped if o["full"] >= holder_score]
    resolved = [o for o in false if resolved_by_full_dev(o["examples"], holder_examples, weights, confidence)["ahead_beyond_margin"]]
    best = max(o["full"] for o in offspring)
    return {"scored": scored, "chosen": chosen, "stopped": len(stopped), "false": len(false), "resolved": len(resolved),
            "regret": max(0.0, best - holder_score), "gain": holder_score - member["full"]}


def rules_for(lam: int) -> list[Rule]:
    rules = [Rule(f"top {k1} > {k2}", k1, k2) for k1, k2 in ((2, 1), (3, 1), (4, 1), (6, 1), (8, 1), (12, 1), (3, 2), (6, 2))]
    rules += [Rule(f"top {k}", None, k) for k in (1, 2, 3)]
    rules += [Rule(f"smoothed, top {k1} > {k2}", k1, k2, smoothed=True) for k1, k2 in ((3, 1), (6, 1))]
    rules += [Rule("all in full", None, lam)]
    return [r for r in rules if (r.first or r.full) <= lam]


def summarise(rule: Rule, census: list[dict], weights: dict, confidence: float, costs: dict) -> dict:
    outcomes = [judge(rule, f, weights, confidence) for f in census]
    lam = len(census[0]["offspring"])
    screens = 0.0 if rule.full >= lam else lam * costs["first"] + (rule.first or 0) * costs["second"]
    per_family = screens + min(rule.full, lam) * costs["full"]
    stopped = sum(o["stopped"] for o in outcomes)
    return {"rule": rule.name, "actor_s_per_family": round(per_family, 1),
            "speedup": round(costs["full"] * lam / per_family, 2),
            "stopped": stopped, "false": sum(o["false"] for o in outcomes), "resolved": sum(o["resolved"] for o in outcomes),
            "best_chosen": sum(o["regret"] == 0.0 for o in outcomes),
            "mean_gain": round(float(np.mean([o["gain"] for o in outcomes])), 4),
            "mean_regret": round(float(np.mean([o["regret"] for o in outcomes])), 4),
            "max_regret": round(max(o["regret"] for o in outcomes), 4),
            "chosen": [o["chosen"] for o in outcomes]}


# ---------------------------------------------------------------------------------------------

def offspring_record(row: dict, scores: dict) -> dict:
    recipe = row["recipe"]
    return {"id": row["id"], "reference": recipe["inputs"][1], "F": recipe["params"]["F"], "CR": recipe["params"]["CR"],
            "first": row["score"], **scores}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run", type=Path, help="a finished staged merge run with two screening stages")
    parser.add_argument("--families", type=int, default=8)
    parser.add_argument("--seed", type=int, default=0, help="which families")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--name", default="family_census", help="results file stem")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    rows = dev_rows(args.run)
    scorer = OfflineScorer(args.run)
    fitness = scorer.config.fitness
    if len(fitness.stages) != 3:
        raise SystemExit(f"{args.run}: fitness.stages {fitness.stages}: the census replays two screening stages and the full one")
    last = len(fitness.stages) - 1
    sizes = {t: len(task.selected(None, 0)) for t, task in scorer.tasks.items()}
    plan = plan_stages(list(fitness.stages), sizes, scorer.config.seed, fitness.min_items, proxy=False, resample=fitness.resample,
                       item_order=fitness.items)
    bfloat16 = fitness.screen_dtype == "bfloat16"
    full = full_rows(rows, last)
    first_rows = {r["id"]: r for r in rows if r.get("stage") == 0 and r.get("target") and r.get("status") == "ok"}
    costs = {"first": median_seconds(rows, 0), "second": median_seconds(rows, 1), "full": median_seconds(rows, last)}

    out_path = RESULTS / f"{args.name}.json"
    saved = json.loads(out_path.read_text()) if out_path.exists() else {}
    census = saved.get("families", []) if saved.get("run") == args.run.name else []
    done = {(f["generation"], f["member"]["id"]) for f in census}
    started = time.time()
    by_family = families(rows)
    for key in sample_families(list(by_family), args.families, args.seed):
        if key in done:
            continue
        generation, member_id = key
        ids = by_family[key]
        scored = census_of(scorer, ids, plan.indices(generation), bfloat16)
        member = {"id": member_id, "full": full[member_id]["score"],
                  "examples": {t: m["examples"] for t, m in full[member_id]["metrics"].items()}}
        census.append({"generation": generation, "member": member, "promoted": [i for i in ids if i in full], "threads": args.threads,
                       "offspring": [offspring_record(first_rows[i], scored[i]) for i in ids]})
        out_path.write_text(json.dumps({"run": args.run.name, "costs": costs, "families": census}) + "\n")
        print(f"generation {generation + 1}, offspring of {member_id}: {len(ids)} scored, {time.time() - started:.0f} s", flush=True)
    report(args, census, scorer, costs, fitness.confidence)


def thinned(family: dict, every: int) -> dict:
    """The family a smaller lambda would have made: every `every`-th offspring by step size F (the
    k-th sibling draws F from the k-th slice of the range, so the kept ones still span it)."""
    by_step = sorted(family["offspring"], key=lambda o: (o["F"], o["id"]))
    return {**family, "offspring": by_step[::every]}


def one_offspring(census: list[dict]) -> dict:
    """What full scoring with one offspring per member (the full-scoring benchmark's runs) gains
    per family on average: each offspring equally likely to be the one made, scored in full."""
    gains = [max(0.0, o["full"] - f["member"]["full"]) for f in census for o in f["offspring"]]
    return {"mean_gain": round(float(np.mean(gains)), 4), "improves": round(float(np.mean([g > 0 for g in gains])), 3)}


def rule_table(census: list[dict], weights: dict, confidence: float, costs: dict) -> list[str]:
    lam = len(census[0]["offspring"])
    lines = ["| rule | actor s per family | x | stopped | false stops | resolved by the full dev sets | families keeping their best | mean gain over the member | mean regret | max regret |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in (summarise(rule, census, weights, confidence, costs) for rule in rules_for(lam)):
        rate = f"{r['false']} ({r['false'] / r['stopped']:.1%})" if r["stopped"] else "-"
        resolved = f"{r['resolved']} ({r['resolved'] / r['stopped']:.1%})" if r["stopped"] else "-"
        lines.append(f"| {r['rule']} | {r['actor_s_per_family']} | {r['speedup']} | {r['stopped']} | {rate} | {resolved} | "
                     f"{r['best_chosen']} of {len(census)} | {r['mean_gain']} | {r['mean_regret']} | {r['max_regret']} |")
    return lines


def report(args, census: list[dict], scorer: OfflineScorer, costs: dict, confidence: float) -> None:
    lam = len(census[0]["offspring"])
    checks: dict[int, float] = {}  # torch threads of the offline scoring: max |offline - run| first stage
    for f in census:
        gap = max(abs(o["first_offline"] - o["first"]) for o in f["offspring"])
        checks[f.get("threads")] = max(checks.get(f.get("threads"), 0.0), gap)
    shown = "; ".join(f"{gap:.2e} scored under {threads} thread{'s' if threads != 1 else ''}" for threads, gap in sorted(checks.items()))
    advance = scorer.config.fitness.advance  # the run's own rule: per screening stage, or one count for both
    k1, k2 = (advance, advance) if isinstance(advance, int) else tuple(advance)
    run_rule = summarise(Rule(f"top {k1} > {k2}", k1, k2), census, scorer.weights, confidence, costs)
    agrees = sum([chosen] == f["promoted"] for chosen, f in zip(run_rule["chosen"], census))
    lines = [f"# Whole families scored in full ({args.run.name})", "",
             f"{len(census)} families of {lam} offspring (generations "
             f"{', '.join(str(f['generation'] + 1) for f in census)}), every offspring scored on the full dev sets "
             f"(float32) and its generation's second-stage items (the run's screen precision). Actor seconds per "
             f"family at the run's medians: first stage {costs['first']:.2f} s, second {costs['second']:.2f} s, full "
             f"{costs['full']:.2f} s; `x` = full scoring of every offspring over the rule's cost. A false stop: a "
             f"stopped offspring at least as good in full as the member and the one chosen; the gain: how far the better "
             f"of those two is ahead of the member (what the family adds to the population); the regret: how far the "
             f"family's best offspring is ahead of it.", ""]
    lines += rule_table(census, scorer.weights, confidence, costs)
    single = one_offspring(census)
    lines += ["", f"One offspring per member scored in full (the full-scoring runs' selection, {costs['full']:.2f} actor-s "
              f"a family): a mean gain over the member of {single['mean_gain']}; {single['improves']:.0%} of offspring "
              f"improve on their member."]
    half = [thinned(f, 2) for f in census]
    lines += ["", f"The same families with lambda = {len(half[0]['offspring'])}: every other offspring by step size.", ""]
    lines += rule_table(half, scorer.weights, confidence, costs)
    lines += ["", f"Checks: the offline first stage against the journal's, max |diff| {shown} (bfloat16 kernels "
              f"block their sums by thread count; each actor of the run has one); the run's rule `{run_rule['rule']}` replayed chooses the run's promoted offspring in {agrees} "
              f"of {len(census)} families.", "",
              f"`python -m benchmarks.family_census {args.run} --families {args.families}`", ""]
    (RESULTS / f"{args.name}.md").write_text("\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
