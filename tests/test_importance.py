"""Importance scores against direct computations on whole-model forwards (hooks, real removal)."""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from transformers import Qwen2Config, Qwen2ForCausalLM

from compression import arch
from compression.calibration import CalibrationData
from compression.importance import block_influence, lowest, macro_influence, select_blocks, sleb_nll


@pytest.fixture()
def windows(calibration) -> CalibrationData:
    return calibration.take(8)  # (8, 64)


def _block_io(model, ids):
    """Inputs and outputs of every block from one ordinary forward, via forward hooks."""
    ios = []

    def hook(module, args, kwargs, output):
        hidden = args[0] if args else kwargs["hidden_states"]
        ios.append((hidden, output[0] if isinstance(output, tuple) else output))

    handles = [b.register_forward_hook(hook, with_kwargs=True) for b in arch.decoder_blocks(model)]
    with torch.no_grad():
        model(ids, use_cache=False)
    for h in handles:
        h.remove()
    return ios


def _last_block_output(model, ids):
    return _block_io(model, ids)[-1][1]


def _without(model, i):
    return arch.remove_blocks(copy.deepcopy(model), [i])


def test_block_influence_matches_direct(tiny_model, windows):
    ios = _block_io(tiny_model, windows.input_ids)
    direct = [1 - F.cosine_similarity(x, y, dim=-1).mean().item() for x, y in ios]
    assert block_influence(tiny_model, windows, batch_size=3) == pytest.approx(direct, abs=1e-5)


def test_macro_influence_matches_real_removal(tiny_model, windows):
    ids = windows.input_ids
    full = _last_block_output(tiny_model, ids)
    direct = [
        1 - F.cosine_similarity(full, _last_block_output(_without(tiny_model, i), ids), dim=-1).mean().item()
        for i in range(4)
    ]
    assert macro_influence(tiny_model, windows, batch_size=4) == pytest.approx(direct, abs=1e-5)


def test_sleb_matches_real_removal_loss(tiny_model, windows):
    ids = windows.input_ids
    with torch.no_grad():
        direct = [_without(tiny_model, i)(ids, labels=ids).loss.item() for i in range(4)]
    assert sleb_nll(tiny_model, windows, batch_size=4) == pytest.approx(direct, abs=1e-4)


def test_skip_scores_the_model_without_those_blocks(tiny_model, windows):
    skipped = macro_influence(tiny_model, windows, skip=[1])
    removed = macro_influence(_without(tiny_model, 1), windows)
    assert skipped[1] == float("inf")
    assert [skipped[0], *skipped[2:]] == pytest.approx(removed, abs=1e-5)


def test_skip_respects_per_layer_types():
    # Qwen2 with sliding-window layers: skipping must equal removal with `layer_types` sliced.
    torch.manual_seed(0)
    config = Qwen2Config(
        vocab_size=259, hidden_size=32, intermediate_size=64, num_hidden_layers=4, num_attention_heads=4,
        num_key_value_heads=2, use_sliding_window=True, sliding_window=8, max_window_layers=2,
        attn_implementation="eager",
    )
    model = Qwen2ForCausalLM(config).eval()
    windows = CalibrationData(torch.randint(3, 259, (4, 24)))
    skipped = sleb_nll(model, windows, skip=[0])
    with torch.no_grad():
        removed = _without(model, 0)
        assert removed.config.layer_types == ["full_attention", "sliding_attention", "sliding_attention"]
        # blocks 0 and 1 really removed, scored by the model's own loss
        direct = _without(removed, 0)(windows.input_ids, labels=windows.input_ids).loss.item()
    assert skipped[1] == pytest.approx(direct, abs=1e-4)
    assert skipped[1:] == pytest.approx(sleb_nll(removed, windows), abs=1e-5)


def test_iterative_selection_is_greedy(tiny_model, windows):
    chosen = select_blocks(tiny_model, windows, 2, "sleb", iterative=True)
    first = lowest(sleb_nll(tiny_model, windows), 1)[0]
    second = lowest(sleb_nll(tiny_model, windows, skip=[first]), 1)[0]
    assert chosen == [first, second]


def test_one_shot_selection_takes_lowest(tiny_model, windows):
    scores = block_influence(tiny_model, windows)
    assert select_blocks(tiny_model, windows, 2, "block_influence") == sorted(range(4), key=scores.__getitem__)[:2]


def test_unknown_importance_is_named(tiny_model, windows):
    with pytest.raises(ValueError, match="importance: unknown criterion 'nope'"):
        select_blocks(tiny_model, windows, 1, "nope")
