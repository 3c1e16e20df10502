"""Tensor-Train Matrix (TTM) layers: compress pretrained linears, or train TTM layers from scratch.

A linear map `in -> out` with `in = i_1 * ... * i_d` and `out = o_1 * ... * o_d` is stored as d
cores `G_k` of shape `(r_{k-1}, i_k, o_k, r_k)` with `r_0 = r_d = 1`; the dense weight is

    W[(o_1..o_d), (i_1..i_d)] = G_1[:, i_1, o_1, :] @ G_2[:, i_2, o_2, :] @ ... @ G_d[:, i_d, o_d, :]

(a 1x1 product of matrices), so it costs `sum_k r_{k-1} i_k o_k r_k` parameters instead of
`in * out` (Chekalina et al., arXiv 2306.02697). Multi-indices are row-major: i_1 is the most
significant digit of the input index, o_1 of the output index.

Choices the paper leaves open, written down here:
- Factorisation: each dim is split into `num_cores` factors as equal as possible (the smallest
  largest factor, ties broken by the smallest spread); input factors are ordered descending and
  output factors ascending (576 -> in (9, 8, 8), 1536 -> out (8, 12, 16)), because the chain's
  state before core k holds `r_{k-1} * (o_1..o_{k-1}) * (i_k..i_d)` numbers per row: contracting
  the biggest input factor first and emitting the smallest output factor first keeps it smallest.
  A dim with fewer prime factors than cores (a factor of 1) is rejected.
- Ranks: one `rank` caps every inner rank, and each is also capped by the full TT rank of that
  unfolding, `min(prod_{j<=k} i_j o_j, prod_{j>k} i_j o_j)`. A `budget` (fraction of the dense
  layer's weight count) picks the largest such rank whose cores fit in it.
- Forward: the input is contracted core by core (left to right, one einsum per core), never
  forming the dense matrix. The custom backward saves only the input and the cores, recomputes the
  d intermediate states, and back-propagates through the chain by hand (two einsums per core).
  Measured cost (benchmarks/results/ttm.md): per row the chain does
  `sum_k r_{k-1} r_k (o_1..o_k)(i_k..i_d)` multiply-adds, which for ranks that keep quality
  (e.g. 576x1536 at rank 64: ~25M vs 0.9M dense) is far more than the dense layer; so
  `contraction="auto"` (default) takes the chain only when it costs fewer multiply-adds than
  rebuilding the dense weight once per call (`~r * in * out`) and multiplying by it — i.e. for
  a handful of rows (token-by-token decoding); for training batches it rebuilds the weight
  (autograd through the rebuild). `"chain"` / `"dense"` force one path. Same parameters and the
  same function either way; only the evaluation order differs.
- TT-SVD from a pretrained weight: sequential truncated SVDs in float64 of the weight reshaped and
  interleaved to `(i_1 o_1, ..., i_d o_d)`; afterwards the cores are rescaled to equal Frobenius
  norms (the product is unchanged) so a recovery optimiser's step is the same relative size on
  every core.
- Random init (from scratch): iid normal cores with `std_k = (std**2 / prod_k r_k) ** (1/(2d))`,
  which gives each entry of the implied dense weight the variance `std**2` of a dense init.
- Recovery: a few AdamW steps on the TTM parameters only (everything else frozen), cosine
  schedule, on calibration windows; lr 1e-4 by default (measured on SmolLM2, MLPs at rank 112:
  lr 2e-3 made the KL worse, 3.4 -> 7.2, while 1e-4 brought it 3.4 -> 1.2 in 15 steps). The default loss is KL(dense teacher || TTM student) over the
  vocabulary, with the teacher being the same model with its original linears swapped back in,
  so recovery restores the dense model's function instead of fine-tuning it on the calibration
  domain (`loss: lm` trains on next-token loss instead).
"""
from __future__ import annotations

import logging
import math
import re
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Iterator, Literal, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from compression.plan import PlanError, register_op
from compression.errors import CompressionError

log = logging.getLogger(__name__)

