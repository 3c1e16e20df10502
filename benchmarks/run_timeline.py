"""Where a run's actor time went, read off its journal: per phase (the parents' scoring, each
generation, the test splits) its wall time, the actor seconds spent in it and how busy the
actors were, and each actor's longest waits.

Every journal row carries when it arrived (`time`) and how long its job took on the actor
(`timing`: materialising and scoring), so a job ran over [time - job s, time] on the actor named
by `worker`. A phase spans from its first job's start to its last job's end; its utilisation is
its actor seconds over (actors x wall). Rows of stopped candidates are decisions, not jobs.

    python -m benchmarks.run_timeline RUN_DIR [RUN_DIR ...] [--out benchmarks/results/NAME.md]
"""
from __future__ import annotations

import argparse
import json
from dataclasses import dataclass
from pathlib import Path

from search.run.store import RunStore


@dataclass(frozen=True)
class Job:
    start: float
    end: float
    worker: str
    phase: str

    @property
    def seconds(self) -> float:
        return self.end - self.start


def phase_of(row: dict) -> str:
    """The parents' dev scoring, generation N (its candidates' ids start gNNN), or the test splits."""
    if row.get("split") == "test":
        return "test splits"
    cid = row["id"]
    if cid[:1] == "g" and cid[1:4].isdigit():
        return f"generation {int(cid[1:4]) + 1}"
    return "parents"


def jobs_of(rows: list[dict]) -> list[Job]:
    """The actor jobs of a journal, times relative to the first job's start."""
    jobs = []
    for row in rows:
        if row.get("status") == "stopped" or row.get("time") is None:
            continue
        timing = row.get("timing") or {}
        # making, scoring, and writing a rebuilt model for its test split (`keep_s`), in that order
        seconds = timing.get("materialize_s", 0.0) + timing.get("score_s", 0.0) + timing.get("keep_s", 0.0)
        jobs.append(Job(row["time"] - seconds, row["time"], row.get("worker") or "?", phase_of(row)))
    origin = min(job.start for job in jobs)
    return [Job(j.start - origin, j.end - origin, j.worker, j.phase) for j in jobs]


def phases(jobs: list[Job]) -> list[dict]:
    """Per phase, in order of its first job: span, wall, actor seconds and utilisation."""
    actors = len({j.worker for j in jobs})
    out = {}
    for job in sorted(jobs, key=lambda j: j.start):
        p = out.setdefault(job.phase, {"phase": job.phase, "start": job.start, "end": job.end, "actor_s": 0.0, "jobs": 0})
        p["end"] = max(p["end"], job.end)
        p["actor_s"] += job.seconds
        p["jobs"] += 1
    for p in out.values():
        p["wall_s"] = p["end"] - p["start"]
        p["utilisation"] = p["actor_s"] / (actors * p["wall_s"]) if p["wall_s"] > 0 else 1.0
    return list(out.values())


def waits(jobs: list[Job], top: int = 3) -> dict[str, list[float]]:
    """Per actor, its longest gaps between one job's end and its next job's start."""
    by_worker: dict[str, list[Job]] = {}
    for job in sorted(jobs, key=lambda j: j.start):
        by_worker.setdefault(job.worker, []).append(job)
    return {w: sorted((b.start - a.end for a, b in zip(js, js[1:])), reverse=True)[:top] for w, js in by_worker.items()}


def table(run: Path, jobs: list[Job]) -> str:
    span = max(j.end for j in jobs)
    busy = sum(j.seconds for j in jobs)
    actors = len({j.worker for j in jobs})
    lines = [f"### {run}", "",
             f"{len(jobs)} jobs on {actors} actors; first job's start to last job's end **{span:.1f} s**, "
             f"actor seconds {busy:.1f}, busy {busy / (actors * span):.0%}", "",
             "| phase | start s | end s | wall s | jobs | actor s | actors busy |", "|---|---|---|---|---|---|---|"]
    lines += [f"| {p['phase']} | {p['start']:.1f} | {p['end']:.1f} | {p['wall_s']:.1f} | {p['jobs']} | {p['actor_s']:.1f} | {p['utilisation']:.0%} |"
              for p in phases(jobs)]
    lines += ["", "Longest waits per actor (s): " + "; ".join(f"{w}: {', '.join(f'{g:.1f}' for g in gs)}" for w, gs in waits(jobs).items()), ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs", nargs="+", type=Path)
    parser.add_argument("--out", type=Path, help="also write the tables here (Markdown)")
    args = parser.parse_args(argv)
    jobs = {run: jobs_of(RunStore(run).read_journal()) for run in args.runs}
    text = "\n".join(table(run, run_jobs) for run, run_jobs in jobs.items())
    print(text)
    if args.out:
        args.out.write_text(f"# Where the actor time went (`python -m benchmarks.run_timeline {' '.join(map(str, args.runs))}`)\n\n{text}")
        json_path = args.out.with_suffix(".json")
        json_path.write_text(json.dumps({str(run): phases(run_jobs) for run, run_jobs in jobs.items()}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
