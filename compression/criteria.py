"""Importance of depth-2 units (FFN neurons, attention heads), all behind one interface.

A depth-2 unit is a slice of an input projection (its rows: gate+up for an FFN neuron, the
query rows for a head) together with the matching columns of the output projection (down_proj /
o_proj). Removing it deletes that slice of the input projection and those columns of the output
one. Every criterion sees the same `UnitStats` and returns one score per unit; a LOW score means
the unit matters little and goes first.

Notation: `a` (n,) is the input of the output projection for one token (the FFN's
`act(gate x) * up x`, or the concatenated per-head attention outputs), `G = E_t[a aᵀ]` (n, n) its
second-moment (Gram) matrix over calibration tokens, `W` (d, n) the output projection, and unit
u owns the columns `b_u` (a block of s columns; s = 1 for a neuron, head_dim for a head). Its
contribution to the layer output is `c_u = W[:, b_u] a[b_u]`.

Choices the papers leave open (written down here, as used):
- `magnitude`: ‖input rows of u‖_F · ‖W[:, b_u]‖_F. The product, since a depth-2 unit's output
  scales with both of its weight slices.
- `wanda`: Wanda applied to the output projection column-wise (the structured variant):
  Σ_{i, j∈b_u} |W_ij| · ‖a_j‖₂, with ‖a_j‖₂ = sqrt(G_jj) (RMS over tokens; a common factor of
  sqrt(#tokens) does not change the ranking).
- `second_moment`: E_t‖c_u‖² = tr(W_b G_bb W_bᵀ); for a neuron this is E[a_j²]·‖W[:, j]‖², the
  depth-2 second-moment score of the greedy output-approximation paper.
- `similarity`: the energy of c_u that the best single other unit v cannot explain when v is
  rescaled to absorb u: min_v E‖c_u‖²·(1 − cos²(c_u, c_v)), with inner products
  ⟨c_u, c_v⟩ = Σ_t c_u·c_v = tr(W_bu G_{bu bv} W_bvᵀ) taken over tokens and output dims. The
  paper defines a similarity-based head score without public code; this is our output-
  approximation reading of it: a head nearly parallel to another one is redundant.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch


@dataclass
class UnitStats:
    """What a criterion may look at for one layer's units (all float64).

    gram: (n, n) E_t[a aᵀ] of the output projection's input, or None when not collected.
    out_weight: (d, n) the output projection's weight.
    blocks: (U, s) long, the columns of `out_weight` owned by each unit.
    in_norm_sq: (U,) squared Frobenius norm of each unit's input-projection rows.
    unit_gram: (U, s, s) G's diagonal blocks G_{b_u b_u}, when only they were kept (gram None).
    """

    gram: torch.Tensor | None
    out_weight: torch.Tensor
    blocks: torch.Tensor
    in_norm_sq: torch.Tensor
    unit_gram: torch.Tensor | None = None

    @property
    def num_units(self) -> int:
        return self.blocks.shape[0]


def _require_gram(stats: UnitStats, name: str) -> torch.Tensor:
    if stats.gram is None:
        kept = " (only its units' diagonal blocks were kept)" if stats.unit_gram is not None else ""
        raise ValueError(f"criterion {name!r} needs calibration statistics (a Gram matrix){kept}")
    return stats.gram


def unit_diagonal_blocks(gram: torch.Tensor, blocks: torch.Tensor) -> torch.Tensor:
    """(U, s, s) G_{b_u b_u}: each unit's block of the Gram matrix."""
    return gram[blocks.unsqueeze(2), blocks.unsqueeze(1)]


def _unit_gram(stats: UnitStats, name: str) -> torch.Tensor:
    if stats.unit_gram is not None:
        return stats.unit_gram
    return unit_diagonal_blocks(_require_gram(stats, name), stats.blocks)


