"""Staged fitness statistics (search/fitness/staged.py): hand computations and properties."""
from __future__ import annotations

import json
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from scipy import stats

from search.fitness.staged import (
    audit_selected,
    can_still_win,
    compare,
    degrees_of_freedom,
    discordance_variance_floor,
    dominated_beyond_margin,
    false_rejection_rate,
    margin,
    paired_difference,
    spearman,
    stage_sizes,
    stage_subsets,
)

STAGED_PY = Path(__file__).resolve().parents[1] / "search" / "fitness" / "staged.py"


def ex(index, value, weight=None):
    return {"index": list(index), "value": list(value),
            "weight": list(weight) if weight is not None else [1.0] * len(index)}


# Two candidates: 5 accuracy items (the rival's listed in another order) and a perplexity task of
# 3 documents (value = -NLL sum, weight = tokens).
CAND = {"acc": ex([0, 1, 2, 3, 4], [1, 0, 1, 1, 0]),
        "ppl": ex([0, 1, 2], [-20, -30, -40], [10, 20, 30])}
RIVAL = {"acc": ex([4, 3, 2, 1, 0], [1, 1, 0, 1, 1]),
         "ppl": ex([0, 1, 2], [-18, -32, -37], [10, 20, 30])}
WEIGHTS = {"acc": 3.0, "ppl": 1.0}


# --------------------------------------------------------------------------- the paired margin

def test_hand_computation():
    # acc: candidate 3/5 = 0.6, rival 4/5 = 0.8, diff_acc = -0.2.
    #   paired differences d = [0, -1, 1, 0, -1], mean -0.2, deviations [.2, -.8, 1.2, .2, -.8],
    #   squares sum 0.04 + 0.64 + 1.44 + 0.04 + 0.64 = 2.8, s^2 = 2.8 / 4 = 0.7,
    #   var_acc = 0.7 / 5 = 0.14.
    # ppl: candidate -90/60 = -1.5, rival -87/60 = -1.45, diff_ppl = -0.05. mean(w) = 20.
    #   z_c = (v_c + 1.5 w) / 20 = [-5, 0, 5] / 20;  z_r = (v_r + 1.45 w) / 20 = [-3.5, -3, 6.5] / 20
    #   d = z_c - z_r = [-1.5, 3, -1.5] / 20 = [-0.075, 0.15, -0.075], mean 0,
    #   s^2 = (0.005625 + 0.0225 + 0.005625) / 2 = 0.016875, var_ppl = 0.016875 / 3 = 0.005625.
    # a = (3/4, 1/4): diff = 0.75 * -0.2 + 0.25 * -0.05 = -0.1625
    #   var = 0.5625 * 0.14 + 0.0625 * 0.005625 = 0.07875 + 0.0003515625 = 0.0791015625
    #   std_err = sqrt(0.0791015625) = 0.28125;  n = 8, dof = 8 - 2 = 6.
    diff, se, n = paired_difference(CAND, RIVAL, WEIGHTS)
    assert diff == pytest.approx(-0.1625, abs=1e-12)
    assert se == pytest.approx(0.28125, abs=1e-12)
    assert n == 8
    assert degrees_of_freedom(n, 2) == 6
    # t_{0.9,6} = 1.4398: margin = 1.4398 * 0.28125 = 0.4049 > 0.1625, so it can still win.
    assert margin(se, 0.9, 6) == pytest.approx(1.4398 * 0.28125, abs=1e-4)
    assert can_still_win(diff, se, 0.9, 6)
    # t_{0.6,6} = 0.2648: margin = 0.2648 * 0.28125 = 0.0745 < 0.1625, so it is stopped.
    assert margin(se, 0.6, 6) == pytest.approx(0.2648 * 0.28125, abs=1e-4)
    assert not can_still_win(diff, se, 0.6, 6)
    c = compare(CAND, RIVAL, WEIGHTS, 0.9)
    assert (c.n, c.dof, c.can_still_win) == (8, 6, True)
    assert c.margin == pytest.approx(0.40493, abs=1e-4)
    assert not compare(CAND, RIVAL, WEIGHTS, 0.6).can_still_win
    # The rival's view is the mirror image.
    rdiff, rse, rn = paired_difference(RIVAL, CAND, WEIGHTS)
    assert (rdiff, rse, rn) == pytest.approx((0.1625, 0.28125, 8), abs=1e-12)


