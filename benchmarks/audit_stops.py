"""Audit every stop of a finished staged merge run, after the fact (issue 14).

A run's own audit (`fitness.audit`) fully scores a seeded fraction of the candidates its
paired test stopped; at 5% a demo run audits one or two, too few to bound the
false-rejection rate. This benchmark scores *every* candidate stopped by the paired test
(rule `margin`) on the full dev sets, outside the run (the run directory is only read), and
reports:

- the false-rejection rate: stopped candidates that full scoring would have selected — their
  full dev score is at least their rival's (the member each challenged) and that of every
  sibling (an offspring of the same member, same generation) that went on and was scored in
  full, since (1 + lambda) replaces a member by its best offspring only
  (`search.results.staging.selection_bars`); with a one-sided 95% upper bound
  (Clopper-Pearson), so "0 of 30" reads as "at most 9.5%";
- apart, the paired test's own error against the member alone: stops whose full score is at
  least their rival's, whether or not a sibling that went on scored higher;
- with `--siblings F`, a seeded fraction F of the sibling stops (a better-ranked offspring of the
  same member went on) scored too, and counted apart: one is false when it beats the member and
  the sibling that went on, i.e. when the first stage ranked the siblings wrongly;
- the Spearman correlation of first-stage and full dev scores over the audited candidates (both kinds);
- a check that the offline scoring is the run's: candidates the run scored in full (its own
  audits and promoted ones) are re-scored here and must give the same dev score.

Weights are replayed from the journal exactly as `evofuse export` does (recipes are
deterministic), so a stopped candidate needs no stored file.

    python -m benchmarks.audit_stops benchmarks/.work/staged/merge-staged-s0 [--limit N]
"""
from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"
sys.path.insert(0, str(ROOT))

from search.config import load_config  # noqa: E402
from search.fitness import TaskSpec, build_task  # noqa: E402
from search.fitness.spec import aggregate  # noqa: E402
from search.fitness.staged import audit_selected, false_rejection_rate, spearman  # noqa: E402
from search.results.export import Replay, _journal_by_id  # noqa: E402
from search.results.staging import STOPPED, full_dev_rows, last_stage, selection_bars  # noqa: E402
from search.run.candidate import Evaluation  # noqa: E402
from search.run.store import RunStore  # noqa: E402


def upper_bound(failures: int, n: int, confidence: float = 0.95) -> float:
    """One-sided Clopper-Pearson upper bound on a rate seen as failures / n: the p at which
    seeing at most `failures` has probability 1 - confidence (bisection on the binomial CDF)."""
    if n == 0:
        return math.nan
    if failures >= n:
        return 1.0

    def cdf(p: float) -> float:
        return sum(math.comb(n, k) * p**k * (1 - p) ** (n - k) for k in range(failures + 1))

    low, high = failures / n, 1.0
    for _ in range(60):
        mid = (low + high) / 2
        low, high = (mid, high) if cdf(mid) > 1 - confidence else (low, mid)
    return high


def stops_to_audit(rows: list[dict], last: int, siblings: float = 0.0, seed: int = 0) -> tuple[list[dict], dict[str, dict]]:
    """The paired test's stops, a seeded fraction `siblings` of the sibling stops, and every full
    (last-stage) dev row of the run, by id."""
    full = {r["id"]: r for r in full_dev_rows(rows, last) if r["status"] == "ok"}
    stopped = [r for r in rows if r["split"] == "dev" and r["status"] == STOPPED]
    stops = [r for r in stopped if r.get("rule", "margin") == "margin"]
    stops += [r for r in stopped if r.get("rule") == "sibling" and audit_selected(seed, f"sibling:{r['id']}", siblings)]
    return stops, full


class OfflineScorer:
    """The run's dev tasks, scored in full on a model whose weights are replaced per candidate."""

    def __init__(self, run_dir: Path):
        from search.models.experts import resolve_parents
        from search.models.sources import load_model

        self.store = RunStore(run_dir)
        self.state = self.store.read_state()
        self.config = load_config(self.store.config_path)
        self.parent_dirs = resolve_parents(self.config, quiet=True)
        self.replay = Replay(self.store, self.state, self.parent_dirs, _journal_by_id(self.store),
                             list(self.config.evolver.exclude))
        base = self.parent_dirs[self.config.parents.base.name]
        self.model, tokenizer = load_model(base, dtype=torch.float32, device=torch.device("cpu"))
        self.params = self.model.state_dict(keep_vars=True)
        self.tasks = {t.name: build_task(TaskSpec(kind=t.kind, data=t.dev, name=t.name, options=t.options or {}), tokenizer)
                      for t in self.config.tasks}
        self.weights = {t.name: t.weight for t in self.config.tasks}

    def dev_score(self, candidate_id: str) -> float:
        for name, tensor in self.replay.weights(candidate_id).items():
            self.params[name].data.copy_(tensor)
        # keep parents and stored members only: every candidate's replay is otherwise a new model
        self.replay.cache = {k: v for k, v in self.replay.cache.items() if k in self.parent_dirs}
        with torch.no_grad():
            scores = {name: task.evaluate(self.model)["score"] for name, task in self.tasks.items()}
        return aggregate(scores, self.weights)