__all__ = [
    "TTMError",
    "TTMLinear",
    "LayerReport",
    "factorize",
    "factorize_pair",
    "chain_macs_per_row",
    "tt_ranks",
    "ttm_param_count",
    "rank_for_budget",
    "tt_svd",
    "ttm_contract",
    "module_pattern",
    "matching_linears",
    "replace_with_ttm",
    "fold_ttm",
    "replace_module",
    "recover",
    "TTMStep",
    "apply_ttm",
    "save_ttm_model",
    "load_ttm_model",
]

class TTMError(CompressionError):
    """A TTM shape, rank or budget that cannot work; the message is one line naming the field."""


# ----------------------------------------------------------------------------- shapes and ranks


def _ordered_factorisations(n: int, d: int, smallest: int = 2) -> Iterator[tuple[int, ...]]:
    """All non-decreasing tuples of d factors >= `smallest` whose product is n."""
    if d == 1:
        if n >= smallest:
            yield (n,)
        return
    f = smallest
    while f ** d <= n:
        if n % f == 0:
            for rest in _ordered_factorisations(n // f, d - 1, f):
                yield (f,) + rest
        f += 1


def factorize(n: int, d: int) -> tuple[int, ...]:
    """Split n into d factors > 1, as equal as possible, ascending (576, 3 -> (8, 8, 9))."""
    if d < 1:
        raise TTMError(f"cores: need at least 1 core, got {d}")
    if d == 1:
        return (n,)
    best = min(_ordered_factorisations(n, d), key=lambda fs: (fs[-1], fs[-1] - fs[0]), default=None)
    if best is None:
        raise TTMError(f"cores: dim {n} cannot be split into {d} factors > 1")
    return best


def factorize_pair(in_features: int, out_features: int, d: int) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """(input factors descending, output factors ascending) -- the order that keeps the chain cheap."""
    return tuple(sorted(factorize(in_features, d), reverse=True)), factorize(out_features, d)


def chain_macs_per_row(in_factors: Sequence[int], out_factors: Sequence[int], ranks: Sequence[int]) -> int:
    """Multiply-adds per input row of the contraction chain: sum_k r_{k-1} r_k (o_1..o_k)(i_k..i_d)."""
    d = len(in_factors)
    return sum(ranks[k] * ranks[k + 1] * math.prod(out_factors[: k + 1]) * math.prod(in_factors[k:]) for k in range(d))


def rebuild_macs(in_factors: Sequence[int], out_factors: Sequence[int], ranks: Sequence[int]) -> int:
    """Multiply-adds to rebuild the dense weight from the cores, left to right."""
    modes = [i * o for i, o in zip(in_factors, out_factors)]
    return sum(math.prod(modes[:k]) * ranks[k] * modes[k] * ranks[k + 1] for k in range(1, len(modes)))


def tt_ranks(in_factors: Sequence[int], out_factors: Sequence[int], max_rank: int) -> tuple[int, ...]:
    """(1, r_1, ..., r_{d-1}, 1): each inner rank is min(max_rank, full TT rank of that unfolding)."""
    if max_rank < 1:
        raise TTMError(f"rank: must be >= 1, got {max_rank}")
    modes = [i * o for i, o in zip(in_factors, out_factors)]  # n_k = i_k * o_k
    inner = [min(max_rank, math.prod(modes[:k]), math.prod(modes[k:])) for k in range(1, len(modes))]
    return (1, *inner, 1)


def ttm_param_count(in_factors: Sequence[int], out_factors: Sequence[int], ranks: Sequence[int]) -> int:
    return sum(ranks[k] * i * o * ranks[k + 1] for k, (i, o) in enumerate(zip(in_factors, out_factors)))


def rank_for_budget(in_factors: Sequence[int], out_factors: Sequence[int], budget: float) -> int:
    """The largest max-rank whose cores hold at most `budget * in * out` weights."""
    allowed = budget * math.prod(in_factors) * math.prod(out_factors)
    full = max(tt_ranks(in_factors, out_factors, 1 << 30))
    if ttm_param_count(in_factors, out_factors, tt_ranks(in_factors, out_factors, 1)) > allowed:
        raise TTMError(f"budget: {budget} is below the size of rank-1 cores for {in_factors} x {out_factors}")
    lo, hi = 1, full  # invariant: rank lo fits; the count is non-decreasing in the rank
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if ttm_param_count(in_factors, out_factors, tt_ranks(in_factors, out_factors, mid)) <= allowed:
            lo = mid
        else:
            hi = mid - 1
    return lo


# ----------------------------------------------------------------------------- contraction


def _chain(x: torch.Tensor, cores: Sequence[torch.Tensor], keep_states: bool = False):
    """Contract x (B, in) with the cores; returns y (B, out) and, if asked, every state t_k.

    State before core k: t_k of shape (B, P, r_{k-1}, i_k, Q) with P = o_1..o_{k-1} (outputs done)
    and Q = i_{k+1}..i_d (inputs still to contract). One step:
        u_k = einsum(t_k, G_k) over (r_{k-1}, i_k)  -> (B, P, o_k, r_k, Q)
    and t_{k+1} is u_k viewed as (B, P*o_k, r_k, i_{k+1}, Q / i_{k+1}).
    """
    batch = x.shape[0]
    t = x.reshape(batch, 1, 1, cores[0].shape[1], -1)  # (B, 1, 1, i_1, i_2..i_d)
    states = []
    for k, core in enumerate(cores):
        if keep_states:
            states.append(t)
        u = torch.einsum("bpriq,rios->bposq", t, core)  # (B, P, o_k, r_k, Q)
        if k + 1 < len(cores):
            p, o, r = u.shape[1], u.shape[2], u.shape[3]
            t = u.reshape(batch, p * o, r, cores[k + 1].shape[1], -1)  # (B, P*o_k, r_k, i_{k+1}, Q')
    return u.reshape(batch, -1), states  # (B, o_1..o_d)


class _TTMFunction(torch.autograd.Function):
    """y = x W^T for the TTM weight; saves only x and the cores for backward."""

    @staticmethod
    def forward(ctx, x, *cores):
        y, _ = _chain(x, cores)
        ctx.save_for_backward(x, *cores)
        return y

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_y):
        x, *cores = ctx.saved_tensors
        _, states = _chain(x, cores, keep_states=True)  # recompute the d states t_k
        grad_cores = [None] * len(cores)
        # grad w.r.t. u_d, the last einsum's output (B, P, o_d, 1, 1)
        t_last = states[-1]
        grad_u = grad_y.reshape(t_last.shape[0], t_last.shape[1], cores[-1].shape[2], 1, 1)
        grad_t = None
        for k in range(len(cores) - 1, -1, -1):
            t, core = states[k], cores[k]
            if ctx.needs_input_grad[k + 1]:
                grad_cores[k] = torch.einsum("bpriq,bposq->rios", t, grad_u)  # (r_{k-1}, i_k, o_k, r_k)
            if k == 0 and not ctx.needs_input_grad[0]:
                break
            grad_t = torch.einsum("bposq,rios->bpriq", grad_u, core)  # (B, P, r_{k-1}, i_k, Q)
            if k > 0:
                prev = states[k - 1]  # u_{k-1} is (B, P / o_{k-1}, o_{k-1}, r_{k-1}, i_k * Q)
                o_prev = cores[k - 1].shape[2]
                grad_u = grad_t.reshape(prev.shape[0], prev.shape[1], o_prev, core.shape[0], -1)
        grad_x = grad_t.reshape(x.shape) if ctx.needs_input_grad[0] else None
        return (grad_x, *grad_cores)


