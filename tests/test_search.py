"""The search end to end on tiny models, as a user runs it: real Ray, real subprocesses.

- an uninterrupted run and one SIGKILLed mid-generation then resumed end identically;
- an actor that dies is replaced and its candidate retried; NaN weights get the worst fitness;
- the exported best candidate loads with plain transformers and reproduces its journalled fitness;
- parents whose tensors differ are refused before anything starts;
- a run joins the Ray cluster it is given, else the one RAY_ADDRESS names.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from evolve.population import WORST
from search.run.store import RunStore

ROOT = Path(__file__).resolve().parent.parent
pytestmark = pytest.mark.slow


def tiny_config(tmp_path: Path, generations: int = 2, **evolver) -> Path:
    raw = yaml.safe_load((ROOT / "configs" / "tiny.yaml").read_text())
    raw["evolver"].update(generations=generations, **evolver)
    raw["export_top"] = 0
    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def evofuse(*args: str, env: dict | None = None, **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "search.cli", *args], capture_output=True, text=True, env={**os.environ, **(env or {})}, **kwargs
    )


def comparable_journal(run_dir: Path) -> list[tuple]:
    return sorted(
        (e["id"], e["split"], e["status"], round(e["score"], 9), json.dumps(e["recipe"], sort_keys=True))
        for e in RunStore(run_dir).read_journal()
    )


def final_population(run_dir: Path) -> list[tuple]:
    state = RunStore(run_dir).read_state()
    return [(m["id"], m["score"]) for m in state["population"]]


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory) -> Path:
    tmp = tmp_path_factory.mktemp("uninterrupted")
    proc = evofuse("search", str(tiny_config(tmp)), "--run-dir", str(tmp / "run"), "--quiet")
    assert proc.returncode == 0, proc.stderr[-3000:]
    return tmp / "run"


def test_run_finishes_with_a_complete_run_directory(uninterrupted):
    store = RunStore(uninterrupted)
    state = store.read_state()
    assert state["status"] == "finished" and state["generation"] == 2
    journal = store.read_journal()
    dev = [e for e in journal if e["split"] == "dev"]
    assert len(dev) == 3 + 2 * 3  # parents, then one offspring per member per generation
    assert {e["id"] for e in journal if e["split"] == "test"} >= {"base", "arith", "compare"}
    assert len(store.read_logbook()) == 2
    for member_id, checksum in state["weight_checksums"].items():
        assert store.weights_path(member_id).is_file()
    status = evofuse("status", str(uninterrupted), "--json")
    assert status.returncode == 0
    summary = json.loads(status.stdout)
    assert summary["generation"] == 2 and summary["evaluations"] == 9 and set(summary["best_per_task"]) == {"arith", "compare"}
    # every scoring journals its actor's memory after it; the status names the job that set the peak
    assert all(0 < e["memory"]["private_gib"] <= e["memory"]["rss_gib"] <= e["memory"]["peak_gib"] for e in journal)
    peak = max(e["memory"]["peak_gib"] for e in journal)
    assert summary["actor_memory"]["peak_gib"] == peak and summary["actor_memory"]["actors"] == 1
    assert summary["actor_memory"]["set_by"]["id"] in {e["id"] for e in journal if e["memory"]["peak_gib"] == peak}
    assert "actors       peak" in evofuse("status", str(uninterrupted)).stdout


def test_sigkill_mid_generation_then_resume_matches_uninterrupted(uninterrupted, tmp_path, search_killed_at):
    config, run_dir = tiny_config(tmp_path), tmp_path / "run"
    search_killed_at(config, run_dir, "g001-000")
    killed = RunStore(run_dir)
    assert killed.read_state()["generation"] == 1  # killed inside generation 2
    ids_before = [e["id"] for e in killed.read_journal()]
    assert "g001-000" in ids_before and "g001-002" not in ids_before

    resumed = evofuse("resume", str(run_dir), "--quiet")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    journal = killed.read_journal()
    keys = [(e["id"], e["split"]) for e in journal]
    assert len(keys) == len(set(keys)), "an evaluation was repeated after resume"
    assert comparable_journal(run_dir) == comparable_journal(uninterrupted)
    assert final_population(run_dir) == final_population(uninterrupted)
    strip = lambda rows: [{k: v for k, v in r.items() if k != "wall_s"} for r in rows]  # noqa: E731
    assert strip(killed.read_logbook()) == strip(RunStore(uninterrupted).read_logbook())


def test_resume_refuses_a_changed_config(uninterrupted, tmp_path):
    changed = tiny_config(tmp_path, generations=5)
    proc = evofuse("resume", str(uninterrupted), "--config", str(changed))
    assert proc.returncode == 2
    assert "evolver.generations: 2 -> 5" in proc.stderr and len(proc.stderr.strip().splitlines()) == 1


def test_corrupt_checkpoint_is_detected(uninterrupted, tmp_path):
    import shutil

    copy = tmp_path / "copy"
    shutil.copytree(uninterrupted, copy)
    state = RunStore(copy).read_state()
    member = next(iter(state["weight_checksums"]))
    path = RunStore(copy).weights_path(member)
    path.write_bytes(path.read_bytes()[:-8] + b"\0" * 8)
    proc = evofuse("resume", str(copy))
    assert proc.returncode == 2 and f"{member}.safetensors: checksum mismatch" in proc.stderr


def test_dead_actor_is_replaced_and_nan_candidate_gets_worst_fitness(tmp_path):
    marker = tmp_path / "crashed-once"
    env = {"EVOFUSE_FAULT_CRASH": f"g000-001@{marker}", "EVOFUSE_FAULT_NAN": "g001-002"}
    proc = evofuse("search", str(tiny_config(tmp_path)), "--run-dir", str(tmp_path / "run"), env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert marker.exists()  # the actor really died once
    journal = {e["id"]: e for e in RunStore(tmp_path / "run").read_journal() if e["split"] == "dev"}
    assert journal["g000-001"]["status"] == "ok" and journal["g000-001"]["attempts"] == 2
    assert journal["g001-002"]["status"] == "nonfinite" and journal["g001-002"]["score"] == WORST
    assert "g001-002: nonfinite" in proc.stderr and "g000-001: scored after 2 attempts" in proc.stderr
    population = final_population(tmp_path / "run")
    assert "g001-002" not in [m for m, _ in population]


def test_export_round_trip_reproduces_journalled_fitness(uninterrupted, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from search.fitness import TaskSpec, build_task

    out = tmp_path / "export"
    proc = evofuse("export", str(uninterrupted), "--top", "1", "--out", str(out))
    assert proc.returncode == 0, proc.stderr
    (model_dir,) = [Path(p) for p in proc.stdout.split()]
    recipe = json.loads((model_dir / "evofuse_recipe.json").read_text())
    assert recipe["lineage"] and "Lineage" in (model_dir / "README.md").read_text()
    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    config = yaml.safe_load((uninterrupted / "config.yaml").read_text())
    for task in config["tasks"]:
        metrics = build_task(TaskSpec(task["kind"], task["dev"], task["name"]), tokenizer).evaluate(model)
        assert metrics["score"] == pytest.approx(recipe["dev"][task["name"]]["score"], rel=1e-6)


def test_parents_whose_tensors_differ_are_refused(tmp_path):
    from search.models.tiny import byte_tokenizer, tiny_llama

    dirs = []
    for i, width in enumerate((128, 128, 96)):
        path = tmp_path / f"parent{i}"
        tiny_llama(seed=i, intermediate_size=width).save_pretrained(path)
        byte_tokenizer().save_pretrained(path)
        dirs.append(str(path))
    raw = yaml.safe_load((ROOT / "configs" / "tiny.yaml").read_text())
    raw["parents"] = {
        "base": {"name": "base", "source": dirs[0]},
        "experts": [{"name": "a", "source": dirs[1]}, {"name": "b", "source": dirs[2]}],
    }
    config = tmp_path / "bad.yaml"
    config.write_text(yaml.safe_dump(raw))
    proc = evofuse("search", str(config), "--run-dir", str(tmp_path / "run"))
    assert proc.returncode == 2
    assert "parents.b: tensor model.layers.0.mlp.down_proj.weight has shape [64, 96], base has [64, 128]" in proc.stderr


def test_pickle_weights_are_refused_without_allow_pickle(tmp_path):
    from search.models.tiny import tiny_llama

    path = tmp_path / "pickled"
    tiny_llama().save_pretrained(path, safe_serialization=False)
    for f in path.glob("*.safetensors"):
        f.unlink()
    if not list(path.glob("*.bin")):
        torch.save(tiny_llama().state_dict(), path / "pytorch_model.bin")
    proc = evofuse("eval", str(path), "--task", "perplexity:pydoc:dev")
    assert proc.returncode == 2 and "pass --allow-pickle" in proc.stderr


def test_population_seeded_with_classic_merges_and_population_merge_scored(tmp_path):
    raw = yaml.safe_load((ROOT / "configs" / "tiny.yaml").read_text())
    raw["evolver"].update(
        generations=1,
        seeds=[{"name": "ties", "op": "ties", "params": {"density": 0.5, "weight": 1.0}}],
        merge_population="linear",
    )
    raw["export_top"] = 0
    config = tmp_path / "seeded.yaml"
    config.write_text(yaml.safe_dump(raw))
    proc = evofuse("search", str(config), "--run-dir", str(tmp_path / "run"), "--quiet")
    assert proc.returncode == 0, proc.stderr[-3000:]
    store = RunStore(tmp_path / "run")
    journal = {e["id"]: e for e in store.read_journal() if e["split"] == "dev"}
    assert journal["ties"]["recipe"]["op"] == "ties" and journal["ties"]["recipe"]["base"] == "base"
    assert journal["m000"]["recipe"]["op"] == "linear" and len(journal["m000"]["recipe"]["inputs"]) == 4
    state = store.read_state()
    assert len(state["population"]) == 4  # base, two experts and the TIES seed
    assert len([e for e in journal if e.startswith("g000-")]) == 4


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_all_finite_finds_one_bad_entry_in_any_dtype(bad):
    import torch

    from search.run.workers import all_finite

    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        weights = [torch.randn(64, 64).to(dtype), torch.full((1000,), 60000.0).to(dtype)]  # fp16 sum > 65504
        assert all_finite(weights)
        weights[0][17, 3] = bad
        assert not all_finite(weights)


def test_ray_is_joined_at_the_given_address_then_at_RAY_ADDRESS(monkeypatch):
    """`--address` / `workers.address` first; without one, RAY_ADDRESS, as Ray's own tools set it
    (`ray job submit`); the suite's runs join its session cluster so (conftest), and a test about
    a local Ray's own life sets it empty (test_run_safety)."""
    import ray

    from search.run.workers import init_ray

    joined = []
    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    monkeypatch.setattr(ray, "init", lambda address=None, **kwargs: joined.append(address))
    monkeypatch.setenv("RAY_ADDRESS", "10.0.0.1:6379")
    init_ray("10.0.0.2:6379")
    init_ray(None)
    assert joined == ["10.0.0.2:6379", "10.0.0.1:6379"]