def test_finite_population_correction_by_hand():
    # acc items drawn from N = 10: var_acc = 0.14 * (1 - 5/10) = 0.07; ppl N = 3 (all): var 0.
    # var = 0.5625 * 0.07 = 0.039375.
    _, se, _ = paired_difference(CAND, RIVAL, WEIGHTS, population_sizes={"acc": 10, "ppl": 3})
    assert se == pytest.approx(math.sqrt(0.039375), abs=1e-12)
    _, se, _ = paired_difference(CAND, RIVAL, WEIGHTS, population_sizes={"acc": 10})
    assert se == pytest.approx(math.sqrt(0.039375 + 0.0003515625), abs=1e-12)
    with pytest.raises(ValueError, match="population size"):
        paired_difference(CAND, RIVAL, WEIGHTS, population_sizes={"acc": 4})


def test_delta_method_with_unequal_weights_by_hand():
    # candidate v = [1, 3], w = [1, 1]: R_c = 2, mean w 1, z_c = [-1, 1]
    # rival     v = [2, 2], w = [2, 2]: R_r = 1, mean w 2, z_r = [0, 0]
    # diff = 1, d = [-1, 1], s^2 = 2, var = 2 / 2 = 1.
    diff, se, n = paired_difference({"t": ex([0, 1], [1, 3], [1, 1])},
                                    {"t": ex([0, 1], [2, 2], [2, 2])}, {"t": 1})
    assert (diff, se, n) == pytest.approx((1.0, 1.0, 2), abs=1e-12)


def test_restricted_to_shared_items_and_zero_weight_tasks_ignored():
    # The rival was scored on more items (e.g. the full set); only the shared ones count.
    rival = {"acc": ex([4, 3, 2, 1, 0, 7, 8, 9], [1, 1, 0, 1, 1, 0, 0, 0]),
             "ppl": ex([0, 1, 2, 5], [-18, -32, -37, -1000], [10, 20, 30, 7])}
    cand = dict(CAND, kl=ex([0], [5]))  # a task of weight 0 the rival lacks
    got = paired_difference(cand, rival, dict(WEIGHTS, kl=0.0))
    assert got == pytest.approx((-0.1625, 0.28125, 8), abs=1e-12)


def test_clearly_worse_stops_better_and_equal_go_on():
    right, wrong = ex(range(8), [1] * 8), ex(range(8), [0] * 8)
    # every item wrong against every item right: b = 0, c = 8 discordant pairs, s^2 = 0, raised
    # to the floor p10 + p01 - (p10 - p01)^2 with p10 = 0.5 / 10, p01 = 8.5 / 10: 0.26
    diff, se, n = paired_difference({"a": wrong}, {"a": right}, {"a": 1})
    assert (diff, n) == (-1.0, 8) and se == pytest.approx(math.sqrt(0.26 / 8), abs=1e-12)
    for conf in (0.6, 0.9, 0.99, 0.9999):
        # (at 0.9999, eight items cannot stop it: the exact sign test's p is 2^-8 = 0.004 either)
        assert compare({"a": wrong}, {"a": right}, {"a": 1}, conf).can_still_win == (conf == 0.9999)
        assert compare({"a": right}, {"a": wrong}, {"a": 1}, conf).can_still_win
        assert compare({"a": right}, {"a": right}, {"a": 1}, conf).can_still_win  # a tie
    # Worse on one item of eight: d = [-1, 0 x 7], mean -0.125, s^2 = (0.875^2 + 7 * 0.125^2) / 7
    # = 0.125, below the floor p10 + p01 - (p10 - p01)^2 = 0.05 + 0.15 - 0.01 = 0.19, so
    # std_err = sqrt(0.19 / 8) = 0.1541; margin t_{0.9,7} * 0.1541 = 0.218 > 0.125: one item in
    # eight is not enough evidence to stop it.
    one_off = ex(range(8), [0] + [1] * 7)
    c = compare({"a": one_off}, {"a": right}, {"a": 1}, 0.9)
    assert c.diff == pytest.approx(-0.125) and c.std_err == pytest.approx(math.sqrt(0.19 / 8))
    assert c.can_still_win
    # Identical real-valued scores: an exact tie with zero variance goes on.
    doc = ex(range(4), [-11.3, -7.1, -30.2, -2.9], [7, 5, 19, 3])
    c = compare({"p": doc}, {"p": doc}, {"p": 1}, 0.9)
    assert (c.diff, c.std_err, c.can_still_win) == (0.0, 0.0, True)
    # Float noise around a tie is a tie; a real deficit with zero variance is not.
    assert can_still_win(-1e-13, 0.0, 0.9, 5)
    assert not can_still_win(-1e-9, 0.0, 0.9, 5)
    assert not can_still_win(-0.2, 0.1, 0.9, 5)  # margin 1.4759 * 0.1 = 0.148 < 0.2
    assert can_still_win(-0.14, 0.1, 0.9, 5)


