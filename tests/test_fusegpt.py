"""FuseGPT fusion: exact start, training lowers the local loss, folding keeps logits, reload."""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn as nn
from transformers import AutoModelForCausalLM, GPT2Config, GPT2LMHeadModel
from transformers.pytorch_utils import Conv1D

from compression import arch
from compression.calibration import CalibrationData
from compression.depth import FuseBlocksStep, shrink
from compression.fusegpt import (
    DistillSettings,
    FusedLinear,
    distillation_loss,
    fold_fused,
    fuse_block,
    fused_layers,
    group_window,
)
from compression.plan import apply_plan, parse_plan
from search.models.tiny import tiny_llama


def _gpt2():
    torch.manual_seed(3)
    config = GPT2Config(vocab_size=259, n_embd=32, n_layer=4, n_head=4, n_positions=64, bos_token_id=1, eos_token_id=2)
    return GPT2LMHeadModel(config).eval()


def _nonzero_coefficients(model, seed=0):
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in fused_layers(model):
            for p in layer.coefficients():
                p.copy_(0.05 * torch.randn(p.shape, generator=gen))


@pytest.mark.parametrize("make", [lambda: nn.Linear(6, 5), lambda: nn.Linear(6, 5, bias=False), lambda: Conv1D(5, 6)])
def test_fused_linear_starts_exact_and_folds(make):
    torch.manual_seed(0)
    base, pruned = make(), make()
    x = torch.randn(3, 7, 6)
    expected = base(x)
    fused = FusedLinear(copy.deepcopy(base))
    fused.add_source(pruned.weight, pruned.bias, rank=4)
    assert torch.equal(fused(x), expected)  # C = 0: exactly the base layer

    with torch.no_grad():
        fused.coef_left[0].normal_()
        for c in fused.coef_bias:
            c.normal_()
    mask = (fused.coef_left[0] @ fused.coef_right[0]).detach()  # (rows, cols)
    weight = base.weight + mask * pruned.weight
    bias = None if base.bias is None else base.bias + fused.coef_bias[0].detach() * pruned.bias
    direct = (x @ weight + bias) if isinstance(base, Conv1D) else nn.functional.linear(x, weight, bias)
    torch.testing.assert_close(fused(x), direct)
    out = fused(x)
    folded = fused.fold()
    assert type(folded) is type(base)
    torch.testing.assert_close(folded(x), out, rtol=0, atol=1e-6)


def test_group_window():
    assert list(group_window(10, 30, 7)) == list(range(7, 15))
    assert list(group_window(0, 30, 7)) == list(range(0, 8))
    assert list(group_window(29, 30, 7)) == list(range(22, 30))
    assert list(group_window(2, 4, 7)) == [0, 1, 2, 3]
    assert 10 in group_window(10, 30, 6) and len(group_window(10, 30, 6)) == 7


def test_distillation_loss_is_zero_only_at_the_target():
    target = torch.randn(2, 5, 8)
    for loss in ("mse", "kl"):
        assert distillation_loss(target, target, loss).item() == pytest.approx(0.0, abs=1e-6)
        assert distillation_loss(target + 0.3 * torch.randn(2, 5, 8), target, loss).item() > 1e-3


@pytest.mark.parametrize("make", [lambda: tiny_llama(seed=0), _gpt2], ids=["llama", "gpt2"])
def test_fused_model_at_step_zero_equals_block_removal(make, calibration):
    model = make()
    removed = arch.remove_blocks(copy.deepcopy(model), [1])
    stats = fuse_block(model, 1, calibration.take(4), rank=8, group_size=2, settings=DistillSettings(steps=0))
    assert stats["loss_before"] == stats["loss_after"]
    assert len(fused_layers(model)) == 2 * len(arch.linear_layers(arch.decoder_blocks(removed)[0]))
    ids = calibration.input_ids[:2]
    with torch.no_grad():
        assert torch.equal(model(ids).logits, removed(ids).logits)


def test_training_lowers_group_loss_and_touches_only_coefficients(calibration):
    model = tiny_llama(seed=0, num_hidden_layers=5)
    stats = fuse_block(model, 2, calibration.take(8), rank=8, group_size=2, settings=DistillSettings(steps=30, lr=1e-2, batch_size=4))
    assert stats["loss_after"] < 0.9 * stats["loss_before"]
    for layer in fused_layers(model):
        assert layer.coef_left[0].abs().sum() > 0  # C moved away from zero
    assert not any(p.requires_grad for layer in fused_layers(model) for p in layer.coefficients())


def test_base_weights_stay_frozen(calibration):
    model = tiny_llama(seed=0, num_hidden_layers=5)
    before = [b.mlp.down_proj.weight.clone() for b in arch.decoder_blocks(model)]
    fuse_block(model, 2, calibration.take(4), rank=4, group_size=2, settings=DistillSettings(steps=5, lr=1e-2))
    kept = [before[i] for i in (0, 1, 3, 4)]
    for block, weight in zip(arch.decoder_blocks(model), kept):
        down = block.mlp.down_proj
        assert torch.equal(down.base_layer.weight if isinstance(down, FusedLinear) else down.weight, weight)


