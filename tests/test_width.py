"""prune_width: plan validation, real shrinking, exact reconstruction cases, GQA, save/reload."""
from __future__ import annotations

import json

import pytest
import torch
import torch.nn as nn
from transformers import AutoModelForCausalLM

from compression import loader
from compression.loader import STRUCTURE_FILE, load_compressed, register_kind, save_compressed
from compression.plan import PlanError, apply_plan, check_plan, parse_plan
from compression.width import LayerDims, attention_shape, plan_layer
from search.models.tiny import tiny_llama, tiny_llama_config


def _step(**fields):
    return parse_plan([{"op": "prune_width", **fields}])


def _logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits


def _params(model):
    return sum(p.numel() for p in model.parameters())


# ------------------------------------------------------------------ plan validation


@pytest.mark.parametrize(
    "fields, message",
    [
        ({"ratio": 0}, r"plan\[0\]\.ratio: must be in \(0, 1\), got 0"),
        ({"ratio": 1.0}, r"plan\[0\]\.ratio: must be in \(0, 1\)"),
        ({"ratio": -0.2}, r"plan\[0\]\.ratio: must be in \(0, 1\)"),
        ({"ratio": {3: 1.5}}, r"plan\[0\]\.ratio: must be in \(0, 1\), got 1.5"),
        ({"ratio": 0.2, "criterion": "snip"}, r"plan\[0\]\.criterion: unknown criterion 'snip' \(valid: magnitude"),
        ({"ratio": 0.2, "reconstruct": "obs"}, r"plan\[0\]\.reconstruct"),
        ({"ratio": 0.2, "target": "mlp"}, r"plan\[0\]\.target"),
        ({"ratio": 0.2, "colour": "red"}, r"plan\[0\]\.colour"),
        ({"ratio": {1: 0.2}, "layers": [1]}, r"plan\[0\]: give either layers or a per-layer ratio"),
    ],
)
def test_bad_steps_are_one_line_plan_errors(fields, message):
    with pytest.raises(PlanError, match=message) as info:
        _step(**fields)
    assert "\n" not in str(info.value)


@pytest.mark.parametrize(
    "fields, config, message",
    [
        ({"ratio": 0.2, "layers": [0, 4]}, {}, r"plan\[0\]\.layers: layer 4 out of range \(the model has 4 blocks\)"),
        ({"ratio": {7: 0.2}}, {}, r"plan\[0\]\.ratio: layer 7 out of range"),
        ({"ratio": 0.8, "target": "ffn"}, {"intermediate_size": 2}, r"plan\[0\]\.ratio: 0.8 leaves layer 0 with no FFN neuron"),
        ({"ratio": 0.95, "target": "heads"}, {}, r"plan\[0\]\.ratio: 0.95 leaves layer 0 with no attention head"),
        ({"ratio": 0.2}, {"model_type": "gpt2"}, r"plan\[0\]\.op: prune_width supports llama"),
    ],
)
def test_steps_that_do_not_fit_the_model_fail_check_plan(fields, config, message):
    cfg = tiny_llama_config(**{k: v for k, v in config.items() if k != "model_type"})
    if "model_type" in config:
        cfg.model_type = config["model_type"]
    with pytest.raises(PlanError, match=message):
        check_plan(_step(**fields), cfg)


def test_attention_shapes_for_smollm2_dims():
    dims = LayerDims(hidden=576, intermediate=1536, heads=9, kv_heads=3, head_dim=64)
    assert attention_shape(0.10, dims) == (3, 3)  # nothing: the nearest step is 25%
    assert attention_shape(0.25, dims) == (3, 2)  # one query head per group
    assert attention_shape(0.40, dims) == (2, 3)  # one KV group with its heads
    cut = plan_layer(0.25, "both", dims, 0)
    removed = 3 * 576 * cut.ffn_remove + 2 * 576 * 64 * 3  # FFN neurons + 3 query heads (q rows, o cols)
    assert abs(removed / (dims.ffn_params + dims.attn_params) - 0.25) < 1e-3


# ------------------------------------------------------------------ behaviour on tiny models


