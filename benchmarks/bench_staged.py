"""Staged fitness against full scoring, side by side in one run (issue 14).

For each pair (the merge demo, the joint demo) the same config runs twice, same seed: once
with every candidate scored on the full dev sets (`fitness.stages: [1.0]`, one offspring per
member: the search as it was), once staged (the config's own `fitness` and
`evolver.offspring_per_member`). Reported per run:

- candidates judged (a candidate stopped at the first stage counts) per hour of wall time and
  per hour of actor time (scoring + materialising, summed over actors: robust to a shared CPU),
  the actor time of the run's audits (full scorings of stopped candidates, a measurement) shown
  apart and per hour also without them;
- the best member's dev and test aggregate, and the generation it was bred in;
- for staged runs: stage counts, audited candidates, the false-rejection rate and the Spearman
  correlation of first-stage and full dev scores.
Full-scoring runs are given as many generations as fit in the staged run's wall time,
measured from a first short full run's time per generation; or, on a machine shared with other
work, `--concurrent N` runs the staged run and an N-generation full run at the same time.

    python -m benchmarks.bench_staged            # SmolLM2-135M demo + joint demo (long: ~1 h on 2 cores)
    python -m benchmarks.bench_staged --quick    # tiny models, two seeds each (the seed-to-seed spread)
    python -m benchmarks.bench_staged --only joint --concurrent 10 --set workers.num_gpus=0.125 \
        --suffix _joint_h200                     # on a GPU (benchmarks/device_search.sh)
"""
from __future__ import annotations

import argparse
import copy
import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Sequence

import yaml

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"
WORK = ROOT / "benchmarks" / ".work" / "staged"
sys.path.insert(0, str(ROOT))

from search.config import apply_overrides, load_config  # noqa: E402
from search.results.report import run_status  # noqa: E402
from search.results.staging import full_dev_rows, last_stage, whole_scoring_s  # noqa: E402
from search.run.candidate import Evaluation  # noqa: E402
from search.run.store import RunStore  # noqa: E402


def evofuse(*args: str) -> None:
    proc = subprocess.run([sys.executable, "-m", "search.cli", *args], capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"evofuse {' '.join(args)} failed:\n{proc.stderr[-3000:]}")


def variant_config(raw: dict, name: str, seed: int, full: bool, generations: int | None,
                   overrides: Sequence[str] = ()) -> dict:
    """One run's config from the pair's: its name and seed, no exports; full scoring is every
    candidate on the full dev sets with one offspring per member (the search as it was). The
    `overrides` (`--set`) apply to both runs of a pair, last."""
    raw = copy.deepcopy(raw)
    raw.update(name=name, seed=seed, export_top=0)
    if full:
        raw["fitness"] = {"stages": [1.0]}
        raw["evolver"]["offspring_per_member"] = 1
    if generations is not None:
        raw["evolver"]["generations"] = generations
    return apply_overrides(raw, overrides)


def variant(config: Path, name: str, seed: int, full: bool, generations: int | None, keep: bool,
            overrides: Sequence[str] = ()) -> dict:
    """Run one config variant (or reuse it with --keep) and measure it."""
    raw = variant_config(yaml.safe_load(config.read_text()), name, seed, full, generations, overrides)
    WORK.mkdir(parents=True, exist_ok=True)
    path, run_dir = WORK / f"{name}.yaml", WORK / name
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    if not (keep and (run_dir / "state.json").is_file()):
        if run_dir.exists():
            import shutil

            shutil.rmtree(run_dir)
        started = time.time()
        evofuse("search", str(path), "--run-dir", str(run_dir), "--quiet")
        (run_dir / "command_wall_s").write_text(f"{time.time() - started:.1f}\n")
    row = measure(run_dir, name, full)
    if (run_dir / "command_wall_s").is_file():  # the whole command: start-up, generations, export
        row["command_wall_s"] = float((run_dir / "command_wall_s").read_text())
    return row


def cost(row: dict) -> float:
    """Actor seconds of one scoring: materialising the candidate and scoring it."""
    timing = row.get("timing", {})
    return timing.get("score_s", 0) + timing.get("materialize_s", 0)


def full_cost(row: dict, stage_rows: dict) -> float:
    """Actor seconds of a full evaluation: materialising, scoring every item (a last stage that
    scored only the items its screens lacked, `extends`, with theirs), less the screening
    items a future member scores apart (`fitness.screen_dtype`)."""
    timing, evaluation = row.get("timing", {}), Evaluation.from_json(row)
    scored = whole_scoring_s(evaluation, lambda k: stage_rows.get((evaluation.id, k)))
    return timing.get("materialize_s", 0) + scored - timing.get("screen_s", 0)


