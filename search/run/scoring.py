"""Journalled scoring: every finished evaluation is on disk before anything else happens.

`Scorer.evaluate(candidates, split)` returns one `Evaluation` per candidate: from the journal
when it was finished before (a resumed run never repeats one), else scored now by the actor
pool and appended to the journal the moment it arrives. A plan that cannot apply to the base
architecture fails here, before any work, as a failed evaluation with its reason.
"""
from __future__ import annotations

import sys
import time
from collections import deque
from dataclasses import dataclass, field, replace
from typing import Callable

from tqdm.auto import tqdm

from compression.plan import PlanError, check_plan

from search.errors import RunFailed
from search.run import faults
from search.run.candidate import Candidate, Evaluation
from search.run.store import RunStore
from search.run.weights import WeightBank
from search.run.workers import EvaluatorPool, Next, ScoreJob

STOPPED = "stopped"  # the status (and journal stage key) of a candidate stopped by staged fitness


def check_generation(evaluations, what: str) -> None:
    """Stop with one line when every candidate of the first population failed: there is
    nothing to select from, and the reason is almost always the same for all (bad data, a
    broken model). The run loop calls it after the first population's scoring."""
    failed = all_failed(evaluations)
    if failed:
        raise RunFailed(f"{what}: {failed}")


def all_failed(evaluations) -> str | None:
    """'all N candidates failed, e.g. ID: REASON' when none of `evaluations` was scored (a stop
    is a scored candidate; read a stop for failing through `failure_of` first), else None."""
    evaluations = list(evaluations)
    if not evaluations or any(e.ok or e.status == STOPPED for e in evaluations):
        return None
    first = evaluations[0]
    return f"all {len(evaluations)} candidates failed, e.g. {first.id}: {first.reason or first.status}"


def failure_of(result: Evaluation, journal: dict) -> Evaluation:
    """The row a staged candidate failed with: a stop for failing at a stage (rule `failed`,
    reason 'failed at stage k') read through to that stage's journalled row and its error."""
    if result.status == STOPPED and result.extra.get("rule") == "failed":
        return journal.get((result.id, result.split, result.stage), result)
    return result


def journal_key(evaluation: Evaluation) -> tuple:
    """(id, split, stage): one row per stage scored; a stop is its own row (stage STOPPED)."""
    return evaluation.id, evaluation.split, STOPPED if evaluation.status == STOPPED else evaluation.stage


def is_whole(job: ScoreJob, task_weights: dict[str, float]) -> bool:
    """Whether a job scores every item of every task of the run: its score is comparable with
    a member's (a staged subset's or a proxy's is not: progress bars say so)."""
    return job.indices is None and job.subsample is None and (job.tasks is None or set(job.tasks) == set(task_weights))


def stage_weights(job: ScoreJob, task_weights: dict[str, float]) -> dict[str, float]:
    """The aggregate's weights over the tasks a job scores (a proxy task weighs 1)."""
    if job.tasks is None:
        return task_weights
    return {t: task_weights.get(t, 1.0) for t in job.tasks}


class Log:
    """Progress bars and log lines on stderr that do not break each other."""

    def __init__(self, quiet: bool):
        self.quiet = quiet

    def __call__(self, message: str) -> None:
        if not self.quiet:
            tqdm.write(message, file=sys.stderr)

    def warn(self, message: str) -> None:
        """A line shown even with --quiet."""
        tqdm.write(f"evofuse: warning: {message}", file=sys.stderr)

    def bar(self, total: int, desc: str) -> tqdm:
        return tqdm(total=total, desc=desc, disable=self.quiet, file=sys.stderr, leave=False)