@pytest.mark.parametrize("reconstruct", ["none", "liar", "greedy"])
def test_removing_zero_units_is_the_identity(tiny_model, calibration, reconstruct):
    ids = calibration.input_ids[:2]
    before = _logits(tiny_model, ids)
    n = _params(tiny_model)
    model = apply_plan(tiny_model, _step(ratio=0.001, reconstruct=reconstruct, criterion="wanda"), calibration)
    assert _params(model) == n
    assert torch.equal(_logits(model, ids), before)


@pytest.mark.parametrize(
    "criterion, reconstruct",
    [("magnitude", "none"), ("wanda", "liar"), ("second_moment", "greedy"), ("similarity", "liar"), ("similarity", "greedy")],
)
def test_shapes_really_shrink(tiny_model, calibration, criterion, reconstruct):
    n = _params(tiny_model)
    model = apply_plan(tiny_model, _step(ratio=0.4, criterion=criterion, reconstruct=reconstruct),
                       calibration.take(2))
    for block in model.model.layers:
        assert block.mlp.gate_proj.weight.shape == (73, 64)  # 128 - 55 neurons
        assert block.mlp.down_proj.weight.shape == (64, 73)
        assert block.self_attn.q_proj.weight.shape == (32, 64)  # 2 of 4 heads, one per KV group
        assert block.self_attn.k_proj.weight.shape == (32, 64)  # both KV groups kept
    assert model.config.intermediate_size == 73 and model.config.num_attention_heads == 2
    assert model.config.num_key_value_heads == 2 and model.config.head_dim == 16
    block_params = 4 * (3 * 64 * 128 + 2 * 64 * 16 * 6)
    assert abs((n - _params(model)) / block_params - 0.4) < 0.01
    assert torch.isfinite(_logits(model, calibration.input_ids[:1])).all()


def _duplicate_ffn_neurons(model, layer, scale):
    """Neurons 96..127 of `layer` become copies of 0..31 (same activation); their down_proj
    columns are `scale` × their partner's, so they are exact linear combinations of kept ones."""
    mlp = model.model.layers[layer].mlp
    with torch.no_grad():
        mlp.gate_proj.weight[96:] = mlp.gate_proj.weight[:32]
        mlp.up_proj.weight[96:] = mlp.up_proj.weight[:32]
        mlp.down_proj.weight[:, 96:] = scale * mlp.down_proj.weight[:, :32]
        for p in model.model.layers[layer].mlp.parameters():
            p.mul_(4.0)  # larger activations so differences stand out of float32 noise
    return model


@pytest.mark.parametrize("target", ["both", "ffn", "heads"])
def test_statistics_of_every_layer_serve_any_ratios_bit_identically(calibration, target):
    """One pass gathered for every layer a target reaches (what a run caches per recipe) gives
    each plan exactly the model its own prune_width pass gives."""
    from compression.width import apply_plan_from_stats, collect_width_stats

    data = calibration.take(4)
    first = _step(ratio={0: 0.5, 2: 0.25}, target=target, reconstruct="liar", criterion="second_moment")[0]
    grams = collect_width_stats(tiny_llama(seed=0), first, data, every_layer=True)
    for ratio in ({0: 0.5, 2: 0.25}, {1: 0.125, 3: 0.625}, 0.375):
        step = first.model_copy(update={"ratio": ratio})
        own = apply_plan(tiny_llama(seed=0), [step], data)
        shared = apply_plan_from_stats(tiny_llama(seed=0), [step], grams, data)
        want, got = own.state_dict(), shared.state_dict()
        assert list(want) == list(got) and all(torch.equal(want[k], got[k]) for k in want), ratio


