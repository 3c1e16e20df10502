"""Evolved structure against importance rankings and uniform widths on SmolLM2-135M (issue #15).

Depth (`--part depth`): 8 of 30 blocks out, no recovery. Block Influence, Macro Influence and
SLEB (each one-shot, scored on the first `importance_samples` calibration windows) each give a
block set; the structure search (compression/structure_search.py: EvoPress (1+λ), staged KL to
the dense model on the same calibration pool, started from the best of the three) gives
another. Then the evolved set with FuseGPT recovery (fusion into 7 neighbours, rank 128, lr 1e-2,
`fuse_steps` steps per block, as bench_depth.py's quick fuse row).

Width (`--part width`): 25% of every kept block's FFN+attention parameters, both with LIAR
(second_moment criterion): uniform (every layer at level 4 of 1/16 steps = prune_width ratio
0.25) against per-layer levels evolved from that uniform start (same total units, so the same
parameter count up to rounding; both counts are in the table).

Perplexity (computed here, as in bench_depth.py: non-overlapping 512-token windows, every token
but a window's first predicted) on the pydoc test split and on held-out text that no step ever
selects on: docstrings of a fixed list of Python standard-library modules and their public
members (`stdlib_docs`; text of the running CPython, never in pydoc's language reference).
Calibration (rankings, search, LIAR statistics, fusion) is pydoc:train only.

    nice -n 5 .venv/bin/python benchmarks/bench_structure.py --quick       # make bench
    nice -n 5 .venv/bin/python benchmarks/bench_structure.py --part depth  # the issue's numbers

Results: benchmarks/results/structure[_quick]_{depth,width}.{json,md}, rewritten after every row.
"""
from __future__ import annotations

import argparse
import copy
import inspect
import importlib
import json
import os
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from benchmarks.common import window_perplexity  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results"
STDLIB_MODULES = ("argparse", "asyncio", "collections", "csv", "datetime", "decimal", "email.message", "functools",
                  "http.client", "itertools", "json", "logging", "pathlib", "re", "shutil", "sqlite3", "string",
                  "subprocess", "tarfile", "threading", "typing", "unittest", "urllib.parse", "zipfile")
FULL = dict(pool=32, eval_windows=16, importance_samples=4, depth_generations=40, width_generations=20,
            offspring=8, stages=[(2, 2), (8, 1)], fuse_steps=20)
QUICK = dict(pool=16, eval_windows=4, importance_samples=2, depth_generations=4, width_generations=2,
             offspring=4, stages=[(1, 2), (4, 1)], fuse_steps=5)


def stdlib_docs() -> list[str]:
    """Held-out text: each listed module's docstring and its public members' docstrings."""
    texts = []
    for name in STDLIB_MODULES:
        module = importlib.import_module(name)
        texts.append(inspect.getdoc(module) or "")
        for attr in sorted(dir(module)):
            member = getattr(module, attr, None)
            if not attr.startswith("_") and (inspect.isclass(member) or inspect.isfunction(member)):
                if getattr(member, "__module__", None) == module.__name__ and inspect.getdoc(member):
                    texts.append(inspect.getdoc(member))
    return [t for t in texts if t]


def load(a):
    from search.models.sources import load_model

    torch.set_num_threads(a.threads)
    model, tokenizer = load_model(a.model, dtype=getattr(torch, a.dtype), device=a.device)
    return model.eval(), tokenizer


def data(tokenizer, a):
    from compression.calibration import calibration_windows, windows_from_texts

    pool = calibration_windows(tokenizer, "pydoc:train", 128, a.pool)
    test = calibration_windows(tokenizer, "pydoc:test", 512, a.eval_windows)
    held = windows_from_texts(tokenizer, stdlib_docs(), 512, a.eval_windows, origin="stdlib docstrings")
    return pool, test, held


