"""Block removal through the architecture adapter, and the depth plan ops."""
from __future__ import annotations

import pytest
import torch
from transformers import (
    AutoModelForCausalLM,
    GPT2Config,
    GPT2LMHeadModel,
    MistralConfig,
    MistralForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
)

from compression import arch
from compression.depth import FuseBlocksStep, RemoveBlocksStep, shrink
from compression.importance import block_influence, lowest
from compression.plan import PlanError, apply_plan, check_plan, parse_plan
from search.models.tiny import tiny_llama


SMALL = dict(vocab_size=259, hidden_size=32, intermediate_size=64, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2)


def _qwen2():
    torch.manual_seed(1)
    config = Qwen2Config(**SMALL, use_sliding_window=True, sliding_window=16, max_window_layers=2)
    return Qwen2ForCausalLM(config).eval()


def _mistral():
    torch.manual_seed(2)
    return MistralForCausalLM(MistralConfig(**SMALL)).eval()


def _gpt2(**overrides):
    torch.manual_seed(3)
    config = GPT2Config(vocab_size=259, n_embd=32, n_layer=4, n_head=4, n_positions=64, bos_token_id=1, eos_token_id=2, **overrides)
    return GPT2LMHeadModel(config).eval()


MODELS = {"llama": lambda: tiny_llama(seed=0), "qwen2": _qwen2, "mistral": _mistral, "gpt2": _gpt2}
PROMPT = torch.tensor([[5, 40, 41, 42, 43, 44, 45, 46]])


def _greedy(model, use_cache: bool) -> torch.Tensor:
    return model.generate(PROMPT, max_new_tokens=12, do_sample=False, use_cache=use_cache, pad_token_id=0)


@pytest.mark.parametrize("name", list(MODELS))
def test_removal_keeps_config_cache_and_reload_consistent(name, tmp_path):
    model = MODELS[name]()
    layer_types = getattr(model.config, "layer_types", None)
    kept_blocks = [arch.decoder_blocks(model)[i] for i in (0, 2)]
    arch.remove_blocks(model, [1, 3])

    assert arch.num_blocks(model) == model.config.num_hidden_layers == 2
    assert list(arch.decoder_blocks(model)) == kept_blocks
    for position, block in enumerate(arch.decoder_blocks(model)):
        assert {m.layer_idx for m in block.modules() if hasattr(m, "layer_idx")} == {position}
    if layer_types is not None:
        assert model.config.layer_types == [layer_types[0], layer_types[2]]

    # Greedy generation with the KV cache equals generation recomputing everything.
    with torch.no_grad():
        assert torch.equal(_greedy(model, True), _greedy(model, False))

    model.save_pretrained(tmp_path)
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert reloaded.config.num_hidden_layers == 2
    with torch.no_grad():
        torch.testing.assert_close(reloaded(PROMPT).logits, model(PROMPT).logits)
        assert torch.equal(_greedy(reloaded, True), _greedy(model, True))


def test_removal_rejects_bad_indices(tiny_model):
    with pytest.raises(IndexError, match="block index 4 out of range"):
        arch.remove_blocks(tiny_model, [4])
    with pytest.raises(ValueError, match="cannot remove 4 of 4"):
        arch.remove_blocks(tiny_model, range(4))


def test_gpt2_index_scaled_attention_is_refused():
    model = _gpt2(scale_attn_by_inverse_layer_idx=True)
    plan = parse_plan([{"op": "remove_blocks", "count": 1}])
    with pytest.raises(PlanError, match=r"^plan\[0\]\.op: remove_blocks scale_attn_by_inverse_layer_idx=True"):
        check_plan(plan, model.config)


@pytest.mark.parametrize(
    "raw, message",
    [
        ({"op": "remove_blocks", "count": 4}, r"^plan\[0\]\.count: 4 >= num_hidden_layers 4$"),
        ({"op": "fuse_blocks", "count": 9}, r"^plan\[0\]\.count: 9 >= num_hidden_layers 4$"),
    ],
)
def test_check_rejects_too_many_blocks(tiny_model, raw, message):
    with pytest.raises(PlanError, match=message):
        check_plan(parse_plan([raw]), tiny_model.config)


@pytest.mark.parametrize(
    "raw, message",
    [
        ({"op": "fuse_blocks", "count": 1, "rank": 0}, r"^plan\[0\]\.rank: Input should be greater than 0"),
        ({"op": "remove_blocks", "count": 0}, r"^plan\[0\]\.count: Input should be greater than 0"),
        ({"op": "fuse_blocks", "count": 1, "importance": "random"}, r"^plan\[0\]\.importance: Input should be"),
        ({"op": "remove_blocks", "count": 1, "rank": 8}, r"^plan\[0\]\.rank: Extra inputs are not permitted"),
        ({"op": "drop_blocks", "count": 1}, r"^plan\[0\]\.op: unknown op 'drop_blocks'"),
    ],
)
def test_parse_rejects_bad_steps(raw, message):
    with pytest.raises(PlanError, match=message):
        parse_plan([raw])


def test_plan_round_trip_and_defaults():
    step = parse_plan([{"op": "fuse_blocks", "count": 2, "lr": "1e-3"}])[0]
    assert isinstance(step, FuseBlocksStep)
    assert (step.importance, step.rank, step.steps, step.group_size, step.is_iterative()) == ("macro_influence", 128, 100, 7, True)
    assert parse_plan([step.model_dump(mode="json")])[0] == step
    remove = RemoveBlocksStep(count=1)
    assert (remove.importance, remove.steps, remove.is_iterative()) == ("block_influence", 0, False)
    assert RemoveBlocksStep(count=1, importance="sleb").is_iterative()


def test_remove_blocks_op_drops_the_least_influential(tiny_model, calibration):
    scores = block_influence(tiny_model, calibration.take(8))
    expected = [arch.decoder_blocks(tiny_model)[i] for i in range(4) if i not in lowest(scores, 2)]
    plan = parse_plan([{"op": "remove_blocks", "count": 2, "importance_samples": 8}])
    check_plan(plan, tiny_model.config)
    model = apply_plan(tiny_model, plan, calibration)
    assert list(arch.decoder_blocks(model)) == expected
    assert model.config.num_hidden_layers == 2


def test_removal_with_healing_trains_only_the_group(calibration):
    model = tiny_llama(seed=0, num_hidden_layers=5)
    outside = arch.decoder_blocks(model)[0].self_attn.q_proj.weight.clone()
    step = RemoveBlocksStep(count=1, importance="sleb", importance_samples=4, steps=15, lr=1e-3, group_size=2)
    report: list[dict] = []
    shrink(model, step, calibration.take(8), report)
    (stats,) = report
    assert stats["loss_after"] < stats["loss_before"]
    first, last = stats["group"]
    assert model.config.num_hidden_layers == 4
    if first > 0:  # block 0 was outside the group: untouched
        assert torch.equal(arch.decoder_blocks(model)[0].self_attn.q_proj.weight, outside)
    assert all(p.requires_grad for p in model.parameters())  # flags restored
