"""`mode: recipe`: the genome, its compilation to gradient recipes, the history-derived CMA-ES,
and real runs on tiny models (Ray actors, Optuna's journal storage in the run directory).

The runs share one in-process Ray (started by the first): an uninterrupted run, and the same
run interrupted mid-generation (its trials asked, half of them scored) then resumed, which must
end exactly where the uninterrupted run ends. How trials are told (COMPLETE, PRUNED by staged
fitness with their stage score, FAIL) is checked on an in-memory study.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import optuna
import pytest
import torch
import yaml

from search.config import ConfigError, load_config, parse_config
from search.run import faults
from search.run.store import RunStore
from search.tuning.cmaes import HistoryCmaEsSampler
from search.tuning.recipe_space import RecipeSpace

ROOT = Path(__file__).resolve().parent.parent
TINY = ROOT / "configs" / "recipe-tiny.yaml"


def raw_config(**recipe) -> dict:
    raw = yaml.safe_load(TINY.read_text())
    raw["recipe"].update(recipe)
    return raw


def write_config(tmp_path: Path, name: str, **changes) -> Path:
    raw = yaml.safe_load(TINY.read_text())
    raw.update(changes)
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


# ---- the genome and its recipe -------------------------------------------------------------
def test_layer_group_anchors_interpolate_over_depth_as_mergekit_gradients_do():
    from mergekit.config import evaluate_setting

    from evolve.materialize import resolve_parameters
    from evolve.registry import get_operator

    config = parse_config(raw_config(layer_groups=3), "recipe")
    space = RecipeSpace.from_config(config, num_layers=7)
    assert [g.name for g in space.genes()][:3] == ["weight.arith.0", "weight.arith.1", "weight.arith.2"]
    assert len(space.genes()) == 2 * 2 * 3  # (weight, density) x (arith, compare) x groups
    genome = {g.name: g.low + (g.high - g.low) * ((i * 7) % 10) / 10 for i, g in enumerate(space.genes())}
    recipe = space.compile(genome)
    assert recipe.op == "ties" and recipe.base == "base" and recipe.inputs == ("arith", "compare")
    assert recipe.params["normalize"] is True and recipe.params["num_layers"] == 7
    anchors = recipe.params["per_input"]["compare"]["density"]
    assert anchors == [genome[f"density.compare.{k}"] for k in range(3)]
    op = get_operator("ties")
    for layer in range(7):
        name = f"model.layers.{layer}.mlp.up_proj.weight"
        _, per_input = resolve_parameters(recipe, op, ("arith", "compare"), name)
        expected = evaluate_setting(name, anchors, layer / 6, validate=float)  # mergekit's t = i / (L - 1)
        assert per_input[1]["density"] == pytest.approx(expected, abs=1e-12)
    _, outside = resolve_parameters(recipe, op, ("arith", "compare"), "model.embed_tokens.weight")
    assert outside[1]["density"] == anchors[0]  # tensors outside the layers sit at t = 0


def test_shared_parameters_one_group_and_slerp_ends():
    shared = RecipeSpace.from_config(parse_config(raw_config(layer_groups=1, per_expert=False), "r"), num_layers=4)
    recipe = shared.compile(shared.centre())
    assert [g.name for g in shared.genes()] == ["weight.0", "density.0"]
    assert recipe.params["weight"] == 0.5 and "num_layers" not in recipe.params and "per_input" not in recipe.params
    raw = raw_config(method="slerp", parameters={"t": [0.0, 1.0]}, fixed={}, layer_groups=2)
    slerp = RecipeSpace.from_config(parse_config(raw, "r"), num_layers=4)
    recipe = slerp.compile({"t.0": 0.2, "t.1": 0.9})
    assert recipe.inputs == ("arith", "compare") and recipe.base is None and recipe.params["t"] == [0.2, 0.9]
    raw["recipe"]["inputs"] = ["arith"]  # one expert: the base is SLERP's t = 0 end
    one = RecipeSpace.from_config(parse_config(raw, "r"), num_layers=4).compile({"t.0": 0.2, "t.1": 0.9})
    assert one.inputs == ("base", "arith") and one.base == "base"


@pytest.mark.parametrize("change, message", [
    ({"method": "model_stock", "parameters": {"filter_wise": [0, 1]}, "fixed": {}}, "recipe.method: 'model_stock' has no numeric"),
    ({"parameters": {"normalize": [0, 1]}}, "recipe.parameters.normalize: not a numeric parameter of 'ties'"),
    ({"parameters": {"weight": [1.0, 0.5]}}, "recipe.parameters: weight: expected [low, high]"),
    ({"fixed": {"weight": 1.0}}, "recipe.fixed.weight: also searched"),
    ({"method": "nope"}, "recipe.method: unknown op 'nope'"),
    ({"inputs": ["arith", "ghost"]}, "recipe.inputs: 'ghost' is not a parent"),
    ({"trials_per_generation": 1}, "recipe.trials_per_generation: CMA-ES needs at least 2"),
])
def test_bad_recipe_sections_are_one_line_naming_the_field(change, message):
    with pytest.raises(ConfigError) as info:
        parse_config(raw_config(**change), "c.yaml")
    assert message in str(info.value) and "\n" not in str(info.value)


def test_mode_and_section_must_agree(tmp_path):
    raw = raw_config()
    raw["mode"] = "merge"
    with pytest.raises(ConfigError, match="recipe: only for mode: recipe"):
        parse_config(raw, "c.yaml")
    del raw["recipe"]
    raw["mode"] = "recipe"
    with pytest.raises(ConfigError, match="recipe: mode: recipe needs a recipe section"):
        parse_config(raw, "c.yaml")
    with pytest.raises(ConfigError, match="recipe.layer_groups: 9 is more than the base model's 4 layers"):
        load_config(write_config(tmp_path, "deep", recipe={**raw_config()["recipe"], "layer_groups": 9}))


# ---- CMA-ES whose state is the study's history ------------------------------------------------
def test_history_cmaes_improves_and_a_new_sampler_asks_what_the_old_one_would():
    space = {f"x{i}": optuna.distributions.FloatDistribution(-1.0, 3.0) for i in range(4)}
    target = np.array([2.0, -0.5, 1.0, 2.5])

    def run(study, trials):
        for _ in range(trials):
            trial = study.ask()
            x = np.array([trial.suggest_float(n, d.low, d.high) for n, d in space.items()])
            study.tell(trial, -float(np.sum((x - target) ** 2)))

    study = optuna.create_study(direction="maximize", sampler=HistoryCmaEsSampler(space, popsize=6, seed=3))
    run(study, 6 * 15)
    first = np.mean([t.value for t in study.trials[:6]])
    last = np.mean([t.value for t in study.trials[-6:]])
    assert abs(last) < abs(first) / 20, (first, last)  # the distribution closed in on the optimum
    twin = optuna.create_study(direction="maximize", sampler=HistoryCmaEsSampler(space, popsize=6, seed=3))
    twin.add_trials(study.trials)  # a resumed run: the same history, a sampler that never asked
    asked = [s.ask() for s in (study, twin)]
    genomes = [[t.suggest_float(n, d.low, d.high) for n, d in space.items()] for t in asked]
    assert genomes[0] == genomes[1]


def test_a_trial_cut_off_mid_suggest_is_completed_as_the_uninterrupted_ask_would_be():
    from search.run.modes import make_mode

    config = parse_config(raw_config(), "recipe")

    def mode_with_study():
        mode = make_mode(config, None)
        mode.space, mode.trials = RecipeSpace.from_config(config, num_layers=4), 4
        mode.study = optuna.create_study(direction="maximize", sampler=HistoryCmaEsSampler(mode.space.distributions(), 4, seed=0))
        return mode

    whole, cut = mode_with_study(), mode_with_study()
    expected = [whole.genome_of(n) for n in range(2)]
    first = cut.space.genes()[0]
    cut.study.ask().suggest_float(first.name, first.low, first.high)  # the driver died here
    assert [cut.genome_of(n) for n in range(2)] == expected
    assert len(cut.study.trials) == 2


# ---- real runs ----------------------------------------------------------------------------------
def comparable(run_dir: Path) -> list[tuple]:
    return sorted((e["id"], e["split"], str(e.get("stage")), e["status"], round(e["score"], 9), e.get("reason") or "",
                   json.dumps(e["recipe"], sort_keys=True)) for e in RunStore(run_dir).read_journal())


def study_of(run_dir: Path, name: str) -> optuna.Study:
    from optuna.storages import JournalStorage
    from optuna.storages.journal import JournalFileBackend

    return optuna.load_study(study_name=name, storage=JournalStorage(JournalFileBackend(str(run_dir / "optuna.journal"))))


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[str, Path]:
    from search.run.session import start_search

    tmp = tmp_path_factory.mktemp("recipe")
    return {"plain": start_search(TINY, tmp / "plain", quiet=True)}


@pytest.mark.slow
def test_every_trial_is_a_journalled_candidate_told_to_optuna(runs):
    run = runs["plain"]
    journal = [e for e in RunStore(run).read_journal() if e["split"] == "dev" and e.get("trial") is not None]
    study = study_of(run, "recipe-tiny")
    space = RecipeSpace.from_config(load_config(run / "config.yaml"), num_layers=4)
    assert len(journal) == len(study.trials) == 8
    for row in journal:
        trial = study.trials[row["trial"]]
        assert row["id"] == f"g{row['trial'] // 4:03d}-{row['trial'] % 4:03d}"
        assert trial.state == optuna.trial.TrialState.COMPLETE and trial.value == row["score"]
        assert row["recipe"] == space.compile(trial.params).to_dict()  # the genome Optuna holds made it
    state = RunStore(run).read_state()
    assert state["status"] == "finished" and len(state["population"]) == 2
    from search.results.report import run_status, write_report

    status = run_status(run)
    assert status["evaluations"] == 3 + 8 and status["recipe_study"]["states"] == {"complete": 8}
    assert status["recipe_study"]["best_trial"]["value"] == max(row["score"] for row in journal)
    assert (write_report(run)).is_file()


@pytest.mark.slow
def test_the_best_recipe_exports_and_loads(runs, tmp_path):
    from transformers import AutoModelForCausalLM

    from evolve.materialize import materialize
    from evolve.recipe import Recipe
    from search.models.experts import resolve_parents
    from search.models.sources import load_state
    from search.results.export import export_member

    run = runs["plain"]
    best = max((e for e in RunStore(run).read_journal() if e.get("trial") is not None), key=lambda e: e["score"])
    out = export_member(run, best["id"], tmp_path / "best")
    model = AutoModelForCausalLM.from_pretrained(str(out))
    recipe = Recipe.from_dict(json.loads((out / "evofuse_recipe.json").read_text())["recipe"])
    assert recipe.to_dict() == best["recipe"]
    parents = {n: load_state(p) for n, p in resolve_parents(load_config(run / "config.yaml"), quiet=True).items()}
    name = "model.layers.2.mlp.down_proj.weight"
    expected = materialize(recipe, parents, [name])[name]
    assert torch.equal(model.state_dict()[name], expected)


def test_trials_challenge_the_best_member_and_are_told_complete_pruned_or_failed():
    from evolve.population import make_member
    from evolve.recipe import Recipe
    from search.run.candidate import Evaluation
    from search.run.modes import make_mode
    from search.run.stages import stopped_row

    config = parse_config(raw_config(), "recipe")
    mode = make_mode(config, None)
    mode.space = RecipeSpace.from_config(config, num_layers=4)
    mode.trials = 4
    mode.study = optuna.create_study(direction="maximize",
                                     sampler=HistoryCmaEsSampler(mode.space.distributions(), 4, seed=0))
    population = [make_member(n, Recipe("copy", (n,)), s) for n, s in (("arith", -2.7), ("compare", -2.4))]
    candidates = mode.offspring(None, population, generation=0)
    assert [c.id for c in candidates] == ["g000-000", "g000-001", "g000-002", "g000-003"]
    assert {c.target for c in candidates} == {"compare"} and [c.trial for c in candidates] == [0, 1, 2, 3]
    assert [c.recipe for c in mode.offspring(None, population, 0)] == [c.recipe for c in candidates]  # re-derived
    metrics = {"arith": {"score": -2.5}}
    ok = Evaluation(candidates[0], "dev", "ok", metrics, score=-2.3)
    stage = Evaluation(candidates[1], "dev", "ok", metrics, score=-2.6, stage=0)
    stopped = stopped_row(stage, 0, "stage 1: worse than compare", "compare", "margin")
    failed = Evaluation(candidates[2], "dev", "failed", reason="RuntimeError: boom")
    results = {e.id: e for e in (ok, stopped, failed)}
    mode.tell(candidates[:3], results)
    mode.tell(candidates[:3], results)  # a resumed run tells again: nothing changes
    t = mode.study.trials
    assert t[0].state == optuna.trial.TrialState.COMPLETE and t[0].value == -2.3
    assert t[1].state == optuna.trial.TrialState.PRUNED and t[1].intermediate_values == {0: -2.6}
    assert t[1].user_attrs["pruned_reason"] == "stage 1: worse than compare"
    assert t[2].state == optuna.trial.TrialState.FAIL and t[2].user_attrs["fail_reason"] == "RuntimeError: boom"
    members = [make_member(c.id, c.recipe, score) for c, score in zip(candidates, (-2.3, -2.5))]
    assert [m["id"] for m in mode.select(None, population, [(c, m) for c, m in zip(candidates, members)])] == \
           ["g000-000", "compare"]  # elitist: the best two of members and trials


@pytest.mark.slow
def test_resume_after_an_interruption_equals_the_uninterrupted_run(runs, tmp_path, monkeypatch):
    from search.run.session import resume_search, start_search

    def interrupt(candidate_id):
        if candidate_id == "g001-001":  # generation 2's trials asked, two of four scored
            raise KeyboardInterrupt("interrupted for the test")

    run = tmp_path / "run"
    monkeypatch.setattr(faults, "stall_after_journal", interrupt)
    with pytest.raises(KeyboardInterrupt):
        start_search(TINY, run, quiet=True)
    assert RunStore(run).read_state()["status"] == "interrupted"
    rows = len(RunStore(run).read_journal())
    monkeypatch.undo()
    resume_search(run, quiet=True)
    keys = [(e["id"], e["split"], e.get("stage"), e["status"]) for e in RunStore(run).read_journal()]
    assert len(keys) == len(set(keys)) > rows, "a finished evaluation was repeated"
    assert comparable(run) == comparable(runs["plain"])
    assert RunStore(run).read_state()["population"] == RunStore(runs["plain"]).read_state()["population"]
    resumed, uninterrupted = study_of(run, "recipe-tiny").trials, study_of(runs["plain"], "recipe-tiny").trials
    assert [(t.number, t.state, t.params, t.intermediate_values) for t in resumed] == \
           [(t.number, t.state, t.params, t.intermediate_values) for t in uninterrupted]


@pytest.mark.slow
def test_a_recipe_run_seeds_evolver(runs, tmp_path):
    """`evolver.seeds[i].recipe` names the recipe run: its best evolved member's recipe, read
    once into the config, replayed over this run's parents."""
    from search.config import seed_recipe

    run = runs["plain"]
    raw = yaml.safe_load((ROOT / "configs" / "tiny.yaml").read_text())
    raw["evolver"]["seeds"] = [{"name": "recipe_best", "recipe": str(run)}]
    path = tmp_path / "seeded.yaml"
    path.write_text(yaml.safe_dump(raw))
    config = load_config(path)
    state = RunStore(run).read_state()
    evolved = [m for m in state["hall_of_fame"] + state["population"] if m["recipe"]["op"] != "copy"]
    best = max(evolved, key=lambda m: m["score"])  # the parents are not recipes to seed with
    assert config.evolver.seeds[0].recipe == best["recipe"]
    assert seed_recipe(config, config.evolver.seeds[0]).to_dict() == best["recipe"]
    raw["evolver"]["seeds"] = [{"name": "x", "recipe": {"op": "linear", "inputs": ["arith", "g000-001"], "params": {"weight": 1.0}}}]
    path.write_text(yaml.safe_dump(raw))
    with pytest.raises(ConfigError, match=r"evolver.seeds\[0\].recipe: reads 'g000-001', not a parent"):
        load_config(path)
    raw["evolver"]["seeds"] = [{"name": "x", "recipe": str(tmp_path / "nowhere")}]
    path.write_text(yaml.safe_dump(raw))
    with pytest.raises(ConfigError, match=r"evolver.seeds\[0\].recipe: .*no such file or directory"):
        load_config(path)