def test_agreeing_on_a_few_right_wrong_items_is_not_an_exact_tie():
    """Two candidates right on the same 3 of 4 items: the plug-in variance is 0, the floor
    (half a pseudo-count per cell of the 2 x 2 table) is p10 + p01 = 2 * 0.5 / 6 = 1/6."""
    assert discordance_variance_floor(np.array([1.0, 1, 1, 0]), np.array([1.0, 1, 1, 0])) == pytest.approx(1 / 6)
    same = ex(range(4), [1, 1, 1, 0])
    diff, se, n = paired_difference({"a": same}, {"a": same}, {"a": 1})
    assert (diff, n) == (0.0, 4) and se == pytest.approx(math.sqrt(1 / 6 / 4))
    # The case that stopped better candidates: 3 text pieces, each a little worse (consistent,
    # so a small variance), and two right/wrong tasks of 4 items on which both agree. Without
    # the floor the aggregate's std_err is the text task's alone and -0.01 is "significant"; in
    # full the candidate can be better on the items the subset does not hold.
    text_c = ex(range(3), [-101.0, -202.0, -151.0], [100, 200, 150])
    text_r = ex(range(3), [-98.0, -196.0, -146.5], [100, 200, 150])
    cand = {"text": text_c, "arith": same, "compare": same}
    rival = {"text": text_r, "arith": same, "compare": same}
    weights = {"text": 1, "arith": 1, "compare": 1}
    c = compare(cand, rival, weights, 0.9)
    assert c.diff == pytest.approx(-0.01) and c.can_still_win
    text_only = compare({"text": text_c}, {"text": text_r}, {"text": 1}, 0.9)
    assert text_only.std_err < 1e-9 and not text_only.can_still_win  # a real-valued task has no floor
    # Real disagreement still stops: wrong on all four where the rival is right, twice.
    wrong = ex(range(4), [0, 0, 0, 0])
    right = ex(range(4), [1, 1, 1, 1])
    assert not compare({"text": text_c, "arith": wrong, "compare": wrong},
                       {"text": text_r, "arith": right, "compare": right}, weights, 0.9).can_still_win


def test_one_item_has_no_variance_and_never_stops():
    diff, se, n = paired_difference({"a": ex([3], [0])}, {"a": ex([3], [1])}, {"a": 1})
    assert (diff, n) == (-1.0, 1) and se == math.inf
    assert margin(se, 0.9, 1) == math.inf
    assert can_still_win(diff, se, 0.99, degrees_of_freedom(n, 1))
    # One task with a single item makes the whole aggregate's std_err unknown.
    cand = dict(CAND, one=ex([0], [0]))
    rival = dict(RIVAL, one=ex([0], [1]))
    assert paired_difference(cand, rival, dict(WEIGHTS, one=1))[1] == math.inf


def test_margin_quantile_and_validation():
    assert margin(2.0, 0.9, 4) == pytest.approx(1.5332 * 2.0, abs=1e-3)  # t_{0.9,4} = 1.5332
    assert margin(0.0, 0.9, 4) == 0.0
    for bad in (0.5, 1.0, 0.3):
        with pytest.raises(ValueError, match="confidence"):
            margin(1.0, bad, 4)
    with pytest.raises(ValueError, match="degrees of freedom"):
        margin(1.0, 0.9, 0)
    assert degrees_of_freedom(2, 2) == 1 and degrees_of_freedom(1, 3) == 1