def measure(run_dir: Path, name: str, full: bool) -> dict:
    store = RunStore(run_dir)
    state, journal, logbook = store.read_state(), store.read_journal(), store.read_logbook()
    status = run_status(run_dir)
    dev = [e for e in journal if e["split"] == "dev"]
    judged = len({e["id"] for e in dev if e["id"].startswith("g")})
    # A stop's journal row repeats the timing of the stage row it stops: count each scoring once.
    scorings = [e for e in dev if e["id"].startswith("g") and e["status"] != "stopped"]
    actor_s = sum(cost(e) for e in scorings)
    # an audit (`fitness.audit`) is the full scoring of a stopped candidate: measurement, not search
    stopped = {e["id"] for e in dev if e["status"] == "stopped"}
    last = last_stage(load_config(store.config_path))
    audit_s = sum(cost(e) for e in scorings if e["id"] in stopped and e.get("stage") == last)
    stage_rows = {(e["id"], e.get("stage")): Evaluation.from_json(e) for e in scorings}
    full_costs = [full_cost(e, stage_rows) for e in full_dev_rows(scorings, last)]
    search_s = sum(r["wall_s"] for r in logbook)
    best = max(state["population"] + state["hall_of_fame"], key=lambda m: m["score"])
    test = {e["id"]: e for e in journal if e["split"] == "test"}
    return {
        "run": name,
        "scoring": "full" if full else "staged",
        "generations": len(logbook),
        "judged": judged,
        "search_wall_s": round(search_s, 1),
        "actor_s": round(actor_s, 1),
        "audit_actor_s": round(audit_s, 1),
        "judged_per_hour_actor_without_audit": round(judged / (actor_s - audit_s) * 3600, 1) if actor_s > audit_s else None,
        "judged_per_hour_wall": round(judged / search_s * 3600, 1) if search_s else None,
        "judged_per_hour_actor": round(judged / actor_s * 3600, 1) if actor_s else None,
        "actor_s_per_judged": round(actor_s / judged, 2) if judged else None,
        "actor_s_per_full_evaluation": round(sum(full_costs) / len(full_costs), 2) if full_costs else None,
        "best_id": best["id"],
        "best_generation": int(best["id"][1:4]) + 1 if best["id"].startswith("g") else 0,
        "best_dev": round(best["score"], 4),
        "best_test": round(test[best["id"]]["score"], 4) if best["id"] in test else None,
        "staged": status.get("staged"),
    }


def compare(config: Path, label: str, seeds: list[int], keep: bool, concurrent: int | None = None,
            full_generations: int | None = None, tag: str = "", staged_only: bool = False,
            overrides: Sequence[str] = ()) -> list[dict]:
    if concurrent:
        return [row for seed in seeds for row in side_by_side(config, label, seed, keep, concurrent, tag, overrides)]
    rows = []
    for seed in seeds:
        staged = variant(config, f"{label}-staged{tag}-s{seed}", seed, False, None, keep, overrides)
        per_generation = staged["search_wall_s"] / max(1, staged["generations"])
        staged["wall_s_per_generation"] = round(per_generation, 1)
        if staged_only:  # a variant of the staged run, compared with full runs measured before
            rows.append(staged)
            continue
        generations = full_generations
        if generations is None:  # as many full-scoring generations as fit in the staged run's time
            probe = variant(config, f"{label}-full-probe{tag}-s{seed}", seed, True, 1, keep, overrides)
            generations = max(1, round(staged["search_wall_s"] / max(probe["search_wall_s"], 1e-9)))
        full = variant(config, f"{label}-full{tag}-s{seed}", seed, True, generations, keep, overrides)
        full["equal_time_generations"] = generations
        rows += [staged, full]
    return rows


def side_by_side(config: Path, label: str, seed: int, keep: bool, full_generations: int, tag: str = "",
                 overrides: Sequence[str] = ()) -> list[dict]:
    """The staged run and a full-scoring run of `full_generations` at the same time, each with
    its own Ray runtime: both see the same machine load, so equal wall time needs no probe on a
    shared machine whose load changes by the minute (pick `full_generations` so that the full
    run ends near the staged one; both wall times are reported). A `tag` names both runs, since
    a variant's pair may run on another machine than the rows it sits beside."""
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(2) as pool:
        staged = pool.submit(variant, config, f"{label}-staged{tag}-s{seed}", seed, False, None, keep, overrides)
        full = pool.submit(variant, config, f"{label}-full{tag}-s{seed}", seed, True, full_generations, keep, overrides)
        rows = [staged.result(), full.result()]
    for row in rows:
        row["concurrent"] = True
    return rows


def machine() -> str:
    """Where the runs ran: the GPU when there is one (actors take it through `workers.num_gpus`),
    and the CPU's model and core count."""
    import os
    import platform

    import torch

    cpuinfo = Path("/proc/cpuinfo")
    lines = cpuinfo.read_text().splitlines() if cpuinfo.is_file() else []
    cpu = next((line.split(":", 1)[1].strip() for line in lines if line.startswith("model name")), platform.processor())
    gpu = f"{torch.cuda.get_device_name(0)}, " if torch.cuda.is_available() else ""
    return f"{gpu}{cpu}, {os.cpu_count()} CPUs, torch {torch.__version__}, Python {platform.python_version()}"


