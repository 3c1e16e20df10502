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
- for each false stop, whether the full dev sets themselves resolve it: the paired test of the
  stages (`search.fitness.staged.compare`, the run's confidence) on every dev item, the stopped
  candidate against the one whose score it beat (`selection_holders`); a false stop the full dev
  sets do not resolve is one that full scoring would have picked by item noise as much as merit;
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
from search.fitness.staged import audit_selected, compare, false_rejection_rate, rate_upper_bound, spearman  # noqa: E402
from search.results.export import Replay, _journal_by_id  # noqa: E402
from search.results.staging import STOPPED, full_dev_rows, last_stage, selection_holders  # noqa: E402
from search.run.candidate import Evaluation  # noqa: E402
from search.run.stages import examples_of  # noqa: E402
from search.run.store import RunStore  # noqa: E402


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

    def load(self, candidate_id: str) -> None:
        """Put a candidate's weights, replayed from the journal, into the scoring model."""
        for name, tensor in self.replay.weights(candidate_id).items():
            self.params[name].data.copy_(tensor)
        # keep parents and stored members only: every candidate's replay is otherwise a new model
        self.replay.cache = {k: v for k, v in self.replay.cache.items() if k in self.parent_dirs}

    def dev_score(self, candidate_id: str) -> tuple[float, dict[str, dict]]:
        """(full dev aggregate, {task: per-example scores}) of a candidate replayed from the journal."""
        self.load(candidate_id)
        with torch.no_grad():
            metrics = {name: task.evaluate(self.model, per_example=True) for name, task in self.tasks.items()}
        return (aggregate({name: m["score"] for name, m in metrics.items()}, self.weights),
                {name: m["examples"] for name, m in metrics.items()})


def resolved_by_full_dev(stopped: dict[str, dict], holder: dict[str, dict], weights: dict[str, float],
                         confidence: float) -> dict:
    """Whether the full dev sets themselves tell a stopped candidate from the one it had to beat:
    the paired test of `search.fitness.staged.compare` on every dev item, at the run's confidence.
    `ahead_beyond_margin`: the stopped one is ahead by more than the one-sided margin, i.e. the
    difference that made the stop false is one the full dev sets resolve, not item noise."""
    c = compare(holder, stopped, weights, confidence)  # holder minus stopped
    return {"diff": round(-c.diff, 6), "std_err": round(c.std_err, 6), "margin": round(c.margin, 6),
            "ahead_beyond_margin": not c.can_still_win}


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
    agreement = [(cid, full[cid]["score"], scorer.dev_score(cid)[0]) for cid in promoted]
    tasks = tuple(scorer.weights)  # per-example full dev scores (None where the run kept none)
    examples = {cid: examples_of(Evaluation.from_json(r), tasks) for cid, r in full.items()}
    scores = {cid: r["score"] for cid, r in full.items()}

    def full_score(cid: str) -> float:  # the run's, else scored here once (a rival may recur)
        if cid not in scores:
            scores[cid], examples[cid] = scorer.dev_score(cid)
        return scores[cid]

    audited = []
    for stop in stops[:limit]:
        cid, rival = stop["id"], stop.get("rival")
        audited.append({"id": cid, "rule": stop.get("rule", "margin"), "stage": stop.get("stage", 0), "stage_score": stop["score"],
                        "full_score": full_score(cid), "rival": rival, "rival_full_score": full_score(rival),
                        "run_audited": cid in full})
        print(f"{cid}: stage {stop['score']:.4f} full {audited[-1]['full_score']:.4f} rival {rival} "
              f"{audited[-1]['rival_full_score']:.4f}", flush=True)
    staged = [Evaluation.from_json(r) for r in rows if r["split"] == "dev" and r.get("stage") is not None]
    audited_ids = {a["id"] for a in audited}
    stopped = {e.id: e for e in staged if e.status == STOPPED and e.id in audited_ids}
    holders = selection_holders(stopped, scores, staged, merge=True)
    for a in audited:
        holder = holders[a["id"]]
        a["selection_bar"], a["selection_holder"] = scores[holder], holder
        if a["full_score"] >= a["selection_bar"] and examples.get(a["id"]) and examples.get(holder):
            a["full_dev_test"] = resolved_by_full_dev(examples[a["id"]], examples[holder], scorer.weights, config.fitness.confidence)
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
        "sibling_false_upper_95": round(rate_upper_bound(sibling_wins, len(sibling_audits)), 4) if sibling_audits else None,
        "sibling_false_resolved": resolved(sibling_audits),
        "sibling_false_by_stage": by_stage(sibling_audits),
        "sibling_candidates": sibling_audits,
        "audited": len(audited),
        "false_rejections": wins,
        "false_rejection_rate": false_rejection_rate(triples) if triples else None,
        "false_rejection_upper_95": round(rate_upper_bound(wins, len(audited)), 4),
        "false_resolved": resolved(audited),
        "beat_member": beat_member,
        "beat_member_upper_95": round(rate_upper_bound(beat_member, len(audited)), 4),
        "spearman_stage_vs_full": spearman([a["stage_score"] for a in both], [a["full_score"] for a in both]) if len(both) > 1 else None,
        "max_abs_diff_vs_run": max((abs(a - b) for _, a, b in agreement), default=None),
        "agreement_checked": len(agreement),
        "audit_s": round(time.time() - started, 1),
        "candidates": audited,
    }


