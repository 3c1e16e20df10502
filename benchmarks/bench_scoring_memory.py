"""A scoring pass's peak memory: batches bounded in bytes vs the fixed 8,192-token batches.

A pass that scores every position returns (rows, width, vocabulary) float32 logits; with
SmolLM2's 49,152-token vocabulary, 8,192 tokens of them are 1.6 GB, three times the model's
weights. `search.fitness.kernels.default_batch_tokens` bounds a batch by BATCH_BUDGET_BYTES of
logits (and each batch's logits are freed before the next forward). Multiple choice scored
through a shared prefix also copies each question's key/value cache to every choice's row;
`kernels.choice_batches` bounds those rows' cache and logits by the same budget. Two passes are
compared both ways, alternating, each in a fresh process (so no allocator history carries over)
after one warm pass: the demo's pydoc task (32 pieces of 128 tokens, perplexity) and its compare
task (64 questions of four choices), on SmolLM2-135M: the pass's peak resident growth (the
kernel's VmHWM, reset before it), its seconds and its score, which must not change. Then each
of the demo's three dev tasks the same way, as an actor scores a candidate: its pass's peak
growth, the private heap it leaves behind, and that heap after `gc.collect()` and glibc's
`malloc_trim(0)` (freed memory the allocator kept).

    python -m benchmarks.bench_scoring_memory            # 5 alternating repeats, ~4 min
    python -m benchmarks.bench_scoring_memory --quick    # one repeat, ~1.5 min (scoring_memory_quick)
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"
DEMO_PYDOC = {"chunk_tokens": 128, "subsample": 32}  # configs/demo.yaml's pydoc task
FIXED_TOKENS = 8192  # the batches before the bound: kernels.DEFAULT_BATCH_TOKENS
COMPARED = {  # pass: (kind, data, {way: task options}); the fixed way first
    "pydoc (perplexity)": ("perplexity", "pydoc:dev", {
        f"fixed {FIXED_TOKENS:,} tokens": {**DEMO_PYDOC, "batch_tokens": FIXED_TOKENS},
        "bounded by the logits (the default)": DEMO_PYDOC,
    }),
    "compare (multiple choice)": ("multiple_choice", "compare:dev", {
        f"fixed {FIXED_TOKENS:,} tokens": {"batch_tokens": FIXED_TOKENS},
        "bounded by the cache and logits (the default)": {},
    }),
}
DEMO_TASKS = {  # configs/demo.yaml's dev tasks: (kind, data, options)
    "pydoc (perplexity)": ("perplexity", "pydoc:dev", DEMO_PYDOC),
    "arith (generate)": ("generate", "arithmetic:dev", {"max_new_tokens": 4}),
    "compare (multiple choice)": ("multiple_choice", "compare:dev", {}),
}


def status_gib(field: str) -> float:
    """One of this process's /proc status fields (`bench_search.MEMORY_STATUS`), GiB."""
    from benchmarks.bench_search import _proc_status

    return _proc_status(os.getpid())[field] / 2**30


def batch_bound(kind: str, options: dict, model) -> str:
    """What bounds a pass's batches: the task's tokens, or the kernels' default for its kind."""
    from search.fitness.kernels import BATCH_BUDGET_BYTES, default_batch_tokens

    if "batch_tokens" in options:
        return f"{options['batch_tokens']:,} tokens"
    if kind == "multiple_choice":
        return f"{BATCH_BUDGET_BYTES // 2**20} MiB of cache and logits"
    return f"{default_batch_tokens(model):,} tokens ({BATCH_BUDGET_BYTES // 2**20} MiB of logits)"


def one_pass(kind: str, data: str, options: dict, threads: int) -> dict:
    """In this (fresh) process: SmolLM2-135M, the task scored once to warm, then measured."""
    import gc

    import torch

    from search.fitness import TaskSpec, build_task
    from search.models.memory import release_freed_heap
    from search.models.sources import load_model

    torch.set_num_threads(threads)
    model, tokenizer = load_model("smollm2-135m")
    task = build_task(TaskSpec(kind, data, options=options), tokenizer)
    task.evaluate(model)
    gc.collect()
    release_freed_heap()
    Path("/proc/self/clear_refs").write_text("5")  # VmHWM := the current RSS
    before, started = status_gib("VmRSS"), time.perf_counter()
    result = task.evaluate(model)
    seconds, grown, left = time.perf_counter() - started, status_gib("VmHWM") - before, status_gib("RssAnon")
    gc.collect()
    release_freed_heap()
    return {"peak_growth_gib": grown, "seconds": seconds, "heap_after_gib": left, "heap_after_trim_gib": status_gib("RssAnon"),
            "score": result.get("nll_sum", result.get("score")), "batch_bound": batch_bound(kind, options, model),
            "mean_gold_loglik": result.get("mean_gold_loglik")}


