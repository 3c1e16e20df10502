"""Fitness tasks: score a causal LM on a dev set, with lm-evaluation-harness's conventions.

A task is built once per worker (data loaded, text tokenised) and evaluated on many candidate
models. Every `evaluate` runs under `torch.inference_mode`, batches by length, sends inputs to
`model.device` (CUDA/bf16 works; log-probabilities are always computed in float32) and returns
a dict of floats that always holds `"score"`: higher is better, the number the search aggregates.

Definitions (they match lm-evaluation-harness v0.4.13's `HFLM`; tests/test_lm_eval_parity.py
checks them against lm-eval itself to 1e-4 relative):

Tokenisation. `encode(text)` is `tokenizer.encode(text)` with the tokenizer's default special
tokens (so a Llama-2 style tokenizer adds BOS, a GPT-2/SmolLM2 one adds nothing), except that a
text already starting with the prefix token's string is encoded without special tokens. The
prefix token is BOS, or EOS when the tokenizer has no BOS. L (`context_length`) defaults to the
model config's `n_positions` / `max_position_embeddings` / `n_ctx`, else the tokenizer's
`model_max_length`, else 2048 (lm-eval's `resolve_max_length`).

perplexity (text: `pydoc:SPLIT`, a .txt file = one document, JSONL `{"text"}` = one per line).
  Each document is scored by lm-eval's `loglikelihood_rolling`: its tokens t_1..t_n are predicted
  in disjoint windows of at most L predictions (`get_rolling_token_windows` with context_len=1,
  then `make_disjoint_window`). The first window's input is [prefix] + t_1..t_{L-1} and predicts
  t_1..t_L; each later window predicts the next min(L, rest) tokens from an input of the L tokens
  just before its last target, so a short last window gets extra left context. Every token is
  predicted exactly once; the document's log-likelihood LL_d is the sum. Over the set:
    nll_sum          = -sum_d LL_d                      (nats)
    tokens           = sum_d n_d                        (predicted tokens)
    token_perplexity = exp(nll_sum / tokens)
    word_perplexity  = exp(nll_sum / sum_d words_d),   words_d = len(re.split(r"\\s+", doc))
    byte_perplexity  = exp(nll_sum / sum_d bytes_d),   bytes_d = len(doc.encode("utf-8"))
    bits_per_byte    = nll_sum / sum_d bytes_d / ln 2
    score            = -nll_sum / tokens                (minus mean token NLL)
  word/byte perplexity and bits_per_byte are lm-eval's (weighted_perplexity aggregation: a ratio of
  sums, not a mean of per-document perplexities); token_perplexity has no lm-eval counterpart.

multiple_choice (JSONL `{"context": str, "choices": [str, ...], "label": int}`).
  A choice c is the continuation `delimiter + c` (delimiter " " by default, option `delimiter`).
  As lm-eval's `_encode_pair`: trailing whitespace of the context moves to the front of the
  continuation; ctx = encode(context), cont = encode(context + continuation)[len(ctx):]; an empty
  context becomes [prefix] (lm-eval's rule). LL_c = sum of log p(cont | ctx). When ctx + cont is
  longer than L + 1 it is cut from the left, as lm-eval does.
    acc       = mean [argmax_c LL_c == label]
    acc_norm  = mean [argmax_c LL_c / len(c) == label]          len in characters of c (no delimiter)
    acc_bytes = mean [argmax_c LL_c / len(c.encode()) == label]  len in UTF-8 bytes
    score     = acc_norm (option `metric`: acc | acc_norm | acc_bytes)
  Note: lm-eval 0.4.13 normalises `acc_norm` by characters and reports the byte-normalised one as
  `acc_bytes`; the two agree on ASCII choices. We follow lm-eval exactly and report both.
  Ties go to the first choice (numpy argmax). Speed: the context is run once with a KV cache and
  every choice is scored after it (shared-prefix reuse); options `share_prefix: false` scores
  each context+choice as one sequence, as lm-eval does.

generate (JSONL `{"prompt": str, "answer": str}`).
  Greedy decoding of at most `max_new_tokens` (default 32) tokens after encode(prompt) (left-cut
  to L - max_new_tokens), batched with left padding and a KV cache. The output stops at EOS and
  is cut at the first stop string (option `stop`, default ["\\n"]).
    exact_match = mean [output.strip() == answer.strip()]
    contains    = mean [answer.strip() in output]
    score       = exact_match (option `match: contains` makes it `contains`)

lm_eval (DATA = comma-separated lm-eval task names and/or task YAML files): runs lm-eval's own
  tasks on the in-memory model, see search/lm_eval_adapter.py.

Subsampling (cheap early generations): `evaluate(model, subsample=k, seed=s)` scores k items
(an int) or a fraction k of them (a float in (0, 1]) drawn without replacement by
`random.Random(seed)` — the same subset for the same seed, so candidates of one generation are
compared on the same items. Items are documents / questions / prompts. The task option
`subsample` sets a default. Batching: `batch_tokens` (default 8192) bounds padded tokens per
forward pass; `batch_size` also bounds rows.
"""
from __future__ import annotations

