"""Staged fitness: the statistics that decide whether a candidate is worth scoring further.

Pure functions (numpy, scipy, math, hashlib only; no torch, nothing else from `search`).

The scheme. Every dev task with N items is scored in stages. Stage k scores a fixed, seeded
subset of the task's items; the subsets are nested (stage k's items are a subset of stage
k+1's) and the last stage is every item. All candidates of one run are scored on the same
subsets, so two candidates are always compared *paired*, item by item, on the items both were
scored on. After each stage a candidate goes on only if it can still win:

- merge mode (one objective): it is not worse than its rival (the member it would replace) on
  the shared items by more than a one-sided Student-t margin (`compare`, `can_still_win`);
- compress / joint (several objectives): it is not dominated beyond that margin by a member
  of the current front (`dominated_beyond_margin`).

Per-example scores. A task's per-example scores are a dict of three equal-length sequences,
`{"index": [...], "value": [...], "weight": [...]}`, and the task's score over a set S of items
is the ratio  score(S) = sum_{i in S} value_i / sum_{i in S} weight_i  (higher is better).
Perplexity: value_i = -(NLL sum of document i) in nats, weight_i = its predicted tokens, so the
score is minus the mean token NLL; accuracy: value_i in {0, 1}, weight_i = 1; a KL proxy:
value_i = -(summed KL), weight_i = tokens. The aggregate of several tasks is the weighted mean
A = sum_t w_t * score_t / sum_t w_t over the tasks with w_t > 0.

An audit (`audit_selected`) fully scores a seeded fraction of stopped candidates anyway, so the
run measures its own false rejections (`false_rejection_rate`, bounded by `rate_upper_bound`) and
how well a first stage ranks candidates (`spearman` of stage and full scores).
"""
from __future__ import annotations

import hashlib
import math
import operator
from fractions import Fraction
from typing import Mapping, NamedTuple, Sequence

import numpy as np

__all__ = [
    "Comparison",
    "audit_selected",
    "can_still_win",
    "compare",
    "degrees_of_freedom",
    "discordance_variance_floor",
    "dominated_beyond_margin",
    "false_rejection_rate",
    "margin",
    "paired_difference",
    "rate_upper_bound",
    "spearman",
    "stage_sizes",
    "stage_subsets",
]

# Differences this close to the margin count as ties (float noise in sums of many terms):
# a candidate exactly as good as its rival is never stopped because of rounding.
TIE_TOLERANCE = 1e-12


def _digest(*parts: object) -> bytes:
    """sha256 over the parts' str() joined by NUL bytes: a stable, hash-seed-free key."""
    return hashlib.sha256("\0".join(str(p) for p in parts).encode("utf-8")).digest()


# ---------------------------------------------------------------------------------------------
# Stage subsets
# ---------------------------------------------------------------------------------------------

def _check_fractions(fractions: Sequence[float]) -> list[float]:
    fr = [float(f) for f in fractions]
    if not fr:
        raise ValueError("stage fractions: need at least one stage (the last must be 1.0)")
    for f in fr:
        if not (0.0 < f <= 1.0) or math.isnan(f):
            raise ValueError(f"stage fractions must lie in (0, 1], got {fr}")
    for a, b in zip(fr, fr[1:]):
        if not b > a:
            raise ValueError(f"stage fractions must be strictly increasing, got {fr}")
    if fr[-1] != 1.0:
        raise ValueError(f"the last stage fraction must be 1.0 (every item), got {fr}")
    return fr


def stage_sizes(n: int, fractions: Sequence[float], min_items: int = 1) -> list[int]:
    """Number of items each stage scores for a task of `n` items.

    size_k = min(n, max(min_items, ceil(fraction_k * n))).

    The product is taken exactly on the fraction as written (`Fraction(repr(f))`), so
    0.07 * 100 is 7, not ceil(7.000000000000001) = 8. `fractions` must be strictly increasing in
    (0, 1] and end at 1.0 (ValueError otherwise); the sizes are then non-decreasing and the last
    is n. Two stages may get the same size on a small task (then the later one adds nothing).
    """
    n = operator.index(n)
    min_items = operator.index(min_items)
    if n < 0:
        raise ValueError(f"a task has n >= 0 items, got {n}")
    if min_items < 0:
        raise ValueError(f"min_items must be >= 0, got {min_items}")
    fr = _check_fractions(fractions)
    return [min(n, max(min_items, math.ceil(Fraction(repr(f)) * n))) for f in fr]


