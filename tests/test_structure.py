"""Structure genes and the structure search (issue #15): budgets, compile/replay, resume, export."""
from __future__ import annotations

import copy

import pytest
import torch
import yaml

from compression import arch
from compression.genes import (
    FUSE, KEEP, REMOVE, Budget, GeneError, Genes, PlanKnobs, WidthGrid, budget_for, compile_plan, crossover,
    from_ranking, gene_rng, level_switch, mutate, ranking_prior, width_unit_params,
)
from compression.loader import load_compressed
from compression.plan import PlanError, apply_plan, parse_plan, predict_num_params
from compression.structure_search import (
    SearchSettingsError, StructureEvaluator, StructureSearch, run_structure_search,
)
from search.models.tiny import tiny_llama, tiny_llama_config

N_BLOCKS = 8
GRID = WidthGrid(step=0.125, max_level=4)


@pytest.fixture(scope="module")
def config():
    return tiny_llama_config(num_hidden_layers=N_BLOCKS)


@pytest.fixture()
def model8():
    return tiny_llama(seed=3, num_hidden_layers=N_BLOCKS)


def params_of(genes: Genes, config, grid=GRID) -> int:
    return predict_num_params(parse_plan(compile_plan(genes, grid)), config)


def budget_params(budget: Budget, config, grid=GRID) -> int:
    """What a budget should leave: dense − out blocks − width units, each at its nominal size."""
    dense = predict_num_params([], config)
    block = dense - predict_num_params(parse_plan([{"op": "remove_blocks", "blocks": [0]}]), config)
    return dense - budget.blocks_out * block - budget.width_units * width_unit_params(config, grid)


def test_mutation_and_crossover_keep_params_within_one_unit_of_the_budget(config):
    budget = budget_for(N_BLOCKS, 2, 0.25, GRID)
    assert budget == Budget(2, 12)  # 0.25 / 0.125 = 2 levels on each of 6 kept blocks
    unit = width_unit_params(config, GRID)
    target = budget_params(budget, config)
    a = from_ranking([5, 1, 4, 3, 0, 6, 7, 2], budget)
    assert a.out == [1, 4] and a.budget() == budget
    b = from_ranking(list(range(N_BLOCKS)), budget)
    prior = ranking_prior([5, 1, 4, 3, 0, 6, 7, 2])
    seen = set()
    for k in range(15):
        rng = gene_rng(7, "test", k)
        a = mutate(a, rng, GRID, max_switches=3, prior=prior)
        child = crossover(a, b, rng, GRID, budget)
        for genes in (a, child):
            assert genes.budget() == budget
            assert abs(params_of(genes, config) - target) <= unit
            seen.add(genes)
        b = child
    assert len(seen) > 10  # the operators move
    # a single level switch changes exactly one unit's place
    one = level_switch(a, gene_rng(1, "x"), GRID, depth_share=0.0)
    assert sum(x != y for x, y in zip(one.levels, a.levels)) == 2 and one.blocks == a.blocks


def test_operators_are_deterministic_per_seed_and_candidate():
    budget = budget_for(N_BLOCKS, 3, 0.125, GRID)
    start = from_ranking(list(range(N_BLOCKS)), budget)
    twice = [mutate(start, gene_rng(11, "offspring", 2, k), GRID) for k in range(5) for _ in range(2)]
    assert twice[0::2] == twice[1::2]
    assert len(set(twice[0::2])) > 1


def test_genes_compile_to_a_plan_that_replays_the_scored_model(model8, calibration):
    genes = Genes((KEEP, REMOVE, KEEP, KEEP, REMOVE, KEEP, KEEP, KEEP), (1, 0, 3, 0, 0, 2, 0, 4))
    plan = compile_plan(genes, GRID)
    assert [s["op"] for s in plan] == ["prune_width", "remove_blocks"]
    assert plan[0]["ratio"] == {0: 0.125, 2: 0.375, 5: 0.25, 7: 0.5} and plan[1]["blocks"] == [1, 4]
    pool = calibration.take(4)
    evaluator = StructureEvaluator(model8, pool, GRID, PlanKnobs(), max_level=GRID.max_level, top_k=16)
    ids = pool.input_ids[:2]
    scored = evaluator.logits(genes, ids)
    replayed = apply_plan(copy.deepcopy(model8), parse_plan(yaml.safe_load(yaml.safe_dump(plan))), pool)
    assert torch.allclose(replayed(input_ids=ids, use_cache=False).logits, scored, atol=1e-5)
    assert sum(p.numel() for p in replayed.parameters()) == predict_num_params(parse_plan(plan), model8.config)
    dense = Genes((KEEP,) * N_BLOCKS, (0,) * N_BLOCKS)
    assert evaluator.loss(dense, [0, 1]) == pytest.approx(0.0, abs=1e-9)
    assert evaluator.loss(genes, [0, 1]) > 0