def measure(model, test, held) -> dict:
    start = time.perf_counter()
    row = {"test_ppl": window_perplexity(model, test.input_ids), "heldout_ppl": window_perplexity(model, held.input_ids),
           "params": sum(p.numel() for p in model.parameters())}
    row["eval_s"] = round(time.perf_counter() - start, 1)
    return row


def applied(model, plan, calibration):
    from compression.plan import apply_plan, parse_plan

    start = time.perf_counter()
    out = apply_plan(copy.deepcopy(model), parse_plan(plan), calibration)
    return out, round(time.perf_counter() - start, 1)


def search_settings(a, **overrides):
    from compression.structure_search import StructureSearch

    base = dict(offspring=a.offspring, stages=[{"windows": w, "survivors": s} for w, s in a.stages],
                importance_samples=a.importance_samples, seed=a.seed, fitness=a.fitness, fresh_final=a.fresh_final,
                stats_windows=a.stats_windows)
    return StructureSearch.model_validate({**base, **overrides})


def run_depth(a, write) -> None:
    from compression.genes import Budget, compile_plan, from_ranking
    from compression.structure_search import importance_rankings, run_structure_search, with_recovery

    model, tokenizer = load(a)
    pool, test, held = data(tokenizer, a)
    settings = search_settings(a, blocks_out=a.blocks_out, generations=a.depth_generations, knobs=plan_knobs(a))
    rows = [{"method": "dense", "out": [], **measure(model, test, held)}]
    write(rows)
    start = time.perf_counter()
    rankings, rank_tokens = importance_rankings(model, pool, settings)
    rank_s = time.perf_counter() - start
    budget = Budget(a.blocks_out, 0)  # depth only
    for name, scores in rankings.items():
        genes = from_ranking(scores, budget)
        pruned, _ = applied(model, compile_plan(genes, settings.grid), pool)
        rows.append({"method": name, "out": genes.out, **measure(pruned, test, held)})
        write(rows)
    result = run_structure_search(model, pool, settings, rankings=rankings, log=lambda m: print(m, flush=True))
    pruned, _ = applied(model, result.plan, pool)  # rankings were passed in: result.tokens / seconds are the search's own
    rows.append({"method": "evolved", "out": result.genes.out, **measure(pruned, test, held),
                 "search_tokens": result.tokens, "search_s": round(result.seconds, 1), "rank_tokens": rank_tokens,
                 "rank_s": round(rank_s, 1), "start": result.history[0]["from"], "fitness": settings.fitness,
                 "init_loss": result.history[0]["init_loss"], "final_loss": result.history[-1]["loss"],
                 "loss_history": [h["loss"] for h in result.history],
                 "replacements": sum(1 for h in result.history if h.get("replaced"))})
    write(rows)
    plan = compile_plan(with_recovery(result.genes, "fuse"), settings.grid, settings.knobs)
    fused, fuse_s = applied(model, plan, pool)
    rows.append({"method": "evolved + FuseGPT", "out": result.genes.out, **measure(fused, test, held), "compress_s": fuse_s})
    write(rows)


def run_fuse(a, write) -> None:
    """FuseGPT recovery alone on a given block set (`--fuse-blocks`, e.g. an earlier run's evolved
    set) with `--fuse-steps` steps per block: how far more recovery steps go, without a new search."""
    from compression.genes import FUSE, KEEP, Genes, PlanKnobs, WidthGrid, compile_plan

    model, tokenizer = load(a)
    pool, test, held = data(tokenizer, a)
    n = len(model.model.layers)
    genes = Genes(tuple(FUSE if i in a.fuse_blocks else KEEP for i in range(n)), (0,) * n)
    rows = [{"method": "dense", "out": [], **measure(model, test, held)}]
    write(rows)
    plan = compile_plan(genes, WidthGrid(), PlanKnobs(**plan_knobs(a)))
    fused, fuse_s = applied(model, plan, pool)
    rows.append({"method": f"given set + FuseGPT ({a.fuse_steps} steps/block)", "out": sorted(a.fuse_blocks),
                 **measure(fused, test, held), "compress_s": fuse_s})
    write(rows)