def stage_subsets(n: int, fractions: Sequence[float], seed: int, salt: str,
                  min_items: int = 1) -> list[list[int]]:
    """The item indices (0..n-1) each stage scores, sorted ascending within each stage.

    One permutation of range(n) is drawn per (seed, salt) — salt is the task's name — with
    numpy's Generator(PCG64(s)), s = the first 128 bits of sha256("evofuse.staged.subset",
    seed, salt) (never Python's hash(), so it does not depend on PYTHONHASHSEED). Stage k takes
    the first `stage_sizes(...)[k]` entries of that permutation, so each stage is a simple
    random sample without replacement of the task's items, the stages are nested
    (stage k ⊂ stage k+1) and the last stage (fraction 1.0) is every item. Deterministic for a
    given (n, fractions, seed, salt, min_items) and numpy version.
    """
    seed = operator.index(seed)
    sizes = stage_sizes(n, fractions, min_items)
    key = int.from_bytes(_digest("evofuse.staged.subset", seed, salt)[:16], "big")
    perm = np.random.Generator(np.random.PCG64(key)).permutation(n)
    return [sorted(int(i) for i in perm[:size]) for size in sizes]


# ---------------------------------------------------------------------------------------------
# The paired comparison
# ---------------------------------------------------------------------------------------------

def _arrays(examples: Mapping[str, Sequence], who: str, task: str):
    try:
        index = np.asarray(examples["index"], dtype=np.int64).reshape(-1)
        value = np.asarray(examples["value"], dtype=np.float64).reshape(-1)
        weight = np.asarray(examples["weight"], dtype=np.float64).reshape(-1)
    except KeyError as e:
        raise ValueError(f"{who}'s examples for task {task!r} lack {e.args[0]!r} "
                         "(need 'index', 'value', 'weight')") from None
    if not (len(index) == len(value) == len(weight)):
        raise ValueError(f"{who}'s examples for task {task!r}: index, value and weight differ "
                         f"in length ({len(index)}, {len(value)}, {len(weight)})")
    if len(np.unique(index)) != len(index):
        raise ValueError(f"{who}'s examples for task {task!r} repeat an index")
    if not (np.all(np.isfinite(value)) and np.all(np.isfinite(weight))):
        raise ValueError(f"{who}'s examples for task {task!r} hold a non-finite value or weight")
    if np.any(weight < 0):
        raise ValueError(f"{who}'s examples for task {task!r} hold a negative weight")
    return index, value, weight


def _task_weights(task_weights: Mapping[str, float]) -> dict[str, float]:
    used = {}
    for task, w in task_weights.items():
        w = float(w)
        if not math.isfinite(w) or w < 0:
            raise ValueError(f"task weight of {task!r} must be finite and >= 0, got {w}")
        if w > 0:
            used[task] = w
    if not used:
        raise ValueError("no task has a positive weight")
    return used


