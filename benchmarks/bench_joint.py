"""Joint search vs two single-method baselines at equal evaluation budget (issue 7).

1. joint:     `evofuse search configs/joint-demo.yaml` — Evolver recipes + Optuna plans.
2. baselines: an Evolver merge run with the same number of evaluations split in two halves:
              half for the merge (mode merge), half for compressing its best candidate with
              one method (mode compress, fixed weights): (a) ShortGPT block removal only,
              (b) uniform width pruning only (same criterion / reconstruction as the joint space).
Every Pareto candidate is scored on the test splits by the runs themselves; the comparison is
made at 75% of the dense parameter count ("25% fewer parameters"): the best test aggregate
among each front's candidates at or under that size.
3. ablation:  the joint's best plan within the budget (chosen on dev) applied to the merge
              baseline's weights, to tell what the plan brings from what the joint's weights bring.

    python -m benchmarks.bench_joint             # SmolLM2-135M experts (about 30 min per run on 2 cores)
    python -m benchmarks.bench_joint --quick     # tiny models, a minute or two
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"
WORK = ROOT / "benchmarks" / ".work" / "joint"


def evofuse(*args: str) -> str:
    proc = subprocess.run([sys.executable, "-m", "search.cli", *args], capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"evofuse {' '.join(args)} failed:\n{proc.stderr[-3000:]}")
    return proc.stdout


def search_or_resume(config: Path, run_dir: Path) -> bool:
    """Start the run, or (with --keep) resume it / reuse it when it already finished; True if reused."""
    if (run_dir / "config.yaml").is_file():
        finished = json.loads((run_dir / "state.json").read_text()).get("status") == "finished"
        evofuse("resume", str(run_dir), "--quiet")
        return finished
    evofuse("search", str(config), "--run-dir", str(run_dir), "--quiet")
    return False


class Timings(dict):
    """Wall time per run; a run reused from an earlier invocation counts its logbook's generations."""

    def run(self, label: str, config: Path, run_dir: Path) -> None:
        from search.run.store import RunStore

        start = time.time()
        reused = search_or_resume(config, run_dir)
        logged = sum(row["wall_s"] for row in RunStore(run_dir).read_logbook())
        self[f"{label}_s"] = round(logged if reused else time.time() - start, 1)


def write_config(raw: dict, name: str) -> Path:
    path = WORK / f"{name}.yaml"
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    return path


def front_points(run_dir: Path) -> list[dict]:
    """Pareto members with dev and test aggregates and parameter counts."""
    from search.run.store import RunStore

    store = RunStore(run_dir)
    journal = {(e["id"], e["split"]): e for e in store.read_journal()}
    points = []
    for member in store.read_state()["hall_of_fame"]:
        test = journal.get((member["id"], "test"))
        points.append({"id": member["id"], "params": member["params"], "dev": member["score"], "test": test["score"] if test else None,
                       "plan": member.get("plan") or []})
    return sorted(points, key=lambda p: p["params"])


def best_under(points: list[dict], limit: float, split: str) -> dict | None:
    feasible = [p for p in points if p["params"] <= limit and p[split] is not None]
    return max(feasible, key=lambda p: p[split]) if feasible else None


def pinned_space(space: dict, plan: list[dict]) -> dict:
    """The search space narrowed to exactly `plan` (each range a single value)."""
    pinned = {**space, "depth": ["none"], "width": ["none"], "ttm": ["none"]}
    for step in plan:
        if step["op"] in ("remove_blocks", "fuse_blocks"):
            pinned.update(depth=[step["op"]], block_count={"low": step["count"], "high": step["count"]}, importance=[step["importance"]])
        elif step["op"] == "prune_width":
            pinned.update(width=["prune_width"], width_ratio={"low": step["ratio"], "high": step["ratio"]}, width_target=[step["target"]],
                          criterion=[step["criterion"]], reconstruct=[step["reconstruct"]])
        else:
            raise SystemExit(f"pinned_space: no pinning for op {step['op']!r}")
    return pinned


