"""The family census replayed on fresh draws of the stage items: how much of a rule's false stops
is the luck of the run's draws, and three ways of choosing among siblings that the run's own draws
cannot show (issue 14).

`family_census.md` counts false stops on the run's own draws of the stage items, one draw per
generation. The census holds every offspring's float32 score on every dev item, so a rule can be
replayed on any other draw without scoring anything: here on `--draws` seeded draws
(`search.fitness.staged.stage_subsets`, a fresh draw per generation as with `fitness.resample`),
every stage scored from the float32 per-example scores (the run screens in bfloat16, whose scores
the census holds only as aggregates of the run's own draws). Rules:

- `top k1 > k2`, as in the census: the best k1 of the first stage meet the second, the best k2 of
  those are scored in full, the best of them in full is the family's choice;
- `race c1 > c2`: a statistical cut instead of a fixed count, as racing algorithms select the
  best of many configurations. After each screening stage every sibling goes on unless the paired
  test at confidence c (`search.fitness.staged.compare`) says it is behind the stage's leader,
  the sibling with the best stage score. The test carries the finite-population correction: a
  stage holds part of a finite dev set and what a stop is judged by is the full dev score (with
  every item scored the difference is known exactly). `race 0.75 > 0.9 <= 2` caps the second cut
  at two, `race 0.9 <= 12 > top 2` caps the first at twelve and takes the best two of the second
  screen without a test;
- `top k1 > k2` on **selected items** instead of random ones, in the spirit of MERGE³'s extracted
  subsets: stage k takes the items on which siblings disagree most (`search.fitness.items`, what
  `fitness.items` runs on), the disagreement estimated on other families: on every other family
  (a bound, from fifteen times the offspring a run scores in full), or on the families of the
  generations before (what a run could do if it scored whole families in full as it went).
  Beside each: random draws on the same families. Of four statistics of disagreement replayed
  here (the variance of an offspring's item score less its task mean, pooled over families; and
  within each family: the variance about the family's item mean, the covariance with the
  offspring's task mean, the variance after centring on both) the first stopped the fewest
  siblings falsely on both selections;
- `top k1 > k2` ranked by **estimated full scores**, MERGE³'s other idea: each stage ranks the
  siblings by the expected full score given the items it scored (`ItemModel`, learned on every
  other family or on the generations before), on the same draws as the stage scores beside it.

Beside them, the floor of the count (`on_fresh_dev_sets`): every offspring scored in full on a
bootstrap draw of the dev sets, a stand-in for a second dev set of the same size, and its choice
counted against this one. This dev set chooses with no false stop by construction; another of its
size disagrees with it wherever siblings are near-ties within their sampling noise, so a screening
rule at the floor errs against this dev set no more than full scoring on another would.

`--order FILE` also writes the item order of every family's offspring, for `fitness.items`.

For each rule, pooled over the families and averaged over the draws: actor seconds per family at
the run's median stage timings, `x` (every offspring in full over that), offspring scored in full
per family, false stops as the census counts them (mean, the least and most of any draw, and on
the run's own draws scored in float32), those the full dev sets resolve, and the mean gain of the
family over its member.

    python -m benchmarks.census_draws --draws 8
"""
from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Callable

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"
sys.path.insert(0, str(ROOT))

from benchmarks.family_census import outcome  # noqa: E402
from search.config import load_config  # noqa: E402
from search.fitness.items import item_order, ordered_stage_items  # noqa: E402
from search.fitness.spec import aggregate  # noqa: E402
from search.fitness.staged import compare, stage_subsets  # noqa: E402
from search.run.stages import plan_stages  # noqa: E402

StageItems = list[dict[str, list[int]]]  # per screening stage, {task: item ids}


# ---------------------------------------------------------------------------------------------
# Stage items: fresh random draws, or the items siblings disagree on
# ---------------------------------------------------------------------------------------------

