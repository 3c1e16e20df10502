"""Closed-form reconstruction after removing depth-2 units: no backpropagation.

Everything here works on the statistics of one output projection (down_proj or o_proj): its
input `a` (n,) per token, the streaming second moment `G = E_t[a aᵀ]` (n, n), and its weight
`W` (d, n). Units own column blocks of `W`; removing the set P keeps the columns K.

- `GramAccumulator` / `collect_input_grams`: one streaming pass over calibration batches; each
  batch adds its `aᵀa` to a float64 sum and is dropped, so no activations are stored.
  `collect_grams_by_block` gathers the same sums one decoder block at a time, so a caller that
  uses each block's statistics at once (`prune_width`) holds one block's Gram matrices, not all.
- `refit_output_projection` (LIAR): express the removed activations by the kept ones,
  `a_P ≈ Q a_K` with `Q = G_PK (G_KK + λI)⁻¹` (ridge least squares), and fold `Q` into the
  next projection: `W_K' = W_K + W_P Q`. This is also exactly the least-squares refit of the
  output projection, `argmin_B E‖W a − B a_K‖² + λ‖B − W_K‖²`, so LIAR and the refit step of
  the greedy method are the same formula.
- `greedy_removal` (greedy output approximation): remove units one round at a time, each time
  the unit(s) whose removal, after the optimal refit of the rest, raises E‖W a − B a_K‖² least.
  The increase for a block b is `tr(B_b (H⁻¹)_bb⁻¹ B_bᵀ)` with H = G + λI and B the current
  refit weight (the Optimal-Brain-Surgeon formula applied to whole columns), and removing b
  downdates B and H⁻¹ in closed form, so each round costs O(n²) rather than a new solve.

Choices the papers leave open:
- Ridge λ is relative: `ridge · mean(diag G)`, so one setting fits layers of any scale
  (default 1e-2 in `compression.width`; measured in benchmarks/results/width*.md).
- No intercept for Llama-family projections (they have no bias to fold it into). Where the
  output projection has a bias, `with_bias_column` appends a constant-1 input so the same
  formulas fit the intercept `b' = b + W_P p` as an extra, never-removed column.
- Uncentred second moments (Gram, not covariance): the fold then fits the mean as well.
"""
from __future__ import annotations

from typing import Callable, Iterable, Sequence

import torch
import torch.nn as nn

from compression import arch
from compression.errors import CompressionError


class GramAccumulator:
    """Streaming E[a aᵀ] and E[a] of row vectors, accumulated in float64."""

    def __init__(self, dim: int):
        self.dim = dim
        self.sum_outer = torch.zeros(dim, dim, dtype=torch.float64)
        self.sum = torch.zeros(dim, dtype=torch.float64)
        self.count = 0

    def add(self, x: torch.Tensor) -> None:
        rows = x.detach().reshape(-1, self.dim).float()  # (N, n) tokens of this batch
        self.sum_outer += (rows.T @ rows).double().cpu()  # (n, n) fp32 product, fp64 running sum
        self.sum += rows.sum(0).double().cpu()
        self.count += rows.shape[0]

    def gram(self) -> torch.Tensor:
        return self.sum_outer / max(self.count, 1)

    def mean(self) -> torch.Tensor:
        return self.sum / max(self.count, 1)


@torch.no_grad()
def collect_input_grams(
    model: nn.Module, batches: Iterable[torch.Tensor], modules: dict[str, nn.Linear]
) -> dict[str, GramAccumulator]:
    """Run `model` over `batches` (each (B, T) token ids) once, accumulating the Gram matrix of
    the input of every module in `modules` (name → nn.Linear). Returns name → accumulator."""
    stats = {name: GramAccumulator(linear.in_features) for name, linear in modules.items()}
    hooks = []
    for name, linear in modules.items():
        hook = lambda _mod, args, acc=stats[name]: acc.add(args[0])  # noqa: E731
        hooks.append(linear.register_forward_pre_hook(hook))
    try:
        device = next(model.parameters()).device
        for input_ids in batches:
            model(input_ids=input_ids.to(device), use_cache=False)
    finally:
        for handle in hooks:
            handle.remove()
    return stats


