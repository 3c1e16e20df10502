"""Every merge method and every example YAML: `evofuse merge` vs mergekit, side by side.

For each YAML of `benchmarks/merge_examples.py` (one per registered merge method, and the
mergekit `examples/`-style ones: fp16 / bf16, gradients, slices, a passthrough frankenmerge),
both tools run it in a fresh worker process each (evofuse first; full mode: the merge three
times in that process, median), and the table
gives: ok or the refusal, the max |diff| of the two outputs (same tensor names required),
the merge's wall seconds (imports excluded: the call itself), and the worker's peak RSS during
the merge (the kernel's high-water mark reset after the imports) and its growth over them. mergekit is 0.1.5 from this venv, called through
its Python API (`mergekit.merge.run_merge`, as `mergekit-yaml` does), with the same torch.

Models: a base and three noisy copies (x + s N(0,1), s = 0.02 / 0.03 / 0.015) of a 4-layer Llama.
--quick: the test size (hidden 64, 0.18M parameters); full: hidden 768, intermediate 2048 (28M
parameters, 0.11 GB in fp32), median of 3 runs per tool in one worker.

Random drops (dare_*, della*) run at density 0.5: the masks differ by design (mergekit draws
from its unseeded global RNG), so their max |diff| is not a parity figure; the tests check
them in distribution and at density 1.

Results: benchmarks/results/merge_table.md/.json (merge_table_quick.* with --quick).
Usage: .venv/bin/python -m benchmarks.bench_merge_table [--quick]
"""
from __future__ import annotations

import argparse
import json
import platform
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
WORK = ROOT / "benchmarks" / ".work" / "merge_table"
SIZES = {"quick": {}, "full": {"hidden_size": 768, "intermediate_size": 2048, "num_attention_heads": 12,
                                "num_key_value_heads": 4}}
NOISE = {"a": (11, 0.02), "b": (12, 0.03), "c": (13, 0.015)}


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def rss_mb(field: str = "VmRSS") -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    return float("nan")