def item_ids(family: dict) -> dict[str, list[int]]:
    """{task: every dev item id, ascending} (the member was scored on all of them; a stage's
    positions index this list, as the run's `task.selected` order does)."""
    return {t: sorted(e["index"]) for t, e in family["member"]["examples"].items()}


def drawn_items(ids: dict[str, list[int]], fractions: list[float], min_items: int, seed: int, generation: int) -> StageItems:
    """The screening stages' items of one seeded draw for one generation (nested, as the run's)."""
    subsets = {t: stage_subsets(len(v), fractions, seed, salt=f"{t}/census draw, generation {generation}", min_items=min_items)
               for t, v in ids.items()}
    return [{t: [ids[t][i] for i in subsets[t][k]] for t in ids} for k in range(len(fractions) - 1)]


def run_items(ids: dict[str, list[int]], config, generation: int) -> StageItems:
    """The screening stages' items the census run itself drew for `generation` (`StagePlan`)."""
    fitness = config.fitness
    plan = plan_stages(list(fitness.stages), {t: len(v) for t, v in ids.items()}, config.seed, fitness.min_items,
                       proxy=False, resample=fitness.resample, item_order=fitness.items)
    drawn = plan.indices(generation)
    return [{t: [ids[t][i] for i in drawn[k][t]] for t in ids} for k in range(plan.last)]


def selected_items(ids: dict[str, list[int]], fractions: list[float], min_items: int, chosen_on: list[dict]) -> StageItems:
    """The stages' items where the offspring of the `chosen_on` families disagree most
    (`search.fitness.items`), as a run with `fitness.items` takes them."""
    order = item_order([o["examples"] for f in chosen_on for o in f["offspring"]], ids)
    stages = {t: ordered_stage_items(order[t], len(v), fractions, min_items) for t, v in ids.items()}
    return [{t: [ids[t][p] for p in stages[t][k]] for t in ids} for k in range(len(fractions) - 1)]


# ---------------------------------------------------------------------------------------------
# Screening a family
# ---------------------------------------------------------------------------------------------

def restricted(examples: dict, items: dict[str, list[int]]) -> dict:
    """Per-example scores narrowed to a stage's items."""
    out = {}
    for t, e in examples.items():
        keep = set(items[t])
        at = [k for k, i in enumerate(e["index"]) if i in keep]
        out[t] = {key: [e[key][k] for k in at] for key in ("index", "value", "weight")}
    return out


def stage_score(examples: dict, weights: dict[str, float]) -> float:
    """The aggregate on the items held of each task's sum(value) / sum(weight), the task score
    every kind reports (`search.fitness.staged.paired_difference`)."""
    return aggregate({t: sum(examples[t]["value"]) / sum(examples[t]["weight"]) for t in weights}, weights)


@dataclass(frozen=True)
class Cut:
    """Who goes on after a screening stage: the paired test against the stage's leader at
    `confidence` (None: no test), then at most `cap` by stage score (None: no cap)."""
    confidence: float | None = None
    cap: int | None = None


@dataclass(frozen=True)
class DrawRule:
    name: str
    cuts: tuple[Cut, ...]  # one per screening stage


def screen(offspring: list[dict], stages: StageItems, rule: DrawRule, weights: dict[str, float],
           population: dict[str, int], rank_by: Callable[[dict], float] | None = None) -> tuple[list[int], list[str]]:
    """(how many offspring each stage scored, then how many are scored in full; the ids scored in
    full) under `rule`, each stage ranking the offspring by `rank_by` of the scores it holds
    (default: their stage score)."""
    rank_by = rank_by or (lambda held: stage_score(held, weights))
    alive, counts = list(offspring), []
    for items, cut in zip(stages, rule.cuts):
        counts.append(len(alive))
        held = {o["id"]: restricted(o["examples"], items) for o in alive}
        ranked = sorted(alive, key=lambda o: (-rank_by(held[o["id"]]), o["id"]))
        leader = held[ranked[0]["id"]]
        if cut.confidence is not None:
            ranked = [ranked[0]] + [o for o in ranked[1:] if compare(held[o["id"]], leader, weights, cut.confidence,
                                                                     population_sizes=population).can_still_win]
        alive = ranked[:cut.cap] if cut.cap else ranked
    return counts + [len(alive)], [o["id"] for o in alive]


