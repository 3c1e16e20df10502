"""Search throughput: candidates per hour, and in-place overwrite vs reloading a model.

Two measurements, side by side in one run:

1. In-place vs reload (issue 2's ratio). One Evolver offspring of two parents is made and the
   working model prepared for scoring, (a) the evofuse way: `materialize` writes each tensor
   straight into the live model's parameters; (b) the naive way: materialise a fresh state
   dict, save it as safetensors, and `from_pretrained` a new model from the directory.
   Median of N alternating repetitions; ratio = reload / in-place.
2. Candidates per hour of a finished run directory (e.g. `runs/demo` after `make demo`), with
   the time split into materialise (actors building weights), score (actors on the dev sets)
   and overhead (everything else: Ray scheduling, journal, selection, checkpoints), from the
   journal's per-candidate timings and the logbook's wall time per generation.

    python -m benchmarks.bench_search --quick            # tiny model, seconds
    python -m benchmarks.bench_search --run runs/demo    # SmolLM2-135M + the demo run
"""
from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import torch

from evolve.materialize import materialize
from evolve.recipe import Recipe
from search.models.sources import load_model, load_state

RESULTS = Path(__file__).resolve().parent / "results"


def _noisy_copy(state: dict[str, torch.Tensor], seed: int) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return {k: v + 0.01 * torch.randn(v.shape, generator=gen) * v.std().clamp_min(1e-3) for k, v in state.items()}


def in_place_vs_reload(source: str, repeats: int) -> dict:
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    model, tokenizer = load_model(source)
    base = load_state(source)
    weights = {"a": _noisy_copy(base, 1), "b": _noisy_copy(base, 2)}
    names = sorted(base)
    params = {n: p.data for n, p in model.state_dict(keep_vars=True).items() if n in base}
    in_place, reload = [], []
    with tempfile.TemporaryDirectory() as tmp:
        for rep in range(repeats):
            recipe = Recipe(op="evolver", inputs=("a", "b"), params={"F": 0.5, "CR": 0.5}, seed=rep)
            start = time.perf_counter()
            materialize(recipe, weights, names, out=params)
            in_place.append(time.perf_counter() - start)

            start = time.perf_counter()
            state = materialize(recipe, weights, names)
            model.save_pretrained(tmp, state_dict=state)
            fresh = AutoModelForCausalLM.from_pretrained(tmp, dtype=torch.float32).eval()
            reload.append(time.perf_counter() - start)
            del fresh, state
    med_in, med_re = statistics.median(in_place), statistics.median(reload)
    return {
        "source": source,
        "parameters": sum(p.numel() for p in model.parameters()),
        "repeats": repeats,
        "in_place_s": round(med_in, 4),
        "reload_s": round(med_re, 4),
        "reload_over_in_place": round(med_re / med_in, 2),
    }


def run_throughput(run_dir: Path) -> dict:
    from search.config import load_config
    from search.run.store import RunStore

    store = RunStore(run_dir)
    config = load_config(store.config_path)
    offspring = [e for e in store.read_journal() if e["split"] == "dev" and e["id"].startswith("g") and "timing" in e]
    wall = sum(r["wall_s"] for r in store.read_logbook())
    materialise = sum(e["timing"]["materialize_s"] for e in offspring)
    score = sum(e["timing"]["score_s"] for e in offspring)
    workers = config.workers.count
    busy_capacity = wall * workers  # actor-seconds available during the generations
    return {
        "run": str(run_dir),
        "workers": workers,
        "candidates": len(offspring),
        "generation_wall_s": round(wall, 2),
        "candidates_per_hour": round(len(offspring) / wall * 3600, 1) if wall else None,
        "materialize_share": round(materialise / busy_capacity, 3) if wall else None,
        "score_share": round(score / busy_capacity, 3) if wall else None,
        "overhead_share": round(1 - (materialise + score) / busy_capacity, 3) if wall else None,
        "mean_materialize_s": round(materialise / max(1, len(offspring)), 3),
        "mean_score_s": round(score / max(1, len(offspring)), 3),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="tiny model instead of SmolLM2-135M")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--run", type=Path, help="a finished run directory to report throughput for")
    args = parser.parse_args()
    torch.set_num_threads(2)
    source = "tiny-llama" if args.quick else "smollm2-135m"
    result = {"in_place_vs_reload": in_place_vs_reload(source, args.repeats)}
    if args.run:
        result["throughput"] = run_throughput(args.run)
    RESULTS.mkdir(parents=True, exist_ok=True)
    name = "search_quick" if args.quick else "search"
    (RESULTS / f"{name}.json").write_text(json.dumps(result, indent=1))
    lines = [f"# Search benchmark ({'quick: tiny model' if args.quick else 'SmolLM2-135M'})", ""]
    r = result["in_place_vs_reload"]
    lines += [
        "| preparing one Evolver offspring for scoring | median s |",
        "|---|---|",
        f"| in place (materialise into the live model) | {r['in_place_s']} |",
        f"| reload (materialise, save safetensors, from_pretrained) | {r['reload_s']} |",
        f"| **ratio reload / in place** | **{r['reload_over_in_place']}x** |",
        "",
    ]
    if "throughput" in result:
        t = result["throughput"]
        lines += [
            f"Run `{t['run']}` ({t['workers']} workers): **{t['candidates_per_hour']} candidates/hour**; "
            f"actor time split: materialise {t['materialize_share']:.1%}, score {t['score_share']:.1%}, "
            f"overhead {t['overhead_share']:.1%} (mean per candidate: materialise {t['mean_materialize_s']} s, "
            f"score {t['mean_score_s']} s).",
            "",
        ]
    (RESULTS / f"{name}.md").write_text("\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
