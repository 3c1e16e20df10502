"""Screening in another dtype (`fitness.screen_dtype`): the stages before the last run under
torch autocast, the last at the workers' dtype, and a member is compared at a screening stage
with what it scored in the screening dtype, never with its full-precision scores.

Plan and comparison rules are checked on hand-made rows; two real staged merge runs on the tiny
models check the worker side: bfloat16 autocast on a float32 model (the CPU case), and a
screening dtype equal to the workers' own (the GPU case), which is then no other precision.
"""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from evolve.recipe import Recipe
from search.fitness.staged import paired_difference
from search.run.candidate import Candidate, Evaluation
from search.run.stages import StagedScoring, plan_stages, screening_examples
from search.run.store import RunStore

ROOT = Path(__file__).resolve().parent.parent
SIZES = {"a": 64, "b": 40}


def child(cid: str, generation: int | None) -> Candidate:
    return Candidate(id=cid, recipe=Recipe(op="copy", inputs=("m",)), target="m", generation=generation)


def test_screening_stages_run_in_their_dtype_and_full_jobs_score_the_items_a_member_meets():
    plan = plan_stages([0.125, 1.0], SIZES, seed=3, min_items=4, proxy=False, resample=True,
                       screen_dtype="bfloat16", generations=4)
    first = plan.job(child("g001-000", 1), 0)
    assert first.autocast == "bfloat16" and first.screen_indices is None
    full = plan.job(child("g001-000", 1), 1)
    assert full.autocast is None and full.screen_dtype == "bfloat16" and full.per_example
    # a member made in generation 1 is compared on the draws of generations 2 and 3
    later = {t: sorted(set(plan.indices(2)[0][t]) | set(plan.indices(3)[0][t])) for t in SIZES}
    assert full.screen_indices == later and later["a"] != sorted(plan.indices(1)[0]["a"])
    parents = plan.with_screening(first.__class__(Candidate.copy_of("base")), None)
    assert parents.screen_indices == {t: sorted({i for g in range(4) for i in plan.indices(g)[0][t]}) for t in SIZES}
    assert plan.job(child("g003-000", 3), 1).screen_indices is None  # the last generation meets no one
    assert plan.job(child("g001-001", 1), 1, member=False).screen_indices is None  # an audit never becomes a member
    fixed = plan_stages([0.125, 1.0], SIZES, seed=3, min_items=4, proxy=False, screen_dtype="bfloat16", generations=4)
    assert fixed.job(child("g003-000", 3), 1).screen_indices == fixed.indices(0)[0]  # one draw for the run
    plain = plan_stages([0.125, 1.0], SIZES, seed=3, min_items=4, proxy=False, resample=True, generations=4)
    assert plain.job(child("g001-000", 1), 0).autocast is None and plain.job(child("g001-000", 1), 1).screen_indices is None
    proxy = plan_stages([0.5, 1.0], SIZES, seed=3, min_items=4, proxy=True, screen_dtype="bfloat16", generations=2)
    assert proxy.screened == 1 and not proxy.compared_at(0) and proxy.compared_at(1) and not proxy.compared_at(2)


def _examples(index: list[int], values: list[float]) -> dict:
    return {"index": index, "value": values, "weight": [1.0] * len(values)}


def _member(screen: dict | None) -> Evaluation:
    metrics = {"acc": {"score": 0.5, "examples": _examples(list(range(8)), [1.0, 0.0] * 4),
                       **({"screen_examples": screen} if screen else {})}}
    return Evaluation(Candidate.copy_of("m"), "dev", "ok", metrics, score=0.5, stage=1)


def test_a_member_is_seen_at_a_screening_stage_through_its_screening_examples():
    screen = _examples([1, 3, 5], [1.0, 1.0, 0.0])
    seen = screening_examples(_member(screen), ("acc",), {"acc": {1, 5}})
    assert seen.metrics["acc"]["examples"] == screen and seen.metrics["acc"]["score"] == 0.5
    assert screening_examples(_member(screen), ("acc",), {"acc": {1, 2}}) is None  # item 2 was never screened
    assert screening_examples(_member(None), ("acc",), None) is None  # a run written before screening

    class Journal:  # the scorer's journal lookup, all that member_row reads
        def finished(self, cid, split, stage):
            return _member(screen) if (cid, split, stage) == ("m", "dev", 1) else None

    plan = plan_stages([0.5, 1.0], {"acc": 8}, seed=0, min_items=2, proxy=False, screen_dtype="bfloat16", generations=2)
    staged = StagedScoring(Journal(), plan, judge=None, pareto=False, latency=False)
    assert staged.member_row("m", 0, {"acc": {1, 3}}).metrics["acc"]["examples"] == screen
    assert staged.member_row("m", 1).metrics["acc"]["examples"] == _member(None).metrics["acc"]["examples"]
    unscreened = plan_stages([0.5, 1.0], {"acc": 8}, seed=0, min_items=2, proxy=False, generations=2)
    assert StagedScoring(Journal(), unscreened, None, False, False).member_row("m", 0).metrics["acc"]["examples"]["index"] == list(range(8))