def family_cost(counts: list[int], costs: dict[str, float]) -> float:
    """Actor seconds of a family at the run's medians: its first and second screens, then full."""
    first, second, full = counts
    return first * costs["first"] + second * costs["second"] + full * costs["full"]


def replay(census: list[dict], rule: DrawRule, stages_of: Callable[[dict], StageItems], weights: dict[str, float],
           confidence: float, costs: dict[str, float], rank_of: Callable[[dict], Callable[[dict], float]] | None = None) -> dict:
    """A rule on every family of the census, each family screened on `stages_of(family)` and its
    offspring ranked by `rank_of(family)` (default: their stage scores)."""
    spent, in_full, stopped, false, resolved, gains = 0.0, 0, 0, 0, 0, []
    for family in census:
        population = {t: len(v) for t, v in item_ids(family).items()}
        counts, scored = screen(family["offspring"], stages_of(family), rule, weights, population,
                                rank_of(family) if rank_of else None)
        chosen = max((o for o in family["offspring"] if o["id"] in scored), key=lambda o: (o["full"], o["id"]))["id"]
        result = outcome(family, scored, chosen, weights, confidence)
        spent += family_cost(counts, costs)
        in_full += len(scored)
        stopped += result["stopped"]
        false += result["false"]
        resolved += result["resolved"]
        gains.append(result["gain"])
    lam = len(census[0]["offspring"])
    return {"x": costs["full"] * lam * len(census) / spent, "actor_s": spent / len(census), "in_full": in_full / len(census),
            "stopped": stopped, "false": false, "resolved": resolved, "gain": float(np.mean(gains))}


# ---------------------------------------------------------------------------------------------
# Estimated full scores: the items a stage did not score, predicted from those it did
# ---------------------------------------------------------------------------------------------

def item_columns(family: dict) -> list[tuple[str, int]]:
    """Every dev item as (task, item id), tasks in name order."""
    return [(t, i) for t, v in sorted(item_ids(family).items()) for i in v]


def per_item(examples: dict, columns: list[tuple[str, int]]) -> tuple[np.ndarray, np.ndarray]:
    """(value, weight) of each column an examples record holds; zero where it holds none."""
    at = {c: k for k, c in enumerate(columns)}
    value, weight = np.zeros(len(columns)), np.zeros(len(columns))
    for t, e in examples.items():
        for i, v, w in zip(e["index"], e["value"], e["weight"]):
            value[at[(t, i)]], weight[at[(t, i)]] = v, w
    return value, weight


def differences(family: dict) -> np.ndarray:
    """Offspring x items: each offspring's item value less its member's, per unit of weight (per
    token for a perplexity item, the answer itself for an accuracy item)."""
    columns = item_columns(family)
    member, weight = per_item(family["member"]["examples"], columns)
    return np.array([(per_item(o["examples"], columns)[0] - member) / weight for o in family["offspring"]])


