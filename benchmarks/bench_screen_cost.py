"""What a first stage costs in float32 and in bfloat16 (`fitness.screen_dtype`), one core, side by side.

The demo's first stage (3 of its 32 text pieces, 4 of 64 additions, 4 of 64 comparisons; the run's
first draw) is scored on SmolLM2-135M three ways, each repeated and the fastest job kept:

- `float32`: as a run without a screening dtype scores it;
- `autocast`: under torch autocast to bfloat16 alone, which under inference mode re-casts every
  linear weight at every forward;
- `autocast, weights cast once, tied head per forward`: the linear weights cast once but the
  output head, which SmolLM2 ties to its input embedding, left to autocast (the workers' way
  before the head was untied for the duration);
- `autocast, weights cast once`: what the workers run (`search.run.workers.linear_weights_as`),
  every linear weight, the tied head included, cast once per job.

The last three must give identical per-example scores (checked).

    python -m benchmarks.bench_screen_cost
"""
from __future__ import annotations

import argparse
import contextlib
import json
import platform
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"
sys.path.insert(0, str(ROOT))

from search.config import load_config  # noqa: E402
from search.fitness import TaskSpec, build_task  # noqa: E402
from search.models.sources import load_model, resolve_source  # noqa: E402
from search.run.stages import stage_plan  # noqa: E402
from search.run.workers import linear_weights_as  # noqa: E402


def first_stage(config_path: Path, tokenizer) -> list[tuple[str, object, list[int]]]:
    """(task name, task, item ids) of the config's first stage, its first draw."""
    config = load_config(config_path)
    tasks = {t.name: build_task(TaskSpec(kind=t.kind, data=t.dev, name=t.name, options=t.options or {}), tokenizer)
             for t in config.tasks}
    pools = {name: task.selected(None, 0) for name, task in tasks.items()}
    plan = stage_plan(config, {name: len(pool) for name, pool in pools.items()})
    return [(name, task, [pools[name][i] for i in plan.indices(0)[0][name]]) for name, task in tasks.items()]


def timed_job(model, stage, context, repeats: int) -> tuple[float, dict[str, float], dict[str, list[float]]]:
    """(fastest job's seconds, its seconds per task, per-example values) of scoring the stage."""
    best = None
    for _ in range(repeats + 1):  # the first is a warm-up
        per_task, values = {}, {}
        started = time.perf_counter()
        with context():
            for name, task, items in stage:
                t = time.perf_counter()
                values[name] = task.evaluate(model, indices=items, per_example=True)["examples"]["value"]
                per_task[name] = time.perf_counter() - t
        total = time.perf_counter() - started
        if best is None or total < best[0]:
            best = (total, per_task, values)
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", type=Path, default=ROOT / "configs" / "demo.yaml")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    torch.set_num_threads(1)  # as an actor with num_cpus 1
    model, tokenizer = load_model(resolve_source("smollm2-135m"))
    stage = first_stage(args.config, tokenizer)

    def cast_once():
        stack = contextlib.ExitStack()
        stack.enter_context(torch.autocast("cpu", dtype=torch.bfloat16))
        stack.enter_context(linear_weights_as(model, torch.bfloat16))
        return stack

    @contextlib.contextmanager
    def head_per_forward():
        with cast_once():
            head = model.get_output_embeddings()
            cast_head = head._parameters["weight"]
            head._parameters["weight"] = model.get_input_embeddings().weight  # tied again: autocast casts it per call
            try:
                yield
            finally:
                head._parameters["weight"] = cast_head

    ways = {"float32": contextlib.nullcontext, "autocast": lambda: torch.autocast("cpu", dtype=torch.bfloat16),
            "autocast, weights cast once, tied head per forward": head_per_forward,
            "autocast, weights cast once": cast_once}
    results = {way: timed_job(model, stage, context, args.repeats) for way, context in ways.items()}
    if any(results["autocast"][2] != results[way][2] for way in list(ways)[2:]):
        raise SystemExit("casting the weights once changed the scores")
    cpu = platform.processor() or platform.machine()
    bf16 = "avx512_bf16" in Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").is_file() else None
    items = ", ".join(f"{name} {len(ids)}" for name, _, ids in stage)
    lines = ["# A first stage in float32 and in bfloat16 (SmolLM2-135M, one core)", "",
             f"Items: {items} (`{args.config.name}`, first draw); fastest of {args.repeats} jobs after a warm-up; "
             f"{cpu}, AVX-512 BF16: {bf16}, torch {torch.__version__}.", "",
             "| scoring | job s | " + " | ".join(f"{name} s" for name, _, _ in stage) + " | vs float32 |",
             "|---|---|" + "---|" * len(stage) + "---|"]
    base = results["float32"][0]
    for way, (total, per_task, _) in results.items():
        lines.append(f"| {way} | {total:.3f} | " + " | ".join(f"{per_task[n]:.3f}" for n, _, _ in stage) + f" | {base / total:.2f}x |")
    lines += ["", "`python -m benchmarks.bench_screen_cost`", ""]
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "screen_cost.json").write_text(json.dumps(
        {way: {"job_s": round(t, 4), "per_task_s": {n: round(v, 4) for n, v in p.items()}} for way, (t, p, _) in results.items()},
        indent=1) + "\n")
    (RESULTS / "screen_cost.md").write_text("\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