import inspect
import math
import random
import re
import warnings
from dataclasses import dataclass, field
from typing import Any, Mapping, Sequence

import torch
import torch.nn.functional as F

from compression.calibration import DataSpecError
from search.errors import EvofuseError
from search.models.datasets import load_rows as load_jsonl_rows
from search.models.datasets import load_texts

TASK_KINDS = ("perplexity", "multiple_choice", "generate", "lm_eval")
DEFAULT_MAX_LENGTH = 2048  # lm-eval's default when neither config nor tokenizer names one
DEFAULT_BATCH_TOKENS = 8192
IGNORE = -100  # cross_entropy's ignore_index: positions not scored

_COMMON_OPTIONS = {"context_length", "batch_size", "batch_tokens", "subsample"}
KIND_OPTIONS = {
    "perplexity": _COMMON_OPTIONS,
    "multiple_choice": _COMMON_OPTIONS | {"delimiter", "metric", "share_prefix"},
    "generate": _COMMON_OPTIONS | {"max_new_tokens", "match", "stop"},
    "lm_eval": {"batch_size", "context_length", "num_fewshot", "limit", "metric", "include_path", "subsample", "logits_cache"},
}


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


def parse_task_arg(arg: str) -> TaskSpec:
    """`KIND:DATA` as given to `evofuse eval --task`, e.g. `perplexity:pydoc:test`."""
    kind, sep, data = str(arg).partition(":")
    if not sep or not data:
        raise TaskError(f"--task {arg!r}: expected KIND:DATA with KIND one of {', '.join(TASK_KINDS)}")
    if kind not in TASK_KINDS:
        raise TaskError(f"--task {arg!r}: unknown task kind {kind!r} (valid: {', '.join(TASK_KINDS)})")
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


# --------------------------------------------------------------------------- tokenisation, lengths


def prefix_token_id(tokenizer) -> int:
    """The token that conditions the first prediction: BOS, else EOS (lm-eval's HFLM)."""
    token = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
    if token is None:
        raise TaskError("tokenizer has neither a BOS nor an EOS token to condition the first token on")
    return token


def encode(tokenizer, text: str) -> list[int]:
    """lm-eval's `tok_encode`: default special tokens, unless the text already starts with the prefix."""
    prefix = tokenizer.decode([prefix_token_id(tokenizer)])
    if prefix and text.startswith(prefix):
        return tokenizer.encode(text, add_special_tokens=False)
    return tokenizer.encode(text)


def model_max_length(model, tokenizer) -> int:
    """lm-eval's `resolve_max_length`: config positions, else tokenizer limit, else 2048."""
    config = getattr(model, "config", None)
    config = getattr(config, "text_config", None) or config
    for attr in ("n_positions", "max_position_embeddings", "n_ctx"):
        value = getattr(config, attr, None)
        if isinstance(value, int) and value > 0:
            return value
    limit = getattr(tokenizer, "model_max_length", None)
    if isinstance(limit, int) and 0 < limit < 1_000_000_000:
        return limit
    return DEFAULT_MAX_LENGTH