@dataclass
class ItemModel:
    """How the item differences of an offspring from its member co-vary, learned on other families:
    their mean and covariance, shrunk toward its diagonal by `shrink` (with 20-100 families' worth
    of offspring the sample covariance of 160 items is singular). A stage's estimate of an offspring's
    full score is the Gaussian conditional expectation of the items it did not score given those it
    did, as MERGE³ estimates a merged model's accuracy from a subset with an IRT model fitted on other
    models' answers: the same idea, for perplexity items as well as right/wrong answers."""
    columns: list[tuple[str, int]]
    mean: np.ndarray
    covariance: np.ndarray
    _gains: dict = field(default_factory=dict, repr=False, compare=False)  # seen items -> `gain`

    @cached_property
    def column_tasks(self) -> np.ndarray:
        """Each column's task name."""
        return np.array([t for t, _ in self.columns])

    @classmethod
    def learned(cls, families: list[dict], shrink: float) -> "ItemModel":
        d = np.concatenate([differences(f) for f in families])
        sample = np.cov(d, rowvar=False)
        covariance = (1 - shrink) * sample + shrink * np.diag(np.diag(sample))
        return cls(item_columns(families[0]), d.mean(axis=0), covariance)

    def gain(self, seen: tuple[int, ...]) -> np.ndarray:
        """Cov(unseen, seen) Cov(seen, seen)^-1: how a seen item's surprise moves each unseen one."""
        if seen not in self._gains:
            unseen = np.setdiff1d(np.arange(len(self.columns)), seen)
            c = self.covariance
            self._gains[seen] = np.linalg.lstsq(c[np.ix_(seen, seen)], c[np.ix_(seen, unseen)], rcond=None)[0].T
        return self._gains[seen]

    def estimate(self, held: dict, member: dict, weights: dict[str, float]) -> float:
        """The expected full aggregate of an offspring holding `held`, whose member's full record
        is `member`: seen items as scored, each unseen one its member's value plus the expected
        difference, then every task's sum(value) / sum(weight) as `stage_score`."""
        value, weight = per_item(member, self.columns)
        held_value, held_weight = per_item(held, self.columns)
        seen = np.flatnonzero(held_weight)
        unseen = np.setdiff1d(np.arange(len(self.columns)), seen)
        # E[d_U | d_S] = mean_U + Cov(U, S) Cov(S, S)^-1 (d_S - mean_S), d per unit of weight
        surprise = (held_value[seen] - value[seen]) / weight[seen] - self.mean[seen]
        value[seen] = held_value[seen]
        value[unseen] += weight[unseen] * (self.mean[unseen] + self.gain(tuple(seen.tolist())) @ surprise)
        tasks = self.column_tasks
        return aggregate({t: value[tasks == t].sum() / weight[tasks == t].sum() for t in weights}, weights)


def on_estimates(census: list[dict], rule: DrawRule, earlier: bool, shrink: float, draws: int, fractions: list[float],
                 min_items: int, weights: dict[str, float], confidence: float, costs: dict[str, float]) -> tuple[dict, dict]:
    """`over_draws` with each stage ranking the offspring by their estimated full score, the item
    model learned on every other family or (`earlier`) on the families of the generations before
    (the first generation is not judged); and the stage scores on the same draws and families."""
    first = min(f["generation"] for f in census)
    judged = [f for f in census if not earlier or f["generation"] > first]
    models = {id(f): ItemModel.learned([c for c in census if (c["generation"] < f["generation"] if earlier else c is not f)], shrink)
              for f in judged}

    def rank_of(family: dict) -> Callable[[dict], float]:
        return lambda held: models[id(family)].estimate(held, family["member"]["examples"], weights)

    shared = (draws, fractions, min_items, weights, confidence, costs)
    return over_draws(judged, rule, *shared, rank_of), over_draws(judged, rule, *shared)


# ---------------------------------------------------------------------------------------------
# The floor: every offspring scored in full, on a fresh draw of the dev sets
# ---------------------------------------------------------------------------------------------

def fresh_dev_set(ids: dict[str, list[int]], seed: int) -> dict[str, dict[int, int]]:
    """A bootstrap draw of the dev sets, one per run: each task's n items drawn n times with
    replacement, as {task: {item id: times drawn}}. The draw stands in for a second dev set of the
    same size from the same source; an item drawn k times counts k times."""
    draw = {}
    for k, (t, v) in enumerate(sorted(ids.items())):
        picks = np.random.default_rng([seed, k]).integers(0, len(v), size=len(v))
        draw[t] = {v[i]: int(c) for i, c in zip(*np.unique(picks, return_counts=True))}
    return draw


