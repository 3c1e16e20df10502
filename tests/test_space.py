"""The plan space: every trial shares every parameter, so NSGA-II evolves the numbers too."""
from __future__ import annotations

import optuna
from optuna.search_space import IntersectionSearchSpace

from compression.plan import parse_plan, predict_num_params
from search.tuning.space import SpaceConfig, budget_anchors, suggest_plan
from search.models.tiny import tiny_llama_config

SPACE = SpaceConfig(
    depth=["none", "remove_blocks", "fuse_blocks"],
    block_count={"low": 1, "high": 6},
    width=["none", "prune_width"],
    ttm=["none", "ttm"],
)


def asked_plans(study: optuna.Study, n: int) -> list[list[dict]]:
    plans = []
    for _ in range(n):
        trial = study.ask()
        plans.append(suggest_plan(trial, SPACE, num_layers=8))
        study.tell(trial, [float(len(plans)), float(n - len(plans))])
    return plans


def test_every_trial_suggests_every_parameter():
    study = optuna.create_study(directions=["maximize", "minimize"], sampler=optuna.samplers.RandomSampler(seed=0))
    plans = asked_plans(study, 30)
    assert {t.params.keys() == study.trials[0].params.keys() for t in study.trials} == {True}
    assert {"block_count", "width_ratio", "fuse_rank", "ttm_rank"} <= set(IntersectionSearchSpace().calculate(study))
    ops = {tuple(step["op"] for step in plan) for plan in plans}
    assert () in ops and any("fuse_blocks" in o for o in ops) and any("ttm" in o for o in ops)
    for plan in plans:
        parse_plan(plan)  # only the chosen steps, each with its own fields
        assert all("rank" not in step for step in plan if step["op"] == "remove_blocks")


def test_nsga2_breeds_the_numeric_parameters():
    """After the first generation, children take width ratios from their parents (uniform
    crossover, no mutation) instead of drawing them at random."""
    sampler = optuna.samplers.NSGAIISampler(seed=0, population_size=4, mutation_prob=0.0)
    study = optuna.create_study(directions=["maximize", "minimize"], sampler=sampler)
    asked_plans(study, 4)
    parents = {t.params["width_ratio"] for t in study.trials}
    asked_plans(study, 8)
    assert all(t.params["width_ratio"] in parents for t in study.trials[4:])


def test_budget_anchors_are_the_weakest_plans_that_fit():
    """One anchor per combination of step kinds (single kinds first); each fits the budget and
    the same combination one notch weaker does not."""
    config = tiny_llama_config(num_hidden_layers=8)
    space = SpaceConfig(depth=["none", "remove_blocks"], block_count={"low": 1, "high": 6},
                        width=["none", "prune_width"], width_ratio={"low": 0.05, "high": 0.45})
    dense = predict_num_params([], config)
    budget = 0.75 * dense

    def size(params: dict) -> int:
        return predict_num_params(parse_plan(suggest_plan(optuna.trial.FixedTrial(params), space, 8)), config)

    anchors = budget_anchors(space, 8, lambda plan: predict_num_params(parse_plan(plan), config) <= budget, limit=5)
    assert [(a["depth"], a["width"]) for a in anchors] == [
        ("remove_blocks", "none"), ("none", "prune_width"), ("remove_blocks", "prune_width")]
    for anchor in anchors:
        assert size(anchor) <= budget
    depth_only, width_only, both = anchors
    assert size({**depth_only, "block_count": depth_only["block_count"] - 1}) > budget
    assert size({**width_only, "width_ratio": width_only["width_ratio"] - 0.01}) > budget
    assert 1 <= both["block_count"] < depth_only["block_count"] and both["width_ratio"] < width_only["width_ratio"]
    assert budget_anchors(space, 8, lambda plan: True, limit=2)[0]["block_count"] == 1  # the weakest when all fit
    assert budget_anchors(space, 8, lambda plan: False, limit=3) == []