@dataclass
class Scorer:
    store: RunStore
    pool: EvaluatorPool
    weights: WeightBank
    task_weights: dict[str, float]
    base_config: object  # the dense model's transformers config (plans are checked against it)
    log: Log
    journal: dict = field(default_factory=dict)  # (id, split, stage) -> Evaluation
    joiners: dict = field(default_factory=dict)  # task -> its kind's joined_metrics (`Evaluation.joined`)

    def __post_init__(self) -> None:
        for evaluation in map(Evaluation.from_json, self.store.read_journal()):
            self.journal[journal_key(evaluation)] = evaluation

    def finished(self, candidate_id: str, split: str = "dev", stage: int | str | None = None) -> Evaluation | None:
        """A journalled evaluation: unstaged (None), of one stage, or the stop (STOPPED)."""
        return self.journal.get((candidate_id, split, stage))

    def evaluate(self, jobs: list[ScoreJob], desc: str, follow: Callable[[Evaluation], ScoreJob | None] | None = None,
                 release: Callable[[Evaluation], list[ScoreJob]] | None = None,
                 may_release: Callable[[ScoreJob], bool] | None = None) -> dict[str, Evaluation]:
        """Evaluations by candidate id (each candidate's last): journalled ones as they are, the
        rest scored now.

        `follow(evaluation)` chains jobs: it returns the candidate's next job (its next stage)
        or None; a follow-up runs on the actor that just scored the candidate (which still holds
        its compressed model). `release(evaluation)` returns the jobs an evaluation lets start
        on any actor, queued behind the rest (a family's next stage, once its last sibling is in);
        `may_release(job)` says which jobs' evaluations can (default: all, with `release`).
        Both see journalled evaluations too, so a resumed run walks the same chains. A job
        running as idle-time work (`score_when_idle`) is not scored again: it is journalled
        when it finishes (`evaluate_final` waits for it).
        """
        follow = follow or (lambda evaluation: None)
        release = release or (lambda evaluation: [])
        results: dict[str, Evaluation] = {}
        bar = self.log.bar(len(jobs), desc)
        todo: dict[str, ScoreJob] = {}

        def released_by(evaluation: Evaluation) -> list[ScoreJob]:
            more = release(evaluation)
            if more:
                bar.total += len(more)
                bar.refresh()
            return more

        in_flight = self.pool.spare_in_flight()
        replay = deque(jobs)
        while replay:  # each chain through the journal to its first unfinished job; what a
            job = replay.popleft()  # journalled row released joins the end, as it did when scored
            while job is not None and (job.id, job.split, job.stage) in self.journal:
                results[job.id] = self.journal[(job.id, job.split, job.stage)]
                replay.extend(released_by(results[job.id]))
                job = follow(results[job.id])
            if job is None or (job.id, job.split, job.stage) in in_flight:
                bar.update(1)
            else:
                todo[job.id] = job

        bests: dict[str, float] = {}  # shown: the best whole score and the best stage score, apart

        def on_result(result: dict) -> Next:
            job = todo.pop(result["id"])
            evaluation = self.arrived(job, result)
            results[evaluation.id] = evaluation
            released = [(j, self.weights.inputs_of(j.candidate.recipe)) for j in released_by(evaluation)]
            todo.update((j.id, j) for j, _ in released)
            nxt = follow(evaluation)
            if nxt is None:
                bar.update(1)
                label = "best" if is_whole(job, self.task_weights) else "stage best"  # not comparable
                bests[label] = max(bests.get(label, float("-inf")), evaluation.score)
                bar.set_postfix({k: f"{v:.4f}" for k, v in sorted(bests.items())})
                return Next(released=tuple(released))
            todo[nxt.id] = nxt
            return Next((nxt, self.weights.inputs_of(nxt.candidate.recipe)), tuple(released))

        runnable = []
        for job in list(todo.values()):
            reason = self.plan_error(job.candidate)
            if reason is None:
                runnable.append((job, self.weights.inputs_of(job.candidate.recipe)))
            else:
                on_result({"id": job.id, "split": job.split, "status": "failed", "metrics": {}, "reason": reason, "attempts": 0})
        may_release = may_release or (lambda job: release is not None)
        self.pool.run(runnable, on_result, may_release)
        bar.close()
        return results

    def arrived(self, job: ScoreJob, result: dict) -> Evaluation:
        """A worker's result as the journalled evaluation of `job` (a stage that adds items
        joined with the stage before it: the whole stage)."""
        evaluation = Evaluation.from_worker(job.candidate, job.split, result, time.time(), job.stage)
        if job.extends is not None:
            evaluation = evaluation.joined(self.journal[(job.id, job.split, job.extends)], self.joiners)
            job = replace(job, tasks=tuple(evaluation.metrics) or job.tasks)
        evaluation = evaluation.with_score(stage_weights(job, self.task_weights))
        self.record(evaluation)
        if not evaluation.ok:
            self.log(f"{evaluation.id}: {evaluation.status} ({evaluation.reason or ''}), worst fitness")
        elif evaluation.attempts > 1:
            self.log(f"{evaluation.id}: scored after {evaluation.attempts} attempts (worker replaced)")
        return evaluation

    def score_when_idle(self, jobs: list[ScoreJob]) -> None:
        """From now on, the idle-time work is `jobs`: scored, in order, on actors that would
        otherwise wait (`EvaluatorPool.add_spare`), each journalled when it finishes; nothing
        reads them before `evaluate_final` (the test splits of the run's parents and of the
        members that would be final, scored in the generations' idle time instead of after
        them). Work queued before and not started is dropped (a member no longer final); what is
        journalled or running is not queued again."""
        self.pool.drop_spare()
        running = self.pool.spare_in_flight()
        todo = [job for job in jobs if (key := (job.id, job.split, job.stage)) not in self.journal and key not in running]
        if todo:
            self.pool.add_spare([(job, self.weights.inputs_of(job.candidate.recipe)) for job in todo], self.arrived)

    def evaluate_final(self, jobs: list[ScoreJob], desc: str) -> None:
        """Score `jobs`, the idle-time work among them included: what never started is scored
        with the rest, what is running is waited for (journalled)."""
        self.pool.drop_spare()
        self.evaluate(jobs, desc)
        self.pool.drain()

    def record(self, evaluation: Evaluation) -> None:
        """Journal an evaluation (fsynced) before anything else can happen to it."""
        self.store.append_journal(evaluation.to_json())
        faults.stall_after_journal(evaluation.id)
        self.journal[journal_key(evaluation)] = evaluation

    def plan_error(self, candidate: Candidate) -> str | None:
        """Why a candidate's plan cannot apply to the base architecture, or None."""
        if not candidate.plan:
            return None
        try:
            check_plan(candidate.steps, self.base_config)
        except PlanError as exc:
            return f"PlanError: {exc}"
        return None


__all__ = ["Scorer", "Log", "RunFailed", "check_generation", "journal_key", "STOPPED"]