def resampled_score(examples: dict, draw: dict[str, dict[int, int]], weights: dict[str, float]) -> float:
    """`stage_score` on a bootstrap draw: each task's sum(times x value) / sum(times x weight)."""
    scores = {}
    for t in weights:
        e = examples[t]
        times = np.array([draw[t].get(i, 0) for i in e["index"]], dtype=np.float64)
        scores[t] = float(times @ np.asarray(e["value"], dtype=np.float64)) / float(times @ np.asarray(e["weight"], dtype=np.float64))
    return aggregate(scores, weights)


def on_fresh_dev_sets(census: list[dict], draws: int, weights: dict[str, float], confidence: float) -> dict:
    """The floor of the false-stop count: every offspring scored in full on a fresh draw of the dev
    sets (`fresh_dev_set`, one per seeded draw, shared by the run's generations as a dev set is),
    the best there chosen, and its choice counted against this dev set as a rule's is (`outcome`).
    Scoring on this dev set chooses with no false stop by construction; on another of the same
    size it stops siblings "falsely" wherever the verdict between near-ties is either set's
    sampling luck. A screening rule at this rate errs against this dev set no more than full
    scoring on another would. The mean, least and most of the rate over the draws, the rate the
    full dev sets resolve, and the mean gain."""
    runs = []
    ids = item_ids(census[0])  # every family's member was scored on the same dev sets
    for seed in range(draws):
        stopped = false = resolved = 0
        gains = []
        draw = fresh_dev_set(ids, seed)
        for family in census:
            chosen = max(family["offspring"], key=lambda o: (resampled_score(o["examples"], draw, weights), o["id"]))["id"]
            result = outcome(family, [chosen], chosen, weights, confidence)
            stopped, false, resolved = stopped + result["stopped"], false + result["false"], resolved + result["resolved"]
            gains.append(result["gain"])
        runs.append({"rate": false / stopped, "resolved": resolved / stopped, "gain": float(np.mean(gains))})
    rates = [r["rate"] for r in runs]
    return {"draws": draws, "false_rate": float(np.mean(rates)), "false_low": min(rates), "false_high": max(rates),
            "resolved_rate": float(np.mean([r["resolved"] for r in runs])), "gain": float(np.mean([r["gain"] for r in runs]))}


# ---------------------------------------------------------------------------------------------
# The report
# ---------------------------------------------------------------------------------------------

def cut_name(cut: Cut) -> str:
    """`0.9`, `0.9 <= 12` (a test, then a cap) or `top 12` (a cap alone)."""
    if cut.confidence is None:
        return f"top {cut.cap}"
    return f"{cut.confidence}" + (f" <= {cut.cap}" if cut.cap else "")


def rules() -> list[DrawRule]:
    top = [DrawRule(f"top {k1} > {k2}", (Cut(cap=k1), Cut(cap=k2))) for k1, k2 in ((3, 1), (6, 1), (12, 1), (24, 1), (6, 2), (12, 2), (6, 3))]
    race_cuts = [(Cut(0.75), Cut(0.6)), (Cut(0.75), Cut(0.75, 3)), (Cut(0.75), Cut(0.9, 2)), (Cut(0.9), Cut(0.75, 2)),
                 (Cut(0.9), Cut(0.75, 3)), (Cut(0.9), Cut(None, 2)), (Cut(0.95), Cut(0.75, 2)),
                 # the first race capped: fewer second screens, to bring a race to 5x
                 (Cut(0.9, 8), Cut(None, 2)), (Cut(0.9, 12), Cut(None, 2)), (Cut(0.9, 12), Cut(0.9, 2)), (Cut(0.95, 12), Cut(0.75, 2))]
    return top + [DrawRule("race " + " > ".join(cut_name(c) for c in cuts), cuts) for cuts in race_cuts]


