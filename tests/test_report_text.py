"""What `evofuse report` and `evofuse status` print about a run's candidates."""
from __future__ import annotations

from search.results.report import format_status, plan_summary


def test_a_gene_plan_reads_layer_by_layer_in_layer_order():
    # a journalled plan's layer keys are strings: sorted as text they would read 0, 1, 10, 11, 2
    ratio = {str(layer): 0.375 for layer in range(12)} | {"0": 0.4375, "10": 0.25, "2": 0.1875}
    plan = [{"op": "prune_width", "ratio": ratio, "target": "both", "criterion": "second_moment",
             "reconstruct": "liar", "ridge": 0.1},
            {"op": "remove_blocks", "blocks": [26, 3, 17]}]
    assert plan_summary(plan) == (
        "prune_width (target both, criterion second_moment, reconstruct liar, ridge 0.1): "
        "cut % of layers 0-11: 44 38 19 38 38 38 38 38 38 38 25 38 (mean 35.4); "
        "remove_blocks 3, 17, 26")


def test_layers_left_whole_are_named_by_index():
    plan = [{"op": "prune_width", "ratio": {"12": 0.5, "3": 0.25, "10": 0.125}}]
    assert plan_summary(plan) == "prune_width: cut % by layer: 3:25 10:12 12:50 (mean 29.2 over these)"


def test_uniform_steps_and_other_ops_keep_their_settings():
    plan = [{"op": "prune_width", "ratio": 0.32, "target": "ffn", "criterion": "wanda", "reconstruct": "none", "layers": [5, 3]},
            {"op": "remove_blocks", "count": 4, "importance": "block_influence"},
            {"op": "fuse_blocks", "blocks": [7, 2], "rank": 16, "steps": 20},
            {"op": "ttm", "rank": 8, "modules": "mlp"}]
    assert plan_summary(plan) == (
        "prune_width (target ffn, criterion wanda, reconstruct none): cut 32% of layers 3, 5; "
        "remove_blocks, count=4, importance=block_influence; fuse_blocks 2, 7 (rank 16, steps 20); "
        "ttm, rank=8, modules=mlp")
    assert plan_summary([{"op": "prune_width", "ratio": 0.25}]) == "prune_width: cut 25% of every layer"
    assert plan_summary([]) == "(dense)"


def test_status_says_the_per_task_lines_are_each_tasks_leader_not_the_best_candidates_scores():
    status = {"run": "runs/x", "status": "finished", "generation": 4, "generations": 4, "evaluations": 12,
              "failed": 0, "best": {"id": "g003-002", "score": -1.1347}, "eta_s": None,
              "best_per_task": {"pydoc": {"id": "pydoc", "token_perplexity": 16.636, "score": -2.812}}}
    lines = format_status(status).splitlines()
    assert lines[3] == "best         g003-002  dev score -1.1347"
    assert lines[4].startswith("per task     the leader on each task's dev split")
    assert lines[5] == "  pydoc      pydoc: token_perplexity 16.64, score -2.812"