def test_second_fusion_appends_to_fused_layers(calibration):
    model = tiny_llama(seed=0, num_hidden_layers=5)
    data = calibration.take(4)
    fuse_block(model, 2, data, rank=4, group_size=2, settings=DistillSettings(steps=2))
    fuse_block(model, 1, data, rank=4, group_size=2, settings=DistillSettings(steps=2))
    sources = sorted(layer.num_sources for layer in fused_layers(model))
    assert max(sources) == 2 and model.config.num_hidden_layers == 3


@pytest.mark.parametrize("make", [lambda: tiny_llama(seed=0, num_hidden_layers=5), _gpt2], ids=["llama", "gpt2"])
def test_folding_preserves_logits_and_reloads(make, calibration, tmp_path):
    model = make()
    step = FuseBlocksStep(count=2, rank=4, steps=3, group_size=2, importance_samples=4)
    shrink(model, step, calibration.take(8))  # folds at the end
    assert not fused_layers(model)

    model2 = make()
    fuse_block(model2, 1, calibration.take(4), rank=4, group_size=3, settings=DistillSettings(steps=0))
    _nonzero_coefficients(model2)
    ids = calibration.input_ids[:2]
    with torch.no_grad():
        unfolded = model2(ids).logits
        fold_fused(model2)
        torch.testing.assert_close(model2(ids).logits, unfolded, rtol=0, atol=1e-5)

    model2.save_pretrained(tmp_path)
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert set(reloaded.state_dict()) == set(model2.state_dict())
    with torch.no_grad():
        torch.testing.assert_close(reloaded(ids).logits, model2(ids).logits)
        prompt = ids[:1, :8]
        cached = reloaded.generate(prompt, max_new_tokens=8, do_sample=False, pad_token_id=0)
        uncached = reloaded.generate(prompt, max_new_tokens=8, do_sample=False, use_cache=False, pad_token_id=0)
    assert torch.equal(cached, uncached)


def test_fuse_blocks_plan_op(calibration):
    model = tiny_llama(seed=0, num_hidden_layers=5)
    plan = parse_plan([{"op": "fuse_blocks", "count": 2, "rank": 4, "steps": 4, "group_size": 2, "importance_samples": 4}])
    out = apply_plan(model, plan, calibration.take(8))
    assert out.config.num_hidden_layers == 3 and len(arch.decoder_blocks(out)) == 3
    assert not fused_layers(out)
    assert all(type(m) is nn.Linear for m in arch.linear_layers(arch.decoder_blocks(out)[0]).values())


def test_fusion_runs_in_bfloat16(calibration):
    model = tiny_llama(seed=0, num_hidden_layers=4).to(torch.bfloat16)
    stats = fuse_block(model, 1, CalibrationData(calibration.input_ids[:4]), rank=4, group_size=2, settings=DistillSettings(steps=3, lr=1e-2))
    assert all(layer.coef_left[0].dtype == torch.float32 for layer in fused_layers(model))
    fold_fused(model)
    assert all(p.dtype == torch.bfloat16 for p in model.parameters())
    assert stats["loss_after"] == stats["loss_after"]  # not NaN


def test_layers_of_another_width_are_not_fused(calibration):
    model = tiny_llama(seed=0, num_hidden_layers=4)
    block = arch.decoder_blocks(model)[2]
    block.mlp.down_proj = nn.Linear(96, 64, bias=False)  # as if width-pruned: 128 -> 96 neurons
    block.mlp.gate_proj, block.mlp.up_proj = nn.Linear(64, 96, bias=False), nn.Linear(64, 96, bias=False)
    fuse_block(model, 1, calibration.take(4), rank=4, group_size=2, settings=DistillSettings(steps=0))
    narrow = arch.decoder_blocks(model)[1]  # the old block 2
    assert isinstance(narrow.self_attn.q_proj, FusedLinear)
    assert not isinstance(narrow.mlp.down_proj, FusedLinear)


def test_fold_each_freezes_earlier_fusions(calibration, monkeypatch):
    import compression.depth as depth

    seen = []
    real = depth.fuse_block

    def spy(model, *args, **kwargs):
        seen.append(max((layer.num_sources for layer in fused_layers(model)), default=0))
        return real(model, *args, **kwargs)

    monkeypatch.setattr(depth, "fuse_block", spy)
    model = tiny_llama(seed=0, num_hidden_layers=5)
    shrink(model, FuseBlocksStep(count=2, rank=4, steps=2, group_size=3, importance_samples=4, fold_each=True), calibration.take(4))
    assert seen == [0, 0]  # the second fusion starts from plain (folded) layers
    seen.clear()
    model = tiny_llama(seed=0, num_hidden_layers=5)
    shrink(model, FuseBlocksStep(count=2, rank=4, steps=2, group_size=3, importance_samples=4, fold_each=False), calibration.take(4))
    assert seen == [0, 1] and not fused_layers(model)
