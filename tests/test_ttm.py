"""Tensor-Train Matrix layers: TT-SVD, the custom backward, replacement, fold-back, plan op, save/load."""
from __future__ import annotations

import json

import pytest
import torch
import torch.nn as nn

from compression.plan import PlanError, apply_plan, check_plan, parse_plan
from compression.ttm import (
    TTMError,
    TTMLinear,
    factorize,
    factorize_pair,
    fold_ttm,
    load_ttm_model,
    rank_for_budget,
    recover,
    replace_with_ttm,
    save_ttm_model,
    tt_ranks,
    ttm_contract,
    ttm_param_count,
)


def _linear(n_in, n_out, dtype=torch.float64, seed=0):
    torch.manual_seed(seed)
    return nn.Linear(n_in, n_out).to(dtype)


def _logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits


def test_factorisation_is_balanced_and_rejects_too_few_factors():
    assert factorize(576, 3) == (8, 8, 9)
    assert factorize(1536, 3) == (8, 12, 16)
    assert factorize_pair(576, 1536, 3) == ((9, 8, 8), (8, 12, 16))
    with pytest.raises(TTMError, match="cores"):
        factorize(2 * 7, 3)  # 14 has only two prime factors


@pytest.mark.parametrize("cores", [2, 3, 4])
def test_full_rank_tt_svd_reconstructs_the_weight(cores):
    linear = _linear(48, 36)
    layer, err = TTMLinear.from_linear(linear, rank=10_000, num_cores=cores)
    assert err < 1e-12
    torch.testing.assert_close(layer.dense_weight(), linear.weight, rtol=0, atol=1e-12)
    x = torch.randn(5, 48, dtype=torch.float64)
    for mode in ("chain", "dense"):
        layer.contraction = mode
        torch.testing.assert_close(layer(x), linear(x), rtol=0, atol=1e-12)


def test_truncated_tt_svd_reports_its_relative_error_and_rank():
    linear = _linear(48, 36)
    layer, err = TTMLinear.from_linear(linear, rank=3)
    assert max(layer.ranks) == 3
    exact = ((layer.dense_weight() - linear.weight).norm() / linear.weight.norm()).item()
    assert 0.05 < err == pytest.approx(exact, rel=1e-9)
    # more rank, less error
    assert TTMLinear.from_linear(linear, rank=6)[1] < err


def test_budget_picks_the_largest_rank_that_fits():
    in_f, out_f = factorize_pair(64, 128, 3)
    rank = rank_for_budget(in_f, out_f, 0.25)
    assert ttm_param_count(in_f, out_f, tt_ranks(in_f, out_f, rank)) <= 0.25 * 64 * 128
    assert ttm_param_count(in_f, out_f, tt_ranks(in_f, out_f, rank + 1)) > 0.25 * 64 * 128
    layer, _ = TTMLinear.from_linear(_linear(64, 128), budget=0.25)
    assert max(layer.ranks) == rank
    with pytest.raises(TTMError, match="budget"):
        rank_for_budget(in_f, out_f, 1e-5)


def test_chain_and_rebuilt_weight_agree_on_leading_dims():
    torch.manual_seed(1)
    layer = TTMLinear(24, 30, rank=4, dtype=torch.float64)
    x = torch.randn(2, 3, 24, dtype=torch.float64)
    expected = x @ layer.dense_weight().T + layer.bias
    layer.contraction = "chain"
    torch.testing.assert_close(layer(x), expected)
    assert layer(x).shape == (2, 3, 30)


@pytest.mark.parametrize("n_in,n_out,cores,rank", [(12, 8, 2, 3), (24, 30, 3, 4), (16, 16, 4, 2)])
def test_gradcheck_of_the_custom_backward(n_in, n_out, cores, rank):
    torch.manual_seed(0)
    layer = TTMLinear(n_in, n_out, rank=rank, num_cores=cores, dtype=torch.float64)
    x = torch.randn(2, n_in, dtype=torch.float64, requires_grad=True)
    params = [c.detach().clone().requires_grad_() for c in layer.cores]
    assert torch.autograd.gradcheck(lambda x, *c: ttm_contract(x, c), (x, *params))
    # only some inputs needing grad takes the other branches of backward
    assert torch.autograd.gradcheck(lambda *c: ttm_contract(x.detach(), c), tuple(params))
    assert torch.autograd.gradcheck(lambda x: ttm_contract(x, [c.detach() for c in params]), (x,))


def test_backward_saves_only_the_input_and_the_cores():
    torch.manual_seed(0)
    layer = TTMLinear(64, 96, rank=8, contraction="chain")
    x = torch.randn(4, 5, 64, requires_grad=True)
    saved = []

    def pack(t):
        saved.append(t)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        y = layer(x)
    assert len(saved) == 1 + len(layer.cores)
    core_ptrs = {c.data_ptr() for c in layer.cores}
    inputs = [t for t in saved if t.data_ptr() not in core_ptrs]
    assert len(inputs) == 1 and inputs[0].data_ptr() == x.data_ptr() and inputs[0].numel() == x.numel()
    assert {t.data_ptr() for t in saved} - {x.data_ptr()} == core_ptrs
    y.sum().backward()
    assert x.grad is not None and all(c.grad is not None for c in layer.cores)


def test_auto_contraction_takes_the_chain_only_for_few_rows():
    layer = TTMLinear(576, 1536, rank=32)
    assert layer.uses_chain(1) and not layer.uses_chain(512)