def paired_difference(candidate: Mapping[str, Mapping[str, Sequence]],
                      rival: Mapping[str, Mapping[str, Sequence]],
                      task_weights: Mapping[str, float],
                      population_sizes: Mapping[str, int] | None = None,
                      accuracy_floor: bool = True,
                      ) -> tuple[float, float, int]:
    """(diff, std_err, n): candidate's aggregate minus rival's, on the items both were scored on.

    For each task t with w_t > 0, S_t = the indices in both candidates' examples (n_t = |S_t| >= 1,
    else ValueError), and for X in {c (candidate), r (rival)}:
        R_X,t = sum_{i in S_t} v_X,i / sum_{i in S_t} w_X,i          (the task score on S_t)
        diff_t = R_c,t - R_r,t
    and with a_t = w_t / sum_u w_u (tasks of weight 0 are ignored, may be absent):
        diff = sum_t a_t * diff_t                                    (difference of aggregates)

    Variance. A ratio R = mean(v)/mean(w) is linearised (delta method):
    R_hat - R ≈ mean_i z_i with z_i = (v_i - R w_i) / mean(w). The paired difference per item is
        d_i = z_c,i - z_r,i = (v_c,i - R_c w_c,i)/mean(w_c) - (v_r,i - R_r w_r,i)/mean(w_r)
    (each candidate's own weights: normally w_c,i = w_r,i, but a candidate whose token counts
    differ for an item, e.g. another tokenizer, is still handled). With equal weights this is
    d_i = ((v_c,i - v_r,i) - diff_t w_i) / mean(w), and for accuracy (w_i = 1) just the paired
    difference minus its mean: the classic paired t-test. Then, with the sample variance
    s_t^2 = sum_i (d_i - mean d)^2 / (n_t - 1):
        var_t = s_t^2 / n_t * (1 - n_t / N_t)
    where the finite-population correction (1 - n_t/N_t) applies only when
    `population_sizes[t]` = N_t is given (the stage subsets are drawn without replacement from
    the task's N_t items, so at n_t = N_t the difference is exact and var_t = 0). For a
    right/wrong task (values in {0, 1}, weights 1, on both sides) s_t^2 is at least
    `discordance_variance_floor`: agreeing on every one of a few items is weak evidence that two
    candidates agree on the task (`accuracy_floor=False`: the plain sample variance, the
    estimator before 2026-12-01, which `benchmarks/margin_rules.py` replays). Tasks are
    disjoint item sets, so
        var = sum_t a_t^2 var_t,    std_err = sqrt(var).
    A task with a single shared item has no variance estimate: std_err = inf (no margin ever
    stops a candidate on it). Identical per-item differences of a real-valued task give
    std_err = 0 (then any deficit stops the candidate, a tie does not).

    n = sum_t n_t, the shared items over the weighted tasks (degrees of freedom: n - #tasks).
    Higher scores are better, so diff > 0 means the candidate is ahead.
    """
    weights = _task_weights(task_weights)
    total_w = sum(weights.values())
    population_sizes = dict(population_sizes or {})
    diff, var, n = 0.0, 0.0, 0
    for task, w in weights.items():
        for who, side in (("candidate", candidate), ("rival", rival)):
            if task not in side:
                raise ValueError(f"task {task!r} (weight {w}) has no examples for the {who}")
        ic_idx, vc, wc = _arrays(candidate[task], "candidate", task)
        ir_idx, vr, wr = _arrays(rival[task], "rival", task)
        _, ic, ir = np.intersect1d(ic_idx, ir_idx, assume_unique=True, return_indices=True)
        n_t = len(ic)
        if n_t == 0:
            raise ValueError(f"task {task!r}: the candidate and its rival share no scored item")
        vc, wc, vr, wr = vc[ic], wc[ic], vr[ir], wr[ir]
        if wc.sum() <= 0 or wr.sum() <= 0:
            raise ValueError(f"task {task!r}: the shared items' weights sum to 0")
        rc, rr = vc.sum() / wc.sum(), vr.sum() / wr.sum()
        a = w / total_w
        diff += a * (rc - rr)
        n += n_t
        if n_t < 2:
            var = math.inf
            continue
        d = (vc - rc * wc) / wc.mean() - (vr - rr * wr) / wr.mean()
        var_d = float(np.var(d, ddof=1))
        if accuracy_floor and _is_accuracy(vc, wc) and _is_accuracy(vr, wr):
            var_d = max(var_d, discordance_variance_floor(vc, vr))
        var_t = var_d / n_t
        if task in population_sizes:
            big_n = operator.index(population_sizes[task])
            if big_n < n_t:
                raise ValueError(f"task {task!r}: population size {big_n} < {n_t} shared items")
            var_t *= 1.0 - n_t / big_n
        var += a * a * var_t
    return float(diff), math.sqrt(var), int(n)


def _is_accuracy(value: np.ndarray, weight: np.ndarray) -> bool:
    """Whether a task's items are right/wrong outcomes (values in {0, 1}, weight 1 each)."""
    return bool(np.all(weight == 1.0) and np.all((value == 0.0) | (value == 1.0)))


def discordance_variance_floor(candidate: np.ndarray, rival: np.ndarray) -> float:
    """The least variance of the paired difference d_i = c_i - r_i of two right/wrong records.

    With n shared items, b where only the candidate is right and c where only the rival is,
    d takes +1, -1, 0 with probabilities p10, p01, 1 - p10 - p01, so
        Var(d) = p10 + p01 - (p10 - p01)^2.
    The plug-in p10 = b/n is 0 whenever the two agree on every item, which on a first stage of
    3-4 items per task is the usual case: the task's difference then counts as known exactly
    (variance 0), and a small deficit on another task stops a candidate that full scoring finds
    better (benchmarks/results/staged.md, seeds 2 and 3). Half a pseudo-count in each cell of
    the 2 x 2 table (Agresti & Min's adjustment for matched proportions),
        p10 = (b + 1/2) / (n + 2),   p01 = (c + 1/2) / (n + 2),
    gives the floor: about 1/(n + 2) per kind of disagreement not seen, e.g. 0.17 at n = 4 with
    b = c = 0 (a standard error of 0.2 on the task's accuracy difference, against the 0.25 that
    one disagreement in four moves it).
    """
    n = len(candidate)
    b = float(np.sum((candidate == 1.0) & (rival == 0.0)))
    c = float(np.sum((candidate == 0.0) & (rival == 1.0)))
    p10, p01 = (b + 0.5) / (n + 2), (c + 0.5) / (n + 2)
    return p10 + p01 - (p10 - p01) ** 2