def ttm_contract(x: torch.Tensor, cores: Sequence[torch.Tensor]) -> torch.Tensor:
    """x (..., in) -> (..., out) through the TTM cores, with the memory-lean custom backward."""
    lead = x.shape[:-1]
    y = _TTMFunction.apply(x.reshape(-1, x.shape[-1]), *cores)  # (B, out)
    return y.reshape(*lead, y.shape[-1])


def dense_from_cores(cores: Sequence[torch.Tensor]) -> torch.Tensor:
    """The dense (out, in) weight the cores stand for (used for fold-back and errors only)."""
    d = len(cores)
    full = cores[0]  # (1, i_1, o_1, r_1)
    for core in cores[1:]:
        full = torch.tensordot(full, core, dims=([full.dim() - 1], [0]))  # (..., i_k, o_k, r_k)
    full = full.reshape(full.shape[1:-1])  # (i_1, o_1, ..., i_d, o_d)
    perm = [2 * k + 1 for k in range(d)] + [2 * k for k in range(d)]
    out_f = [c.shape[2] for c in cores]
    in_f = [c.shape[1] for c in cores]
    return full.permute(perm).reshape(math.prod(out_f), math.prod(in_f))  # (out, in)


def tt_svd(weight: torch.Tensor, in_factors: Sequence[int], out_factors: Sequence[int], ranks: Sequence[int]) -> list[torch.Tensor]:
    """TT-SVD of a dense (out, in) weight into cores (r_{k-1}, i_k, o_k, r_k), in float64."""
    d = len(in_factors)
    w = weight.detach().to(torch.float64).reshape(*out_factors, *in_factors)  # (o_1..o_d, i_1..i_d)
    interleave = [x for k in range(d) for x in (d + k, k)]  # -> (i_1, o_1, i_2, o_2, ...)
    rest = w.permute(interleave).contiguous()
    cores, r_prev = [], 1
    for k in range(d - 1):
        mat = rest.reshape(r_prev * in_factors[k] * out_factors[k], -1)  # (r_{k-1} i_k o_k, rest)
        u, s, vh = torch.linalg.svd(mat, full_matrices=False)
        r = min(ranks[k + 1], s.numel())
        cores.append(u[:, :r].reshape(r_prev, in_factors[k], out_factors[k], r))
        rest = s[:r, None] * vh[:r]  # (r_k, rest): the remainder carries the singular values
        r_prev = r
    cores.append(rest.reshape(r_prev, in_factors[-1], out_factors[-1], 1))
    norms = [c.norm() for c in cores]
    mean = torch.stack(norms).log().mean().exp()  # geometric mean: the product is unchanged
    return [c * (mean / n) if n > 0 else c for c, n in zip(cores, norms)]