def test_replacement_then_fold_back_gives_the_same_logits(tiny_model):
    ids = torch.randint(3, 259, (2, 16))
    base = _logits(tiny_model, ids)
    originals, reports = replace_with_ttm(tiny_model, "both", rank=10_000)
    assert {r.name.rsplit(".", 1)[-1] for r in reports} == {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}
    assert max(r.rel_error for r in reports) < 1e-5
    torch.testing.assert_close(_logits(tiny_model, ids), base, rtol=0, atol=1e-4)  # full rank: same model


def test_low_rank_replacement_folds_to_plain_linears_with_equal_logits(tiny_model, tmp_path):
    from transformers import AutoModelForCausalLM

    ids = torch.randint(3, 259, (2, 16))
    dense_params = sum(p.numel() for p in tiny_model.parameters())
    replace_with_ttm(tiny_model, "mlp", rank=4)
    assert sum(p.numel() for p in tiny_model.parameters()) < dense_params
    ttm_logits = _logits(tiny_model, ids)
    fold_ttm(tiny_model)
    assert not any(isinstance(m, TTMLinear) for m in tiny_model.modules())
    torch.testing.assert_close(_logits(tiny_model, ids), ttm_logits, rtol=0, atol=1e-5)
    tiny_model.save_pretrained(tmp_path)
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()  # plain transformers
    torch.testing.assert_close(_logits(reloaded, ids), ttm_logits, rtol=0, atol=1e-5)


def test_gpt2_conv1d_layers_replace_and_fold_back():
    from transformers import GPT2Config, GPT2LMHeadModel
    from transformers.pytorch_utils import Conv1D

    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(vocab_size=64, n_embd=32, n_layer=2, n_head=2, n_positions=32)).eval()
    ids = torch.randint(0, 64, (2, 8))
    base = _logits(model, ids)
    _, reports = replace_with_ttm(model, "both", rank=10_000)
    assert len(reports) == 8
    torch.testing.assert_close(_logits(model, ids), base, rtol=0, atol=1e-4)
    fold_ttm(model)
    assert isinstance(model.transformer.h[0].mlp.c_fc, Conv1D)
    torch.testing.assert_close(_logits(model, ids), base, rtol=0, atol=1e-4)


def test_save_load_round_trip_keeps_cores_and_logits(tokenizer, tmp_path):
    from search.models.tiny import tiny_llama

    tiny_model = tiny_llama(seed=0, tie_word_embeddings=True)  # tied, like SmolLM2
    ids = torch.randint(3, 259, (2, 16))
    replace_with_ttm(tiny_model, r"layers\.[02]\.(mlp|self_attn\.o_proj)", rank=3)
    expected = _logits(tiny_model, ids)
    save_ttm_model(tiny_model, tokenizer, tmp_path)
    structure = json.loads((tmp_path / "evofuse_structure.json").read_text())["modules"]
    assert {spec["kind"] for spec in structure.values()} == {"ttm"} and len(structure) == 8
    loaded = load_ttm_model(tmp_path)
    layer = loaded.model.layers[2].mlp.up_proj
    assert isinstance(layer, TTMLinear) and max(layer.ranks) == 3
    assert not isinstance(loaded.model.layers[1].mlp.up_proj, TTMLinear)
    torch.testing.assert_close(_logits(loaded, ids), expected, rtol=0, atol=0)


def test_plan_step_validates_and_checks_against_the_model(tiny_model):
    config = tiny_model.config
    check_plan(parse_plan([{"op": "ttm", "rank": 4}, {"op": "ttm", "budget": 0.5, "modules": "attention"}]), config)
    bad_steps = {
        "exactly one of rank or budget": {"op": "ttm", "rank": 4, "budget": 0.5},
        "plan[0].rank": {"op": "ttm", "rank": 0},
        "plan[0].budget": {"op": "ttm", "budget": 1.5},
        "plan[0].modules": {"op": "ttm", "rank": 4, "modules": "(unclosed"},
        "plan[0].colour": {"op": "ttm", "rank": 4, "colour": 1},
    }
    for message, step in bad_steps.items():
        with pytest.raises(PlanError, match=message.replace("[", r"\[").replace("]", r"\]")):
            parse_plan([step])
    bad_for_model = {
        "plan[0].modules": {"op": "ttm", "rank": 4, "modules": "no_such_layer"},
        "plan[0].cores": {"op": "ttm", "rank": 4, "cores": 7},  # 64 = 2**6 has six factors
        "plan[0].budget": {"op": "ttm", "budget": 0.0001},
    }
    for message, step in bad_for_model.items():
        with pytest.raises(PlanError, match=message.replace("[", r"\[").replace("]", r"\]")):
            check_plan(parse_plan([step]), config)


def test_plan_apply_with_recovery_brings_the_model_back_toward_the_teacher(tiny_model, calibration):
    dense = sum(p.numel() for p in tiny_model.parameters())
    model = apply_plan(tiny_model, parse_plan([{"op": "ttm", "rank": 2, "recover_steps": 2, "batch_size": 2}]), calibration)
    assert any(isinstance(m, TTMLinear) for m in model.modules())
    assert sum(p.numel() for p in model.parameters()) < dense
    assert len(model.ttm_reports) == 12 and all(r["rel_error"] > 0 for r in model.ttm_reports)


def test_kl_recovery_lowers_the_distillation_loss(tiny_model, calibration):
    originals, _ = replace_with_ttm(tiny_model, "mlp", rank=2)
    frozen = tiny_model.model.embed_tokens.weight.clone()
    losses = recover(tiny_model, calibration.take(4), steps=12, lr=2e-2, batch_size=4, teachers=originals)
    assert losses[-1] < 0.7 * losses[0]
    torch.testing.assert_close(tiny_model.model.embed_tokens.weight, frozen, rtol=0, atol=0)  # only TTM trains
    assert all(p.requires_grad for p in tiny_model.parameters())  # flags restored
