"""The `perplexity` fitness kind: lm-eval's rolling log-likelihood of documents.

Data: `pydoc:SPLIT`, a .txt file (one document), or JSONL `{"text"}` (one document per line).

Each document is scored by lm-eval's `loglikelihood_rolling`: its tokens t_1..t_n are predicted
in disjoint windows of at most L predictions (`get_rolling_token_windows` with context_len=1,
then `make_disjoint_window`; see kernels.rolling_windows). The first window's input is
[prefix] + t_1..t_{L-1} and predicts t_1..t_L; each later window predicts the next
min(L, rest) tokens from an input of the L tokens just before its last target, so a short last
window gets extra left context. Every token is predicted exactly once; the document's
log-likelihood LL_d is the sum. Over the scored documents:

    nll_sum          = -sum_d LL_d                      (nats)
    tokens           = sum_d n_d                        (predicted tokens)
    token_perplexity = exp(nll_sum / tokens)
    word_perplexity  = exp(nll_sum / sum_d words_d),   words_d = len(re.split(r"\\s+", doc))
    byte_perplexity  = exp(nll_sum / sum_d bytes_d),   bytes_d = len(doc.encode("utf-8"))
    bits_per_byte    = nll_sum / sum_d bytes_d / ln 2
    score            = -nll_sum / tokens                (minus mean token NLL)

word/byte perplexity and bits_per_byte are lm-eval's (weighted_perplexity aggregation: a ratio
of sums, not a mean of per-document perplexities); token_perplexity has no lm-eval counterpart.

Per example (one per document d): value = LL_d = -(sum of d's token NLLs), weight = n_d, so
sum(value) / sum(weight) = -nll_sum / tokens = score.

Option `chunk_tokens: N` cuts every document into consecutive pieces of N tokens (the last one
shorter) and makes each piece an item, scored as a document of its own (the prefix token as its
only context), as compression papers score fixed-length windows of WikiText. Items then cost
about the same, so a subset of k of n items costs about k/n of the whole: what staged fitness
needs, where one long document would otherwise dominate a small first stage. The words and
bytes of a piece are those of its decoded text.
"""
from __future__ import annotations

import math
import re

from search.fitness.base import FitnessTask, Scored, parts_agree
from search.fitness.kernels import encode, rolling_windows, sequence_logprobs
from search.fitness.spec import COMMON_OPTIONS, TaskError, TaskSpec, register_task_kind
from search.models.datasets import load_texts


@register_task_kind("perplexity", COMMON_OPTIONS | {"chunk_tokens"})
class PerplexityTask(FitnessTask):
    """Rolling-window log-likelihood of each document, aggregated as lm-eval does."""

    joins_metrics = True

    def __init__(self, spec: TaskSpec, tokenizer):
        super().__init__(spec, tokenizer)
        self.documents = load_texts(spec.data)
        if not self.documents:
            raise TaskError(f"{spec.data}: no documents")
        self.tokens = [encode(tokenizer, doc) for doc in self.documents]
        self.items = self.documents
        chunk = self._int_option("chunk_tokens", None)
        if chunk is not None:
            self.tokens = chunked(self.tokens, chunk, drop=self.prefix)
            self.items = [tokenizer.decode(piece) for piece in self.tokens]
        self.words = [len(re.split(r"\s+", doc)) for doc in self.items]
        self.bytes = [len(doc.encode("utf-8")) for doc in self.items]

    def _evaluate(self, model, indices, progress) -> Scored:
        max_len = self.context_length(model)
        per_doc = [rolling_windows(self.tokens[i], self.prefix, max_len) for i in indices]
        windows = [w for doc_windows in per_doc for w in doc_windows]
        logprobs = sequence_logprobs(model, windows, pad_id=self.pad_id, progress=progress, **self.batching())
        doc_ll = _group_sums(logprobs, [len(w) for w in per_doc])  # LL_d per scored document
        totals = {
            "nll_sum": -sum(logprobs),
            "tokens": float(sum(len(self.tokens[i]) for i in indices)),
            "words": float(sum(self.words[i] for i in indices)),
            "bytes": float(sum(self.bytes[i] for i in indices)),
            "documents": float(len(indices)),
        }
        return Scored(perplexity_metrics(totals), doc_ll, [float(len(self.tokens[i])) for i in indices])

    @classmethod
    def joined_metrics(cls, parts):
        """Every metric is a ratio of sums over documents (`SUMS`): the parts' sums added."""
        if not parts_agree(parts, SUMS):  # e.g. a row written before `words` were kept
            return None
        return perplexity_metrics({key: sum(float(p[key]) for p in parts) for key in SUMS})


SUMS = ("nll_sum", "tokens", "words", "bytes", "documents")  # additive over documents


def perplexity_metrics(totals: dict[str, float]) -> dict[str, float]:
    """The metrics of scored documents from their sums (`SUMS`): mean NLL per token, word and
    byte, as lm-evaluation-harness's perplexities and bits per byte."""
    nll_sum = totals["nll_sum"]
    mean_nll = nll_sum / max(totals["tokens"], 1)
    return {
        "score": -mean_nll,
        "token_perplexity": _safe_exp(mean_nll),
        "word_perplexity": _safe_exp(nll_sum / max(totals["words"], 1)),
        "byte_perplexity": _safe_exp(nll_sum / max(totals["bytes"], 1)),
        "bits_per_byte": nll_sum / max(totals["bytes"], 1) / math.log(2),
        **totals,
    }


def chunked(documents: list[list[int]], size: int, drop: int | None = None) -> list[list[int]]:
    """Consecutive pieces of at most `size` tokens of every document, in order; a document's
    leading `drop` token (the prefix `encode` may add) is left out, since every piece is scored
    after the prefix anyway."""
    pieces = []
    for tokens in documents:
        if drop is not None and tokens[:1] == [drop]:
            tokens = tokens[1:]
        pieces.extend(tokens[start:start + size] for start in range(0, len(tokens), size))
    return pieces


def _group_sums(values: list[float], sizes: list[int]) -> list[float]:
    """Sums of consecutive runs of `values` of the given sizes (windows -> documents)."""
    out, start = [], 0
    for size in sizes:
        out.append(sum(values[start : start + size]))
        start += size
    return out


def _safe_exp(x: float) -> float:
    try:
        return math.exp(x)
    except OverflowError:
        return float("inf")


__all__ = ["PerplexityTask"]