def plan_knobs(a) -> dict:
    from compression.genes import PlanKnobs

    return PlanKnobs(fuse_steps=a.fuse_steps).model_dump()


def run_width(a, write) -> None:
    from compression.genes import KEEP, Genes, compile_plan
    from compression.structure_search import run_structure_search

    model, tokenizer = load(a)
    pool, test, held = data(tokenizer, a)
    settings = search_settings(a, width_ratio=0.25, generations=a.width_generations, init=[])
    n = len(model.model.layers)
    uniform = Genes((KEEP,) * n, (round(0.25 / settings.grid.step),) * n)
    pruned, secs = applied(model, compile_plan(uniform, settings.grid, settings.knobs), pool)
    rows = [{"method": "dense", "levels": [], **measure(model, test, held)},
            {"method": "uniform 0.25 (LIAR)", "levels": list(uniform.levels), **measure(pruned, test, held), "compress_s": secs}]
    write(rows)
    result = run_structure_search(model, pool, settings, log=lambda m: print(m, flush=True))
    pruned, secs = applied(model, result.plan, pool)
    rows.append({"method": "evolved levels (LIAR)", "levels": list(result.genes.levels), **measure(pruned, test, held),
                 "compress_s": secs, "search_tokens": result.tokens, "search_s": round(result.seconds, 1),
                 "fitness": settings.fitness, "final_loss": result.history[-1]["loss"], "init_loss": result.history[0]["loss"],
                 "replacements": sum(1 for h in result.history if h.get("replaced"))})
    write(rows)


def device_name(device: str) -> str:
    return f"cuda ({torch.cuda.get_device_name(0)})" if device.startswith("cuda") else "cpu"


