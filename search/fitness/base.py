"""The fitness-task interface: `FitnessTask.evaluate(model, ...) -> metrics`.

A task is built once per worker (data loaded, text tokenised) and evaluated on many candidate
models. `evaluate` runs under `torch.inference_mode` with the model in eval() (its training flag
is restored afterwards) and returns a dict of floats that always holds `"score"`: higher is
better, the number the search aggregates.

Which items are scored. Items are documents / questions / prompts / windows, numbered from 0.
`evaluate(model, subsample=k, seed=s)` scores k items (an int) or a fraction k of them (a float
in (0, 1]) drawn without replacement by `random.Random(seed)` — the same subset for the same
seed, so candidates of one generation are compared on the same items; the task option
`subsample` sets a default. `indices=[i, ...]` names the items outright (distinct, in range)
and overrides `subsample`.

Per-example scores. `evaluate(..., per_example=True)` adds one key to the metrics:

    "examples": {"index": [i, ...], "value": [v_i, ...], "weight": [w_i, ...]}

plain lists (JSON-ready), one entry per scored item in the order scored, such that the task's
`score` over those items is sum(value) / sum(weight) (to float rounding). Each kind says what v
and w are; paired comparisons (search/fitness/staged.py) use them example by example. Without
`per_example` the metrics are exactly what they would be without this feature.
"""
from __future__ import annotations

import operator
from dataclasses import dataclass
from typing import Any, Mapping, Sequence

import torch

from search.fitness.kernels import model_max_length, prefix_token_id, subsample_indices
from search.fitness.spec import TaskError, TaskSpec


class EvalMode:
    """Inference mode with the model in eval(); its training flag restored afterwards."""

    def __init__(self, model):
        self.model = model

    def __enter__(self):
        self.was_training = self.model.training
        self.model.eval()
        self.inference = torch.inference_mode()
        self.inference.__enter__()

    def __exit__(self, *exc):
        self.inference.__exit__(*exc)
        self.model.train(self.was_training)
        return False


@dataclass
class Scored:
    """One evaluation: its metrics, and each scored item's share of `score`.

    score == sum(values) / sum(weights), item k contributing values[k] over weights[k].
    """

    metrics: dict[str, float]
    values: list[float]
    weights: list[float]

    def output(self, indices: Sequence[int], per_example: bool) -> dict[str, Any]:
        """The metrics dict `evaluate` returns, with "examples" when asked."""
        if not per_example:
            return self.metrics
        examples = {
            "index": [int(i) for i in indices],
            "value": [float(v) for v in self.values],
            "weight": [float(w) for w in self.weights],
        }
        return {**self.metrics, "examples": examples}


def checked_indices(indices: Sequence[int], n: int, label: str) -> list[int]:
    """Explicit item indices as ints: non-empty, distinct, each in [0, n)."""
    try:
        out = [operator.index(i) for i in indices if not isinstance(i, bool)]
    except TypeError:
        raise TaskError(f"{label}: indices must be integers, got {list(indices)[:5]!r}") from None
    if len(out) != len(indices) or not out:
        raise TaskError(f"{label}: indices must be a non-empty list of integers")
    bad = [i for i in out if not 0 <= i < n]
    if bad:
        raise TaskError(f"{label}: index {bad[0]} out of range for {n} items")
    if len(set(out)) != len(out):
        raise TaskError(f"{label}: indices must be distinct")
    return out


def check_row(spec: str, n: int, row: dict, fields: Mapping[str, type]) -> None:
    """A JSONL row has each field with its type; else one TaskError line naming file and row."""
    for key, typ in fields.items():
        if key not in row:
            raise TaskError(f"{spec}: row {n}: missing field {key!r} (expected {', '.join(fields)})")
        value = row[key]
        if not isinstance(value, typ) or (typ is int and isinstance(value, bool)):
            raise TaskError(f"{spec}: row {n}: field {key!r} must be {typ.__name__}, got {type(value).__name__}")