def explicit(plan: list[dict]) -> bool:
    """A plan compiled from structure genes (explicit blocks, per-layer ratios): no search-space
    ranges pin it, so the ablation (which re-runs the space pinned to the plan) does not apply."""
    return any("blocks" in step or isinstance(step.get("ratio"), dict) for step in plan)


def dominated(points: list[dict], by: list[dict], limit: float, split: str) -> list[dict]:
    """The members of `points` within `limit` that some member of `by` dominates: no larger and
    no worse on `split` (strictly better in one of the two)."""
    def beats(q: dict, p: dict) -> bool:
        return q["params"] <= p["params"] and q[split] >= p[split] and (q["params"], q[split]) != (p["params"], p[split])

    within = [p for p in points if p["params"] <= limit and p[split] is not None]
    return [p for p in within if any(q[split] is not None and beats(q, p) for q in by)]


def run(quick: bool) -> dict:
    WORK.mkdir(parents=True, exist_ok=True)
    joint_raw = yaml.safe_load((ROOT / "configs" / ("tiny-joint.yaml" if quick else "joint-demo.yaml")).read_text())
    joint_raw["name"] = "bench-joint"
    generations = joint_raw["evolver"]["generations"]
    population = len(joint_raw["parents"]["experts"]) + int(joint_raw["evolver"].get("include_base", False))
    per_generation = population * joint_raw["evolver"].get("offspring_per_member", 1)
    budget = generations * per_generation  # candidates the joint search judges (a stopped one counts)
    timings = Timings()
    joint_dir = WORK / "joint"
    timings.run("joint", write_config(joint_raw, "joint"), joint_dir)

    # The baselines judge candidates as the joint does (the same fitness stages); what only a
    # joint run has stays with it: shared recipes (λ plans of one recipe) and the KL proxy in
    # the merge half (a merge candidate has no plan to measure against its dense weights).
    fitness = joint_raw.get("fitness")
    merge_raw = {k: v for k, v in joint_raw.items() if k not in ("compress", "fitness")}
    merge_raw.update(name="bench-merge", mode="merge", export_top=1)
    merge_raw["evolver"] = {k: v for k, v in joint_raw["evolver"].items() if k != "share_recipe"}
    merge_raw["evolver"]["generations"] = max(1, generations // 2)
    if fitness:
        merge_raw["fitness"] = {k: v for k, v in fitness.items() if k != "proxy"}
    merge_dir = WORK / "merge"
    timings.run("merge", write_config(merge_raw, "merge"), merge_dir)
    merged = next((merge_dir / "exports").glob("*/config.json")).parent

    space = joint_raw["compress"]["space"]
    remaining = max(1, budget - merge_raw["evolver"]["generations"] * per_generation)
    baselines = {
        "merge+ShortGPT": {**space, "depth": ["remove_blocks"], "width": ["none"], "importance": ["block_influence"]},
        "merge+width": {**space, "depth": ["none"], "width": ["prune_width"]},
    }

    def compress_merged(label: str, compress_space: dict, candidates: int, generations: int) -> list[dict]:
        raw = {
            "name": f"bench-{label.replace('+', '-')}",
            "seed": joint_raw["seed"],
            "mode": "compress",
            "parents": {"base": {"name": "merged", "source": str(merged)}},
            "tasks": joint_raw["tasks"],
            "evolver": {"generations": generations},
            "compress": {"sampler": "nsga2", "candidates": candidates, "space": compress_space,
                         "max_params": joint_raw["compress"].get("max_params")},  # the same size budget
            "workers": joint_raw["workers"],
            "export_top": 0,
            **({"fitness": fitness} if fitness else {}),
        }
        run_dir = WORK / label.replace("+", "-")
        timings.run(label, write_config(raw, label.replace("+", "-")), run_dir)
        return front_points(run_dir)

    fronts = {"joint": front_points(joint_dir)}
    for label, baseline_space in baselines.items():
        fronts[label] = compress_merged(label, baseline_space, max(1, remaining // 2), 2)

    from search.run.store import RunStore

    dense = RunStore(joint_dir).read_state()["dense_params"]
    limit = 0.75 * dense
    joint_best = best_under(fronts["joint"], limit, "dev")
    ablation = None
    if joint_best and not explicit(joint_best["plan"]):
        plan_on_merged = compress_merged("merge+joint-plan", pinned_space(space, joint_best["plan"]), 1, 1)
        ablation = {"plan": joint_best["plan"], "joint_weights": joint_best,
                    "merged_weights": next(p for p in plan_on_merged if p["plan"])}
    comparison = {name: {split: best_under(points, limit, split) for split in ("dev", "test")} for name, points in fronts.items()}
    domination = {
        name: {split: {"dominated": len(dominated(fronts[name], fronts["joint"], limit, split)),
                       "within_budget": len([p for p in fronts[name] if p["params"] <= limit])} for split in ("dev", "test")}
        for name in baselines
    }
    (joint_dir / "report").mkdir(exist_ok=True)
    baseline_marks = [{"label": name, "params": p["params"], "score": p["dev"]} for name in baselines for p in fronts[name]]
    (joint_dir / "report" / "baselines.json").write_text(json.dumps(baseline_marks, indent=1))
    evofuse("report", str(joint_dir))
    return {"quick": quick, "dense_params": dense, "limit_params": limit, "evaluation_budget": budget,
            "fronts": fronts, "at_75_percent": comparison, "joint_dominates": domination,
            "ablation": ablation, "timings_s": dict(timings)}


def to_markdown(result: dict) -> str:
    lines = [
        f"# Joint search vs single-method baselines ({'quick, tiny models' if result['quick'] else 'SmolLM2-135M experts'})",
        "",
        f"Dense model: {result['dense_params']:,} parameters; comparison at <= {result['limit_params']:,.0f} (25% fewer).",
        f"Evaluation budget per approach: {result['evaluation_budget']} candidates. Wall times: {result['timings_s']}.",
        "",
        "| approach | best dev score <= 75% size | its params | its id (g<generation - 1>-…) | best test score <= 75% size | its params |",
        "|---|---|---|---|---|---|",
    ]
    for name, row in result["at_75_percent"].items():
        dev, test = row["dev"], row["test"]
        lines.append(
            f"| {name} | {dev['dev']:.4f} | {dev['params']:,} | {dev['id']} | {test['test']:.4f} | {test['params']:,} |"
            if dev and test else f"| {name} | - | - | - | - | - |"
        )
    lines += ["", "Baseline front members within the budget that the joint front dominates (no larger, no worse, not equal):", ""]
    for name, row in result.get("joint_dominates", {}).items():
        lines.append(f"- {name}: dev {row['dev']['dominated']} of {row['dev']['within_budget']}, "
                     f"test {row['test']['dominated']} of {row['test']['within_budget']}")
    ablation = result.get("ablation")
    if ablation:
        joint, merged = ablation["joint_weights"], ablation["merged_weights"]
        lines += ["", f"Ablation: the joint's best plan within the budget (chosen on dev), {ablation['plan']}, on the joint's "
                  f"weights: dev {joint['dev']:.4f} / test {joint['test']:.4f}; on the merge baseline's weights: "
                  f"dev {merged['dev']:.4f} / test {merged['test']:.4f} ({merged['params']:,} params)."]
    lines += ["", "Pareto fronts (params, dev, test):", ""]
    for name, points in result["fronts"].items():
        shown = ", ".join(f"({p['params']:,}, {p['dev']:.3f}, {p['test'] if p['test'] is None else round(p['test'], 3)})" for p in points)
        lines.append(f"- {name}: {shown}")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--keep", action="store_true", help="resume / reuse the runs of an earlier invocation")
    args = parser.parse_args()
    if WORK.exists() and not args.keep:
        import shutil

        shutil.rmtree(WORK)
    name = "joint_quick" if args.quick else "joint"
    result = run(args.quick)
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / f"{name}.json").write_text(json.dumps(result, indent=1))
    text = to_markdown(result)
    (RESULTS / f"{name}.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