def measured(kind: str, data: str, options: dict, threads: int) -> dict:
    spec = json.dumps([kind, data, options, threads])
    proc = subprocess.run([sys.executable, "-m", "benchmarks.bench_scoring_memory", "--_one", spec],
                          capture_output=True, text=True, check=True)
    return json.loads(proc.stdout.strip().splitlines()[-1])


def compared(samples: dict[str, list[dict]], score: str) -> dict:
    """Medians per way (the fixed way first, the bounded second) and the bounded way's ratios."""
    rows = {way: {"batch_bound": s[0]["batch_bound"], "peak_growth_gib": round(statistics.median(x["peak_growth_gib"] for x in s), 3),
                  "seconds": round(statistics.median(x["seconds"] for x in s), 2), "score": s[0][score],
                  "peak_growth_gib_each": [round(x["peak_growth_gib"], 3) for x in s]}
            for way, s in samples.items()}
    fixed, bounded = rows.values()
    return {"rows": rows, "memory_ratio": round(fixed["peak_growth_gib"] / bounded["peak_growth_gib"], 2),
            "time_ratio": round(bounded["seconds"] / fixed["seconds"], 2),
            "score_relative_difference": abs(fixed["score"] - bounded["score"]) / abs(fixed["score"])}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--quick", action="store_true", help="one repeat, written as scoring_memory_quick")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (an actor's: 1)")
    parser.add_argument("--_one", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args._one:
        print(json.dumps(one_pass(*json.loads(args._one))))
        return
    repeats, name = (1, "scoring_memory_quick") if args.quick else (args.repeats, "scoring_memory")
    comparisons = {}
    for label, (kind, data, ways) in COMPARED.items():
        samples: dict[str, list[dict]] = {way: [] for way in ways}
        for _ in range(repeats):
            for way, options in ways.items():
                samples[way].append(measured(kind, data, options, args.threads))
        comparisons[label] = compared(samples, "mean_gold_loglik" if kind == "multiple_choice" else "score")
    tasks = {task: {k: round(v, 3) if isinstance(v, float) else v for k, v in measured(*spec, args.threads).items()}
             for task, spec in DEMO_TASKS.items()}
    result = {"comparisons": comparisons, "repeats": repeats, "threads": args.threads, "demo_tasks": tasks}
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / f"{name}.json").write_text(json.dumps(result, indent=1))
    lines = ["# A scoring pass's peak memory: batches bounded in bytes vs fixed ones", "",
             "`python -m benchmarks.bench_scoring_memory`: two of the demo's dev tasks on SmolLM2-135M, "
             f"{args.threads} torch thread(s), each pass in a fresh process after a warm one, median of "
             f"{repeats} alternating repeats. The score: pydoc's NLL sum; compare's mean log-likelihood of the "
             "right choice.", "",
             "| pass | batches | bound | peak resident growth, GiB | seconds | score |", "|---|---|---|---|---|---|"]
    for label, c in comparisons.items():
        lines += [f"| {label} | {way} | {r['batch_bound']} | {r['peak_growth_gib']} | {r['seconds']} | {r['score']:.6f} |"
                  for way, r in c["rows"].items()]
    lines.append("")
    lines += [f"{label}: peak growth {c['memory_ratio']}x lower, time x{c['time_ratio']}, score relative difference "
              f"{c['score_relative_difference']:.1e}." for label, c in comparisons.items()]
    lines += ["",
              "Each demo dev task the same way, as an actor scores a candidate (default batches), GiB:", "",
              "| task | pass's peak growth | private heap after | after gc + malloc_trim | seconds |", "|---|---|---|---|---|"]
    lines += [f"| {task} | {r['peak_growth_gib']} | {r['heap_after_gib']} | {r['heap_after_trim_gib']} | {r['seconds']} |"
              for task, r in tasks.items()]
    lines += ["", "The heap includes the model's weights (SmolLM2-135M: 0.50 GiB in float32, partly memory-mapped "
              "files until written) and the Python process's own.", ""]
    (RESULTS / f"{name}.md").write_text("\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
