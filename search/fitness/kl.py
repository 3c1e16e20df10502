"""The `kl` fitness kind: how far a candidate's next-token distributions moved from a reference.

The cheap proxy for structure changes: a compressed model is compared with its own dense
(uncompressed) model on a few fixed calibration windows, no labels needed.

Data: a text spec, as for perplexity (`pydoc:train`, a .txt file, JSONL `{"text"}`), cut into
N = `num_sequences` (default 8) windows of T = `seq_len` (default 128) tokens by
`search.models.datasets.calibration_windows` (deterministic, corpus order). At every position t
of window n the reference model gives the next-token distribution P_{n,t} = softmax(logits)
and the candidate gives Q_{n,t}; all N*T positions count (no targets are needed).

    KL(P || Q) = sum_v P(v) (log P(v) - log Q(v))       nats, >= 0, = 0 iff Q == P
    kl     = mean of KL(P_{n,t} || Q_{n,t}) over the scored positions
    score  = -kl
    tokens = number of scored positions (windows * T)

Per example (one per window n): value = -sum_t KL(P_{n,t} || Q_{n,t}), weight = T, so
sum(value) / sum(weight) = -kl = score.

Use. The reference is explicit: `ref = task.reference(dense_model)` once (e.g. per recipe,
before a compression plan is applied), then `task.evaluate(compressed_model, reference=ref)`
for each compression of it. `evaluate` without a reference raises TaskError. A reference holds
every window, so it serves any `subsample` / `indices`.

What a reference stores (on the CPU, option `reference_dtype`: float16 (default) or float32):
  top_k = 0 (default): the full log-probs, (N, T, V): N*T*V*2 bytes in float16, e.g.
      8 x 128 x 49152 x 2 = 100.7 MB for SmolLM2-135M (twice that in float32).
  top_k = k > 0: per position the k most likely tokens under P (their log-probs and int32 ids)
      and the log of the tail mass P(rest) = sum of P over the other V - k tokens:
      N*T*(6k + 2) bytes in float16 (k = 64: 395 kB for N=8, T=128). KL is then taken over
      k + 1 buckets (the k tokens, and the tail), Q(tail) = sum of Q over the same complement:
          KL_k = sum_{v in top-k} P(v) log(P(v)/Q(v)) + P(tail) log(P(tail)/Q(tail))
      An approximation from below: merging outcomes never increases a KL divergence (log-sum
      inequality), so KL_k <= KL_{k+1} <= KL, and KL_k == KL at k = V (the tail is empty).

Rounding. The candidate's log-probs (or buckets) are rounded to the storage dtype exactly as the
reference's were, and both sides are renormalised (log_softmax over V, or over the k + 1
buckets) before the sum. So a model scored against its own reference gives exactly 0, and both
sides are proper distributions. Renormalising and sums run in float64 (a (T, V) temporary per
window): a KL of 1e-2 nats is a small difference of log-probs near -5, and float32 alone would
cost it about 1e-3 of its value; the log-softmax of the logits runs in float64 for float32
storage and in float32 for float16 storage, whose rounding is four orders coarser. float16
storage keeps a log-prob to 11 bits (0.002 nats at log p ~ -5), which moved kl by 2.4e-4 of
itself on a tiny model (tests/test_kl.py); float32 storage (twice the memory) matches a float64
computation to ~1e-8 relative.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from search.fitness.base import EvalMode, FitnessTask, Scored, count_weighted
from search.fitness.kernels import model_max_length, progress_bar
from search.fitness.spec import TaskError, TaskSpec, register_task_kind
from search.models.datasets import calibration_windows

DTYPES = {"float16": torch.float16, "float32": torch.float32}
OPTIONS = {"seq_len", "num_sequences", "top_k", "batch_size", "reference_dtype", "subsample"}
NEG_INF = float("-inf")


@dataclass(eq=False)
class KLReference:
    """A reference model's next-token log-probs on a kl task's windows (CPU tensors)."""

    input_ids: torch.Tensor  # (N, T) the windows it was computed on
    top_k: int  # the task's option: 0 = full distributions
    vocab_size: int  # V of the reference model
    logprobs: torch.Tensor | None = None  # (N, T, V) when top_k == 0
    top_logprobs: torch.Tensor | None = None  # (N, T, k) log P of P's k most likely tokens
    top_indices: torch.Tensor | None = None  # (N, T, k) int32 ids of those tokens
    tail_logprob: torch.Tensor | None = None  # (N, T) log P(every other token)

    @property
    def dtype(self) -> torch.dtype:
        return (self.logprobs if self.logprobs is not None else self.top_logprobs).dtype

    @property
    def nbytes(self) -> int:
        """Bytes of the stored distributions (the windows' ids not counted)."""
        parts = (self.logprobs, self.top_logprobs, self.top_indices, self.tail_logprob)
        return sum(t.numel() * t.element_size() for t in parts if t is not None)

    def window(self, n: int, device) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Stored log P of window n as float64 on `device`, and its top-k ids (None when full).

        (T, V) and None, or (T, k + 1) buckets (the k tokens, then the tail) and (T, k).
        """
        if self.logprobs is not None:
            return self.logprobs[n].to(device).double(), None  # (T, V)
        top = self.top_logprobs[n].double()  # (T, k)
        tail = self.tail_logprob[n].double()[:, None]  # (T, 1)
        return torch.cat([top, tail], dim=-1).to(device), self.top_indices[n].to(device).long()


def top_k_buckets(logp: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
    """Log-probs of the chosen tokens, then of all the others together.  (T, V), (T, k) -> (T, k+1)"""
    top = logp.gather(-1, indices)  # (T, k)
    tail = logp.scatter(-1, indices, NEG_INF).logsumexp(-1, keepdim=True)  # (T, 1) log sum_{v not chosen} P(v)
    return torch.cat([top, tail], dim=-1)  # (T, k + 1)


def kl_sum(logp: torch.Tensor, logq: torch.Tensor) -> torch.Tensor:
    """sum_v P(v) (log P(v) - log Q(v)) over the last dim, with 0 log 0 = 0: where P(v) = 0 the
    term is NaN (0 * -inf) and nansum counts it 0; a NaN log-prob of Q makes the KL NaN only
    through the renormalisation before (log_softmax spreads it over the row).  (..., K) x2 -> (...)"""
    return (logp.exp() * (logp - logq)).nansum(-1)


def log_probs(logits: torch.Tensor, storage: torch.dtype) -> torch.Tensor:
    """Next-token log-probs, one window at a time, for storage in `storage`: computed in float64
    for float32 storage, in float32 for float16 (its error, ~1e-6 at log p ~ -20, is four orders
    below float16's step there, so the stored values are the same but for rare ties at a rounding
    boundary; reference and candidate take the same path, so Q == P still gives 0).
    (T, V) -> (T, V)"""
    precise = torch.float64 if storage == torch.float32 else torch.float32
    return torch.log_softmax(logits.to(precise), dim=-1)


def exact_math(device: torch.device):
    """The distribution math after a forward that may have run under autocast (a screening stage
    in `fitness.screen_dtype`): only the model's matrix products are screened; the log-softmax,
    the rounding to storage and the sums above stay in their own dtypes (autocast would refuse
    their float64 operands)."""
    return torch.autocast(device.type, enabled=False)


def stored(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """x rounded to the storage dtype, back in float64."""
    return x.to(dtype).double()


@register_task_kind("kl", OPTIONS)
class KLTask(FitnessTask):
    """Mean KL(P_ref || P_candidate) of next-token distributions over fixed windows."""

    INT_OPTIONS = FitnessTask.INT_OPTIONS + ("seq_len", "num_sequences")
    joins_metrics = True

    def __init__(self, spec: TaskSpec, tokenizer):
        super().__init__(spec, tokenizer)
        self.seq_len = self._int_option("seq_len", 128)
        self.top_k = self._int_option("top_k", 0, smallest=0)
        self.batch_size = self._int_option("batch_size", 8)
        name = self.option("reference_dtype", "float16")
        if name not in DTYPES:
            raise TaskError(f"{self.label}: option reference_dtype must be one of {', '.join(DTYPES)}, got {name!r}")
        self.dtype = DTYPES[name]
        data = calibration_windows(tokenizer, spec.data, self.seq_len, self._int_option("num_sequences", 8))
        self.windows = data.input_ids  # (N, T)
        self.items = self.windows  # one item per window

    # ------------------------------------------------------------------ the reference

    def reference(self, model, progress: bool = False) -> KLReference:
        """The reference distributions of `model` on every window (see the module docstring)."""
        self._check_length(model)
        parts: list[dict[str, torch.Tensor]] = []
        with EvalMode(model):
            for _, logits in self._batched_logits(model, list(range(len(self.windows))), progress, "kl reference"):
                with exact_math(logits.device):
                    parts.extend(self._store(log_probs(row, self.dtype)) for row in logits)  # row: (T, V)
        with exact_math(logits.device):
            stacked = {key: torch.stack([p[key] for p in parts]) for key in parts[0]}  # (N, T, ...)
        return KLReference(self.windows.clone(), self.top_k, logits.shape[-1], **stacked)

    def _store(self, logp: torch.Tensor) -> dict[str, torch.Tensor]:
        """What a reference keeps of one window's log-probs (T, V), on the CPU."""
        if self.top_k == 0:
            return {"logprobs": logp.to(self.dtype).cpu()}  # (T, V)
        k = min(self.top_k, logp.shape[-1])
        indices = logp.topk(k, dim=-1).indices  # (T, k)
        buckets = top_k_buckets(logp, indices).to(self.dtype).cpu()  # (T, k + 1)
        return {"top_logprobs": buckets[:, :k], "top_indices": indices.int().cpu(), "tail_logprob": buckets[:, k]}

    # ------------------------------------------------------------------ scoring

    def evaluate(
        self, model, *, reference: KLReference | None = None, subsample=None, seed: int = 0, progress: bool = False,
        indices=None, per_example: bool = False,
    ) -> dict:
        """Metrics of `model` against `reference` (required) on the chosen windows."""
        self._check_reference(reference)
        self._check_length(model)
        chosen = self.chosen(indices, subsample, seed)
        with EvalMode(model):
            scored = self._score(model, reference, chosen, progress)
        return scored.output(chosen, per_example)

    def _score(self, model, reference: KLReference, rows: list[int], progress: bool) -> Scored:
        window_kl: list[float] = []  # per window: sum over its T positions of KL(P || Q)
        for batch, logits in self._batched_logits(model, rows, progress, "kl"):
            if logits.shape[-1] != reference.vocab_size:
                raise TaskError(
                    f"{self.label}: model has {logits.shape[-1]} logits, the reference {reference.vocab_size}"
                )
            with exact_math(logits.device):
                for n, row_logits in zip(batch, logits):  # row_logits: (T, V)
                    logp, top = reference.window(n, logits.device)  # (T, V) or (T, k + 1), ids (T, k)
                    kl_t = self._position_kl(logp, log_probs(row_logits, self.dtype), top)  # (T,)
                    window_kl.append(float(kl_t.sum()))
        positions = len(rows) * self.seq_len
        kl = sum(window_kl) / positions
        metrics = {"kl": kl, "score": -kl, "tokens": float(positions)}
        return Scored(metrics, [-v for v in window_kl], [float(self.seq_len)] * len(rows))

    @classmethod
    def joined_metrics(cls, parts):
        """The KL is a mean over token positions."""
        return count_weighted(parts, "tokens")

    def _position_kl(self, logp: torch.Tensor, logq: torch.Tensor, top: torch.Tensor | None) -> torch.Tensor:
        """KL(P || Q) at each position of one window.  (T, V or k+1), (T, V), ids (T, k) or None -> (T,)"""
        if top is not None:
            logq = top_k_buckets(logq, top)  # (T, k + 1): Q on P's top-k tokens, then Q's tail
        # both sides rounded alike and renormalised, so Q == P gives exactly 0
        logp = torch.log_softmax(logp, dim=-1)
        logq = torch.log_softmax(stored(logq, self.dtype), dim=-1)
        return kl_sum(logp, logq)  # (T,)

    def _batched_logits(self, model, rows: list[int], progress: bool, desc: str):
        """(batch rows, logits (B, T, V)) for consecutive batches of the windows `rows`."""
        device = model.device
        batches = [rows[s : s + self.batch_size] for s in range(0, len(rows), self.batch_size)]
        for batch in progress_bar(batches, progress, desc):
            yield batch, model(input_ids=self.windows[batch].to(device), use_cache=False).logits  # (B, T, V)

    def _check_reference(self, reference) -> None:
        if reference is None:
            raise TaskError(
                f"kl task needs a reference ({self.label}): ref = task.reference(dense_model) before "
                "compressing it, then task.evaluate(compressed_model, reference=ref)"
            )
        if not isinstance(reference, KLReference):
            raise TaskError(f"{self.label}: reference must be a KLReference, got {type(reference).__name__}")
        if reference.top_k != self.top_k or reference.dtype != self.dtype:
            raise TaskError(
                f"{self.label}: reference made with top_k={reference.top_k}, {reference.dtype}; "
                f"this task has top_k={self.top_k}, {self.dtype}"
            )
        if not torch.equal(reference.input_ids, self.windows):
            raise TaskError(f"{self.label}: the reference was computed on other windows (another tokenizer, or "
                            "other seq_len / num_sequences): KL compares models that tokenise the data alike")

    def _check_length(self, model) -> None:
        limit = model_max_length(model, self.tokenizer)
        if self.seq_len > limit:
            raise TaskError(f"{self.label}: seq_len {self.seq_len} exceeds the model's {limit} positions")


__all__ = ["KLTask", "KLReference", "top_k_buckets", "kl_sum"]
