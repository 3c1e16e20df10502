"""Plans for compress / joint runs: asked from the Optuna study, sized against the budget.

Selection ranks every over-budget candidate below every feasible one, so scoring one would
only spend an evaluation. A plan's parameter count is predicted from shapes before any work
(`compression.plan.predict_num_params`); a plan predicted over the budget is told PRUNED with
its predicted size and the study is asked again. A plan whose size cannot be predicted, or that
does not fit the model (a FAIL trial once scored), goes on as it is; after `MAX_PLAN_ASKS` the
last plan is scored whatever its size. With a budget, the first generation's plans are anchors
sized to it (`search.tuning.space.budget_anchors`), queued before the first ask.

With structure genes (`compress.space.genes`), the trial gives the knobs and the budget, and
the candidate's genes place it (search/tuning/gene_plans.py): `ask_candidate` returns the
candidate with the compiled plan and its genes, sized against the budget like any plan.

Resume: a trial asked before a kill but not yet checkpointed (RUNNING, not asked by this
process) is asked again as it was (`_next_trial`), and the count of plans skipped is read from
the study, so a resumed run asks the same trials, numbered alike, as an uninterrupted one.
"""
from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Callable

import optuna

from compression.plan import PlanError, parse_plan, predict_num_params

from search.tuning.gene_plans import GenePlacer
from search.tuning.space import SpaceConfig, budget_anchors, suggest_plan
from search.tuning.study import prune_over_budget, reopen, set_size_constraint, tell_result

MAX_PLAN_ASKS = 100  # plans asked per candidate before one over the size budget is scored anyway


@dataclass
class Planner:
    study: object  # optuna.Study
    space: SpaceConfig
    base_config: object  # the dense model's transformers config
    num_layers: int
    max_params: float | None = None
    genes: GenePlacer | None = None  # structure genes place each trial's budget (None: plans as suggested)
    live: dict = field(default_factory=dict)  # trial number -> the trial asked in this process

    def predicted_params(self, plan: list) -> int | None:
        """The candidate's parameter count from shapes alone; None if unknown before the work."""
        try:
            return predict_num_params(parse_plan(plan), self.base_config)
        except PlanError:
            return None

    def fits(self, plan: list) -> bool:
        predicted = self.predicted_params(plan)
        return predicted is not None and predicted <= self.max_params

    def ask(self) -> tuple[list, int, int]:
        """(plan, trial number, plans skipped): ask until a plan is predicted to fit the budget."""
        plan, number, skipped, _ = self._ask(lambda trial: (suggest_plan(trial, self.space, self.num_layers), None))
        return plan, number, skipped

    def ask_candidate(self, candidate, population: list) -> tuple[object, int]:
        """(the candidate with its plan, trial and, with genes, its genes; plans skipped)."""
        if self.genes is None:
            plan, number, skipped = self.ask()
            return replace(candidate, plan=tuple(plan), trial=number), skipped

        def propose(trial):
            plan, genes, origin = self.genes.propose(trial, candidate.id, candidate.target, population)
            return plan, (genes, origin)

        plan, number, skipped, (genes, origin) = self._ask(propose)
        return replace(candidate, plan=tuple(plan), trial=number, genes=genes, genes_from=origin), skipped

    def _ask(self, propose: Callable) -> tuple[list, int, int, object]:
        """Ask trials until `propose(trial) -> (plan, extra)` gives a plan predicted to fit."""
        while True:
            trial = self._next_trial()
            plan, extra = propose(trial)
            skipped = self._pruned_before(trial.number)
            if self.max_params is None:
                return (*self._asked(trial, plan, skipped), extra)
            predicted = self.predicted_params(plan)
            set_size_constraint(trial, predicted, self.max_params)
            if predicted is None or predicted <= self.max_params or skipped + 1 >= MAX_PLAN_ASKS:
                return (*self._asked(trial, plan, skipped), extra)
            prune_over_budget(self.study, trial, predicted, self.max_params)

    def _next_trial(self):
        """A trial asked before a kill and never checkpointed (RUNNING, not asked by this
        process) is taken up again, with the parameters it was given; else a new one. So a
        resumed run's trials, their numbers and (history-seeded samplers) plans are the ones
        an uninterrupted run has."""
        running = self.study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.RUNNING,))
        orphan = next((t for t in running if t.number not in self.live), None)
        if orphan is not None:
            return reopen(self.study, orphan)
        return self.study.ask()

    def _pruned_before(self, number: int) -> int:
        """Plans told PRUNED (over budget) right before trial `number`: the ones asked for the
        same candidate (read from the study, so a resumed run counts those of a dead process)."""
        trials = self.study.get_trials(deepcopy=False)
        count = 0
        for trial in reversed(trials[:number]):
            if trial.state != optuna.trial.TrialState.PRUNED:
                break
            count += 1
        return count

    def _asked(self, trial, plan: list, skipped: int) -> tuple[list, int, int]:
        self.live[trial.number] = trial
        return plan, trial.number, skipped

    def tell(self, trial_number: int, values: tuple[float, ...] | None, fail_reason: str | None = None) -> None:
        """Tell the study a scored candidate's objectives (None: it failed)."""
        tell_result(self.study, trial_number, values, fail_reason, self.live.pop(trial_number, None))

    def tell_stopped(self, trial_number: int, reason: str | None) -> None:
        """Tell the study PRUNED for a candidate staged fitness stopped, with the reason."""
        live = self.live.pop(trial_number, None)
        if self.study.get_trials(deepcopy=False)[trial_number].state.is_finished():
            return
        if live is not None:
            live.set_user_attr("pruned_reason", reason or "stopped by staged fitness")
        self.study.tell(trial_number, state=optuna.trial.TrialState.PRUNED)

    def enqueue_anchors(self, limit: int) -> int:
        """Queue the first generation's plans: anchors sized to the budget; how many. With
        genes, an anchor is sized as its budget spread evenly, and the anchors take the space's
        importance criteria in turn, so each ranking starts a candidate of the first generation."""
        if self.max_params is None:
            return 0
        plan_of = self.genes.uniform_plan if self.genes is not None else None
        anchors = budget_anchors(self.space, self.num_layers, self.fits, limit=limit, plan_of=plan_of)
        if self.genes is not None:
            anchors = [{**params, "importance": self.space.importance[k % len(self.space.importance)]}
                       for k, params in enumerate(anchors)]
        for params in anchors:
            self.study.enqueue_trial(params)
        return len(anchors)


__all__ = ["Planner", "MAX_PLAN_ASKS"]
