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



def summary_of(tmp_path, monkeypatch, config, rows: list[dict]) -> str:
    import json

    from search.results import report
    from search.run.store import RunStore

    store = RunStore(tmp_path)
    store.journal_path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    monkeypatch.setattr(report, "_load", lambda run_dir: (store, config, {"population": []}))
    return report.results_table(tmp_path)


def dev_row(cid: str, score: float, params: int) -> dict:
    metrics = {task: {"score": score, "token_perplexity": 2.0} for task in ("arith", "compare")}
    return {"id": cid, "recipe": {"op": "copy", "inputs": [cid]}, "plan": [], "split": "dev", "status": "ok",
            "metrics": metrics, "score": score, "num_params": params}


def test_a_joint_runs_summary_shows_each_models_size_and_the_best_candidates_share(tmp_path, monkeypatch):
    from pathlib import Path

    import yaml

    from search.config import parse_config

    root = Path(__file__).resolve().parents[1]
    config = parse_config(yaml.safe_load((root / "configs" / "tiny-joint.yaml").read_text()))
    rows = [dev_row("base", -2.0, 1_000_000), dev_row("arith", -1.5, 1_000_000), dev_row("compare", -1.6, 1_000_000),
            dev_row("g001-003", -1.8, 737_500)]
    text = summary_of(tmp_path, monkeypatch, config, rows)
    assert "| model | role | dev score | params | arith dev" in text
    assert "| g001-003 | best merged candidate | -1.8000 | 737,500 |" in text
    assert ("No merged candidate beat the best parent: arith (dev score -1.5000) is ahead of the best merged "
            "candidate (g001-003, -1.8000, 737,500 parameters, 73.8% of arith's) by 0.3000") in text
    merge = summary_of(tmp_path, monkeypatch, config.model_copy(update={"mode": "merge"}), rows)
    assert "params" not in merge and "parameters" not in merge  # one size for every candidate: nothing to show


def test_status_lists_a_sized_runs_front_smallest_first():
    from search.results.report import front_of

    state = {"hall_of_fame": [{"id": "g003-002", "params": 99_141_120, "score": -1.1347},
                              {"id": "g000-030", "params": 94_275_648, "score": -1.2754}]}
    status = {"run": "runs/j", "status": "running", "generation": 2, "generations": 4, "evaluations": 40, "failed": 0,
              "best": {"id": "g003-002", "score": -1.1347}, "eta_s": None, "best_per_task": {}, "front": front_of(state)}
    lines = format_status(status).splitlines()
    assert lines[4] == "front        2 members, smallest first: g000-030 94.3M -1.2754, g003-002 99.1M -1.1347"
    assert not any(line.startswith("front") for line in format_status({**status, "front": None}).splitlines())