# ----------------------------------------------------------------------------- the layer


def _is_conv1d(module: nn.Module) -> bool:
    return type(module).__name__ == "Conv1D" and hasattr(module, "nf")


def _linear_shape(module: nn.Module) -> tuple[int, int]:
    """(in, out) of an nn.Linear or a transformers Conv1D (GPT-2; weight stored as (in, out))."""
    if _is_conv1d(module):
        return module.weight.shape[0], module.weight.shape[1]
    return module.in_features, module.out_features


class TTMLinear(nn.Module):
    """A linear layer whose weight is a tensor-train matrix; drop-in for nn.Linear / Conv1D."""

    def __init__(
        self,
        in_features: int,
        out_features: int,
        rank: int | None = None,
        *,
        ranks: Sequence[int] | None = None,
        num_cores: int = 3,
        in_factors: Sequence[int] | None = None,
        out_factors: Sequence[int] | None = None,
        bias: bool = True,
        init_std: float | None = None,
        origin: Literal["linear", "conv1d"] = "linear",
        contraction: Literal["auto", "chain", "dense"] = "auto",
        device=None,
        dtype=None,
    ):
        super().__init__()
        auto_in, auto_out = (None, None) if in_factors and out_factors else factorize_pair(
            in_features, out_features, len(in_factors or out_factors or ()) or num_cores)
        in_factors, out_factors = tuple(in_factors or auto_in), tuple(out_factors or auto_out)
        if math.prod(in_factors) != in_features:
            raise TTMError(f"in_factors: {in_factors} multiply to {math.prod(in_factors)}, not {in_features}")
        if math.prod(out_factors) != out_features:
            raise TTMError(f"out_factors: {out_factors} multiply to {math.prod(out_factors)}, not {out_features}")
        if len(in_factors) != len(out_factors):
            raise TTMError(f"out_factors: {len(out_factors)} factors but {len(in_factors)} input factors")
        if ranks is None:
            if rank is None:
                raise TTMError("rank: give rank or ranks")
            ranks = tt_ranks(in_factors, out_factors, rank)
        ranks = tuple(int(r) for r in ranks)
        if len(ranks) != len(in_factors) + 1 or ranks[0] != 1 or ranks[-1] != 1 or min(ranks) < 1:
            raise TTMError(f"ranks: expected (1, r_1, ..., 1) of length {len(in_factors) + 1}, got {ranks}")
        self.in_features, self.out_features = in_features, out_features
        self.in_factors, self.out_factors, self.ranks = in_factors, out_factors, ranks
        self.origin = origin
        if contraction not in ("auto", "chain", "dense"):
            raise TTMError(f"contraction: expected auto, chain or dense, got {contraction!r}")
        self.contraction = contraction
        self._chain_macs = chain_macs_per_row(in_factors, out_factors, ranks)
        self._rebuild_macs = rebuild_macs(in_factors, out_factors, ranks)
        factory = dict(device=device, dtype=dtype)
        self.cores = nn.ParameterList(
            nn.Parameter(torch.empty(ranks[k], i, o, ranks[k + 1], **factory))
            for k, (i, o) in enumerate(zip(in_factors, out_factors))
        )
        self.bias = nn.Parameter(torch.zeros(out_features, **factory)) if bias else None
        self.reset_parameters(init_std if init_std is not None else 1.0 / math.sqrt(3 * in_features))

    def reset_parameters(self, std: float) -> None:
        """Cores iid N(0, s^2) with s^(2d) * prod(r_k) = std^2: dense-weight entries get variance std^2."""
        d = len(self.cores)
        core_std = (std**2 / math.prod(self.ranks)) ** (1.0 / (2 * d))
        with torch.no_grad():
            for core in self.cores:
                core.normal_(0.0, core_std)
            if self.bias is not None:
                self.bias.zero_()

    @property
    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def structure(self) -> dict:
        """Everything needed to rebuild an empty layer of this shape (JSON-able)."""
        return dict(
            in_features=self.in_features, out_features=self.out_features, in_factors=list(self.in_factors),
            out_factors=list(self.out_factors), ranks=list(self.ranks), bias=self.bias is not None, origin=self.origin,
        )

    @classmethod
    def from_structure(cls, structure: dict, device=None, dtype=None) -> "TTMLinear":
        s = dict(structure)
        return cls(s.pop("in_features"), s.pop("out_features"), ranks=s.pop("ranks"), in_factors=s.pop("in_factors"),
                   out_factors=s.pop("out_factors"), bias=s.pop("bias"), origin=s.pop("origin"), device=device, dtype=dtype)

    @classmethod
    def shaped_like(
        cls,
        linear: nn.Module,
        rank: int | None = None,
        budget: float | None = None,
        num_cores: int = 3,
        in_factors: Sequence[int] | None = None,
        out_factors: Sequence[int] | None = None,
    ) -> "TTMLinear":
        """A layer of the shape `from_linear` gives `linear`, with random cores, on its device and dtype."""
        if (rank is None) == (budget is None):
            raise TTMError("rank: give exactly one of rank or budget")
        in_features, out_features = _linear_shape(linear)
        auto_in, auto_out = (None, None) if in_factors and out_factors else factorize_pair(
            in_features, out_features, len(in_factors or out_factors or ()) or num_cores)
        in_factors, out_factors = tuple(in_factors or auto_in), tuple(out_factors or auto_out)
        if budget is not None:
            rank = rank_for_budget(in_factors, out_factors, budget)
        weight = linear.weight
        return cls(in_features, out_features, ranks=tt_ranks(in_factors, out_factors, rank), in_factors=in_factors,
                   out_factors=out_factors, bias=linear.bias is not None, origin="conv1d" if _is_conv1d(linear) else "linear",
                   device=weight.device, dtype=weight.dtype)

    @classmethod
    def from_linear(cls, linear: nn.Module, **shape) -> tuple["TTMLinear", float]:
        """TT-SVD of a pretrained nn.Linear / Conv1D at a max rank or a budget (keyword arguments
        of `shaped_like`); returns (layer, rel. error)."""
        layer = cls.shaped_like(linear, **shape)
        weight = linear.weight.detach()
        dense = weight.T if _is_conv1d(linear) else weight  # (out, in)
        cores = tt_svd(dense, layer.in_factors, layer.out_factors, layer.ranks)
        with torch.no_grad():
            for param, core in zip(layer.cores, cores):
                param.copy_(core)
            if linear.bias is not None:
                layer.bias.copy_(linear.bias)
        approx = dense_from_cores(cores)
        dense64 = dense.to(torch.float64)
        rel_error = ((approx - dense64).norm() / dense64.norm().clamp_min(1e-300)).item()
        return layer, rel_error

    def dense_weight(self) -> torch.Tensor:
        """The (out, in) weight the cores stand for."""
        return dense_from_cores(list(self.cores))

    def to_dense(self) -> nn.Module:
        """A plain nn.Linear (or Conv1D, if that is what this replaced) with the same function."""
        weight = self.dense_weight().detach()
        p = self.cores[0]
        if self.origin == "conv1d":
            from transformers.pytorch_utils import Conv1D

            dense = Conv1D(self.out_features, self.in_features).to(device=p.device, dtype=p.dtype)
            weight = weight.T
        else:
            dense = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None, device=p.device, dtype=p.dtype)
        with torch.no_grad():
            dense.weight.copy_(weight)
            if self.bias is not None:
                dense.bias.copy_(self.bias)
            elif self.origin == "conv1d":
                dense.bias.zero_()
        return dense

    def uses_chain(self, rows: int) -> bool:
        """Whether a call on `rows` input rows takes the chain (see the module docstring)."""
        if self.contraction != "auto":
            return self.contraction == "chain"
        return rows * self._chain_macs <= self._rebuild_macs + rows * self.in_features * self.out_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.uses_chain(x.numel() // self.in_features):
            y = ttm_contract(x, list(self.cores))  # (..., out), never forms W
            return y + self.bias if self.bias is not None else y
        return F.linear(x, self.dense_weight(), self.bias)  # W rebuilt once per call: (out, in)

    def extra_repr(self) -> str:
        return (f"in={self.in_features} ({'x'.join(map(str, self.in_factors))}), out={self.out_features} "
                f"({'x'.join(map(str, self.out_factors))}), ranks={self.ranks}, bias={self.bias is not None}, "
                f"contraction={self.contraction}")


# ----------------------------------------------------------------------------- replacement


MODULE_PATTERNS = {
    "mlp": r"(^|\.)(mlp|feed_forward)\.",
    "attention": r"(^|\.)(self_attn|attn|attention)\.",
}
MODULE_PATTERNS["both"] = f"({MODULE_PATTERNS['mlp']})|({MODULE_PATTERNS['attention']})"


def module_pattern(modules: str) -> re.Pattern:
    """`mlp`, `attention`, `both`, or any other string as a regex searched in module names."""
    try:
        return re.compile(MODULE_PATTERNS.get(modules, modules))
    except re.error as exc:
        raise TTMError(f"modules: {modules!r} is not a valid regex ({exc})") from None


def matching_linears(model: nn.Module, modules: str) -> list[tuple[str, nn.Module]]:
    """(name, module) of every nn.Linear / Conv1D whose name matches `modules`."""
    pattern = module_pattern(modules)
    return [(name, m) for name, m in model.named_modules()
            if (isinstance(m, nn.Linear) or _is_conv1d(m)) and pattern.search(name)]


@dataclass
class LayerReport:
    name: str
    in_factors: list[int]
    out_factors: list[int]
    ranks: list[int]
    dense_params: int
    ttm_params: int
    rel_error: float


def replace_module(model: nn.Module, name: str, module: nn.Module) -> nn.Module:
    """Put `module` at dotted `name` in `model`; returns the module that was there."""
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    old = getattr(parent, child)
    setattr(parent, child, module)
    return old


def replace_with_ttm(
    model: nn.Module,
    modules: str = "mlp",
    rank: int | None = None,
    budget: float | None = None,
    num_cores: int = 3,
) -> tuple[dict[str, nn.Module], list[LayerReport]]:
    """Swap matching linears for TT-SVD'd TTMLinear layers, in place.

    Returns the original modules by name (to fold back exactly, or to act as a recovery teacher)
    and one report per layer with its relative Frobenius error ||W - W_tt|| / ||W||.
    """
    targets = matching_linears(model, modules)
    if not targets:
        raise TTMError(f"modules: {modules!r} matches no linear layer")
    originals, reports = {}, []
    for name, linear in targets:
        layer, err = TTMLinear.from_linear(linear, rank=rank, budget=budget, num_cores=num_cores)
        originals[name] = replace_module(model, name, layer)
        in_f, out_f = _linear_shape(linear)
        reports.append(LayerReport(name, list(layer.in_factors), list(layer.out_factors), list(layer.ranks),
                                   in_f * out_f, sum(c.numel() for c in layer.cores), err))
        log.info("ttm %s: ranks %s, %d -> %d weights, rel. error %.4f", name, layer.ranks, in_f * out_f,
                 reports[-1].ttm_params, err)
    return originals, reports


def fold_ttm(model: nn.Module) -> nn.Module:
    """Replace every TTMLinear by the dense layer it stands for; the model then saves and loads
    with plain transformers (its config never changed)."""
    for name, m in list(model.named_modules()):
        if isinstance(m, TTMLinear):
            replace_module(model, name, m.to_dense())
    return model


@contextmanager
def swapped_in(model: nn.Module, modules: dict[str, nn.Module]):
    """Temporarily put `modules` (name -> module) into the model, restoring what was there."""
    previous = {name: replace_module(model, name, m) for name, m in modules.items()}
    try:
        yield model
    finally:
        for name, m in previous.items():
            replace_module(model, name, m)


# ----------------------------------------------------------------------------- recovery


def _logits(model: nn.Module, input_ids: torch.Tensor) -> torch.Tensor:
    return model(input_ids=input_ids, use_cache=False).logits  # (B, T, V)


def recover(
    model: nn.Module,
    calibration,
    steps: int,
    lr: float = 1e-4,
    batch_size: int = 4,
    loss: Literal["kl", "lm"] = "kl",
    teachers: dict[str, nn.Module] | None = None,
    seed: int = 0,
    log_every: int = 0,
) -> list[float]:
    """Train only the TTM layers' parameters for `steps` AdamW steps; returns the loss per step.

    Batches are drawn from the calibration windows in a seeded random order (cycling through
    all windows before repeating). With loss "kl" the teacher is the same model with `teachers`
    (the original linears) swapped in, run without gradients.
    """
    if loss == "kl" and not teachers:
        raise TTMError("loss: 'kl' recovery needs the original layers as teachers")
    params = [p for m in model.modules() if isinstance(m, TTMLinear) for p in m.parameters()]
    if not params:
        raise TTMError("modules: the model has no TTM layers to recover")
    frozen = {p: p.requires_grad for p in model.parameters()}
    for p in model.parameters():
        p.requires_grad_(False)
    for p in params:
        p.requires_grad_(True)
    optimiser = torch.optim.AdamW(params, lr=lr, betas=(0.9, 0.95), weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimiser, lambda s: 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * s / steps)))
    gen = torch.Generator().manual_seed(seed)
    windows = calibration.input_ids  # (N, T)
    device = params[0].device
    was_training = model.training
    model.train()
    losses, order = [], torch.empty(0, dtype=torch.long)
    try:
        for step in range(steps):
            if order.numel() < batch_size:
                order = torch.cat([order, torch.randperm(windows.shape[0], generator=gen)])
            batch, order = windows[order[:batch_size]].to(device), order[batch_size:]  # (b, T)
            if loss == "kl":
                with torch.no_grad(), swapped_in(model, teachers):
                    target = F.log_softmax(_logits(model, batch).float(), dim=-1)  # (b, T, V)
                student = F.log_softmax(_logits(model, batch).float(), dim=-1)
                value = F.kl_div(student.flatten(0, 1), target.flatten(0, 1), log_target=True, reduction="batchmean")
            else:
                logits = _logits(model, batch).float()
                value = F.cross_entropy(logits[:, :-1].flatten(0, 1), batch[:, 1:].flatten())
            optimiser.zero_grad(set_to_none=True)
            value.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            optimiser.step()
            schedule.step()
            losses.append(value.item())
            if log_every and (step % log_every == 0 or step == steps - 1):
                log.info("ttm recovery step %d/%d: %s loss %.4f", step + 1, steps, loss, losses[-1])
    finally:
        for p, flag in frozen.items():
            p.requires_grad_(flag)
        model.train(was_training)
    return losses