def test_nll_fitness_is_the_replayed_models_cross_entropy(model8, calibration):
    genes = Genes((KEEP, REMOVE, KEEP, KEEP, KEEP, KEEP, REMOVE, KEEP), (0, 0, 2, 0, 1, 0, 0, 0))
    pool = calibration.take(3)
    evaluator = StructureEvaluator(model8, pool, GRID, PlanKnobs(), max_level=GRID.max_level, batch_size=2, fitness="nll")
    replayed = apply_plan(copy.deepcopy(model8), parse_plan(compile_plan(genes, GRID)), pool).eval()
    with torch.no_grad():
        logits = replayed(input_ids=pool.input_ids, use_cache=False).logits  # (3, T, V)
    expected = torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1).double(), pool.input_ids[:, 1:].flatten())
    assert evaluator.loss(genes, [0, 1, 2]) == pytest.approx(float(expected), rel=1e-5)
    assert evaluator.reference is None  # no dense pass for an NLL search
    dense = Genes((KEEP,) * N_BLOCKS, (0,) * N_BLOCKS)
    assert evaluator.losses([dense, genes], [2, 0, 1]) == pytest.approx([evaluator.loss(dense, [0, 1, 2]), float(expected)], rel=1e-5)


def test_fused_blocks_compile_to_positions_after_removal():
    genes = Genes((KEEP, REMOVE, KEEP, FUSE, KEEP, FUSE, KEEP, KEEP), (0,) * N_BLOCKS)
    plan = compile_plan(genes, GRID, PlanKnobs(fuse_steps=3))
    assert plan == [{"op": "remove_blocks", "blocks": [1]},
                    {"op": "fuse_blocks", "blocks": [2, 4], "rank": 128, "steps": 3, "lr": 0.01, "group_size": 7}]
    parse_plan(plan)


def _settings(**overrides) -> StructureSearch:
    base = dict(blocks_out=2, width_ratio=0.25, grid=GRID.model_dump(), generations=4, offspring=3,
                stages=[{"windows": 1, "survivors": 2}, {"windows": 2, "survivors": 1}], init=["block_influence", "sleb"],
                importance_samples=2, top_k=16, seed=5)
    return StructureSearch.model_validate({**base, **overrides})


def test_a_resumed_structure_search_equals_an_uninterrupted_one(model8, calibration, tmp_path):
    pool = calibration.take(4)
    settings = _settings()
    whole = run_structure_search(model8, pool, settings)
    state = tmp_path / "state.json"
    run_structure_search(model8, pool, settings, state_path=state, stop_after=2)
    resumed = run_structure_search(model8, pool, settings, state_path=state)
    assert resumed.genes == whole.genes and resumed.plan == whole.plan
    assert [h["loss"] for h in resumed.history] == [h["loss"] for h in whole.history]
    assert len(whole.history) == settings.generations + 1
    assert whole.genes.budget() == budget_for(N_BLOCKS, 2, 0.25, GRID)
    assert whole.history[-1]["loss"] <= whole.history[0]["loss"] or any(h.get("replaced") for h in whole.history)
    with pytest.raises(SearchSettingsError, match="other settings"):
        run_structure_search(model8, pool, _settings(seed=6), state_path=state)


def test_an_evolved_plan_exports_replays_and_loads(model8, tokenizer, tmp_path):
    from search.cli import main

    source = tmp_path / "model"
    model8.save_pretrained(source)
    tokenizer.save_pretrained(source)
    settings = tmp_path / "search.yaml"
    settings.write_text(yaml.safe_dump(_settings(generations=2, recovery="none").model_dump(mode="json")))
    common = ["--calibration", "pydoc:train", "--seq-len", "32", "--num-sequences", "4", "--quiet"]
    assert main(["compress", str(source), "--search", str(settings), "--out", str(tmp_path / "out"), *common]) == 0
    plan_file = tmp_path / "out" / "evofuse_plan.yaml"
    assert main(["compress", str(source), "--plan", str(plan_file), "--out", str(tmp_path / "replay"), *common]) == 0
    searched, replayed = load_compressed(tmp_path / "out"), load_compressed(tmp_path / "replay")
    ids = torch.arange(3, 35).unsqueeze(0)
    assert torch.equal(searched(input_ids=ids).logits, replayed(input_ids=ids).logits)
    assert arch.num_blocks(searched) == N_BLOCKS - 2
    record = yaml.safe_load((tmp_path / "out" / "structure_search.json").read_text())
    assert record["forward_tokens"] > 0 and len(record["history"]) == 3


