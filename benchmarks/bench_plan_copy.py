"""What a compression plan costs an actor in memory: the copy it is applied to, and the width
step's calibration statistics, before and after.

An actor of a compress or joint run keeps its working model dense (the recipe's weights, for the
KL reference and the siblings that share the recipe) and applies each candidate's plan to a copy.

- The copy: a deep copy holds a second whole model before the plan removes anything; a copy that
  shares the weights (`compression.plan.copy_sharing_weights`) holds only what the plan makes new
  (pruned layers, fused or healed blocks, TT cores).
- The statistics: a width step's input Gram matrices (float64, intermediate² and hidden² per
  layer) were gathered for every layer in one whole-model pass and the layers cut afterwards;
  now they are gathered block by block and each block is cut as soon as its own are complete
  (`compression.reconstruct.collect_grams_by_block`), so one block's are alive at a time. The
  whole-pass way is reproduced here by handing the blocks' statistics over only after the pass.

For the joint demo's three anchor plans at the 75% budget (`joint_stage_costs.PLANS`: depth,
width with LIAR, both) on SmolLM2-135M and on bench_search's random Llama 3x its size, each way
in a fresh process (float32, one thread, the joint demo's calibration of 32 x 128 pydoc:train
tokens):

- `peak over model GiB`: the process's peak resident set while copying and applying the plan,
  over its resident set before (the model and calibration loaded; the peak reset through
  /proc/self/clear_refs; glibc's mmap threshold fixed, so that freed memory leaves the resident
  set: see `run_child`);
- `held GiB`: resident set after, with the compressed model alive, over before;
- `copy s`, `plan s`; and whether every way made the same bytes (sha256 of the compressed state)
  and left the working model's bytes as they were.

    python -m benchmarks.bench_plan_copy            # ~15 min on 2 idle cores
    python -m benchmarks.bench_plan_copy --quick    # SmolLM2-135M, the width plan, before and now (~2 min)
"""
from __future__ import annotations

import argparse
import copy
import gc
import hashlib
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"
sys.path.insert(0, str(ROOT))

from benchmarks.bench_search import THREE_X, random_llama_shapes, random_llama_tensor  # noqa: E402
from benchmarks.joint_stage_costs import PLANS  # noqa: E402
from compression.plan import apply_plan, copy_sharing_weights, parse_plan  # noqa: E402
from search.models.memory import release_freed_heap, resident_memory  # noqa: E402

COPIES = {"deep copy": copy.deepcopy, "shared weights": copy_sharing_weights}
STATS = ("whole pass", "block by block")
WAYS = {f"{c}, {s}": (c, s) for c in COPIES for s in STATS}  # the first is before, the last now
GIB = 2**30


def whole_pass_grams(model, batches, modules, consume=None):
    """The statistics as gathered before: every layer's in one whole-model pass, then the
    blocks cut one after another while all of them stay alive (`prune_with_stats` over the
    returned dict, as `prune_width` did)."""
    from compression.reconstruct import collect_input_grams, owning_blocks

    stats = collect_input_grams(model, batches, modules)
    if consume is None:
        return stats
    owner = owning_blocks(model, modules)
    for i in range(max(owner.values(), default=-1) + 1):
        consume(i, {name: acc for name, acc in stats.items() if owner[name] == i})
    return {}  # `stats` lived until every block was cut


def load(model_name: str):
    """(model, tokenizer): SmolLM2-135M from its cached safetensors, or the random 3x Llama."""
    from transformers import AutoModelForCausalLM

    from search.models.sources import load_model, resolve_source

    template = resolve_source("smollm2-135m")
    model, tokenizer = load_model(str(template), dtype=torch.float32, device=torch.device("cpu"))
    if model_name == "3x":
        del model
        config, shapes = random_llama_shapes(template, THREE_X)
        model = AutoModelForCausalLM.from_config(config).eval()
        gen = torch.Generator().manual_seed(0)
        with torch.no_grad():
            for name, tensor in sorted(model.state_dict().items()):
                if name in shapes:
                    tensor.copy_(random_llama_tensor(name, shapes[name], config, gen))
    return model, tokenizer


def state_digest(model: torch.nn.Module) -> str:
    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().contiguous().view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()[:16]


