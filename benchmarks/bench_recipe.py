"""Evolving weights against evolving the recipe, at equal evaluations (issue 16).

On the demo's experts (SmolLM2-135M-Instruct base, the pydoc / arith / compare LoRA experts),
same seed, every candidate scored on the full dev sets (no stages, so an evaluation is an
evaluation), one run after another:

- evolver:    Evolver on raw weights (configs/demo.yaml: F 0.5, CR 0.5, base included: four
              members, four offspring a generation);
- ties:       `mode: recipe`, CMA-ES over TIES weights and densities per expert at three depths
              (configs/recipe-demo.yaml), four trials a generation;
- dare_ties:  the same over DARE-TIES (one drop seed for every trial: common random numbers);
- both:       the recipe best as a seed of Evolver: the TIES run's first half (its best trial of
              those generations, exactly what a run that stopped there holds), then Evolver with
              that recipe as an extra member (`evolver.seeds[].recipe`) for the other half.

Reported: dev and test aggregate of each run's best member (test scored once, at the end,
never used to select), evaluations (candidates scored beyond the parents), the wall time of
the search (the generations, from the logbook; the parents' scoring is the same for all) and
actor time (materialising + scoring the candidates, summed over actors: less sensitive than wall
time to a shared CPU and to a run resumed after a failure).

    python -m benchmarks.bench_recipe            # demo task sizes, 24 evaluations each (hours on 2 busy cores)
    python -m benchmarks.bench_recipe --quick    # smaller dev/test subsets, 8 evaluations each
    python -m benchmarks.bench_recipe --tiny     # tiny test models: a smoke test of the benchmark
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"
WORK = ROOT / "benchmarks" / ".work" / "recipe"
sys.path.insert(0, str(ROOT))

from search.run.store import RunStore  # noqa: E402

QUICK_SUBSETS = {"pydoc": 8, "arith": 16, "compare": 16}  # items per split in --quick


RESUMES = 3  # a run that fails (e.g. an actor killed for memory on a shared machine) is resumed


def evofuse(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "search.cli", *args], capture_output=True, text=True)


def search(path: Path, run_dir: Path) -> None:
    """`evofuse search`, then `evofuse resume` after a failure (a resumed run ends where an
    uninterrupted one would: the results do not change, only the wall time it took)."""
    proc = evofuse("search", str(path), "--run-dir", str(run_dir), "--quiet")
    for _ in range(RESUMES):
        if proc.returncode == 0:
            return
        print(f"{run_dir.name}: failed ({proc.stderr.strip().splitlines()[-1][:200] if proc.stderr.strip() else proc.returncode}); resuming",
              file=sys.stderr)
        proc = evofuse("resume", str(run_dir), "--quiet")
    if proc.returncode != 0:
        raise SystemExit(f"evofuse search {path} failed:\n{proc.stderr[-3000:]}")


def base_config(path: Path, name: str, quick: bool) -> dict:
    """A config for the comparison: full scoring, no exports, (quick) smaller task subsets."""
    raw = yaml.safe_load(path.read_text())
    raw.update(name=name, seed=0, export_top=0)
    raw["fitness"] = {"stages": [1.0]}
    raw.setdefault("evolver", {})["offspring_per_member"] = 1
    if quick:
        for task in raw["tasks"]:
            task.setdefault("options", {})["subsample"] = QUICK_SUBSETS[task["name"]]
    return raw


def run(raw: dict, keep: bool) -> Path:
    WORK.mkdir(parents=True, exist_ok=True)
    path, run_dir = WORK / f"{raw['name']}.yaml", WORK / raw["name"]
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    state = RunStore(run_dir).read_state() if (run_dir / "state.json").is_file() else None
    if keep and state is not None and state["status"] != "finished":
        proc = evofuse("resume", str(run_dir), "--quiet")  # a run cut short before: go on with it
        if proc.returncode == 0:
            return run_dir
    if not (keep and state is not None and state["status"] == "finished"):
        if run_dir.exists():
            shutil.rmtree(run_dir)
        search(path, run_dir)
    return run_dir


def measure(run_dir: Path, label: str, generations: int | None = None) -> dict:
    """Best member's dev / test aggregate, evaluations and search wall time; `generations`:
    only the first that many (a prefix of the run: what a run stopped there holds)."""
    store = RunStore(run_dir)
    journal, logbook, state = store.read_journal(), store.read_logbook(), store.read_state()
    parents = set(state["parents"])
    if generations is not None:
        logbook = logbook[:generations]
    rows = [e for e in journal if e["split"] == "dev" and e["id"] not in parents and e.get("stage") in (None, 0)]
    if generations is not None:  # the best trial of the prefix (the seed for Evolver)
        rows = [e for e in rows if e.get("generation") is not None and e["generation"] < generations]
        best = max(rows, key=lambda e: e["score"])
    else:
        best = max(state["population"] + state["hall_of_fame"], key=lambda m: m["score"])
    test = {e["id"]: e["score"] for e in journal if e["split"] == "test"}
    return {
        "run": label,
        "evaluations": len(rows),
        "search_wall_s": round(sum(r["wall_s"] for r in logbook), 1),
        "actor_s": round(sum(e.get("timing", {}).get("materialize_s", 0) + e.get("timing", {}).get("score_s", 0)
                             for e in rows), 1),
        "best_id": best["id"],
        "best_dev": round(best["score"], 4),
        "best_test": round(test[best["id"]], 4) if best["id"] in test else None,
        "best_recipe": next((e["recipe"] for e in journal if e["id"] == best["id"] and e["split"] == "dev"), None),
    }


def parents_row(run_dir: Path) -> dict:
    store = RunStore(run_dir)
    state, journal = store.read_state(), store.read_journal()
    test = {e["id"]: e["score"] for e in journal if e["split"] == "test"}
    name, parent = max(state["parents"].items(), key=lambda kv: kv[1]["score"])
    return {"run": "best parent", "evaluations": 0, "search_wall_s": 0.0, "actor_s": 0.0, "best_id": name,
            "best_dev": round(parent["score"], 4), "best_test": round(test[name], 4) if name in test else None}


CONFIGS = {"demo": ("demo.yaml", "recipe-demo.yaml", 4), "tiny": ("tiny.yaml", "recipe-tiny.yaml", 3)}


def compare(quick: bool, keep: bool, models: str = "demo") -> list[dict]:
    evolver_config, recipe_config, per_generation = CONFIGS[models]
    generations = 2 if quick or models == "tiny" else 6
    prefix = "tiny-" if models == "tiny" else "quick-" if quick else ""
    quick = quick and models == "demo"
    rows = []

    evolver = base_config(ROOT / "configs" / evolver_config, f"{prefix}evolver", quick)
    evolver["evolver"]["generations"] = generations
    evolver_dir = run(evolver, keep)
    rows.append(measure(evolver_dir, "evolver (weights)"))

    recipe_dirs = {}
    for method in ("ties", "dare_ties"):
        raw = base_config(ROOT / "configs" / recipe_config, f"{prefix}recipe-{method}", quick)
        raw["recipe"].update(method=method, trials_per_generation=per_generation)
        raw["evolver"]["generations"] = generations
        recipe_dirs[method] = run(raw, keep)
        rows.append(measure(recipe_dirs[method], f"{method} recipe (CMA-ES)"))

    half = max(1, generations // 2)
    first_half = measure(recipe_dirs["ties"], "ties recipe, first half", generations=half)
    seeded = base_config(ROOT / "configs" / evolver_config, f"{prefix}both", quick)
    seeded["evolver"]["generations"] = generations - half
    seeded["evolver"]["seeds"] = [{"name": "ties_best", "recipe": first_half["best_recipe"]}]
    both = measure(run(seeded, keep), "both: ties recipe, then Evolver seeded with its best")
    both["evaluations"] += first_half["evaluations"]  # the recipe half (the seed's own scoring is counted)
    both["search_wall_s"] = round(both["search_wall_s"] + first_half["search_wall_s"], 1)
    both["actor_s"] = round(both["actor_s"] + first_half["actor_s"], 1)
    both["seed_dev"] = first_half["best_dev"]
    rows.append(both)
    rows.insert(0, parents_row(evolver_dir))
    return rows


def table(rows: list[dict]) -> str:
    lines = ["| approach | evaluations | search wall s | actor s | best | dev aggregate | test aggregate |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['run']} | {r['evaluations']} | {r['search_wall_s']} | {r['actor_s']} | {r['best_id']} | "
                     f"{r['best_dev']} | {r['best_test']} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="smaller dev/test subsets, 8 evaluations per approach")
    parser.add_argument("--tiny", action="store_true", help="tiny test models (a smoke test of the benchmark)")
    parser.add_argument("--keep", action="store_true", help="reuse finished runs, resume unfinished ones")
    args = parser.parse_args()
    started, load = time.time(), os.getloadavg()
    models = "tiny" if args.tiny else "demo"
    rows = compare(args.quick, args.keep, models)
    wall = round(time.time() - started)
    name = "recipe_tiny" if args.tiny else "recipe_quick" if args.quick else "recipe"
    RESULTS.mkdir(parents=True, exist_ok=True)
    meta = {"wall_s": wall, "load_average_at_start": [round(x, 2) for x in load],
            "load_average_at_end": [round(x, 2) for x in os.getloadavg()], "cpus": os.cpu_count()}
    for row in rows:
        row.pop("best_recipe", None)
    (RESULTS / f"{name}.json").write_text(json.dumps({"rows": rows, **meta}, indent=1))
    subsets = ", ".join(f"{k} {v}" for k, v in QUICK_SUBSETS.items())
    what = "tiny test models" if args.tiny else f"quick: dev/test subsets {subsets}" if args.quick else "demo task sizes"
    models_text = "configs/tiny.yaml's tiny experts" if args.tiny else "SmolLM2-135M-Instruct demo experts"
    text = (f"# Evolver weights vs evolved recipes ({what})\n\n"
            f"{models_text}, seed 0, full dev scoring, {CONFIGS[models][2]} evaluations a generation. "
            f"Whole benchmark {wall} s on {os.cpu_count()} CPUs, load average {meta['load_average_at_start'][0]} at the start, "
            f"{meta['load_average_at_end'][0]} at the end (the machine was shared).\n\n{table(rows)}\n")
    (RESULTS / f"{name}.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
