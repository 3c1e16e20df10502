"""The family census on dev sets of other sizes: how a sibling rule's false stops, and their floor,
move with the number of dev items (issue 14).

A false sibling stop (`family_census.md`) is a stopped offspring at least as good in full as the
member and the sibling chosen. On the demo's dev sets (32 text pieces, 64 and 64 right/wrong items)
the demo's rule stops about a quarter of siblings falsely, and full scoring of every sibling on a
second dev set of the same size about 5-7% ("the floor", `census_draws.md`). Both counts are set by
how far apart siblings are against the dev sets' item noise: a first stage of a sixteenth of the
items holds 4 right/wrong answers per task, and a 64-item dev set's own verdict between siblings
0.01 apart is luck. This replay asks what the same rule does on larger (and smaller) dev sets.

The census holds every offspring's score on every dev item of its family. Those items are taken as
the population the tasks' items come from: a dev set of `scale` times the demo's size is drawn from
each task's items with replacement (a bootstrap: a dev set four times as large is what the same
source would give, to the extent that 64 items show the source), and on it

- the rule (`top k1 > k2`, as in the census): stages drawn from that dev set with the config's
  fractions and `min_items`, a fresh draw per generation, the best k1 of the first stage meet the
  second, the best k2 of those are scored in full and the best in full is the family's choice;
  its false stops are counted against the drawn dev set's full scores;
- the floor: every offspring scored in full on a second dev set drawn independently at the same
  size, the best there chosen and counted against the first.

`--scales` lists the sizes; `own` is the census's dev sets themselves (each item once, the floor's
second dev set a bootstrap of them), which reproduces `census_draws`' random draws and floor;
`subset:f` (f <= 0.5) draws without replacement, as real smaller dev sets would be: a seeded f of
each task's items, and the floor's second dev set another f of them, disjoint from the first. At
the sizes both can take, the two kinds of draw check the bootstrap that the larger sizes rest on.
A stage's share of the items is the config's at every size, so its share of a full evaluation's
cost is too (less the making of the candidate, a fixed 0.3 s: larger dev sets make the ratio
better).

    python -m benchmarks.census_dev_size --draws 16
"""
from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"
sys.path.insert(0, str(ROOT))

from benchmarks.census_draws import shown  # noqa: E402
from search.cli import positive_number  # noqa: E402
from search.config import load_config  # noqa: E402
from search.fitness.staged import compare, stage_subsets  # noqa: E402

Positions = dict[str, np.ndarray]  # {task: which census items a dev set (or stage) holds, repeats allowed}


@dataclass(frozen=True)
class DevSize:
    """How a replay's dev sets are drawn: `scale` times the census's size (None: the census's
    own), with replacement (`subset` False) or without."""
    scale: float | None = None
    subset: bool = False

    @property
    def name(self) -> str:
        if self.scale is None:
            return "own (each item once)"
        return f"{self.scale:g}x, " + ("a subset (each item once)" if self.subset else "drawn")

    @property
    def arg(self) -> str:
        return "own" if self.scale is None else ("subset:" if self.subset else "") + f"{self.scale:g}"


# ---------------------------------------------------------------------------------------------
# A family as matrices: row 0 the member, then its offspring; one column per dev item
# ---------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Family:
    generation: int
    ids: tuple[str, ...]  # row ids: the member's, then the offspring's
    values: dict[str, np.ndarray]  # task -> (rows, items): each item's score (a right answer, a text piece's -NLL)
    weights: dict[str, np.ndarray]  # task -> (rows, items): what the item counts for (1, a text piece's tokens)

    @property
    def sizes(self) -> dict[str, int]:
        return {t: v.shape[1] for t, v in self.values.items()}


def family_matrix(family: dict) -> Family:
    """The census family as matrices, every row's items in the member's ascending id order."""
    rows = [family["member"], *family["offspring"]]
    values, weights = {}, {}
    for task, member_examples in family["member"]["examples"].items():
        ids = sorted(member_examples["index"])
        columns = []
        for row in rows:
            e = row["examples"][task]
            at = {i: k for k, i in enumerate(e["index"])}
            if sorted(at) != ids:
                raise ValueError(f"census family of {family['member']['id']}: {row['id']} was not scored on the member's {task} items")
            columns.append([(e["value"][at[i]], e["weight"][at[i]]) for i in ids])
        table = np.asarray(columns, dtype=np.float64)  # (rows, items, 2)
        values[task], weights[task] = table[..., 0], table[..., 1]
    return Family(family["generation"], tuple(r["id"] for r in rows), values, weights)


