"""Width pruning quality table on SmolLM2-135M-Instruct: criterion × reconstruction × ratio.

    .venv/bin/python benchmarks/bench_width.py --quick      # 25% only, 8 eval windows
    .venv/bin/python benchmarks/bench_width.py              # 10/25/40%, all 95 eval windows

Perplexity is computed here, not by search/: the pydoc test topics (compression.calibration
split, last 25%) are tokenised, joined by EOS, and cut into non-overlapping 512-token windows;
each window is scored on its own (no context carried over; every token but the window's first
is predicted). `--eval-windows N` keeps N windows evenly spaced over the split.

Calibration: the first `--calib` 128-token windows of pydoc:train. The Gram statistics are
collected once, from the dense model, and shared by every configuration (this is exactly what
the `prune_width` op does internally, one pass per step); a configuration's wall time is
reported as that pass plus its own pruning time. Peak memory is the peak resident set size
above the loaded dense model while the configuration is pruned (sampled every 20 ms; the shared
statistics are counted in the pass's own peak). For that to see each configuration's own
allocations the script runs with glibc's mmap threshold fixed at 128 KiB (it re-executes itself
with MALLOC_MMAP_THRESHOLD_ set): every tensor larger than that is its own mapping, returned to
the system when freed. With glibc's default dynamic threshold, freed tensors stay in the heap and
are reused by the next configuration, whose RSS then barely moves. The results file is rewritten
after every configuration, and a re-run skips configurations already in it (the CPU is shared).
"""
from __future__ import annotations

import argparse
import copy
import json
import math
import os
import platform
import sys
import threading
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from compression.calibration import calibration_windows, pydoc_topics, token_stream  # noqa: E402
from compression.width import PruneWidthStep, collect_width_stats, prune_with_stats  # noqa: E402
from benchmarks.common import window_perplexity  # noqa: E402

CRITERIA = ("magnitude", "wanda", "second_moment", "similarity")
RECONSTRUCT = ("none", "liar", "greedy")


def rss_bytes() -> int:
    with open("/proc/self/statm") as handle:
        return int(handle.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


class PeakRSS:
    """Peak resident set size while the block runs, sampled on a thread."""

    def __init__(self, interval: float = 0.02):
        self.interval, self.peak, self._stop = interval, 0, threading.Event()

    def __enter__(self):
        self.start = rss_bytes()
        self.peak = self.start
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def _sample(self):
        while not self._stop.is_set():
            self.peak = max(self.peak, rss_bytes())
            time.sleep(self.interval)

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, rss_bytes())


def eval_windows(tokenizer, n_windows: int | None, seq_len: int = 512) -> torch.Tensor:
    ids = token_stream(tokenizer, pydoc_topics("test"))
    total = len(ids) // seq_len
    windows = torch.tensor(ids[: total * seq_len]).view(total, seq_len)  # (W, 512)
    if n_windows is not None and n_windows < total:
        pick = torch.linspace(0, total - 1, n_windows).round().long()
        windows = windows[pick]
    return windows


def ffn_attn_params(model) -> int:
    total = 0
    for block in model.model.layers:
        for lin in (block.mlp.gate_proj, block.mlp.up_proj, block.mlp.down_proj,
                    block.self_attn.q_proj, block.self_attn.k_proj, block.self_attn.v_proj, block.self_attn.o_proj):
            total += lin.weight.numel()
    return total