def rolling_windows(tokens: Sequence[int], prefix: int, max_len: int) -> list[tuple[list[int], int]]:
    """lm-eval's disjoint rolling windows as (sequence, n_scored) pairs.

    The model reads sequence[:-1] and predicts sequence[1:]; only the last n_scored predictions
    count. With seq = [prefix] + tokens, window k predicts tokens[done : done + m] from the L
    tokens of seq just before its last target: every token is predicted exactly once.
    """
    if not tokens:
        return []
    seq = [prefix, *tokens]
    first = min(max_len, len(tokens))
    windows = [(seq[: first + 1], first)]
    done = first
    while done < len(tokens):
        count = min(len(tokens) - done, max_len)
        end = done + count  # exclusive end in `tokens`; seq index is +1
        windows.append((seq[end - max_len : end + 1], count))
        done = end
    return windows


def length_batches(lengths: Sequence[int], batch_tokens: int, batch_size: int | None) -> list[list[int]]:
    """Indices grouped longest first so a batch pads to its first item's length.

    A batch holds as many items as fit in `batch_tokens` padded tokens (always at least one),
    and at most `batch_size` items when given.
    """
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    batches: list[list[int]] = []
    current: list[int] = []
    for i in order:
        width = lengths[current[0]] if current else lengths[i]
        full = (len(current) + 1) * max(width, 1) > batch_tokens or (batch_size and len(current) >= batch_size)
        if current and full:
            batches.append(current)
            current = []
        current.append(i)
    if current:
        batches.append(current)
    return batches


def subsample_indices(n: int, subsample: int | float | None, seed: int) -> list[int]:
    """Sorted item indices to score: all, k of them, or a fraction, drawn by Random(seed)."""
    if subsample is None:
        return list(range(n))
    if isinstance(subsample, bool) or not isinstance(subsample, (int, float)) or subsample <= 0:
        raise TaskError(f"subsample: expected a count > 0 or a fraction in (0, 1], got {subsample!r}")
    if isinstance(subsample, float):
        if subsample > 1:
            raise TaskError(f"subsample: a fraction must be in (0, 1], got {subsample}")
        k = max(1, round(subsample * n))
    else:
        k = subsample
    if k >= n:
        return list(range(n))
    return sorted(random.Random(seed).sample(range(n), k))


# --------------------------------------------------------------------------- model calls


def _pad_rows(rows: Sequence[Sequence[int]], value: int, width: int | None = None, left: bool = False) -> torch.Tensor:
    width = width if width is not None else max(len(r) for r in rows)
    out = torch.full((len(rows), width), value, dtype=torch.long)
    for i, row in enumerate(rows):
        if row:
            if left:
                out[i, width - len(row) :] = torch.as_tensor(row)
            else:
                out[i, : len(row)] = torch.as_tensor(row)
    return out