def scores(family: Family, held: Positions, task_weights: dict[str, float]) -> np.ndarray:
    """Every row's aggregate on the items `held`: the weighted mean over tasks of each task's
    sum(value) / sum(weight) (`search.fitness.spec.aggregate`)."""
    total = sum(w * family.values[t][:, held[t]].sum(1) / family.weights[t][:, held[t]].sum(1) for t, w in task_weights.items())
    return total / sum(task_weights.values())


def examples_at(family: Family, row: int, held: Positions) -> dict:
    """A row's per-example scores on the items `held`, each held item (a repeat too) one example."""
    return {t: {"index": list(range(len(p))), "value": family.values[t][row, p].tolist(), "weight": family.weights[t][row, p].tolist()}
            for t, p in held.items()}


# ---------------------------------------------------------------------------------------------
# Dev sets and their stages
# ---------------------------------------------------------------------------------------------

def own_dev_set(sizes: dict[str, int]) -> Positions:
    return {t: np.arange(n) for t, n in sizes.items()}


def drawn_dev_set(sizes: dict[str, int], scale: float, seed: int, stream: tuple[int, ...] = ()) -> Positions:
    """A dev set of round(scale * n) items per task drawn with replacement from the task's n census
    items. With scale 1 and no stream it is `census_draws.fresh_dev_set`'s bootstrap draw."""
    return {t: np.random.default_rng([seed, k, *stream]).integers(0, n, size=max(1, round(scale * n)))
            for k, (t, n) in enumerate(sorted(sizes.items()))}


def subset_dev_sets(sizes: dict[str, int], fraction: float, seed: int) -> tuple[Positions, Positions]:
    """Two disjoint dev sets of round(fraction * n) distinct items per task (fraction <= 0.5): two
    independent draws without replacement from the census's items, as a source's smaller dev sets are."""
    first, second = {}, {}
    for k, (t, n) in enumerate(sorted(sizes.items())):
        m = max(1, round(fraction * n))
        order = np.random.default_rng([seed, k, 3]).permutation(n)
        first[t], second[t] = order[:m], order[m:2 * m]
    return first, second


def stages_of(dev: Positions, fractions: list[float], min_items: int, seed: int, generation: int) -> list[Positions]:
    """The screening stages' items of one seeded draw for one generation, drawn from `dev` as a run
    draws them from its dev set (nested; the salt is `census_draws.drawn_items`', so on the census's
    own dev sets these are its draws)."""
    subsets = {t: stage_subsets(len(p), fractions, seed, salt=f"{t}/census draw, generation {generation}", min_items=min_items)
               for t, p in dev.items()}
    return [{t: p[subsets[t][k]] for t, p in dev.items()} for k in range(len(fractions) - 1)]


# ---------------------------------------------------------------------------------------------
# One family on one dev set
# ---------------------------------------------------------------------------------------------

def screened(family: Family, stages: list[Positions], caps: tuple[int, ...], task_weights: dict[str, float]) -> list[int]:
    """The offspring rows scored in full under `top caps[0] > caps[1] > ...`: after each stage the
    best `cap` by stage score go on (ties broken by id, as `census_draws.screen`)."""
    alive = list(range(1, len(family.ids)))
    for held, cap in zip(stages, caps):
        stage = scores(family, held, task_weights)
        alive = sorted(alive, key=lambda r: (-stage[r], family.ids[r]))[:cap]
    return alive


def verdict(family: Family, dev: Positions, scored: list[int], full: np.ndarray, task_weights: dict[str, float],
            confidence: float) -> dict:
    """What choosing the best of `scored` in full does to the family, judged on `dev` with its full
    scores `full` (`family_census.outcome`): stopped offspring, the false stops (at least as good as
    the member and the chosen one), those the dev set's paired test resolves, and the gain."""
    chosen = max(scored, key=lambda r: (full[r], family.ids[r]))
    holder = chosen if full[chosen] >= full[0] else 0
    stopped = [r for r in range(1, len(family.ids)) if r not in scored]
    false = [r for r in stopped if full[r] >= full[holder]]
    holder_examples = examples_at(family, holder, dev) if false else None
    resolved = [r for r in false
                if not compare(holder_examples, examples_at(family, r, dev), task_weights, confidence).can_still_win]
    return {"stopped": len(stopped), "false": len(false), "resolved": len(resolved), "gain": float(full[holder] - full[0])}


