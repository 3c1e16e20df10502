"""A candidate's rebuilt model (its plan applied with its reconstruction) is kept by the job that
scores it in full and read by its test split's job, which then scores the very model its dev
scoring built, without rebuilding it; a run keeps only what its finish would test."""
from __future__ import annotations

import shutil
import socket

import pytest

from evolve.recipe import Recipe
from search.models.tiny import tiny_llama
from search.run.candidate import Candidate
from search.run.workers import Evaluator, ScoreJob, WorkerSpec, rebuilt_name, to_numpy_state

TASKS = [{"name": "pydoc", "kind": "perplexity", "dev": "pydoc:dev", "test": "pydoc:test",
          "options": {"chunk_tokens": 32, "subsample": 4}}]
# per-layer widths: the kept directory needs its structure file to load
PLAN = [{"op": "prune_width", "ratio": {0: 0.25, 2: 0.5}, "target": "both", "reconstruct": "liar"}]


@pytest.fixture()
def actor(monkeypatch, tmp_path):
    """An in-process actor of tiny-llama keeping rebuilt models under tmp_path, and its weight sets."""
    from search.models.sources import resolve_source

    monkeypatch.setattr("ray.get", lambda ref: ref)  # refs are the weight sets themselves here
    parent = {k: v.clone() for k, v in tiny_llama(seed=1).state_dict().items()}
    spec = WorkerSpec(template_dir=str(resolve_source("tiny-llama")), tasks=TASKS, names=list(parent),
                      calibration={"data": "pydoc:dev", "seq_len": 32, "num_sequences": 8},
                      rebuilt_dir=str(tmp_path / "rebuilt"), rebuilt_host=socket.gethostname())
    return Evaluator(spec), {"base": to_numpy_state(parent)}


def test_the_test_split_reads_the_model_the_full_dev_scoring_built(actor, tmp_path):
    evaluator, refs = actor
    candidate = Candidate(id="g001-003", recipe=Recipe(op="copy", inputs=("base",)), plan=PLAN)
    dev = evaluator.evaluate(ScoreJob(candidate, keep_rebuilt=True), refs)
    kept_dir = tmp_path / "rebuilt" / rebuilt_name(candidate)
    assert dev["status"] == "ok" and "keep_s" in dev["timing"] and kept_dir.is_dir()
    assert [p.name for p in (tmp_path / "rebuilt").iterdir()] == [kept_dir.name]  # no partial directory left
    working = evaluator._weights_key

    # A member's test split names its stored weights (a `copy` of its id), not the recipe: the same model.
    member = Candidate(id="g001-003", recipe=Recipe(op="copy", inputs=("g001-003",)), plan=PLAN)
    kept = evaluator.evaluate(ScoreJob(member, split="test"), {"g001-003": refs["base"]})
    assert kept["status"] == "ok" and "rebuilt_read_s" in kept["timing"]
    assert evaluator._weights_key == working  # the working model was not touched

    shutil.rmtree(kept_dir)
    rebuilt = evaluator.evaluate(ScoreJob(candidate, split="test"), refs)
    assert rebuilt["status"] == "ok" and "rebuilt_read_s" not in rebuilt["timing"]
    assert kept["metrics"] == rebuilt["metrics"] and kept["num_params"] == rebuilt["num_params"] == dev["num_params"]


def test_nothing_is_kept_unless_asked_and_a_broken_kept_model_is_rebuilt(actor, tmp_path):
    evaluator, refs = actor
    candidate = Candidate(id="g002-000", recipe=Recipe(op="copy", inputs=("base",)), plan=PLAN)
    plain = evaluator.evaluate(ScoreJob(candidate), refs)
    assert "keep_s" not in plain["timing"] and not (tmp_path / "rebuilt").exists()

    broken = tmp_path / "rebuilt" / rebuilt_name(candidate)
    broken.mkdir(parents=True)
    (broken / "config.json").write_text("{not json")
    with pytest.warns(UserWarning, match="does not load"):
        result = evaluator.evaluate(ScoreJob(candidate, split="test"), refs)
    assert result["status"] == "ok" and "rebuilt_read_s" not in result["timing"]


def test_an_actor_on_another_host_neither_keeps_nor_reads(actor, tmp_path, monkeypatch):
    evaluator, refs = actor
    candidate = Candidate(id="g001-001", recipe=Recipe(op="copy", inputs=("base",)), plan=PLAN)
    monkeypatch.setattr(socket, "gethostname", lambda: "another-node")
    dev = evaluator.evaluate(ScoreJob(candidate, keep_rebuilt=True), refs)
    assert dev["status"] == "ok" and "keep_s" not in dev["timing"] and not (tmp_path / "rebuilt").exists()


def test_a_kl_task_reads_the_dense_weights_so_its_test_split_rebuilds(monkeypatch, tmp_path):
    from search.models.sources import resolve_source

    monkeypatch.setattr("ray.get", lambda ref: ref)
    parent = {k: v.clone() for k, v in tiny_llama(seed=1).state_dict().items()}
    kl = [{"name": "kl", "kind": "kl", "dev": "pydoc:dev", "test": "pydoc:test", "options": {"seq_len": 32, "num_sequences": 2}}]
    spec = WorkerSpec(template_dir=str(resolve_source("tiny-llama")), tasks=kl, names=list(parent),
                      calibration={"data": "pydoc:dev", "seq_len": 32, "num_sequences": 8}, rebuilt_dir=str(tmp_path / "rebuilt"),
                      rebuilt_host=socket.gethostname())
    evaluator, refs = Evaluator(spec), {"base": to_numpy_state(parent)}
    candidate = Candidate(id="g001-000", recipe=Recipe(op="copy", inputs=("base",)), plan=PLAN)
    evaluator.evaluate(ScoreJob(candidate, keep_rebuilt=True), refs)
    assert (tmp_path / "rebuilt" / rebuilt_name(candidate)).is_dir()
    test = evaluator.evaluate(ScoreJob(candidate, split="test"), refs)
    assert test["status"] == "ok" and "rebuilt_read_s" not in test["timing"] and test["metrics"]["kl"]["score"] < 0


def test_the_name_is_the_id_and_the_plan():
    a = Candidate(id="g001-003", recipe=Recipe(op="copy", inputs=("base",)), plan=PLAN)
    assert rebuilt_name(a) == rebuilt_name(Candidate(id="g001-003", recipe=Recipe(op="copy", inputs=("g001-003",)), plan=PLAN))
    assert rebuilt_name(a) != rebuilt_name(Candidate(id="g001-003", recipe=a.recipe, plan=PLAN[:0] + [{**PLAN[0], "ratio": 0.25}]))
    assert rebuilt_name(a) != rebuilt_name(Candidate(id="g001-004", recipe=a.recipe, plan=PLAN))


def test_a_generation_starts_with_only_what_the_finish_would_test(tmp_path):
    from search.run.loop import keep_rebuilt_of

    member = Candidate(id="g000-004", recipe=Recipe(op="copy", inputs=("g000-004",)), plan=PLAN)
    dropped = Candidate(id="g000-007", recipe=Recipe(op="copy", inputs=("base",)), plan=PLAN)
    parent = Candidate.copy_of("base")
    for name in (rebuilt_name(member), rebuilt_name(dropped), f"{rebuilt_name(dropped)}.partial-123"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "config.json").write_text("{}")
    keep_rebuilt_of(tmp_path, [parent, member])
    assert [p.name for p in tmp_path.iterdir()] == [rebuilt_name(member)]
    keep_rebuilt_of(tmp_path / "none", [member])  # a run that kept nothing yet