def owning_blocks(model: nn.Module, modules: dict[str, nn.Module]) -> dict[str, int]:
    """{name: index of the decoder block holding the module}, for the modules inside one."""
    owner: dict[str, int] = {}
    for i, block in enumerate(arch.decoder_blocks(model)):
        inside = {id(m) for m in block.modules()}
        owner.update({name: i for name, module in modules.items() if id(module) in inside})
    return owner


@torch.no_grad()
def collect_grams_by_block(
    model: nn.Module,
    batches: Iterable[torch.Tensor],
    modules: dict[str, nn.Linear],
    consume: Callable[[int, dict[str, GramAccumulator]], None] | None = None,
) -> dict[str, GramAccumulator]:
    """`collect_input_grams` for projections inside the decoder blocks, one block at a time.

    The hidden states entering the first block are kept for every batch ((B, T, H) each: 32
    windows of 128 tokens of a 4096-wide model are 64 MiB) and carried through the blocks in
    turn; a block's watched projections accumulate their inputs while it runs, and the blocks
    after the last watched one, and the output head, are not run. Each block sees the hidden
    states of a whole-model forward (bitwise on CPU: tests/test_width.py, and SmolLM2-135M), so
    every accumulator sums the same rows in the same order as `collect_input_grams`. With `consume(block index, its accumulators)` each block's
    are handed over as soon as they are complete (every block up to the last watched one, in
    order, empty where nothing is watched) and not kept: one block's Gram matrices are alive at
    a time (a Llama-2-7B shape: 1.1 GB of float64, against 35 GB for all 32 blocks). Without it
    every accumulator is returned."""
    blocks = arch.decoder_blocks(model)
    owner = owning_blocks(model, modules)
    outside = sorted(set(modules) - set(owner))
    if outside:
        raise CompressionError(f"{outside[0]}: not a module of a decoder block (use collect_input_grams)")
    device = next(model.parameters()).device
    hidden = [arch.block_input(model, input_ids.to(device)) for input_ids in batches] if modules else []
    calls = {t: arch.capture_block_calls(model, t) for t in {h.shape[1] for h in hidden}}  # per window length
    kept: dict[str, GramAccumulator] = {}
    for i in range(max(owner.values(), default=-1) + 1):
        stats = {name: GramAccumulator(modules[name].in_features) for name in modules if owner[name] == i}
        hooks = [modules[name].register_forward_pre_hook(lambda _mod, args, acc=acc: acc.add(args[0]))
                 for name, acc in stats.items()]
        try:
            for k, h in enumerate(hidden):
                hidden[k] = arch.run_block(blocks[i], calls[h.shape[1]][i], h)
        finally:
            for handle in hooks:
                handle.remove()
        if consume is not None:
            consume(i, stats)
        else:
            kept.update(stats)
    return kept


def with_bias_column(gram: torch.Tensor, mean: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor):
    """Append a constant-1 input: Gram [[G, μ], [μᵀ, 1]] (n+1, n+1) and weight [W | b] (d, n+1)."""
    n = gram.shape[0]
    aug = torch.ones(n + 1, n + 1, dtype=gram.dtype)
    aug[:n, :n] = gram
    aug[:n, n] = mean
    aug[n, :n] = mean
    return aug, torch.cat([weight, bias.to(weight.dtype).unsqueeze(1)], dim=1)


def damped(gram: torch.Tensor, ridge: float) -> torch.Tensor:
    """H = G + λ I with λ = ridge · mean(diag G) (a relative ridge)."""
    scale = gram.diagonal().mean().clamp_min(torch.finfo(gram.dtype).tiny)
    return gram + ridge * scale * torch.eye(gram.shape[0], dtype=gram.dtype)


def refit_output_projection(gram: torch.Tensor, weight: torch.Tensor, kept: torch.Tensor, ridge: float) -> torch.Tensor:
    """LIAR fold / LS refit: the (d, |K|) weight `W_K + W_P G_PK (G_KK + λI)⁻¹` on kept columns."""
    n = gram.shape[0]
    mask = torch.ones(n, dtype=torch.bool)
    mask[kept] = False
    pruned = mask.nonzero().squeeze(1)
    W_K = weight[:, kept]  # (d, k)
    if pruned.numel() == 0:
        return W_K.clone()
    H_KK = damped(gram, ridge)[kept][:, kept]  # (k, k); off-diagonal blocks of H equal G
    G_KP = gram[kept][:, pruned]  # (k, p)
    # Qᵀ = H_KK⁻¹ G_KP (k, p): the kept activations' coefficients for each removed one.
    chol = torch.linalg.cholesky(H_KK)
    Q_T = torch.cholesky_solve(G_KP, chol)  # (k, p)
    return W_K + weight[:, pruned] @ Q_T.T  # (d, k)