def test_bad_inputs_are_refused():
    with pytest.raises(ValueError, match="no examples for the rival"):
        paired_difference(CAND, {"acc": RIVAL["acc"]}, WEIGHTS)
    with pytest.raises(ValueError, match="share no scored item"):
        paired_difference({"a": ex([0, 1], [1, 1])}, {"a": ex([2, 3], [1, 1])}, {"a": 1})
    with pytest.raises(ValueError, match="repeat an index"):
        paired_difference({"a": ex([0, 0], [1, 1])}, {"a": ex([0, 1], [1, 1])}, {"a": 1})
    with pytest.raises(ValueError, match="positive weight"):
        paired_difference(CAND, RIVAL, {"acc": 0, "ppl": 0})
    with pytest.raises(ValueError, match="differ in length"):
        paired_difference({"a": {"index": [0, 1], "value": [1], "weight": [1, 1]}},
                          {"a": ex([0, 1], [1, 1])}, {"a": 1})


def test_false_stops_under_h0_are_about_one_minus_confidence():
    # Candidate and rival equally good (independent Bernoulli(0.6) per item): a 0.9 test stops
    # about 10% of candidates; a candidate truly 0.3 worse is nearly always stopped.
    rng = np.random.default_rng(7)
    n, trials = 40, 1000
    stops = worse_stops = 0
    for _ in range(trials):
        r = (rng.random(n) < 0.6).astype(float)
        c = (rng.random(n) < 0.6).astype(float)
        w = (rng.random(n) < 0.3).astype(float)
        idx = range(n)
        stops += not compare({"a": ex(idx, c)}, {"a": ex(idx, r)}, {"a": 1}, 0.9).can_still_win
        worse_stops += not compare({"a": ex(idx, w)}, {"a": ex(idx, r)}, {"a": 1},
                                   0.9).can_still_win
    assert 0.06 < stops / trials < 0.14
    assert worse_stops / trials > 0.9


def test_ratio_std_err_matches_resampling_from_a_finite_population():
    # A dev set of N documents of varied length; candidate and rival NLLs correlated per
    # document (paired). Stage subsets of n are drawn without replacement: the spread of the
    # stage difference over draws matches the predicted std_err (delta method with FPC).
    rng = np.random.default_rng(3)
    big_n, n = 1000, 150
    tokens = rng.integers(20, 400, size=big_n).astype(float)
    hard = rng.gamma(4.0, 0.8, size=big_n)
    nll_r = tokens * (hard + rng.normal(0, 0.2, big_n))
    nll_c = tokens * (hard + 0.05 + rng.normal(0, 0.2, big_n))
    diffs, ses = [], []
    for _ in range(400):
        pick = np.sort(rng.choice(big_n, n, replace=False))
        d, se, _ = paired_difference({"p": ex(pick, -nll_c[pick], tokens[pick])},
                                     {"p": ex(pick, -nll_r[pick], tokens[pick])},
                                     {"p": 1}, population_sizes={"p": big_n})
        diffs.append(d)
        ses.append(se)
    assert np.std(diffs, ddof=1) == pytest.approx(np.mean(ses), rel=0.15)


# --------------------------------------------------------------------------- stage subsets

def test_stage_sizes():
    assert stage_sizes(100, [0.125, 1.0]) == [13, 100]
    assert stage_sizes(100, [0.07, 1.0]) == [7, 100]  # 0.07 * 100 is 7.000000000000001 in floats
    assert stage_sizes(8, [0.125, 0.5, 1.0]) == [1, 4, 8]
    assert stage_sizes(5, [0.01, 1.0]) == [1, 5]  # at least min_items = 1
    assert stage_sizes(50, [0.01, 1.0], min_items=10) == [10, 50]
    assert stage_sizes(4, [0.5, 1.0], min_items=10) == [4, 4]  # at most n
    assert stage_sizes(7, [1.0]) == [7]
    for bad, why in (([0.5, 0.5, 1.0], "increasing"), ([0.5, 0.9], "1.0"), ([0.0, 1.0], "(0, 1]"),
                     ([0.5, 1.5], "(0, 1]"), ([], "at least one"), ([1.0, 0.5], "increasing")):
        with pytest.raises(ValueError, match=re.escape(why)):
            stage_sizes(10, bad)


