"""mergekit's other merge methods in evofuse (`evolve.merge_methods_extra`, `..._geometric`).

mergekit 0.1.5 is run in process on tiny Llama directories (a base and three noisy copies),
and the same YAML through `evofuse merge` (the CLI's entry point, in process):

* every deterministic method and setting agrees with mergekit to <= 1e-6 max |diff| in fp32;
* DELLA's random drops (`della`, `della_linear`, density < 1) cannot match mergekit's unseeded
  `torch.bernoulli` masks (mergekit is seeded here only to make the test reproducible), so
  they are checked for the same distribution: per tensor, the kept fractions of the two agree
  within the binomial spread of their difference; over the model, the kept fraction in each
  quarter of the within-row magnitude ranks is the one MAGPRUNE prescribes, for both; and both
  rescale the kept entries by the same factor, `L1(tau) / L1(kept tau)`. At density 1 both are
  deterministic and equal to mergekit's (in the parity cases);
* every new method is accepted as an Evolver seed (`evolve.registry.validate_recipe`).
"""
from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
import yaml

mergekit = pytest.importorskip(
    "mergekit", reason="mergekit is not installed: `.venv/bin/pip install mergekit==0.1.5` to run the parity tests"
)

from safetensors.torch import load_file  # noqa: E402

from evolve.materialize import materialize_tensor  # noqa: E402
from evolve.merge_methods_extra import breadcrumbs_prune, della_prune, sce  # noqa: E402
from evolve.merge_methods_geometric import karcher, multislerp  # noqa: E402
from evolve.recipe import Recipe, RecipeError  # noqa: E402
from evolve.registry import merge_method_names, validate_recipe  # noqa: E402

TOLERANCE = 1e-6
NEW_METHODS = ("della", "della_linear", "breadcrumbs", "breadcrumbs_ties", "model_stock", "nuslerp",
               "multislerp", "karcher", "sce", "nearswap", "arcee_fusion")
SIGMAS = 5  # binomial tolerance: |z| > 5 has probability 6e-7 per comparison


def noisy_fine_tunes():
    """(label, model): a tiny base and three 'fine-tunes' (the base plus seeded noise)."""
    from search.models.tiny import tiny_llama

    for label, seed, scale in (("base", None, 0), ("a", 11, 0.02), ("b", 12, 0.03), ("c", 13, 0.015)):
        model = tiny_llama(seed=0)
        if seed is not None:
            g = torch.Generator().manual_seed(seed)
            with torch.no_grad():
                for p in model.parameters():
                    p.add_(scale * torch.randn(p.shape, generator=g))
        yield label, model


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict[str, Path]:
    """A tiny base and three 'fine-tunes' (base + seeded noise), saved as HF directories."""
    from search.models.tiny import byte_tokenizer

    root = tmp_path_factory.mktemp("method_models")
    tokenizer = byte_tokenizer()
    paths = {}
    for label, model in noisy_fine_tunes():
        paths[label] = root / label
        model.save_pretrained(paths[label])
        tokenizer.save_pretrained(paths[label])
    return paths


def _load(directory: Path) -> dict[str, torch.Tensor]:
    state = {}
    for f in sorted(directory.glob("*.safetensors")):
        state.update(load_file(str(f)))
    return state


def _merge_both(config: dict, tmp_path: Path) -> tuple[dict, dict]:
    """(evofuse's, mergekit's) merged state dicts for one YAML config."""
    from mergekit.config import MergeConfiguration
    from mergekit.merge import MergeOptions
    from mergekit.merge import run_merge as mergekit_run

    from search.cli import main

    path = tmp_path / "merge.yml"
    path.write_text(yaml.safe_dump(config))
    assert main(["merge", str(path), str(tmp_path / "evofuse"), "--quiet"]) == 0  # `evofuse merge`
    torch.manual_seed(0)  # mergekit's random drops use the global RNG: seeded for reproducibility
    mergekit_run(MergeConfiguration.model_validate(config), str(tmp_path / "mergekit"),
                 MergeOptions(quiet=True, write_model_card=False, copy_tokenizer=False))
    return _load(tmp_path / "evofuse"), _load(tmp_path / "mergekit")


