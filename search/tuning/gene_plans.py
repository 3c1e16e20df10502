"""Structure genes on the candidates of compress / joint runs (`compress.space.genes`).

Who decides what. The trial Optuna asks for a candidate decides the knobs, as without genes:
the budget (`block_count` blocks out when `depth` is on, removed or, with fuse_blocks, fused
with `fuse_rank` and `fuse_steps`; `width_ratio` of the kept layers' targeted parameters when
`width` is on), `width_target`, `criterion`, `reconstruct`, the TTM step, and `importance`:
which block ranking informs the genes. The candidate's genes (compression/genes.py) decide where
that budget goes: which blocks are out, and how many width levels each kept layer carries. The
candidate's plan is the genes' compiled explicit plan (per-layer `prune_width` ratios, then
`remove_blocks` / `fuse_blocks` with `blocks: [...]`), plus the trial's TTM step, so sizing
against the budget, staged fitness, export and `evofuse compress --plan` take it as any plan.

The budget in gene units (`trial_budget`): blocks_out = block_count, width units =
round(width_ratio / step * kept blocks); a gene set on it has the trial's size to within
prune_width's rounding of attention to whole heads.

Where a candidate's genes come from (`candidate_genes`), every draw from gene_rng(run seed,
candidate id), so a resumed run re-derives them from the population it restored:
- no member of the population has structure yet (the first generation: the parents are dense):
  the genes of the trial's ranking sized to its budget (`from_ranking`: the lowest-scored blocks
  out, width spread evenly);
- else the gene parent is the member the candidate challenges (joint runs: its Evolver target)
  when that member has structure, else a member with structure drawn at random; with
  probability `crossover` and a second such member, a per-block crossover of the two, repaired
  onto the trial's budget; otherwise the parent's genes repaired onto the trial's budget, then
  1..max_switches level switches (EvoPress's mutation; both keep the budget). The trial's
  ranking is the prior of the repair's and the mutation's choice of the blocks that go out.
A member's genes are read back from its plan (`compression.genes.genes_of_plan`, the inverse
of `compile_plan`), so the population in state.json is all a generation needs.

Rankings: each criterion of `compress.space.importance`, scored once per run on the model the
candidates' weights start from (compress: `compress.weights` or the base; joint: the base, not
each candidate's own merged weights: one pass per criterion and block over `importance_samples`
calibration windows, once, instead of once per candidate), stored in the study's user
attributes (`gene_rankings`), so a resumed run reads them back rather than recomputing them.
"""
from __future__ import annotations

import json
import random
import time
from dataclasses import dataclass, field
from typing import Callable, Sequence

from compression.genes import (
    FUSE, REMOVE, Budget, Genes, PlanKnobs, WidthGrid, budget_for, compile_plan, crossover, from_ranking, gene_rng,
    genes_of_plan, mutate, ranking_prior, repair, with_out_action,
)

from search.tuning.space import CalibrationConfig, GeneSpace, SpaceConfig, suggest_plan

RANKINGS_ATTR = "gene_rankings"  # the study's user attribute holding {criterion: per-block scores}


def grid_of(genes: GeneSpace, target: str) -> WidthGrid:
    return WidthGrid(step=genes.step, max_level=genes.max_level, target=target)


def trial_budget(params: dict, num_blocks: int, grid: WidthGrid) -> tuple[Budget, str]:
    """(the budget in gene units, how out blocks go: remove or fuse) of a trial's parameters."""
    blocks_out = params["block_count"] if params["depth"] != "none" else 0
    ratio = round(params["width_ratio"], 4) if params["width"] != "none" else 0.0  # as suggest_plan rounds it
    action = FUSE if params["depth"] == "fuse_blocks" else REMOVE
    return budget_for(num_blocks, blocks_out, ratio, grid), action


def trial_knobs(params: dict, ridge: float | None = None) -> PlanKnobs:
    """What the compiled plan's steps do beyond the structure: the trial's knobs (and the
    space's fixed `ridge`)."""
    return PlanKnobs(criterion=params["criterion"], reconstruct=params["reconstruct"], ridge=ridge,
                     fuse_rank=params["fuse_rank"], fuse_steps=params["fuse_steps"])


def places_something(genes: Genes | None) -> bool:
    return genes is not None and (bool(genes.out) or any(genes.levels))


def structured_members(population: Sequence, num_blocks: int, grid: WidthGrid) -> list[tuple[str, Genes]]:
    """(id, genes) of the population's members whose plan is a gene set that changes the
    model, in population order (dense parents, and plans not compiled from genes, are left out)."""
    found = []
    for member in population:
        genes = genes_of_plan(member.get("plan") or [], num_blocks, grid)
        if places_something(genes):
            found.append((member["id"], genes))
    return found


