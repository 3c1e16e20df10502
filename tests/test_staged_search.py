"""Staged fitness in real runs: stops, audits, resume between stages, a KL proxy stage.

The decision rules themselves (paired margins, dominance) are tested against hand computations
in test_staged.py; here the run loop uses them: a candidate clearly worse than its rival stops
at stage 1 and one that is better goes through; stopped candidates are journalled with their
partial metrics and never selected; Optuna hears PRUNED; a run killed between stages resumes
to exactly the uninterrupted run.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import optuna
import pytest
import yaml

from evolve.recipe import Recipe
from search.fitness.staged import stage_sizes
from search.run.candidate import Candidate, Evaluation
from search.run.stages import StageJudge, plan_stages
from search.run.store import RunStore

ROOT = Path(__file__).resolve().parent.parent
pytestmark = pytest.mark.slow
STAGED = {"stages": [0.25, 1.0], "confidence": 0.9, "audit": 1.0}


def evofuse(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "search.cli", *args], capture_output=True, text=True, env=dict(os.environ))


def staged_config(tmp_path: Path, base: str = "tiny.yaml", **fitness) -> Path:
    raw = yaml.safe_load((ROOT / "configs" / base).read_text())
    raw["fitness"] = {**STAGED, **fitness}
    if base == "tiny.yaml":
        raw["evolver"].update(generations=2, offspring_per_member=2)
    raw["export_top"] = 0
    path = tmp_path / "staged.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def comparable(run_dir: Path) -> list[tuple]:
    """Journal rows without what differs between two identical runs (times, pids, retries)."""
    return sorted((e["id"], e["split"], str(e.get("stage")), e["status"], round(e["score"], 9), e.get("reason") or "")
                  for e in RunStore(run_dir).read_journal())


@pytest.fixture(scope="module")
def staged_run(tmp_path_factory) -> Path:
    tmp = tmp_path_factory.mktemp("staged")
    proc = evofuse("search", str(staged_config(tmp)), "--run-dir", str(tmp / "run"), "--quiet")
    assert proc.returncode == 0, proc.stderr[-3000:]
    return tmp / "run"


def _examples(values: list[float]) -> dict:
    return {"index": list(range(len(values))), "value": values, "weight": [1.0] * len(values)}


def _row(cid: str, target: str, values: list[float]) -> Evaluation:
    candidate = Candidate(id=cid, recipe=Recipe(op="copy", inputs=(target,)), target=target)
    metrics = {"acc": {"score": sum(values) / len(values), "examples": _examples(values)}}
    return Evaluation(candidate, "dev", "ok", metrics, score=sum(values) / len(values), stage=0)


def test_a_clearly_worse_candidate_stops_and_a_better_one_goes_on():
    plan = plan_stages([0.5, 1.0], {"acc": 16}, seed=0, min_items=4, proxy=False)
    judge = StageJudge(plan, {"acc": 1.0}, confidence=0.9, advance=1, run_seed=0, audit=0.0)
    member, other = _row("m", "m", [1.0] * 6 + [0.0] * 2), _row("n", "n", [0.0] * 8)
    worse, better = _row("worse", "m", [0.0] * 8), _row("better", "n", [1.0] * 8)
    stopped = judge.merge_survivors(0, {"worse": worse, "better": better}, {"m": member, "n": other},
                                    [worse.candidate, better.candidate])
    assert set(stopped) == {"worse"} and stopped["worse"][1:] == ("m", "margin")
    # of two siblings that can both still win, only the better one goes on (advance 1)
    close, best = _row("close", "m", [1.0] * 6 + [0.0] * 2), _row("best", "m", [1.0] * 8)
    stopped = judge.merge_survivors(0, {"close": close, "best": best}, {"m": member}, [close.candidate, best.candidate])
    assert set(stopped) == {"close"} and "siblings" in stopped["close"][0]


def _text_row(cid: str, target: str, nll: list[float]) -> Evaluation:
    """A perplexity-like task: per-piece -NLL sums over 100 tokens each."""
    candidate = Candidate(id=cid, recipe=Recipe(op="copy", inputs=(target,)), target=target)
    examples = {"index": list(range(len(nll))), "value": [-x for x in nll], "weight": [100.0] * len(nll)}
    score = -sum(nll) / (100.0 * len(nll))
    return Evaluation(candidate, "dev", "ok", {"text": {"score": score, "examples": examples}}, score=score, stage=0)


def test_siblings_are_ranked_before_the_paired_test():
    """The paired test is sharper for a sibling a little behind the member on every item than for
    one far behind with noise; ranking first keeps the noisy, worse one from being promoted
    because the better one failed the test."""
    plan = plan_stages([0.5, 1.0], {"text": 8}, seed=0, min_items=4, proxy=False)
    judge = StageJudge(plan, {"text": 1.0}, confidence=0.9, advance=1, run_seed=0, audit=0.0)
    member = _text_row("m", "m", [200.0, 210.0, 190.0, 205.0])
    close = _text_row("close", "m", [203.0, 213.0, 193.0, 208.0])  # 0.03 behind, on every piece
    noisy = _text_row("noisy", "m", [300.0, 205.0, 260.0, 196.0])  # 0.39 behind on average
    rows = {"close": close, "noisy": noisy}
    stopped = judge.merge_survivors(0, rows, {"m": member}, [noisy.candidate, close.candidate])
    assert stopped["close"][2] == "margin" and stopped["noisy"][2] == "sibling"
    # alone, the noisy one would pass the test: it is the ranking that stops it
    assert judge.merge_survivors(0, {"noisy": noisy}, {"m": member}, [noisy.candidate]) == {}
    # with advance 2 both are contenders and each faces the test
    judge2 = StageJudge(plan, {"text": 1.0}, confidence=0.9, advance=2, run_seed=0, audit=0.0)
    assert set(judge2.merge_survivors(0, rows, {"m": member}, [noisy.candidate, close.candidate])) == {"close"}


def test_multi_step_selection_narrows_a_family_stage_by_stage():
    """`fitness.advance: [3, 1]` (EvoPress's multi-step selection): of a member's offspring the
    best three by the first stage meet the second, and the best of those the full dev sets; the
    ranking at each stage reads that stage's scores only."""
    plan = plan_stages([0.25, 0.5, 1.0], {"acc": 16}, seed=0, min_items=2, proxy=False)
    judge = StageJudge(plan, {"acc": 1.0}, confidence=0.9, advance=(3, 1), run_seed=0, audit=0.0)
    assert (judge.advancing(0), judge.advancing(1)) == (3, 1)
    member = _row("m", "m", [0.0] * 8)
    first = {f"o{k}": _row(f"o{k}", "m", [1.0] * (4 - k) + [0.0] * k) for k in range(5)}  # o0 best
    stopped = judge.merge_survivors(0, first, {"m": member}, [r.candidate for r in first.values()])
    assert set(stopped) == {"o3", "o4"} and all(v[2] == "sibling" and "2 of 5 siblings stop" in v[0] for v in stopped.values())
    # on the second stage's items the order changes: o2 now leads and alone goes on
    second = {"o0": _row("o0", "m", [1.0] * 3 + [0.0] * 5), "o1": _row("o1", "m", [1.0] * 2 + [0.0] * 6),
              "o2": _row("o2", "m", [1.0] * 6 + [0.0] * 2)}
    stopped = judge.merge_survivors(1, second, {"m": member}, [r.candidate for r in second.values()])
    assert set(stopped) == {"o0", "o1"} and all("stage 2: 2 of 3 siblings stop, o2 scored higher" in v[0] for v in stopped.values())
    # one number advances that many past every stage
    assert StageJudge(plan, {"acc": 1.0}, 0.9, 2, 0, 0.0).advancing(1) == 2


def test_a_race_stops_the_siblings_behind_their_leader_and_advance_caps_the_rest():
    """`fitness.race`: after a stage every offspring goes on unless the paired test puts it
    behind its best sibling; how many go on follows how far apart they are."""
    plan = plan_stages([0.5, 1.0], {"acc": 16}, seed=0, min_items=4, proxy=False)
    member = _row("m", "m", [0.0] * 8)
    rows = {"lead": _row("lead", "m", [1.0] * 8), "near": _row("near", "m", [1.0] * 7 + [0.0]),
            "far": _row("far", "m", [0.0] * 6 + [1.0] * 2)}
    family = [r.candidate for r in rows.values()]
    race = StageJudge(plan, {"acc": 1.0}, confidence=0.9, advance=3, run_seed=0, audit=0.0, race=(0.9,))
    stopped = race.merge_survivors(0, rows, {"m": member}, family)
    assert set(stopped) == {"far"} and stopped["far"][1:] == ("m", "sibling")
    assert "-0.7500 against its sibling lead on 8 items, beyond the race margin" in stopped["far"][0]
    # without the race all three are contenders, and each can still beat the member
    assert StageJudge(plan, {"acc": 1.0}, 0.9, 3, 0, 0.0).merge_survivors(0, rows, {"m": member}, family) == {}
    # advance caps what the race leaves: one goes on, the near-tie stops as a sibling beyond it
    capped = StageJudge(plan, {"acc": 1.0}, 0.9, 1, 0, 0.0, race=(0.9,)).merge_survivors(0, rows, {"m": member}, family)
    assert set(capped) == {"far", "near"} and "1 of 2 siblings stop, lead scored higher" in capped["near"][0]
    # every item of the task scored: the finite-population correction leaves no doubt, one item behind stops
    whole = plan_stages([0.5, 1.0], {"acc": 8}, seed=0, min_items=4, proxy=False)
    assert set(StageJudge(whole, {"acc": 1.0}, 0.9, 3, 0, 0.0, race=(0.9,)).merge_survivors(
        0, rows, {"m": member}, family)) == {"far", "near"}
    # a race at one stage only: none after the others
    assert StageJudge(plan, {"acc": 1.0}, 0.9, 3, 0, 0.0, race=(None,)).racing(0) is None


def test_the_audit_draws_from_the_stops_that_can_be_false():
    plan = plan_stages([0.5, 1.0], {"acc": 16}, seed=0, min_items=4, proxy=False)
    merge = StageJudge(plan, {"acc": 1.0}, confidence=0.9, advance=1, run_seed=0, audit=1.0)
    both = StageJudge(plan, {"acc": 1.0}, confidence=0.9, advance=1, run_seed=0, audit=1.0, audit_siblings=True)
    assert merge.audited("a", "margin") and not merge.audited("a", "sibling") and not merge.audited("a", "failed")
    assert both.audited("a", "sibling") and not both.audited("a", "failed")
    none = StageJudge(plan, {"acc": 1.0}, confidence=0.9, advance=1, run_seed=0, audit=0.0, audit_siblings=True)
    assert not none.audited("a", "margin") and not none.audited("a", "sibling")
    half = StageJudge(plan, {"acc": 1.0}, confidence=0.9, advance=1, run_seed=5, audit=0.5, audit_siblings=True)
    drawn = [half.audited(f"g001-{k:03d}", "sibling") for k in range(200)]
    assert 70 < sum(drawn) < 130 and drawn == [half.audited(f"g001-{k:03d}", "sibling") for k in range(200)]


@pytest.mark.parametrize("fitness, resample, audit_siblings, race", [
    ({}, True, False, ()),
    ({"resample": False, "audit_siblings": True, "race": [0.9, 0.75], "advance": [24, 3]}, False, True, (0.9, 0.75)),
])
def test_a_merge_run_config_sets_the_draws_the_audit_and_the_race(fitness, resample, audit_siblings, race):
    from search.config import parse_config
    from search.run.modes import make_mode
    from search.run.stages import staged_scoring

    raw = yaml.safe_load((Path(__file__).resolve().parents[1] / "configs" / "demo.yaml").read_text())
    raw["fitness"].update(fitness)
    config = parse_config(raw, "demo.yaml")
    staged = staged_scoring(config, {"pydoc": 32, "arith": 64, "compare": 64}, scorer=None, mode=make_mode(config, None))
    assert staged.plan.resample is resample and staged.judge.audit_siblings is audit_siblings and staged.judge.race == race
    assert (staged.plan.indices(1) != staged.plan.indices(0)) is resample


def test_stages_nest_and_end_with_every_item():
    plan = plan_stages([0.125, 0.5, 1.0], {"a": 64, "b": 10}, seed=3, min_items=4, proxy=False)
    indices = plan.indices()
    assert [len(i["a"]) for i in indices[:-1]] == [8, 32] and len(indices[0]["b"]) == 4
    assert set(indices[0]["a"]) <= set(indices[1]["a"]) and indices[-1] is None
    proxy = plan_stages([0.5, 1.0], {"a": 64}, seed=3, min_items=4, proxy=True)
    assert proxy.tasks[0] == ("_proxy",) and proxy.indices()[0] is None and proxy.indices()[1] == plan_stages(
        [0.5, 1.0], {"a": 64}, seed=3, min_items=4, proxy=False).indices()[0]


def test_each_generation_draws_its_own_subsets_shared_by_its_candidates():
    """`fitness.resample`: a generation's candidates share their first-stage items (the
    comparison among siblings stays paired) and the next generation draws new ones, so a member
    chosen for its score on one draw is not judged against its offspring on the same items."""
    sizes = {"a": 64, "b": 40}
    fresh = plan_stages([0.125, 1.0], sizes, seed=3, min_items=4, proxy=False, resample=True)
    fixed = plan_stages([0.125, 1.0], sizes, seed=3, min_items=4, proxy=False)
    child = lambda cid, gen: Candidate(id=cid, recipe=Recipe(op="copy", inputs=("m",)), target="m", generation=gen)  # noqa: E731
    siblings = [fresh.job(child(f"g001-{k:03d}", 1), 0).indices for k in range(3)]
    assert siblings[0] == siblings[1] == siblings[2]
    draws = [fresh.indices(g)[0] for g in range(4)]
    assert all(draws[g]["a"] != draws[h]["a"] for g in range(4) for h in range(g))
    assert all(len(d["a"]) == 8 and len(d["b"]) == 5 and set(d["a"]) < set(range(64)) for d in draws)
    assert draws[0] == fixed.indices()[0] == fresh.indices(None)[0]  # the first generation: the run's own draw
    assert all(fixed.indices(g) == fixed.indices(0) for g in range(4))
    assert fresh.job(child("x", 2), 1).indices is None  # the last stage: every item
    again = plan_stages([0.125, 1.0], sizes, seed=3, min_items=4, proxy=False, resample=True)
    assert again.indices(2) == fresh.indices(2)  # a resumed run draws the same items


def test_a_nested_stage_scores_only_the_items_it_adds():
    """stages [1/4, 1/2, 1]: the second screen asks only for the items beyond the first's (a
    contender already holds those scores, in the same precision); the last stage and the first
    dev stage after a proxy are scored whole; a task the stage adds nothing to is left out."""
    plan = plan_stages([0.25, 0.5, 1.0], {"a": 16, "b": 2}, seed=1, min_items=1, proxy=False, screen_dtype="bfloat16")
    child = Candidate(id="g000-001", recipe=Recipe(op="copy", inputs=("m",)), target="m", generation=0)
    first, second, last = (plan.job(child, k) for k in range(3))
    drawn = plan.indices(0)
    assert first.extends is None and first.indices == drawn[0] and last.extends is None and last.indices is None
    assert second.extends == 0 and second.autocast == "bfloat16" and second.tasks == ("a",)  # "b": one item at both screens
    assert second.indices == {"a": sorted(set(drawn[1]["a"]) - set(drawn[0]["a"]))} and len(second.indices["a"]) == 4
    proxy = plan_stages([0.25, 0.5, 1.0], {"a": 16}, seed=1, min_items=1, proxy=True)
    assert proxy.job(child, 1).extends is None and proxy.job(child, 2).extends == 1
    # screens at the workers' precision and tasks whose metrics join: the full evaluation too
    joined = plan_stages([0.25, 0.5, 1.0], {"a": 16, "b": 2}, seed=1, min_items=1, proxy=False, joins_last=True)
    full = joined.job(child, 2)
    assert full.extends == 1 and full.indices == {t: sorted(set(range(n)) - set(drawn[1][t])) for t, n in (("a", 16), ("b", 2))}
    assert joined.job(child, 2, member=False).indices is None  # an audit, stopped at any stage: scored whole
    assert not plan_stages([0.25, 1.0], {"a": 16}, seed=1, min_items=1, proxy=False, screen_dtype="bfloat16", joins_last=True).joins_last


BF16 = {"screen_dtype": "bfloat16"}


@pytest.mark.parametrize("fitness, workers, screen, joins", [
    (BF16, {}, "bfloat16", False),  # screened in bfloat16, scored in full in float32
    ({"screen_dtype": None}, {}, None, True),
    (BF16, {"dtype": "bfloat16"}, None, True),  # the workers' own dtype: no other precision
    (BF16, {"dtype": "auto", "num_gpus": 1}, "bfloat16", False),  # the actors decide: the plan cannot
])
def test_a_full_evaluation_joins_its_screens_only_in_their_precision(fitness, workers, screen, joins):
    from search.config import parse_config
    from search.run.stages import stage_plan

    raw = yaml.safe_load((ROOT / "configs" / "demo.yaml").read_text())
    raw["fitness"].update(fitness)
    raw["workers"].update(workers)
    config = parse_config(raw, "demo.yaml")
    plan = stage_plan(config, {t.name: 16 for t in config.tasks})
    assert plan.screen_dtype == screen and plan.joins_last is joins


AVX2_EPYC = "processor\t: 0\nmodel name\t: AMD EPYC\nflags\t\t: fpu sse2 avx avx2 fma\n"
SAPPHIRE_RAPIDS = "flags\t\t: fpu avx2 avx512f avx512_bf16 amx_bf16 amx_tile\n"
GRAVITON3 = "processor\t: 0\nFeatures\t: fp asimd sve bf16 i8mm\n"


def test_native_bfloat16_is_read_off_the_cpus_flags():
    from search.run.stages import native_bfloat16_cpu

    assert not native_bfloat16_cpu(AVX2_EPYC) and not native_bfloat16_cpu("")
    assert native_bfloat16_cpu(SAPPHIRE_RAPIDS) and native_bfloat16_cpu(GRAVITON3)


@pytest.mark.parametrize("workers, native, screen", [
    ({}, True, "bfloat16"),  # a CPU that multiplies bfloat16: half a float32 screen's cost
    ({}, False, None),  # one that emulates it (32x float32 on an AVX2 EPYC): the workers' dtype
    ({"dtype": "bfloat16"}, True, None),  # the workers' own dtype already
    ({"num_gpus": 1}, False, None),  # GPU actors run bfloat16 anyway (workers.dtype auto)
    ({"num_gpus": 1, "dtype": "float32"}, False, "bfloat16"),
])
def test_an_auto_screen_dtype_is_decided_by_the_actors_hardware(workers, native, screen):
    from search.config import parse_config
    from search.run.stages import resolved_screen_dtype

    raw = yaml.safe_load((ROOT / "configs" / "demo.yaml").read_text())
    assert raw["fitness"]["screen_dtype"] == "auto"
    raw["workers"].update(workers)
    config = parse_config(raw, "demo.yaml")
    assert resolved_screen_dtype(config, native_bfloat16=native) == screen
    config.fitness.screen_dtype = "float16"
    assert resolved_screen_dtype(config, native_bfloat16=native) == "float16"  # what is written stays


@pytest.mark.parametrize("native, demo", [(True, "demo.yaml"), (False, "demo-float32.yaml")])
def test_the_demo_is_the_float32_one_where_the_cpu_emulates_bfloat16(native, demo):
    from search.demo import demo_config

    assert demo_config(native_bfloat16=native).name == demo


def test_the_float32_demo_is_the_demo_made_smaller():
    """demo-float32.yaml searches what demo.yaml does (parents, tasks, seed, generations) with
    fewer offspring in one step and a first stage drawn from demo.yaml's, all in float32, so its
    full evaluations join the first stage's items instead of scoring them again."""
    from search.config import load_config
    from search.run.stages import stage_plan

    demo, small = (load_config(ROOT / "configs" / name) for name in ("demo.yaml", "demo-float32.yaml"))
    for part in ("seed", "parents", "tasks", "workers"):
        assert getattr(small, part) == getattr(demo, part), part
    for gene in ("generations", "F", "CR", "include_base"):
        assert getattr(small.evolver, gene) == getattr(demo.evolver, gene), gene
    assert small.evolver.offspring_per_member < demo.evolver.offspring_per_member
    assert small.fitness.screen_dtype is None and small.fitness.stages[-1] == 1.0
    items = {"pydoc": 32, "arith": 64, "compare": 64}
    plan, demo_plan = stage_plan(small, items), stage_plan(demo, items)
    assert plan.screen_dtype is None and plan.joins_last
    for generation in range(demo.evolver.generations):  # every generation's first stage: some of demo.yaml's items
        first, demo_first = plan.indices(generation)[0], demo_plan.indices(generation)[0]
        assert all(2 <= len(first[t]) and set(first[t]) <= set(demo_first[t]) for t in items), generation
        assert sum(map(len, first.values())) < sum(map(len, demo_first.values()))


def test_a_run_started_with_an_auto_screen_writes_what_it_decided(tmp_path, monkeypatch):
    """`start_search` decides `auto` before the run's identity is written, so the config a resume
    reads holds the dtype this machine chose, wherever it resumes."""
    from search.config import load_config
    from search.run import session

    raw = yaml.safe_load((ROOT / "configs" / "tiny.yaml").read_text())
    raw["fitness"] = {"stages": [0.25, 1.0], "screen_dtype": "auto"}
    (tmp_path / "auto.yaml").write_text(yaml.safe_dump(raw))
    for native, written in ((True, "bfloat16"), (False, None)):
        monkeypatch.setattr("search.run.stages.native_bfloat16_cpu", lambda native=native: native)
        monkeypatch.setattr(session, "run_search", lambda config, store, *args, **kwargs: store.root)
        run = session.start_search(tmp_path / "auto.yaml", tmp_path / f"run-{native}", quiet=True)
        assert load_config(run / "config.yaml").fitness.screen_dtype == written
        assert json.loads((run / "identity.json").read_text())["config"]["fitness"]["screen_dtype"] == written


def test_a_joined_row_scores_every_item_it_holds():
    """Hand computation: the first stage's examples and the added items', in item order, and
    each task's score sum(value) / sum(weight) over all of them."""
    child = Candidate(id="c", recipe=Recipe(op="copy", inputs=("m",)), generation=0)
    examples = lambda index, value, weight: {"index": index, "value": value, "weight": weight}  # noqa: E731
    earlier = Evaluation(child, "dev", "ok", {
        "acc": {"score": 0.5, "acc": 0.5, "examples": examples([3, 7], [1.0, 0.0], [1.0, 1.0])},
        "ppl": {"score": -16 / 6, "examples": examples([0, 2], [-10.0, -6.0], [4.0, 2.0])}}, stage=0)
    added = Evaluation(child, "dev", "ok", {"acc": {"score": 1.0, "acc": 1.0, "examples": examples([1, 5], [1.0, 1.0], [1.0, 1.0])}},
                       stage=1, timing={"score_s": 0.25})
    joined = added.joined(earlier)
    assert joined.metrics == {"acc": {"score": 0.75, "examples": examples([1, 3, 5, 7], [1.0, 1.0, 1.0, 0.0], [1.0] * 4)},
                              "ppl": {"score": -16 / 6, "examples": examples([0, 2], [-10.0, -6.0], [4.0, 2.0])}}
    assert joined.stage == 1 and joined.extra["extends"] == 0 and joined.timing == {"score_s": 0.25}  # the cost of the added items
    assert joined.with_score({"acc": 1.0, "ppl": 1.0}).score == pytest.approx((0.75 - 16 / 6) / 2)
    failed = Evaluation(child, "dev", "failed", {}, stage=1, reason="OOM")
    assert failed.joined(earlier) is failed


def test_stopped_candidates_are_journalled_audited_and_never_selected(staged_run):
    store = RunStore(staged_run)
    journal, state = store.read_journal(), store.read_state()
    stops = [e for e in journal if e["status"] == "stopped"]
    assert stops, "no candidate was stopped: the staged run tested nothing"
    for stop in stops:
        assert stop["stage"] == 0 and stop["reason"].startswith("stage 1") and stop["metrics"]
        full = [e for e in journal if e["id"] == stop["id"] and e.get("stage") == 1]
        if stop["rule"] == "margin":
            assert len(full) == 1 and full[0]["status"] == "ok", "audit 1.0 scores every stop of the paired test in full"
        else:
            assert stop["rule"] == "sibling" and not full, "a sibling stop rejects nothing: it is not audited"
    margin_stops = [s for s in stops if s["rule"] == "margin"]
    members = {m["id"] for m in state["population"] + state["hall_of_fame"]}
    assert not members & {s["id"] for s in stops}
    logbook = store.read_logbook()
    assert [r["judged"] for r in logbook] == [6, 6] and sum(r["stopped"] for r in logbook) == len(stops)
    status = evofuse("status", str(staged_run), "--json")
    assert status.returncode == 0
    staged = json.loads(status.stdout)["staged"]
    assert staged["stopped"] == len(stops) and staged["audited"] == len(margin_stops)
    rate = staged["false_rejection_rate"]
    assert (0.0 <= rate <= 1.0) if margin_stops else rate is None


def test_a_full_evaluation_after_a_float32_screen_scores_only_what_the_screen_lacked(staged_run):
    """The tiny run screens in the workers' precision: a contender's full evaluation scores the
    items its first stage did not hold and joins both, with every metric a whole scoring (a
    parent's) gives; its score is the aggregate over every item. Audits are scored whole."""
    journal = [e for e in RunStore(staged_run).read_journal() if e["split"] == "dev"]
    screens = {e["id"]: e for e in journal if e.get("stage") == 0 and e["status"] == "ok"}
    joined = [e for e in journal if e.get("stage") == 1 and e["status"] == "ok" and "extends" in e]
    stopped = {e["id"] for e in journal if e["status"] == "stopped"}
    parent = next(e for e in journal if e.get("stage") is None and e["status"] == "ok")
    assert joined and all(e["extends"] == 0 and e["id"] not in stopped for e in joined)
    whole = {t: len(m["examples"]["index"]) for t, m in parent["metrics"].items()}
    for row in joined:
        for task, metrics in row["metrics"].items():
            assert metrics.keys() == parent["metrics"][task].keys()
            assert sorted(metrics["examples"]["index"]) == list(range(whole[task]))
            screen = screens[row["id"]]["metrics"][task]["examples"]
            assert dict(zip(screen["index"], screen["value"])).items() <= dict(zip(metrics["examples"]["index"], metrics["examples"]["value"])).items()
        assert row["score"] == pytest.approx(sum(m["score"] for m in row["metrics"].values()) / len(row["metrics"]))


def test_resume_after_a_kill_between_stages_equals_the_uninterrupted_run(staged_run, tmp_path, search_killed_at):
    run_dir = tmp_path / "run"
    search_killed_at(staged_config(tmp_path), run_dir, "g001-005")  # killed after its first stage
    killed_rows = len(RunStore(run_dir).read_journal())
    resumed = evofuse("resume", str(run_dir), "--quiet")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    keys = [(e["id"], e["split"], e.get("stage"), e["status"]) for e in RunStore(run_dir).read_journal()]
    assert len(keys) == len(set(keys)) > killed_rows, "a finished stage was scored again"
    assert comparable(run_dir) == comparable(staged_run)
    assert RunStore(run_dir).read_state()["population"] == RunStore(staged_run).read_state()["population"]


def test_chosen_stage_items_are_scored_in_every_generation_and_a_bad_order_is_refused(staged_run, tmp_path):
    """`fitness.items`: every first-stage row of every generation holds the order's first items
    (here each task's last items first); the run's config.yaml carries the order; an order naming
    an item a task lacks is one `fitness.items` error, exit 2, and leaves no run behind."""
    parent = next(e for e in RunStore(staged_run).read_journal() if e["id"] == "base" and e["split"] == "dev")
    ids = {t: sorted(m["examples"]["index"]) for t, m in parent["metrics"].items()}
    order = {t: list(range(len(v)))[::-1] for t, v in ids.items()}
    proc = evofuse("search", str(staged_config(tmp_path, items=order)), "--run-dir", str(tmp_path / "run"), "--quiet")
    assert proc.returncode == 0, proc.stderr[-3000:]
    store = RunStore(tmp_path / "run")
    assert yaml.safe_load(store.config_path.read_text())["fitness"]["items"] == order
    screens = [e for e in store.read_journal() if e.get("stage") == 0 and e.get("target")]
    assert {e["generation"] for e in screens} == {0, 1}
    for row in screens:
        for task, metrics in row["metrics"].items():
            n = len(ids[task])
            first = stage_sizes(n, STAGED["stages"], 4)[0]
            assert sorted(metrics["examples"]["index"]) == ids[task][n - first:]

    too_far = {t: [len(v)] + p[1:] for (t, v), p in zip(ids.items(), order.values())}
    bad = tmp_path / "bad"
    bad.mkdir()
    proc = evofuse("search", str(staged_config(bad, items=too_far)), "--run-dir", str(bad / "run"), "--quiet")
    ours = [line for line in proc.stderr.splitlines() if line.startswith("evofuse")]  # Ray may log a warning too
    assert proc.returncode == 2 and ours == [f"evofuse search: fitness.items: task {next(iter(ids))!r}: item position "
                                             f"{len(next(iter(ids.values())))} but the task has {len(next(iter(ids.values())))} items"]
    assert not (bad / "run").exists()


@pytest.mark.parametrize("screen", [{}, {"screen_dtype": "bfloat16"}], ids=["float32", "bfloat16"])
def test_a_kl_proxy_first_stage_in_a_joint_run(tmp_path, screen):
    """The KL stage, in the workers' float32 and screened in bfloat16 (`fitness.screen_dtype`:
    the forward under autocast, the KL's own math exact): every candidate's proxy row is ok."""
    proxy = {"kind": "kl", "data": "pydoc:train", "options": {"seq_len": 32, "num_sequences": 4}}
    config = staged_config(tmp_path, "tiny-joint.yaml", stages=[0.5, 1.0], proxy=proxy, audit=0.0, **screen)
    proc = evofuse("search", str(config), "--run-dir", str(tmp_path / "run"), "--quiet")
    assert proc.returncode == 0, proc.stderr[-3000:]
    journal = RunStore(tmp_path / "run").read_journal()
    assert not [e for e in journal if e["status"] == "failed"]
    first = [e for e in journal if e.get("stage") == 0 and e["status"] == "ok"]
    assert first and all(set(e["metrics"]) == {"_proxy"} and e["metrics"]["_proxy"]["kl"] >= 0 for e in first)
    assert all(e.get("autocast") == screen.get("screen_dtype") for e in first)
    planned = [e for e in first if e["plan"]]
    assert planned and all(e["metrics"]["_proxy"]["kl"] > 0 for e in planned)
    from optuna.storages import JournalStorage
    from optuna.storages.journal import JournalFileBackend

    study = optuna.load_study(study_name="tiny-joint", storage=JournalStorage(JournalFileBackend(str(tmp_path / "run" / "optuna.journal"))))
    for stop in (e for e in journal if e["status"] == "stopped"):
        trial = study.trials[stop["trial"]]
        assert trial.state == optuna.trial.TrialState.PRUNED and trial.user_attrs["pruned_reason"] == stop["reason"]


def shared_recipe_run(tmp_path: Path, advance: int = 3, audit: float = 0.0, **proxy_settings) -> Path:
    """A staged joint run whose members' offspring share a recipe: genes, a KL first stage; with
    the default `advance` every sibling the front does not dominate goes on."""
    proxy = {"kind": "kl", "data": "pydoc:train", "options": {"seq_len": 32, "num_sequences": 4}, **proxy_settings}
    config = staged_config(tmp_path, "tiny-joint.yaml", stages=[1.0], proxy=proxy, audit=audit, advance=advance)
    raw = yaml.safe_load(config.read_text())
    raw["evolver"].update(generations=1, offspring_per_member=3, share_recipe=True)
    raw["compress"]["space"].update(genes=True, width=["prune_width"], width_ratio={"low": 0.1, "high": 0.5})
    raw["workers"]["count"] = 2
    config.write_text(yaml.safe_dump(raw))
    proc = evofuse("search", str(config), "--run-dir", str(tmp_path / "run"), "--quiet")
    assert proc.returncode == 0, proc.stderr[-3000:]
    return tmp_path / "run"


@pytest.fixture(scope="module")
def shared_run(tmp_path_factory) -> Path:
    return shared_recipe_run(tmp_path_factory.mktemp("shared"))


def test_offspring_sharing_a_recipe_differ_in_their_plans(shared_run):
    """`evolver.share_recipe`: a member's offspring carry one Evolver recipe (its dense KL
    reference and width statistics are computed once per actor) and their own genes' plans."""
    first = [e for e in RunStore(shared_run).read_journal() if e.get("stage") == 0]
    families: dict[str, list[dict]] = {}
    for row in first:
        families.setdefault(row["target"], []).append(row)
    assert len(families) == 3 and all(len(rows) == 3 for rows in families.values())
    for rows in families.values():
        assert len({json.dumps(r["recipe"], sort_keys=True) for r in rows}) == 1
        assert len({json.dumps(r["plan"], sort_keys=True) for r in rows}) == 3
        assert all(r["status"] == "ok" and r["metrics"]["_proxy"]["kl"] > 0 for r in rows)
    assert len({json.dumps(r["recipe"], sort_keys=True) for r in first}) == 3


def test_an_unreconstructed_first_stage_rebuilds_what_goes_on(shared_run, tmp_path):
    """`fitness.proxy.unreconstructed`: the KL stage judges each plan without LIAR; the dev
    stage scores the reconstructed model, exactly what a run without the option scores."""
    run = shared_recipe_run(tmp_path, unreconstructed=True)
    rows = {(e["id"], e.get("stage")): e for e in RunStore(run).read_journal() if e["split"] == "dev"}
    reference = {(e["id"], e.get("stage")): e for e in RunStore(shared_run).read_journal() if e["split"] == "dev"}
    proxy = [(rows[k], reference[k]) for k in rows if k[1] == 0 and k in reference and rows[k]["plan"] == reference[k]["plan"]]
    assert proxy and all(a["metrics"]["_proxy"]["kl"] != b["metrics"]["_proxy"]["kl"] for a, b in proxy)
    full = [(rows[k], reference[k]) for k in rows if k[1] == 1 and k in reference and rows[k]["plan"] == reference[k]["plan"]]
    assert full, "no candidate went on in both runs"
    for a, b in full:
        assert a["metrics"] == b["metrics"] and a["num_params"] == b["num_params"], a["id"]


def test_joint_siblings_go_on_by_their_lead_over_the_front():
    """Compress / joint (1 + lambda): of one member's offspring the `advance` best go on, ranked by
    the paired lead over the front members no larger than each (a candidate smaller than the whole
    front: over its smallest members)."""
    plan = plan_stages([1.0], {"acc": 8}, seed=0, min_items=4, proxy=True)
    judge = StageJudge(plan, {"acc": 1.0}, confidence=0.9, advance=1, run_seed=0, audit=0.0)
    kl = _proxy_row
    small = kl("small", [-2.0] * 8)  # front member of 50 parameters, KL 2 per window
    big = kl("big", [-0.5] * 8)  # front member of 100
    size = {"small": 50, "big": 100, "a": 60, "b": 120, "c": 40, "d": 120}
    rows = {"a": kl("a", [-1.5] * 8), "b": kl("b", [-0.2] * 8), "c": kl("c", [-9.0] * 8), "d": kl("d", [-0.4] * 8)}
    front = [(small, (50.0,)), (big, (100.0,))]
    costs_of = lambda r: (float(size[r.id]),)  # noqa: E731
    # leads: a +0.5 over small; b +0.3 over big (its harder rival); d +0.1; c, smaller than all,
    # against small: -7.0
    two = [rows["a"].candidate, rows["b"].candidate]
    assert set(judge.pareto_siblings(0, rows, front, two, costs_of)) == {"b"}
    three = [rows["b"].candidate, rows["c"].candidate, rows["d"].candidate]
    stopped = judge.pareto_siblings(0, rows, front, three, costs_of)
    assert set(stopped) == {"c", "d"} and all(rule == "sibling" and rival == "b" for _, rival, rule in stopped.values())
    c_best = _proxy_row("c", [-1.0] * 8)  # smaller than the front and better than its smallest: +1.0
    assert set(judge.pareto_siblings(0, {**rows, "c": c_best}, front, three, costs_of)) == {"b", "d"}
    # the first generation: only the dense parents, larger than every offspring: the best KL goes on
    dense = [(kl("parent", [0.0] * 8), (200.0,))]
    assert set(judge.pareto_siblings(0, rows, dense, [rows["a"].candidate, rows["b"].candidate], costs_of)) == {"a"}


def _proxy_row(cid: str, values: list[float]) -> Evaluation:
    """A KL stage row: per-window value -KL sum, weight 1."""
    candidate = Candidate(id=cid, recipe=Recipe(op="copy", inputs=("m",)), target="m")
    metrics = {"_proxy": {"score": sum(values) / len(values), "examples": _examples(values)}}
    return Evaluation(candidate, "dev", "ok", metrics, score=sum(values) / len(values), stage=0)


def test_a_proxy_stage_stops_a_candidate_only_against_front_members_of_its_own_recipe():
    """The KL stage measures a candidate against its own dense weights, so a front member of
    another recipe cannot stop it there; on dev items it can."""
    plan = plan_stages([1.0], {"acc": 8}, seed=0, min_items=4, proxy=True)
    judge = StageJudge(plan, {"acc": 1.0}, confidence=0.9, advance=1, run_seed=0, audit=0.0)
    candidate = _proxy_row("c", [-3.0, -2.5] * 4)  # recipe copy(m), 60 parameters, far behind both members
    mine = _proxy_row("same", [-0.5, -0.4] * 4)  # recipe copy(m), 50 parameters
    theirs = _proxy_row("other", [-0.5, -0.4] * 4)
    theirs = replace(theirs, candidate=replace(theirs.candidate, recipe=Recipe(op="copy", inputs=("n",))))
    size = {"c": 60.0}
    costs_of = lambda r: (size[r.id],)  # noqa: E731
    rows = {"c": candidate}
    stopped = judge.pareto_survivors(0, rows, [(mine, (50.0,)), (theirs, (50.0,))], [candidate.candidate], costs_of)
    assert stopped["c"][1:] == ("same", "margin")
    assert judge.pareto_survivors(0, rows, [(theirs, (50.0,))], [candidate.candidate], costs_of) == {}
    # dev items compare across recipes
    dev = plan_stages([0.5, 1.0], {"acc": 8}, seed=0, min_items=4, proxy=False)
    dev_judge = StageJudge(dev, {"acc": 1.0}, confidence=0.9, advance=1, run_seed=0, audit=0.0)
    loser, winner = _row("c", "m", [0.0, 0.0, 0.0, 1.0]), _row("other", "n", [1.0, 1.0, 1.0, 1.0])
    assert dev_judge.pareto_survivors(0, {"c": loser}, [(winner, (50.0,))], [loser.candidate], costs_of)["c"][1] == "other"


def test_siblings_in_a_joint_run_stop_beyond_the_best(tmp_path):
    """With `advance: 1` one offspring per member goes on past the KL stage; the rest are
    journalled as sibling stops against the one that went on, and (`audit: 1.0`) scored in full
    anyway: in a joint run a sibling stop can be a false rejection."""
    run = shared_recipe_run(tmp_path, advance=1, audit=1.0, unreconstructed=True)
    journal = RunStore(run).read_journal()
    families: dict[str, set[str]] = {}
    for row in journal:
        if row.get("stage") == 0 and row["split"] == "dev":
            families.setdefault(row["target"], set()).add(row["id"])
    stops = {e["id"]: e for e in journal if e["status"] == "stopped"}
    full = {e["id"]: e for e in journal if e.get("stage") == 1 and e["status"] == "ok"}
    siblings = [s for s in stops.values() if s["rule"] == "sibling"]
    assert siblings, "no sibling stop: the rule was not exercised"
    for ids in families.values():
        went_on = [cid for cid in ids if cid in full and cid not in stops]
        assert len(went_on) <= 1
        for cid in ids & {s["id"] for s in siblings}:
            assert stops[cid]["rival"] == went_on[0] and cid in full, "audited against the sibling that went on"
    status = evofuse("status", str(run), "--json")
    staged = json.loads(status.stdout)["staged"]
    assert staged["audited"] >= len(siblings) and staged["false_rejection_rate"] is not None
    # the report: the front at the candidates' full dev scores (never a KL stage's), and the audit
    assert evofuse("report", str(run)).returncode == 0
    report = (run / "report" / "report.md").read_text()
    table = report.split("## Pareto front (dev)")[1].split("![Pareto front]")[0]
    front = [line.split(" | ") for line in table.splitlines() if line.startswith("| g")]
    assert front and len({row[0] for row in front}) == len(front), "each front member once"
    for row in front:
        assert float(row[2]) == pytest.approx(full[row[0].strip("| ")]["score"], abs=5e-5)
    assert "## Staged fitness" in report and "false-rejection rate" in report


def test_an_idle_actor_takes_work_on_the_recipe_it_holds():
    from collections import deque

    from evolve.recipe import Recipe
    from search.run.candidate import Candidate
    from search.run.workers import ScoreJob, take_for

    recipes = {name: Recipe(op="evolver", inputs=(name, "ref"), params={"F": 0.5, "CR": 0.5}, seed=1) for name in "abc"}
    queue = deque((ScoreJob(Candidate(id=f"{name}{k}", recipe=recipes[name], generation=0, target=name)), {}, 0)
                  for name in "aabbcc" for k in [len(name)])
    fp = {name: r.fingerprint() for name, r in recipes.items()}
    assert take_for(queue, fp["b"], {fp["a"], fp["b"]})[0].candidate.recipe == recipes["b"]  # its own recipe
    assert take_for(queue, fp["b"], {fp["a"], fp["b"]})[0].candidate.recipe == recipes["b"]
    assert take_for(queue, fp["b"], {fp["a"], fp["b"]})[0].candidate.recipe == recipes["c"]  # one no actor holds
    assert take_for(queue, None, {fp["a"], fp["c"]})[0].candidate.recipe == recipes["a"]  # else the first
    assert [e[0].candidate.recipe for e in queue] == [recipes["a"], recipes["c"]]


def test_unstaged_generations_score_the_items_the_parents_were_scored_on(tmp_path):
    """A task's own `subsample` option picks fixed items (seed 0, as for the parents); only
    `evolver.subsample` draws afresh per generation."""
    from search.config import load_config
    from search.run.loop import Search

    class Recorder:
        def __init__(self):
            self.jobs = []

        def evaluate(self, jobs, desc, follow=None):
            self.jobs += jobs
            return {}

    search = Search(load_config(ROOT / "configs" / "tiny.yaml"), RunStore(tmp_path / "run"))
    search.scorer = Recorder()
    candidate = Candidate(id="g002-000", recipe=Recipe(op="copy", inputs=("base",)))
    search.score([candidate], generation=2, state={})
    assert (search.scorer.jobs[-1].subsample, search.scorer.jobs[-1].subsample_seed) == (None, 0)
    search.config.evolver.subsample = 0.5
    search.score([candidate], generation=2, state={})
    assert (search.scorer.jobs[-1].subsample, search.scorer.jobs[-1].subsample_seed) == (0.5, 2)


def _shared_recipe_evaluator(target: str):
    """An actor of tiny-llama sharing recipes, a 2 x 32-token `kl` proxy judged unreconstructed,
    holding the recipe "recipe"; and a candidate whose plan prunes `target` with LIAR."""
    from search.models.sources import resolve_source
    from search.run.workers import Evaluator, WorkerSpec

    proxy = {"kind": "kl", "data": "pydoc:train", "options": {"seq_len": 32, "num_sequences": 2}, "unreconstructed": True}
    spec = WorkerSpec(template_dir=str(resolve_source("tiny-llama")), tasks=[], names=[], proxy=proxy, shared_recipes=True,
                      calibration={"data": "pydoc:dev", "seq_len": 32, "num_sequences": 16})
    evaluator = Evaluator(spec)
    evaluator._weights_key = "recipe"
    plan = [{"op": "prune_width", "ratio": 0.25, "target": target, "criterion": "second_moment", "reconstruct": "liar"}]
    return evaluator, Candidate(id="c", recipe=Recipe(op="copy", inputs=("base",)), plan=plan)


def test_an_unreconstructed_width_step_chooses_units_on_the_proxy_windows():
    """With shared recipes the KL stage's unreconstructed width step reads statistics gathered on
    the proxy's own windows (a quarter of the calibration pass in the joint demo); the rebuilt
    candidate reads the plan's calibration."""
    import copy

    import torch

    from compression.width import collect_width_stats, prune_with_stats
    from search.models.datasets import calibration_windows
    from search.run.workers import without_reconstruction

    evaluator, candidate = _shared_recipe_evaluator(target="ffn")
    step = without_reconstruction(candidate.steps[0])

    def pruned_on(windows):
        stats = collect_width_stats(evaluator.model, step, windows, every_layer=True)
        return prune_with_stats(copy.deepcopy(evaluator.model), step, stats).state_dict()

    on_proxy = pruned_on(calibration_windows(evaluator.tokenizer, "pydoc:train", 32, 2))
    on_plan = pruned_on(evaluator.calibration())
    judged = evaluator._apply_plan(candidate, {}, reconstruct=False).state_dict()
    assert all(torch.equal(judged[k], on_proxy[k]) for k in on_proxy)
    assert any(not torch.equal(on_plan[k], on_proxy[k]) for k in on_proxy), "the two windows chose the same units"
    rebuilt = evaluator._apply_plan(candidate, {}, reconstruct=True).state_dict()
    assert any(not torch.equal(rebuilt[k], judged[k]) for k in judged)  # LIAR's reconstruction, on the plan's windows


def test_a_recipe_keeps_its_units_blocks_for_screening_and_whole_statistics_only_within_the_models_size(monkeypatch):
    """A shared recipe's cache: the KL stage's unreconstructed steps keep each unit's diagonal
    block (`UnitGrams`); a rebuild's whole Gram matrices are kept while no larger than the
    working model, else each rebuilt plan gathers its own block by block, to the same bytes;
    another recipe's statistics are dropped before new ones are gathered."""
    import copy

    import torch

    import compression.width
    from compression.plan import apply_plan
    from compression.reconstruct import GramAccumulator
    from compression.width import UnitGrams

    evaluator, candidate = _shared_recipe_evaluator(target="both")
    own = apply_plan(copy.deepcopy(evaluator.model), candidate.steps, evaluator.calibration()).state_dict()

    evaluator._apply_plan(candidate, {}, reconstruct=False)
    (screening,) = evaluator._width_stats.values()
    assert all(isinstance(stats, UnitGrams) for stats in screening.values())
    rebuilt = evaluator._apply_plan(candidate, {}, reconstruct=True).state_dict()
    assert all(torch.equal(rebuilt[k], own[k]) for k in own)
    assert len(evaluator._width_stats) == 2  # the tiny model's whole statistics are smaller than its weights
    assert any(all(isinstance(s, GramAccumulator) for s in stats.values()) for stats in evaluator._width_stats.values())

    evaluator._width_stats, evaluator._weights_key = {}, "another recipe"
    evaluator._width_stats[("recipe", False, True, "both", None, 8)] = {"stale": None}
    monkeypatch.setattr(compression.width, "width_stats_bytes", lambda model, target: 10**12)  # a 7B-like shape
    rebuilt = evaluator._apply_plan(candidate, {}, reconstruct=True).state_dict()
    assert all(torch.equal(rebuilt[k], own[k]) for k in own)
    assert evaluator._width_stats == {("recipe", False, True, "both", None, 8): {"stale": None}}  # nothing gathered, nothing kept
    evaluator._apply_plan(candidate, {}, reconstruct=False)
    assert [key[0] for key in evaluator._width_stats] == ["another recipe"]


def test_workers_recipe_stats_gib_bounds_the_whole_statistics_a_recipe_keeps(monkeypatch):
    """`workers.recipe_stats_gib` (the spec's `recipe_stats_bytes`) replaces the working model's
    size as the bound on a recipe's whole Gram matrices: one byte under their size keeps none,
    their size keeps them, and a bound above the model keeps a shape larger than the model.
    Every way rebuilds the plan to its own pass's bytes."""
    import copy

    import torch

    import compression.width
    from compression.plan import apply_plan
    from compression.reconstruct import GramAccumulator
    from compression.width import width_stats_bytes

    evaluator, candidate = _shared_recipe_evaluator(target="both")
    own = apply_plan(copy.deepcopy(evaluator.model), candidate.steps, evaluator.calibration()).state_dict()
    whole = width_stats_bytes(evaluator.model, "both")
    model_bytes = sum(p.numel() * p.element_size() for p in evaluator.model.parameters())

    def rebuild_keeps(budget: int | None) -> bool:
        evaluator._width_stats, evaluator.spec.recipe_stats_bytes = {}, budget
        rebuilt = evaluator._apply_plan(candidate, {}, reconstruct=True).state_dict()
        assert all(torch.equal(rebuilt[k], own[k]) for k in own)
        return any(all(isinstance(s, GramAccumulator) for s in stats.values()) for stats in evaluator._width_stats.values())

    assert whole < model_bytes and rebuild_keeps(None)  # the default: within the model's size
    assert not rebuild_keeps(whole - 1) and not rebuild_keeps(0)
    assert rebuild_keeps(whole)
    monkeypatch.setattr(compression.width, "width_stats_bytes", lambda model, target: 2 * model_bytes)
    assert not rebuild_keeps(None) and rebuild_keeps(2 * model_bytes)


class OneActorScorer:
    """Scores jobs one at a time from a queue, the jobs a result releases joining its end, as one
    actor of the pool does; rows hold each job's items of `values` (per candidate, 16 items)."""

    def __init__(self, values: dict[str, list[float]], members: dict[str, list[float]]):
        self.values, self.order, self.journal = values, [], {}
        for member, scores in members.items():
            self.record(replace(_row(member, member, scores), stage=None))

    def evaluate(self, jobs, desc, follow=None, release=None, may_release=None):
        from collections import deque

        queue, results = deque(jobs), {}
        while queue:
            job = queue.popleft()
            items = job.indices["acc"] if job.indices else range(16)
            scores = [self.values[job.id][i] for i in items]
            metrics = {"acc": {"score": sum(scores) / len(scores),
                               "examples": {"index": list(items), "value": scores, "weight": [1.0] * len(scores)}}}
            row = Evaluation(job.candidate, "dev", "ok", metrics, score=sum(scores) / len(scores), stage=job.stage)
            self.order.append((job.id, job.stage))
            self.record(row)
            results[job.id] = row
            queue.extend(release(row))
        return results

    def finished(self, candidate_id, split="dev", stage=None):
        return self.journal.get((candidate_id, split, stage))

    def record(self, evaluation):
        self.journal[(evaluation.id, evaluation.split, "stopped" if evaluation.status == "stopped" else evaluation.stage)] = evaluation


def test_a_family_goes_on_as_soon_as_its_last_sibling_is_in_with_its_audits():
    """A member's offspring are judged together, but not with the other members' offspring: its
    contender's full evaluation (and the audit of a stop) is released the moment its last sibling
    is scored, behind the jobs already queued; each family's decision is its own."""
    from search.run.stages import StagedScoring

    plan = plan_stages([0.25, 1.0], {"acc": 16}, seed=0, min_items=4, proxy=False)
    judge = StageJudge(plan, {"acc": 1.0}, confidence=0.9, advance=1, run_seed=0, audit=1.0)
    good, bad = [1.0] * 16, [0.0] * 16
    values = {"m0": [0.5] * 16, "m1": good, "m2": [0.25] * 16,  # m1 leads its family and beats m
              "n0": bad, "n1": [0.1] * 16, "n2": bad,  # n1 leads its family, clearly behind n
              "o0": bad, "o1": good, "o2": bad}
    scorer = OneActorScorer(values, members={"m": [0.5] * 16, "n": good, "o": [0.5] * 16})
    family = lambda member: [Candidate(id=f"{member}{k}", recipe=Recipe(op="copy", inputs=(member,)), generation=0, target=member)  # noqa: E731
                             for k in range(3)]
    staged = StagedScoring(scorer, plan, judge, pareto=False, latency=False)
    outcome = staged.score(family("m") + family("n") + family("o"), "generation 1", hall_of_fame=[])

    firsts = [(f"{m}{k}", 0) for m in "mno" for k in range(3)]
    # n's audit is queued when n's last sibling is in, before o's contender (a barrier per stage
    # scored every contender first and the audits last)
    assert scorer.order == firsts + [("m1", 1), ("n1", 1), ("o1", 1)]
    assert outcome["o1"].ok and outcome["o1"].stage == 1
    assert outcome["m1"].ok and outcome["m1"].stage == 1
    rules = {cid: e.extra["rule"] for cid, e in outcome.items() if e.status == "stopped"}
    assert rules == {"m0": "sibling", "m2": "sibling", "n0": "sibling", "n1": "margin", "n2": "sibling", "o0": "sibling", "o2": "sibling"}
    assert outcome["n1"].stage == 0 and scorer.finished("n1", "dev", 1).score == pytest.approx(0.1), "the audit's full row"


def test_a_generation_in_which_every_candidate_failed_is_named_with_its_error():
    """A stop for failing at a stage reads through to the failed row's error; any candidate
    scored (ok, or stopped by a rule after its stage was scored) means the generation did not
    all fail."""
    from search.run.scoring import STOPPED, all_failed, failure_of
    from search.run.stages import failed_at, stopped_row

    def failed(cid: str) -> Evaluation:
        return Evaluation(Candidate.copy_of("m", cid), "dev", "failed", {}, reason="RuntimeError: no bfloat16 here", stage=0)

    journal = {(cid, "dev", 0): failed(cid) for cid in ("a", "b")}
    stops = [stopped_row(journal[(cid, "dev", 0)], 0, *failed_at(journal[(cid, "dev", 0)], 0)) for cid in ("a", "b")]
    assert stops[0].status == STOPPED and stops[0].reason == "failed at stage 1"
    assert all_failed(failure_of(s, journal) for s in stops) == "all 2 candidates failed, e.g. a: RuntimeError: no bfloat16 here"
    sibling = stopped_row(replace(failed("c"), status="ok", reason=None), 0, "stage 1: 1 of 2 siblings stop", "a", "sibling")
    assert all_failed(failure_of(s, journal) for s in [*stops, sibling]) is None
    assert all_failed([]) is None