@pytest.mark.parametrize("criterion,target", [("second_moment", "both"), ("wanda", "heads"), ("second_moment", "ffn")])
def test_units_blocks_serve_unreconstructed_plans_bit_identically(calibration, criterion, target):
    """What a shared recipe's screening cache keeps (`collect_unit_grams`: each unit's diagonal
    block, a 7B layer's 0.5M numbers for 138M) makes the bytes of each plan's own pass, and is
    refused where a step reconstructs."""
    from compression.width import (UnitGrams, apply_plan_from_stats, collect_unit_grams, collect_width_stats,
                                   width_stats_bytes)

    data = calibration.take(4)
    first = _step(ratio=0.25, target=target, reconstruct="none", criterion=criterion)[0]
    units = collect_unit_grams(tiny_llama(seed=0), first, data)
    whole = collect_width_stats(tiny_llama(seed=0), first, data, every_layer=True)
    assert set(units) == set(whole) and all(isinstance(u, UnitGrams) for u in units.values())
    config = tiny_llama(seed=0).config  # 4 layers; each unit keeps its neuron's number or its head's hd x hd block
    hd = config.hidden_size // config.num_attention_heads
    per_layer = {"ffn": config.intermediate_size, "heads": config.num_attention_heads * hd * hd}
    per_layer["both"] = per_layer["ffn"] + per_layer["heads"]
    assert sum(u.values.numel() for u in units.values()) == config.num_hidden_layers * per_layer[target]
    assert sum(u.values.numel() * 8 for u in units.values()) < width_stats_bytes(tiny_llama(seed=0), target)
    for ratio in ({0: 0.5, 2: 0.25}, {1: 0.125, 3: 0.625}, 0.375):
        step = first.model_copy(update={"ratio": ratio})
        own = apply_plan(tiny_llama(seed=0), [step], data).state_dict()
        shared = apply_plan_from_stats(tiny_llama(seed=0), [step], units, data).state_dict()
        assert list(own) == list(shared) and all(torch.equal(own[k], shared[k]) for k in own), ratio
    rebuilding = first.model_copy(update={"reconstruct": "liar"})
    with pytest.raises(ValueError, match="reads more than the units' blocks"):
        collect_unit_grams(tiny_llama(seed=0), rebuilding, data)
    with pytest.raises(ValueError, match="whole Gram matrix"):
        apply_plan_from_stats(tiny_llama(seed=0), [rebuilding], units, data)


def test_block_by_block_statistics_are_the_streaming_pass_bits(calibration):
    """`collect_grams_by_block` sums the same rows as a whole-model pass, and hands each
    block's statistics over in order (empty where nothing is watched) without keeping them."""
    from compression.reconstruct import collect_grams_by_block, collect_input_grams
    from compression.width import targeted_projections

    model = tiny_llama(seed=0)
    watched = {k: v for k, v in targeted_projections(model, "both").items() if k not in ("0.ffn", "0.attn", "3.ffn")}
    data = calibration.take(5)  # batches of 2, 2 and 1 windows
    want = collect_input_grams(model, data.batches(2), watched)
    got = collect_grams_by_block(model, data.batches(2), watched)
    assert set(got) == set(want)
    for name in want:
        assert torch.equal(got[name].sum_outer, want[name].sum_outer) and torch.equal(got[name].sum, want[name].sum)
        assert got[name].count == want[name].count == 5 * data.seq_len
    handed = []
    kept = collect_grams_by_block(model, data.batches(2), watched, consume=lambda i, stats: handed.append((i, sorted(stats))))
    assert kept == {} and handed == [(0, []), (1, ["1.attn", "1.ffn"]), (2, ["2.attn", "2.ffn"]), (3, ["3.attn"])]


@pytest.mark.parametrize("fields", [
    {"ratio": 0.25, "target": "both", "reconstruct": "liar"},
    {"ratio": {1: 0.5, 2: 0.25}, "target": "ffn", "reconstruct": "greedy", "greedy_rounds": 2},
    {"ratio": 0.5, "target": "heads", "reconstruct": "none", "criterion": "wanda"},
    {"ratio": {0: 0.25}, "target": "ffn", "reconstruct": "liar", "criterion": "magnitude"},
], ids=["both-liar", "ffn-greedy", "heads-wanda", "first-layer-only"])
def test_pruning_block_by_block_makes_the_bytes_of_pruning_after_the_whole_pass(calibration, fields):
    from compression.width import collect_width_stats, prune_with_stats

    data = calibration.take(4)
    (step,) = _step(**fields)
    whole = prune_with_stats(tiny_llama(seed=0), step, collect_width_stats(tiny_llama(seed=0), step, data))
    blockwise = apply_plan(tiny_llama(seed=0), [step], data)
    want, got = whole.state_dict(), blockwise.state_dict()
    assert list(want) == list(got) and all(torch.equal(want[k], got[k]) for k in want)
    assert whole.config.to_dict() == blockwise.config.to_dict()