# ----------------------------------------------------------------------------- plan op


class TTMStep(BaseModel):
    """Plan step: replace linears matching `modules` by TTM layers at `rank` or `budget`,
    then optionally recover for `recover_steps` steps on the calibration windows."""

    model_config = ConfigDict(extra="forbid")

    op: Literal["ttm"]
    rank: int | None = Field(None, ge=1)
    budget: float | None = Field(None, gt=0, le=1)
    modules: str = "mlp"
    cores: int = Field(3, ge=2, le=8)
    recover_steps: int = Field(0, ge=0)
    lr: float = Field(1e-4, gt=0)  # 2e-3 diverged on SmolLM2 (KL 3.4 -> 7.2); 1e-4 took it 3.4 -> 1.2
    batch_size: int = Field(4, ge=1)
    loss: Literal["kl", "lm"] = "kl"
    seed: int = 0

    @model_validator(mode="after")
    def _rank_or_budget(self):
        if (self.rank is None) == (self.budget is None):
            raise ValueError("rank: give exactly one of rank or budget")
        return self

    @field_validator("modules")
    @classmethod
    def _valid_pattern(cls, value: str) -> str:
        try:
            module_pattern(value)
        except TTMError as exc:
            raise ValueError(str(exc).removeprefix("modules: ")) from None
        return value

    def check(self, config) -> None:
        """Reject patterns that match nothing, dims that do not factorise, budgets below rank 1."""
        from transformers import AutoModelForCausalLM

        with torch.device("meta"):
            skeleton = AutoModelForCausalLM.from_config(config)
        targets = matching_linears(skeleton, self.modules)
        if not targets:
            raise PlanError(f"modules: {self.modules!r} matches no linear layer of this model")
        for name, linear in targets:
            try:
                in_f, out_f = factorize_pair(*_linear_shape(linear), self.cores)
                if self.budget is not None:
                    rank_for_budget(in_f, out_f, self.budget)
            except TTMError as exc:
                raise PlanError(f"{exc} (layer {name})") from None


