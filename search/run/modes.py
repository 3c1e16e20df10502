"""The three kinds of run, each a small strategy the run loop asks two things of: which
candidates a generation tries, and which members survive.

- merge: Evolver offspring, one per member (recipes only); one-to-one greedy selection (an
  offspring replaces the member it challenges when it scores better); a hall of fame of the
  best members ever seen.
- compress: `compress.candidates` plans per generation from the Optuna study, all over one
  parent's weights; NSGA-II survivor selection; the Pareto front of every candidate scored.
- joint: Evolver offspring, each with a plan from the study; NSGA-II; the Pareto front.
  With `compress.space.genes` (both), a candidate's plan is its structure genes placing the
  trial's budget (search/tuning/gene_plans.py): bred from the member it challenges (joint) or
  from population members drawn by its own seed (compress).
- recipe: merge recipes asked from an Optuna study (search/run/recipe_mode.py).
"""
from __future__ import annotations

from dataclasses import dataclass

from evolve.population import hall_of_fame_from, member_score, pareto_front_of, select_pareto

from search.config import RunConfig
from search.run.candidate import Candidate, Objectives

HALL_OF_FAME_SIZE = 10  # best members ever seen (merge runs); their weights stay for export


@dataclass
class Mode:
    config: RunConfig
    objectives: Objectives
    uses_plans = False  # candidates carry plans asked from the Optuna study
    front_of_all = False  # the hall of fame is over every candidate scored, not only members
    stores_members = True  # new members' weights are replayed once and stored (offspring read them)

    def population_ids(self) -> list[str]:
        names = [e.name for e in self.config.parents.experts]
        return ([self.config.parents.base.name] + names) if self.config.evolver.include_base else names

    def generation_size(self, population: list) -> int:
        return len(population)

    def structure_parent(self) -> str:
        """The parent whose model the candidates' structure starts from (structure genes'
        importance rankings are scored on it): the base, whatever the weights are merged from."""
        return self.config.parents.base.name

    def offspring(self, toolbox, population: list, generation: int) -> list[Candidate]:
        """This generation's candidates, before any plan is asked."""
        return [Candidate(id=o.id, recipe=o.recipe, generation=generation, target=o.target)
                for o in toolbox.offspring(population, generation)]

    def select(self, toolbox, population: list, finals: list[tuple[Candidate, dict]]) -> list:
        """The next population from the members and the fully scored (candidate, member) pairs."""
        raise NotImplementedError

    def best_of(self, members: list) -> list:
        return pareto_front_of(members)

    def open(self, store, base_config, log) -> None:
        """Set-up that needs the run directory or the model (a recipe run opens its study)."""

    def tell(self, candidates: list[Candidate], results: dict) -> None:
        """Report a generation's results to a mode's own optimiser (recipe runs: Optuna)."""


class MergeMode(Mode):
    def select(self, toolbox, population, finals):
        """One-to-one greedy: each member against the best of its fully scored offspring."""
        next_population = []
        for target in population:
            children = [member for c, member in finals if c.target == target["id"]]
            best = max(children, key=member_score, default=None)  # first of equals: the lowest id
            next_population.append(target if best is None else toolbox.select(target, best))
        return next_population

    def best_of(self, members):
        return list(hall_of_fame_from(members, HALL_OF_FAME_SIZE))


class JointMode(Mode):
    uses_plans = True
    front_of_all = True

    def select(self, toolbox, population, finals):
        members = [member for _, member in finals]
        return select_pareto(population + members, max(self.generation_size(population), len(population)))


class CompressMode(JointMode):
    def population_ids(self) -> list[str]:
        return [self.config.compress.weights or self.config.parents.base.name]

    def generation_size(self, population: list) -> int:
        return self.config.compress.candidates

    def structure_parent(self) -> str:
        return self.population_ids()[0]  # the compressed weights

    def offspring(self, toolbox, population, generation):
        weights = self.population_ids()[0]
        return [Candidate.copy_of(weights, f"g{generation:03d}-{i:03d}", generation=generation, target=weights)
                for i in range(self.config.compress.candidates)]


# Modules that add modes (`register_mode`), imported by name on first use, as evolve's operator
# modules are: they build on this one, which does not import them.
MODE_MODULES = ("search.run.recipe_mode",)
_REGISTERED: dict[str, type] = {}


def register_mode(name: str, kind: type) -> type:
    _REGISTERED[name] = kind
    return kind


def make_mode(config: RunConfig, max_params: float | None) -> Mode:
    import importlib

    for module in MODE_MODULES:
        importlib.import_module(module)
    sizes = config.sized
    objectives = Objectives(sizes=sizes, latency=sizes and config.compress.latency is not None,
                            max_params=max_params if sizes else None)
    kind = {"merge": MergeMode, "compress": CompressMode, "joint": JointMode, **_REGISTERED}[config.mode]
    return kind(config, objectives)


__all__ = ["Mode", "MergeMode", "CompressMode", "JointMode", "make_mode", "register_mode", "HALL_OF_FAME_SIZE"]
