"""The actor pool's scheduling, with real Ray actors that only sleep (a fresh process joining the
session's cluster): spare work fills the actors that would wait for the last jobs, never while a
job that can release more runs, goes on across `run` calls and is waited for by `drain`; the
run's last scoring leaves a spare job in flight to finish; and `benchmarks.run_timeline` reads how
busy the actors were off a journal."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

SCHEDULE = r"""
import json, os, time
import ray
from evolve.recipe import Recipe
from search.run.candidate import Candidate
from search.run.workers import EvaluatorPool, Next, ScoreJob

class Sleeper:
    def __init__(self, seconds):
        self.seconds = seconds

    def evaluate(self, job, refs):
        start = time.time()
        time.sleep(self.seconds[job.id])
        return {"id": job.id, "split": job.split, "status": "ok", "metrics": {}, "start": start, "end": time.time(),
                "actor": os.getpid()}

ray.init(include_dashboard=False, log_to_driver=False, **({} if os.environ.get("RAY_ADDRESS") else {"num_cpus": 3}))
seconds = {"long": 4.0, "releaser": 1.0, "quick": 0.1, "after": 0.2, "later": 0.2,
           "spare-1": 0.3, "spare-2": 10.0, "spare-3": 6.0, "spare-4": 0.1, **{f"warm-{k}": 0.0 for k in range(3)}}
pool = EvaluatorPool(seconds, 3, num_cpus=0, num_gpus=0, max_retries=0, actor_class=Sleeper)
job = lambda name, split="dev": (ScoreJob(Candidate(id=name, recipe=Recipe(op="copy", inputs=(name,))), split=split), {})
pool.run([job(f"warm-{k}") for k in range(3)], lambda result: None)  # every actor started: one job each
seen, spare_done = [], {}
pool.add_spare([job(f"spare-{k}", "test") for k in (1, 2, 3, 4)], lambda j, result: spare_done.update({j.id: result}))

def on_result(result):
    seen.append(result)
    return Next(released=(job("after"),)) if result["id"] == "releaser" else None

pool.run([job("long"), job("releaser"), job("quick")], on_result, may_release=lambda j: j.id == "releaser")
first = {"seen": seen[:], "spare_done": sorted(spare_done), "in_flight": len(pool.spare_running), "queued": len(pool.spare)}
seen.clear()
pool.run([job("later")], on_result)
second = {"seen": seen[:], "in_flight": sorted(map(list, pool.spare_in_flight()))}
pool.drain()
print(json.dumps({"first": first, "second": second, "spare_done": spare_done, "queued": len(pool.spare)}))
"""


def test_spare_work_waits_for_released_jobs_fills_waiting_actors_and_runs_across_runs():
    proc = subprocess.run([sys.executable, "-c", SCHEDULE], capture_output=True, text=True, timeout=300, cwd=ROOT,
                          env=dict(os.environ))
    assert proc.returncode == 0, proc.stderr[-2000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    first, second, spare = out["first"], out["second"], out["spare_done"]
    by_id = {r["id"]: r for r in first["seen"]}
    assert [r["id"] for r in first["seen"]] == ["quick", "releaser", "after", "long"]
    # an actor was free from `quick` on, but took no spare work while `releaser` could release
    # more; the spare work filled the actors `long` kept waiting. (`after` is handed out before
    # `spare-1`, but two actors read their clocks in either order, so no order is asserted between
    # their starts.)
    assert by_id["quick"]["end"] < by_id["releaser"]["end"]
    assert by_id["releaser"]["end"] <= min(by_id["after"]["start"], spare["spare-1"]["start"])
    assert all(spare[s]["start"] < by_id["long"]["end"] for s in ("spare-1", "spare-2", "spare-3"))
    # `run` returned with `long`, leaving two spare jobs running and one queued
    assert first["spare_done"] == ["spare-1"] and first["in_flight"] == 2 and first["queued"] == 1
    # the next run had one free actor, `long`'s
    assert [r["id"] for r in second["seen"]] == ["later"]
    assert second["in_flight"] == [["spare-2", "test", None], ["spare-3", "test", None]]
    assert second["seen"][0]["actor"] == by_id["long"]["actor"]
    # drain waited for the spare jobs in flight and dropped spare-4, which never started
    assert sorted(spare) == ["spare-1", "spare-2", "spare-3"] and out["queued"] == 0
    assert all(r["status"] == "ok" and r["attempts"] == 1 for r in spare.values())


def scored(name: str) -> dict:
    return {"id": name, "split": "test", "status": "ok", "metrics": {"acc": {"score": 0.5}}, "attempts": 1}


class FakePool:
    """Records what the scorer asks of the pool; one parent's test split is running as spare work."""

    def __init__(self):
        self.calls = []

    def spare_in_flight(self):
        return {("base", "test", None)}

    def drop_spare(self):
        self.calls.append("drop")

    def run(self, jobs, on_result, may_release):
        self.calls.append(("run", [job.id for job, _ in jobs]))
        for job, _ in jobs:
            on_result(scored(job.id))

    def drain(self):
        self.calls.append("drain")

    def add_spare(self, jobs, on_done):
        self.calls.append(("spare", [job.id for job, _ in jobs]))


class NoWeights:
    def inputs_of(self, recipe):
        return {}