def _token_nll(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """-log p(target) per position in float32; 0 where target == IGNORE.  (B, T, V), (B, T) -> (B, T)

    Row by row, so the float32 log-softmax temporary is (T, V), not (B, T, V).
    """
    targets = targets.to(logits.device)
    rows = [
        F.cross_entropy(logits[b].float(), targets[b], ignore_index=IGNORE, reduction="none")  # (T,)
        for b in range(logits.shape[0])
    ]
    return torch.stack(rows)  # (B, T)


def _accepts(model, argument: str) -> bool:
    try:
        return argument in inspect.signature(model.forward).parameters
    except (TypeError, ValueError):
        return False


@torch.inference_mode()
def sequence_logprobs(
    model,
    sequences: Sequence[tuple[Sequence[int], int]],
    *,
    batch_tokens: int = DEFAULT_BATCH_TOKENS,
    batch_size: int | None = None,
    pad_id: int = 0,
    progress: bool = False,
) -> list[float]:
    """Sum of log p over the last n_scored predictions of each (sequence, n_scored).

    Right padding and no attention mask, as lm-eval: a causal model's real positions never see
    the padding that follows them. One forward pass per length-sorted batch.
    """
    device = model.device
    totals = [0.0] * len(sequences)
    batches = length_batches([len(s) - 1 for s, _ in sequences], batch_tokens, batch_size)
    for batch in _progress(batches, progress, "scoring"):
        inputs = _pad_rows([sequences[i][0][:-1] for i in batch], pad_id)  # (B, W)
        targets = torch.full_like(inputs, IGNORE)  # (B, W)
        for row, i in enumerate(batch):
            seq, n_scored = sequences[i]
            width = len(seq) - 1
            targets[row, width - n_scored : width] = torch.as_tensor(seq[width - n_scored + 1 :])
        logits = model(input_ids=inputs.to(device), use_cache=False).logits  # (B, W, V)
        sums = -_token_nll(logits, targets).double().sum(dim=1)  # (B,)
        for row, i in enumerate(batch):
            totals[i] = float(sums[row])
    return totals


def _progress(items, enabled: bool, desc: str):
    if not enabled:
        return items
    from tqdm.auto import tqdm

    return tqdm(items, desc=desc, leave=False)


class _EvalMode:
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


# --------------------------------------------------------------------------- tasks


class FitnessTask:
    """A dev set and how to score it. Built once per worker; `evaluate` runs per candidate."""

    kind: str = ""

    def __init__(self, spec: TaskSpec, tokenizer):
        self.spec = spec
        self.label = spec.label
        self.tokenizer = tokenizer
        self.options = dict(spec.options)
        self.prefix = prefix_token_id(tokenizer)
        pad = tokenizer.pad_token_id
        self.pad_id = pad if pad is not None else self.prefix
        for key in ("context_length", "batch_size", "batch_tokens", "max_new_tokens", "num_fewshot", "limit"):
            self._int_option(key, None)  # a bad number fails at build time, not per candidate
        if self.options.get("subsample") is not None:
            subsample_indices(1, self.options["subsample"], 0)

    def __len__(self) -> int:
        return len(self.items)

    def option(self, key: str, default=None):
        return self.options.get(key, default)

    def _int_option(self, key: str, default: int | None) -> int | None:
        value = self.options.get(key, default)
        smallest = 0 if key == "num_fewshot" else 1
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < smallest):
            raise TaskError(f"{self.label}: option {key} must be an integer >= {smallest}, got {value!r}")
        return value

    def context_length(self, model) -> int:
        return self._int_option("context_length", None) or model_max_length(model, self.tokenizer)

    def batching(self) -> dict:
        return dict(
            batch_tokens=self._int_option("batch_tokens", DEFAULT_BATCH_TOKENS),
            batch_size=self._int_option("batch_size", None),
        )

    def selected(self, subsample, seed: int) -> list[int]:
        if subsample is None:
            subsample = self.options.get("subsample")
        return subsample_indices(len(self.items), subsample, seed)

    def evaluate(self, model, *, subsample: int | float | None = None, seed: int = 0, progress: bool = False) -> dict[str, float]:
        with _EvalMode(model):
            return self._evaluate(model, self.selected(subsample, seed), progress)

    def _evaluate(self, model, indices: list[int], progress: bool) -> dict[str, float]:
        raise NotImplementedError


class PerplexityTask(FitnessTask):
    kind = "perplexity"

    def __init__(self, spec: TaskSpec, tokenizer):
        super().__init__(spec, tokenizer)
        self.items = load_texts(spec.data)  # documents
        if not self.items:
            raise TaskError(f"{spec.data}: no documents")
        self.tokens = [encode(tokenizer, doc) for doc in self.items]
        self.words = [len(re.split(r"\s+", doc)) for doc in self.items]
        self.bytes = [len(doc.encode("utf-8")) for doc in self.items]

    def _evaluate(self, model, indices, progress):
        max_len = self.context_length(model)
        windows = [w for i in indices for w in rolling_windows(self.tokens[i], self.prefix, max_len)]
        logprobs = sequence_logprobs(model, windows, pad_id=self.pad_id, progress=progress, **self.batching())
        nll_sum = -sum(logprobs)
        tokens = sum(len(self.tokens[i]) for i in indices)
        words = sum(self.words[i] for i in indices)
        n_bytes = sum(self.bytes[i] for i in indices)
        mean_nll = nll_sum / max(tokens, 1)
        return {
            "score": -mean_nll,
            "token_perplexity": _safe_exp(mean_nll),
            "word_perplexity": _safe_exp(nll_sum / max(words, 1)),
            "byte_perplexity": _safe_exp(nll_sum / max(n_bytes, 1)),
            "bits_per_byte": nll_sum / max(n_bytes, 1) / math.log(2),
            "nll_sum": nll_sum,
            "tokens": float(tokens),
            "documents": float(len(indices)),
        }


