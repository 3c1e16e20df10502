"""How many calibration windows a LIAR rebuild needs (issue 14: the joint demo's 15 minutes).

In the joint demo every sibling that goes on, every audit and every front member scored on its
test split is rebuilt with LIAR reconstruction, and the rebuild's statistics pass over the
calibration windows (32 x 128 tokens of pydoc:train) is most of its cost: ~24 s of ~30 s on one
core (`benchmarks/results/joint_stage_costs.md`). The pass is linear in the windows, so the
question is only what fewer windows cost in quality.

For the joint demo's two width anchors as structure genes (`joint_stage_costs.gene_plans`: width
level 5 of 16 everywhere; 5 blocks out + level 3), on the first demo expert, float32, one thread,
each plan is rebuilt from the statistics of N windows, for N in `--sizes`, and of a second,
disjoint draw of windows of the same count (windows 64.. of the stream; the first draw is the
stream's first N, what `compress.space.calibration` takes). The draw-to-draw difference at a size
is the noise a choice of windows brings; a smaller N is as good as 32 when its loss against 32
is within that noise. Measured per rebuild:

- `kl_heldout`: mean KL of the rebuilt model's next-token distribution from the dense expert's on
  32 x 128 tokens of pydoc:dev, which no calibration draw sees (lower is a closer rebuild);
- `dev`: the joint demo's dev aggregate (the search's objective) and its tasks;
- `stats_s`, `plan_s`: the statistics pass and the plan applied from them.

The plan without reconstruction (units cut, nothing folded back) is the floor LIAR lifts from.
With `--ridges`, each plan is also rebuilt at those relative ridges (the least squares'
λ = ridge · mean diag G; the step's default is 1e-2) from `--ridge-sizes` windows: a few
thousand correlated tokens make a 1,536-wide MLP input's Gram matrix poorly conditioned (with 8
windows, 1,024 tokens, rank-deficient), and the ridge keeps the fold from fitting their noise.

    python -m benchmarks.calibration_size            # ~15 min on one idle core
    python -m benchmarks.calibration_size --sizes --draws --ridges 0.1 0.3 1.0 --plans width --suffix _ridge
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"
sys.path.insert(0, str(ROOT))

from benchmarks.joint_stage_costs import gene_plans, timed  # noqa: E402
from compression.calibration import CalibrationData  # noqa: E402
from compression.plan import apply_plan, copy_sharing_weights, parse_plan  # noqa: E402
from compression.width import apply_plan_from_stats, collect_width_stats  # noqa: E402
from search.config import load_config  # noqa: E402
from search.fitness import TaskSpec, aggregate, build_task  # noqa: E402
from search.models.datasets import calibration_windows  # noqa: E402
from search.models.experts import resolve_parents  # noqa: E402
from search.models.sources import load_model  # noqa: E402

SECOND_DRAW = 64  # the second draw's first window: disjoint from the first draw's for N <= 64


def windows(stream: CalibrationData, first: int, count: int) -> CalibrationData:
    return CalibrationData(stream.input_ids[first:first + count])


def width_step_with(plan: list[dict], **changes) -> list[dict]:
    return [dict(step, **changes) if step["op"] == "prune_width" else step for step in plan]


def judge(model, heldout, reference, tasks, weights) -> dict:
    """The rebuilt model's held-out KL from its dense weights and its dev scores."""
    kl = heldout.evaluate(model, reference=reference)["kl"]
    scores = {name: task.evaluate(model)["score"] for name, task in tasks.items()}
    return {"kl_heldout": round(kl, 5), "dev": round(aggregate(scores, weights), 4),
            **{f"dev_{name}": round(score, 4) for name, score in scores.items()}}


def rebuild(model, steps, calibration) -> tuple[torch.nn.Module, float, float]:
    """The plan from one statistics pass over `calibration` (what an actor's rebuild does)."""
    width = steps[0]
    grams, stats_s = timed(lambda: collect_width_stats(model, width, calibration, every_layer=True))
    pruned, plan_s = timed(lambda: apply_plan_from_stats(copy_sharing_weights(model), steps, grams, calibration).eval())
    return pruned, stats_s, plan_s


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sizes", type=int, nargs="*", default=[8, 16, 32, 64])
    p.add_argument("--draws", type=int, nargs="*", default=[16, 32], help="sizes also rebuilt from the second draw")
    p.add_argument("--ridges", type=float, nargs="*", default=[],
                   help="also rebuild at these relative ridges (the step's default: 1e-2), from the first draw")
    p.add_argument("--ridge-sizes", type=int, nargs="+", default=[16, 32], help="the window counts --ridges runs at")
    p.add_argument("--plans", nargs="*", help="only the plans whose name starts with one of these")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--suffix", default="")
    return p.parse_args(argv)