def table(rows: list[dict]) -> str:
    head = ["run", "scoring", "gens", "judged", "search s", "judged/h (wall)", "judged/h (actor)",
            "audit actor s", "actor s / judged", "actor s / full eval.", "best (gen)", "best dev", "best test", "stopped",
            "false rej.", "Spearman 1st/full"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        s = r["staged"] or {}
        frr = s.get("false_rejection_rate")
        rho = s.get("spearman_first_vs_full")
        lines.append("| " + " | ".join(str(x) for x in [
            r["run"], r["scoring"], r["generations"], r["judged"], r["search_wall_s"], r["judged_per_hour_wall"],
            r["judged_per_hour_actor"], r.get("audit_actor_s", "-"), r.get("actor_s_per_judged"), r.get("actor_s_per_full_evaluation"),
            f"{r['best_id']} ({r['best_generation']})", r["best_dev"], r["best_test"],
            s.get("stopped", "-"), "-" if frr is None else f"{frr:.1%} of {s['audited_margin_stops']}", "-" if rho is None else f"{rho:.2f}",
        ]) + " |")
    return "\n".join(lines)


def kept_rows(path: Path, new: list[dict]) -> list[dict]:
    """The earlier results' rows of runs not measured again (`--only joint` keeps the merge pair)."""
    if not path.is_file():
        return []
    again = {r["run"] for r in new}
    return [r for r in json.loads(path.read_text())["rows"] if r["run"] not in again]


def kept_notes(path: Path) -> str:
    """The hand-written paragraphs after an earlier results file's table (what each row's run was,
    on which machine), kept when the table is written again: everything after the first table."""
    if not path.is_file():
        return ""
    lines = path.read_text().splitlines()
    first_row = next((i for i, line in enumerate(lines) if line.startswith("|")), len(lines))
    after = next((i for i in range(first_row, len(lines)) if not lines[i].startswith("|")), len(lines))
    notes = "\n".join(lines[after:]).strip("\n")
    return f"\n{notes}\n" if notes else ""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="tiny models, two seeds")
    parser.add_argument("--keep", action="store_true", help="reuse finished runs")
    parser.add_argument("--only", choices=["merge", "joint"])
    parser.add_argument("--concurrent", type=int, metavar="GENERATIONS",
                        help="run the staged and a full run of this many generations at the same time (a shared machine)")
    parser.add_argument("--seeds", type=int, nargs="+", help="seeds of each pair (default: 0; --quick: 0 1)")
    parser.add_argument("--full-generations", type=int, metavar="N",
                        help="generations of the full-scoring runs, one after the other (no probe run)")
    parser.add_argument("--config", type=Path, help="with --only: this config instead of the demo's (a variant to compare)")
    parser.add_argument("--tag", default="", help="appended to the staged runs' names (--tag=-l8: a variant's runs)")
    parser.add_argument("--staged-only", action="store_true", help="the staged runs alone (full runs measured before)")
    parser.add_argument("--set", action="append", default=[], dest="overrides", metavar="KEY=VALUE",
                        help="set a config field in every run, as evofuse search's --set (e.g. workers.num_gpus=0.25)")
    parser.add_argument("--suffix", default="", help="results in staged{SUFFIX}.md/.json (--suffix=_h200: another machine's)")
    args = parser.parse_args()
    if args.config and not args.only:
        parser.error("--config needs --only")
    started = time.time()
    if args.quick:
        pairs = [("merge", ROOT / "configs" / "tiny-staged.yaml"), ("joint", ROOT / "configs" / "tiny-joint-staged.yaml")]
        seeds = [0, 1]
    else:
        pairs = [("merge", ROOT / "configs" / "demo.yaml"), ("joint", ROOT / "configs" / "joint-demo.yaml")]
        seeds = [0]
    seeds = args.seeds or seeds
    rows = []
    for label, config in pairs:
        if args.only and label != args.only:
            continue
        rows += compare(args.config or config, ("quick-" if args.quick else "") + label, seeds, args.keep,
                        args.concurrent, args.full_generations, args.tag, args.staged_only, args.overrides)
    name = ("staged_quick" if args.quick else "staged") + args.suffix
    RESULTS.mkdir(parents=True, exist_ok=True)
    rows = kept_rows(RESULTS / f"{name}.json", rows) + rows
    (RESULTS / f"{name}.json").write_text(json.dumps({"rows": rows, "wall_s": round(time.time() - started)}, indent=1))
    title = f"# Staged fitness vs full scoring ({'tiny models' if args.quick else 'SmolLM2-135M demo experts'})"
    settings = f"; every run with `--set {' --set '.join(args.overrides)}`" if args.overrides else ""
    text = f"{title}\n\nThe rows of this call: {machine()}{settings}.\n\n{table(rows)}\n"
    (RESULTS / f"{name}.md").write_text(text + kept_notes(RESULTS / f"{name}.md"))
    print(text)


if __name__ == "__main__":
    main()