def _safe_exp(x: float) -> float:
    try:
        return math.exp(x)
    except OverflowError:
        return float("inf")


# --------------------------------------------------------------------------- JSONL rows


def load_rows(spec: str) -> list[dict]:
    """Rows of a JSONL file or a built-in generated set (search.models.datasets); one-line errors."""
    return load_jsonl_rows(spec)


def _check_row(spec: str, n: int, row: dict, fields: Mapping[str, type]) -> None:
    for key, typ in fields.items():
        if key not in row:
            raise TaskError(f"{spec}: row {n}: missing field {key!r} (expected {', '.join(fields)})")
        value = row[key]
        if not isinstance(value, typ) or (typ is int and isinstance(value, bool)):
            raise TaskError(f"{spec}: row {n}: field {key!r} must be {typ.__name__}, got {type(value).__name__}")


def mc_rows(spec: str) -> list[tuple[str, list[str], int]]:
    """(context, choices, label) per row, checked: >= 2 string choices, label an index into them."""
    rows = []
    for n, row in enumerate(load_rows(spec), 1):
        _check_row(spec, n, row, {"context": str, "choices": list, "label": int})
        choices, label = row["choices"], row["label"]
        if len(choices) < 2 or not all(isinstance(c, str) and c for c in choices):
            raise TaskError(f"{spec}: row {n}: \"choices\" must be a list of at least 2 non-empty strings")
        if not 0 <= label < len(choices):
            raise TaskError(f"{spec}: row {n}: \"label\" {label} is not an index into {len(choices)} choices")
        rows.append((row["context"], list(choices), label))
    return rows


def generate_rows(spec: str) -> list[tuple[str, str]]:
    rows = []
    for n, row in enumerate(load_rows(spec), 1):
        _check_row(spec, n, row, {"prompt": str, "answer": str})
        rows.append((row["prompt"], row["answer"]))
    return rows


# --------------------------------------------------------------------------- multiple choice


def encode_pair(tokenizer, context: str, continuation: str, prefix: int) -> tuple[list[int], list[int]]:
    """lm-eval's context/continuation split of the joint tokenisation (TemplateLM._encode_pair)."""
    if context == "":
        cont = tokenizer.encode(continuation, add_special_tokens=False)
        return ([prefix], cont) if cont[:1] != [prefix] else (cont[:1], cont[1:])
    n_spaces = len(context) - len(context.rstrip())
    if n_spaces:
        context, continuation = context[:-n_spaces], context[-n_spaces:] + continuation
    whole = encode(tokenizer, context + continuation)
    ctx = encode(tokenizer, context)
    return ctx, whole[len(ctx) :]


@dataclass
class _Question:
    context: list[int]
    continuations: list[list[int]]
    label: int
    chars: list[int]  # len(choice) in characters, lm-eval's acc_norm
    bytes: list[int]  # len(choice) in UTF-8 bytes, lm-eval's acc_bytes


