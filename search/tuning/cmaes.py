"""CMA-ES as an Optuna sampler whose whole state is a pure function of the study's trials.

Optuna's own CmaEsSampler keeps its optimizer pickled in the storage (and needs the `cmaes`
package); a run directory is never read with pickle, so this sampler re-derives the CMA-ES
state instead: trials are asked in generations of `popsize` (trial number n is slot
n % popsize of generation n // popsize), generation g's samples are drawn from seeds
(run seed, g, slot), and the distribution before generation g is the textbook update
(Hansen, "The CMA Evolution Strategy: A Tutorial", 2016, (μ/μ_w, λ)-CMA-ES with positive
weights) replayed over generations 0..g-1 from the parameters and values the journal holds. A
resumed run, whose sampler is new, asks exactly what the uninterrupted run asked.

The search runs in [0, 1]^n (each parameter's range scaled to the unit interval), starting at
the centre with step `sigma0`. A sample outside the box is drawn again (up to 100 times, then
clipped); the update uses the parameters as evaluated (read from the trials), so a clipped
sample is told where it was scored. Ranking, for maximisation: COMPLETE trials by value, then
PRUNED ones (stopped by staged fitness: judged worse than the best on a subset) by their last
reported value, then FAILED ones — the order Optuna's TPE gives pruned trials.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import optuna
from optuna.distributions import FloatDistribution
from optuna.trial import TrialState

MAX_RESAMPLES = 100


@dataclass
class CmaState:
    """The search distribution N(mean, sigma^2 C) and its evolution paths."""

    mean: np.ndarray  # (n,)
    sigma: float
    C: np.ndarray = field(default=None)  # (n, n)
    p_sigma: np.ndarray = field(default=None)  # (n,) conjugate evolution path (step size)
    p_c: np.ndarray = field(default=None)  # (n,) evolution path (covariance)
    updates: int = 0

    def __post_init__(self) -> None:
        n = len(self.mean)
        self.C = np.eye(n) if self.C is None else self.C
        self.p_sigma = np.zeros(n) if self.p_sigma is None else self.p_sigma
        self.p_c = np.zeros(n) if self.p_c is None else self.p_c

    def eigen(self) -> tuple[np.ndarray, np.ndarray]:
        """C = B diag(D^2) B^T: (B, D)."""
        C = (self.C + self.C.T) / 2  # keep it symmetric against round-off
        eigenvalues, B = np.linalg.eigh(C)
        return B, np.sqrt(np.maximum(eigenvalues, 1e-20))

    def sample(self, rng: np.random.Generator) -> np.ndarray:
        """x = mean + sigma B D z, z ~ N(0, I), redrawn while outside [0, 1]^n, then clipped."""
        B, D = self.eigen()
        for _ in range(MAX_RESAMPLES):
            x = self.mean + self.sigma * (B @ (D * rng.standard_normal(len(self.mean))))
            if np.all((x >= 0) & (x <= 1)):
                return x
        return np.clip(x, 0.0, 1.0)

    def update(self, ranked: list[np.ndarray]) -> None:
        """One generation's update from its samples, best first (at least 2)."""
        n, lam = len(self.mean), len(ranked)
        mu = lam // 2
        w = np.log((lam + 1) / 2) - np.log(np.arange(1, mu + 1))  # positive recombination weights
        w /= w.sum()
        mu_eff = 1.0 / np.sum(w**2)
        c_sigma = (mu_eff + 2) / (n + mu_eff + 5)
        d_sigma = 1 + 2 * max(0.0, math.sqrt((mu_eff - 1) / (n + 1)) - 1) + c_sigma
        c_c = (4 + mu_eff / n) / (n + 4 + 2 * mu_eff / n)
        c_1 = 2 / ((n + 1.3) ** 2 + mu_eff)
        c_mu = min(1 - c_1, 2 * (mu_eff - 2 + 1 / mu_eff) / ((n + 2) ** 2 + mu_eff))
        chi_n = math.sqrt(n) * (1 - 1 / (4 * n) + 1 / (21 * n**2))  # E||N(0, I)||

        B, D = self.eigen()
        y = (np.array(ranked[:mu]) - self.mean) / self.sigma  # (mu, n) steps of the best
        y_w = w @ y  # (n,) weighted mean step
        self.mean = self.mean + self.sigma * y_w  # c_m = 1
        C_inv_sqrt = B @ np.diag(1 / D) @ B.T
        self.p_sigma = (1 - c_sigma) * self.p_sigma + math.sqrt(c_sigma * (2 - c_sigma) * mu_eff) * (C_inv_sqrt @ y_w)
        self.updates += 1
        norm = np.linalg.norm(self.p_sigma)
        h_sigma = float(norm / math.sqrt(1 - (1 - c_sigma) ** (2 * self.updates)) < (1.4 + 2 / (n + 1)) * chi_n)
        self.p_c = (1 - c_c) * self.p_c + h_sigma * math.sqrt(c_c * (2 - c_c) * mu_eff) * y_w
        delta = (1 - h_sigma) * c_c * (2 - c_c)  # the rank-one update's correction when h_sigma stalls
        rank_mu = (w[:, None] * y).T @ y  # (n, n) sum_i w_i y_i y_i^T
        self.C = (1 + c_1 * delta - c_1 - c_mu) * self.C + c_1 * np.outer(self.p_c, self.p_c) + c_mu * rank_mu
        self.sigma = self.sigma * math.exp((c_sigma / d_sigma) * (norm / chi_n - 1))


