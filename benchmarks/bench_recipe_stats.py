"""What a shared recipe's width statistics cost an actor, before and after.

With `evolver.share_recipe` (the joint demo) an actor judges a recipe's siblings, which differ in
their plans, on the same dense weights, so a width step's calibration statistics can be gathered
once per recipe and kept for the siblings (`search.run.workers.Evaluator._recipe_width_stats`).
Before, the cache held every targeted layer's whole Gram matrices, float64 hidden² +
intermediate² per layer, in both of its uses:

- screening (the KL stage's width steps without reconstruction, their units ranked by
  `second_moment`): now only each unit's diagonal block is kept (`compression.width.
  collect_unit_grams`), all that `wanda` and `second_moment` read;
- rebuilding (the step with its LIAR reconstruction, for the siblings that go on): the whole
  matrices are now kept only while no larger than the working model; beyond that (SmolLM2-135M
  already: 0.60 GiB against 0.50) each rebuilt plan gathers its own, block by block.

For SmolLM2-135M and bench_search's random Llama 3x its size, each way in a fresh process (float32,
one thread, glibc's mmap threshold fixed: `bench_plan_copy.run_child`): the statistics gathered
on the joint demo's windows (the `kl` proxy's 8 x 128 pydoc:train tokens for screening, the
calibration's 32 x 128 for rebuilding), then two of a recipe's plans applied, each to a copy
sharing the working weights (a uniform 0.317 of FFN + attention, and per-layer ratios):

- `held GiB`: resident set after the plans, the statistics still kept (the plans' models freed),
  over the resident set before;
- `peak over model GiB`: the peak while gathering and applying;
- `gather s`, `plans s`; `same bytes`: every way's compressed models are the same (sha256);
  and whether the working model's bytes were left as they were.

The last table gives the sizes for the Llama-2-7B shape (from its config on the meta device).

    python -m benchmarks.bench_recipe_stats            # ~12 min on 2 idle cores
    python -m benchmarks.bench_recipe_stats --quick    # SmolLM2-135M (~3 min)
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"
sys.path.insert(0, str(ROOT))

from benchmarks.bench_plan_copy import load, run_child, state_digest  # noqa: E402
from compression.plan import apply_plan, copy_sharing_weights, parse_plan  # noqa: E402
from compression.width import (apply_plan_from_stats, collect_unit_grams, collect_width_stats,  # noqa: E402
                               width_stats_bytes)
from search.models.memory import release_freed_heap, resident_memory  # noqa: E402

GIB = 2**30
WIDTH = {"op": "prune_width", "criterion": "second_moment", "reconstruct": "liar", "target": "both"}
WINDOWS = {"screen": 8, "rebuild": 32}  # 128-token pydoc:train windows: the kl proxy's, the calibration's
WAYS = {  # (use, what is gathered once; None: each plan its own pass)
    "screen, whole matrices kept (before)": ("screen", "whole"),
    "screen, units' blocks kept (now)": ("screen", "units"),
    "rebuild, whole matrices kept (before)": ("rebuild", "whole"),
    "rebuild, each plan's own pass (now, beyond the model's size)": ("rebuild", None),
}


def recipe_plans(num_layers: int) -> dict[str, dict]:
    """Two siblings' width steps: a uniform ratio, and per-layer ratios as structure genes give."""
    per_layer = {i: (0.15, 0.5, 0.3)[i % 3] for i in range(num_layers) if i % 4}
    return {"uniform 0.317": {**WIDTH, "ratio": 0.317}, "per layer": {**WIDTH, "ratio": per_layer}}