def _gram_diagonal(stats: UnitStats, name: str) -> torch.Tensor:
    """(n,) G_jj in column order; from the unit blocks where only they were kept (columns no
    unit owns stay 0: no score reads them)."""
    if stats.unit_gram is None:
        return _require_gram(stats, name).diagonal()
    diagonal = stats.unit_gram.new_zeros(stats.out_weight.shape[1])
    diagonal[stats.blocks.reshape(-1)] = stats.unit_gram.diagonal(dim1=1, dim2=2).reshape(-1)
    return diagonal


def magnitude(stats: UnitStats) -> torch.Tensor:
    out_norm_sq = stats.out_weight.pow(2).sum(0)[stats.blocks].sum(1)  # (U,)
    return (stats.in_norm_sq * out_norm_sq).sqrt()


def wanda(stats: UnitStats) -> torch.Tensor:
    act_norm = _gram_diagonal(stats, "wanda").clamp_min(0).sqrt()  # (n,) RMS of each input feature
    per_column = stats.out_weight.abs().sum(0) * act_norm  # (n,) Σ_i |W_ij| ‖a_j‖
    return per_column[stats.blocks].sum(1)


def contribution_inner_products(stats: UnitStats) -> torch.Tensor:
    """(U, U) matrix of E_t⟨c_u, c_v⟩ = tr(W_bu G_bu,bv W_bvᵀ) = Σ_{i∈bu, j∈bv} (WᵀW ∘ G)_ij."""
    gram = _require_gram(stats, "second_moment/similarity")
    W, blocks = stats.out_weight, stats.blocks
    U, s = blocks.shape
    cols = blocks.reshape(-1)  # (U*s,) units' columns, unit-major
    Wc = W[:, cols]  # (d, U*s)
    elementwise = (Wc.T @ Wc) * gram[cols][:, cols]  # (U*s, U*s)
    return elementwise.view(U, s, U, s).sum(dim=(1, 3))  # (U, U) block sums


def second_moment(stats: UnitStats) -> torch.Tensor:
    W, blocks = stats.out_weight, stats.blocks
    # E‖c_u‖² = Σ_{i,j∈b_u} (WᵀW)_ij G_ij, one (s, s) block per unit: no U×U matrix needed.
    Wb = W[:, blocks].permute(1, 0, 2)  # (U, d, s)
    Gb = _unit_gram(stats, "second_moment")  # (U, s, s)
    return ((Wb.transpose(1, 2) @ Wb) * Gb).sum(dim=(1, 2))  # (U,)


def similarity(stats: UnitStats) -> torch.Tensor:
    C = contribution_inner_products(stats)  # (U, U)
    energy = C.diagonal()  # (U,) E‖c_u‖²
    if stats.num_units == 1:
        return energy.clone()
    # ‖c_u‖²(1 − cos²) = ‖c_u‖² − ⟨c_u, c_v⟩² / ‖c_v‖²: what is left after the best rescaled v.
    explained = C.pow(2) / energy.clamp_min(torch.finfo(C.dtype).tiny).unsqueeze(0)  # (U, U) [u, v]
    explained.fill_diagonal_(float("-inf"))
    return (energy - explained.max(dim=1).values).clamp_min(0)


CRITERIA: dict[str, Callable[[UnitStats], torch.Tensor]] = {
    "magnitude": magnitude,
    "wanda": wanda,
    "second_moment": second_moment,
    "similarity": similarity,
}
NEEDS_GRAM = frozenset({"wanda", "second_moment", "similarity"})
UNIT_BLOCKS_SUFFICE = frozenset({"wanda", "second_moment"})  # they read only G's unit blocks


def score_units(criterion: str, stats: UnitStats) -> torch.Tensor:
    """(U,) scores, low = least important. Unknown names raise with the valid list."""
    if criterion not in CRITERIA:
        raise ValueError(f"unknown criterion {criterion!r} (valid: {', '.join(sorted(CRITERIA))})")
    return CRITERIA[criterion](stats)
