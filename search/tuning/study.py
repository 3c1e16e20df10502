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


def objective_directions(latency: bool) -> list[str]:
    """Dev score up, parameters down, and latency down when it is measured."""
    return ["maximize", "minimize"] + (["minimize"] if latency else [])


def make_sampler(kind: str, seed: int, population_size: int):
    """Samplers read a trial's constraint from `Trial.set_constraint` (feasible when <= 0)."""
    if kind == "nsga2":
        return optuna.samplers.NSGAIISampler(seed=seed, population_size=max(2, population_size))
    if kind == "tpe":
        return optuna.samplers.TPESampler(seed=seed)
    return optuna.samplers.RandomSampler(seed=seed)


def journal_path(run_dir: Path) -> Path:
    return Path(run_dir) / "optuna.journal"


def open_study(run_dir: Path, name: str, sampler: str, seed: int, population_size: int, latency: bool = False) -> optuna.Study:
    from optuna.storages import JournalStorage
    from optuna.storages.journal import JournalFileBackend

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    storage = JournalStorage(JournalFileBackend(str(journal_path(run_dir))))
    return optuna.create_study(
        study_name=name,
        storage=storage,
        directions=objective_directions(latency),
        sampler=make_sampler(sampler, seed, population_size),
        load_if_exists=True,
    )


def tell_result(study: optuna.Study, trial_number: int, result: dict, max_params: float | None) -> None:
    """COMPLETE with (score, params[, latency]) for a scored candidate, FAIL with its reason otherwise.

    Idempotent: a trial told before a kill is left as it is, so a resumed run can tell every
    result of the interrupted generation again and the study still agrees with the journal.
    """
    frozen = study.get_trials(deepcopy=False)[trial_number]  # trials are numbered in ask order
    if frozen.state.is_finished():
        return
    trial = optuna.trial.Trial(study, frozen._trial_id)  # a live handle on an asked trial
    if result.get("status") != "ok":
        trial.set_user_attr("fail_reason", str(result.get("reason") or result.get("status")))
        study.tell(trial, state=optuna.trial.TrialState.FAIL)
        return
    params = float(result["num_params"])
    if max_params is not None:
        trial.set_constraint("max_params", params - max_params)
    values = [float(result["score"]), params]
    if len(study.directions) == 3:
        values.append(float(result["latency_ms"]))
    study.tell(trial, values)


def prune_over_budget(study: optuna.Study, trial: optuna.Trial, predicted_params: int, max_params: float) -> None:
    """Tell an asked trial PRUNED: its plan's predicted size is over the budget, so it is not scored.
    NSGA-II builds generations from COMPLETE trials only, so the next ask fills the same slot."""
    trial.set_user_attr("predicted_params", int(predicted_params))
    trial.set_user_attr("pruned_reason", f"predicted {int(predicted_params):,} parameters > budget {max_params:,.0f}")
    study.tell(trial, state=optuna.trial.TrialState.PRUNED)