def screened_run(tmp_path: Path, fitness: dict | None = None, offspring: int = 2, **workers) -> Path:
    raw = yaml.safe_load((ROOT / "configs" / "tiny.yaml").read_text())
    raw["fitness"] = {"stages": [0.25, 1.0], "confidence": 0.9, "audit": 1.0, "screen_dtype": "bfloat16", **(fitness or {})}
    raw["evolver"].update(generations=2, offspring_per_member=offspring)
    raw["workers"].update(workers)
    raw["export_top"] = 0
    config = tmp_path / "screened.yaml"
    config.write_text(yaml.safe_dump(raw))
    proc = subprocess.run([sys.executable, "-m", "search.cli", "search", str(config), "--run-dir", str(tmp_path / "run"), "--quiet"],
                          capture_output=True, text=True, env=dict(os.environ))
    assert proc.returncode == 0, proc.stderr[-3000:]
    return tmp_path / "run"


def rows_of(run_dir: Path) -> list[dict]:
    return [r for r in RunStore(run_dir).read_journal() if r["split"] == "dev"]


@pytest.mark.slow
def test_a_bfloat16_screen_of_a_float32_run_compares_like_with_like(tmp_path):
    run_dir = screened_run(tmp_path)
    rows = rows_of(run_dir)
    status = subprocess.run([sys.executable, "-m", "search.cli", "status", str(run_dir)], capture_output=True, text=True)
    assert status.returncode == 0 and "screened in bfloat16" in status.stdout, status.stdout + status.stderr
    first = [r for r in rows if r.get("stage") == 0 and r["status"] == "ok"]
    full = {r["id"]: r for r in rows if r["status"] == "ok" and r.get("stage") in (None, 1)}
    assert first and all(r["autocast"] == "bfloat16" for r in first)
    assert not any("autocast" in r for r in full.values())
    # the parents and the first generation's promoted offspring carry the second generation's
    # screening items in bfloat16; audits (never members) and the last generation carry none
    items = {t: set(m["examples"]["index"]) for t, m in first[-1]["metrics"].items()}
    stopped = {r["id"] for r in rows if r["status"] == "stopped"}
    members = [cid for cid, row in full.items() if cid not in stopped and row.get("generation") in (None, 0)]
    assert len(members) == 6  # three parents, each one's best offspring
    for cid, row in full.items():
        assert ("screen_examples" in row["metrics"]["arith"]) is (cid in members)
    for cid in members:
        for task, metrics in full[cid]["metrics"].items():
            screen, exact = metrics["screen_examples"], metrics["examples"]
            assert items[task] <= set(screen["index"]) < set(exact["index"])
            by_item = dict(zip(exact["index"], exact["value"]))
            pairs = [(v, by_item[i]) for i, v in zip(screen["index"], screen["value"])]
            assert pairs and any(a != b for a, b in pairs), "the screening items were not scored in bfloat16"
            assert all(abs(a - b) <= 0.05 * abs(b) for a, b in pairs)  # the same model in another precision
    # a stop by the paired test is measured against the member's bfloat16 scores of the same items
    stops = [r for r in rows if r["status"] == "stopped" and r["rule"] == "margin"]
    assert stops, "no candidate was stopped by the paired test: the comparison was not exercised"
    weights = {"arith": 1.0, "compare": 1.0}
    for stop in stops:
        member = full[stop["rival"]]["metrics"]
        mine = {t: m["examples"] for t, m in stop["metrics"].items()}
        screened = paired_difference(mine, {t: m["screen_examples"] for t, m in member.items()}, weights)[0]
        exact = paired_difference(mine, {t: m["examples"] for t, m in member.items()}, weights)[0]
        assert f"{screened:+.4f} against {stop['rival']}" in stop["reason"] and abs(screened - exact) > 1e-4