def reset_peak_rss() -> bool:
    """Start VmHWM (the peak RSS) afresh, so that it measures the merge, not the imports."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def worker(tool: str, config_path: str, out: str, repeats: str = "1") -> None:
    """Run one merge `repeats` times in this process (a fresh output directory each time);
    print {ok, error, seconds (median), peak_rss_mb, rss_before_mb}."""
    import shutil

    import yaml

    if tool == "evofuse":
        import search.models.sources  # noqa: F401  (imported by the merge; here, so RSS growth is the merge's)
        from search.merge import run_merge

        def merge() -> None:
            run_merge(config_path, out, quiet=True)
    else:
        from mergekit.config import MergeConfiguration
        from mergekit.merge import MergeOptions
        from mergekit.merge import run_merge as mergekit_run

        def merge() -> None:
            torch.manual_seed(0)
            config = MergeConfiguration.model_validate(yaml.safe_load(Path(config_path).read_text()))
            mergekit_run(config, out, MergeOptions(quiet=True, write_model_card=False))
    before = rss_mb()
    reset = reset_peak_rss()
    error, times = None, []
    for _ in range(int(repeats)):
        shutil.rmtree(out, ignore_errors=True)
        start = time.perf_counter()
        try:
            merge()
        except Exception as exc:  # a refusal: reported, not raised
            error = f"{type(exc).__name__}: {(str(exc).strip().splitlines() or [''])[0][:200]}"
        times.append(time.perf_counter() - start)
        if error is not None:
            break
    peak = rss_mb("VmHWM") if reset else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(json.dumps({"ok": error is None, "error": error, "seconds": statistics.median(times),
                      "peak_rss_mb": peak, "rss_before_mb": before}))


def make_models(size: str) -> dict[str, Path]:
    from search.models.tiny import byte_tokenizer, tiny_llama

    root = WORK / size
    paths = {label: root / label for label in ("base", "a", "b", "c")}
    if all((p / "config.json").is_file() for p in paths.values()):
        return paths
    tokenizer = byte_tokenizer()
    for label, path in paths.items():
        model = tiny_llama(seed=0, **SIZES[size])
        if label in NOISE:
            seed, scale = NOISE[label]
            g = torch.Generator().manual_seed(seed)
            with torch.no_grad():
                for p in model.parameters():
                    p.add_(scale * torch.randn(p.shape, generator=g))
        model.save_pretrained(path)
        tokenizer.save_pretrained(path)
    return paths


def run_tool(tool: str, config: Path, out: Path, repeats: int) -> dict:
    done = subprocess.run([sys.executable, "-m", "benchmarks.bench_merge_table", "--worker", tool, str(config), str(out),
                           str(repeats)],
                          cwd=ROOT, capture_output=True, text=True)
    lines = [line for line in done.stdout.splitlines() if line.startswith("{")]
    if done.returncode != 0 or not lines:
        tail = (done.stderr.strip().splitlines() or ["no output"])[-1][:200]
        return {"ok": False, "error": f"worker failed: {tail}", "seconds": float("nan"), "peak_rss_mb": float("nan"),
                "rss_before_mb": float("nan")}
    return json.loads(lines[-1])


def max_diff(ours: Path, theirs: Path) -> tuple[float | None, str]:
    from safetensors.torch import load_file

    def load(directory: Path) -> dict:
        state = {}
        for f in sorted(directory.glob("*.safetensors")):
            state.update(load_file(str(f)))
        return state

    a, b = load(ours), load(theirs)
    if set(a) != set(b):
        return None, f"different tensors ({len(a)} vs {len(b)})"
    dtypes = {str(t.dtype).removeprefix("torch.") for t in a.values() if t.is_floating_point()}
    if any(a[n].dtype != b[n].dtype for n in a):
        return None, "different dtypes"
    worst = max((float((a[n].double() - b[n].double()).abs().max()) for n in a), default=0.0)
    layers = json.loads((ours / "config.json").read_text()).get("num_hidden_layers")
    return worst, f"{'/'.join(sorted(dtypes))}, {layers} layers"


def measure(cases: list[tuple[str, str, str]], paths: dict[str, Path], repeats: int) -> list[dict]:
    from benchmarks.merge_examples import RANDOM_DROPS

    rows = []
    for kind, name, template in cases:
        config = WORK / "configs" / f"{kind}_{name}.yml"
        config.parent.mkdir(parents=True, exist_ok=True)
        config.write_text(template.format(**{k: str(v) for k, v in paths.items()}))
        row = {"kind": kind, "name": name, "random_drops": name in RANDOM_DROPS}
        for tool in ("evofuse", "mergekit"):
            result = run_tool(tool, config, WORK / "out" / tool, repeats)
            row[tool] = {"ok": result["ok"], "error": result["error"], "seconds": result["seconds"],
                         "peak_rss_mb": result["peak_rss_mb"],
                         "merge_rss_mb": result["peak_rss_mb"] - result["rss_before_mb"]}
        if row["evofuse"]["ok"] and row["mergekit"]["ok"]:
            row["max_abs_diff"], row["output"] = max_diff(WORK / "out" / "evofuse", WORK / "out" / "mergekit")
        else:
            row["max_abs_diff"], row["output"] = None, ""
        log(f"{kind} {name}: evofuse {row['evofuse']['ok']} {row['evofuse']['seconds']:.2f}s, mergekit "
            f"{row['mergekit']['ok']} {row['mergekit']['seconds']:.2f}s, diff {row['max_abs_diff']}")
        rows.append(row)
    return rows


def cell(result: dict) -> str:
    return "ok" if result["ok"] else f"refused: {result['error']}"


def render_markdown(rows: list[dict], size: str, parameters: int, load: float, command: str, repeats: int) -> str:
    lines = [
        f"# Every merge method and example YAML: evofuse merge vs mergekit 0.1.5 ({size})", "",
        f"Machine: {platform.machine()}, {torch.get_num_threads()} torch threads, torch {torch.__version__}. "
        f"Models: a 4-layer Llama base and three noisy copies, {parameters / 1e6:.2f}M parameters each. "
        f"Each tool in a fresh process per YAML (evofuse first), the merge repeated {repeats}x in it; "
        f"seconds: the merge call (median), peak RSS: the worker's during the merge (VmHWM reset after the imports), MB, and in brackets its growth over the RSS after the imports. "
        f"Load average (1 min) at the start: {load:.1f}.", "",
        "| kind | YAML | evofuse | mergekit | max abs diff | output | evofuse s | mergekit s | evofuse peak RSS MB | mergekit peak RSS MB |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        diff = "–" if row["max_abs_diff"] is None else f"{row['max_abs_diff']:.1e}"
        if row["random_drops"] and row["max_abs_diff"] is not None:
            diff += " (random masks)"
        e, m = row["evofuse"], row["mergekit"]
        lines.append(f"| {row['kind']} | `{row['name']}` | {cell(e)} | {cell(m)} | {diff} | {row['output']} | "
                     f"{e['seconds']:.2f} | {m['seconds']:.2f} | {e['peak_rss_mb']:.0f} (+{e['merge_rss_mb']:.0f}) | "
                     f"{m['peak_rss_mb']:.0f} (+{m['merge_rss_mb']:.0f}) |")
    lines += ["", "Random drops (dare_*, della*) at density 0.5 differ by design (mergekit's masks come from "
              "its unseeded global RNG); `tests/test_mergekit_examples.py` and `tests/test_mergekit_methods.py` "
              "check their kept fraction per tensor and their rescaling against mergekit's, and equality at "
              "density 1.", "", f"Command: `{command}`", ""]
    return "\n".join(lines)


def main() -> int:
    if len(sys.argv) > 1 and sys.argv[1] == "--worker":
        worker(*sys.argv[2:5])
        return 0
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="test-size models, one run per tool")
    parser.add_argument("--only", default="", help="comma-separated YAML names (default: all)")
    args = parser.parse_args()
    from benchmarks.merge_examples import EXAMPLES, METHODS

    size = "quick" if args.quick else "full"
    load = float(Path("/proc/loadavg").read_text().split()[0])
    paths = make_models(size)
    cases = [("method", n, t) for n, t in METHODS.items()] + [("example", n, t) for n, t in EXAMPLES.items()]
    if args.only:
        wanted = set(args.only.split(","))
        cases = [c for c in cases if c[1] in wanted]
    repeats = 1 if args.quick else 3
    rows = measure(cases, paths, repeats)
    from safetensors import safe_open

    with safe_open(str(paths["base"] / "model.safetensors"), "pt") as handle:
        parameters = sum(handle.get_tensor(n).numel() for n in handle.keys())
    stem = "merge_table_quick" if args.quick else "merge_table"
    command = "python -m benchmarks.bench_merge_table" + (" --quick" if args.quick else "")
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / f"{stem}.json").write_text(json.dumps({"size": size, "parameters": parameters, "load": load,
                                                      "rows": rows}, indent=2) + "\n")
    (RESULTS / f"{stem}.md").write_text(render_markdown(rows, size, parameters, load, command, repeats))
    log(f"wrote {RESULTS / stem}.md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