def degrees_of_freedom(n_items: int, n_tasks: int) -> int:
    """dof of the paired test: total shared items minus tasks (one mean per task), at least 1."""
    return max(1, int(n_items) - int(n_tasks))


def margin(std_err: float, confidence: float, dof: int) -> float:
    """The one-sided bound t_{confidence, dof} * std_err (Student-t quantile, scipy.stats.t.ppf).

    confidence must lie in (0.5, 1), dof >= 1. std_err = 0 gives 0, std_err = inf gives inf.
    """
    confidence = float(confidence)
    if not 0.5 < confidence < 1.0:
        raise ValueError(f"confidence must lie in (0.5, 1), got {confidence}")
    if dof < 1:
        raise ValueError(f"degrees of freedom must be >= 1, got {dof}")
    std_err = float(std_err)
    if math.isnan(std_err) or std_err < 0:
        raise ValueError(f"std_err must be >= 0, got {std_err}")
    if std_err == 0.0 or math.isinf(std_err):
        return std_err
    from scipy import stats  # here, not at the top: keeps importing this module light

    return float(stats.t.ppf(confidence, dof)) * std_err


def can_still_win(diff: float, std_err: float, confidence: float, dof: int) -> bool:
    """False only when the candidate is worse than its rival by more than the margin.

    This is a one-sided paired t-test of H0 "the candidate is at least as good as its rival"
    (true aggregate difference >= 0) against "it is worse", at level 1 - confidence: the
    candidate is stopped (False) only when the data reject H0, i.e.
        diff < -t_{confidence, dof} * std_err     (differences within 1e-12 count as ties).
    So a candidate that is truly as good as its rival is wrongly stopped at most about
    1 - confidence of the time (per comparison, per stage; the audit measures the real rate).
    """
    diff = float(diff)
    if math.isnan(diff):
        raise ValueError("diff is NaN")
    return not diff < -margin(std_err, confidence, dof) - TIE_TOLERANCE


class Comparison(NamedTuple):
    """One paired comparison, candidate vs rival (fields as in `paired_difference`)."""
    diff: float
    std_err: float
    n: int
    dof: int
    margin: float
    can_still_win: bool


def compare(candidate: Mapping[str, Mapping[str, Sequence]],
            rival: Mapping[str, Mapping[str, Sequence]],
            task_weights: Mapping[str, float], confidence: float,
            population_sizes: Mapping[str, int] | None = None, accuracy_floor: bool = True) -> Comparison:
    """`paired_difference`, then the margin and `can_still_win` with dof = n - #weighted tasks."""
    diff, se, n = paired_difference(candidate, rival, task_weights, population_sizes, accuracy_floor)
    dof = degrees_of_freedom(n, len(_task_weights(task_weights)))
    return Comparison(diff, se, n, dof, margin(se, confidence, dof),
                      can_still_win(diff, se, confidence, dof))


def dominated_beyond_margin(candidate_examples: Mapping[str, Mapping[str, Sequence]],
                            candidate_costs: Sequence[float],
                            front: Sequence[tuple[Mapping[str, Mapping[str, Sequence]],
                                                  Sequence[float]]],
                            task_weights: Mapping[str, float], confidence: float,
                            population_sizes: Mapping[str, int] | None = None) -> bool:
    """True if some front member dominates the candidate beyond the paired margin.

    Objectives: the aggregate dev score (up) and exact costs (down: parameter count, optionally
    latency). A member (examples_m, costs_m) dominates beyond the margin when
        costs_m[j] <= candidate_costs[j] for every j       (costs are exact, no test), and
        the candidate cannot still win against it: diff < -t_{confidence,dof} * std_err
    with diff, std_err from `paired_difference(candidate, member)` on their shared items. Each
    member is tested at level 1 - confidence; with m members able to dominate, the chance of
    wrongly stopping a truly non-dominated candidate is at most m * (1 - confidence).
    """
    costs = [float(c) for c in candidate_costs]
    for member_examples, member_costs in front:
        mc = [float(c) for c in member_costs]
        if len(mc) != len(costs):
            raise ValueError(f"cost tuples differ in length: {mc} vs {costs}")
        if all(m <= c for m, c in zip(mc, costs)):
            if not compare(candidate_examples, member_examples, task_weights, confidence,
                           population_sizes).can_still_win:
                return True
    return False