class FitnessTask:
    """A dev set and how to score it. Built once per worker; `evaluate` runs per candidate.

    A kind sets `self.items` in its constructor and implements `_evaluate(model, indices,
    progress) -> Scored`.
    """

    kind: str = ""  # set by register_task_kind
    # Whether `joined_metrics` can rebuild every metric over a union of scored item sets from
    # their parts' metrics (a staged run then scores a candidate's last stage on the items its
    # screens did not hold; `search.run.stages.StagePlan.extends`).
    joins_metrics: bool = False
    INT_OPTIONS = ("context_length", "batch_size", "batch_tokens", "max_new_tokens", "num_fewshot", "limit", "chunk_tokens")

    def __init__(self, spec: TaskSpec, tokenizer):
        self.spec = spec
        self.label = spec.label
        self.tokenizer = tokenizer
        self.options = dict(spec.options)
        self.prefix = prefix_token_id(tokenizer)
        pad = tokenizer.pad_token_id
        self.pad_id = pad if pad is not None else self.prefix
        for key in self.INT_OPTIONS:
            self._int_option(key, None)  # a bad number fails at build time, not per candidate
        if self.options.get("subsample") is not None:
            subsample_indices(1, self.options["subsample"], 0)

    def __len__(self) -> int:
        return len(self.items)

    def option(self, key: str, default=None):
        return self.options.get(key, default)

    def _int_option(self, key: str, default: int | None, smallest: int | None = None) -> int | None:
        value = self.options.get(key, default)
        if smallest is None:
            smallest = 0 if key == "num_fewshot" else 1
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < smallest):
            raise TaskError(f"{self.label}: option {key} must be an integer >= {smallest}, got {value!r}")
        return value

    def context_length(self, model) -> int:
        return self._int_option("context_length", None) or model_max_length(model, self.tokenizer)

    def batching(self) -> dict:
        """The task's `batch_tokens` and `batch_size`; None where unset (each kernel's default)."""
        return dict(
            batch_tokens=self._int_option("batch_tokens", None),
            batch_size=self._int_option("batch_size", None),
        )

    def selected(self, subsample, seed: int) -> list[int]:
        """Sorted indices of the items `subsample` / `seed` pick (the task's default when None)."""
        if subsample is None:
            subsample = self.options.get("subsample")
        return subsample_indices(len(self.items), subsample, seed)

    def chosen(self, indices: Sequence[int] | None, subsample, seed: int) -> list[int]:
        """The items to score: `indices` when given, else the subsample's."""
        if indices is None:
            return self.selected(subsample, seed)
        return checked_indices(indices, len(self.items), self.label)

    def evaluate(
        self, model, *, subsample: int | float | None = None, seed: int = 0, progress: bool = False,
        indices: Sequence[int] | None = None, per_example: bool = False,
    ) -> dict[str, Any]:
        """Metrics of `model` on the chosen items; see the module docstring for the arguments."""
        chosen = self.chosen(indices, subsample, seed)
        with EvalMode(model):
            scored = self._evaluate(model, chosen, progress)
        return scored.output(chosen, per_example)

    def _evaluate(self, model, indices: list[int], progress: bool) -> Scored:
        raise NotImplementedError

    @classmethod
    def joined_metrics(cls, parts: Sequence[Mapping[str, Any]]) -> dict[str, float] | None:
        """The metrics of disjoint item sets scored apart (`parts`: each one's metrics), as over
        their union; None when a metric cannot be rebuilt from its parts (then the union must be
        scored whole). Pure: no model, no data."""
        return None


def parts_agree(parts: Sequence[Mapping[str, Any]], needed: Sequence[str]) -> bool:
    """Whether metrics of several parts can be joined: every part has the same keys, `needed`
    among them (a part written by an older version may lack some)."""
    keys = set(parts[0])
    return set(needed) <= keys and all(set(p) == keys for p in parts)


def count_weighted(parts: Sequence[Mapping[str, Any]], count: str) -> dict[str, float] | None:
    """Metrics that are means over a part's `count` units (items, tokens), joined: each mean
    weighted by its part's count, the counts added. None when the parts do not agree
    (`parts_agree`)."""
    if not parts_agree(parts, (count,)):
        return None
    keys = set(parts[0])
    total = sum(float(p[count]) for p in parts)
    if total <= 0:
        return None
    joined = {k: sum(float(p[k]) * float(p[count]) for p in parts) / total for k in keys if k != count}
    return {**joined, count: total}


__all__ = ["FitnessTask", "Scored", "EvalMode", "checked_indices", "check_row", "count_weighted", "parts_agree"]