def write_markdown(results: dict, path: Path) -> None:
    meta = results["meta"]
    lines = [
        "# Width pruning on SmolLM2-135M-Instruct (no retraining)",
        "",
        "Commands (in order; rows from all of them): " + ", ".join(f"`{c}`" for c in meta["commands"]) + "  ",
        f"Machine: {meta['machine']}; torch threads {meta['threads']}; CPU shared with other jobs, so times are upper bounds.  ",
        f"Eval: pydoc test split, {meta['eval_windows']} non-overlapping 512-token windows "
        f"({meta['eval_tokens']} tokens; of {meta['eval_windows_total']} in the split), topics joined by EOS.  ",
        f"Calibration: {meta['calib']} × 128-token windows of pydoc:train; one statistics pass "
        f"(last run {meta['stats_seconds']:.0f} s, all runs {meta['stats_seconds_per_run']} s; peak +{meta['stats_peak_mb']:.0f} MB RSS) "
        "shared by the rows of its run.  ",
        f"Dense perplexity: **{meta['dense_ppl']:.3f}**. Other step fields: {meta['step_defaults']}.",
        "",
        "`recovered` = share of the log-perplexity lost without reconstruction (same criterion and ratio) "
        "that the reconstruction wins back. `time` = statistics pass + this row's pruning; "
        "`peak` = RSS above the loaded model while pruning.",
        "",
        "| removed (FFN+attn params) | criterion | reconstruct | ppl | recovered | time s (prune s) | peak MB |",
        "|---|---|---|---|---|---|---|",
    ]
    rows = sorted(results["rows"].values(), key=lambda r: (r["ratio"], CRITERIA.index(r["criterion"]), RECONSTRUCT.index(r["reconstruct"])))
    for r in rows:
        base = results["rows"].get(f"{r['ratio']}/{r['criterion']}/none")
        recovered = ""
        if base and r["reconstruct"] != "none":
            lost = math.log(base["ppl"]) - math.log(meta["dense_ppl"])
            recovered = f"{(math.log(base['ppl']) - math.log(r['ppl'])) / lost:.0%}" if lost > 0 else "n/a"
        lines.append(
            f"| {r['removed_fraction']:.1%} | {r['criterion']} | {r['reconstruct']} | {r['ppl']:.3f} | {recovered} | "
            f"{r['stats_seconds'] + r['prune_seconds']:.0f} ({r['prune_seconds']:.1f}) | {r['peak_mb']:.0f} |"
        )
    path.write_text("\n".join(lines) + "\n")


MMAP_THRESHOLD = "131072"  # bytes; see the module docstring (peak memory per configuration)


