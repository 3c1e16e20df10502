"""`evofuse merge` against `mergekit-yaml`, end to end, and one in-process Evolver offspring.

What it measures (issue 6), on SmolLM2-135M in fp32:

1. Inputs: the base (the built-in `smollm2-135m`, cached safetensors) and three "fine-tuned"
   copies made cheaply by adding seeded Gaussian noise to every tensor of the base
   (`x + 0.02 * std(x) * N(0, 1)`, seeds 1, 2, 3). They are not real fine-tunes: the merge's
   cost does not depend on what the deltas mean, only on their size.
2. For each method (linear, ties; task_arithmetic and dare_ties in the full mode), both tools
   run the same YAML from the command line, alternating (evofuse, mergekit, evofuse, ...),
   median of 5 (3 with --quick) wall-clock seconds, the ratio mergekit / evofuse per pair, and
   peak RSS of each run (`/usr/bin/time -f %M`). The outputs are compared (max abs diff).
   TIES is also run a third time in each pair without the native kernel (`EVOFUSE_NATIVE=0`:
   torch path, same output bits), so the kernel's gain is measured in the same alternation.
   mergekit-yaml is this venv's (mergekit 0.1.5 is a test dependency), else one in its own
   virtual environment (created on first use: benchmarks/.work/mergekit-venv).
3. One Evolver offspring of the whole model in process (mutation + binomial crossover over
   every tensor, as a Ray actor does it), against the memory-bandwidth floor: bytes read
   (target + reference) and written (offspring) divided by the measured copy bandwidth.

Results: benchmarks/results/merge.md and merge.json (merge_quick.* with --quick).
Usage: .venv/bin/python benchmarks/bench_merge.py [--quick] [--methods linear,ties]
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
WORK = ROOT / "benchmarks" / ".work" / "merge"
NATIVE_METHODS = ("ties",)  # merges with a native kernel: also timed without it
RESULTS = ROOT / "benchmarks" / "results"
MERGEKIT_VENV = ROOT / "benchmarks" / ".work" / "mergekit-venv"
NOISE = 0.02

CONFIGS = {
    "linear": """merge_method: linear
models:
  - model: {a}
    parameters: {{weight: 0.4}}
  - model: {b}
    parameters: {{weight: 0.3}}
  - model: {c}
    parameters: {{weight: 0.3}}
dtype: float32
""",
    "ties": """merge_method: ties
base_model: {base}
models:
  - model: {a}
    parameters: {{weight: 0.4, density: 0.5}}
  - model: {b}
    parameters: {{weight: 0.3, density: 0.5}}
  - model: {c}
    parameters: {{weight: 0.3, density: 0.5}}
parameters: {{normalize: true}}
dtype: float32
""",
    "task_arithmetic": """merge_method: task_arithmetic
base_model: {base}
models:
  - model: {a}
    parameters: {{weight: 0.4}}
  - model: {b}
    parameters: {{weight: 0.3}}
  - model: {c}
    parameters: {{weight: 0.3}}
parameters: {{lambda: 1.0}}
dtype: float32
""",
    "dare_ties": """merge_method: dare_ties
base_model: {base}
models:
  - model: {a}
    parameters: {{weight: 0.4, density: 1.0}}
  - model: {b}
    parameters: {{weight: 0.3, density: 1.0}}
  - model: {c}
    parameters: {{weight: 0.3, density: 1.0}}