def over_draws(census: list[dict], rule: DrawRule, draws: int, fractions: list[float], min_items: int,
               weights: dict[str, float], confidence: float, costs: dict[str, float],
               rank_of: Callable[[dict], Callable[[dict], float]] | None = None) -> dict:
    """`replay` on each seeded draw of the stage items: the mean of each figure, and the range of
    the false-stop rate."""
    runs = [replay(census, rule, lambda f, s=seed: drawn_items(item_ids(f), fractions, min_items, s, f["generation"]),
                   weights, confidence, costs, rank_of) for seed in range(draws)]
    rates = [r["false"] / r["stopped"] for r in runs]
    mean = {k: float(np.mean([r[k] for r in runs])) for k in runs[0]}
    return {**mean, "false_rate": float(np.mean(rates)), "false_low": min(rates), "false_high": max(rates),
            "resolved_rate": float(np.mean([r["resolved"] / r["stopped"] for r in runs]))}


def on_selected(census: list[dict], rule: DrawRule, earlier: bool, fractions: list[float], min_items: int,
                weights: dict[str, float], confidence: float, costs: dict[str, float]) -> dict:
    """`replay` on selected items: each family judged on items chosen from every other family, or
    (`earlier`) from the families of the generations before its own (the first generation is not
    judged: nothing came before it)."""
    judged = [f for f in census if not earlier or f["generation"] > min(c["generation"] for c in census)]

    def stages_of(family: dict) -> StageItems:
        chosen_on = [f for f in census if (f["generation"] < family["generation"] if earlier else f is not family)]
        return selected_items(item_ids(family), fractions, min_items, chosen_on)

    run = replay(judged, rule, stages_of, weights, confidence, costs)
    generations = sorted({f["generation"] for f in judged})
    by_generation = {g: replay([f for f in judged if f["generation"] == g], rule, stages_of, weights, confidence, costs)
                     for g in generations} if earlier else {}
    return {**run, "false_rate": run["false"] / run["stopped"], "resolved_rate": run["resolved"] / run["stopped"],
            "by_generation": {g + 1: r["false"] / r["stopped"] for g, r in by_generation.items()}, "judged": judged}


def table(rows: list[tuple[str, dict, dict]]) -> list[str]:
    """Random draws, and the run's own draws."""
    lines = ["| rule | actor s per family | x | in full per family | false stops: mean (draws: least - most) | "
             "on the run's draws | resolved by the full dev sets | mean gain over the member |",
             "|---|---|---|---|---|---|---|---|"]
    for name, r, own in rows:
        lines.append(f"| {name} | {r['actor_s']:.1f} | {r['x']:.2f} | {r['in_full']:.2f} | {r['false_rate']:.1%} "
                     f"({r['false_low']:.1%} - {r['false_high']:.1%}) | {own['false'] / own['stopped']:.1%} | "
                     f"{r['resolved_rate']:.1%} | {r['gain']:.4f} |")
    return lines


def selected_table(rows: list[tuple[str, dict, dict]]) -> list[str]:
    """Selected items beside random draws on the same families (and, when chosen on earlier
    generations, their false stops per generation judged)."""
    per_generation = bool(rows[0][1]["by_generation"])
    lines = ["| rule | x | selected items: false stops | " + ("by generation judged | " if per_generation else "")
             + "resolved | mean gain | random draws: false stops, mean (least - most) | mean gain |",
             "|---|---|---|---|---|---|---|" + ("---|" if per_generation else "")]
    for name, picked, drawn in rows:
        shown = ", ".join(f"{g}: {rate:.1%}" for g, rate in picked["by_generation"].items())
        lines.append(f"| {name} | {picked['x']:.2f} | {picked['false_rate']:.1%} ({picked['false']} of {picked['stopped']}) | "
                     + (f"{shown} | " if per_generation else "")
                     + f"{picked['resolved_rate']:.1%} | {picked['gain']:.4f} | {drawn['false_rate']:.1%} "
                     f"({drawn['false_low']:.1%} - {drawn['false_high']:.1%}) | {drawn['gain']:.4f} |")
    return lines