def ttm_shape(skeleton: nn.Module, step: TTMStep) -> nn.Module:
    """Shapes after the swap: each matching linear becomes a TTM layer of the step's ranks."""
    try:
        for name, linear in matching_linears(skeleton, step.modules):
            replace_module(skeleton, name, TTMLinear.shaped_like(linear, step.rank, step.budget, step.cores))
    except TTMError as exc:
        raise PlanError(str(exc)) from None
    return skeleton


@register_op("ttm", TTMStep, reshape=ttm_shape)
def apply_ttm(model: nn.Module, step: TTMStep, calibration) -> nn.Module:
    try:
        originals, reports = replace_with_ttm(model, step.modules, step.rank, step.budget, step.cores)
    except TTMError as exc:
        raise PlanError(str(exc)) from None
    dense = sum(r.dense_params for r in reports)
    ttm = sum(r.ttm_params for r in reports)
    worst = max(reports, key=lambda r: r.rel_error)
    log.info("ttm: %d layers, %d -> %d weights (%.1f%%), worst rel. error %.4f (%s)", len(reports), dense, ttm,
             100 * ttm / dense, worst.rel_error, worst.name)
    model.ttm_reports = [asdict(r) for r in reports]
    if step.recover_steps:
        recover(model, calibration, step.recover_steps, lr=step.lr, batch_size=step.batch_size, loss=step.loss,
                teachers=originals, seed=step.seed)
    return model


# ----------------------------------------------------------------------------- save / load
# TTM layers save through compression.loader: `save_compressed(model, tokenizer, dir)` writes the
# cores in model.safetensors plus an evofuse_structure.json entry of kind "ttm" per layer, and
# `load_compressed(dir)` rebuilds the layers (this module must be imported first, which
# `compression.plan.registered_ops()` does). For a plain-transformers directory instead:
# `fold_ttm(model)` then `save_pretrained`.


def _register_loader_kind() -> None:
    from compression.loader import register_kind

    register_kind("ttm", TTMLinear, describe=lambda m: m.structure(), build=TTMLinear.from_structure)


_register_loader_kind()


def save_ttm_model(model: nn.Module, tokenizer, directory: str | Path) -> Path:
    """`compression.loader.save_compressed`, named here for discoverability."""
    from compression.loader import save_compressed

    return save_compressed(model, tokenizer, directory)


def load_ttm_model(directory: str | Path, dtype: torch.dtype | None = None) -> nn.Module:
    """`compression.loader.load_compressed`, with the "ttm" kind registered (importing this module)."""
    from compression.loader import load_compressed

    return load_compressed(directory, dtype=dtype)