dtype: float32
""",
}


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def make_inputs() -> dict[str, Path]:
    """The base directory and three noisy copies (written once, reused)."""
    from safetensors.torch import load_file, save_file

    from search.models.sources import resolve_source

    base = resolve_source("smollm2-135m")
    paths = {"base": base}
    state = None
    for index, label in enumerate(("a", "b", "c"), start=1):
        out = WORK / f"ft_{label}"
        paths[label] = out
        if (out / "model.safetensors").is_file():
            continue
        log(f"writing noisy copy {out}")
        state = state or load_file(str(base / "model.safetensors"))
        generator = torch.Generator().manual_seed(index)
        noisy = {}
        for name in sorted(state):
            tensor = state[name]
            noise = torch.randn(tensor.shape, generator=generator) * (NOISE * float(tensor.std()))
            noisy[name] = tensor + noise
        out.mkdir(parents=True, exist_ok=True)
        save_file(noisy, str(out / "model.safetensors"), metadata={"format": "pt"})
        for side in base.iterdir():
            if side.name != "model.safetensors" and side.is_file():
                (out / side.name).write_bytes(side.read_bytes())
    return paths


def ensure_mergekit() -> Path:
    """mergekit-yaml 0.1.5: this venv's when installed (the test dependency), else its own venv."""
    own = Path(sys.executable).parent / "mergekit-yaml"
    if own.exists():
        return own
    exe = MERGEKIT_VENV / "bin" / "mergekit-yaml"
    if exe.exists():
        return exe
    log(f"creating {MERGEKIT_VENV} with mergekit==0.1.5 (a few minutes)")
    subprocess.run([sys.executable, "-m", "venv", str(MERGEKIT_VENV)], check=True)
    subprocess.run([str(MERGEKIT_VENV / "bin" / "pip"), "install", "-q", "torch==2.13.0", "mergekit==0.1.5"],
                   check=True)
    return exe


def timed(command: list[str], env: dict[str, str] | None = None) -> tuple[float, float]:
    """(wall seconds, peak RSS in GB) of one command, via /usr/bin/time."""
    started = time.perf_counter()
    done = subprocess.run(["/usr/bin/time", "-f", "%M"] + command, capture_output=True, text=True,
                          env=None if env is None else {**os.environ, **env})
    wall = time.perf_counter() - started
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(command)} failed:\n{done.stderr[-3000:]}")
    peak_kb = int(done.stderr.strip().splitlines()[-1])
    return wall, peak_kb / 1e6


def compare_outputs(dir_a: Path, dir_b: Path) -> tuple[float, int, dict[str, list[int]]]:
    """(max abs diff, coordinates differing by more than 1e-6, {tensor: flat indices})."""
    from safetensors import safe_open

    def handles(d: Path):
        return [safe_open(str(f), framework="pt") for f in sorted(d.glob("*.safetensors"))]

    b_tensors = {}
    for h in handles(dir_b):
        for k in h.keys():
            b_tensors[k] = h
    worst, differing, where = 0.0, 0, {}
    for h in handles(dir_a):
        for k in h.keys():
            diff = (h.get_tensor(k).double() - b_tensors[k].get_tensor(k).double()).abs().reshape(-1)
            worst = max(worst, float(diff.max()))
            idx = (diff > 1e-6).nonzero().reshape(-1)
            if idx.numel():
                differing += idx.numel()
                where[k] = idx.tolist()
    return worst, differing, where


def at_threshold_ties(where: dict[str, list[int]], paths: dict[str, Path], density: float) -> int:
    """How many differing coordinates have |x_i - base| equal to input i's k-th largest (a tie
    at the TIES threshold, where mergekit's argsort order decides which entries it keeps)."""
    from safetensors import safe_open

    def tensor(d: Path, name: str) -> torch.Tensor:
        with safe_open(str(d / "model.safetensors"), framework="pt") as h:
            return h.get_tensor(name).reshape(-1)

    explained = 0
    for name, indices in where.items():
        base = tensor(paths["base"], name)
        idx = torch.tensor(indices)
        tied = torch.zeros(idx.numel(), dtype=torch.bool)
        for label in ("a", "b", "c"):
            magnitude = (tensor(paths[label], name) - base).abs()
            k = max(1, int(density * magnitude.numel()))
            threshold = magnitude.kthvalue(magnitude.numel() - k + 1).values
            tied |= magnitude[idx] == threshold
        explained += int(tied.sum())
    return explained