def candidate_genes(rng: random.Random, budget: Budget, action: str, grid: WidthGrid, settings: GeneSpace,
                    ranking: tuple[str, Sequence[float]] | None, parents: Sequence[tuple[str, Genes]],
                    target: str | None, num_blocks: int) -> tuple[Genes, dict]:
    """(genes on `budget`, where they came from) of one candidate (see the module doc).
    `ranking`: (criterion, per-block scores) of the trial, None when the space has no depth
    step (width alone needs no ranking); `parents`: the population's members with structure."""
    name, scores = ranking if ranking is not None else (None, None)
    prior = ranking_prior(scores, settings.prior_strength) if scores and settings.prior_strength > 0 else None
    if not parents:
        genes = from_ranking(scores or [0.0] * num_blocks, budget, action)
        return genes, ({"ranking": name} if name else {"uniform": True})
    by_id = dict(parents)
    first = target if target in by_id else parents[rng.randrange(len(parents))][0]
    others = [pid for pid, _ in parents if pid != first]
    if others and rng.random() < settings.crossover:
        second = others[rng.randrange(len(others))]
        child, origin = crossover(by_id[first], by_id[second], rng, grid, budget, prior), {"crossover": [first, second]}
    else:
        placed = repair(by_id[first], budget, rng, grid, prior)  # the parent's genes on the trial's budget
        child, origin = mutate(placed, rng, grid, settings.max_switches, prior), {"mutation": first}
    if name:
        origin["prior"] = name
    return with_out_action(child, action), origin


def plain_json(plan: list[dict]) -> list[dict]:
    """The plan as the journal and state.json hold it (layer keys as strings), so a candidate
    planned in this process and one read back after a kill are the same record."""
    return json.loads(json.dumps(plan))


@dataclass
class GenePlacer:
    """Places each trial's budget with the candidate's genes (see the module doc)."""

    settings: GeneSpace
    space: SpaceConfig
    num_blocks: int
    seed: int
    load_rankings: Callable[[], dict[str, list[float]]]  # {criterion: scores}, computed or read once
    _rankings: dict | None = field(default=None, init=False)

    @property
    def needs_rankings(self) -> bool:
        return any(op != "none" for op in self.space.depth)

    def rankings(self) -> dict[str, list[float]]:
        if self._rankings is None:
            self._rankings = self.load_rankings() if self.needs_rankings else {}
        return self._rankings

    def propose(self, trial, candidate_id: str, target: str | None, population: Sequence) -> tuple[list, Genes, dict]:
        """(plan, genes, origin) of one candidate under one trial. The trial suggests every
        parameter of the space, as without genes (NSGA-II breeds only shared parameters)."""
        steps = suggest_plan(trial, self.space, self.num_blocks)
        params = trial.params
        grid = grid_of(self.settings, params["width_target"])
        budget, action = trial_budget(params, self.num_blocks, grid)
        rankings = self.rankings()
        ranking = (params["importance"], rankings[params["importance"]]) if rankings else None
        parents = structured_members(population, self.num_blocks, grid)
        genes, origin = candidate_genes(gene_rng(self.seed, candidate_id), budget, action, grid, self.settings,
                                        ranking, parents, target, self.num_blocks)
        return self._plan(genes, grid, params, steps), genes, origin

    def uniform_plan(self, params: dict) -> list[dict]:
        """The plan of a parameter set with its budget spread evenly (the first blocks out):
        every gene set on that budget has its size, so budget anchors are sized with it."""
        from optuna.trial import FixedTrial

        trial = FixedTrial(params)
        steps = suggest_plan(trial, self.space, self.num_blocks)
        grid = grid_of(self.settings, params["width_target"])
        budget, action = trial_budget(params, self.num_blocks, grid)
        return self._plan(from_ranking(list(range(self.num_blocks)), budget, action), grid, params, steps)

    def _plan(self, genes: Genes, grid: WidthGrid, params: dict, steps: list[dict]) -> list[dict]:
        ttm = [step for step in steps if step["op"] == "ttm"]  # not structure genes: the trial's, after them
        return plain_json(compile_plan(genes, grid, trial_knobs(params, self.space.ridge)) + ttm)


def score_rankings(model_dir, calibration: CalibrationConfig, criteria: Sequence[str], samples: int) -> dict[str, list[float]]:
    """{criterion: per-block importance} of the model in `model_dir`, on the first `samples`
    calibration windows (lower = out first)."""
    from compression.importance import importance_fn

    from search.models.datasets import calibration_windows
    from search.models.sources import load_model

    model, tokenizer = load_model(model_dir)
    windows = calibration_windows(tokenizer, calibration.data, calibration.seq_len, min(samples, calibration.num_sequences))
    return {name: [float(x) for x in importance_fn(name)(model, windows)] for name in dict.fromkeys(criteria)}


def open_gene_placer(space: SpaceConfig, num_blocks: int, seed: int, study, model_dir, log=None) -> GenePlacer | None:
    """The run's gene placer (None without `compress.space.genes`); its rankings come from the
    study when a run before this process stored them, else are scored on `model_dir` and stored."""
    if space.genes is None:
        return None

    def load_rankings() -> dict[str, list[float]]:
        stored = study.user_attrs.get(RANKINGS_ATTR)
        if stored is not None:
            return stored
        started = time.perf_counter()
        rankings = score_rankings(model_dir, space.calibration, space.importance, space.genes.importance_samples)
        study.set_user_attr(RANKINGS_ATTR, rankings)
        if log:
            log(f"genes: {', '.join(rankings)} rankings on {space.genes.importance_samples} calibration windows "
                f"({time.perf_counter() - started:.1f} s)")
        return rankings

    return GenePlacer(space.genes, space, num_blocks, seed, load_rankings)


__all__ = [
    "GenePlacer", "RANKINGS_ATTR", "candidate_genes", "grid_of", "open_gene_placer", "places_something", "plain_json",
    "score_rankings", "structured_members", "trial_budget", "trial_knobs",
]