def measure(model_name: str, plan_name: str, way: str) -> dict:
    """One (model, plan, way) in this process: see the module docstring."""
    from search.models.datasets import calibration_windows

    import compression.width

    copy_way, stats_way = WAYS[way]
    if stats_way == "whole pass":
        compression.width.collect_grams_by_block = whole_pass_grams
    torch.set_num_threads(1)
    model, tokenizer = load(model_name)
    calibration = calibration_windows(tokenizer, "pydoc:train", 128, 32)
    working_before = state_digest(model)
    gc.collect()
    release_freed_heap()
    Path("/proc/self/clear_refs").write_text("5")  # the peak from here on
    before = resident_memory()
    start = time.perf_counter()
    copied = COPIES[copy_way](model)
    copied_at = time.perf_counter()
    compressed = apply_plan(copied, parse_plan(PLANS[plan_name]), calibration).eval()
    done = time.perf_counter()
    after = resident_memory()
    return {
        "model": model_name, "plan": plan_name, "way": way,
        "model_gib": round(sum(t.numel() * t.element_size() for t in model.parameters()) / GIB, 3),
        "peak_over_gib": round((after["peak"] - before["rss"]) / GIB, 3),
        "held_gib": round((after["rss"] - before["rss"]) / GIB, 3),
        "copy_s": round(copied_at - start, 3), "plan_s": round(done - copied_at, 2),
        "compressed": state_digest(compressed), "working_unchanged": state_digest(model) == working_before,
    }


def run_child(*args: str, module: str = "benchmarks.bench_plan_copy") -> dict:
    """One way (`module --child *args`) in a fresh process. glibc's mmap threshold is fixed (as in
    `bench_width --memory`): every allocation of 128 KiB or more is its own mapping, returned to
    the kernel when freed, so the resident set is what is alive, not what the allocator kept of
    earlier frees (otherwise the same way's peak moves by a few hundred MiB with the order of
    allocations)."""
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": str(128 * 1024)}
    out = subprocess.run([sys.executable, "-m", module, "--child", *args],
                         cwd=ROOT, capture_output=True, text=True, check=True, env=env)
    return json.loads(out.stdout.strip().splitlines()[-1])


def table(rows: list[dict]) -> str:
    lines = ["| model | plan | way | peak over model GiB | held GiB | copy s | plan s | same bytes | working model unchanged |",
             "|---|---|---|---|---|---|---|---|---|"]
    for row in rows:
        twin = next(r for r in rows if r["model"] == row["model"] and r["plan"] == row["plan"])
        lines.append(f"| {row['model']} ({row['model_gib']} GiB) | {row['plan']} | {row['way']} | {row['peak_over_gib']} | "
                     f"{row['held_gib']} | {row['copy_s']} | {row['plan_s']} | {row['compressed'] == twin['compressed']} | "
                     f"{row['working_unchanged']} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="SmolLM2-135M, the depth plan")
    parser.add_argument("--child", nargs=3, metavar=("MODEL", "PLAN", "WAY"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(measure(*args.child)))
        return
    models = ["smollm2-135m"] if args.quick else ["smollm2-135m", "3x"]
    plans = [name for name in PLANS if name.startswith("width")] if args.quick else list(PLANS)
    rows = []
    for model_name in models:
        for plan_name in plans:
            ways = list(WAYS) if "width" in plan_name and not args.quick else [next(iter(WAYS)), list(WAYS)[-1]]
            if plan_name.startswith("depth"):  # no width step: the statistics do not enter
                ways = [w for w in WAYS if WAYS[w][1] == "block by block"]
            for way in ways:
                rows.append(run_child(model_name, plan_name, way))
                print(json.dumps(rows[-1]), flush=True)
    name = "plan_copy_quick" if args.quick else "plan_copy"
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / f"{name}.json").write_text(json.dumps(rows, indent=1) + "\n")
    text = (f"# A plan's memory: its copy of the working model and its width statistics (one thread, float32)\n\n{table(rows)}\n\n"
            f"Measured {time.strftime('%Y-%m-%d %H:%M')}, {os.cpu_count()} cores; each way in a fresh process with glibc's "
            "mmap threshold fixed at 128 KiB (freed memory leaves the resident set; the plan times are slower than a "
            "plain run's). "
            f"Command: `python -m benchmarks.bench_plan_copy{' --quick' if args.quick else ''}`.\n")
    (RESULTS / f"{name}.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
