"""`mode: recipe`: evolve a merge recipe instead of raw weights (README, "Evolving the recipe").

Each generation asks the run's Optuna study (`optuna.journal` in the run directory; CMA-ES,
TPE or random) for `recipe.trials_per_generation` genomes (search.tuning.recipe_space): the
per-layer-group values of one merge method's numeric parameters. Each compiles to a Recipe
over the parents, which the actors materialise and score like any candidate; staged fitness,
when configured, pairs every trial with the current best member (with `fitness.advance`, at
most that many of a generation's trials go past the first stage). Results are told back:
COMPLETE with the dev score, PRUNED with the stage score reported when staged fitness stopped
the trial, FAIL with the reason.

The population is the best `P` models seen (P: the first population's size, the parents and
seeds), elitist: a trial joins it when it beats its worst member. The hall of fame is the best
ten members ever, as in merge runs; `finish` scores the best on the test splits and the run
exports it like any other. Members' weights are not stored: they replay from the parents.

Resume: trial n is slot n % λ of generation n // λ, so a generation's candidates are re-derived
from the study alone: a finished or running trial gives back its stored parameters (a trial cut
off mid-suggest is completed, its sampler re-seeded by trial number), a missing one is asked.
Samplers are history-seeded (search.tuning.study / search.tuning.cmaes), so new asks equal those
of an uninterrupted run; telling is idempotent, and the journal spares every finished scoring.
"""
from __future__ import annotations

import optuna

from evolve.evolver import offspring_id
from evolve.population import member_score

from search.run.candidate import Candidate
from search.run.modes import HALL_OF_FAME_SIZE, Mode, register_mode
from search.run.scoring import STOPPED
from search.tuning.study import reopen, tell_result


class RecipeMode(Mode):
    study = None
    space = None
    # Members are recipes over the parents: nothing reads their weights but the test scoring and
    # export, which replay them (a TIES replay costs as much as storing it), so none are stored.
    stores_members = False

    # ---- set-up (the run loop calls it once the base model's config is known) ---------------
    def open(self, store, base_config, log) -> None:
        from compression.arch import num_blocks
        from search.tuning.recipe_space import RecipeSpace

        self.space = RecipeSpace.from_config(self.config, num_blocks(base_config))
        self.space.check()
        self.trials = self.config.recipe.trials_per_generation or self.space.default_trials()
        self.study = open_recipe_study(store.root, self.config, self.space, self.trials)
        finished = sum(t.state.is_finished() for t in self.study.get_trials(deepcopy=False))
        log(f"recipe search: {self.space.method} over {', '.join(self.space.inputs)}, {len(self.space.genes())} values "
            f"({self.space.groups} layer groups), {self.config.recipe.sampler}, {self.trials} trials per generation"
            + (f", {finished} trials told before" if finished else ""))

    def generation_size(self, population: list) -> int:
        return self.trials

    # ---- a generation ---------------------------------------------------------------------
    def offspring(self, toolbox, population, generation):
        """Trials generation * λ ... generation * λ + λ - 1, each compiled to a recipe; every
        candidate challenges the current best member."""
        best = max(population, key=member_score)["id"]  # first of equals
        out = []
        for slot in range(self.trials):
            number = generation * self.trials + slot
            genome = self.genome_of(number)
            out.append(Candidate(id=offspring_id(generation, slot), recipe=self.space.compile(genome), trial=number,
                                 generation=generation, target=best))
        return out

    def genome_of(self, number: int) -> dict[str, float]:
        """Trial `number`'s genome: as stored when it was asked before, else asked now."""
        trials = self.study.get_trials(deepcopy=False)
        if number < len(trials):
            frozen = trials[number]
            if all(g.name in frozen.params for g in self.space.genes()):
                return dict(frozen.params)
            return self.space.suggest(reopen(self.study, frozen))  # cut off mid-suggest
        if number > len(trials):
            raise RuntimeError(f"{self.study.study_name}: trial {number} asked, but the study holds only {len(trials)} trials")
        return self.space.suggest(self.study.ask())

    def tell(self, candidates, results) -> None:
        """COMPLETE / PRUNED / FAIL for each candidate's trial (a trial told before is left);
        COMPLETE and FAIL as compress runs tell them (search.tuning.study.tell_result)."""
        trials = self.study.get_trials(deepcopy=False)
        for c in candidates:
            frozen, result = trials[c.trial], results[c.id]
            if frozen.state.is_finished():
                continue
            live = None if result.ok else reopen(self.study, frozen)
            if result.status == STOPPED:
                live.set_user_attr("pruned_reason", result.reason or "stopped by staged fitness")
                if result.stage not in frozen.intermediate_values:
                    live.report(result.score, step=result.stage or 0)  # the stage score: how samplers rank it
                self.study.tell(c.trial, state=optuna.trial.TrialState.PRUNED)
            else:
                tell_result(self.study, c.trial, [result.score] if result.ok else None, result.reason or result.status, live)

    def select(self, toolbox, population, finals):
        """Elitist: the best P of the members and the scored trials (members first among equals)."""
        ranked = sorted(list(population) + [member for _, member in finals], key=member_score, reverse=True)
        return ranked[: len(population)]

    def best_of(self, members):
        from evolve.population import hall_of_fame_from

        return list(hall_of_fame_from(members, HALL_OF_FAME_SIZE))


def open_recipe_study(run_dir, config, space, trials: int) -> optuna.Study:
    """The run's study in `optuna.journal` (created on first use), with the configured sampler."""
    from search.tuning.cmaes import HistoryCmaEsSampler
    from search.tuning.study import open_study

    search = config.recipe
    sampler = HistoryCmaEsSampler(space.distributions(), max(2, trials), config.seed, search.sigma) \
        if search.sampler == "cmaes" else search.sampler
    return open_study(run_dir, config.name, sampler, config.seed, trials, ["maximize"])


def study_summary(run_dir) -> dict | None:
    """For `status`: the recipe study's trials by state and the best COMPLETE trial's genome
    (read from `optuna.journal`, JSON lines; None when the study does not exist yet)."""
    from collections import Counter
    from pathlib import Path

    from optuna.storages import JournalStorage
    from optuna.storages.journal import JournalFileBackend

    from search.tuning.study import journal_path

    path = journal_path(Path(run_dir))
    if not path.is_file():
        return None
    storage = JournalStorage(JournalFileBackend(str(path)))
    studies = storage.get_all_studies()
    if not studies:
        return None
    trials = storage.get_all_trials(studies[0]._study_id, deepcopy=False)
    states = dict(Counter(t.state.name.lower() for t in trials))
    complete = [t for t in trials if t.state == optuna.trial.TrialState.COMPLETE]
    best = max(complete, key=lambda t: t.value, default=None)
    return {"trials": len(trials), "states": states,
            "best_trial": None if best is None else {"number": best.number, "value": best.value, "params": best.params}}


def format_study(summary: dict) -> list[str]:
    states = ", ".join(f"{n} {k}" for k, n in sorted(summary["states"].items()))
    lines = [f"recipe trials {summary['trials']} ({states})"]
    best = summary["best_trial"]
    if best is not None:
        lines.append(f"  best trial   {best['number']}: dev score {best['value']:.6g}")
    return lines


register_mode("recipe", RecipeMode)

__all__ = ["RecipeMode", "open_recipe_study", "study_summary", "format_study"]
