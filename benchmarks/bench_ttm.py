"""TTM on SmolLM2-135M: MLP layers (gate, up, down of all 30 blocks) as TT-SVD'd TTM layers.

Two measurements in one run:
1. Latency of one TTM layer against the dense nn.Linear at the model's sizes (576 -> 1536 and
   1536 -> 576), for 1 row (token-by-token decoding), 128 and 512 rows, with the contraction
   chain, with the rebuilt weight, and with the automatic choice. Median of interleaved repeats;
   ratios are taken within this one run.
2. Parameters vs perplexity at several max ranks, right after TT-SVD and after a short recovery
   (KL distillation from the dense model, only the cores trained; see compression/ttm.py).

Perplexity: non-overlapping 512-token windows over the pydoc:test topics joined by EOS (SmolLM2
tokenizer; tail shorter than a window dropped), the first `--eval-windows` of them; mean
next-token NLL over all predicted tokens. Recovery data: 128-token windows of pydoc:train.

    .venv/bin/python benchmarks/bench_ttm.py --quick     # rank 32, 2 windows, 2 recovery steps
    .venv/bin/python benchmarks/bench_ttm.py             # ranks 64 96 112, 8 windows, 15 steps
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn as nn

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from compression.calibration import calibration_windows  # noqa: E402
from compression.ttm import TTMLinear, replace_module, recover, replace_with_ttm  # noqa: E402
from benchmarks.common import window_perplexity  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results"


def median_ms(fn, repeats: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return 1000 * statistics.median(times)


@torch.no_grad()
def layer_latency(shapes, ranks, row_counts, repeats: int) -> list[dict]:
    rows = []
    for n_in, n_out in shapes:
        torch.manual_seed(0)
        dense = nn.Linear(n_in, n_out, bias=False)
        for rank in ranks:
            layer, _ = TTMLinear.from_linear(dense, rank=rank)
            for n_rows in row_counts:
                x = torch.randn(n_rows, n_in)
                timings = {}
                for mode in ("chain", "dense", "auto"):
                    layer.contraction = mode
                    timings[mode] = median_ms(lambda: layer(x), repeats)
                timings["nn.Linear"] = median_ms(lambda: dense(x), repeats)
                layer.contraction = "auto"
                rows.append(dict(shape=f"{n_in}x{n_out}", rank=rank, rows=n_rows, auto_uses_chain=layer.uses_chain(n_rows),
                                 **{f"{k}_ms": round(v, 4) for k, v in timings.items()},
                                 chain_vs_dense=round(timings["chain"] / timings["nn.Linear"], 2),
                                 auto_vs_dense=round(timings["auto"] / timings["nn.Linear"], 2)))
                print(json.dumps(rows[-1]), flush=True)
    return rows


def write(stem: str, meta: dict, latency: list[dict], quality: list[dict]) -> None:
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / f"{stem}.json").write_text(json.dumps(dict(meta=meta, latency=latency, quality=quality), indent=1))
    lines = [f"# TTM on SmolLM2-135M ({'quick' if meta['quick'] else 'full'})", "",
             f"Command: `.venv/bin/python {meta['command']}`; {meta['threads']} thread(s), shared CPU.", ""]
    if latency:
        lines += ["## Latency of one layer (ms, median; ratios within this run)", "",
                  "| shape | rank | rows | chain | rebuilt W | auto | nn.Linear | chain / dense | auto / dense |",
                  "|---|---|---|---|---|---|---|---|---|"]
    for r in latency:
        lines.append(f"| {r['shape']} | {r['rank']} | {r['rows']} | {r['chain_ms']:.3f} | {r['dense_ms']:.3f} | "
                     f"{r['auto_ms']:.3f} | {r['nn.Linear_ms']:.3f} | {r['chain_vs_dense']} | {r['auto_vs_dense']} |")
    lines += ["", "## Parameters vs perplexity (MLP layers of all 30 blocks as TTM)", "",
              f"Perplexity: first {meta['eval_windows']} non-overlapping 512-token windows of pydoc:test joined by EOS. "
              f"Recovery: {meta['recover_steps']} AdamW steps, lr {meta['lr']}, batch {meta['batch_size']} x 128 tokens of "
              f"pydoc:train, KL to the dense model, cores only.", "",
              "| variant | model params | MLP params | MLP rel. error (mean / max) | plain SVD rel. error, same params (mean) | ppl after TT-SVD | ppl after recovery | recovery s |",
              "|---|---|---|---|---|---|---|---|"]
    for r in quality:
        err = f"{r['rel_error_mean']:.3f} / {r['rel_error_max']:.3f}" if r.get("rel_error_mean") is not None else "-"
        after = f"{r['ppl_recovered']:.2f}" if r.get("ppl_recovered") is not None else "-"
        svd = f"{r['svd_rel_error_mean']:.3f}" if r.get("svd_rel_error_mean") is not None else "-"
        lines.append(f"| {r['variant']} | {r['params']:,} | {r['mlp_params']:,} | {err} | {svd} | {r['ppl']:.2f} | {after} | "
                     f"{r.get('recover_s', '-')} |")
    (RESULTS / f"{stem}.md").write_text("\n".join(lines) + "\n")


def svd_error_at_equal_params(linear: nn.Module, n_params: int) -> float:
    """Relative error of the best plain low-rank factorisation W ~ A B (rank k, k (in + out) <= n_params):
    the baseline a TTM layer of the same size has to beat."""
    weight = linear.weight.detach().double()  # (out, in)
    k = max(1, n_params // sum(weight.shape))
    s = torch.linalg.svdvals(weight)
    return (s[k:].square().sum().sqrt() / s.square().sum().sqrt()).item()


def count(model) -> tuple[int, int]:
    total = sum(p.numel() for p in model.parameters())
    mlp = sum(p.numel() for n, p in model.named_parameters() if ".mlp." in n)
    return total, mlp


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--ranks", type=int, nargs="*", default=None)
    ap.add_argument("--eval-windows", type=int, default=None)
    ap.add_argument("--recover-steps", type=int, default=None)
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--lr", type=float, default=1e-4, help="2e-3 diverged (benchmarks/results/ttm.md); 1e-4 recovers")
    ap.add_argument("--threads", type=int, default=1, help="1 by default: the shared CPU is oversubscribed")
    ap.add_argument("--source", default="smollm2-135m")
    ap.add_argument("--stem", default=None, help="results file name (default ttm / ttm_quick)")
    ap.add_argument("--skip-latency", action="store_true")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    ranks = args.ranks or ([32] if args.quick else [64, 96, 112])
    eval_windows = args.eval_windows or (2 if args.quick else 8)
    steps = args.recover_steps if args.recover_steps is not None else (2 if args.quick else 15)
    stem = args.stem or ("ttm_quick" if args.quick else "ttm")
    meta = dict(quick=args.quick, command="benchmarks/bench_ttm.py " + " ".join(sys.argv[1:]), threads=args.threads,
                eval_windows=eval_windows, recover_steps=steps, lr=args.lr, batch_size=args.batch_size, ranks=ranks)

    latency = [] if args.skip_latency else layer_latency(
        [(576, 1536), (1536, 576)], [32, 64] if not args.quick else [32], [1, 128, 512], repeats=5 if args.quick else 15)
    write(stem, meta, latency, [])

    from search.models.sources import load_model

    model, tok = load_model(args.source)
    test = calibration_windows(tok, "pydoc:test", seq_len=512).input_ids[:eval_windows]  # (N, 512)
    calib = calibration_windows(tok, "pydoc:train", seq_len=128, num_sequences=max(steps * args.batch_size, 8))
    total, mlp = count(model)
    t0 = time.perf_counter()
    quality = [dict(variant="dense", rank=None, params=total, mlp_params=mlp, ppl=window_perplexity(model, test))]
    meta["dense_eval_s"] = round(time.perf_counter() - t0, 1)
    print(json.dumps(quality[-1]), flush=True)
    write(stem, meta, latency, quality)
    for rank in ranks:
        originals, reports = replace_with_ttm(model, "mlp", rank=rank)
        total, mlp = count(model)
        errors = [r.rel_error for r in reports]
        svd_errors = [svd_error_at_equal_params(originals[r.name], r.ttm_params) for r in reports]
        row = dict(variant=f"ttm-r{rank}", rank=rank, params=total, mlp_params=mlp,
                   rel_error_mean=statistics.mean(errors), rel_error_max=max(errors),
                   svd_rel_error_mean=statistics.mean(svd_errors), ppl=window_perplexity(model, test))
        if steps:
            t0 = time.perf_counter()
            losses = recover(model, calib, steps, lr=args.lr, batch_size=args.batch_size, loss="kl", teachers=originals)
            row.update(recover_s=round(time.perf_counter() - t0, 1), kl_first=losses[0], kl_last=losses[-1],
                       ppl_recovered=window_perplexity(model, test))
        quality.append(row)
        print(json.dumps(row), flush=True)
        write(stem, meta, latency, quality)
        for name, original in originals.items():  # back to the exact dense model for the next rank
            replace_module(model, name, original)


if __name__ == "__main__":
    main()