def audit(run_dir: Path, limit: int | None, checks: int, siblings: float = 0.0) -> dict:
    store = RunStore(run_dir)
    rows = store.read_journal()
    config = load_config(store.config_path)
    last = last_stage(config)
    stops, full = stops_to_audit(rows, last, siblings, config.seed)
    scorer = OfflineScorer(run_dir)
    started = time.time()
    # the run's own full scores, re-scored: the offline scoring must be the run's
    promoted = sorted(cid for cid in full if cid.startswith("g"))[:checks]
    agreement = [(cid, full[cid]["score"], scorer.dev_score(cid)) for cid in promoted]
    audited = []
    for stop in stops[:limit]:
        cid, rival = stop["id"], stop.get("rival")
        own = full[cid]["score"] if cid in full else scorer.dev_score(cid)
        audited.append({"id": cid, "rule": stop.get("rule", "margin"), "stage_score": stop["score"], "full_score": own, "rival": rival,
                        "rival_full_score": full[rival]["score"] if rival in full else scorer.dev_score(rival),
                        "run_audited": cid in full})
        print(f"{cid}: stage {stop['score']:.4f} full {own:.4f} rival {rival} {audited[-1]['rival_full_score']:.4f}", flush=True)
    scored = {**{cid: r["score"] for cid, r in full.items()},
              **{a["id"]: a["full_score"] for a in audited}, **{a["rival"]: a["rival_full_score"] for a in audited}}
    staged = [Evaluation.from_json(r) for r in rows if r["split"] == "dev" and r.get("stage") is not None]
    audited_ids = {a["id"] for a in audited}
    stopped = {e.id: e for e in staged if e.status == STOPPED and e.id in audited_ids}
    bars = selection_bars(stopped, scored, staged, merge=True)
    for a in audited:
        a["selection_bar"] = bars[a["id"]]
    sibling_audits = [a for a in audited if a["rule"] == "sibling"]
    audited = [a for a in audited if a["rule"] == "margin"]
    triples = [(a["stage_score"], a["full_score"], a["selection_bar"]) for a in audited]
    wins = sum(a["full_score"] >= a["selection_bar"] for a in audited)
    beat_member = sum(a["full_score"] >= a["rival_full_score"] for a in audited)
    sibling_wins = sum(a["full_score"] >= a["selection_bar"] for a in sibling_audits)
    both = audited + sibling_audits
    return {
        "run": run_dir.name,
        "stops_by_paired_test": sum(s.get("rule", "margin") == "margin" for s in stops),
        "sibling_stops": sum(r["split"] == "dev" and r["status"] == STOPPED and r.get("rule") == "sibling" for r in rows),
        "siblings_audited": len(sibling_audits),
        "sibling_false_rejections": sibling_wins,
        "sibling_false_upper_95": round(upper_bound(sibling_wins, len(sibling_audits)), 4) if sibling_audits else None,
        "sibling_candidates": sibling_audits,
        "audited": len(audited),
        "false_rejections": wins,
        "false_rejection_rate": false_rejection_rate(triples) if triples else None,
        "false_rejection_upper_95": round(upper_bound(wins, len(audited)), 4),
        "beat_member": beat_member,
        "beat_member_upper_95": round(upper_bound(beat_member, len(audited)), 4),
        "spearman_stage_vs_full": spearman([a["stage_score"] for a in both], [a["full_score"] for a in both]) if len(both) > 1 else None,
        "max_abs_diff_vs_run": max((abs(a - b) for _, a, b in agreement), default=None),
        "agreement_checked": len(agreement),
        "audit_s": round(time.time() - started, 1),
        "candidates": audited,
    }


def sibling_cell(r: dict) -> str:
    if not r.get("siblings_audited"):
        return "-"
    return (f"{r['siblings_audited']} of {r['sibling_stops']}, {r['sibling_false_rejections']} "
            f"(at most {r['sibling_false_upper_95']:.1%})")


def table(results: list[dict]) -> str:
    head = ["run", "paired-test stops", "audited", "false rejections", "rate", "95% upper bound",
            "beat the member alone", "Spearman stage/full", "offline vs run (max |diff|, n)",
            "sibling stops: audited, false (95% upper bound)", "audit s"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in results:
        rate = r["false_rejection_rate"]
        rho = r["spearman_stage_vs_full"]
        lines.append("| " + " | ".join(str(x) for x in [
            r["run"], r["stops_by_paired_test"], r["audited"], r["false_rejections"],
            "-" if rate is None else f"{rate:.1%}", "-" if not r["audited"] else f"{r['false_rejection_upper_95']:.1%}",
            "-" if not r["audited"] else
            f"{r['beat_member']} ({r['beat_member'] / r['audited']:.1%}, at most {r['beat_member_upper_95']:.1%})",
            "-" if rho is None else f"{rho:.2f}", f"{r['max_abs_diff_vs_run']:.1e}, {r['agreement_checked']}",
            sibling_cell(r), r["audit_s"]]) + " |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("runs", nargs="+", type=Path, help="finished staged merge run directories")
    parser.add_argument("--limit", type=int, help="audit at most this many stops per run")
    parser.add_argument("--checks", type=int, default=2, help="fully scored candidates re-scored to check the scoring")
    parser.add_argument("--siblings", type=float, default=0.0,
                        help="also score this seeded fraction of the sibling stops in full")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--name", default="staged_audit")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    results = [audit(run, args.limit, args.checks, args.siblings) for run in args.runs]
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / f"{args.name}.json").write_text(json.dumps(results, indent=1))
    sampled = f", and {args.siblings:.0%} of the sibling stops," if args.siblings else ""
    text = f"# Every paired-test stop{sampled} of staged demo runs, scored in full after the run\n\n{table(results)}\n"
    (RESULTS / f"{args.name}.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