def test_stage_subsets_nested_sorted_complete_and_deterministic():
    n, fr = 200, [0.05, 0.25, 0.5, 1.0]
    subsets = stage_subsets(n, fr, seed=11, salt="hellaswag")
    assert [len(s) for s in subsets] == stage_sizes(n, fr) == [10, 50, 100, 200]
    for small, big in zip(subsets, subsets[1:]):
        assert set(small) < set(big)
    for s in subsets:
        assert s == sorted(s) and len(set(s)) == len(s)
    assert subsets[-1] == list(range(n))
    assert stage_subsets(n, fr, seed=11, salt="hellaswag") == subsets
    assert stage_subsets(n, fr, seed=12, salt="hellaswag")[0] != subsets[0]
    assert stage_subsets(n, fr, seed=11, salt="arc_easy")[0] != subsets[0]
    assert stage_subsets(0, [1.0], seed=0, salt="t") == [[]]
    # A random sample: no part of the index range is favoured (mean index of the first stage
    # over many salts is about (n - 1) / 2).
    means = [np.mean(stage_subsets(n, fr, seed=1, salt=f"t{i}")[1]) for i in range(200)]
    assert np.mean(means) == pytest.approx((n - 1) / 2, abs=3)


def test_draws_do_not_depend_on_python_hash_seed():
    # Loads the module by path (no package import, no torch) in two fresh interpreters.
    code = (
        "import importlib.util, json, sys\n"
        f"spec = importlib.util.spec_from_file_location('staged', {str(STAGED_PY)!r})\n"
        "m = importlib.util.module_from_spec(spec); spec.loader.exec_module(m)\n"
        "print(json.dumps({'subsets': m.stage_subsets(50, [0.2, 0.6, 1.0], 5, 'wikitext'),\n"
        "  'audit': [m.audit_selected(5, f'cand-{i}', 0.3) for i in range(200)]}))\n"
    )
    procs = [subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True,
                              env=dict(os.environ, PYTHONHASHSEED=h)) for h in ("1", "2")]
    outs = [p.communicate(timeout=60)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0]
    one, two = (json.loads(o) for o in outs)
    assert one == two
    assert one["subsets"] == stage_subsets(50, [0.2, 0.6, 1.0], 5, "wikitext")
    assert one["audit"] == [audit_selected(5, f"cand-{i}", 0.3) for i in range(200)]


# --------------------------------------------------------------------------- audit, rank stats

@pytest.mark.parametrize("fraction", [0.05, 0.1, 0.5, 0.9])
def test_audit_fraction(fraction):
    ids = [f"g{i // 100}-c{i % 100}" for i in range(10_000)]
    chosen = [audit_selected(42, i, fraction) for i in ids]
    assert abs(np.mean(chosen) - fraction) < 0.02
    assert chosen == [audit_selected(42, i, fraction) for i in ids]  # same draw when resumed


def test_audit_edges_and_seed():
    ids = [f"c{i}" for i in range(500)]
    assert not any(audit_selected(1, i, 0.0) for i in ids)
    assert all(audit_selected(1, i, 1.0) for i in ids)
    # Nested in the fraction: what a 0.1 audit picks, a 0.3 audit picks too.
    assert all(audit_selected(1, i, 0.3) for i in ids if audit_selected(1, i, 0.1))
    a = [audit_selected(1, i, 0.5) for i in ids]
    b = [audit_selected(2, i, 0.5) for i in ids]
    assert a != b
    with pytest.raises(ValueError):
        audit_selected(1, "c", 1.5)


def test_spearman_hand_example_with_ties():
    # xs ranks [1, 2.5, 2.5, 4], ys = [10, 30, 20, 20] ranks [1, 4, 2.5, 2.5]; both mean 2.5.
    # deviations [-1.5, 0, 0, 1.5] and [-1.5, 1.5, 0, 0]: dot 2.25, squares 4.5 and 4.5.
    # rho = 2.25 / 4.5 = 0.5.
    assert spearman([1, 2, 2, 3], [10, 30, 20, 20]) == pytest.approx(0.5, abs=1e-12)
    assert spearman([1, 2, 3, 4], [5, 6, 7, 100]) == pytest.approx(1.0)
    assert spearman([1, 2, 3, 4], [4, 3, 2, 1]) == pytest.approx(-1.0)
    assert math.isnan(spearman([1, 1, 1], [1, 2, 3]))
    assert math.isnan(spearman([1], [2]))
    rng = np.random.default_rng(0)
    x, y = rng.integers(0, 6, 60), rng.integers(0, 6, 60)
    assert spearman(x, y) == pytest.approx(stats.spearmanr(x, y).statistic, abs=1e-12)
    with pytest.raises(ValueError):
        spearman([1, 2], [1, 2, 3])