def by_stage(audits: list[dict]) -> dict[int, list[int]]:
    """{stage: [audited, false]} of the audited stops, by the stage they stopped after (with
    multi-step selection, `fitness.advance` per stage, a family narrows at every stage)."""
    counts: dict[int, list[int]] = {}
    for a in audits:
        cell = counts.setdefault(a["stage"], [0, 0])
        cell[0] += 1
        cell[1] += a["full_score"] >= a["selection_bar"]
    return dict(sorted(counts.items()))


def resolved(audits: list[dict]) -> int | None:
    """How many false stops the full dev sets resolve (`resolved_by_full_dev`); None if no false
    stop kept per-example scores to test."""
    tested = [a["full_dev_test"] for a in audits if "full_dev_test" in a]
    return sum(t["ahead_beyond_margin"] for t in tested) if tested else None


def rate_cell(r: dict) -> str:
    rate = r["false_rejection_rate"]
    cell = "-" if rate is None else f"{rate:.1%}"
    if r.get("false_resolved") is not None:
        cell += f" ({r['false_resolved']} resolved by the full dev sets)"
    return cell


def sibling_cell(r: dict) -> str:
    if not r.get("siblings_audited"):
        return "-"
    cell = (f"{r['siblings_audited']} of {r['sibling_stops']}, {r['sibling_false_rejections']} "
            f"(at most {r['sibling_false_upper_95']:.1%})")
    if r.get("sibling_false_resolved") is not None:
        cell += f"; {r['sibling_false_resolved']} resolved by the full dev sets"
    stages = r.get("sibling_false_by_stage") or {}
    if len(stages) > 1:
        cell += "; by stage " + ", ".join(f"{int(k) + 1}: {false} of {n}" for k, (n, false) in stages.items())
    return cell


def table(results: list[dict]) -> str:
    head = ["run", "paired-test stops", "audited", "false rejections", "rate", "95% upper bound",
            "beat the member alone", "Spearman stage/full", "offline vs run (max |diff|, n)",
            "sibling stops: audited, false (95% upper bound)", "audit s"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in results:
        rho = r["spearman_stage_vs_full"]
        lines.append("| " + " | ".join(str(x) for x in [
            r["run"], r["stops_by_paired_test"], r["audited"], r["false_rejections"],
            rate_cell(r), "-" if not r["audited"] else f"{r['false_rejection_upper_95']:.1%}",
            "-" if not r["audited"] else
            f"{r['beat_member']} ({r['beat_member'] / r['audited']:.1%}, at most {r['beat_member_upper_95']:.1%})",
            "-" if rho is None else f"{rho:.2f}", "-" if r["max_abs_diff_vs_run"] is None else f"{r['max_abs_diff_vs_run']:.1e}, {r['agreement_checked']}",
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
