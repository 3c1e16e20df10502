"""Structure genes on the candidates of compress / joint runs (`compress.space.genes`).

In process (fast): the config key and its one-line errors, the journal record, plans that are
their genes compiled and on their trial's budget. In a real tiny compress run (the processes
forked and on one Ray cluster, as in test_run_safety.py): every candidate carries genes on its
trial's budget, the first generation's from the rankings and the second's bred from the
members' genes (re-derived here from the population the run restored), a run killed after the
second generation's trials were asked resumes to the uninterrupted run's directory, and the
exported candidate's plan replays with `evofuse compress --plan` to the same model.
"""
from __future__ import annotations

import json
import random
from pathlib import Path

import optuna
import pytest
import yaml

from compression.genes import (
    FUSE, KEEP, REMOVE, Genes, WidthGrid, compile_plan, gene_rng, genes_of_plan, width_unit_params,
)
from compression.plan import parse_plan, predict_num_params
from evolve.recipe import Recipe
from search.config import ConfigError, parse_config
from search.models.tiny import tiny_llama_config
from search.run.candidate import Candidate, Evaluation
from search.tuning.gene_plans import GenePlacer, candidate_genes, grid_of, structured_members, trial_budget
from search.tuning.planner import Planner
from search.tuning.space import GeneSpace, SpaceConfig

from test_run_safety import cluster, forkserver, snapshot  # noqa: F401  (its forked evofuse processes on one Ray cluster)

ROOT = Path(__file__).resolve().parent.parent
GRID = WidthGrid(step=0.0625, max_level=8)


def compress_raw(**space) -> dict:
    raw = yaml.safe_load((ROOT / "configs" / "tiny-compress.yaml").read_text())
    raw["compress"]["space"].update(space)
    return raw


# ------------------------------------------------------------------------------ in process


def test_the_config_key_and_its_one_line_errors():
    on = parse_config(compress_raw(genes=True))
    assert on.compress.space.genes == GeneSpace()
    off = parse_config(compress_raw())
    assert off.compress.space.genes is None and "genes" not in off.model_dump()["compress"]["space"]
    assert parse_config(compress_raw(genes=False)).fingerprint() == off.fingerprint()  # as before genes existed
    bad = [
        ({"genes": True, "width_ratio": {"low": 0.1, "high": 0.7}}, "compress.space: width_ratio.high: 0.7 is past the widest gene level"),
        ({"genes": True, "depth": ["none"], "width": ["none"]}, "compress.space: genes: the space has no depth or width step"),
        ({"genes": {"step": 0.25, "max_level": 4}}, "compress.space.genes: max_level: 4 levels of step 0.25 remove a whole layer"),
        ({"genes": {"crossover": 2}}, "compress.space.genes.crossover"),
        ({"genes": {"levels": 3}}, "compress.space.genes.levels: unknown key"),
    ]
    for space, message in bad:
        with pytest.raises(ConfigError) as info:
            parse_config(compress_raw(**space))
        assert message in str(info.value) and "\n" not in str(info.value)


def test_genes_are_journalled_with_the_candidate_and_old_rows_still_read():
    genes = Genes((KEEP, REMOVE, KEEP, FUSE), (2, 0, 1, 0))
    plan = tuple(json.loads(json.dumps(compile_plan(genes, GRID))))
    c = Candidate("g001-000", Recipe(op="copy", inputs=("base",)), plan, 7, 1, "base", genes, {"mutation": "g000-002"})
    row = Evaluation(c, "dev", "ok", score=-1.0).to_json()
    assert row["genes"] == {"blocks": ["keep", "remove", "keep", "fuse"], "levels": [2, 0, 1, 0], "from": {"mutation": "g000-002"}}
    back = Evaluation.from_json(row)
    assert back.candidate == c and back.extra == {}
    old = {k: v for k, v in row.items() if k != "genes"}
    assert Evaluation.from_json(old).candidate.genes is None and "genes" not in Evaluation.from_json(old).to_json()
    assert genes_of_plan(list(plan), 4, GRID) == genes  # the plan holds the genes: members need nothing more


