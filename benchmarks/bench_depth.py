"""Depth compression quality table on SmolLM2-135M-Instruct (issue #3).

For each block count (full: 4, 8, 12 of 30; quick: 8) and each method, a fresh process loads the
model, applies one plan step, and measures perplexity on the `pydoc` test split:

    dense        no change
    remove_bi    removal ranked by Block Influence (ShortGPT), no recovery
    remove_mi    removal ranked by Macro Influence (FuseGPT's criterion, one-shot), no recovery
    remove_sleb  SLEB: greedy removal by calibration NLL, no recovery
    remove_heal  MI removal + fine-tuning of the same neighbours' full weights with the same local
                 distillation, data and step budget as fusion (the fair baseline)
    fuse         FuseGPT: MI, fusion into 7 neighbours, rank 128, local distillation, folded

Perplexity is computed here (not with the project's fitness module, to stay independent):
non-overlapping 512-token windows over the pydoc test topics joined with EOS, mean next-token
NLL over every predicted token (511 per window), exp. Wall time is the compression itself
(importance scoring + fusion / fine-tuning), not model loading or evaluation; peak memory is
the process's peak RSS up to the end of compression (model load included; the RSS right
after loading is given beside it, and the peak during evaluation separately), or on CUDA
torch.cuda.max_memory_allocated.

    .venv/bin/python benchmarks/bench_depth.py --quick     # reduced settings, see QUICK
    .venv/bin/python benchmarks/bench_depth.py             # the issue's table (hours on 2 cores)

Results: benchmarks/results/depth[_quick].{json,md}, rewritten after every row.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
RESULTS = ROOT / "benchmarks" / "results"
METHODS = ("dense", "remove_bi", "remove_mi", "remove_sleb", "remove_heal", "fuse")

FULL = dict(counts=[4, 8, 12], eval_windows=0, cal_windows=64, seq_len=128, importance_samples=32,
            sleb_samples=32, steps=100, iterative=True)
QUICK = dict(counts=[8], eval_windows=8, cal_windows=16, seq_len=128, importance_samples=4,
             sleb_samples=2, steps=20, iterative=False)


def plan_for(method: str, count: int, a) -> list[dict]:
    common = dict(count=count, importance_samples=a.importance_samples, batch_size=a.batch_size)
    recover = dict(steps=a.steps, group_size=a.group_size, iterative=a.iterative, loss=a.loss)
    return {
        "dense": [],
        "remove_bi": [dict(op="remove_blocks", importance="block_influence", **common)],
        "remove_mi": [dict(op="remove_blocks", importance="macro_influence", **common)],
        "remove_sleb": [dict(op="remove_blocks", importance="sleb", **{**common, "importance_samples": a.sleb_samples})],
        "remove_heal": [dict(op="remove_blocks", importance="macro_influence", lr=a.heal_lr, **common, **recover)],
        "fuse": [dict(op="fuse_blocks", importance="macro_influence", rank=a.rank, lr=a.fuse_lr, fold_each=a.fold_each, **common, **recover)],
    }[method]


@torch.no_grad()
def perplexity(model, windows) -> float:
    device = next(model.parameters()).device
    total, count = 0.0, 0
    for ids in windows.batches(1, device):
        loss = model(input_ids=ids, labels=ids, use_cache=False).loss  # mean over T-1 tokens
        total += loss.item() * (ids.shape[1] - 1)
        count += ids.shape[1] - 1
    return math.exp(total / count)


def peak_memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def run_one(method: str, count: int, a) -> dict:
    """Load, compress, evaluate; everything in this (fresh) process."""
    from compression.calibration import calibration_windows
    from compression.depth import shrink
    from compression.plan import check_plan, parse_plan
    from search.models.sources import load_model

    device = torch.device(a.device)
    dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}[a.dtype]
    model, tokenizer = load_model(a.model, dtype=dtype, device=device)
    rss_loaded = peak_memory_mb(device)
    calibration = calibration_windows(tokenizer, "pydoc:train", a.seq_len, a.cal_windows)
    test = calibration_windows(tokenizer, "pydoc:test", 512, a.eval_windows or None)
    plan = parse_plan(plan_for(method, count, a))
    check_plan(plan, model.config)
    report: list[dict] = []
    start = time.perf_counter()
    for step in plan:
        model = shrink(model, step, calibration, report)
    wall = time.perf_counter() - start
    peak_compress = peak_memory_mb(device)
    start = time.perf_counter()
    ppl = perplexity(model, test)
    return {
        "method": method, "count": count if plan else 0, "perplexity": ppl,
        "blocks": model.config.num_hidden_layers, "params": sum(p.numel() for p in model.parameters()),
        "compress_s": wall, "eval_s": time.perf_counter() - start,
        "peak_mb": peak_compress, "eval_peak_mb": peak_memory_mb(device), "loaded_mb": rss_loaded, "eval_windows": test.num_sequences,
        "plan": [s.model_dump(mode="json") for s in plan], "steps_report": report,
    }


def _label(row: dict) -> str:
    """Method name plus the recovery settings that tell variants apart."""
    step = row["plan"][0] if row["plan"] else {}
    if row["method"] == "fuse":
        return f"fuse (lr {step['lr']:g}, {'fold each' if step.get('fold_each', False) else 'append'})"
    if row["method"] == "remove_heal":
        return f"remove_heal (lr {step['lr']:g})"
    return row["method"]


def _peaks(row: dict) -> str:
    """'compress peak | eval peak'; rows from before the two were split only have the later."""
    if "eval_peak_mb" not in row:
        return f"- | {row['peak_mb']:.0f}"
    return f"{row['peak_mb']:.0f} | {row['eval_peak_mb']:.0f}"


def write_tables(rows: list[dict], a, name: str) -> None:
    RESULTS.mkdir(parents=True, exist_ok=True)
    settings = {k: getattr(a, k) for k in ("model", "device", "dtype", "threads", "counts", "eval_windows", "cal_windows",
                                           "seq_len", "importance_samples", "sleb_samples", "steps", "iterative",
                                           "rank", "group_size", "batch_size", "fuse_lr", "heal_lr", "loss", "fold_each")}
    (RESULTS / f"{name}.json").write_text(json.dumps({"settings": settings, "command": " ".join(sys.argv), "rows": rows}, indent=1))
    dense = next((r["perplexity"] for r in rows if r["method"] == "dense"), None)
    lines = [
        f"# Depth compression, {a.model} (`{' '.join(sys.argv)}`)", "",
        "Perplexity: pydoc test split, non-overlapping 512-token windows "
        f"({rows[0]['eval_windows'] if rows else '?'} windows), computed in bench_depth.py.", "",
        "Settings: " + ", ".join(f"{k}={v}" for k, v in settings.items()), "",
        "| method | removed | blocks | params (M) | test ppl | × dense | compress (s) | eval (s) | RSS after load (MB) | peak RSS compress (MB) | peak RSS eval (MB) | removed (original index, in order) |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        label = _label(r)
        ratio = f"{r['perplexity'] / dense:.2f}" if dense else "-"
        order = ", ".join(str(s["removed"]) for s in r["steps_report"])
        lines.append(
            f"| {label} | {r['count']} | {r['blocks']} | {r['params'] / 1e6:.1f} | {r['perplexity']:.2f} | {ratio} | "
            f"{r['compress_s']:.0f} | {r['eval_s']:.0f} | {r['loaded_mb']:.0f} | {_peaks(r)} | {order} |"
        )
    losses = [(_label(r), r["count"], s) for r in rows for s in r["steps_report"] if "loss_before" in s]
    if losses:
        lines += ["", "Local distillation loss (per-token relative squared error, first 8 windows) before → after training:", ""]
        for method, count, s in losses:
            lines.append(f"- {method} ({count}): block {s['removed']}: {s['loss_before']:.4f} → {s['loss_after']:.4f}")
    (RESULTS / f"{name}.md").write_text("\n".join(lines) + "\n")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="reduced settings (QUICK) that fit a shared 2-core CPU")
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    p.add_argument("--counts", nargs="+", type=int)
    p.add_argument("--eval-windows", type=int, help="0 = the whole test split")
    p.add_argument("--cal-windows", type=int)
    p.add_argument("--seq-len", type=int)
    p.add_argument("--importance-samples", type=int)
    p.add_argument("--sleb-samples", type=int)
    p.add_argument("--steps", type=int, help="distillation steps per removed block (fuse and remove_heal)")
    p.add_argument("--iterative", type=lambda s: s.lower() in ("1", "true", "yes"), help="rescore MI after each removal")
    p.add_argument("--rank", type=int, default=128)
    p.add_argument("--group-size", type=int, default=7)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--fuse-lr", type=float, default=1e-2)
    p.add_argument("--heal-lr", type=float, default=3e-4)
    p.add_argument("--loss", default="mse", choices=("mse", "kl"))
    p.add_argument("--fold-each", type=lambda s: s.lower() in ("1", "true", "yes"), default=True,
                   help="fuse: fold after each block, freezing earlier coefficients (default true; false = append as the public code)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
    p.add_argument("--threads", type=int, default=1, help="torch intra-op threads (1: steady on a shared CPU)")
    p.add_argument("--name", help="results file stem (default depth / depth_quick)")
    p.add_argument("--merge", nargs="+", metavar="STEM", help="combine the rows of earlier results files into --name")
    p.add_argument("--one", nargs=2, metavar=("METHOD", "COUNT"), help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    for key, value in (QUICK if a.quick else FULL).items():
        if getattr(a, key) is None:
            setattr(a, key, value)
    a.name = a.name or ("depth_quick" if a.quick else "depth")
    return a


def main(argv=None) -> None:
    a = parse_args(argv)
    torch.set_num_threads(a.threads)
    if a.merge:  # rows of several (parallel) runs into one table, in METHODS order
        rows = [r for stem in a.merge for r in json.loads((RESULTS / f"{stem}.json").read_text())["rows"]]
        rows.sort(key=lambda r: (r["count"], METHODS.index(r["method"])))
        write_tables(rows, a, a.name)
        return
    if a.one:
        print("RESULT " + json.dumps(run_one(a.one[0], int(a.one[1]), a)), flush=True)
        return
    rows: list[dict] = []
    jobs = [("dense", 0)] * ("dense" in a.methods) + [(m, c) for c in a.counts for m in a.methods if m != "dense"]
    passthrough = [arg for arg in (argv if argv is not None else sys.argv[1:])]
    for method, count in jobs:
        print(f"[bench_depth] {method} count={count} ...", file=sys.stderr, flush=True)
        proc = subprocess.run([sys.executable, __file__, *passthrough, "--one", method, str(count)],
                              capture_output=True, text=True, env={**os.environ, "TOKENIZERS_PARALLELISM": "false"})
        result = next((line[7:] for line in proc.stdout.splitlines() if line.startswith("RESULT ")), None)
        if proc.returncode != 0 or result is None:
            print(proc.stderr[-3000:], file=sys.stderr)
            raise SystemExit(f"{method} count={count} failed (exit {proc.returncode})")
        rows.append(json.loads(result))
        r = rows[-1]
        print(f"[bench_depth] {method} count={count}: ppl {r['perplexity']:.2f}, compress {r['compress_s']:.0f}s", file=sys.stderr, flush=True)
        write_tables(rows, a, a.name)


if __name__ == "__main__":
    main()