from test_mergekit_parity import _models, _worst  # noqa: E402  (the parity suite's comparison helpers)


def _config(method, paths, *entries, base="base", **top):
    config = {"merge_method": method, "models": _models(paths, *entries), **top}
    if base is not None:
        config["base_model"] = str(paths[base])
    return config


CASES = {
    "della_density_1": lambda p: _config(
        "della", p, ("a", {"weight": 0.6}), ("b", {"weight": 0.4}), ("c", {"weight": [0.2, 0.9]}),
        parameters={"density": 1.0, "lambda": 0.9}),
    "della_linear_density_1_normalized": lambda p: _config(
        "della_linear", p, ("a", {"weight": 0.6, "density": 1.0}), ("b", {"weight": 0.3, "density": 1.0}),
        parameters={"normalize": True, "epsilon": 0.05}),
    "breadcrumbs": lambda p: _config(
        "breadcrumbs", p, ("a", {"weight": 0.5, "density": 0.7, "gamma": 0.05}),
        ("b", {"weight": 0.8, "density": [0.4, 0.9]}), parameters={"gamma": 0.1}),
    "breadcrumbs_rescaled_few_outliers": lambda p: _config(  # density + gamma > 1: fewer outliers go
        "breadcrumbs", p, ("a", {"weight": 0.7}), ("c", {"weight": 0.5}),
        parameters={"density": 0.9, "gamma": 0.2, "rescale": True, "normalize": True}),
    "breadcrumbs_ties": lambda p: _config(
        "breadcrumbs_ties", p, ("a", {"weight": [{"filter": "self_attn", "value": 0.9}, {"value": 0.3}]}),
        ("b", {"weight": 0.6, "density": 0.3}), ("c", {"weight": -0.4, "gamma": 0.0}),
        parameters={"density": 0.5, "gamma": 0.02, "lambda": 1.2}),
    "sce_select": lambda p: _config(
        "sce", p, ("a", None), ("b", None), ("c", None), parameters={"select_topk": 0.4}),
    "sce_all": lambda p: _config("sce", p, ("base", None), ("a", None), ("b", None)),
    "nearswap": lambda p: _config("nearswap", p, ("base", None), ("a", None), parameters={"t": 0.01}),
    "nearswap_gradient": lambda p: _config("nearswap", p, ("b", None), parameters={"t": [0.001, 0.05]}),
    "arcee_fusion": lambda p: _config("arcee_fusion", p, ("base", None), ("b", None)),
    "model_stock": lambda p: _config("model_stock", p, ("a", None), ("b", None), ("c", None)),
    "model_stock_filter_wise": lambda p: _config(
        "model_stock", p, ("base", None), ("a", None), ("c", None), parameters={"filter_wise": True}),
    "nuslerp": lambda p: _config("nuslerp", p, ("a", {"weight": 0.3}), ("b", {"weight": 0.7})),
    "nuslerp_rows": lambda p: _config(
        "nuslerp", p, ("a", {"weight": [0.2, 0.8]}), ("c", {"weight": 0.5}), parameters={"nuslerp_flatten": False}),
    "nuslerp_row_wise": lambda p: _config(
        "nuslerp", p, ("b", {"weight": 1.0}), ("c", {"weight": 2.0}),
        parameters={"nuslerp_flatten": False, "nuslerp_row_wise": True}),
    "multislerp": lambda p: _config(
        "multislerp", p, ("a", {"weight": 0.5}), ("b", {"weight": 0.2}), ("c", {"weight": [0.1, 0.6]})),
    "multislerp_raw_weights": lambda p: _config(
        "multislerp", p, ("a", {"weight": 0.3}), ("b", {"weight": 0.5}), parameters={"normalize_weights": False}),
    "karcher": lambda p: _config("karcher", p, ("a", None), ("b", None), ("c", None), base=None),
    "karcher_with_base_few_steps": lambda p: _config(  # the base is one more input, as in mergekit
        "karcher", p, ("a", None), ("b", None), parameters={"max_iter": 3, "tol": 1e-6}),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_same_weights_as_mergekit(case, models, tmp_path):
    ours, theirs = _merge_both(CASES[case](models), tmp_path)
    assert _worst(ours, theirs) <= TOLERANCE
    for label in ("base", "a", "b"):  # and the merge did something: it is none of its inputs
        assert _worst(ours, _load(models[label])) > 1e-4, label


def test_every_new_method_is_a_merge_method_with_a_parity_case():
    assert set(NEW_METHODS) <= set(merge_method_names())
    covered = {CASES[case](dict.fromkeys(("base", "a", "b", "c"), Path("x")))["merge_method"] for case in CASES}
    assert covered == set(NEW_METHODS)


# --- DELLA's random drops: the same distribution as mergekit's --------------------------------


def _row_ranks(delta: torch.Tensor) -> torch.Tensor:
    """Each entry's magnitude rank within its row (dim 1; a 1-D tensor is one row) over n - 1."""
    rows = delta if delta.dim() >= 2 else delta.reshape(1, -1)
    order = rows.abs().argsort(dim=1, stable=True)
    ranks = torch.empty_like(order).scatter_(1, order, torch.arange(rows.shape[1]).expand_as(order))
    return (ranks.double() / (rows.shape[1] - 1)).reshape(delta.shape)


@pytest.mark.parametrize("method", ["della_linear", "della"])
def test_della_drops_like_mergekit_in_distribution(method, models, tmp_path):
    """One model (weight 1): merged - base is the pruned, rescaled task vector itself.

    Kept fraction per tensor: each entry is kept independently with p_i (mean `density`), so
    the kept count K has variance V = sum p_i (1 - p_i) and the difference of two independent
    draws (ours, mergekit's) variance 2 V; we allow 5 standard deviations, 5 sqrt(2 V) / n
    (0.054 for a 64 x 64 tensor at density 0.5 +- 0.2; 39 tensors, so a chance failure has
    probability ~2e-5 were the draws unseeded). The same bound, against the prescribed
    expectation, for the model-wide quarters of the within-row ranks (181k entries; 0.35,
    0.45, 0.55, 0.65 expected, +- 0.011). Measured here: |z| <= 2.03 per tensor; overall kept
    0.5016 (ours) and 0.4982 (mergekit); rescaled entries within 6e-8 of `factor * tau`.
    """
    density, epsilon = 0.5, 0.2
    config = _config(method, models, ("a", {"weight": 1.0}), parameters={"density": density, "epsilon": epsilon})
    ours, theirs = _merge_both(config, tmp_path)
    base, tuned = _load(models["base"]), _load(models["a"])
    quarters = {label: torch.zeros(4, dtype=torch.float64) for label in ("ours", "mergekit")}
    expected, variance, counts = (torch.zeros(4, dtype=torch.float64) for _ in range(3))
    for name in base:
        tau = tuned[name] - base[name]
        probability = density - epsilon + 2 * epsilon * _row_ranks(tau)  # MAGPRUNE's p_i
        n = tau.numel()
        spread = SIGMAS * math.sqrt(2 * float((probability * (1 - probability)).sum())) / n
        bucket = (_row_ranks(tau) * 4).clamp(max=3.999).long().reshape(-1)  # quarter of the ranks
        fractions = {}
        for label, merged in (("ours", ours), ("mergekit", theirs)):
            kept = merged[name] != base[name]  # dropped entries are base + 0 exactly
            fractions[label] = float(kept.double().mean())
            quarters[label] += torch.bincount(bucket, kept.reshape(-1).double(), minlength=4)
            # the same rescaling: the kept entries scaled by L1(tau) / L1(kept tau)
            factor = tau.abs().sum() / (tau * kept).abs().sum()
            assert torch.allclose(merged[name] - base[name], tau * kept * factor, rtol=0, atol=1e-6), (label, name)
        assert abs(fractions["ours"] - fractions["mergekit"]) <= spread, (name, fractions, spread)
        expected += torch.bincount(bucket, probability.reshape(-1), minlength=4)
        variance += torch.bincount(bucket, (probability * (1 - probability)).reshape(-1), minlength=4)
        counts += torch.bincount(bucket, minlength=4).double()
    for label, kept in quarters.items():  # kept fractions ~ 0.35, 0.45, 0.55, 0.65 by quarter
        assert torch.all((kept - expected).abs() <= SIGMAS * variance.sqrt()), (label, kept / counts,
                                                                              expected / counts)


def test_della_masks_are_seeded_and_rescaled():
    g = torch.Generator().manual_seed(5)
    delta = torch.randn(80, 300, generator=g)
    first = della_prune(delta, 0.4, 0.1, seed=7, rescale=True)
    assert torch.equal(first, della_prune(delta, 0.4, 0.1, seed=7, rescale=True))
    assert not torch.equal(first != 0, della_prune(delta, 0.4, 0.1, seed=8, rescale=True) != 0)
    kept = first != 0
    assert torch.allclose(first.abs().sum(), delta.abs().sum())
    assert torch.equal(della_prune(delta, 0.4, 0.1, seed=7, rescale=False), delta * kept)
    assert torch.equal(della_prune(delta, 1.0, 0.1, seed=7, rescale=True), delta)
    assert torch.equal(della_prune(delta, 0.0, 0.1, seed=7, rescale=True), torch.zeros_like(delta))
    small = delta.abs() <= delta.abs().quantile(0.25, dim=1, keepdim=True)  # rows' smallest quarter
    assert kept[small].float().mean() < 0.4 < kept[~small].float().mean()
    with pytest.raises(RecipeError, match="density \\+- epsilon"):
        materialize_tensor(Recipe("della", ("x",), {"weight": 1.0, "density": 0.1}, base="b"),
                           "w", {"x": delta, "b": torch.zeros_like(delta)})


# --- pure-function edge cases -----------------------------------------------------------------


def test_breadcrumbs_window_by_hand():
    delta = torch.tensor([0.1, -5.0, 0.3, -0.2, 0.4, 0.05, 0.25, -0.35, 0.15, 0.45])
    # density 0.5 keeps 5; gamma 0.1 removes the largest (-5); the 4 smallest go
    assert breadcrumbs_prune(delta, 0.5, 0.1, rescale=False).nonzero().reshape(-1).tolist() == [2, 4, 6, 7, 9]
    assert breadcrumbs_prune(delta, 0.5, 0.6, rescale=False).nonzero().reshape(-1).tolist() == [0, 3, 5, 6, 8]
    rescaled = breadcrumbs_prune(delta, 0.5, 0.1, rescale=True)
    assert torch.allclose(rescaled.abs().sum(), delta.abs().sum())


def _mergekit_method(name: str, tensors, base_index, **parameters) -> torch.Tensor:
    from mergekit.merge_methods import get
    from mergekit.merge_methods.base import TensorGroup

    return get(name)((TensorGroup.from_tensors(tensors, base_index=base_index),), parameters=parameters)[0]


def test_equal_magnitudes_are_ranked_as_mergekit_ranks_them():
    """Quantised task vectors (as bf16 checkpoints give): many equal magnitudes straddle the
    cuts of breadcrumbs and SCE; both choose among them as mergekit's sort / topk do."""
    from mergekit.sparsify import magnitude_outliers

    g = torch.Generator().manual_seed(9)
    for shape in ((120, 100), (3000,), (4, 30, 50)):
        delta = torch.randint(-6, 7, shape, generator=g).float() / 8
        for density, gamma in ((0.5, 0.01), (0.3, 0.1), (0.9, 0.2)):
            expected = magnitude_outliers(delta, density, gamma=gamma)
            assert torch.equal(breadcrumbs_prune(delta, density, gamma, rescale=False), expected)
    base = torch.randint(-6, 7, (120, 100), generator=g).float() / 8
    tuned = [base + torch.randint(-3, 4, base.shape, generator=g).float() / 8 for _ in range(3)]
    for fraction in (0.3, 0.5, 0.9):
        expected = _mergekit_method("sce", [base] + tuned, 0, select_topk=fraction)
        assert torch.equal(sce(base, tuned, fraction), expected)


def test_karcher_and_multislerp_corner_cases():
    x = torch.tensor([[1.0, 2.0], [3.0, 4.0]])
    assert torch.equal(karcher([x]), x)
    assert torch.equal(karcher([torch.zeros(3), torch.zeros(3)]), torch.zeros(3))
    e1, e2 = torch.tensor([2.0, 0.0]), torch.tensor([0.0, 4.0])  # orthogonal: the mean is at 45 degrees
    assert torch.allclose(karcher([e1, e2]), 3 * torch.tensor([1.0, 1.0]) / math.sqrt(2), atol=1e-5)
    assert torch.equal(multislerp([x], [1.0]), x)
    assert torch.allclose(multislerp([e1, -e1], [0.5, 0.5]), torch.zeros(2))  # antipodal pair: lerp
    with pytest.raises(RecipeError, match="multislerp"):
        multislerp([e1, -e1, e2 - e2], [1.0, 1.0, 1.0])


# --- Evolver seeds: every method validates as a recipe --------------------------------------

SEEDS = {  # op -> (inputs, params) as `evolver.seeds: [{name, op, params}]` gives them (base = the base)
    "della": (("a", "b", "c"), {"weight": 0.5, "density": 0.6, "epsilon": 0.1}),
    "della_linear": (("a", "b"), {"weight": [0.2, 0.8], "density": 0.5, "per_input": {"b": {"epsilon": 0.3}}}),
    "breadcrumbs": (("a", "b"), {"weight": 0.5, "density": 0.8, "gamma": 0.02}),
    "breadcrumbs_ties": (("a", "b", "c"), {"weight": 1.0, "density": 0.5, "rescale": True}),
    "model_stock": (("a", "b"), {"filter_wise": True}),
    "nuslerp": (("a", "b"), {"weight": 0.5, "nuslerp_flatten": False}),
    "multislerp": (("a", "b", "c"), {"weight": 1.0}),
    "karcher": (("a", "b", "c"), {"max_iter": 20, "tol": "1e-6"}),
    "sce": (("a", "b", "c"), {"select_topk": 0.3}),
    "nearswap": (("a",), {"t": 0.001}),
    "arcee_fusion": (("a",), {}),
}


def test_every_new_method_validates_as_an_evolver_seed():
    assert set(SEEDS) == set(NEW_METHODS)
    for op, (inputs, params) in SEEDS.items():
        validate_recipe(Recipe(op, inputs, params, seed=3, base="base"))


@pytest.mark.parametrize("op, inputs, params, message", [
    ("nearswap", ("a", "b"), {"t": 0.1}, "takes 1 inputs"),
    ("arcee_fusion", ("a", "b"), {}, "takes 1 inputs"),
    ("model_stock", ("a",), {}, "takes 2..n inputs"),
    ("nuslerp", ("a", "b", "c"), {"weight": 1.0}, "takes 2 inputs"),
    ("nuslerp", ("a", "b"), {}, "needs parameter 'weight'"),
    ("nearswap", ("a",), {}, "needs parameter 't'"),
    ("karcher", ("a", "b"), {"max_iter": 2.5}, "'max_iter'.*integer"),
    ("della", ("a",), {"weight": 1.0, "gamma": 0.1}, "unknown parameter 'gamma'"),
    ("sce", ("a",), {"weight": 1.0}, "unknown parameter 'weight'"),
])
def test_seed_recipes_are_checked(op, inputs, params, message):
    with pytest.raises(RecipeError, match=message):
        validate_recipe(Recipe(op, inputs, params, base="base"))


def test_slerp_families_run_without_a_base():
    """Like mergekit's, nuslerp and multislerp take an optional base: without one they
    interpolate the models themselves."""
    validate_recipe(Recipe("nuslerp", ("a", "b"), {"weight": 0.5}))
    validate_recipe(Recipe("multislerp", ("a", "b", "c"), {"weight": 1.0}))
    x, y = torch.randn(4, 3), torch.randn(4, 3)
    from evolve.merge_methods_geometric import nuslerp

    # the function itself takes base=None: the whole-tensor slerp of the two models
    assert torch.allclose(nuslerp([x, y], [1.0, 0.0]), x, atol=1e-6)
    assert torch.allclose(nuslerp([x, y], [0.0, 1.0]), y, atol=1e-6)
