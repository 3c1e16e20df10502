"""The `multiple_choice` fitness kind: log-likelihood of each choice, as lm-eval scores it.

Data: JSONL `{"context": str, "choices": [str, ...], "label": int}`.

A choice c is scored as the continuation `target_delimiter + c` of the context, as lm-eval
joins them (task option `target_delimiter`, lm-eval's name and default: " "). So write choices
without a leading space — `{"context": "The dog says", "choices": ["woof", "meow"]}` scores
"The dog says" + " woof". Data whose choices already begin with whitespace (`" woof"`, a common
format) would get a second space that no text of the task ever has; such a choice gets no
delimiter (when the delimiter is whitespace) and the task logs one warning saying so.
`target_delimiter: ""` states the format outright and silences it. (`delimiter` is the
option's older name.) The leading whitespace that stands in for the delimiter does not count in
acc_norm's length either, so data with `" woof"` scores exactly as data with `"woof"` does in
lm-eval. A context that ends with whitespace is joined as lm-eval joins it.

As lm-eval's `_encode_pair` (kernels.encode_pair): trailing whitespace of the context moves to
the front of the continuation; ctx = encode(context), cont = encode(context +
continuation)[len(ctx):]; an empty context becomes [prefix]. LL_c = sum of log p(cont | ctx).
When ctx + cont is longer than L + 1 it is cut from the left, as lm-eval does.

    acc       = mean [argmax_c LL_c == label]
    acc_norm  = mean [argmax_c LL_c / len(c) == label]          len in characters of c (no delimiter)
    acc_bytes = mean [argmax_c LL_c / len(c.encode()) == label]  len in UTF-8 bytes
    score     = acc_norm (option `metric`: acc | acc_norm | acc_bytes)

lm-eval 0.4.13 normalises `acc_norm` by characters and reports the byte-normalised one as
`acc_bytes`; the two agree on ASCII choices. We follow lm-eval exactly and report both. Ties go
to the first choice (numpy argmax). Speed: the context is run once with a KV cache and every
choice is scored after it (kernels.shared_prefix_logprobs); option `share_prefix: false` scores
each context+choice as one sequence, as lm-eval does.

Per example (one per question): value = 1.0 if the `score` metric's argmax picks the label
else 0.0, weight = 1.0; sum(value) / sum(weight) = score.
"""
from __future__ import annotations

import logging
import warnings
from dataclasses import dataclass
from typing import Sequence

from search.fitness.base import FitnessTask, Scored, check_row, count_weighted
from search.fitness.kernels import encode_pair, sequence_logprobs, shared_prefix_logprobs
from search.fitness.spec import COMMON_OPTIONS, TaskError, TaskSpec, register_task_kind
from search.models.datasets import load_rows

log = logging.getLogger(__name__)
_warned: set[tuple[str, str]] = set()  # (task label, data): the whitespace warning is logged once

@dataclass
class Question:
    context: list[int]
    continuations: list[list[int]]
    label: int
    chars: list[int]  # len(choice) in characters, lm-eval's acc_norm
    bytes: list[int]  # len(choice) in UTF-8 bytes, lm-eval's acc_bytes


def mc_rows(spec: str) -> list[tuple[str, list[str], int]]:
    """(context, choices, label) per row, checked: >= 2 string choices, label an index into them."""
    rows = []
    for n, row in enumerate(load_rows(spec), 1):
        check_row(spec, n, row, {"context": str, "choices": list, "label": int})
        choices, label = row["choices"], row["label"]
        if len(choices) < 2 or not all(isinstance(c, str) and c for c in choices):
            raise TaskError(f"{spec}: row {n}: \"choices\" must be a list of at least 2 non-empty strings")
        if not 0 <= label < len(choices):
            raise TaskError(f"{spec}: row {n}: \"label\" {label} is not an index into {len(choices)} choices")
        rows.append((row["context"], list(choices), label))
    return rows


def argmax(values: Sequence[float]) -> int:
    """Index of the largest value; the first one on a tie (numpy's argmax)."""
    return max(range(len(values)), key=lambda i: (values[i], -i))


def question_hits(q: Question, ll: Sequence[float]) -> dict[str, bool]:
    """Whether each metric's pick is the label: raw LL, LL per character, LL per byte."""
    return {
        "acc": argmax(ll) == q.label,
        "acc_norm": argmax([v / n for v, n in zip(ll, q.chars)]) == q.label,
        "acc_bytes": argmax([v / n for v, n in zip(ll, q.bytes)]) == q.label,
    }


def continuation(choice: str, delimiter: str) -> tuple[str, str]:
    """(the text scored after the context, the choice as acc_norm measures it): delimiter +
    choice and the choice; when the choice already begins with whitespace and the delimiter is
    whitespace, the choice alone (no doubled space) and the choice without that whitespace."""
    if delimiter and delimiter.isspace() and choice[:1].isspace():
        return choice, choice[len(delimiter):] if choice.startswith(delimiter) else choice[1:]
    return delimiter + choice, choice