@pytest.mark.slow
def test_a_screen_in_the_workers_own_dtype_is_no_other_precision(tmp_path):
    """On a GPU the workers run bfloat16 already: a bfloat16 screen there costs nothing extra and
    compares like with like as it is, so the run stages as without one (no autocast, no screening
    items scored apart) and a contender's full evaluation joins its screen's scores."""
    rows = rows_of(screened_run(tmp_path, dtype="bfloat16"))
    assert not any("autocast" in r for r in rows)
    full = [r for r in rows if r["status"] == "ok" and r.get("stage") in (None, 1)]
    assert full and not any("screen_examples" in m for r in full for m in r["metrics"].values())
    joined = [r for r in full if r.get("extends") == 0]
    assert joined and all(len(r["metrics"]["arith"]["examples"]["index"]) == len(full[0]["metrics"]["arith"]["examples"]["index"])
                          for r in joined)


@pytest.mark.slow
def test_multi_step_selection_screens_every_stage_before_the_last(tmp_path):
    """stages [0.25, 0.5, 1.0] with `advance: [2, 1]`: of each member's three offspring two meet
    the second stage and one the full dev sets; both screening stages run in bfloat16, and a
    member carries bfloat16 scores of the next generation's second-stage items (they hold the
    first stage's), so both of its comparisons read like with like."""
    run_dir = screened_run(tmp_path, fitness={"stages": [0.25, 0.5, 1.0], "advance": [2, 1], "audit": 0.0}, offspring=3)
    rows = rows_of(run_dir)
    offspring = [r for r in rows if r.get("generation") is not None]
    families: dict[tuple, list[dict]] = {}
    for r in offspring:
        families.setdefault((r["generation"], r["target"]), []).append(r)
    reached = lambda family, stage: {r["id"] for r in family if r.get("stage", 2) >= stage}  # noqa: E731
    by_stage = {key: [len(reached(family, k)) for k in range(3)] for key, family in families.items()}
    assert len(families) == 6 and all(counts[0] == 3 and counts[1] <= 2 and counts[2] <= 1 for counts in by_stage.values()), by_stage
    assert any(counts[1] == 2 for counts in by_stage.values())
    stops = [r for r in offspring if r["status"] == "stopped"]
    assert {r["stage"] for r in stops} == {0, 1} and all(r["autocast"] == "bfloat16" for r in stops)
    second = {t: set(m["examples"]["index"]) for t, m in next(r for r in rows if r.get("stage") == 1 and r.get("generation") == 1)["metrics"].items()}
    members = [r for r in rows if r["status"] == "ok" and r.get("stage") in (None, 2) and r.get("generation") in (None, 0)]
    assert members and all(second[t] <= set(r["metrics"][t]["screen_examples"]["index"]) for r in members for t in second)
    # the second stage scored only the items it adds to the first: its row joins the first
    # stage's scores, unchanged, with the added items' (the two screens share a precision)
    first = {r["id"]: r for r in offspring if r["status"] == "ok" and r.get("stage") == 0}
    joined = [r for r in offspring if r["status"] == "ok" and r.get("stage") == 1]
    assert joined and all(r["extends"] == 0 for r in joined)
    for row in joined:
        for task, metrics in row["metrics"].items():
            before = first[row["id"]]["metrics"][task]["examples"]
            now = dict(zip(metrics["examples"]["index"], metrics["examples"]["value"]))
            assert set(before["index"]) < set(now) and all(now[i] == v for i, v in zip(before["index"], before["value"]))
            assert metrics["score"] == pytest.approx(sum(metrics["examples"]["value"]) / sum(metrics["examples"]["weight"]))


def test_linear_weights_are_cast_once_for_the_screen_and_put_back():
    import torch

    from search.run.workers import linear_weights_as

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Embedding(50, 16), torch.nn.Linear(16, 16), torch.nn.LayerNorm(16), torch.nn.Linear(16, 50))
    model[3].weight = model[0].weight  # a tied output head
    tokens = torch.randint(0, 50, (2, 5))
    originals = {name: (p.data_ptr(), p.data.clone()) for name, p in model.named_parameters()}
    with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16):
        plain = model(tokens)
        with linear_weights_as(model, torch.bfloat16):
            assert model[1].weight.dtype == model[1].bias.dtype == torch.bfloat16
            assert model[3].weight.dtype == torch.bfloat16  # the tied head: its own cast copy for the duration
            assert model[0].weight.dtype == model[2].weight.dtype == torch.float32  # embedding, norm: as autocast has them
            assert model[0].weight.data_ptr() == originals["0.weight"][0]
            cast = model(tokens)
    assert torch.equal(plain, cast) and plain.dtype == torch.bfloat16
    assert model[3].weight is model[0].weight  # tied again
    for name, p in model.named_parameters():
        storage, values = originals[name]
        assert p.data_ptr() == storage and torch.equal(p.data, values)  # the same float32 storage, untouched