def test_liar_folds_linearly_dependent_neurons_exactly(calibration):
    ids = calibration.input_ids[:2]
    results = {}
    for reconstruct in ("none", "liar"):
        model = _duplicate_ffn_neurons(tiny_llama(seed=0), layer=1, scale=0.05)
        before = _logits(model, ids)
        plan = _step(ratio={1: 0.25}, target="ffn", criterion="second_moment", reconstruct=reconstruct, ridge=1e-9)
        model = apply_plan(model, plan, calibration)
        assert model.model.layers[1].mlp.down_proj.in_features == 96
        results[reconstruct] = (_logits(model, ids) - before).abs().max().item()
    assert results["liar"] < 1e-5
    assert results["none"] > 100 * results["liar"]


def test_greedy_finds_and_folds_duplicated_neurons(calibration):
    ids = calibration.input_ids[:2]
    model = _duplicate_ffn_neurons(tiny_llama(seed=0), layer=1, scale=1.0)
    before = _logits(model, ids)
    plan = _step(ratio={1: 0.25}, target="ffn", criterion="magnitude", reconstruct="greedy", greedy_pool=None,
                 greedy_rounds=32, ridge=1e-9)
    model = apply_plan(model, plan, calibration)
    assert (_logits(model, ids) - before).abs().max().item() < 1e-5
    none = apply_plan(_duplicate_ffn_neurons(tiny_llama(seed=0), layer=1, scale=1.0),
                      _step(ratio={1: 0.25}, target="ffn", criterion="magnitude", reconstruct="none"), calibration)
    assert (_logits(none, ids) - before).abs().max().item() > 1e-3


def test_greedy_removes_duplicated_heads_exactly(calibration):
    ids = calibration.input_ids[:2]
    model = tiny_llama(seed=0)
    attn = model.model.layers[2].self_attn
    hd = attn.head_dim
    with torch.no_grad():  # head 1 copies head 0 (both in KV group 0), head 3 copies head 2 (group 1)
        attn.q_proj.weight[hd:2 * hd] = attn.q_proj.weight[:hd]
        attn.q_proj.weight[3 * hd:] = attn.q_proj.weight[2 * hd:3 * hd]
        attn.o_proj.weight.mul_(8.0)
    before = _logits(model, ids)
    model = apply_plan(model, _step(ratio={2: 0.34}, target="heads", reconstruct="greedy", ridge=1e-9), calibration)
    attn = model.model.layers[2].self_attn
    assert attn.q_proj.out_features == 2 * hd and attn.k_proj.out_features == 2 * hd
    assert attn.num_key_value_groups == 1
    assert (_logits(model, ids) - before).abs().max().item() < 1e-5


def test_gqa_kv_group_removal_keeps_the_model_runnable(tiny_model, calibration):
    model = apply_plan(tiny_model, _step(ratio=0.5, target="heads", reconstruct="liar"), calibration.take(4))
    attn = model.model.layers[0].self_attn
    hd = attn.head_dim
    assert attn.k_proj.out_features == hd and attn.v_proj.out_features == hd  # one KV group left
    assert attn.q_proj.out_features == 2 * hd and attn.o_proj.in_features == 2 * hd  # its 2 query heads
    assert attn.num_key_value_groups == 2
    assert (model.config.num_attention_heads, model.config.num_key_value_heads) == (2, 1)
    prompt = calibration.input_ids[:1, :12]
    cached = model.generate(prompt, max_new_tokens=6, do_sample=False, use_cache=True)
    uncached = model.generate(prompt, max_new_tokens=6, do_sample=False, use_cache=False)
    assert torch.equal(cached, uncached)


def test_magnitude_without_reconstruction_needs_no_calibration(tiny_model, calibration):
    model = apply_plan(tiny_model, _step(ratio=0.25, criterion="magnitude", reconstruct="none"), None)
    assert model.config.intermediate_size < 128
    with pytest.raises(PlanError, match="calibration"):
        apply_plan(tiny_llama(seed=0), _step(ratio=0.25, criterion="wanda", reconstruct="none"), None)