def on_dev_set(families: list[Family], dev: Positions, second: Positions, caps: tuple[int, ...], fractions: list[float],
               min_items: int, seed: int, task_weights: dict[str, float], confidence: float) -> dict:
    """The rule and the floor on one draw: every family judged on `dev`, as a run's dev set serves
    its generations, the floor choosing on `second`; counts pooled over the families."""
    rule = {"stopped": 0, "false": 0, "resolved": 0, "gain": 0.0}
    floor = dict(rule)
    for family in families:
        full = scores(family, dev, task_weights)
        stages = stages_of(dev, fractions, min_items, seed, family.generation)
        second_full = scores(family, second, task_weights)
        floor_choice = max(range(1, len(family.ids)), key=lambda r: (second_full[r], family.ids[r]))
        for total, scored in ((rule, screened(family, stages, caps, task_weights)), (floor, [floor_choice])):
            for key, value in verdict(family, dev, scored, full, task_weights, confidence).items():
                total[key] += value
    for total in (rule, floor):
        total["gain"] /= len(families)
    return {"rule": rule, "floor": floor}


def dev_sets(sizes: dict[str, int], size: DevSize, seed: int) -> tuple[Positions, Positions]:
    """One draw's dev set and the floor's second dev set (`DevSize`)."""
    if size.scale is None:
        return own_dev_set(sizes), drawn_dev_set(sizes, 1.0, seed)
    if size.subset:
        return subset_dev_sets(sizes, size.scale, seed)
    return drawn_dev_set(sizes, size.scale, seed, (1,)), drawn_dev_set(sizes, size.scale, seed, (2,))


def at_scale(families: list[Family], size: DevSize, caps: tuple[int, ...], fractions: list[float], min_items: int,
             draws: int, task_weights: dict[str, float], confidence: float) -> dict:
    """The rule and the floor over `draws` seeded draws at one dev-set size: each rate's mean,
    least and most, and the first draw's items per task and stage."""
    drawn = [dev_sets(families[0].sizes, size, seed) for seed in range(draws)]
    runs = [on_dev_set(families, dev, second, caps, fractions, min_items, seed, task_weights, confidence)
            for seed, (dev, second) in enumerate(drawn)]
    dev = drawn[0][0]
    stage_items = [{t: len(p) for t, p in held.items()} for held in stages_of(dev, fractions, min_items, 0, 0)]
    out = {"size": size.arg, "items": {t: len(p) for t, p in dev.items()}, "stage_items": stage_items}
    for who in ("rule", "floor"):
        rates = [r[who]["false"] / r[who]["stopped"] for r in runs]
        out[who] = {"false_rate": float(np.mean(rates)), "false_low": min(rates), "false_high": max(rates),
                    "resolved_rate": float(np.mean([r[who]["resolved"] / r[who]["stopped"] for r in runs])),
                    "gain": float(np.mean([r[who]["gain"] for r in runs]))}
    return out


# ---------------------------------------------------------------------------------------------
# The report
# ---------------------------------------------------------------------------------------------

