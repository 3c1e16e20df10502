"""Per-unit scores from streaming statistics agree with direct computations on stored activations."""
from __future__ import annotations

import pytest
import torch

from compression.criteria import CRITERIA, UnitStats, score_units
from compression.reconstruct import collect_input_grams


def _activations(model, linear, input_ids) -> torch.Tensor:
    """All inputs of `linear` over `input_ids`, as (tokens, n) float64 (stored, for checking)."""
    seen = []
    handle = linear.register_forward_pre_hook(lambda _m, args: seen.append(args[0].detach().reshape(-1, args[0].shape[-1])))
    with torch.no_grad():
        model(input_ids=input_ids, use_cache=False)
    handle.remove()
    return torch.cat(seen).double()


@pytest.fixture()
def ffn_case(tiny_model, calibration):
    down = tiny_model.model.layers[1].mlp.down_proj
    ids = calibration.input_ids[:4]
    grams = collect_input_grams(tiny_model, calibration.take(4).batches(2), {"down": down})
    a = _activations(tiny_model, down, ids)  # (N, I)
    W = down.weight.double()  # (d, I)
    mlp = tiny_model.model.layers[1].mlp
    in_norm_sq = mlp.gate_proj.weight.double().pow(2).sum(1) + mlp.up_proj.weight.double().pow(2).sum(1)
    stats = UnitStats(grams["down"].gram(), W, torch.arange(W.shape[1]).unsqueeze(1), in_norm_sq)
    return stats, a, W, in_norm_sq


def test_ffn_scores_match_direct_computation(ffn_case):
    stats, a, W, in_norm_sq = ffn_case
    contrib_energy = torch.stack([(a[:, j:j + 1] * W[:, j]).pow(2).sum(1).mean() for j in range(a.shape[1])])
    torch.testing.assert_close(score_units("second_moment", stats), contrib_energy, rtol=1e-5, atol=1e-10)
    # the textbook depth-2 form E[a_j²]·‖W[:, j]‖²
    torch.testing.assert_close(score_units("second_moment", stats), a.pow(2).mean(0) * W.pow(2).sum(0), rtol=1e-5, atol=1e-10)
    wanda = W.abs().sum(0) * a.pow(2).mean(0).sqrt()
    torch.testing.assert_close(score_units("wanda", stats), wanda, rtol=1e-5, atol=1e-10)
    torch.testing.assert_close(score_units("magnitude", stats), (in_norm_sq * W.pow(2).sum(0)).sqrt())


def test_similarity_matches_explicit_contributions(ffn_case):
    stats, a, W, _ = ffn_case
    units = list(range(12))  # a subset keeps the explicit (units, N, d) tensor small
    sub = UnitStats(stats.gram, W, torch.tensor(units).unsqueeze(1), torch.ones(len(units)))
    c = torch.stack([a[:, j:j + 1] * W[:, j] for j in units]).flatten(1)  # (U, N*d) contributions
    expected = []
    for u in range(len(units)):
        left = [c[u].pow(2).sum() - (c[u] @ c[v]) ** 2 / c[v].pow(2).sum() for v in range(len(units)) if v != u]
        expected.append(min(left) / a.shape[0])
    torch.testing.assert_close(score_units("similarity", sub), torch.stack(expected), rtol=1e-5, atol=1e-10)


def test_head_scores_use_whole_head_blocks(tiny_model, calibration):
    attn = tiny_model.model.layers[2].self_attn
    hd, H = attn.head_dim, attn.q_proj.out_features // attn.head_dim
    grams = collect_input_grams(tiny_model, calibration.take(4).batches(4), {"o": attn.o_proj})
    z = _activations(tiny_model, attn.o_proj, calibration.input_ids[:4])  # (N, H*hd)
    W = attn.o_proj.weight.double()
    blocks = torch.arange(H * hd).view(H, hd)
    stats = UnitStats(grams["o"].gram(), W, blocks, torch.ones(H))
    c = torch.stack([z[:, b] @ W[:, b].T for b in blocks])  # (H, N, d) per-head output contributions
    torch.testing.assert_close(score_units("second_moment", stats), c.pow(2).sum(2).mean(1), rtol=1e-5, atol=1e-10)
    flat = c.flatten(1)
    sim = [min(flat[h].pow(2).sum() - (flat[h] @ flat[v]) ** 2 / flat[v].pow(2).sum() for v in range(H) if v != h)
           for h in range(H)]
    torch.testing.assert_close(score_units("similarity", stats), torch.stack(sim) / z.shape[0], rtol=1e-5, atol=1e-10)


def test_unknown_criterion_lists_the_valid_ones():
    stats = UnitStats(None, torch.ones(2, 2, dtype=torch.float64), torch.arange(2).unsqueeze(1), torch.ones(2))
    with pytest.raises(ValueError, match="valid: magnitude, second_moment, similarity, wanda"):
        score_units("snip", stats)
    with pytest.raises(ValueError, match="needs calibration"):
        score_units("wanda", stats)
    assert set(CRITERIA) == {"magnitude", "wanda", "second_moment", "similarity"}


@pytest.mark.parametrize("case", ["ffn", "heads"])
def test_unit_blocks_alone_give_the_whole_gram_scores_to_the_bit(tiny_model, calibration, ffn_case, case):
    """`wanda` and `second_moment` read only each unit's diagonal block of G, so scores from
    the blocks alone (what a shared recipe's screening cache keeps) are the same floats;
    `similarity` reads all of G and says the blocks are not enough."""
    from compression.criteria import UNIT_BLOCKS_SUFFICE, unit_diagonal_blocks

    if case == "ffn":
        stats = ffn_case[0]
    else:
        attn = tiny_model.model.layers[2].self_attn
        grams = collect_input_grams(tiny_model, calibration.take(4).batches(4), {"o": attn.o_proj})
        blocks = torch.arange(attn.q_proj.out_features).view(-1, attn.head_dim)
        stats = UnitStats(grams["o"].gram(), attn.o_proj.weight.double(), blocks, torch.ones(blocks.shape[0]))
    blocks_only = UnitStats(None, stats.out_weight, stats.blocks, stats.in_norm_sq,
                            unit_gram=unit_diagonal_blocks(stats.gram, stats.blocks).clone())
    assert UNIT_BLOCKS_SUFFICE == {"wanda", "second_moment"}
    for name in UNIT_BLOCKS_SUFFICE:
        assert torch.equal(score_units(name, blocks_only), score_units(name, stats)), name
    with pytest.raises(ValueError, match="only its units' diagonal blocks were kept"):
        score_units("similarity", blocks_only)