def test_idle_time_work_is_replaced_by_the_latest_final_set_never_twice(tmp_path):
    """`score_when_idle` after a generation: the spare work not started is dropped (a member no
    longer final), then the new set is queued in its order, less what is journalled and what
    runs now."""
    from evolve.recipe import Recipe
    from search.run.candidate import Candidate
    from search.run.scoring import Log, Scorer
    from search.run.store import RunStore
    from search.run.workers import ScoreJob

    store = RunStore(tmp_path / "run")
    store.root.mkdir()
    pool = FakePool()
    scorer = Scorer(store, pool, NoWeights(), {"acc": 1.0}, base_config=None, log=Log(quiet=True))
    tests = [ScoreJob(Candidate(id=name, recipe=Recipe(op="copy", inputs=(name,))), split="test")
             for name in ("base", "a", "g000-003", "g001-000")]
    scorer.arrived(tests[1], scored("a"))  # journalled before
    scorer.score_when_idle(tests)
    assert pool.calls == ["drop", ("spare", ["g000-003", "g001-000"])]


def test_the_final_set_is_the_parents_then_the_members_oldest_first():
    """What the finish scores on the test splits, and the idle time scores ahead of it after each
    generation: parents first, then the front (joint / compress) or the best `export_top`
    members by dev score, oldest first; a published member is read from its stored weights."""
    from types import SimpleNamespace

    from evolve.population import member_from_json
    from evolve.recipe import Recipe
    from search.run.loop import Search

    def member(cid, score):
        return {"id": cid, "recipe": Recipe(op="copy", inputs=("a",)).to_dict(), "score": score,
                "plan": [{"op": "remove_blocks", "blocks": [3]}] if cid.startswith("g") else None}

    parents = SimpleNamespace(all=lambda: [SimpleNamespace(name="base"), SimpleNamespace(name="a")])
    bank = SimpleNamespace(recipe_for_test=lambda cid, recipe: Recipe(op="copy", inputs=(cid,)) if cid == "g002-001" else recipe)
    state = {"hall_of_fame": [member("g002-001", -1.0), member("a", -1.2), member("g000-004", -1.1)]}
    joint = SimpleNamespace(config=SimpleNamespace(parents=parents, export_top=1), mode=SimpleNamespace(front_of_all=True),
                            population=[], weights=bank)
    tests = Search.final_tests(joint, state)
    assert [c.id for c in tests] == ["base", "a", "g000-004", "g002-001"]
    assert tests[3].recipe.inputs == ("g002-001",) and tests[2].recipe.inputs == ("a",)
    assert tests[2].plan == ({"op": "remove_blocks", "blocks": [3]},) and tests[0].plan == ()

    population = [member_from_json(member(cid, score)) for cid, score in (("g001-002", -0.70), ("g003-000", -0.60), ("g002-005", -0.65))]
    merge = SimpleNamespace(config=SimpleNamespace(parents=parents, export_top=2), mode=SimpleNamespace(front_of_all=False),
                            population=population, weights=bank)
    assert [c.id for c in Search.final_tests(merge, state)] == ["base", "a", "g002-005", "g003-000"]


def test_the_last_scoring_leaves_running_spare_work_to_finish_and_scores_the_rest(tmp_path):
    """The run's test splits: a parent's split running as spare work is not scored twice (it is
    waited for after the rest), spare work never started is scored with the rest, finished is
    read from the journal."""
    from evolve.recipe import Recipe
    from search.run.candidate import Candidate
    from search.run.scoring import Log, Scorer
    from search.run.store import RunStore
    from search.run.workers import ScoreJob

    store = RunStore(tmp_path / "run")
    store.root.mkdir()
    pool = FakePool()
    scorer = Scorer(store, pool, NoWeights(), {"acc": 1.0}, base_config=None, log=Log(quiet=True))
    tests = [ScoreJob(Candidate(id=name, recipe=Recipe(op="copy", inputs=(name,))), split="test") for name in ("base", "a", "g001-000")]
    scorer.arrived(tests[1], scored("a"))  # journalled before
    scorer.evaluate_final(tests, "test splits")
    assert pool.calls == ["drop", ("run", ["g001-000"]), "drain"]


def test_the_timeline_reads_each_phase_s_actor_time_off_a_journal():
    """`benchmarks.run_timeline`: a job ran over [arrival - its timing, arrival] on its worker;
    stops are decisions, not jobs; a phase's busy share is its actor seconds over actors x wall."""
    from benchmarks.run_timeline import jobs_of, phases, waits

    def row(cid, split, end, seconds, worker, status="ok"):
        return {"id": cid, "split": split, "time": 100.0 + end, "worker": worker, "status": status,
                "timing": {"materialize_s": 1.0, "score_s": seconds - 1.0}}

    rows = [row("base", "dev", 10, 10, "a"), row("pydoc", "dev", 10, 10, "b"),
            row("g000-000", "dev", 20, 10, "a"), row("g000-001", "dev", 30, 20, "b"),
            row("g000-002", "dev", 30, 10, "a", status="stopped"), row("base", "test", 40, 15, "a")]
    jobs = jobs_of(rows)
    assert len(jobs) == 5 and min(j.start for j in jobs) == 0.0
    by_phase = {p["phase"]: p for p in phases(jobs)}
    assert list(by_phase) == ["parents", "generation 1", "test splits"]
    assert by_phase["generation 1"]["wall_s"] == 20 and by_phase["generation 1"]["actor_s"] == 30
    assert by_phase["generation 1"]["utilisation"] == pytest.approx(0.75)
    assert waits(jobs) == {"a": [5.0, 0.0], "b": [0.0]}
