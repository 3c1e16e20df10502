"""A candidate and what scoring it gave: one frozen record each, parsed once, serialised here.

`Candidate` (in the spirit of Optuna's `FrozenTrial`) is everything needed to make a model:
its id, its recipe (how the weights are made), its plan (how the structure changes), the
Optuna trial that asked the plan, the generation that bred it and the member it challenges;
with structure genes (`compress.space.genes`), the genes its plan was compiled from and where
they came from (journalled as `genes: {blocks, levels, from}`; rows without it read as before).
`Evaluation` is one scoring of a candidate on one split: status, metrics per task, parameter
count, latency, timings, the actor's memory after it, the worker, the reason of a failure and
the stage it reached. The journal row of an evaluation is `Evaluation.to_json()`, read back by
`Evaluation.from_json`; nothing else builds or reads journal rows.

`objectives()` is the one place that turns an evaluation into the values selection, Optuna's
`study.tell`, the report and `export --pareto` compare: (dev score,) for merge runs, and
(dev score, parameters[, latency]) for compress / joint runs, with a failed candidate at the
worst value of each.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from functools import cached_property
from typing import Any, Callable, Mapping

from compression.genes import Genes
from compression.plan import parse_plan
from evolve.population import WORST, finite_or_worst, make_member
from evolve.recipe import Recipe

from search.fitness import aggregate

FAILED_PARAMS = 2**62  # parameter count recorded for a failed candidate (JSON has no infinity)
FAILED_LATENCY_MS = 1e12  # and its latency, when latency is an objective
OK = "ok"
EXAMPLE_KEYS = ("index", "value", "weight")  # a task's per-example scores (search.fitness.base)


@dataclass(frozen=True)
class Candidate:
    """How to make one model: recipe + plan, and where it came from."""

    id: str
    recipe: Recipe
    plan: tuple[dict, ...] = ()  # validated plan steps, as JSON mappings
    trial: int | None = None  # the Optuna trial that asked the plan
    generation: int | None = None
    target: str | None = None  # the population member it challenges (merge mode)
    genes: Genes | None = None  # the structure genes the plan was compiled from (compress.space.genes)
    genes_from: Mapping[str, Any] | None = None  # how: {"ranking": c} | {"mutation": id} | {"crossover": [a, b]}

    def __post_init__(self) -> None:
        object.__setattr__(self, "plan", tuple(dict(step) for step in self.plan or ()))
        if self.plan:
            self.steps  # parse once, where the candidate enters: a bad plan fails here

    @cached_property
    def steps(self) -> list:
        """The plan's steps as validated op parameters (`compression.plan.parse_plan`)."""
        return parse_plan(list(self.plan)) if self.plan else []

    def to_json(self) -> dict:
        data = {"id": self.id, "recipe": self.recipe.to_dict(), "plan": list(self.plan)}
        if self.trial is not None:
            data["trial"] = self.trial
        if self.generation is not None:
            data["generation"] = self.generation
        if self.target is not None:
            data["target"] = self.target
        if self.genes is not None:
            data["genes"] = {**self.genes.to_data(), "from": dict(self.genes_from or {})}
        return data

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> "Candidate":
        genes = data.get("genes")
        return cls(
            id=data["id"],
            recipe=Recipe.from_dict(data["recipe"]),
            plan=tuple(data.get("plan") or ()),
            trial=data.get("trial"),
            generation=data.get("generation"),
            target=data.get("target"),
            genes=Genes.from_data({k: genes[k] for k in ("blocks", "levels")}) if genes else None,
            genes_from=dict(genes.get("from") or {}) if genes else None,
        )

    @classmethod
    def copy_of(cls, weights_id: str, candidate_id: str | None = None, **fields) -> "Candidate":
        """A candidate whose weights are an existing weight set's (a parent, a stored member)."""
        return cls(id=candidate_id or weights_id, recipe=Recipe(op="copy", inputs=(weights_id,)), **fields)