def rank_key(trial: optuna.trial.FrozenTrial) -> tuple:
    """Larger is better: COMPLETE by value, then PRUNED by last report, then FAIL."""
    if trial.state == TrialState.COMPLETE:
        return (2, trial.value)
    if trial.state == TrialState.PRUNED:
        reports = trial.intermediate_values
        return (1, reports[max(reports)] if reports else -math.inf)
    return (0, 0.0)


class HistoryCmaEsSampler(optuna.samplers.BaseSampler):
    """CMA-ES over a fixed space of float parameters, asked `popsize` trials per generation
    (single objective, maximised), its state re-derived from the study on every ask."""

    def __init__(self, space: dict[str, FloatDistribution], popsize: int, seed: int, sigma0: float = 1 / 6):
        if popsize < 2:
            raise ValueError("CMA-ES needs at least 2 trials per generation")
        self.space, self.popsize, self.seed, self.sigma0 = dict(space), popsize, seed, sigma0
        self._cache: tuple | None = None  # (history signature, state)

    def infer_relative_search_space(self, study, trial) -> dict:
        return dict(self.space)

    def sample_relative(self, study, trial, search_space) -> dict:
        if not search_space:
            return {}
        generation, slot = divmod(trial.number, self.popsize)
        state = self.state_before(study, generation)
        x = state.sample(np.random.default_rng([self.seed, generation, slot]))
        return {name: self._from_unit(name, xi) for name, xi in zip(self.space, x)}

    def sample_independent(self, study, trial, param_name, param_distribution):
        raise ValueError(f"parameter {param_name!r} is outside the CMA-ES search space")

    def state_before(self, study, generation: int) -> CmaState:
        """The distribution generation `generation` samples from: the updates of the earlier ones."""
        trials = [t for t in study.get_trials(deepcopy=False) if t.number < generation * self.popsize]
        signature = tuple((t.number, t.state, rank_key(t)) for t in trials)
        if self._cache is not None and self._cache[0] == signature:
            return self._cache[1]
        state = CmaState(mean=np.full(len(self.space), 0.5), sigma=self.sigma0)
        for g in range(generation):
            done = [t for t in trials[g * self.popsize:(g + 1) * self.popsize]
                    if t.state.is_finished() and all(name in t.params for name in self.space)]
            if len(done) >= 2:
                ranked = sorted(done, key=lambda t: (rank_key(t), -t.number), reverse=True)  # ties: the earlier first
                state.update([self._to_unit(t.params) for t in ranked])
        self._cache = (signature, state)
        return state

    def _to_unit(self, params: dict) -> np.ndarray:
        return np.array([(params[n] - d.low) / (d.high - d.low) for n, d in self.space.items()])

    def _from_unit(self, name: str, x: float) -> float:
        d = self.space[name]
        return float(min(d.high, max(d.low, d.low + float(x) * (d.high - d.low))))


__all__ = ["HistoryCmaEsSampler", "CmaState", "rank_key"]
