"""Do two runs' first stages judge the same candidates alike? Offline, from two journals of one seed
(issue 14: the joint demo's KL stage screened in bfloat16 against float32).

Two joint runs of one config and seed make the same first generation: the same candidates (ids,
recipes, plans), screened by the `kl` proxy. When the runs differ only in how the proxy is
computed (`fitness.screen_dtype`), comparing those candidates' first-stage rows shows what the
change does to the screen: how far each candidate's KL moved, whether each family's siblings keep
their order (Spearman within the family), and whether the same sibling went on. Later
generations are compared too as long as their candidates match (same recipe and plan under the
same id); once the runs select differently they part.

    python -m benchmarks.proxy_agreement RUN_FLOAT32 RUN_BFLOAT16 [--ignore ridge] [--out F.md]
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
from collections import defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from search.fitness.staged import spearman  # noqa: E402
from search.run.store import RunStore  # noqa: E402


def first_stage(rows: list[dict]) -> dict[str, dict]:
    """Each candidate's first-stage row (the proxy), by id; later stages and decisions dropped."""
    out = {}
    for row in rows:
        if row.get("split") == "dev" and row.get("stage") == 0 and row.get("status") == "ok":
            out.setdefault(row["id"], row)
    return out


def went_on(rows: list[dict]) -> set[str]:
    """Candidates scored past the first stage that were never stopped (an audited stop has both)."""
    stopped = {row["id"] for row in rows if row.get("status") == "stopped"}
    return {row["id"] for row in rows if row.get("split") == "dev" and (row.get("stage") or 0) > 0
            and row.get("status") == "ok"} - stopped


def plan_without(plan: list[dict] | None, ignored: tuple[str, ...]) -> list[dict]:
    return [{k: v for k, v in step.items() if k not in ignored} for step in plan or []]


def same_candidate(a: dict, b: dict, ignored: tuple[str, ...] = ()) -> bool:
    """One recipe and one plan, but for the step fields in `ignored`."""
    return a.get("recipe") == b.get("recipe") and plan_without(a.get("plan"), ignored) == plan_without(b.get("plan"), ignored)


def compare(rows_a: list[dict], rows_b: list[dict], ignored: tuple[str, ...] = ()) -> dict:
    a, b = first_stage(rows_a), first_stage(rows_b)
    common = [cid for cid in a if cid in b and same_candidate(a[cid], b[cid], ignored)]
    families: dict[tuple, list[str]] = defaultdict(list)
    for cid in common:
        families[(a[cid].get("generation"), a[cid].get("target"))].append(cid)
    on_a, on_b = went_on(rows_a), went_on(rows_b)
    per_family = []
    for (generation, target), ids in sorted(families.items(), key=str):
        if len(ids) < 2:
            continue
        xs, ys = [a[c]["score"] for c in ids], [b[c]["score"] for c in ids]
        chosen_a, chosen_b = sorted(set(ids) & on_a), sorted(set(ids) & on_b)
        per_family.append({"generation": generation, "member": target, "siblings": len(ids),
                           "spearman": round(spearman(xs, ys), 3), "went_on_a": chosen_a, "went_on_b": chosen_b,
                           "same_choice": chosen_a == chosen_b})
    shifts = [b[c]["score"] - a[c]["score"] for c in common]
    relative = [abs(b[c]["score"] - a[c]["score"]) / abs(a[c]["score"]) for c in common if a[c]["score"]]
    return {
        "common_candidates": len(common),
        "score_shift_mean": round(statistics.fmean(shifts), 5) if shifts else None,
        "relative_shift_median": round(statistics.median(relative), 4) if relative else None,
        "relative_shift_max": round(max(relative), 4) if relative else None,
        "families": per_family,
        "same_choice": sum(f["same_choice"] for f in per_family),
        "spearman_median": round(statistics.median(f["spearman"] for f in per_family), 3) if per_family else None,
    }


def report(result: dict, names: tuple[str, str]) -> str:
    lines = [f"# First stage of `{names[1]}` against `{names[0]}`", "",
             f"{result['common_candidates']} candidates in both runs; score (-KL) shift {result['score_shift_mean']} "
             f"on average, relative |shift| median {result['relative_shift_median']}, max {result['relative_shift_max']}; "
             f"the same sibling went on in {result['same_choice']} of {len(result['families'])} families; "
             f"Spearman within a family, median {result['spearman_median']}.", "",
             "| generation | member | siblings | Spearman | went on (a) | went on (b) |", "|---|---|---|---|---|---|"]
    lines += [f"| {f['generation']} | {f['member']} | {f['siblings']} | {f['spearman']} | {', '.join(f['went_on_a']) or '–'} | "
              f"{', '.join(f['went_on_b']) or '–'} |" for f in result["families"]]
    return "\n".join(lines) + "\n"


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("run_a", type=Path)
    p.add_argument("run_b", type=Path)
    p.add_argument("--out", type=Path)
    p.add_argument("--ignore", nargs="*", default=[],
                   help="plan step fields that may differ, e.g. ridge (an unreconstructed KL stage never reads it)")
    a = p.parse_args(argv)
    result = compare(RunStore(a.run_a).read_journal(), RunStore(a.run_b).read_journal(), tuple(a.ignore))
    text = report(result, (a.run_a.name, a.run_b.name))
    if a.out:
        a.out.write_text(text)
        a.out.with_suffix(".json").write_text(json.dumps(result, indent=1))
    print(text)


if __name__ == "__main__":
    main()
