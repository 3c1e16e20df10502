"""Where a joint candidate's cost goes: making it (the plan) against judging it (issue 14).

Staged fitness saves the scoring a stopped candidate does not get; it cannot save what every
candidate pays before its first stage. In a joint run that is the plan: block importance on
the calibration windows, pruning, and LIAR reconstruction, all on the candidate's own merged
weights. This measures, on one SmolLM2-135M demo expert (single thread, fp32), for the three
kinds of plan the joint demo's anchors use (depth, width, both at the 75% budget):

- `plan s`: applying the plan (`compression.plan.apply_plan`, the joint demo's calibration:
  32 windows of 128 tokens of pydoc:train);
- `kl s`: the `kl` proxy stage (8 windows of 128 tokens), and once per recipe `kl ref s`, the
  dense reference's log-probs;
- `dev s`: the joint demo's full dev scoring (three tasks).

Then the best a KL-first stage can do: judged per hour against full scoring if every candidate
stopped after the proxy, (plan + dev) / (plan + kl + ref).

    python -m benchmarks.joint_stage_costs   # ~3 min on 2 idle cores
"""
from __future__ import annotations

import copy
import json
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"
sys.path.insert(0, str(ROOT))

from compression.plan import apply_plan, parse_plan  # noqa: E402
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


def timed(fn):
    start = time.perf_counter()
    out = fn()
    return out, round(time.perf_counter() - start, 2)


def main() -> None:
    torch.set_num_threads(1)
    config = load_config(ROOT / "configs" / "joint-demo.yaml")
    expert = resolve_parents(config, quiet=True)[config.parents.experts[0].name]
    model, tokenizer = load_model(expert, dtype=torch.float32, device=torch.device("cpu"))
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
            pruned, plan_s = timed(lambda: apply_plan(copy.deepcopy(model), parse_plan(plan), calibration).eval())
            _, kl_s = timed(lambda: kl.evaluate(pruned, reference=reference))
            _, dev_s = timed(lambda: [task.evaluate(pruned) for task in tasks.values()])
            rows.append({"plan": name, "plan_s": plan_s, "kl_s": kl_s, "kl_ref_s": ref_s, "dev_s": dev_s,
                         "bound": round((plan_s + dev_s) / (plan_s + kl_s + ref_s), 2)})
            print(rows[-1], flush=True)
    lines = ["| plan | plan s | kl s | kl ref s (per recipe) | dev s | judged/h bound (all stop at KL) |", "|---|---|---|---|---|---|"]
    lines += [f"| {r['plan']} | {r['plan_s']} | {r['kl_s']} | {r['kl_ref_s']} | {r['dev_s']} | {r['bound']}x |" for r in rows]
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "joint_stage_costs.json").write_text(json.dumps(rows, indent=1))
    text = ("# Joint candidate: making it vs judging it (one thread, fp32, SmolLM2-135M demo expert)\n\n"
            + "\n".join(lines) + "\n")
    (RESULTS / "joint_stage_costs.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