def estimated_table(rows: list[tuple[str, dict, dict]]) -> list[str]:
    """Ranked by estimated full scores beside ranked by stage scores, on the same draws."""
    lines = ["| rule | x | estimated: false stops, mean (least - most) | resolved | mean gain | "
             "stage scores: false stops, mean (least - most) | resolved | mean gain |", "|---|---|---|---|---|---|---|---|"]
    for name, est, raw in rows:
        lines.append(f"| {name} | {est['x']:.2f} | " + " | ".join(
            f"{r['false_rate']:.1%} ({r['false_low']:.1%} - {r['false_high']:.1%}) | {r['resolved_rate']:.1%} | {r['gain']:.4f}"
            for r in (est, raw)) + " |")
    return lines


def floor_lines(floor: dict, drawn: list[tuple[str, dict, dict]]) -> list[str]:
    """The floor's row, then each rule's mean false-stop rate over it."""
    lines = ["| selection | false stops: mean (draws: least - most) | resolved by the full dev sets | mean gain over the member |",
             "|---|---|---|---|",
             f"| every offspring in full, on {floor['draws']} bootstrap draws of the dev sets | {floor['false_rate']:.1%} "
             f"({floor['false_low']:.1%} - {floor['false_high']:.1%}) | {floor['resolved_rate']:.1%} | {floor['gain']:.4f} |", ""]
    within = [name for name, r, _ in drawn if r["false_rate"] <= floor["false_rate"]]
    lines.append("A bootstrap draw stands in for a second dev set of the same size: the rate is how often full scoring "
                 "on it stops a sibling that this dev set puts ahead of its choice (and of the member): how much of a "
                 "dev set's verdict between near-ties is sampling luck. A rule at the floor errs against this dev set no more than full "
                 "scoring on another would. Each rule's mean false-stop rate over the floor, in points: "
                 + ", ".join(f"{name} {100 * (r['false_rate'] - floor['false_rate']):+.1f}" for name, r, _ in drawn)
                 + (f". At or under it: {', '.join(within)}." if within else ". None is at or under it."))
    return lines


