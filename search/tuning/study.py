"""The Optuna study of a run: stored in the run directory, asked and told by the driver only.

Storage is Optuna's JournalFileBackend (`runs/<name>/optuna.journal`): an append-only log
that survives a kill at any moment and opens as it is in `optuna-dashboard`. Objectives are
(dev aggregate score: maximise, parameter count: minimise), and measured forward latency
(minimise) when the config asks for it. With NSGA-II / TPE a parameter budget
becomes a trial constraint (`params - max_params`, feasible when <= 0); a plan predicted over the
budget before any work is a PRUNED trial carrying its predicted size; a plan that fails is a
FAIL trial carrying its reason, and the search goes on.
"""
from __future__ import annotations

from pathlib import Path

import optuna


def make_sampler(kind: str, seed: int, population_size: int):
    """Samplers read a trial's constraint from `Trial.set_constraint` (feasible when <= 0)."""
    if kind == "nsga2":
        return optuna.samplers.NSGAIISampler(seed=seed, population_size=max(2, population_size))
    if kind == "tpe":
        return optuna.samplers.TPESampler(seed=seed)
    return optuna.samplers.RandomSampler(seed=seed)


def journal_path(run_dir: Path) -> Path:
    return Path(run_dir) / "optuna.journal"


def open_study(run_dir: Path, name: str, sampler: str, seed: int, population_size: int, directions: list[str]) -> optuna.Study:
    """The run's study (created on first use); `directions` from `Objectives.directions`."""
    from optuna.storages import JournalStorage
    from optuna.storages.journal import JournalFileBackend

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    storage = JournalStorage(JournalFileBackend(str(journal_path(run_dir))))
    return optuna.create_study(
        study_name=name,
        storage=storage,
        directions=directions,
        sampler=make_sampler(sampler, seed, population_size),
        load_if_exists=True,
    )


def tell_result(study: optuna.Study, trial_number: int, values: tuple[float, ...] | None,
                fail_reason: str | None = None, live: optuna.Trial | None = None) -> None:
    """COMPLETE with the candidate's objective values (`search.run.candidate.Objectives.values`),
    or FAIL when `values` is None, with the reason as a user attribute when the trial's live
    handle is at hand (a trial asked before a kill has none after resume: the journal keeps its
    reason). The size constraint was set when the plan was asked (`set_size_constraint`).

    Idempotent: a trial told before a kill is left as it is, so a resumed run can tell every
    result of the interrupted generation again and the study still agrees with the journal.
    """
    if study.get_trials(deepcopy=False)[trial_number].state.is_finished():  # numbered in ask order
        return
    if values is None:
        if live is not None:
            live.set_user_attr("fail_reason", fail_reason or "failed")
        study.tell(trial_number, state=optuna.trial.TrialState.FAIL)
        return
    study.tell(trial_number, list(values))


def set_size_constraint(trial: optuna.Trial, predicted_params: int | None, max_params: float | None) -> None:
    """NSGA-II / TPE read `params - max_params` as the trial's constraint (feasible when <= 0).
    The predicted size equals the size after the real plan (compression.plan.predict_num_params),
    so it is set when the plan is asked, on the live trial."""
    if max_params is not None and predicted_params is not None:
        trial.set_constraint("max_params", float(predicted_params) - max_params)


def prune_over_budget(study: optuna.Study, trial: optuna.Trial, predicted_params: int, max_params: float) -> None:
    """Tell an asked trial PRUNED: its plan's predicted size is over the budget, so it is not scored.
    NSGA-II builds generations from COMPLETE trials only, so the next ask fills the same slot."""
    trial.set_user_attr("predicted_params", int(predicted_params))
    trial.set_user_attr("pruned_reason", f"predicted {int(predicted_params):,} parameters > budget {max_params:,.0f}")
    study.tell(trial, state=optuna.trial.TrialState.PRUNED)