def table(rows: list[dict]) -> list[str]:
    lines = ["| dev sets | items per task | first / second stage items | rule: false stops, mean (least - most) | "
             "resolved | gain | floor: false stops, mean (least - most) | resolved | gain | rule over the floor |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        items = ", ".join(f"{t} {n}" for t, n in r["items"].items())
        stages = " / ".join(", ".join(str(n) for n in s.values()) for s in r["stage_items"])
        cells = [f"{x['false_rate']:.1%} ({x['false_low']:.1%} - {x['false_high']:.1%}) | {x['resolved_rate']:.1%} | {x['gain']:.4f}"
                 for x in (r["rule"], r["floor"])]
        lines.append(f"| {parse_size(r['size']).name} | {items} | {stages} | {cells[0]} | {cells[1]} | "
                     f"{100 * (r['rule']['false_rate'] - r['floor']['false_rate']):+.1f} |")
    return lines


def parse_size(part: str) -> DevSize:
    """`own`, a scale (drawn with replacement) or `subset:f` (without, f <= 0.5)."""
    part = part.strip()
    if part == "own":
        return DevSize()
    subset = part.startswith("subset:")
    number = part.removeprefix("subset:")
    try:
        value = positive_number(number)
    except argparse.ArgumentTypeError as e:
        raise argparse.ArgumentTypeError(f"{part!r} is not 'own', a size or 'subset:' and a size ({e})") from None
    if subset and value > 0.5:
        raise argparse.ArgumentTypeError(f"{part!r}: a subset and the floor's disjoint second one take at most half the items each")
    return DevSize(value, subset)


def parse_scales(text: str) -> list[DevSize]:
    return [parse_size(part) for part in text.split(",")]


def parse_caps(text: str) -> tuple[int, ...]:
    try:
        caps = tuple(int(k) for k in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a comma-separated list of counts") from None
    if not caps or min(caps) < 1 or list(caps) != sorted(caps, reverse=True):
        raise argparse.ArgumentTypeError(f"{text!r} must be positive counts, none above the one before")
    return caps


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--census", type=Path, action="append",
                        help="family_census.py's results (repeatable; default: the seed-0 and seed-1 censuses)")
    parser.add_argument("--config", type=Path, default=ROOT / "configs" / "demo.yaml",
                        help="the stages, min_items, confidence and task weights to replay")
    parser.add_argument("--caps", type=parse_caps, default=(3, 1), help="the rule `top k1 > k2`: k1,k2 (the demo's advance)")
    parser.add_argument("--scales", type=parse_scales, default=parse_scales("own,subset:0.25,0.25,subset:0.5,0.5,1,2,4,8,16"),
                        help="dev-set sizes as multiples of the census's, drawn with replacement; 'own' for its own "
                             "dev sets; 'subset:f' for f of its items drawn without replacement (f <= 0.5)")
    parser.add_argument("--draws", type=int, default=16)
    parser.add_argument("--name", default="census_dev_size", help="results file stem")
    args = parser.parse_args()
    if args.draws < 1:
        parser.error(f"--draws: {args.draws} is not a positive count")
    censuses = args.census or [RESULTS / "family_census.json", RESULTS / "family_census_items.json"]
    config = load_config(args.config)
    fractions, task_weights = list(config.fitness.stages), {t.name: t.weight for t in config.tasks}
    if len(args.caps) != len(fractions) - 1:
        parser.error(f"--caps: {len(args.caps)} counts for {len(fractions) - 1} screening stages of {args.config}")
    rule = "top " + " > ".join(str(k) for k in args.caps)
    lines = [f"# Sibling rules on dev sets of other sizes (`{rule}`, {config.fitness.stages})", "",
             "Each census's items taken as the population its tasks' items come from; a dev set of s times the census's "
             "size drawn from them with replacement, the rule's stages drawn from that dev set (fractions and min_items of "
             f"`{shown(args.config)}`, a fresh draw per generation), "
             "its false stops counted against that dev set; the floor: every offspring in full on a second dev set of the "
             f"same size, counted against the first. {args.draws} draws per row. A false stop: a stopped offspring at least as "
             f"good in full as the member and the one chosen; resolved: ahead beyond the dev set's paired margin at "
             f"{config.fitness.confidence}.", ""]
    results = {}
    for path in censuses:
        saved = json.loads(path.read_text())
        families = [family_matrix(f) for f in saved["families"]]
        rows = [at_scale(families, s, args.caps, fractions, config.fitness.min_items, args.draws, task_weights,
                         config.fitness.confidence) for s in args.scales]
        results[saved["run"]] = rows
        lam = len(families[0].ids) - 1
        lines += [f"## {saved['run']}: {len(families)} families of {lam} offspring (`{shown(path)}`)", ""]
        lines += table(rows) + [""]
    lines += [f"`python -m benchmarks.census_dev_size --draws {args.draws} --caps {','.join(map(str, args.caps))} --scales "
              + ",".join(s.arg for s in args.scales) + "`", ""]
    (RESULTS / f"{args.name}.md").write_text("\n".join(lines))
    (RESULTS / f"{args.name}.json").write_text(json.dumps({"rule": rule, "stages": list(fractions), "draws": args.draws,
                                                           "censuses": results}, indent=1) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
