"""An actor handing its freed heap back after every job: what it costs in time, what it saves.

glibc's malloc keeps the heap a job freed for the next job's allocations, so between jobs an
actor holds its high-water mark. `workers.memory_after_job` hands it back (`malloc_trim`) after
every job; the next job then faults its pages in again. This measures both, on the demo's three
dev tasks and SmolLM2-135M, with the job mix of a staged demo generation: per round four
first-stage screens (a sixteenth of each task's items, bfloat16 autocast with the linear
weights cast once, as `fitness.screen_dtype` runs them), one second-stage screen (a quarter)
and one full evaluation (every item, float32). Each way runs in its own fresh process (no
allocator history carries over), the ways alternating; per job kind the median seconds, and
the resident set held between jobs and the process's peak (the kernel's VmRSS and VmHWM).

    python -m benchmarks.bench_heap_release               # 3 rounds per process, 2 processes per way, ~8 min
    python -m benchmarks.bench_heap_release --quick       # 1 round, 1 process per way, ~2 min
"""
from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import subprocess
import sys
import time

from benchmarks.bench_scoring_memory import DEMO_TASKS
from benchmarks.bench_search import GIB, RESULTS, _machine

# (job kind, share of each task's items, autocast dtype or None): one staged generation's mix
ROUND = [("screen 1/16, bf16", 1 / 16, "bfloat16")] * 4 + [("screen 1/4, bf16", 1 / 4, "bfloat16"),
                                                             ("full, fp32", 1.0, None)]
WAYS = ("kept (glibc keeps freed heap)", "handed back after every job")


def job_indices(task, share: float, job: int) -> list[int]:
    """A different seeded subset per job (at least three items), as stages draw them."""
    import random

    pool = task.selected(None, 0)
    if share >= 1:
        return pool
    return sorted(random.Random(job).sample(pool, max(3, round(share * len(pool)))))


def run_jobs(release: bool, rounds: int) -> dict:
    """In this (fresh) process: the model and tasks, one warm round, then `rounds` measured."""
    import torch

    from search.fitness import TaskSpec, build_task
    from search.models.memory import release_freed_heap, resident_memory
    from search.models.sources import load_model
    from search.run.workers import linear_weights_as

    torch.set_num_threads(1)  # an actor's
    model, tokenizer = load_model("smollm2-135m")
    tasks = {name: build_task(TaskSpec(kind, data, options=options), tokenizer) for name, (kind, data, options) in DEMO_TASKS.items()}
    seconds: dict[str, list[float]] = {kind: [] for kind, _, _ in ROUND}
    held: list[int] = []
    job = 0
    for measured_round in range(rounds + 1):
        for kind, share, autocast in ROUND:
            job += 1
            start = time.perf_counter()
            with torch.inference_mode(), contextlib.ExitStack() as screening:
                if autocast:  # as an Evaluator screens: autocast, the linear weights cast once
                    screening.enter_context(torch.autocast("cpu", dtype=getattr(torch, autocast)))
                    screening.enter_context(linear_weights_as(model, getattr(torch, autocast)))
                for task in tasks.values():
                    task.evaluate(model, indices=job_indices(task, share, job))
            if release:
                release_freed_heap()
            elapsed = time.perf_counter() - start  # the hand-back is part of the job's cost
            if measured_round:
                seconds[kind].append(elapsed)
                held.append(resident_memory()["rss"])
    return {"seconds": seconds, "held": held, "peak": resident_memory()["peak"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=3, help="measured rounds per process (after a warm one)")
    parser.add_argument("--processes", type=int, default=2, help="fresh processes per way, alternating")
    parser.add_argument("--quick", action="store_true", help="one round, one process per way")
    parser.add_argument("--_one", nargs=2, metavar=("RELEASE", "ROUNDS"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args._one:
        print(json.dumps(run_jobs(args._one[0] == "1", int(args._one[1]))))
        return
    rounds, processes = (1, 1) if args.quick else (args.rounds, args.processes)
    samples: dict[str, list[dict]] = {way: [] for way in WAYS}
    for _ in range(processes):
        for release, way in enumerate(WAYS):
            proc = subprocess.run([sys.executable, "-m", "benchmarks.bench_heap_release", "--_one", str(release), str(rounds)],
                                  capture_output=True, text=True, check=True)
            samples[way].append(json.loads(proc.stdout.strip().splitlines()[-1]))
    rows = {}
    for way, runs in samples.items():
        kinds = {kind: round(statistics.median(s for r in runs for s in r["seconds"][kind]), 3) for kind in runs[0]["seconds"]}
        rows[way] = {"seconds": kinds,
                     "round_s": round(sum(s * sum(1 for k, _, _ in ROUND if k == kind) for kind, s in kinds.items()), 2),
                     "held_median_gib": round(statistics.median(h for r in runs for h in r["held"]) / GIB, 3),
                     "held_max_gib": round(max(h for r in runs for h in r["held"]) / GIB, 3),
                     "peak_gib": round(statistics.median(r["peak"] for r in runs) / GIB, 3)}
    kept, released = (rows[w] for w in WAYS)
    result = {"machine": _machine(), "rounds": rounds, "processes": processes, "rows": rows,
              "round_time_ratio": round(released["round_s"] / kept["round_s"], 3),
              "held_ratio": round(released["held_median_gib"] / kept["held_median_gib"], 3)}
    name = "heap_release_quick" if args.quick else "heap_release"
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / f"{name}.json").write_text(json.dumps(result, indent=1))
    kinds = list(kept["seconds"])
    lines = ["# An actor handing its freed heap back after every job", "",
             f"`python -m benchmarks.bench_heap_release`: SmolLM2-135M, the demo's three dev tasks, one torch thread; "
             f"per process one warm round and {rounds} measured rounds of {len(ROUND)} jobs (four first-stage screens, "
             f"one second-stage screen, one full evaluation); {processes} fresh process(es) per way, alternating. "
             f"Seconds: median per job kind, the hand-back included. Held: the resident set after each job "
             f"(median, max); peak: VmHWM at the end (median over processes). GiB.", "",
             "| way | " + " | ".join(f"{k} s" for k in kinds) + " | one round s | held median | held max | peak |",
             "|---|" + "---|" * (len(kinds) + 4)]
    lines += [f"| {way} | " + " | ".join(str(r["seconds"][k]) for k in kinds) +
              f" | {r['round_s']} | {r['held_median_gib']} | {r['held_max_gib']} | {r['peak_gib']} |" for way, r in rows.items()]
    lines += ["", f"Handed back: a round takes x{result['round_time_ratio']} the time; an actor holds "
              f"x{result['held_ratio']} between jobs (median). Machine: {result['machine']['cores']} cores."]
    (RESULTS / f"{name}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
