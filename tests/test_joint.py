"""Joint search: Evolver recipes + Optuna plans, NSGA-II selection, resume, failures, clusters."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import optuna
import pytest
import yaml

from evolve.population import make_member, pareto_front_of
from search.results.report import pareto_ids
from search.run.store import RunStore
from search.tuning.study import journal_path

ROOT = Path(__file__).resolve().parent.parent
pytestmark = pytest.mark.slow


def joint_config(tmp_path: Path, **space) -> Path:
    raw = yaml.safe_load((ROOT / "configs" / "tiny-joint.yaml").read_text())
    raw["compress"]["space"].update(space)
    path = tmp_path / "joint.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def load_study(run_dir: Path, name: str = "tiny-joint") -> optuna.Study:
    from optuna.storages import JournalStorage
    from optuna.storages.journal import JournalFileBackend

    return optuna.load_study(study_name=name, storage=JournalStorage(JournalFileBackend(str(journal_path(run_dir)))))


def evofuse(*args, env=None):
    return subprocess.run([sys.executable, "-m", "search.cli", *args], capture_output=True, text=True, env={**os.environ, **(env or {})})


def test_joint_search_resumes_with_study_and_population_in_agreement(tmp_path, search_killed_at):
    run_dir = tmp_path / "run"
    search_killed_at(joint_config(tmp_path), run_dir, "g001-000")
    asked_before = len(load_study(run_dir).trials)
    resumed = evofuse("resume", str(run_dir), "--quiet")
    assert resumed.returncode == 0, resumed.stderr[-3000:]

    store = RunStore(run_dir)
    dev = [e for e in store.read_journal() if e["split"] == "dev" and "trial" in e]
    keys = [e["id"] for e in dev]
    assert len(keys) == len(set(keys)) == 6  # 2 generations x 3 children, none scored twice
    study = load_study(run_dir)
    assert len(study.trials) == asked_before == 6  # the interrupted generation's trials were reused
    for entry in dev:
        trial = study.trials[entry["trial"]]
        if entry["status"] == "ok":
            assert trial.state == optuna.trial.TrialState.COMPLETE
            assert trial.values == [pytest.approx(entry["score"]), entry["num_params"]]
        else:
            assert trial.state == optuna.trial.TrialState.FAIL
    state = store.read_state()
    assert state["status"] == "finished" and state["pending"] is None
    # the population's members are journalled candidates with the plan they were scored with
    by_id = {e["id"]: e for e in store.read_journal() if e["split"] == "dev"}
    for member in state["population"]:
        assert by_id[member["id"]]["plan"] == member["plan"]
    # the Pareto set is non-dominated among every feasible candidate scored
    points = [(e["id"], e["score"], e["num_params"]) for e in by_id.values() if e["status"] == "ok"]
    front = set(pareto_ids(store))
    assert front and front == {p[0] for p in non_dominated(points)}


def test_failing_plans_become_fail_trials_and_the_run_goes_on(tmp_path):
    # Plans that cannot fit the architecture are refused when the config loads (preflight), so
    # the failure here comes when a plan is applied: calibration text too short for one window.
    short = tmp_path / "short.txt"
    short.write_text("too short for one calibration window")
    config = joint_config(tmp_path, depth=["none"], width=["prune_width"], width_ratio={"low": 0.1, "high": 0.3},
                          calibration={"data": str(short), "seq_len": 64, "num_sequences": 4})
    proc = evofuse("search", str(config), "--run-dir", str(tmp_path / "run"), "--quiet")
    assert proc.returncode == 0, proc.stderr[-3000:]
    study = load_study(tmp_path / "run")
    assert [t.state for t in study.trials] == [optuna.trial.TrialState.FAIL] * 6
    assert all("fewer than one window" in t.user_attrs["fail_reason"] for t in study.trials)
    state = RunStore(tmp_path / "run").read_state()
    assert {m["id"] for m in state["population"]} == {"base", "arith", "compare"}  # nothing replaced them


def _kill_session_processes(marker: str) -> None:
    import psutil

    for proc in psutil.process_iter(["cmdline"]):
        try:
            if any(marker in part for part in proc.info["cmdline"] or []):
                proc.kill()
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            pass


def test_two_node_ray_cluster(tmp_path):
    """`ray start --head` plus a second `ray start --address` node, then a search with --address."""
    ray_bin = Path(sys.executable).parent / "ray"
    temp_dir = Path("/tmp") / f"evofuse-ray-{os.getpid()}"  # short: Ray's socket paths have a length limit
    port = 6390 + os.getpid() % 400
    address = f"127.0.0.1:{port}"
    env = {**os.environ, "RAY_AUTH_MODE": "disabled", "RAY_ADDRESS": ""}  # a throwaway cluster of its own: no token files
    try:
        head = subprocess.run(
            [str(ray_bin), "start", "--head", f"--port={port}", "--num-cpus=1", f"--temp-dir={temp_dir}",
             "--include-dashboard=false", "--disable-usage-stats"], capture_output=True, text=True, env=env,
        )
        assert head.returncode == 0, head.stderr[-2000:]
        worker = subprocess.run(
            [str(ray_bin), "start", f"--address={address}", "--num-cpus=1", "--disable-usage-stats"],
            capture_output=True, text=True, env=env,
        )
        assert worker.returncode == 0, worker.stderr[-2000:]
        import json

        nodes = subprocess.run(
            [sys.executable, "-c", f"import ray, json; ray.init(address='{address}', log_to_driver=False); "
             "print(json.dumps(len([n for n in ray.nodes() if n['Alive']])))"],
            capture_output=True, text=True, env=env,
        )
        assert json.loads(nodes.stdout.strip().splitlines()[-1]) == 2, nodes.stderr[-2000:]
        raw = yaml.safe_load((ROOT / "configs" / "tiny.yaml").read_text())
        raw["evolver"]["generations"] = 1
        raw["export_top"] = 0
        raw["workers"]["count"] = 2  # one actor per node: each node has one CPU
        config = tmp_path / "cluster.yaml"
        config.write_text(yaml.safe_dump(raw))
        proc = evofuse("search", str(config), "--run-dir", str(tmp_path / "run"), "--address", address, "--quiet", env=env)
        assert proc.returncode == 0, proc.stderr[-3000:]
        workers = {e["worker"] for e in RunStore(tmp_path / "run").read_journal()}
        assert len(workers) == 2  # both actors (one per node) scored candidates
    finally:
        _kill_session_processes(str(temp_dir))
        _kill_session_processes(f"--address={address}")
        _kill_session_processes(f"{address}")
        shutil.rmtree(temp_dir, ignore_errors=True)


@pytest.fixture(scope="module")
def compress_run(tmp_path_factory) -> Path:
    """One timed compress run of the tiny base, shared by the tests that read it: seed 1, whose
    NSGA-II draws include plans over the budget (seed 0's, since the samplers are reseeded per
    trial for exact resume, happen to have none), with latency as a third objective."""
    tmp = tmp_path_factory.mktemp("compress")
    raw = yaml.safe_load((ROOT / "configs" / "tiny-compress.yaml").read_text())
    raw["seed"] = 1
    raw["compress"]["latency"] = {"batch_size": 1, "seq_len": 32, "repeats": 3}
    (tmp / "compress.yaml").write_text(yaml.safe_dump(raw))
    run_dir = tmp / "run"
    proc = evofuse("search", str(tmp / "compress.yaml"), "--run-dir", str(run_dir), "--quiet")
    assert proc.returncode == 0, proc.stderr[-3000:]
    return run_dir


def test_compress_mode_budget_and_pareto_export(compress_run, tmp_path):
    import json

    from search.fitness import TaskSpec, build_task
    from search.models.sources import load_model

    run_dir = compress_run
    store = RunStore(run_dir)
    state = store.read_state()
    budget = 0.9 * state["dense_params"]
    assert state["hall_of_fame"] and all(m["params"] <= budget for m in state["hall_of_fame"])
    # Plans predicted over the budget are PRUNED trials, never scored; every scored plan fits.
    study = load_study(run_dir, "tiny-compress")
    pruned = [t for t in study.trials if t.state == optuna.trial.TrialState.PRUNED]
    assert pruned and all(t.user_attrs["predicted_params"] > budget for t in pruned)
    # The first generation starts from anchors sized to the budget (depth only, width only, both).
    first = study.trials[:3]
    assert [(t.params["depth"], t.params["width"]) for t in first] == [
        ("remove_blocks", "none"), ("none", "prune_width"), ("remove_blocks", "prune_width")]
    assert all(t.state == optuna.trial.TrialState.COMPLETE and t.values[1] <= budget for t in first)
    assert sum(r["plans_over_budget"] for r in store.read_logbook()) == len(pruned)
    scored = [e for e in store.read_journal() if e["split"] == "dev" and "trial" in e]
    assert len(scored) == 8 and all(e["status"] == "ok" and e["num_params"] <= budget for e in scored)
    # The front's test splits read the models their dev scoring rebuilt; none is left behind.
    tested = [e for e in store.read_journal() if e["split"] == "test" and e.get("plan")]
    assert tested and all("rebuilt_read_s" in e["timing"] for e in tested)
    assert not (run_dir / "rebuilt").exists()
    out = tmp_path / "pareto"
    exported = evofuse("export", str(run_dir), "--pareto", "--out", str(out))
    assert exported.returncode == 0, exported.stderr[-2000:]
    dirs = [Path(p) for p in exported.stdout.split()]
    assert {d.name for d in dirs} == {m["id"] for m in state["hall_of_fame"]}
    for model_dir in dirs:
        recipe = json.loads((model_dir / "evofuse_recipe.json").read_text())
        model, tokenizer = load_model(model_dir)
        assert sum(p.numel() for p in model.parameters()) == next(
            m["params"] for m in state["hall_of_fame"] if m["id"] == model_dir.name
        )
        task = build_task(TaskSpec("perplexity", "pydoc:dev", options={"context_length": 256}), tokenizer)
        assert task.evaluate(model)["score"] == pytest.approx(recipe["dev"]["pydoc"]["score"], rel=1e-5)
        # the card says how large it is, its plan step by step, and how it loads
        card = (model_dir / "README.md").read_text()
        params = sum(p.numel() for p in model.parameters())
        share = 100 * params / state["dense_params"]
        assert f"{params:,} parameters, {share:.1f}% of the dense model's {state['dense_params']:,}" in card
        assert card.count("\n- ") >= len(recipe["plan"]) and recipe["plan"][0]["op"] in card.split("## Structure")[1]
        structured = (model_dir / "evofuse_structure.json").is_file()
        assert ("refuses it: load it with `compression.loader.load_compressed" in card) == structured
        assert ("It loads with plain `AutoModelForCausalLM.from_pretrained`." in card) == (not structured)


def test_latency_as_a_third_objective(compress_run):
    """compress.latency: every candidate is timed, the study has three objectives, and the Pareto
    set is non-dominated on (score, parameters, latency) among the candidates within budget."""
    run_dir = compress_run
    store = RunStore(run_dir)
    state = store.read_state()
    scored = [e for e in store.read_journal() if e["split"] == "dev" and e["status"] == "ok"]
    assert scored and all(e["latency_ms"] > 0 for e in scored)
    assert all(p["latency_ms"] > 0 for p in state["parents"].values())

    from optuna.storages import JournalStorage
    from optuna.storages.journal import JournalFileBackend

    study = optuna.load_study(study_name="tiny-compress", storage=JournalStorage(JournalFileBackend(str(journal_path(run_dir)))))
    assert len(study.directions) == 3
    for entry in (e for e in scored if "trial" in e):
        assert study.trials[entry["trial"]].values == [pytest.approx(entry["score"]), entry["num_params"], pytest.approx(entry["latency_ms"])]

    budget = 0.9 * state["dense_params"]
    points = [(e["id"], e["score"], e["num_params"], e["latency_ms"]) for e in scored if e["num_params"] <= budget]
    front = set(pareto_ids(store))
    assert front and front == {p[0] for p in non_dominated(points)}
    assert all(m["latency_ms"] > 0 for m in state["hall_of_fame"])

    report = evofuse("report", str(run_dir))
    assert report.returncode == 0, report.stderr[-2000:]
    assert (run_dir / "report" / "pareto_latency.png").stat().st_size > 0
    assert "latency ms" in (run_dir / "report" / "report.md").read_text()


def non_dominated(points: list[tuple]) -> list[tuple]:
    """The test's own reference: (id, score, cost, ...) points no other point dominates (score
    up, every cost down; b dominates a when no worse on all and better on one)."""
    def dominates(b, a):
        no_worse = b[1] >= a[1] and all(cb <= ca for cb, ca in zip(b[2:], a[2:]))
        return no_worse and (b[1] > a[1] or any(cb < ca for cb, ca in zip(b[2:], a[2:])))

    return [a for a in points if not any(dominates(b, a) for b in points)]


def test_the_run_front_agrees_with_the_reference():
    points = [("a", 1.0, 10, 5.0), ("b", 1.0, 10, 4.0), ("c", 2.0, 20, 9.0), ("d", 0.5, 5, 9.0), ("e", 0.5, 20, 9.0)]
    members = [make_member(i, None, score, params=params, latency_ms=latency) for i, score, params, latency in points]
    assert {m["id"] for m in pareto_front_of(members)} == {p[0] for p in non_dominated(points)}


def test_non_dominated_with_two_costs():
    points = [("a", 1.0, 10, 5.0), ("b", 1.0, 10, 4.0), ("c", 2.0, 20, 9.0), ("d", 0.5, 5, 9.0), ("e", 0.5, 20, 9.0)]
    # b beats a on latency alone; e is beaten by c (better score, same size and latency)
    assert {p[0] for p in non_dominated(points)} == {"b", "c", "d"}