class MultipleChoiceTask(FitnessTask):
    kind = "multiple_choice"
    METRICS = ("acc", "acc_norm", "acc_bytes")

    def __init__(self, spec: TaskSpec, tokenizer):
        super().__init__(spec, tokenizer)
        delimiter = self.option("delimiter", " ")
        if not isinstance(delimiter, str):
            raise TaskError(f"{self.label}: option delimiter must be a string, got {delimiter!r}")
        self.metric = self.option("metric", "acc_norm")
        if self.metric not in self.METRICS:
            raise TaskError(f"{self.label}: option metric must be one of {', '.join(self.METRICS)}, got {self.metric!r}")
        self.items = []
        for n, (context, choices, label) in enumerate(mc_rows(spec.data), 1):
            pairs = [encode_pair(tokenizer, context, delimiter + c, self.prefix) for c in choices]
            if any(not cont for _, cont in pairs):
                raise TaskError(f"{spec.data}: row {n}: a choice tokenises to nothing after the context")
            self.items.append(
                _Question(
                    context=pairs[0][0],
                    continuations=[cont for _, cont in pairs],
                    label=label,
                    chars=[len(c) for c in choices],
                    bytes=[len(c.encode("utf-8")) for c in choices],
                )
            )
        self.share_prefix = bool(self.option("share_prefix", True))

    def _evaluate(self, model, indices, progress):
        questions = [self.items[i] for i in indices]
        lls = self.choice_logprobs(model, questions, progress)
        hits = {"acc": 0, "acc_norm": 0, "acc_bytes": 0}
        for q, ll in zip(questions, lls):
            hits["acc"] += _argmax(ll) == q.label
            hits["acc_norm"] += _argmax([v / n for v, n in zip(ll, q.chars)]) == q.label
            hits["acc_bytes"] += _argmax([v / n for v, n in zip(ll, q.bytes)]) == q.label
        metrics = {key: value / len(questions) for key, value in hits.items()}
        metrics["mean_gold_loglik"] = sum(ll[q.label] for q, ll in zip(questions, lls)) / len(questions)
        return {"score": metrics[self.metric], **metrics, "questions": float(len(questions))}

    def choice_logprobs(self, model, questions: list[_Question], progress: bool = False) -> list[list[float]]:
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


def _argmax(values: Sequence[float]) -> int:
    return max(range(len(values)), key=lambda i: (values[i], -i))


@torch.inference_mode()
def shared_prefix_logprobs(
    model, questions: Sequence[_Question], *, batch_tokens: int = DEFAULT_BATCH_TOKENS, batch_size: int | None = None, progress: bool = False
) -> list[list[float]]:
    """Score each question's context once, then all its choices after it through the KV cache.

    Pass 1: contexts left-padded (attention mask, position ids counted from the first real
    token); the last position's log-softmax gives every choice's first token. The cache is then
    gathered so each choice row has its question's context. Pass 2: each choice minus its last
    token, right-padded, predicts the choice's tokens 2..m. Cost: sum(context) + sum(choices)
    tokens instead of n_choices * context + sum(choices).
    """
    device = model.device
    keep_last = {"logits_to_keep": 1} if _accepts(model, "logits_to_keep") else {}
    results: list[list[float]] = [[] for _ in questions]
    # a question's cost in padded tokens ~ its context plus its choices
    cost = [len(q.context) + sum(len(c) for c in q.continuations) for q in questions]
    for batch in _progress(length_batches(cost, batch_tokens, batch_size), progress, "scoring choices"):
        group = [questions[i] for i in batch]
        ctx_lens = torch.tensor([len(q.context) for q in group])  # (B,)
        ctx_ids = _pad_rows([q.context for q in group], 0, left=True)  # (B, Tc)
        ctx_mask = _pad_rows([[1] * len(q.context) for q in group], 0, left=True)  # (B, Tc)
        positions = (ctx_mask.cumsum(1) - 1).clamp(min=0)  # (B, Tc)
        out = model(
            input_ids=ctx_ids.to(device), attention_mask=ctx_mask.to(device), position_ids=positions.to(device),
            use_cache=True, **keep_last,
        )
        first = torch.log_softmax(out.logits[:, -1].float(), dim=-1)  # (B, V): log p(first choice token)
        owner = torch.tensor([b for b, q in enumerate(group) for _ in q.continuations])  # (R,) question of each row
        conts = [c for q in group for c in q.continuations]
        cache = out.past_key_values
        cache.batch_select_indices(owner.to(device))  # (R, heads, Tc, d) per layer
        inputs = _pad_rows([c[:-1] for c in conts], 0, width=max(1, max(len(c) for c in conts) - 1))  # (R, Tk)
        targets = _pad_rows([c[1:] for c in conts], IGNORE, width=inputs.shape[1])  # (R, Tk)
        # the new positions need no padding mask: a row's padding comes after its real tokens
        mask = torch.cat([ctx_mask[owner], torch.ones_like(inputs)], dim=1)  # (R, Tc + Tk)
        positions = ctx_lens[owner, None] + torch.arange(inputs.shape[1])  # (R, Tk)
        logits = model(
            input_ids=inputs.to(device), attention_mask=mask.to(device), position_ids=positions.to(device),
            past_key_values=cache, use_cache=True,
        ).logits  # (R, Tk, V)
        rest = -_token_nll(logits, targets).double().sum(dim=1)  # (R,)
        heads = first[owner.to(device), torch.tensor([c[0] for c in conts], device=device)].double()  # (R,)
        row_ll = (heads + rest).tolist()
        r = 0
        for b, i in enumerate(batch):
            n = len(group[b].continuations)
            results[i] = row_ll[r : r + n]
            r += n
    return results