def _removal_costs(B: torch.Tensor, Hinv: torch.Tensor, blocks: torch.Tensor) -> torch.Tensor:
    """(U,) increase of the refit error when each block is removed: tr(B_b (H⁻¹_bb)⁻¹ B_bᵀ)."""
    if blocks.shape[1] == 1:  # single columns: ‖B_j‖² / H⁻¹_jj, no solves
        cols = blocks[:, 0]
        return B[:, cols].pow(2).sum(0) / Hinv[cols, cols]
    Hb = Hinv[blocks.unsqueeze(2), blocks.unsqueeze(1)]  # (U, s, s)
    Bb = B[:, blocks].permute(1, 2, 0)  # (U, s, d)
    X = torch.linalg.solve(Hb, Bb)  # (U, s, d) = (H⁻¹_bb)⁻¹ B_bᵀ
    return (Bb * X).sum(dim=(1, 2))


def _remove_columns(B: torch.Tensor, Hinv: torch.Tensor, cols: torch.Tensor) -> None:
    """Closed-form removal of columns `cols` in place: refit B on the rest and downdate H⁻¹."""
    T = torch.linalg.solve(Hinv[cols][:, cols], Hinv[cols])  # (m, n) = (H⁻¹_cc)⁻¹ H⁻¹_c,:
    B.sub_(B[:, cols] @ T)  # (d, n): optimal change of the remaining columns
    Hinv.sub_(Hinv[:, cols] @ T)  # (n, n): inverse of H restricted to the remaining columns
    B[:, cols] = 0
    Hinv[cols, :] = 0
    Hinv[:, cols] = 0


def greedy_removal(
    gram: torch.Tensor,
    weight: torch.Tensor,
    blocks: torch.Tensor,
    n_remove: int,
    *,
    ridge: float,
    candidates: Sequence[int] | None = None,
    groups: torch.Tensor | None = None,
    quota: int | None = None,
    already_removed: torch.Tensor | None = None,
    per_round: int = 1,
) -> list[int]:
    """Greedily pick `n_remove` units (rows of `blocks`, (U, s) column indices) to remove.

    Each round removes the `per_round` eligible units with the smallest refit-error increase
    (the costs are recomputed after every round). A unit is eligible when it is in
    `candidates` (default: all) and, if `groups` (U,) and `quota` are given, its group has had
    fewer than `quota` units removed. Columns in `already_removed` are taken out first (e.g.
    the columns of KV groups removed in an earlier stage). Returns unit indices in removal order.
    """
    B = weight.clone()  # (d, n) current refit weight
    Hinv = torch.cholesky_inverse(torch.linalg.cholesky(damped(gram, ridge)))  # (n, n)
    if already_removed is not None and already_removed.numel():
        _remove_columns(B, Hinv, already_removed)
    U = blocks.shape[0]
    eligible = torch.zeros(U, dtype=torch.bool)
    eligible[list(range(U)) if candidates is None else list(candidates)] = True
    removed_per_group: dict[int, int] = {}
    chosen: list[int] = []
    while len(chosen) < n_remove:
        pool = eligible.nonzero().squeeze(1)
        if pool.numel() == 0:
            raise ValueError("greedy removal ran out of eligible units")
        costs = _removal_costs(B, Hinv, blocks[pool])
        this_round: list[int] = []
        for unit in pool[costs.argsort()].tolist():
            if len(this_round) == min(per_round, n_remove - len(chosen)):
                break
            group = int(groups[unit]) if groups is not None else 0
            if quota is not None and removed_per_group.get(group, 0) >= quota:
                continue
            this_round.append(unit)
            removed_per_group[group] = removed_per_group.get(group, 0) + 1
        if not this_round:
            raise ValueError("greedy removal ran out of eligible units")
        _remove_columns(B, Hinv, blocks[this_round].reshape(-1))
        eligible[this_round] = False
        if quota is not None and groups is not None:
            for group, count in removed_per_group.items():
                if count >= quota:
                    eligible[groups == group] = False
        chosen.extend(this_round)
    return chosen