def table(rows: list[dict], tasks) -> list[str]:
    head = ["plan", "windows", "draw", "ridge", "kl held-out", "dev", *[f"dev {t}" for t in tasks], "stats s", "plan s"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        cells = [r["plan"], r["windows"], r["draw"], r.get("ridge", "–"), r["kl_heldout"], r["dev"], *[r[f"dev_{t}"] for t in tasks],
                 r.get("stats_s", "–"), r.get("plan_s", "–")]
        lines.append("| " + " | ".join(str(c) for c in cells) + " |")
    return lines


def main(argv=None) -> None:
    a = parse_args(argv)
    torch.set_num_threads(a.threads)
    config = load_config(ROOT / "configs" / "joint-demo.yaml")
    source = resolve_parents(config, quiet=True)[config.parents.experts[0].name]
    model, tokenizer = load_model(source, dtype=torch.float32, device=torch.device("cpu"))
    c = config.compress.space.calibration
    stream = calibration_windows(tokenizer, c.data, c.seq_len)
    if stream.num_sequences < SECOND_DRAW + max(a.draws, default=0) or stream.num_sequences < max(a.sizes + a.ridge_sizes):
        raise SystemExit(f"{c.data}: {stream.num_sequences} windows, too few for these sizes and draws")
    proxy = config.fitness.proxy.options or {}
    heldout = build_task(TaskSpec(kind="kl", data="pydoc:dev", name="kl_heldout",
                                  options={"seq_len": 128, "num_sequences": 32, "top_k": proxy.get("top_k", 256)}), tokenizer)
    tasks = {t.name: build_task(TaskSpec(kind=t.kind, data=t.dev, name=t.name, options=t.options or {}), tokenizer)
             for t in config.tasks}
    weights = {t.name: t.weight for t in config.tasks}
    rows = []
    with torch.no_grad():
        reference = heldout.reference(model)
        dense = {"plan": "dense expert", "windows": "–", "draw": "–", **judge(model, heldout, reference, tasks, weights)}
        rows.append(dense)
        print(dense, flush=True)
        plans = {name: raw for name, raw in gene_plans(model, windows(stream, 0, c.num_sequences)).items() if "LIAR" in name}
        if a.plans:
            plans = {name: raw for name, raw in plans.items() if any(name.startswith(prefix) for prefix in a.plans)}
        for name, raw in plans.items():
            units_from = windows(stream, 0, c.num_sequences)  # the criterion still ranks units on calibration
            pruned = apply_plan(copy_sharing_weights(model), parse_plan(width_step_with(raw, reconstruct="none")), units_from).eval()
            rows.append({"plan": name, "windows": 0, "draw": "no reconstruction", **judge(pruned, heldout, reference, tasks, weights)})
            print(rows[-1], flush=True)
            default_ridge = parse_plan(raw)[0].ridge
            runs = ([(n, "first", 0, default_ridge) for n in a.sizes] + [(n, "second", SECOND_DRAW, default_ridge) for n in a.draws]
                    + [(n, "first", 0, r) for r in a.ridges for n in a.ridge_sizes])
            for n, draw, first, ridge in runs:
                pruned, stats_s, plan_s = rebuild(model, parse_plan(width_step_with(raw, ridge=ridge)), windows(stream, first, n))
                rows.append({"plan": name, "windows": n, "draw": draw, "ridge": ridge,
                             **judge(pruned, heldout, reference, tasks, weights), "stats_s": stats_s, "plan_s": plan_s})
                print(rows[-1], flush=True)
                del pruned
    where = f"CPU, {a.threads} thread(s), float32, SmolLM2-135M demo expert ({config.parents.experts[0].name})"
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / f"calibration_size{a.suffix}.json").write_text(json.dumps({"where": where, "rows": rows}, indent=1))
    text = f"# LIAR rebuilds from fewer calibration windows ({where})\n\n" + "\n".join(table(rows, tasks)) + "\n"
    (RESULTS / f"calibration_size{a.suffix}.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
