"""predict_num_params: a plan's parameter count from shapes alone equals the count after applying it."""
from __future__ import annotations

import pytest
import torch
from transformers import Qwen2Config, Qwen2ForCausalLM

from compression.plan import PlanError, apply_plan, parse_plan, predict_num_params
from search.models.tiny import tiny_llama, tiny_llama_config

PLANS = {
    "remove": [{"op": "remove_blocks", "count": 2}],
    "fuse": [{"op": "fuse_blocks", "count": 1, "rank": 4, "steps": 1, "group_size": 2}],
    "width both": [{"op": "prune_width", "ratio": 0.3, "target": "both"}],
    "width heads, no reconstruction": [{"op": "prune_width", "ratio": 0.5, "target": "heads", "reconstruct": "none"}],
    "width ffn, two layers": [{"op": "prune_width", "ratio": 0.4, "target": "ffn", "layers": [0, 3]}],
    "depth then width": [{"op": "remove_blocks", "count": 1}, {"op": "prune_width", "ratio": 0.25}],
    "width then depth": [{"op": "prune_width", "ratio": 0.25}, {"op": "remove_blocks", "count": 1}],
    "ttm rank": [{"op": "ttm", "rank": 4}],
    "ttm budget, attention": [{"op": "ttm", "budget": 0.5, "modules": "attention"}],
    "all three": [{"op": "remove_blocks", "count": 1}, {"op": "prune_width", "ratio": 0.25, "target": "ffn"}, {"op": "ttm", "rank": 8}],
}


def tiny_qwen2(tied: bool) -> Qwen2ForCausalLM:
    """Qwen2: q/k/v biases (which shrink with the heads) and, here, tied embeddings."""
    fields = tiny_llama_config().to_dict()
    fields = {k: fields[k] for k in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                                      "num_attention_heads", "num_key_value_heads", "max_position_embeddings")}
    torch.manual_seed(0)
    return Qwen2ForCausalLM(Qwen2Config(**fields, tie_word_embeddings=tied)).eval()


def count(model) -> int:
    return sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("name", list(PLANS))
@pytest.mark.parametrize("family", ["llama", "qwen2 tied"])
def test_prediction_equals_the_applied_count(name, family, calibration):
    model = tiny_llama(seed=0) if family == "llama" else tiny_qwen2(tied=True)
    plan = parse_plan(PLANS[name])
    predicted = predict_num_params(plan, model.config)
    dense = count(model)
    applied = apply_plan(model, plan, calibration)
    assert predicted == count(applied) < dense


def test_unknowable_shapes_give_none(calibration):
    """After per-layer widths the blocks differ, and which one a removal takes depends on data."""
    model = tiny_llama(seed=0)
    plan = parse_plan([{"op": "prune_width", "ratio": {0: 0.5}, "target": "ffn"}, {"op": "remove_blocks", "count": 1}])
    assert predict_num_params(plan, model.config) is None
    assert predict_num_params(parse_plan(PLANS["remove"][:0]), model.config) == count(model)


def test_a_plan_that_does_not_fit_is_a_plan_error():
    with pytest.raises(PlanError, match=r"plan\[0\]\.count"):
        predict_num_params(parse_plan([{"op": "remove_blocks", "count": 4}]), tiny_llama_config())


def test_prediction_leaves_the_config_alone():
    config = tiny_llama_config()
    predict_num_params(parse_plan(PLANS["all three"]), config)
    assert config.num_hidden_layers == 4 and config.intermediate_size == 128