def test_reconstruction_beats_plain_removal_on_calibration_text(calibration):
    ids = calibration.input_ids[8:12]  # held out from the 8 calibration windows used
    base = tiny_llama(seed=0)
    ref = _logits(base, ids)
    errors = {}
    for reconstruct in ("none", "liar", "greedy"):
        model = apply_plan(tiny_llama(seed=0), _step(ratio=0.3, target="ffn", reconstruct=reconstruct),
                           calibration.take(8))
        errors[reconstruct] = (_logits(model, ids) - ref).pow(2).mean().item()
    assert errors["liar"] < errors["none"] and errors["greedy"] < errors["none"]


# ------------------------------------------------------------------ save / reload


def test_uniform_widths_save_as_plain_transformers(tiny_model, calibration, tokenizer, tmp_path):
    model = apply_plan(tiny_model, _step(ratio=0.3), calibration.take(4))
    ids = calibration.input_ids[:2]
    save_compressed(model, tokenizer, tmp_path)
    assert not (tmp_path / STRUCTURE_FILE).exists()
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["head_dim"] == 16 and config["intermediate_size"] == model.config.intermediate_size
    plain = AutoModelForCausalLM.from_pretrained(str(tmp_path))
    assert torch.equal(_logits(plain, ids), _logits(model, ids))
    assert torch.equal(_logits(load_compressed(tmp_path), ids), _logits(model, ids))


def test_per_layer_widths_reload_with_the_structure_file(tiny_model, calibration, tokenizer, tmp_path):
    model = apply_plan(tiny_model, _step(ratio={0: 0.2, 3: 0.6}), calibration.take(4))
    assert model.model.layers[0].mlp.down_proj.in_features != model.model.layers[3].mlp.down_proj.in_features
    assert model.model.layers[1].mlp.down_proj.in_features == 128  # untouched
    ids = calibration.input_ids[:2]
    save_compressed(model, tokenizer, tmp_path)
    structure = json.loads((tmp_path / STRUCTURE_FILE).read_text())
    assert "model.layers.3.mlp.down_proj" in structure["modules"]
    assert "model.layers.1.mlp.down_proj" not in structure["modules"]
    reloaded = load_compressed(tmp_path)
    assert torch.equal(_logits(reloaded, ids), _logits(model, ids))
    with pytest.raises(Exception):
        AutoModelForCausalLM.from_pretrained(str(tmp_path))  # plain transformers refuses, loudly


class _ScaledLinear(nn.Module):
    """A stand-in for another method's module kind (e.g. TTM cores)."""

    def __init__(self, features: int, scale: float):
        super().__init__()
        self.features, self.scale = features, scale
        self.weight = nn.Parameter(torch.zeros(features, features))

    def forward(self, x):
        return self.scale * (x @ self.weight.T)


def test_other_module_kinds_register_and_round_trip(tiny_model, tokenizer, tmp_path):
    register_kind("scaled", _ScaledLinear, describe=lambda m: {"features": m.features, "scale": m.scale},
                  build=lambda spec: _ScaledLinear(spec["features"], spec["scale"]))
    try:
        layer = _ScaledLinear(64, 0.5)
        with torch.no_grad():
            layer.weight.copy_(torch.randn(64, 64) * 0.02)
        tiny_model.model.layers[2].self_attn.o_proj = layer
        save_compressed(tiny_model, tokenizer, tmp_path)
        reloaded = load_compressed(tmp_path)
        assert isinstance(reloaded.model.layers[2].self_attn.o_proj, _ScaledLinear)
        ids = torch.randint(3, 200, (1, 16))
        assert torch.equal(_logits(reloaded, ids), _logits(tiny_model, ids))
    finally:
        loader._KINDS.pop("scaled", None)
    with pytest.raises(loader.StructureError, match="unknown kind 'scaled'"):
        load_compressed(tmp_path)


def test_per_layer_ratio_survives_a_json_round_trip():
    from compression.plan import plan_to_data

    plan = _step(ratio={0: 0.3, 2: 0.5}, criterion="similarity")
    again = parse_plan(json.loads(json.dumps(plan_to_data(plan))))
    assert again == plan and again[0].ratio == {0: 0.3, 2: 0.5}