def writer(a, part: str):
    name = f"structure{'_quick' if a.quick else ''}_{part}{a.suffix}"
    load_start = os.getloadavg()

    def write(rows):
        RESULTS.mkdir(parents=True, exist_ok=True)
        meta = {"settings": {k: v for k, v in vars(a).items()}, "load_average_start": load_start,
                "load_average_now": os.getloadavg(), "device": device_name(a.device), "dtype": a.dtype,
                "torch_threads": torch.get_num_threads()}
        (RESULTS / f"{name}.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
        (RESULTS / f"{name}.md").write_text(markdown(part, rows, meta, a))

    return write


def markdown(part: str, rows: list[dict], meta: dict, a) -> str:
    dense = rows[0]
    cmd = f"benchmarks/bench_structure.py{' --quick' if a.quick else ''} --part {part} --fitness {a.fitness}"
    if a.fresh_final:
        cmd += " --fresh-final"
    if a.pool != (QUICK if a.quick else FULL)["pool"]:
        cmd += f" --pool {a.pool}"
    if a.stats_windows:
        cmd += f" --stats-windows {a.stats_windows}"
    if part == "fuse":
        cmd += f" --fuse-blocks {','.join(map(str, a.fuse_blocks))} --fuse-steps {a.fuse_steps}"
    if meta["device"] == "cpu":
        where = (f"CPU, {meta['torch_threads']} threads, run with nice; load average at start "
                 f"{meta['load_average_start'][0]:.2f}, now {meta['load_average_now'][0]:.2f} (2-core machine shared with other jobs).")
    else:
        cmd += f" --device {a.device} --dtype {a.dtype}"
        where = f"{meta['device']}, {a.dtype}."
    stats_note = (f" (the search's width statistics on the first {a.stats_windows}, its stages on the other "
                  f"{a.pool - a.stats_windows}; every pruned model below is built on all {a.pool})") if a.stats_windows else ""
    lines = [f"# Structure search, {part}, {a.model} (`{cmd}`)", "",
             f"Perplexity on {a.eval_windows} windows of 512 tokens: pydoc test split and held-out stdlib docstrings "
             f"(never selected on). Calibration: {a.pool} windows of 128 tokens of pydoc:train{stats_note}. {where}", "",
             "| method | params (M) | test ppl | × dense | held-out ppl | × dense | blocks out / levels |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        what = r.get("out") if part in ("depth", "fuse") else r.get("levels")
        lines.append(f"| {r['method']} | {r['params'] / 1e6:.1f} | {r['test_ppl']:.2f} | {r['test_ppl'] / dense['test_ppl']:.2f} | "
                     f"{r['heldout_ppl']:.2f} | {r['heldout_ppl'] / dense['heldout_ppl']:.2f} | {what} |")
    evolved = next((r for r in rows if "search_tokens" in r), None)
    if evolved:
        fitness_name = {"kl": "KL to dense", "nll": "NLL"}[evolved["fitness"]]
        lines += ["", f"Search: {evolved['search_tokens']:,} forward tokens, {evolved['search_s'] / 60:.1f} min "
                  f"({evolved['replacements']} of {a.depth_generations if part == 'depth' else a.width_generations} generations "
                  f"replaced the parent); calibration {fitness_name} {evolved['init_loss'] if part == 'width' else min(evolved['init_loss'].values()):.4f} "
                  f"at the start → {evolved['final_loss']:.4f}."]
        if part == "depth":
            lines += [f"Rankings: {evolved['rank_tokens']:,} forward tokens, {evolved['rank_s'] / 60:.1f} min "
                      f"(Macro Influence and SLEB: one pass per block); start: {evolved['start']}; "
                      f"{fitness_name} of each ranking's set: " + ", ".join(f"{k} {v:.4f}" for k, v in evolved["init_loss"].items()) + "."]
            rank_best = min(r["test_ppl"] for r in rows if r["method"] in ("block_influence", "macro_influence", "sleb"))
            held_best = min(r["heldout_ppl"] for r in rows if r["method"] in ("block_influence", "macro_influence", "sleb"))
            lines += [f"Evolved / best ranking: test {evolved['test_ppl'] / rank_best:.2f}×, held-out {evolved['heldout_ppl'] / held_best:.2f}×."]
    return "\n".join(lines) + "\n"


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true")
    p.add_argument("--part", choices=["depth", "width", "fuse", "all"], default="all")
    p.add_argument("--fuse-blocks", type=lambda text: [int(i) for i in text.split(",")], default=None,
                   help="--part fuse: the block indices to fuse, comma-separated")
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--blocks-out", type=int, default=8)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--fitness", choices=["kl", "nll"], default="kl",
                   help="the search's fitness: KL to the dense model, or the calibration text's NLL")
    p.add_argument("--suffix", default="", help="appended to the results' name")
    p.add_argument("--fresh-final", action="store_true",
                   help="the parent meets the finalists on last-stage windows the earlier stages did not use")
    p.add_argument("--stats-windows", type=int, default=0,
                   help="width statistics on the pool's first N windows, the search's stages on the rest")
    p.add_argument("--device", default="cpu", help="cpu or cuda: where the model, search and evaluation run")
    p.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
    for key, value in FULL.items():
        if key != "stages":
            p.add_argument(f"--{key.replace('_', '-')}", type=type(value), default=None)
    a = p.parse_args(argv)
    defaults = QUICK if a.quick else FULL
    for key, value in defaults.items():
        if getattr(a, key, None) is None:
            setattr(a, key, value)
    return a


def main(argv=None) -> None:
    a = parse_args(argv)
    if a.part == "fuse" and not a.fuse_blocks:
        raise SystemExit("--part fuse needs --fuse-blocks")
    runs = {"depth": run_depth, "width": run_width, "fuse": run_fuse}
    for part in (["depth", "width"] if a.part == "all" else [a.part]):
        runs[part](a, writer(a, part))


if __name__ == "__main__":
    main()
