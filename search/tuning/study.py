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
    """Samplers read a trial's constraint from `Trial.set_constraint` (feasible when <= 0).

    Each sampler's randomness is a pure function of the study's history: before every trial it
    is re-seeded from (run seed, trial number) (`HistorySeeded`). A resumed run, whose sampler
    object is new, then asks exactly what the uninterrupted run asked: nothing about the RNG
    needs to be saved, and the Optuna journal alone is the sampler's state."""
    if kind == "nsga2":
        return _seeded(optuna.samplers.NSGAIISampler)(seed=seed, population_size=max(2, population_size))
    if kind == "tpe":
        return _seeded(optuna.samplers.TPESampler)(seed=seed)
    return _seeded(optuna.samplers.RandomSampler)(seed=seed)


class HistorySeeded:
    """Mixin: re-seed every random state of the sampler (and of the samplers it holds) from
    (seed, trial number) in `before_trial`, which Optuna calls before any sampling of a trial."""

    def __init__(self, *args, seed: int, **kwargs):
        super().__init__(*args, seed=seed, **kwargs)
        self._history_seed = seed

    def before_trial(self, study, trial) -> None:
        reseed(self, self._history_seed, trial.number)
        super().before_trial(study, trial)


def _seeded(sampler_cls):
    return type(f"HistorySeeded{sampler_cls.__name__}", (HistorySeeded, sampler_cls), {"__module__": __name__})


def reseed(sampler, seed: int, trial_number: int) -> None:
    """Set every `LazyRandomState` reachable from `sampler`'s attributes (its own, a nested
    sampler's, a strategy's) to a state derived from (seed, trial number, attribute path)."""
    import hashlib

    from optuna.samplers._lazy_random_state import LazyRandomState

    def walk(obj, path: str, seen: set) -> None:
        if id(obj) in seen:
            return
        seen.add(id(obj))
        if isinstance(obj, LazyRandomState):
            digest = hashlib.sha256(f"evofuse-sampler:{seed}:{trial_number}:{path}".encode()).digest()
            obj.rng.seed(int.from_bytes(digest[:4], "little"))
            return
        if isinstance(obj, optuna.samplers.BaseSampler) or type(obj).__module__.startswith("optuna.samplers"):
            for name, value in sorted(vars(obj).items()) if hasattr(obj, "__dict__") else ():
                walk(value, f"{path}.{name}", seen)

    walk(sampler, "sampler", set())


def journal_path(run_dir: Path) -> Path:
    return Path(run_dir) / "optuna.journal"


def open_study(run_dir: Path, name: str, sampler: str | optuna.samplers.BaseSampler, seed: int, population_size: int,
               directions: list[str]) -> optuna.Study:
    """The run's study (created on first use); `directions` from `Objectives.directions`;
    `sampler` by name (`make_sampler`) or a sampler object (recipe runs' CMA-ES)."""
    from optuna.storages import JournalStorage
    from optuna.storages.journal import JournalFileBackend

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    storage = JournalStorage(JournalFileBackend(str(journal_path(run_dir))))
    return optuna.create_study(
        study_name=name,
        storage=storage,
        directions=directions,
        sampler=make_sampler(sampler, seed, population_size) if isinstance(sampler, str) else sampler,
        load_if_exists=True,
    )


def reopen(study: optuna.Study, frozen: optuna.trial.FrozenTrial) -> optuna.Trial:
    """A live handle on a trial asked earlier (by a process that may be gone), to suggest,
    report or set attributes on it. Optuna has no public call for this: `Trial` over the
    trial's storage id is what `study.ask` itself builds."""
    return optuna.Trial(study, frozen._trial_id)


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