def test_plans_are_their_genes_compiled_and_on_their_trials_budget():
    """Random trials of a gene space, three generations: every plan is its genes compiled, on the
    trial's budget in units, and the size of the budget spread evenly within one width unit."""
    config = tiny_llama_config(num_hidden_layers=8)
    n, dense = 8, predict_num_params([], config)
    space = SpaceConfig(genes=True, depth=["none", "remove_blocks", "fuse_blocks"], block_count={"low": 1, "high": 4},
                        width_ratio={"low": 0.05, "high": 0.45}, importance=["block_influence", "sleb"])
    rankings = {name: [random.Random(name).random() for _ in range(n)] for name in space.importance}
    placer = GenePlacer(space.genes, space, n, 0, lambda: rankings)
    study = optuna.create_study(directions=["maximize", "minimize"], sampler=optuna.samplers.RandomSampler(seed=0))
    planner = Planner(study, space, config, n, None, genes=placer)
    population, kinds = [{"id": "base", "plan": []}], set()
    for generation in range(3):
        asked = [planner.ask_candidate(Candidate.copy_of("base", f"g{generation:03d}-{i:03d}", target="base"), population)[0]
                 for i in range(6)]
        for c in asked:
            params = study.trials[c.trial].params
            grid = grid_of(space.genes, params["width_target"])
            budget, action = trial_budget(params, n, grid)
            assert c.genes.budget() == budget and all(a in (KEEP, action) for a in c.genes.blocks)
            assert genes_of_plan(list(c.plan), n, grid) == c.genes
            kept = n - budget.blocks_out
            ratio = params["width_ratio"] if params["width"] != "none" else 0.0
            assert abs(budget.width_units - ratio / grid.step * kept) <= 0.5  # the trial's ratio, rounded to units
            size = predict_num_params(parse_plan(list(c.plan)), config)
            assert abs(size - predict_num_params(parse_plan(placer.uniform_plan(params)), config)) <= width_unit_params(config, grid)
            kinds.add(next(iter(c.genes_from)))
            study.tell(c.trial, [random.random(), float(size)])
        population = [{"id": c.id, "plan": list(c.plan)} for c in asked]
    assert {"ranking", "mutation", "crossover"} <= kinds
    assert size < dense


def test_the_spaces_ridge_reaches_every_width_step_and_only_when_set():
    """`compress.space.ridge` is LIAR's relative ridge in every plan a trial makes, with genes or
    without; unset, plans carry no `ridge` key, as runs made before it did."""
    from search.tuning.space import suggest_plan

    config = tiny_llama_config(num_hidden_layers=8)
    rankings = lambda: {"block_influence": [random.Random(b).random() for b in range(8)]}
    for ridge in (0.1, None):
        space = SpaceConfig(genes=True, width=["prune_width"], width_ratio={"low": 0.1, "high": 0.4}, ridge=ridge)
        study = optuna.create_study(directions=["maximize", "minimize"], sampler=optuna.samplers.RandomSampler(seed=1))
        planner = Planner(study, space, config, 8, None, genes=GenePlacer(space.genes, space, 8, 0, rankings))
        candidate = planner.ask_candidate(Candidate.copy_of("base", "g000-000", target="base"), [{"id": "base", "plan": []}])[0]
        asked = suggest_plan(optuna.trial.FixedTrial(study.trials[0].params), space, 8)
        for plan in (list(candidate.plan), asked):
            width = next(step for step in plan if step["op"] == "prune_width")
            assert width.get("ridge") == ridge and ("ridge" in width) == (ridge is not None)
            step = next(step for step in parse_plan(plan) if step.op == "prune_width")
            assert step.ridge == (ridge if ridge is not None else 1e-2)


def test_a_joint_candidate_breeds_from_the_member_it_challenges():
    """The Evolver target is the gene parent when it has structure (crossover: the first
    parent); a dense target (an expert) leaves the choice to the candidate's seed."""
    budget_parents = [("a", Genes((REMOVE, KEEP, KEEP, KEEP), (0, 1, 1, 0))), ("b", Genes((KEEP, KEEP, REMOVE, KEEP), (2, 0, 0, 0)))]
    settings, (budget, action) = GeneSpace(), trial_budget(
        {"depth": "remove_blocks", "block_count": 1, "width": "prune_width", "width_ratio": 0.1}, 4, GRID)
    ranking = ("sleb", [0.3, 0.1, 0.4, 0.2])
    for k in range(20):
        genes, origin = candidate_genes(gene_rng(0, f"g001-{k:03d}"), budget, action, GRID, settings, ranking,
                                        budget_parents, "b", 4)
        assert genes.budget() == budget and (origin.get("mutation") or origin["crossover"][0]) == "b"
    dense_target = {json.dumps(candidate_genes(gene_rng(0, f"g001-{k:03d}"), budget, action, GRID, settings, ranking,
                                               budget_parents, "arith", 4)[1]) for k in range(20)}
    assert any('"a"' in o for o in dense_target) and any('"b"' in o for o in dense_target)


# ------------------------------------------------------------------------------ a real run


def run_config(tmp: Path) -> Path:
    raw = compress_raw(genes=True, importance=["block_influence", "sleb"])
    raw["compress"]["candidates"] = 3
    raw["tasks"][0]["options"]["subsample"] = 6  # scoring is not what is tested: few documents
    raw["export_top"] = 0
    path = tmp / "genes.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