# ---------------------------------------------------------------------------------------------
# Audit
# ---------------------------------------------------------------------------------------------

def audit_selected(seed: int, candidate_id: str, fraction: float) -> bool:
    """Whether a stopped candidate is fully scored anyway: a seeded draw with P = fraction.

    u = (first 64 bits of sha256("evofuse.staged.audit", seed, candidate_id)) / 2^64, uniform in
    [0, 1); selected iff u < fraction. Deterministic in (seed, candidate_id), independent of
    PYTHONHASHSEED, so a resumed run audits the same candidates. fraction in [0, 1].
    """
    seed = operator.index(seed)
    fraction = float(fraction)
    if not 0.0 <= fraction <= 1.0:
        raise ValueError(f"audit fraction must lie in [0, 1], got {fraction}")
    u = int.from_bytes(_digest("evofuse.staged.audit", seed, candidate_id)[:8], "big") / 2.0**64
    return u < fraction


def _average_ranks(x: np.ndarray) -> np.ndarray:
    """1-based ranks; tied values share the mean of the positions they occupy."""
    _, inverse, counts = np.unique(x, return_inverse=True, return_counts=True)
    last = np.cumsum(counts)  # 1-based position of each distinct value's last occurrence
    return (last - (counts - 1) / 2.0)[inverse.reshape(-1)]


def spearman(xs: Sequence[float], ys: Sequence[float]) -> float:
    """Spearman's rank correlation: Pearson's correlation of the average ranks (ties share the
    mean rank of their positions), rho = sum (rx - mean)(ry - mean) / sqrt(sum(rx - mean)^2 *
    sum(ry - mean)^2). NaN when undefined (fewer than two pairs, or a constant sequence)."""
    x = np.asarray(xs, dtype=np.float64).reshape(-1)
    y = np.asarray(ys, dtype=np.float64).reshape(-1)
    if len(x) != len(y):
        raise ValueError(f"spearman: sequences differ in length ({len(x)}, {len(y)})")
    if np.any(np.isnan(x)) or np.any(np.isnan(y)):
        raise ValueError("spearman: NaN in the input")
    if len(x) < 2:
        return math.nan
    rx, ry = _average_ranks(x), _average_ranks(y)
    rx -= rx.mean()
    ry -= ry.mean()
    denom = math.sqrt(float(rx @ rx) * float(ry @ ry))
    return float(rx @ ry) / denom if denom > 0 else math.nan


def false_rejection_rate(audits: Sequence[tuple[float, float, float]]) -> float:
    """Fraction of audited stopped candidates that would in fact have won.

    Each audit is (stopped_stage_score, full_score, rival_full_score) for one stopped candidate
    that was fully scored anyway; it was a false rejection when full_score >= rival_full_score
    (in compress / joint runs pass the full score of the front member that stopped it). The
    stage score is not used here (it is kept for `spearman` of stage vs full scores).
    NaN when there are no audits.
    """
    audits = list(audits)
    if not audits:
        return math.nan
    wins = 0
    for row in audits:
        _, full, rival_full = row
        wins += float(full) >= float(rival_full)
    return wins / len(audits)


def rate_upper_bound(failures: int, n: int, confidence: float = 0.95) -> float:
    """One-sided Clopper-Pearson upper bound on a rate seen as failures / n: the p at which
    seeing at most `failures` of n has probability 1 - confidence, P(Bin(n, p) <= failures) =
    1 - confidence (found by bisection on the binomial CDF, which falls as p grows). So 0 of 30
    reads as "at most 9.5%" at 95%. NaN for n = 0; 1 when every trial failed."""
    if n == 0:
        return math.nan
    if failures >= n:
        return 1.0

    def cdf(p: float) -> float:
        return sum(math.comb(n, k) * p**k * (1 - p) ** (n - k) for k in range(failures + 1))

    low, high = failures / n, 1.0
    for _ in range(60):
        mid = (low + high) / 2
        low, high = (mid, high) if cdf(mid) > 1 - confidence else (low, mid)
    return high