def bench_method(method: str, paths: dict[str, Path], mergekit: Path, evofuse: list[str], repeats: int) -> dict:
    config = WORK / f"{method}.yml"
    config.write_text(CONFIGS[method].format(**{k: str(v) for k, v in paths.items()}))
    out_e, out_m = WORK / f"out_evofuse_{method}", WORK / f"out_mergekit_{method}"
    native = method in NATIVE_METHODS

    def fresh(out: Path, command: list[str], env: dict[str, str] | None = None) -> tuple[float, float]:
        # each run writes into a fresh directory, as a user's first merge does: replacing the last
        # run's 538 MB file frees its pages and blocks inside the timed command (0.16 s here)
        shutil.rmtree(out, ignore_errors=True)
        return timed(command, env)

    evofuse_run = evofuse + [str(config), str(out_e), "--quiet"]
    rows = []
    for run in range(repeats):
        e = fresh(out_e, evofuse_run)
        m = fresh(out_m, [str(mergekit), str(config), str(out_m)])
        row = {"evofuse_s": e[0], "evofuse_rss_gb": e[1], "mergekit_s": m[0], "mergekit_rss_gb": m[1],
               "ratio": m[0] / e[0]}
        if native:  # the same merge without the native kernel (evolve/native.py): the same output bits
            # (tests/test_native.py), so whichever path wrote out_e last is what is compared below
            row["evofuse_torch_path_s"] = fresh(out_e, evofuse_run, {"EVOFUSE_NATIVE": "0"})[0]
            # and without the thresholds found while torch loads (evolve/prefetch.py): the same bits too
            row["evofuse_no_prefetch_s"] = fresh(out_e, evofuse_run, {"EVOFUSE_PREFETCH": "0"})[0]
        rows.append(row)
        log(f"{method} run {run + 1}: evofuse {e[0]:.2f} s {e[1]:.2f} GB | mergekit {m[0]:.2f} s {m[1]:.2f} GB"
            + (f" | evofuse torch path {row['evofuse_torch_path_s']:.2f} s, without prefetch "
               f"{row['evofuse_no_prefetch_s']:.2f} s" if native else ""))
    result = {
        "method": method,
        "runs": rows,
        "evofuse_median_s": statistics.median(r["evofuse_s"] for r in rows),
        "mergekit_median_s": statistics.median(r["mergekit_s"] for r in rows),
        "ratio_median": statistics.median(r["ratio"] for r in rows),
        "evofuse_peak_rss_gb": max(r["evofuse_rss_gb"] for r in rows),
        "mergekit_peak_rss_gb": max(r["mergekit_rss_gb"] for r in rows),
    }
    if native:
        result["evofuse_torch_path_median_s"] = statistics.median(r["evofuse_torch_path_s"] for r in rows)
        result["evofuse_no_prefetch_median_s"] = statistics.median(r["evofuse_no_prefetch_s"] for r in rows)
    result["max_abs_diff"], result["coordinates_differing"], where = compare_outputs(out_e, out_m)
    if method == "ties":
        result["differing_at_threshold_ties"] = at_threshold_ties(where, paths, 0.5)
    return result