@register_task_kind("multiple_choice", COMMON_OPTIONS | {"target_delimiter", "delimiter", "metric", "share_prefix"})
class MultipleChoiceTask(FitnessTask):
    """Pick the most likely choice of each question; accuracy under three normalisations."""

    METRICS = ("acc", "acc_norm", "acc_bytes")
    joins_metrics = True

    def __init__(self, spec: TaskSpec, tokenizer):
        super().__init__(spec, tokenizer)
        if "target_delimiter" in self.options and "delimiter" in self.options:
            raise TaskError(f"{self.label}: give option target_delimiter or its older name delimiter, not both")
        name = "delimiter" if "delimiter" in self.options else "target_delimiter"
        self.delimiter = self.option(name, " ")
        if not isinstance(self.delimiter, str):
            raise TaskError(f"{self.label}: option {name} must be a string, got {self.delimiter!r}")
        self.metric = self.option("metric", "acc_norm")
        if self.metric not in self.METRICS:
            raise TaskError(f"{self.label}: option metric must be one of {', '.join(self.METRICS)}, got {self.metric!r}")
        rows = mc_rows(spec.data)
        self._warn_whitespace(rows)
        self.items = [self._question(n, row, self.delimiter) for n, row in enumerate(rows, 1)]
        self.share_prefix = bool(self.option("share_prefix", True))

    def _warn_whitespace(self, rows: list[tuple[str, list[str], int]]) -> None:
        """Say once per task when the data's own whitespace stands in for the delimiter."""
        leading = [c for _, choices, _ in rows for c in choices if c[:1].isspace()]
        if not leading or not self.delimiter.isspace() or (self.label, self.spec.data) in _warned:
            return
        _warned.add((self.label, self.spec.data))
        total = sum(len(choices) for _, choices, _ in rows)
        log.warning(
            "%s: %d of %d choices already begin with whitespace (e.g. %r): target_delimiter %r is not added before them, "
            "so none is scored after a doubled space; set target_delimiter: \"\" to state this format and silence the warning",
            self.label, len(leading), total, leading[0], self.delimiter,
        )

    def _question(self, n: int, row: tuple[str, list[str], int], delimiter: str) -> Question:
        context, choices, label = row
        joined = [continuation(c, delimiter) for c in choices]  # [(scored text, measured choice)]
        pairs = [encode_pair(self.tokenizer, context, text, self.prefix) for text, _ in joined]
        if any(not cont for _, cont in pairs):
            raise TaskError(f"{self.spec.data}: row {n}: a choice tokenises to nothing after the context")
        return Question(
            context=pairs[0][0],
            continuations=[cont for _, cont in pairs],
            label=label,
            chars=[max(1, len(c)) for _, c in joined],
            bytes=[max(1, len(c.encode("utf-8"))) for _, c in joined],
        )

    def _evaluate(self, model, indices, progress) -> Scored:
        questions = [self.items[i] for i in indices]
        lls = self.choice_logprobs(model, questions, progress)
        per_question = [question_hits(q, ll) for q, ll in zip(questions, lls)]
        metrics = {key: sum(h[key] for h in per_question) / len(questions) for key in self.METRICS}
        metrics["mean_gold_loglik"] = sum(ll[q.label] for q, ll in zip(questions, lls)) / len(questions)
        metrics = {"score": metrics[self.metric], **metrics, "questions": float(len(questions))}
        values = [float(h[self.metric]) for h in per_question]
        return Scored(metrics, values, [1.0] * len(questions))

    @classmethod
    def joined_metrics(cls, parts):
        """Every metric is a mean over questions."""
        return count_weighted(parts, "questions")

    def choice_logprobs(self, model, questions: list[Question], progress: bool = False) -> list[list[float]]:
        """log p(continuation | context) for every choice of every question."""
        max_len = self.context_length(model)
        fits = [
            self.share_prefix and len(q.context) + max(map(len, q.continuations)) <= max_len + 1 for q in questions
        ]
        out: list[list[float] | None] = [None] * len(questions)
        shared = [i for i, ok in enumerate(fits) if ok]
        try:
            lls = shared_prefix_logprobs(model, [questions[i] for i in shared], progress=progress, **self.batching())
        except Exception as exc:  # a model whose forward takes no KV cache: score without reuse
            warnings.warn(f"{self.label}: shared-prefix scoring failed ({type(exc).__name__}: {exc}); scoring full sequences")
            self.share_prefix = False
            return self.choice_logprobs(model, questions, progress)
        for i, ll in zip(shared, lls):
            out[i] = ll
        rest = [i for i, ok in enumerate(fits) if not ok]
        if rest:
            # lm-eval's way: each (context + choice) is one sequence, cut from the left to L + 1.
            seqs = [((questions[i].context + cont)[-(max_len + 1) :], len(cont)) for i in rest for cont in questions[i].continuations]
            flat = iter(sequence_logprobs(model, seqs, pad_id=self.pad_id, progress=progress, **self.batching()))
            for i in rest:
                out[i] = [next(flat) for _ in questions[i].continuations]
        return out  # type: ignore[return-value]


__all__ = ["MultipleChoiceTask", "Question", "mc_rows", "argmax", "question_hits", "continuation"]