@pytest.mark.parametrize("raw, message", [
    ({"stages": [{"windows": 2, "survivors": 2}]}, "last stage keeps 1"),
    ({"stages": [{"windows": 4, "survivors": 2}, {"windows": 2, "survivors": 1}]}, r"stages\[1\].windows"),
    ({"recovery": "heal"}, "recovery"),
    ({"grid": {"step": 0.25, "max_level": 4}}, "max_level"),
    ({"blocks": 3}, "blocks: unknown key"),
])
def test_bad_search_settings_are_one_line_errors(tmp_path, raw, message):
    path = tmp_path / "s.yaml"
    path.write_text(yaml.safe_dump(raw))
    with pytest.raises(SearchSettingsError, match=message) as info:
        StructureSearch.load(path)
    assert "\n" not in str(info.value)


def test_bad_genes_and_budgets_are_one_line_errors(config):
    with pytest.raises(GeneError, match=r"levels\[1\]"):
        Genes((KEEP, REMOVE), (0, 2))
    with pytest.raises(GeneError, match="width_units"):
        budget_for(N_BLOCKS, 2, 0.9, GRID)
    with pytest.raises(GeneError, match="blocks_out"):
        budget_for(N_BLOCKS, N_BLOCKS, 0.0, GRID)
    with pytest.raises(PlanError, match="blocks: position 9 out of range"):
        predict_num_params(parse_plan([{"op": "remove_blocks", "blocks": [1, 9]}]), config)


def test_candidates_sharing_a_prefix_score_as_alone(model8, calibration):
    pool = calibration.take(3)
    evaluator = StructureEvaluator(model8, pool, GRID, PlanKnobs(), max_level=GRID.max_level, top_k=16, batch_size=2)
    budget = budget_for(N_BLOCKS, 2, 0.25, GRID)
    parent = from_ranking([3, 1, 4, 1, 5, 9, 2, 6], budget)
    family = [parent] + [mutate(parent, gene_rng(0, k), GRID) for k in range(4)]
    together = evaluator.losses(family, [0, 1, 2])
    alone = [evaluator.loss(genes, [0, 1, 2]) for genes in family]
    assert together == pytest.approx(alone, rel=1e-9, abs=1e-12)


class TableEvaluator:
    """Stands in for StructureEvaluator in `select`: the loss of candidate c on window w is
    table[c][w], averaged over the windows; every call is recorded."""

    def __init__(self, candidates: list[Genes], table: list[dict[int, float]]):
        self.index = {genes: c for c, genes in enumerate(candidates)}
        self.table, self.calls = table, []

    def losses(self, candidates, windows, base=None):
        rows = [self.index[genes] for genes in candidates]
        self.calls.append((rows, list(windows)))
        return [sum(self.table[c][w] for w in windows) / len(windows) for c in rows]


def _parent_and_offspring(count: int) -> list[Genes]:
    parent = Genes((KEEP,) * N_BLOCKS, (0,) * N_BLOCKS)
    return [parent] + [Genes(tuple(REMOVE if i == k else KEEP for i in range(N_BLOCKS)), (0,) * N_BLOCKS)
                       for k in range(count)]


def test_fresh_final_stage_meets_the_parent_on_windows_the_first_stage_did_not_see():
    from compression.structure_search import select, windows_needed

    candidates = _parent_and_offspring(3)
    # window 7 flatters offspring 1 and 2 (the first stage's pick); on windows 3 and 5 the parent is best
    table = [{7: 2.0, 3: 1.0, 5: 1.0}, {7: 0.1, 3: 1.5, 5: 1.5}, {7: 0.2, 3: 1.45, 5: 1.45}, {7: 3.0, 3: 0.0, 5: 0.0}]
    stages = [{"windows": 1, "survivors": 2}, {"windows": 2, "survivors": 1}]
    order = [7, 3, 5, 1]

    fresh = _settings(stages=stages, fresh_final=True)
    evaluator = TableEvaluator(candidates, table)
    assert select(evaluator, candidates, fresh, order) == (0, 1.0)  # the parent stays
    assert evaluator.calls == [([1, 2, 3], [7]), ([0, 1, 2], [3, 5])]  # parent only in the final, on fresh windows
    assert windows_needed(fresh) == 3

    prefix = _settings(stages=stages)  # default: every stage a prefix, the parent in every stage
    evaluator = TableEvaluator(candidates, table)
    assert select(evaluator, candidates, prefix, order) == (1, 0.8)  # window 7 carries offspring 1 through
    assert evaluator.calls == [([0, 1, 2, 3], [7]), ([1, 2], [7, 3])]
    assert windows_needed(prefix) == 2