def copy_bandwidth(nbytes: int = 512 * 2**20, repeats: int = 5) -> float:
    """Bytes moved per second by a large tensor copy (read + write counted)."""
    src = torch.ones(nbytes // 4)
    dst = torch.empty_like(src)
    dst.copy_(src)
    best = float("inf")
    for _ in range(repeats):
        started = time.perf_counter()
        dst.copy_(src)
        best = min(best, time.perf_counter() - started)
    return 2 * nbytes / best


def bench_offspring(paths: dict[str, Path], repeats: int) -> dict:
    """One Evolver offspring of the whole model, in place into a preallocated model-sized set."""
    from safetensors.torch import load_file

    from evolve.materialize import materialize
    from evolve.recipe import Recipe
    from evolve.rng import select_mask_chunks

    target = load_file(str(paths["a"] / "model.safetensors"))
    ref = load_file(str(paths["b"] / "model.safetensors"))
    out = {k: torch.empty_like(v) for k, v in target.items()}
    coordinates = sum(v.numel() for v in target.values())
    recipe = Recipe("evolver", ("a", "b"), {"F": 0.5, "CR": 0.5}, seed=7)
    weights = {"a": target, "b": ref}
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        materialize(recipe, weights, sorted(target), out=out)
        times.append(time.perf_counter() - started)
    bandwidth = copy_bandwidth()
    moved = 3 * coordinates * 4  # read target and reference, write the offspring (fp32)
    started = time.perf_counter()
    for _chunk in select_mask_chunks(7, coordinates, 0.5):  # the crossover's draws, streamed
        pass
    mask_s = time.perf_counter() - started
    started = time.perf_counter()
    torch.rand(coordinates)
    torch_rand_s = time.perf_counter() - started
    return {
        "coordinates": coordinates,
        "offspring_s_median": statistics.median(times),
        "offspring_s_runs": times,
        "bytes_moved": moved,
        "copy_bandwidth_gb_s": bandwidth / 1e9,
        "bandwidth_floor_s": moved / bandwidth,
        "ratio_to_floor": statistics.median(times) / (moved / bandwidth),
        "crossover_mask_draw_s": mask_s,
        "torch_rand_fp32_s": torch_rand_s,
    }


def write_results(result: dict, quick: bool) -> Path:
    RESULTS.mkdir(parents=True, exist_ok=True)
    stem = "merge_quick" if quick else "merge"
    (RESULTS / f"{stem}.json").write_text(json.dumps(result, indent=2) + "\n")
    lines = [
        f"# evofuse merge vs mergekit-yaml ({'quick, ' if quick else ''}median of "
        f"{', '.join(str(len(m['runs'])) + ' ' + m['method'] for m in result['methods'])} runs)",
        "",
        f"Machine: {result['machine']}. Inputs: SmolLM2-135M base + 3 noisy copies "
        f"(x + {NOISE} std(x) N(0,1), not real fine-tunes), fp32, 538 MB each. "
        "Wall clock end to end from the command line, runs alternating, each into a fresh output directory; "
        "peak RSS from /usr/bin/time.",
        "",
        "| method | evofuse s | mergekit s | speed-up (median of per-pair ratios) | evofuse peak RSS GB | mergekit peak RSS GB | max abs diff | coordinates differing > 1e-6 |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for m in result["methods"]:
        differing = f"{m['coordinates_differing']}"
        if "differing_at_threshold_ties" in m:
            differing += f" ({m['differing_at_threshold_ties']} at a threshold tie)"
        lines.append(f"| {m['method']} | {m['evofuse_median_s']:.2f} | {m['mergekit_median_s']:.2f} | "
                     f"{m['ratio_median']:.1f}x | {m['evofuse_peak_rss_gb']:.2f} | {m['mergekit_peak_rss_gb']:.2f} | "
                     f"{m['max_abs_diff']:.1e} | {differing} of 134.5M |")
    native = [m for m in result["methods"] if "evofuse_torch_path_median_s" in m]
    if native:
        lines += ["", "The same evofuse merges without the native TIES kernel (`EVOFUSE_NATIVE=0`, the torch path; "
                  "same output bits), run in the same alternation: " + "; ".join(
                      f"{m['method']} {m['evofuse_torch_path_median_s']:.2f} s, "
                      f"{m['mergekit_median_s'] / m['evofuse_torch_path_median_s']:.1f}x mergekit's median" for m in native)
                  + "."]
        lines += ["", "And without the thresholds found while torch loads (`EVOFUSE_PREFETCH=0`, evolve/prefetch.py; "
                  "same output bits), in the same alternation: " + "; ".join(
                      f"{m['method']} {m['evofuse_no_prefetch_median_s']:.2f} s, "
                      f"{m['mergekit_median_s'] / m['evofuse_no_prefetch_median_s']:.1f}x mergekit's median"
                      for m in native if "evofuse_no_prefetch_median_s" in m) + "."]
    if any("differing_at_threshold_ties" in m for m in result["methods"]):
        lines += ["", "TIES: where several entries of a task vector have exactly the k-th largest magnitude, "
                  "mergekit keeps whichever its unstable `torch.argsort` puts first (implementation-defined); "
                  "evofuse keeps the lowest indices by default (O(n); `parameters: {tie_order: mergekit}` reproduces "
                  "mergekit's choice, at the cost of sorting each such tensor). Every other coordinate agrees to 1e-6."]
    o = result.get("offspring")
    if o:
        lines += [
            "",
            "## One Evolver offspring in process (F = 0.5, CR = 0.5, all tensors)",
            "",
            f"{o['coordinates'] / 1e6:.1f}M coordinates: {o['offspring_s_median']:.3f} s (median); "
            f"floor {o['bandwidth_floor_s']:.3f} s = {o['bytes_moved'] / 1e9:.2f} GB moved / "
            f"{o['copy_bandwidth_gb_s']:.1f} GB/s copy bandwidth; ratio {o['ratio_to_floor']:.1f}x the floor. "
            f"The crossover mask alone (16-bit PCG64DXSM draws): {o['crossover_mask_draw_s']:.3f} s; "
            f"`torch.rand` fp32 for the same count: {o['torch_rand_fp32_s']:.3f} s.",
        ]
    lines += ["", f"Load average (1 min) when the benchmark started: {result['load_average_at_start']:.1f} "
              "on 2 cores shared with other work: absolute seconds are inflated, the ratios of alternating "
              "runs are the figure of merit.", "", f"Command: `{result['command']}`", ""]
    path = RESULTS / f"{stem}.md"
    path.write_text("\n".join(lines))
    return path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="3 repeats, linear and ties only")
    parser.add_argument("--methods", default=None, help="comma-separated (default: linear,ties[,task_arithmetic,dare_ties])")
    parser.add_argument("--repeats", type=int, default=None)
    parser.add_argument("--method-repeats", default="", help="per-method overrides, e.g. ties=1 (a slow mergekit run)")
    parser.add_argument("--evofuse", default=None, help="command to run evofuse merge (default: .venv/bin/evofuse merge)")
    parser.add_argument("--skip-offspring", action="store_true")
    parser.add_argument("--threads", type=int, default=1, help="torch threads for the in-process offspring")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    repeats = args.repeats or (3 if args.quick else 5)
    methods = (args.methods or ("linear,ties" if args.quick else "linear,ties,task_arithmetic,dare_ties")).split(",")
    evofuse_bin = ROOT / ".venv" / "bin" / "evofuse"
    evofuse = args.evofuse.split() if args.evofuse else (
        [str(evofuse_bin), "merge"] if evofuse_bin.exists() else [sys.executable, "-m", "search.merge"])
    WORK.mkdir(parents=True, exist_ok=True)
    paths = make_inputs()
    mergekit = ensure_mergekit()
    result = {
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, torch {torch.__version__}",
        "repeats": repeats,
        "threads_offspring": args.threads,
        "load_average_at_start": os.getloadavg()[0],
        "evofuse_command": evofuse,
        "command": " ".join([".venv/bin/python", "benchmarks/bench_merge.py"] + sys.argv[1:]),
        "methods": [],
    }
    overrides = {k: int(v) for k, v in (item.split("=") for item in args.method_repeats.split(",") if item)}
    for method in methods:  # results are rewritten after each method, so a cut-short run leaves some
        result["methods"].append(bench_method(method, paths, mergekit, evofuse, overrides.get(method, repeats)))
        write_results(result, args.quick)
    if not args.skip_offspring:
        result["offspring"] = bench_offspring(paths, repeats)
    path = write_results(result, args.quick)
    print(path.read_text())


if __name__ == "__main__":
    main()