# --------------------------------------------------------------------------- generation


class GenerateTask(FitnessTask):
    kind = "generate"
    MATCHES = {"exact": "exact_match", "exact_match": "exact_match", "contains": "contains"}

    def __init__(self, spec: TaskSpec, tokenizer):
        super().__init__(spec, tokenizer)
        match = self.option("match", self.option("metric", "exact"))
        if match not in self.MATCHES:
            raise TaskError(f"{self.label}: option match must be exact or contains, got {match!r}")
        self.metric = self.MATCHES[match]
        stop = self.option("stop", ["\n"])
        stop = [stop] if isinstance(stop, str) else stop
        if not isinstance(stop, list) or not all(isinstance(s, str) and s for s in stop):
            raise TaskError(f"{self.label}: option stop must be a non-empty string or a list of them")
        self.stop = stop
        self.max_new_tokens = self._int_option("max_new_tokens", 32)
        rows = generate_rows(spec.data)
        self.items = [(encode(tokenizer, prompt), answer) for prompt, answer in rows]
        self._stop_ids: dict[int, torch.Tensor] = {}

    def stop_token_mask(self, vocab_size: int) -> torch.Tensor:
        """(V,) bool: tokens whose text contains a stop string, or that end the sequence."""
        if vocab_size not in self._stop_ids:
            texts = self.tokenizer.batch_decode([[i] for i in range(min(vocab_size, len(self.tokenizer)))])
            mask = torch.zeros(vocab_size, dtype=torch.bool)
            mask[: len(texts)] = torch.tensor([any(s in t for s in self.stop) for t in texts])
            for eos in self.eos_ids():
                if eos < vocab_size:
                    mask[eos] = True
            self._stop_ids[vocab_size] = mask
        return self._stop_ids[vocab_size]

    def eos_ids(self) -> set[int]:
        return {self.tokenizer.eos_token_id} - {None}

    def _evaluate(self, model, indices, progress):
        prompts = [self.items[i][0] for i in indices]
        outputs = self.generate(model, prompts, progress)
        exact = contains = 0
        for i, text in zip(indices, outputs):
            answer = self.items[i][1].strip()
            exact += text.strip() == answer
            contains += answer in text
        metrics = {"exact_match": exact / len(indices), "contains": contains / len(indices)}
        return {"score": metrics[self.metric], **metrics, "prompts": float(len(indices))}

    def generate(self, model, prompts: list[list[int]], progress: bool = False) -> list[str]:
        """Greedy continuations of token prompts, cut at EOS and the first stop string."""
        keep = self.context_length(model) - self.max_new_tokens
        if keep < 1:
            raise TaskError(f"{self.label}: max_new_tokens {self.max_new_tokens} leaves no room for the prompt")
        prompts = [p[-keep:] for p in prompts]
        texts = [""] * len(prompts)
        budget = self.batching()
        for batch in _progress(length_batches([len(p) + self.max_new_tokens for p in prompts], budget["batch_tokens"], budget["batch_size"] or 64), progress, "generating"):
            new_tokens = greedy_decode(model, [prompts[i] for i in batch], self.max_new_tokens, self.stop_token_mask)
            for i, tokens in zip(batch, new_tokens):
                texts[i] = self.cut(tokens)
        return texts

    def cut(self, tokens: list[int]) -> str:
        eos = self.eos_ids()
        end = next((k for k, t in enumerate(tokens) if t in eos), len(tokens))
        text = self.tokenizer.decode(tokens[:end], skip_special_tokens=True)
        for s in self.stop:
            text = text.split(s, 1)[0]
        return text


