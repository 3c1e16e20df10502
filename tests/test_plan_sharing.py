"""Plans applied to a copy that shares the working model's weights (`copy_sharing_weights`):
every built-in op leaves the original's bytes as they were and makes the same model a deep copy
would; an op that writes in place anyway is caught by the version counters, and the actor makes
its working model again and gives plans a copy of their own from then on."""
from __future__ import annotations

import copy
from typing import Literal

import pytest
import torch
from pydantic import BaseModel

from compression import arch
from compression import plan as plans
from compression.plan import apply_plan, copy_sharing_weights, parse_plan, weight_versions
from search.models.tiny import tiny_llama

# One plan per way an op can change a model: every built-in op, width pruning with each
# reconstruction, block removal with and without healing (which trains existing weights).
PLANS = {
    "remove": [{"op": "remove_blocks", "count": 1, "importance": "sleb", "importance_samples": 4}],
    "remove_healed": [{"op": "remove_blocks", "count": 1, "importance": "sleb", "importance_samples": 4,
                       "steps": 3, "lr": 1e-3, "group_size": 2}],
    "fuse": [{"op": "fuse_blocks", "count": 1, "importance_samples": 4, "rank": 8, "steps": 2, "group_size": 2}],
    "width_none": [{"op": "prune_width", "ratio": 0.25, "target": "both", "reconstruct": "none"}],
    "width_liar": [{"op": "prune_width", "ratio": 0.25, "target": "ffn", "reconstruct": "liar"}],
    "width_greedy": [{"op": "prune_width", "ratio": 0.25, "target": "ffn", "reconstruct": "greedy", "greedy_rounds": 2}],
    "ttm": [{"op": "ttm", "rank": 4, "modules": "mlp", "recover_steps": 2}],
    "width_then_remove": [{"op": "prune_width", "ratio": {0: 0.25, 2: 0.5}, "target": "ffn", "reconstruct": "liar"},
                          {"op": "remove_blocks", "blocks": [1]}],
}


def _bytes(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {name: t.detach().clone() for name, t in model.state_dict().items()}


def test_the_copy_shares_every_tensor_and_keeps_ties():
    tiny_model = tiny_llama(seed=0, tie_word_embeddings=True)
    shared = copy_sharing_weights(tiny_model)
    original, copied = tiny_model.state_dict(), shared.state_dict()
    assert original.keys() == copied.keys()
    assert all(copied[k].data_ptr() == original[k].data_ptr() for k in original)
    params = dict(shared.named_parameters())
    assert all(p is not q for p, q in zip(params.values(), tiny_model.parameters()))  # parameter objects of its own
    assert shared.get_input_embeddings().weight is shared.get_output_embeddings().weight  # tied stays tied
    arch.remove_blocks(shared, [0])  # module lists and config are its own
    assert tiny_model.config.num_hidden_layers == 4 and len(arch.decoder_blocks(tiny_model)) == 4


@pytest.mark.parametrize("name", sorted(PLANS))
def test_every_op_leaves_the_original_and_makes_what_a_deep_copy_makes(name, calibration):
    model = tiny_llama(seed=0)
    steps = parse_plan(PLANS[name])
    before, versions = _bytes(model), weight_versions(model)
    torch.manual_seed(0)
    expected = apply_plan(copy.deepcopy(model), steps, calibration.take(8)).state_dict()
    torch.manual_seed(0)
    made = apply_plan(copy_sharing_weights(model), steps, calibration.take(8)).state_dict()
    assert weight_versions(model) == versions
    assert all(torch.equal(t, before[k]) for k, t in model.state_dict().items())
    assert made.keys() == expected.keys()
    assert all(torch.equal(made[k], expected[k]) for k in expected), name


class _HalveStep(BaseModel):
    op: Literal["halve_in_place"] = "halve_in_place"


def _halve_in_place(model, step, calibration):
    """An op breaking the rule: it writes into the weights it was given."""
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(0.5)
    return model


def test_an_actor_catches_an_op_writing_in_place_and_makes_its_weights_again(monkeypatch):
    from evolve.recipe import Recipe
    from search.models.sources import resolve_source
    from search.run.candidate import Candidate
    from search.run.workers import Evaluator, WorkerSpec, to_numpy_state

    plans.registered_ops()
    monkeypatch.setitem(plans._OPS, "halve_in_place", plans.Op("halve_in_place", _HalveStep, _halve_in_place))
    monkeypatch.setattr("ray.get", lambda ref: ref)  # refs are the weight sets themselves here: no object store
    parent = {k: v.clone() for k, v in tiny_llama(seed=1).state_dict().items()}
    spec = WorkerSpec(template_dir=str(resolve_source("tiny-llama")), tasks=[], names=list(parent),
                      calibration={"data": "pydoc:dev", "seq_len": 32, "num_sequences": 2})
    evaluator = Evaluator(spec)
    refs = {"base": to_numpy_state(parent)}
    candidate = Candidate(id="c", recipe=Recipe(op="copy", inputs=("base",)), plan=[{"op": "halve_in_place"}])
    evaluator._hold_recipe(candidate, refs)

    def working_model_holds_the_parent():
        return all(torch.equal(evaluator.params[k], parent[k]) for k in parent)

    with pytest.warns(UserWarning, match="wrote into the working model's weights"):
        halved = evaluator._apply_plan(candidate, refs)
    assert working_model_holds_the_parent()  # made again from the recipe
    assert all(torch.equal(t, parent[k] * 0.5) for k, t in halved.state_dict().items() if k in parent)
    assert evaluator._plans_share_weights is False
    again = evaluator._apply_plan(candidate, refs)  # a copy of its own: no warning, the same model
    assert working_model_holds_the_parent()
    assert all(torch.equal(t, halved.state_dict()[k]) for k, t in again.state_dict().items())
