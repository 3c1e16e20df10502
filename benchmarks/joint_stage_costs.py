"""Where a joint candidate's cost goes: making it (the plan) against judging it (issue 14).

Staged fitness saves the scoring a stopped candidate does not get; it cannot save what every
candidate pays before its first stage. In a joint run that is the plan: block importance on
the calibration windows, pruning, and LIAR reconstruction, all on the candidate's own merged
weights. This measures, on one SmolLM2-135M demo expert (single thread, fp32), for the three
kinds of plan the joint demo's anchors use (depth, width, both at the 75% budget):

- `plan s`: applying the plan (`compression.plan.apply_plan`, the joint demo's calibration:
  32 windows of 128 tokens of pydoc:train) to a copy sharing the expert's weights, as an actor
  does (`compression.plan.copy_sharing_weights`);
- `kl s`: the `kl` proxy stage (8 windows of 128 tokens), and once per recipe `kl ref s`, the
  dense reference's log-probs;
- `dev s`: the joint demo's full dev scoring (three tasks).

Then the best a KL-first stage can do: judged per hour against full scoring if every candidate
stopped after the proxy, (plan + dev) / (plan + kl + ref).

Second table: the same budgets as structure genes (`compress.space.genes`, the plans compiled
to explicit blocks and per-layer levels, so no candidate ranks blocks) with λ offspring sharing
one Evolver recipe (`evolver.share_recipe`): per recipe, the KL reference and one pass of width
statistics over every layer (`collect_width_stats(..., every_layer=True)`, what an actor caches);
per candidate, the plan from those statistics (`plan s`) and the KL stage. A full-scoring run
pays `own plan s` (the step's own statistics pass) + dev per candidate; the bound for λ is
(own plan + dev) / ((ref + stats) / λ + plan + kl), again if every candidate stopped at KL.

    python -m benchmarks.joint_stage_costs   # ~5 min on 2 idle cores
    python -m benchmarks.joint_stage_costs --device cuda --dtype bfloat16 --base --suffix _h200
        # on a GPU machine; --base: the base model stands in for the expert (no fine-tuning there;
        # the costs, not the scores, are what this measures)
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"
sys.path.insert(0, str(ROOT))

from compression.genes import KEEP, Budget, Genes, WidthGrid, compile_plan, from_ranking, uniform_levels  # noqa: E402
from compression.importance import importance_fn  # noqa: E402
from compression.plan import apply_plan, copy_sharing_weights, parse_plan  # noqa: E402
from compression.width import apply_plan_from_stats, collect_width_stats  # noqa: E402
from search.config import load_config  # noqa: E402
from search.fitness import TaskSpec, build_task  # noqa: E402
from search.models.datasets import calibration_windows  # noqa: E402
from search.models.experts import resolve_parents  # noqa: E402
from search.models.sources import load_model  # noqa: E402

PLANS = {  # the joint demo's anchors at the 75% budget (benchmarks/results/joint.md)
    "depth: 10 blocks out (Block Influence)": [{"op": "remove_blocks", "count": 10, "importance": "block_influence"}],
    "width: 0.32 (LIAR)": [{"op": "prune_width", "ratio": 0.317, "criterion": "second_moment", "reconstruct": "liar",
                            "target": "both"}],
    "both: 5 blocks + width 0.18 (LIAR)": [
        {"op": "remove_blocks", "count": 5, "importance": "block_influence"},
        {"op": "prune_width", "ratio": 0.18, "criterion": "second_moment", "reconstruct": "liar", "target": "both"}],
}


GRID = WidthGrid()  # 1/16 steps of FFN + attention, up to 8/16
SHARED = (4, 8)  # λ: offspring sharing a recipe


def gene_plans(model, calibration) -> dict[str, list[dict]]:
    """The anchors' budgets as compiled gene sets: blocks by Block Influence on the dense model
    (scored once per run), width levels spread evenly (the first generation's genes)."""
    scores = importance_fn("block_influence")(model, calibration.take(4))
    n = len(scores)

    def genes(blocks_out: int, width_units: int) -> list[dict]:
        if blocks_out:
            out = from_ranking(scores, Budget(blocks_out, width_units))
            return compile_plan(out, GRID)
        return compile_plan(Genes((KEEP,) * n, tuple(uniform_levels(list(range(n)), n, width_units))), GRID)

    return {"depth: 10 blocks out": genes(10, 0), "width: level 5 of 16 everywhere (LIAR)": genes(0, 5 * n),
            "both: 5 blocks + level 3 (LIAR)": genes(5, 3 * (n - 5))}


def shared_recipe_rows(model, calibration, kl, reference, ref_s, tasks) -> list[dict]:
    rows = []
    for name, raw in gene_plans(model, calibration).items():
        steps = parse_plan(raw)
        _, own_s = timed(lambda: apply_plan(copy_sharing_weights(model), steps, calibration))
        width = steps[0] if steps[0].op == "prune_width" else None
        grams, stats_s = timed(lambda: collect_width_stats(model, width, calibration, every_layer=True)) if width else ({}, 0.0)

        def from_stats():
            if width is None:
                return apply_plan(copy_sharing_weights(model), steps, calibration).eval()
            return apply_plan_from_stats(copy_sharing_weights(model), steps, grams, calibration).eval()

        pruned, plan_s = timed(from_stats)
        _, kl_s = timed(lambda: kl.evaluate(pruned, reference=reference))
        _, dev_s = timed(lambda: [task.evaluate(pruned) for task in tasks.values()])
        row = {"plan": name, "own_plan_s": own_s, "stats_s": stats_s, "kl_ref_s": ref_s, "plan_s": plan_s,
               "kl_s": kl_s, "dev_s": dev_s}
        for lam in SHARED:
            row[f"bound_{lam}"] = round((own_s + dev_s) / ((ref_s + stats_s) / lam + plan_s + kl_s), 2)
        rows.append(row)
        print(row, flush=True)
    return rows


def timed(fn):
    start = time.perf_counter()
    out = fn()
    if torch.cuda.is_available():
        torch.cuda.synchronize()  # a GPU step counts when its kernels are done, not when they are queued
    return out, round(time.perf_counter() - start, 2)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--base", action="store_true", help="measure on the base model instead of the first demo expert")
    p.add_argument("--suffix", default="", help="appended to the results' name")
    return p.parse_args(argv)


def where(a) -> str:
    device = f"cuda ({torch.cuda.get_device_name(0)})" if a.device.startswith("cuda") else f"CPU, {a.threads} thread(s)"
    return f"{device}, {a.dtype}, SmolLM2-135M {'base model' if a.base else 'demo expert'}"


def main(argv=None) -> None:
    a = parse_args(argv)
    torch.set_num_threads(a.threads)
    config = load_config(ROOT / "configs" / "joint-demo.yaml")
    source = config.parents.base.source if a.base else resolve_parents(config, quiet=True)[config.parents.experts[0].name]
    model, tokenizer = load_model(source, dtype=getattr(torch, a.dtype), device=torch.device(a.device))
    c = config.compress.space.calibration
    calibration = calibration_windows(tokenizer, c.data, c.seq_len, c.num_sequences)
    proxy = config.fitness.proxy
    kl = build_task(TaskSpec(kind="kl", data=proxy.data, name="kl", options=proxy.options or {}), tokenizer)
    tasks = {t.name: build_task(TaskSpec(kind=t.kind, data=t.dev, name=t.name, options=t.options or {}), tokenizer)
             for t in config.tasks}
    with torch.no_grad():
        reference, ref_s = timed(lambda: kl.reference(model))
        rows = []
        for name, plan in PLANS.items():
            pruned, plan_s = timed(lambda: apply_plan(copy_sharing_weights(model), parse_plan(plan), calibration).eval())
            _, kl_s = timed(lambda: kl.evaluate(pruned, reference=reference))
            _, dev_s = timed(lambda: [task.evaluate(pruned) for task in tasks.values()])
            rows.append({"plan": name, "plan_s": plan_s, "kl_s": kl_s, "kl_ref_s": ref_s, "dev_s": dev_s,
                         "bound": round((plan_s + dev_s) / (plan_s + kl_s + ref_s), 2)})
            print(rows[-1], flush=True)
        shared = shared_recipe_rows(model, calibration, kl, reference, ref_s, tasks)
    lines = ["| plan | plan s | kl s | kl ref s (per recipe) | dev s | judged/h bound (all stop at KL) |", "|---|---|---|---|---|---|"]
    lines += [f"| {r['plan']} | {r['plan_s']} | {r['kl_s']} | {r['kl_ref_s']} | {r['dev_s']} | {r['bound']}x |" for r in rows]
    lines += ["", "Structure genes, λ offspring sharing one recipe (per recipe: kl ref, stats; per candidate: plan, kl):", "",
              "| plan | own plan s (full run) | stats s (per recipe) | kl ref s (per recipe) | plan s (from stats) | kl s | dev s | "
              + " | ".join(f"bound, λ = {lam}" for lam in SHARED) + " |",
              "|---|---|---|---|---|---|---|" + "---|" * len(SHARED)]
    lines += [f"| {r['plan']} | {r['own_plan_s']} | {r['stats_s']} | {r['kl_ref_s']} | {r['plan_s']} | {r['kl_s']} | "
              f"{r['dev_s']} | " + " | ".join(f"{r[f'bound_{lam}']}x" for lam in SHARED) + " |" for r in shared]
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / f"joint_stage_costs{a.suffix}.json").write_text(
        json.dumps({"where": where(a), "ranked": rows, "shared_recipe": shared}, indent=1))
    text = (f"# Joint candidate: making it vs judging it ({where(a)})\n\n"
            + "\n".join(lines) + "\n")
    (RESULTS / f"joint_stage_costs{a.suffix}.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
