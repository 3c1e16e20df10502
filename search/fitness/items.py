"""Stage items chosen where candidates disagree (`fitness.items`), instead of drawn at random.

A random stage subset estimates the full dev score without bias, but which few items it holds
decides how it orders near-tied siblings: replayed on the sixteen whole families of the family
census, the demo's `[3, 1]` rule stopped 13% to 31% of siblings falsely depending on the seeded
draw alone (`benchmarks/results/census_draws.md`). MERGE³ extracts a small subset of a benchmark
once, from many models' answers, and judges every candidate on it. The same idea for siblings:
keep the items on which a member's offspring split. An item's disagreement is the variance over
offspring of (the offspring's score on the item - its mean score on the task): every item
carries the spread of the offspring's means, and an item adds to it where offspring order
differently on it, however hard it is (one every offspring gets wrong adds nothing). On the
demo's tasks an order chosen on one run's offspring did not carry over to another run
(benchmarks/results/staged_findings.md, "Fresh draws"): which items split siblings there depends
on their lineage.

An order is {task: item positions, most disputed first}, a position being an item's place in the
task's full dev evaluation (its items by ascending id: `FitnessTask.selected`), which is how stage
subsets index a task. Stage k then takes each task's first `stage_sizes(...)[k]` positions of
the order, the same in every generation (nested, since the stage sizes grow).
"""
from __future__ import annotations

import json
import operator
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np

from search.fitness.staged import stage_sizes
from search.schema import beside_config

Examples = Mapping[str, Mapping[str, Sequence]]  # {task: {"index", "value", "weight"}}


def per_item_scores(examples: Mapping[str, Sequence]) -> dict[int, float]:
    """{item id: value / weight}: a perplexity chunk's mean log-likelihood per token, a right or
    wrong answer's 1 or 0."""
    return {int(i): float(v) / float(w) for i, v, w in zip(examples["index"], examples["value"], examples["weight"])}


def disagreement(records: Sequence[Examples], task: str) -> dict[int, float]:
    """{item id: variance over the records of (score on the item - the record's mean on the task)},
    over the items every record scored."""
    scores = [per_item_scores(r[task]) for r in records]
    if len(scores) < 2:
        raise ValueError(f"task {task!r}: disagreement needs at least 2 candidates' scores, got {len(scores)}")
    ids = sorted(set.intersection(*(set(s) for s in scores)))
    if not ids:
        raise ValueError(f"task {task!r}: the candidates share no scored item")
    centred = np.array([[s[i] for i in ids] for s in scores])
    centred -= centred.mean(axis=1, keepdims=True)
    return dict(zip(ids, (float(v) for v in centred.var(axis=0))))


def item_order(records: Sequence[Examples], all_items: Mapping[str, Sequence[int]]) -> dict[str, list[int]]:
    """{task: positions in `all_items[task]` (the task's item ids, ascending), most disputed
    first (ties by position)}; an item no record scored comes last."""
    order = {}
    for task, ids in all_items.items():
        spread = disagreement(records, task)
        ranked = sorted(range(len(ids)), key=lambda p: (-spread.get(int(ids[p]), -1.0), p))
        order[task] = ranked
    return order


def read_item_order(spec: str | Path, base_dir: Path | None = None) -> dict[str, list[int]]:
    """The order in a JSON file ({task: [positions]}; relative paths also against `base_dir`),
    checked for shape (`checked_order`). ValueError names what is wrong."""
    path = beside_config(spec, base_dir)
    if not path.is_file():
        raise ValueError(f"no such file {str(spec)!r}")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ValueError(f"{path}: not a JSON file ({exc})") from None
    return checked_order(data, str(path))


def checked_order(data: object, where: str = "the order") -> dict[str, list[int]]:
    """`data` as {task: [positions]}: an object of non-empty lists of distinct integers >= 0."""
    if not isinstance(data, dict) or not data:
        raise ValueError(f"{where}: must map each dev task to its item positions, most useful first")
    order = {}
    for task, positions in data.items():
        if not isinstance(positions, list) or not positions:
            raise ValueError(f"{where}: task {task!r}: needs a non-empty list of item positions")
        try:
            positions = [operator.index(p) for p in positions]
        except TypeError:
            raise ValueError(f"{where}: task {task!r}: item positions must be integers") from None
        if min(positions) < 0 or len(set(positions)) != len(positions):
            raise ValueError(f"{where}: task {task!r}: item positions must be distinct and >= 0")
        order[str(task)] = positions
    return order


def ordered_stage_items(order: Sequence[int], n: int, fractions: Sequence[float], min_items: int = 1) -> list[list[int]]:
    """Per stage, the positions (sorted) that stage scores of a task of `n` items: stage k the first
    `stage_sizes(n, ...)[k]` of `order`, the last stage every item. ValueError when the order
    names an item the task lacks or is shorter than the last screening stage."""
    sizes = stage_sizes(n, fractions, min_items)
    if any(p >= n for p in order):
        raise ValueError(f"item position {max(order)} but the task has {n} items")
    screened = max(sizes[:-1], default=0)
    if len(order) < screened:
        raise ValueError(f"{len(order)} item positions, but a stage scores {screened} of the task's {n} items")
    return [sorted(order[:size]) for size in sizes[:-1]] + [list(range(n))]
