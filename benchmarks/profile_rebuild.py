"""Where a joint candidate's rebuild goes: one plan applied with its reconstruction, profiled,
and what a joint run spent rebuilding, read off its journal.

A joint or compress run makes a candidate that goes on to full scoring by applying its whole
plan to its merged weights (block importance, pruning, LIAR's least-squares refits). This
applies the plan of the run's first fully scored candidate to the default model (the cost does
not depend on the weights' values, only on their shapes and the plan) on one thread, as an
actor does, under cProfile, and splits the time into the calibration pass's block forwards (of
which the linear layers and the Gram matrices' accumulation), the refits' solves, and the rest.
From each run's journal it sums the making time of full dev evaluations and of test splits of
candidates with a plan: the second rebuilds a model the first built already.

    python -m benchmarks.profile_rebuild RUN_DIR [RUN_DIR ...] [--name rebuild_profile]
"""
from __future__ import annotations

import argparse
import cProfile
import json
import pstats
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"
sys.path.insert(0, str(ROOT))

from benchmarks.bench_staged import machine  # noqa: E402

# (label, function as pstats names it: file suffix, function name); cumulative seconds of each
PARTS = (
    ("calibration pass (block forwards, hooks included)", "compression/arch.py", "run_block"),
    ("  of which the linear layers", "~", "<built-in method torch._C._nn.linear>"),
    ("  of which the Gram matrices (hooks)", "compression/reconstruct.py", "add"),
    ("refits and cuts (`cut_block`)", "compression/width.py", "cut_block"),
    ("  of which the refits' solves", "compression/reconstruct.py", "refit_output_projection"),
)


def full_dev(row: dict) -> bool:
    """A dev scoring past a staged run's first stage (or any dev scoring of an unstaged run's)."""
    return row.get("split") == "dev" and row.get("stage") not in (0, None)


def rebuild_seconds(rows: list[dict]) -> dict[str, dict]:
    """Making seconds of planned candidates' whole dev evaluations and of their test splits."""
    kinds = {"full dev": full_dev, "test split": lambda r: r.get("split") == "test"}
    out = {}
    for kind, wanted in kinds.items():
        made = [r["timing"]["materialize_s"] for r in rows
                if r.get("status") == "ok" and r.get("plan") and r.get("timing") and wanted(r)]
        out[kind] = {"jobs": len(made), "median_s": round(statistics.median(made), 1) if made else None,
                     "sum_s": round(sum(made), 1)}
    return out


def profile_plan(plan_data: list[dict], calibration) -> tuple[float, dict[str, float]]:
    """(seconds, {part: cumulative seconds}) of applying the plan to the default model with the
    run's calibration windows (`compress.space.calibration`)."""
    from compression.plan import apply_plan, copy_sharing_weights, parse_plan
    from search.models.datasets import calibration_windows
    from search.models.sources import load_model, resolve_source

    torch.set_num_threads(1)  # as an actor with num_cpus 1
    model, tokenizer = load_model(resolve_source("smollm2-135m"))
    windows = calibration_windows(tokenizer, calibration.data, calibration.seq_len, calibration.num_sequences)
    plan = parse_plan(plan_data)
    apply_plan(copy_sharing_weights(model), plan, windows)  # warm-up
    profiler = cProfile.Profile()
    started = time.perf_counter()
    profiler.enable()
    apply_plan(copy_sharing_weights(model), plan, windows)
    profiler.disable()
    total = time.perf_counter() - started
    stats = pstats.Stats(profiler).stats  # {(file, line, name): (cc, nc, tt, ct, callers)}
    parts = {}
    for label, file_suffix, name in PARTS:
        parts[label] = round(sum(v[3] for (f, _, n), v in stats.items() if n == name and f.endswith(file_suffix)), 2)
    return total, parts


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs", type=Path, nargs="+")
    parser.add_argument("--name", default="rebuild_profile")
    args = parser.parse_args()
    from search.config import load_config
    from search.run.store import RunStore

    stores = [RunStore(run) for run in args.runs]
    journals = [store.read_journal() for store in stores]
    per_run = {str(run): rebuild_seconds(rows) for run, rows in zip(args.runs, journals)}
    first = next((r for r in journals[0] if r.get("plan") and full_dev(r) and r.get("status") == "ok"), None)
    if first is None:
        raise SystemExit(f"{args.runs[0]}: no fully scored candidate with a plan in its journal")
    total, parts = profile_plan(first["plan"], load_config(stores[0].config_path).compress.space.calibration)
    lines = [f"# Where a joint candidate's rebuild goes (`python -m benchmarks.profile_rebuild "
             f"{' '.join(map(str, args.runs))}`)", "",
             f"{machine()}", "",
             f"The plan of {first['id']} ({args.runs[0]}) applied to SmolLM2-135M with its reconstruction, "
             f"one thread, under cProfile: **{total:.1f} s**.", "",
             "| part | s | share |", "|---|---|---|"]
    lines += [f"| {label} | {s:.2f} | {s / total:.0%} |" for label, s in parts.items()]
    lines += ["", "What each run spent making candidates with a plan (the journal's `materialize_s`):", "",
              "| run | full dev: jobs | median s | sum s | test split: jobs | median s | sum s |", "|---|---|---|---|---|---|---|"]
    for run, kinds in per_run.items():
        dev, test = kinds["full dev"], kinds["test split"]
        lines.append(f"| {run} | {dev['jobs']} | {dev['median_s']} | {dev['sum_s']} | {test['jobs']} | {test['median_s']} | {test['sum_s']} |")
    text = "\n".join(lines) + "\n"
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / f"{args.name}.md").write_text(text)
    (RESULTS / f"{args.name}.json").write_text(json.dumps(
        {"candidate": first["id"], "plan": first["plan"], "seconds": round(total, 2), "parts": parts, "runs": per_run},
        indent=1) + "\n")
    print(text)


if __name__ == "__main__":
    main()
