"""What to score: task specs, option checking, the task-kind registry, and the aggregate.

A `TaskSpec` names a task kind, its data (a file or a built-in split such as `pydoc:dev`) and
its options. Each kind lives in its own module and registers itself:

    @register_task_kind("perplexity", COMMON_OPTIONS)
    class PerplexityTask(FitnessTask): ...

The registry is one-way: the kind modules import this module, and this module imports them
only by name (`KIND_MODULES`), once, the first time a kind is looked up. So nothing here
imports a module that imports it back. `TASK_KINDS` is read from the registry: the built-in
kinds in the order of `KIND_MODULES`, then any kind registered from elsewhere, in the order
it was registered.
"""
from __future__ import annotations

import importlib
import math
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Mapping

from search.errors import EvofuseError

# options every kind that tokenises its own data understands (batching, length, subset)
COMMON_OPTIONS = frozenset({"context_length", "batch_size", "batch_tokens", "subsample"})

# the built-in kinds, one module each; imported by name on first use of the registry
KIND_MODULES = (
    "search.fitness.perplexity",
    "search.fitness.multiple_choice",
    "search.fitness.generate",
    "search.fitness.lm_eval",
    "search.fitness.kl",
)


class TaskError(EvofuseError):
    """A fitness task that cannot be built or run as asked; the message is one line."""


@dataclass(frozen=True)
class TaskSpec:
    """What to score: a task kind, its data (a file or a built-in split) and options."""

    kind: str
    data: str
    name: str | None = None
    options: Mapping[str, Any] = field(default_factory=dict)

    @property
    def label(self) -> str:
        return self.name or f"{self.kind}:{self.data}"


# --------------------------------------------------------------------------- the registry


@dataclass(frozen=True)
class _Kind:
    cls: type
    options: frozenset
    order: int  # registration order, to sort kinds registered outside KIND_MODULES


_KINDS: dict[str, _Kind] = {}
_loaded = False


def register_task_kind(kind: str, options: Iterable[str]) -> Callable[[type], type]:
    """Class decorator: make `cls` the task class of `kind`, accepting these option names."""

    def decorate(cls: type) -> type:
        known = _KINDS.get(kind)
        owner = None if known is None else f"{known.cls.__module__}.{known.cls.__qualname__}"
        if owner is not None and owner != f"{cls.__module__}.{cls.__qualname__}":  # a reload may re-register
            raise TaskError(f"task kind {kind!r} is already registered by {owner}")
        cls.kind = kind
        _KINDS[kind] = _Kind(cls, frozenset(options), known.order if known else len(_KINDS))
        return cls

    return decorate


def _load_kinds() -> None:
    """Import the built-in kind modules once; each registers its kind as it is imported."""
    global _loaded
    if not _loaded:
        for module in KIND_MODULES:
            importlib.import_module(module)
        _loaded = True


def _rank(kind: str) -> tuple[int, int]:
    entry = _KINDS[kind]
    module = entry.cls.__module__
    builtin = KIND_MODULES.index(module) if module in KIND_MODULES else len(KIND_MODULES)
    return builtin, entry.order


def task_kinds() -> tuple[str, ...]:
    """Every registered kind: the built-in ones in `KIND_MODULES` order, then the rest."""
    _load_kinds()
    return tuple(sorted(_KINDS, key=_rank))


def kind_options(kind: str) -> frozenset:
    """The option names `kind` accepts (TaskError for an unknown kind)."""
    _load_kinds()
    if kind not in _KINDS:
        raise TaskError(f"unknown task kind {kind!r} (valid: {', '.join(task_kinds())})")
    return _KINDS[kind].options


def __getattr__(name: str):
    # TASK_KINDS is computed from the registry on first read (PEP 562), so importing this
    # module does not import the kind modules.
    if name == "TASK_KINDS":
        return task_kinds()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def kind_class(kind: str) -> type:
    """The task class of `kind` (TaskError for an unknown kind)."""
    kind_options(kind)
    return _KINDS[kind].cls


def check_options(spec: TaskSpec) -> None:
    """Refuse an unknown kind or an option its kind does not take; one line naming both."""
    kinds = task_kinds()
    if spec.kind not in kinds:
        raise TaskError(f"task {spec.label!r}: unknown kind {spec.kind!r} (valid: {', '.join(kinds)})")
    allowed = _KINDS[spec.kind].options
    unknown = sorted(set(spec.options) - allowed)
    if unknown:
        raise TaskError(
            f"task {spec.label!r}: unknown option {unknown[0]!r} for {spec.kind} (valid: {', '.join(sorted(allowed))})"
        )


def build_task(spec: TaskSpec, tokenizer):
    """Load and tokenise a task's data once; raises TaskError / DataSpecError with one line."""
    check_options(spec)
    return _KINDS[spec.kind].cls(spec, tokenizer)


# --------------------------------------------------------------------------- parsing, aggregating


def parse_task_arg(arg: str) -> TaskSpec:
    """`KIND:DATA` as given to `evofuse eval --task`, e.g. `perplexity:pydoc:test`."""
    kinds = task_kinds()
    kind, sep, data = str(arg).partition(":")
    if not sep or not data:
        raise TaskError(f"--task {arg!r}: expected KIND:DATA with KIND one of {', '.join(kinds)}")
    if kind not in kinds:
        raise TaskError(f"--task {arg!r}: unknown task kind {kind!r} (valid: {', '.join(kinds)})")
    return TaskSpec(kind=kind, data=data)


def aggregate(scores: Mapping[str, float], weights: Mapping[str, float]) -> float:
    """Weighted mean of per-task scores, over the tasks named in `weights`.

    A NaN score (a broken candidate) makes the aggregate -inf: the worst fitness, never a crash.
    """
    if not weights:
        raise TaskError("aggregate: no task weights given")
    total, norm = 0.0, 0.0
    for task, weight in weights.items():
        if task not in scores:
            raise TaskError(f"aggregate: no score for task {task!r} (have: {', '.join(scores) or 'none'})")
        if not weight >= 0:
            raise TaskError(f"aggregate: weight of task {task!r} must be >= 0, got {weight}")
        score = float(scores[task])
        if math.isnan(score):
            return float("-inf")
        if weight:
            total += weight * score
            norm += weight
    if norm == 0:
        raise TaskError("aggregate: task weights sum to 0")
    return total / norm


__all__ = [
    "COMMON_OPTIONS", "KIND_MODULES", "TASK_KINDS", "TaskError", "TaskSpec", "register_task_kind", "task_kinds",
    "kind_options", "kind_class", "check_options", "build_task", "parse_task_arg", "aggregate",
]