def test_false_rejection_rate():
    audits = [(0.40, 0.55, 0.60),   # stopped and rightly: lost on the full set too
              (0.42, 0.61, 0.60),   # a false rejection: would have won
              (0.30, 0.60, 0.60),   # a tie counts as a win (>=)
              (0.20, 0.10, 0.60)]
    assert false_rejection_rate(audits) == pytest.approx(0.5)
    assert false_rejection_rate([(0.1, 0.2, 0.3)]) == 0.0
    assert math.isnan(false_rejection_rate([]))


# --------------------------------------------------------------------------- multi-objective

def test_dominated_beyond_margin():
    right, wrong = ex(range(8), [1] * 8), ex(range(8), [0] * 8)
    seven = ex(range(8), [1] * 7 + [0])
    w = {"a": 1}
    cand = {"a": wrong}
    # Better by far and no worse on every cost (equal costs allowed): dominated.
    assert dominated_beyond_margin(cand, (100.0, 2.0), [({"a": right}, (100.0, 2.0))], w, 0.9)
    assert dominated_beyond_margin(cand, (100.0,), [({"a": right}, (50.0,))], w, 0.9)
    # Better, but more expensive on one cost: not dominated.
    assert not dominated_beyond_margin(cand, (100.0, 2.0), [({"a": right}, (50.0, 2.5))], w, 0.9)
    # Cheaper, but only as good: not dominated.
    assert not dominated_beyond_margin(cand, (100.0,), [({"a": wrong}, (10.0,))], w, 0.9)
    # Cheaper and slightly better, within the margin (7/8 vs 8/8): not dominated.
    assert not dominated_beyond_margin({"a": seven}, (100.0,), [({"a": right}, (10.0,))], w, 0.9)
    # One member of several suffices; an empty front dominates nothing.
    front = [({"a": wrong}, (1.0,)), ({"a": right}, (500.0,)), ({"a": right}, (90.0,))]
    assert dominated_beyond_margin(cand, (100.0,), front, w, 0.9)
    assert not dominated_beyond_margin(cand, (100.0,), front[:2], w, 0.9)
    assert not dominated_beyond_margin(cand, (100.0,), [], w, 0.9)
    # The margin is paired over shared items: the member scored on all 8, the candidate on 4.
    part = ex([0, 2, 4, 6], [0, 0, 0, 0])
    assert dominated_beyond_margin({"a": part}, (100.0,), [({"a": right}, (100.0,))], w, 0.9)
    with pytest.raises(ValueError, match="cost tuples"):
        dominated_beyond_margin(cand, (100.0, 1.0), [({"a": right}, (1.0,))], w, 0.9)


def test_rate_upper_bound_matches_the_clopper_pearson_closed_forms():
    from search.fitness.staged import rate_upper_bound

    # 0 of n: P(Bin(n, p) = 0) = (1 - p)^n = 0.05  ->  p = 1 - 0.05^(1/n)
    assert rate_upper_bound(0, 30) == pytest.approx(1 - 0.05 ** (1 / 30), abs=1e-9)
    # n - 1 of n: 1 - p^n = 0.05  ->  p = 0.95^(1/n)
    assert rate_upper_bound(4, 5) == pytest.approx(0.95 ** (1 / 5), abs=1e-9)
    assert rate_upper_bound(5, 5) == 1.0 and math.isnan(rate_upper_bound(0, 0))
    # in general the beta quantile: the upper end of the one-sided interval for k of n
    for k, n in ((4, 184), (1, 3), (9, 290)):
        assert rate_upper_bound(k, n) == pytest.approx(stats.beta.ppf(0.95, k + 1, n - k), abs=1e-9)