@dataclass(frozen=True)
class Evaluation:
    """One scoring of a candidate on one split (`dev` or `test`): one journal row."""

    candidate: Candidate
    split: str
    status: str  # ok | failed | nonfinite | stopped (staged fitness)
    metrics: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)
    score: float = WORST  # the weighted aggregate of the tasks' scores (`with_score`)
    num_params: int | None = None
    latency_ms: float | None = None
    reason: str | None = None
    worker: str | None = None
    attempts: int = 1
    timing: Mapping[str, float] = field(default_factory=dict)
    memory: Mapping[str, float] = field(default_factory=dict)  # the actor's GiB after the job: {rss_gib, private_gib, peak_gib}
    time: float | None = None
    stage: int | None = None  # staged fitness: the last stage scored
    extra: Mapping[str, Any] = field(default_factory=dict)  # fields written by newer versions

    @property
    def id(self) -> str:
        return self.candidate.id

    @property
    def ok(self) -> bool:
        return self.status == OK

    def task_scores(self) -> dict[str, float]:
        return {task: m["score"] for task, m in self.metrics.items()}

    def joined(self, earlier: "Evaluation", join: Mapping[str, Callable] | None = None) -> "Evaluation":
        """This scoring of the items a stage adds, together with `earlier` (the same candidate's
        stage before, scored in the same precision): per task the examples of both, in item
        order, the task score over all of them, sum(value) / sum(weight) (the identity every task
        kind keeps, `search.fitness.base`), and the task's other metrics rebuilt from both parts
        by `join[task]` (its kind's `joined_metrics`); without one, or when it cannot, they are
        dropped (a screening stage's decisions read only scores and examples). A failed scoring
        stays as it is (the candidate stops on it)."""
        if not self.ok:
            return self
        metrics = {}
        for task, before in earlier.metrics.items():
            added = self.metrics.get(task)
            if not added:  # the stage adds none of this task's items
                metrics[task] = dict(before)
                continue
            both = sorted(zip(*(list(before["examples"][k]) + list(added["examples"][k]) for k in EXAMPLE_KEYS)))
            examples = {key: [row[j] for row in both] for j, key in enumerate(EXAMPLE_KEYS)}
            joiner = (join or {}).get(task)
            others = joiner([_without_examples(before), _without_examples(added)]) if joiner else None
            score = math.fsum(examples["value"]) / math.fsum(examples["weight"])
            metrics[task] = {**(others or {}), "score": score, "examples": examples}
        return replace(self, metrics=metrics, extra={**self.extra, "extends": earlier.stage})

    def with_score(self, task_weights: Mapping[str, float]) -> "Evaluation":
        """The same evaluation with its aggregate dev score; WORST unless it was scored."""
        score = finite_or_worst(aggregate(self.task_scores(), task_weights)) if self.ok else WORST
        return replace(self, score=score)

    # ---- the journal row ---------------------------------------------------------------------
    _SCALARS = ("num_params", "latency_ms", "reason", "worker", "time", "stage")

    def to_json(self) -> dict:
        row = {**self.extra, **self.candidate.to_json(), "split": self.split, "status": self.status,
               "metrics": dict(self.metrics), "score": self.score, "attempts": self.attempts}
        if self.timing:
            row["timing"] = dict(self.timing)
        if self.memory:
            row["memory"] = dict(self.memory)
        row.update({k: getattr(self, k) for k in self._SCALARS if getattr(self, k) is not None})
        return row

    @classmethod
    def from_json(cls, row: Mapping[str, Any]) -> "Evaluation":
        known = {"id", "recipe", "plan", "trial", "generation", "target", "genes", "split", "status", "metrics",
                 "score", "attempts", "timing", "memory", *cls._SCALARS}
        return cls(
            candidate=Candidate.from_json(row),
            split=row["split"],
            status=row["status"],
            metrics=row.get("metrics") or {},
            score=row.get("score", WORST),
            attempts=row.get("attempts", 1),
            timing=row.get("timing") or {},
            memory=row.get("memory") or {},
            extra={k: v for k, v in row.items() if k not in known},
            **{k: row.get(k) for k in cls._SCALARS},
        )

    @classmethod
    def from_worker(cls, candidate: Candidate, split: str, result: Mapping[str, Any], when: float,
                    stage: int | None = None) -> "Evaluation":
        """What a worker returned (a plain dict that crossed Ray) as an evaluation."""
        return cls(
            candidate=candidate,
            split=split,
            status=result["status"],
            metrics=result.get("metrics") or {},
            num_params=result.get("num_params"),
            latency_ms=result.get("latency_ms"),
            reason=result.get("reason"),
            worker=result.get("worker"),
            attempts=result.get("attempts", 1),
            timing=result.get("timing") or {},
            memory=result.get("memory") or {},
            time=round(when, 3),
            stage=stage,
            extra={"autocast": result["autocast"]} if result.get("autocast") else {},
        )


@dataclass(frozen=True)
class Objectives:
    """What a run optimises: the dev score, and for compressing runs size (and latency)."""

    sizes: bool = False  # compress / joint: parameters are an objective (minimised)
    latency: bool = False  # latency is a third objective (minimised)
    max_params: float | None = None  # the size budget: over it, the score counts as WORST

    @property
    def directions(self) -> list[str]:
        """Optuna's study directions, in the order of `values`."""
        return ["maximize"] + (["minimize"] if self.sizes else []) + (["minimize"] if self.latency else [])

    def values(self, evaluation: Evaluation) -> tuple[float, ...]:
        """(score[, params[, latency]]): a failed candidate is worst in each, an over-budget one
        keeps its size but scores WORST, so selection ranks it below every feasible one."""
        if not self.sizes:
            return (evaluation.score if evaluation.ok else WORST,)
        if not evaluation.ok or evaluation.num_params is None:
            return (WORST, float(FAILED_PARAMS)) + ((FAILED_LATENCY_MS,) if self.latency else ())
        score = evaluation.score
        if self.max_params is not None and evaluation.num_params > self.max_params:
            score = WORST
        values = (score, float(evaluation.num_params))
        return values + ((float(evaluation.latency_ms),) if self.latency else ())

    def member(self, evaluation: Evaluation):
        """The DEAP individual selection works on (evolve.population.make_member)."""
        values = self.values(evaluation)
        c = evaluation.candidate
        params = int(values[1]) if self.sizes else None
        latency = values[2] if self.latency else None
        return make_member(c.id, c.recipe, values[0], evaluation.task_scores(), list(c.plan), params, latency)


def _without_examples(metrics: Mapping[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in metrics.items() if k not in ("examples", "screen_examples")}


def is_finite_score(value: float | None) -> bool:
    """A score that means something: not missing, not NaN / inf, not the WORST sentinel."""
    return isinstance(value, (int, float)) and math.isfinite(value) and value > WORST


def format_score(value, spec: str = ".4f") -> str:
    """A score for people: `failed` for a missing, non-finite or worst-sentinel value."""
    return format(value, spec) if is_finite_score(value) else "failed"


__all__ = ["Candidate", "Evaluation", "Objectives", "FAILED_PARAMS", "FAILED_LATENCY_MS", "OK", "is_finite_score",
           "format_score"]