def test_fresh_final_needs_windows_beyond_the_earlier_stages(model8, calibration):
    settings = _settings(stages=[{"windows": 2, "survivors": 2}, {"windows": 3, "survivors": 1}], fresh_final=True)
    with pytest.raises(SearchSettingsError, match=r"stages\[1\].windows: the stages need 5 windows") as info:
        run_structure_search(model8, calibration.take(4), settings)
    assert "\n" not in str(info.value)


def test_stats_windows_fit_the_width_variants_and_the_stages_score_on_the_rest(model8, calibration):
    from compression.structure_search import split_pool

    settings = _settings(width_ratio=0.25, stats_windows=3, stages=[{"windows": 2, "survivors": 1}], generations=1)
    stats, pool = split_pool(calibration.take(6), settings)
    assert torch.equal(stats.input_ids, calibration.input_ids[:3]) and torch.equal(pool.input_ids, calibration.input_ids[3:6])
    genes = Genes((KEEP,) * N_BLOCKS, (2, 0, 1, 3, 0, 2, 0, 0))
    evaluator = StructureEvaluator(model8, pool, GRID, PlanKnobs(), max_level=GRID.max_level, top_k=16, stats=stats)
    # the scored model is the plan replayed on the statistics windows, scored on pool windows
    replayed = apply_plan(copy.deepcopy(model8), parse_plan(compile_plan(genes, GRID)), stats).eval()
    with torch.no_grad():
        assert torch.allclose(replayed(input_ids=pool.input_ids, use_cache=False).logits,
                              evaluator.logits(genes, pool.input_ids), atol=1e-5)
        fitted_on_pool = apply_plan(copy.deepcopy(model8), parse_plan(compile_plan(genes, GRID)), pool).eval()
        assert not torch.allclose(fitted_on_pool(input_ids=pool.input_ids, use_cache=False).logits,
                                  evaluator.logits(genes, pool.input_ids), atol=1e-4)
    assert evaluator.tokens == stats.input_ids.numel() + pool.input_ids.numel()  # statistics + dense reference
    with pytest.raises(SearchSettingsError, match=r"stages\[0\].windows: .* beyond the 3 stats_windows"):
        run_structure_search(model8, calibration.take(4), settings)
    with pytest.raises(SearchSettingsError, match=r"stats_windows: 6 leaves none of the 6"):
        split_pool(calibration.take(6), _settings(stats_windows=6))


def test_settings_added_later_keep_earlier_state_files_resumable():
    # fingerprints written by the version before `stats_windows` existed (commit fa8b35e)
    assert StructureSearch().fingerprint() == "2394f1202c222c59"
    assert StructureSearch(width_ratio=0.25, fitness="nll", seed=3).fingerprint() == "26a14d208d7f3792"
    assert StructureSearch(stats_windows=8).fingerprint() != StructureSearch().fingerprint()
    assert StructureSearch(knobs={"ridge": 0.1}).fingerprint() != StructureSearch().fingerprint()


def test_the_knobs_ridge_reaches_the_searchs_width_variants_and_its_plan(model8, calibration):
    """A structure search's knobs carry LIAR's ridge (`PlanKnobs.ridge`) into the width variants
    it scores and into the plan it compiles, so the exported plan rebuilds what was scored."""
    from compression.structure_search import width_variants

    def variant_weights(knobs: PlanKnobs) -> torch.Tensor:
        variants = width_variants(model8, calibration, GRID, knobs, 1)
        return variants[(2, 1)].mlp.down_proj.weight.detach().clone()

    default, ridged = variant_weights(PlanKnobs()), variant_weights(PlanKnobs(ridge=1.0))
    assert default.shape == ridged.shape and not torch.allclose(default, ridged)
    genes = Genes((KEEP,) * N_BLOCKS, (0, 0, 1) + (0,) * (N_BLOCKS - 3))
    assert parse_plan(compile_plan(genes, GRID, PlanKnobs(ridge=1.0)))[0].ridge == 1.0