@pytest.fixture(scope="module")
def runs(tmp_path_factory, forkserver, cluster):  # noqa: F811
    """(config, the uninterrupted run, the killed-and-resumed run, the population the resumed
    process restored before asking generation 2's plans)."""
    tmp = tmp_path_factory.mktemp("genes")
    config = run_config(tmp)
    reference, resumed = tmp / "reference", tmp / "resumed"
    # state writes: the first population, generation 1's plans, its end, generation 2's plans (killed before the rename)
    jobs = [forkserver.start("search", str(config), "--run-dir", str(reference), "--quiet", "--address", cluster),
            forkserver.start("search", str(config), "--run-dir", str(resumed), "--quiet", "--address", cluster,
                             EVOFUSE_FAULT_KILL_AT="state.fsync:4")]
    (rc, log), (killed_rc, killed_log) = [forkserver.wait(job) for job in jobs]
    assert rc == 0, log[-3000:]
    assert killed_rc == -9, killed_log[-3000:]
    restored = json.loads((resumed / "state.json").read_text())
    assert restored["generation"] == 1 and not restored.get("pending")
    rc, log = forkserver.run("resume", str(resumed), "--quiet", "--address", cluster)
    assert rc == 0, log[-3000:]
    return config, reference, resumed, restored["population"]


def dev_rows(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "journal.jsonl").read_text().splitlines()
            if json.loads(line)["split"] == "dev" and "trial" in json.loads(line)]


@pytest.mark.slow
def test_a_run_breeds_genes_on_each_trials_budget(runs):
    config, reference, _, population = runs
    settings = parse_config(yaml.safe_load(config.read_text())).compress.space.genes
    storage = optuna.storages.JournalStorage(optuna.storages.journal.JournalFileBackend(str(reference / "optuna.journal")))
    study = optuna.load_study(study_name="tiny-compress", storage=storage)
    rankings = study.user_attrs["gene_rankings"]
    assert set(rankings) == {"block_influence", "sleb"}
    rows = dev_rows(reference)
    assert len(rows) == 6 and all(r["status"] == "ok" for r in rows)
    gen0 = [r for r in rows if r["generation"] == 0]
    gen1 = [r for r in rows if r["generation"] == 1]
    structured = structured_members(population, 4, GRID)
    assert structured and {pid for pid, _ in structured} <= {r["id"] for r in gen0}
    for row in rows:
        params = study.trials[row["trial"]].params
        grid = grid_of(settings, params["width_target"])
        budget, action = trial_budget(params, 4, grid)
        genes = Genes.from_data({k: row["genes"][k] for k in ("blocks", "levels")})
        assert genes.budget() == budget and genes_of_plan(row["plan"], 4, grid) == genes
        parents = structured if row["generation"] == 1 else []
        expected = candidate_genes(gene_rng(0, row["id"]), budget, action, grid, settings,
                                   (params["importance"], rankings[params["importance"]]), parents, row["target"], 4)
        assert (genes, row["genes"]["from"]) == (expected[0], {**expected[1]}), row["id"]
    assert all("ranking" in r["genes"]["from"] for r in gen0)
    assert {r["genes"]["from"]["ranking"] for r in gen0} == {"block_influence", "sleb"}  # the anchors take each ranking
    assert all({"mutation", "crossover"} & set(r["genes"]["from"]) for r in gen1)


@pytest.mark.slow
def test_a_killed_run_resumes_to_the_uninterrupted_run(runs):
    _, reference, resumed, _ = runs
    got, want = snapshot(resumed), snapshot(reference)
    assert sorted(got) == sorted(want)
    assert [name for name in want if got[name] != want[name]] == []


@pytest.mark.slow
def test_the_exported_plan_replays_to_the_same_model(runs, forkserver, tmp_path):  # noqa: F811
    import torch

    from search.models.experts import resolve_parents
    from search.models.sources import load_model

    config, reference, _, _ = runs
    rows = [r for r in dev_rows(reference) if {"prune_width", "remove_blocks"} <= {s["op"] for s in r["plan"]}]
    chosen = max(rows or dev_rows(reference), key=lambda r: len(r["plan"]))
    (tmp_path / "plan.yaml").write_text(yaml.safe_dump(chosen["plan"]))  # the journalled plan, replayed as a user would
    run_config = parse_config(yaml.safe_load(config.read_text()))
    base = resolve_parents(run_config, quiet=True)["base"]
    calibration = run_config.compress.space.calibration
    export = forkserver.start("export", str(reference), "--id", chosen["id"], "--out", str(tmp_path / "export"))
    replay = forkserver.start("compress", str(base), "--plan", str(tmp_path / "plan.yaml"), "--out", str(tmp_path / "replay"),
                              "--calibration", calibration.data, "--seq-len", str(calibration.seq_len),
                              "--num-sequences", str(calibration.num_sequences), "--quiet")
    for job in (export, replay):
        rc, log = forkserver.wait(job)
        assert rc == 0, log[-3000:]
    assert json.loads((tmp_path / "export" / "evofuse_recipe.json").read_text())["plan"] == chosen["plan"]
    exported, _ = load_model(tmp_path / "export")
    replayed, _ = load_model(tmp_path / "replay")
    want, got = exported.state_dict(), replayed.state_dict()
    assert sorted(got) == sorted(want)
    assert all(torch.equal(got[name], want[name]) for name in want)
    assert sum(p.numel() for p in replayed.parameters()) == chosen["num_params"]