def shown(path: Path) -> str:
    """A path as a reader of the results finds it: from the repository root when inside it."""
    try:
        return str(path.resolve().relative_to(ROOT))
    except ValueError:
        return str(path)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--census", type=Path, default=RESULTS / "family_census.json", help="family_census.py's results")
    parser.add_argument("--config", type=Path, default=ROOT / "configs" / "demo.yaml",
                        help="the census run's config: its stages, min_items, confidence and task weights")
    parser.add_argument("--draws", type=int, default=8)
    parser.add_argument("--name", default="census_draws", help="results file stem")
    parser.add_argument("--shrink", type=float, default=0.5,
                        help="how far the item covariance of the estimated full scores is shrunk toward its diagonal (0-1)")
    parser.add_argument("--order", type=Path, help="write the item order of every family's offspring here (for fitness.items)")
    parser.add_argument("--dev-draws", type=int, default=32,
                        help="bootstrap draws of the dev sets for the floor of the false-stop count")
    args = parser.parse_args()
    if not 0.0 <= args.shrink <= 1.0:
        parser.error(f"--shrink: {args.shrink} is not between 0 and 1")
    if args.dev_draws < 1:
        parser.error(f"--dev-draws: {args.dev_draws} is not a positive count")
    saved = json.loads(args.census.read_text())
    census, costs = saved["families"], saved["costs"]
    config = load_config(args.config)
    fitness = config.fitness
    if len(fitness.stages) != 3:
        raise SystemExit(f"{args.config}: fitness.stages {fitness.stages}: the census replays two screening stages and the full one")
    fractions, weights = list(fitness.stages), {t.name: t.weight for t in config.tasks}
    shared = (fractions, fitness.min_items, weights, fitness.confidence, costs)

    drawn = [(r.name, over_draws(census, r, args.draws, *shared),
              replay(census, r, lambda f: run_items(item_ids(f), config, f["generation"]), weights, fitness.confidence, costs))
             for r in rules()]
    top = [r for r in rules() if r.name.startswith("top")]
    selections = {}
    for earlier in (False, True):
        rows = []
        for rule in top:
            picked = on_selected(census, rule, earlier, *shared)
            rows.append((rule.name, picked, over_draws(picked.pop("judged"), rule, args.draws, *shared)))
        selections["earlier generations" if earlier else "every other family"] = rows
    floor = on_fresh_dev_sets(census, args.dev_draws, weights, fitness.confidence)
    estimates = {earlier: [(rule.name, *on_estimates(census, rule, earlier, args.shrink, args.draws, *shared)) for rule in top]
                 for earlier in (False, True)}
    lam, later = len(census[0]["offspring"]), sum(f["generation"] > min(c["generation"] for c in census) for f in census)
    lines = [f"# The family census on fresh draws of the stage items ({saved['run']})", "",
             f"{len(census)} families of {lam} offspring from `{shown(args.census)}`, every stage scored from the "
             f"float32 per-example scores; costs at the run's medians (first stage {costs['first']:.2f} s, second "
             f"{costs['second']:.2f} s, full {costs['full']:.2f} s). A false stop: a stopped offspring at least as good in "
             f"full as the member and the one chosen (`family_census.md`); resolved: ahead by more than the full dev sets' "
             f"paired margin at {fitness.confidence}.", "",
             f"## {args.draws} seeded draws of the stage items (a fresh draw per generation)", ""]
    lines += table(drawn)
    lines += ["", "## The floor: every offspring in full, on a fresh draw of the dev sets", ""]
    lines += floor_lines(floor, drawn)
    lines += ["", "## Selected items: each stage takes the items siblings disagree on most", "",
              f"Chosen on every other family ({len(census) - 1} families, {(len(census) - 1) * lam} offspring scored in full: "
              f"a bound), against {args.draws} random draws:", ""]
    lines += selected_table(selections["every other family"])
    lines += ["", f"Chosen on the families of the generations before (the {later} families after the first generation "
              f"judged: generation k's items chosen on the {lam} offspring of each family of generations 1 to k - 1), "
              f"against {args.draws} random draws on those families:", ""]
    lines += selected_table(selections["earlier generations"])
    lines += ["", "## Estimated full scores: each stage ranks siblings by their expected full score", "",
              f"The items a stage did not score, predicted from those it did (`ItemModel`: the Gaussian conditional "
              f"expectation of an offspring's item differences from its member, their covariance shrunk {args.shrink:g} toward "
              f"its diagonal; MERGE³'s subset estimate with a Gaussian model in place of IRT, since one task is perplexity). "
              f"The same {args.draws} draws, ranked by the estimate and by the stage score. Learned on every other family "
              f"(a bound):", ""]
    lines += estimated_table(estimates[False])
    lines += ["", f"Learned on the families of the generations before (the {later} families after the first generation):", ""]
    lines += estimated_table(estimates[True])
    if args.order:
        every = item_order([o["examples"] for f in census for o in f["offspring"]], item_ids(census[0]))
        args.order.write_text(json.dumps(every) + "\n")
        lines += ["", f"The item order of all {len(census) * lam} offspring: `{shown(args.order)}` (for `fitness.items`)."]
    lines += ["", f"`python -m benchmarks.census_draws --census {shown(args.census)} --config {shown(args.config)} "
              f"--draws {args.draws} --dev-draws {args.dev_draws} --shrink {args.shrink:g} --name {args.name}" + (f" --order {shown(args.order)}" if args.order else "") + "`", ""]
    (RESULTS / f"{args.name}.md").write_text("\n".join(lines))
    (RESULTS / f"{args.name}.json").write_text(json.dumps(
        {"run": saved["run"], "draws": args.draws, "random_draws": {name: r for name, r, _ in drawn}, "run_draws": {name: own for name, _, own in drawn},
         "fresh_dev_sets": floor,
         "selected": {k: [{"rule": name, "selected": picked, "random": random} for name, picked, random in rows]
                      for k, rows in selections.items()},
         "estimated": {"shrink": args.shrink, **{"earlier generations" if earlier else "every other family":
                                                 [{"rule": name, "estimated": est, "stage_scores": raw} for name, est, raw in rows]
                                                 for earlier, rows in estimates.items()}}}, indent=1) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