def measure(model_name: str, way: str) -> dict:
    """One (model, way) in this process: see the module docstring."""
    from search.models.datasets import calibration_windows

    use, kept = WAYS[way]
    torch.set_num_threads(1)
    model, tokenizer = load(model_name)
    windows = calibration_windows(tokenizer, "pydoc:train", 128, WINDOWS[use])
    steps = {name: parse_plan([step])[0] for name, step in recipe_plans(model.config.num_hidden_layers).items()}
    if use == "screen":  # the KL stage: units chosen by the criterion, nothing reconstructed
        steps = {name: step.model_copy(update={"reconstruct": "none"}) for name, step in steps.items()}
    first = next(iter(steps.values()))
    working_before = state_digest(model)  # also brings every weight page in before the measurement
    gc.collect()
    release_freed_heap()
    Path("/proc/self/clear_refs").write_text("5")  # the peak from here on
    before = resident_memory()
    start = time.perf_counter()
    stats = None
    if kept == "whole":
        stats = collect_width_stats(model, first, windows, every_layer=True)
    elif kept == "units":
        stats = collect_unit_grams(model, first, windows)
    gathered = time.perf_counter()
    digests = {}
    for name, step in steps.items():
        copied = copy_sharing_weights(model)
        compressed = apply_plan(copied, [step], windows) if stats is None else apply_plan_from_stats(copied, [step], stats, windows)
        digests[name] = state_digest(compressed)
        del copied, compressed
    done = time.perf_counter()
    gc.collect()
    release_freed_heap()
    after = resident_memory()
    return {
        "model": model_name, "way": way,
        "model_gib": round(sum(t.numel() * t.element_size() for t in model.parameters()) / GIB, 3),
        "held_gib": round((after["rss"] - before["rss"]) / GIB, 3),
        "peak_over_gib": round((after["peak"] - before["rss"]) / GIB, 3),
        "gather_s": round(gathered - start, 2), "plans_s": round(done - gathered, 2), "compressed": digests,
        "working_unchanged": state_digest(model) == working_before,
    }


def llama_7b_sizes() -> dict:
    """The cache's sizes for the Llama-2-7B shape, from its config on the meta device."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
                         num_key_value_heads=32, vocab_size=32000)
    with torch.device("meta"):
        model = LlamaForCausalLM(config)
    head_dim = config.hidden_size // config.num_attention_heads
    units = config.num_hidden_layers * (config.intermediate_size + config.num_attention_heads * head_dim**2)
    return {"model_gib_float32": round(sum(p.numel() for p in model.parameters()) * 4 / GIB, 2),
            "whole_gib": round(width_stats_bytes(model, "both") / GIB, 2), "units_gib": round(units * 8 / GIB, 3)}


def table(rows: list[dict]) -> str:
    lines = ["| model | way | held GiB | peak over model GiB | gather s | plans s | same bytes | working model unchanged |",
             "|---|---|---|---|---|---|---|---|"]
    for row in rows:
        use = WAYS[row["way"]][0]
        twin = next(r for r in rows if r["model"] == row["model"] and WAYS[r["way"]][0] == use)
        lines.append(f"| {row['model']} ({row['model_gib']} GiB) | {row['way']} | {row['held_gib']} | {row['peak_over_gib']} | "
                     f"{row['gather_s']} | {row['plans_s']} | {row['compressed'] == twin['compressed']} | {row['working_unchanged']} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="SmolLM2-135M only")
    parser.add_argument("--child", nargs=2, metavar=("MODEL", "WAY"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(measure(*args.child)))
        return
    rows = []
    for model_name in ["smollm2-135m"] if args.quick else ["smollm2-135m", "3x"]:
        for way in WAYS:
            rows.append(run_child(model_name, way, module="benchmarks.bench_recipe_stats"))
            print(json.dumps(rows[-1]), flush=True)
    sizes = llama_7b_sizes()
    name = "recipe_stats_quick" if args.quick else "recipe_stats"
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / f"{name}.json").write_text(json.dumps({"rows": rows, "llama_7b": sizes}, indent=1) + "\n")
    text = (f"# A shared recipe's width statistics: what the actor keeps (one thread, float32)\n\n{table(rows)}\n\n"
            f"The Llama-2-7B shape: the model {sizes['model_gib_float32']} GiB in float32; every layer's whole matrices "
            f"{sizes['whole_gib']} GiB; the units' blocks {sizes['units_gib']} GiB.\n\n"
            f"Measured {time.strftime('%Y-%m-%d %H:%M')}, {os.cpu_count()} cores; each way in a fresh process with glibc's "
            f"mmap threshold fixed at 128 KiB. Command: `python -m benchmarks.bench_recipe_stats{' --quick' if args.quick else ''}`.\n")
    (RESULTS / f"{name}.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