@torch.inference_mode()
def greedy_decode(model, prompts: list[list[int]], max_new_tokens: int, stop_mask_for) -> list[list[int]]:
    """Argmax decoding of a left-padded batch with a KV cache, until every row hit a stop token."""
    device = model.device
    ids = _pad_rows(prompts, 0, left=True).to(device)  # (B, T)
    mask = _pad_rows([[1] * len(p) for p in prompts], 0, left=True).to(device)  # (B, T)
    positions = (mask.cumsum(1) - 1).clamp(min=0)  # (B, T)
    keep_last = {"logits_to_keep": 1} if _accepts(model, "logits_to_keep") else {}
    out = model(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=True, **keep_last)
    stop_mask = None
    done = torch.zeros(len(prompts), dtype=torch.bool, device=device)
    generated = []
    for step in range(max_new_tokens):
        next_token = out.logits[:, -1].argmax(dim=-1)  # (B,)
        if stop_mask is None:
            stop_mask = stop_mask_for(out.logits.shape[-1]).to(device)
        generated.append(next_token)
        done |= stop_mask[next_token]
        if bool(done.all()) or step == max_new_tokens - 1:
            break
        mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)  # (B, T + step + 1)
        positions = positions[:, -1:] + 1  # (B, 1)
        out = model(
            input_ids=next_token[:, None], attention_mask=mask, position_ids=positions,
            past_key_values=out.past_key_values, use_cache=True,
        )
    return torch.stack(generated, dim=1).tolist()  # (B, steps)


# --------------------------------------------------------------------------- building


TASK_CLASSES = {"perplexity": PerplexityTask, "multiple_choice": MultipleChoiceTask, "generate": GenerateTask}


def build_task(spec: TaskSpec, tokenizer) -> FitnessTask:
    """Load and tokenise a task's data once; raises TaskError / DataSpecError with one line."""
    if spec.kind not in TASK_KINDS:
        raise TaskError(f"task {spec.label!r}: unknown kind {spec.kind!r} (valid: {', '.join(TASK_KINDS)})")
    unknown = sorted(set(spec.options) - KIND_OPTIONS[spec.kind])
    if unknown:
        raise TaskError(
            f"task {spec.label!r}: unknown option {unknown[0]!r} for {spec.kind} (valid: {', '.join(sorted(KIND_OPTIONS[spec.kind]))})"
        )
    if spec.kind == "lm_eval":
        from search.fitness.lm_eval import LmEvalTask

        return LmEvalTask(spec, tokenizer)
    return TASK_CLASSES[spec.kind](spec, tokenizer)


@torch.inference_mode()
def forward_latency_ms(model, batch_size: int = 1, seq_len: int = 128, repeats: int = 5, warmup: int = 1, seed: int = 0) -> float:
    """Median wall time (ms) of one forward pass over a fixed (batch_size, seq_len) batch.

    The token ids are drawn from the vocabulary with a fixed seed, so every candidate of a run is
    timed on the same input; no KV cache. The median of `repeats` passes resists the odd slow
    pass a shared machine gives; on CUDA each pass is synchronised before the clock is read.
    """
    import statistics
    import time

    device = next(model.parameters()).device
    vocab = model.get_input_embeddings().num_embeddings
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (batch_size, seq_len), generator=generator).to(device)

    def one_pass() -> float:
        start = time.perf_counter()
        model(input_ids=ids, use_cache=False)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        return (time.perf_counter() - start) * 1e3

    for _ in range(warmup):
        one_pass()
    return statistics.median(one_pass() for _ in range(repeats))


__all__ = [
    "TASK_KINDS", "TaskError", "TaskSpec", "FitnessTask", "parse_task_arg", "build_task", "aggregate",
    "DataSpecError", "rolling_windows", "encode_pair", "sequence_logprobs", "shared_prefix_logprobs",
    "forward_latency_ms",
]

