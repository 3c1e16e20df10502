"""Closed-form reconstruction: streaming Gram, LIAR fold / LS refit, greedy removal."""
from __future__ import annotations

import itertools

import pytest
import torch

from compression.reconstruct import (
    GramAccumulator,
    damped,
    greedy_removal,
    refit_output_projection,
    with_bias_column,
)


def _gram(a: torch.Tensor) -> torch.Tensor:
    return a.T @ a / a.shape[0]  # (n, n)


def _refit_error(a: torch.Tensor, W: torch.Tensor, kept: list[int], ridge: float) -> float:
    """Direct E‖W a − B a_K‖² with B the refit computed by an explicit solve."""
    B = refit_output_projection(_gram(a), W, torch.tensor(kept), ridge)
    return ((a @ W.T - a[:, kept] @ B.T).pow(2).sum(1).mean()).item()


def test_gram_accumulator_streams_batches_exactly():
    torch.manual_seed(0)
    batches = [torch.randn(3, 5, 7) for _ in range(4)]  # (B, T, n)
    acc = GramAccumulator(7)
    for b in batches:
        acc.add(b)
    rows = torch.cat([b.reshape(-1, 7) for b in batches]).double()
    assert acc.count == 60
    torch.testing.assert_close(acc.gram(), _gram(rows), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(acc.mean(), rows.mean(0), rtol=1e-6, atol=1e-6)


def test_refit_is_exact_when_pruned_are_linear_in_kept():
    torch.manual_seed(0)
    kept_act = torch.randn(500, 6, dtype=torch.float64)
    Q = torch.randn(3, 6, dtype=torch.float64)
    a = torch.cat([kept_act, kept_act @ Q.T], dim=1)[:, torch.randperm(9)]  # pruned columns scattered
    W = torch.randn(4, 9, dtype=torch.float64)
    # find which columns are the independent ones again: a rank-6 set; try all 6-subsets
    for kept in itertools.combinations(range(9), 6):
        if torch.linalg.matrix_rank(a[:, list(kept)]) == 6:
            break
    B = refit_output_projection(_gram(a), W, torch.tensor(kept), ridge=0.0)
    torch.testing.assert_close(a[:, list(kept)] @ B.T, a @ W.T, rtol=1e-8, atol=1e-8)
    # without the fold the output is off: the test can fail
    assert (a[:, list(kept)] @ W[:, list(kept)].T - a @ W.T).abs().max() > 1e-2


def test_refit_with_nothing_pruned_is_the_original_weight():
    torch.manual_seed(0)
    a = torch.randn(50, 5, dtype=torch.float64)
    W = torch.randn(3, 5, dtype=torch.float64)
    torch.testing.assert_close(refit_output_projection(_gram(a), W, torch.arange(5), 1e-2), W)


def test_bias_column_fits_an_intercept():
    torch.manual_seed(0)
    kept_act = torch.randn(400, 4, dtype=torch.float64)
    pruned_act = kept_act @ torch.randn(4, 2, dtype=torch.float64) + torch.tensor([0.7, -1.3], dtype=torch.float64)
    a = torch.cat([kept_act, pruned_act], 1)  # (N, 6): columns 4, 5 are affine in 0..3
    W, b = torch.randn(3, 6, dtype=torch.float64), torch.randn(3, dtype=torch.float64)
    gram, Wb = with_bias_column(_gram(a), a.mean(0), W, b)
    refit = refit_output_projection(gram, Wb, torch.tensor([0, 1, 2, 3, 6]), ridge=0.0)  # (3, 5)
    out = kept_act @ refit[:, :4].T + refit[:, 4]
    torch.testing.assert_close(out, a @ W.T + b, rtol=1e-8, atol=1e-8)


def _brute_force_greedy(a, W, n_remove, ridge):
    removed: list[int] = []
    n = a.shape[1]
    for _ in range(n_remove):
        options = [u for u in range(n) if u not in removed]
        errs = [_refit_error(a, W, [k for k in range(n) if k not in removed + [u]], ridge) for u in options]
        removed.append(options[min(range(len(options)), key=errs.__getitem__)])
    return removed


def test_greedy_removal_matches_brute_force_sequential_refits():
    torch.manual_seed(1)
    mix = torch.randn(8, 8, dtype=torch.float64) + 2 * torch.eye(8, dtype=torch.float64)
    a = torch.randn(300, 8, dtype=torch.float64) @ mix * torch.linspace(0.2, 2, 8, dtype=torch.float64)
    W = torch.randn(5, 8, dtype=torch.float64)
    ridge = 0.0
    got = greedy_removal(_gram(a), W, torch.arange(8).unsqueeze(1), 4, ridge=1e-12)
    assert got == _brute_force_greedy(a, W, 4, ridge)


def test_greedy_removal_picks_duplicated_columns():
    torch.manual_seed(2)
    base = torch.randn(400, 6, dtype=torch.float64)
    a = torch.cat([base, base[:, :3] * 2.0], 1)  # columns 6..8 duplicate (scaled) columns 0..2
    W = torch.randn(4, 9, dtype=torch.float64)
    removed = greedy_removal(_gram(a), W, torch.arange(9).unsqueeze(1), 3, ridge=1e-10)
    pairs = [{0, 6}, {1, 7}, {2, 8}]
    assert all(len(pair & set(removed)) == 1 for pair in pairs)
    kept = [k for k in range(9) if k not in removed]
    assert _refit_error(a, W, kept, 1e-10) < 1e-6


def test_greedy_block_removal_respects_candidates_quota_and_prior_removal():
    torch.manual_seed(3)
    a = torch.randn(300, 12, dtype=torch.float64)
    W = torch.randn(4, 12, dtype=torch.float64)
    blocks = torch.arange(12).view(6, 2)  # 6 units of 2 columns, groups of 2 units
    groups = torch.arange(6) // 2
    got = greedy_removal(_gram(a), W, blocks, 2, ridge=1e-2, groups=groups, quota=1,
                         candidates=[0, 1, 2, 3], already_removed=blocks[4:].reshape(-1))
    assert sorted(groups[got].tolist()) == [0, 1]  # one unit from each of groups 0 and 1
    # block costs equal brute force on the damped problem: first pick is the cheapest single block
    H = damped(_gram(a), 1e-2)
    def err(kept_cols):
        kept_cols = torch.tensor(kept_cols)
        B = W @ H[:, kept_cols] @ torch.linalg.inv(H[kept_cols][:, kept_cols])
        D = torch.zeros_like(W)
        D[:, kept_cols] = B
        R = W - D
        return torch.trace(R @ H @ R.T).item()
    base = list(range(8))
    costs = {u: err([c for c in base if c not in blocks[u].tolist()]) for u in range(4)}
    assert got[0] == min(costs, key=costs.get)


def test_greedy_raises_when_it_runs_out_of_units():
    a = torch.randn(50, 4, dtype=torch.float64)
    with pytest.raises(ValueError, match="ran out"):
        greedy_removal(_gram(a), torch.randn(2, 4, dtype=torch.float64), torch.arange(4).unsqueeze(1), 3,
                       ridge=1e-2, candidates=[0, 1])