def main(argv=None) -> None:
    if os.environ.get("MALLOC_MMAP_THRESHOLD_") != MMAP_THRESHOLD and argv is None:
        # glibc reads the variable at start-up only: run again with it set
        os.execve(sys.executable, [sys.executable, *sys.argv], {**os.environ, "MALLOC_MMAP_THRESHOLD_": MMAP_THRESHOLD})
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="25%% only, 8 eval windows, 32 calibration windows")
    parser.add_argument("--ratios", type=float, nargs="+")
    parser.add_argument("--criteria", nargs="+", choices=CRITERIA)
    parser.add_argument("--reconstruct", nargs="+", choices=RECONSTRUCT)
    parser.add_argument("--eval-windows", type=int, help="default: 8 with --quick, all otherwise")
    parser.add_argument("--calib", type=int, help="128-token calibration windows (default 32 quick, 64 full)")
    parser.add_argument("--ridge", type=float, default=PruneWidthStep.model_fields["ridge"].default)
    parser.add_argument("--greedy-pool", type=float, default=2.0, help="<= 0 means all units")
    parser.add_argument("--greedy-rounds", type=int, default=PruneWidthStep.model_fields["greedy_rounds"].default)
    parser.add_argument("--out", type=Path, help="results path without extension")
    args = parser.parse_args(argv)
    ratios = args.ratios or ([0.25] if args.quick else [0.10, 0.25, 0.40])
    criteria, recons = args.criteria or list(CRITERIA), args.reconstruct or list(RECONSTRUCT)
    n_eval = args.eval_windows or (8 if args.quick else None)
    n_calib = args.calib or (32 if args.quick else 64)
    out = args.out or ROOT / "benchmarks" / "results" / ("width_quick" if args.quick else "width")
    out.parent.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)

    from search.models.sources import load_model

    model, tokenizer = load_model("smollm2-135m")
    windows = eval_windows(tokenizer, n_eval)
    total_windows = len(token_stream(tokenizer, pydoc_topics("test"))) // 512
    calibration = calibration_windows(tokenizer, "pydoc:train", seq_len=128, num_sequences=n_calib)
    pool = None if args.greedy_pool <= 0 else args.greedy_pool
    results_path = out.with_suffix(".json")
    results = json.loads(results_path.read_text()) if results_path.exists() else {"meta": {}, "rows": {}}
    meta = results["meta"]
    settings = {"eval_windows": windows.shape[0], "calib": n_calib, "ridge": args.ridge, "greedy_pool": pool,
                "greedy_rounds": args.greedy_rounds}
    if any(meta.get(k) != v for k, v in settings.items()):
        results = {"meta": {}, "rows": {}}  # different settings: start over
        meta = results["meta"]
    if "command" in meta:  # files written before per-run bookkeeping: keep what they measured
        meta["commands"] = [meta.pop("command")]
        meta["stats_seconds_per_run"] = [round(meta["stats_seconds"], 1)]
        for row in results["rows"].values():
            row.setdefault("stats_seconds", meta["stats_seconds"])
    command = "python benchmarks/bench_width.py " + " ".join(sys.argv[1:] if argv is None else argv)
    meta["commands"] = meta.get("commands", []) + [command]
    meta.update(settings,
                machine=f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores", threads=torch.get_num_threads(),
                eval_tokens=int(windows.numel()), eval_windows_total=total_windows,
                step_defaults=f"ridge={args.ridge}, greedy_pool={pool}, greedy_rounds={args.greedy_rounds}")
    if "dense_ppl" not in meta:
        t0 = time.time()
        meta["dense_ppl"] = window_perplexity(model, windows)
        print(f"dense ppl {meta['dense_ppl']:.3f} ({time.time() - t0:.0f} s)", flush=True)
    dense_params = ffn_attn_params(model)

    # one statistics pass over every down_proj / o_proj input, shared by all rows
    probe = PruneWidthStep(ratio=max(ratios), target="both", criterion="wanda", reconstruct="liar")
    with PeakRSS() as mem:
        t0 = time.time()
        grams = collect_width_stats(model, probe, calibration)
        stats_seconds = time.time() - t0
    meta.update(stats_seconds=stats_seconds, stats_peak_mb=(mem.peak - mem.start) / 2**20)
    meta.setdefault("stats_seconds_per_run", []).append(round(stats_seconds, 1))
    print(f"statistics pass {stats_seconds:.0f} s over {calibration.input_ids.numel()} tokens", flush=True)

    for ratio in ratios:
        for criterion in criteria:
            for reconstruct in recons:
                key = f"{ratio}/{criterion}/{reconstruct}"
                if key in results["rows"]:
                    continue
                step = PruneWidthStep(ratio=ratio, target="both", criterion=criterion, reconstruct=reconstruct,
                                      ridge=args.ridge, greedy_pool=pool, greedy_rounds=args.greedy_rounds)
                pruned = copy.deepcopy(model)
                with PeakRSS() as mem:
                    t0 = time.time()
                    prune_with_stats(pruned, step, grams)
                    prune_seconds = time.time() - t0
                ppl = window_perplexity(pruned, windows)
                results["rows"][key] = dict(
                    ratio=ratio, criterion=criterion, reconstruct=reconstruct, ppl=ppl, prune_seconds=prune_seconds,
                    stats_seconds=stats_seconds,
                    peak_mb=(mem.peak - mem.start) / 2**20,
                    removed_fraction=1 - ffn_attn_params(pruned) / dense_params,
                    intermediate_size=pruned.config.intermediate_size,
                    heads=[pruned.config.num_attention_heads, pruned.config.num_key_value_heads],
                )
                print(f"{key}: ppl {ppl:.3f}, prune {prune_seconds:.1f} s", flush=True)
                del pruned
                results_path.write_text(json.dumps(results, indent=1) + "\n")
                write_markdown(results, out.with_suffix(".md"))
    results_path.write_text(json.dumps(results, indent=1) + "\n")
    write_markdown(results, out.with_suffix(".md"))


if __name__ == "__main__":
    main()
