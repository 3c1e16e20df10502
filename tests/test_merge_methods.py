"""Classic merges against hand-computed values (evolve/merge_methods.py)."""
from __future__ import annotations

import math

import pytest
import torch

from evolve.magnitude import kth_largest
from evolve.merge_methods import linear, slerp, task_vector_merge, trim_to_top_magnitude
from evolve.materialize import materialize_tensor
from evolve.recipe import Recipe, RecipeError, derive_seed
from evolve.rng import keep_mask

T = torch.tensor


def test_linear_with_and_without_normalisation():
    x1, x2 = T([1.0, 2.0]), T([3.0, 4.0])
    assert torch.equal(linear([x1, x2], [1.0, 3.0], normalize=True), T([2.5, 3.5]))
    assert torch.equal(linear([x1, x2], [1.0, 3.0], normalize=False), T([10.0, 14.0]))
    with pytest.raises(RecipeError, match="sum to 0"):
        linear([x1, x2], [1.0, -1.0], normalize=True)


def test_task_arithmetic_with_lambda_and_normalise():
    base, x1, x2 = T([1.0, 1.0]), T([2.0, 3.0]), T([0.0, 5.0])
    # tau = [1, 2], [-1, 4]; 0.5 tau1 + 1 tau2 = [-0.5, 5]; lambda 2 -> [-1, 10]; + base
    out = task_vector_merge(base, [x1, x2], [0.5, 1.0], scale=2.0)
    assert torch.allclose(out, T([0.0, 11.0]))
    normed = task_vector_merge(base, [x1, x2], [0.5, 1.0], scale=2.0, normalize=True)
    assert torch.allclose(normed, T([1 - 2 / 3, 1 + 20 / 3]))


def test_ties_trims_elects_sign_by_sum_and_normalises_by_agreeing_weights():
    base = T([1.0, 1.0, 1.0, 1.0])
    x1 = base + T([3.0, -1.0, 0.5, 2.0])  # trimmed to top 2: [3, 0, 0, 2]
    x2 = base + T([-2.0, -3.0, 1.0, 0.2])  # trimmed to top 2: [-2, -3, 0, 0]
    kwargs = dict(densities=[0.5, 0.5], sparsify="magnitude", consensus=True)
    # weights 1, 2: weighted [3,0,0,2], [-4,-6,0,0]; sum [-1,-6,0,2] -> signs [-,-,+,+]
    # agreeing: x2 on coords 0, 1; x1 on coord 3; nothing on coord 2 (divisor 0 -> 1)
    plain = task_vector_merge(base, [x1, x2], [1.0, 2.0], normalize=False, **kwargs)
    assert torch.allclose(plain, base + T([-4.0, -6.0, 0.0, 2.0]))
    normed = task_vector_merge(base, [x1, x2], [1.0, 2.0], normalize=True, **kwargs)
    assert torch.allclose(normed, base + T([-2.0, -3.0, 0.0, 2.0]))
    halved = task_vector_merge(base, [x1, x2], [1.0, 2.0], normalize=True, scale=0.5, **kwargs)
    assert torch.allclose(halved, base + 0.5 * T([-2.0, -3.0, 0.0, 2.0]))
    # equal weights: sum [1,-3,0,2] -> [+,-,+,+]; x1 wins coord 0, x2 coord 1
    equal = task_vector_merge(base, [x1, x2], [1.0, 1.0], normalize=True, **kwargs)
    assert torch.allclose(equal, base + T([3.0, -3.0, 0.0, 2.0]))


def test_trim_keeps_exactly_k_largest_magnitudes():
    g = torch.Generator().manual_seed(0)
    delta = torch.randn(300, 200, generator=g)  # 60000 > the sampled path's threshold
    kept = trim_to_top_magnitude(delta.clone(), 0.3)
    k = int(0.3 * delta.numel())
    assert int((kept != 0).sum()) == k
    threshold = delta.abs().flatten().sort(descending=True).values[k - 1]
    assert torch.equal(kept != 0, delta.abs() >= threshold)
    assert torch.equal(kept[kept != 0], delta[kept != 0])
    assert int((trim_to_top_magnitude(T([0.1, -0.2, 0.3]), 0.01) != 0).sum()) == 1  # at least one
    assert torch.equal(trim_to_top_magnitude(T([0.1, -0.2]), 1.0), T([0.1, -0.2]))


def test_kth_largest_with_many_ties_and_both_paths():
    g = torch.Generator().manual_seed(1)
    for n in (100, 50_000):
        values = torch.randint(0, 50, (n,), generator=g).float()  # heavy ties
        ordered = values.sort(descending=True).values
        for k in (1, n // 3, n // 2, n - 1, n):
            assert kth_largest(values.numpy(), k) == ordered[k - 1]
        smooth = torch.randn(n, generator=g)
        ordered = smooth.sort(descending=True).values
        for k in (1, 7, n // 10, n // 2, n - 3, n):
            assert kth_largest(smooth.numpy(), k) == ordered[k - 1]
    values = torch.randint(0, 7, (50_000,), generator=g).float()
    kept = trim_to_top_magnitude(values.clone(), 0.5)
    assert int((kept != 0).sum()) == 25_000  # ties at the threshold resolved to exactly k


def test_dare_at_density_one_equals_its_twin():
    g = torch.Generator().manual_seed(2)
    base, x1, x2 = (torch.randn(40, 30, generator=g) for _ in range(3))
    for op, twin in (("dare_linear", "task_arithmetic"), ("dare_ties", "ties")):
        params = {"weight": 0.6, "density": 1.0, "lambda": 0.9}
        if twin == "task_arithmetic":
            del params["density"]
        a = materialize_tensor(Recipe(op, ("x1", "x2"), {"weight": 0.6, "density": 1.0, "lambda": 0.9}, 5, "b"),
                               "w", {"x1": x1, "x2": x2, "b": base})
        b = materialize_tensor(Recipe(twin, ("x1", "x2"), params, 5, "b"), "w", {"x1": x1, "x2": x2, "b": base})
        if op == "dare_ties":  # dare_ties does not normalise by default, ties does
            b = materialize_tensor(Recipe(twin, ("x1", "x2"), {**params, "normalize": False}, 5, "b"),
                                   "w", {"x1": x1, "x2": x2, "b": base})
        assert torch.equal(a, b), op


def test_dare_drops_with_seeded_masks_and_rescales():
    g = torch.Generator().manual_seed(3)
    base, x1, x2 = (torch.randn(200, 100, generator=g) for _ in range(3))
    recipe = Recipe("dare_linear", ("x1", "x2"), {"weight": [0.5], "density": 0.4}, seed=8, base="b")
    tensors = {"x1": x1, "x2": x2, "b": base}
    out = materialize_tensor(recipe, "layer.w", tensors)
    assert torch.equal(out, materialize_tensor(recipe, "layer.w", tensors))
    assert not torch.equal(out, materialize_tensor(Recipe("dare_linear", ("x1", "x2"),
                                                          {"weight": 0.5, "density": 0.4}, 9, "b"),
                                                   "layer.w", tensors))
    tensor_seed = derive_seed(8, "layer.w")
    expected = base.clone()
    for input_id, x in (("x1", x1), ("x2", x2)):
        mask = keep_mask(derive_seed(tensor_seed, input_id), x.shape, 0.4)
        tau = x - base  # kept entries rescaled to tau's L1 norm (mergekit's DARE rescaling)
        expected += 0.5 * tau * mask * (tau.abs().sum() / (tau * mask).abs().sum())
    assert torch.allclose(out, expected, atol=1e-6)
    # statistically: the dropped-and-rescaled sum has the full sum's mean and ~40% survivors
    full = 0.5 * ((x1 - base) + (x2 - base))
    assert abs(((out - base) - full).mean().item()) < 0.02
    dropped = (out - base) == 0
    assert abs(dropped.float().mean().item() - 0.6**2) < 0.02  # both inputs dropped


def test_slerp_endpoints_midpoint_and_colinear_fallback():
    g = torch.Generator().manual_seed(4)
    v0, v1 = torch.randn(20, 10, generator=g), torch.randn(20, 10, generator=g)
    assert torch.equal(slerp(v0, v1, 0.0), v0)
    assert torch.equal(slerp(v0, v1, 1.0), v1)
    e1, e2 = T([2.0, 0.0]), T([0.0, 3.0])
    half = math.sqrt(0.5)
    assert torch.allclose(slerp(e1, e2, 0.5), T([2 * half, 3 * half]))
    assert torch.allclose(slerp(e1, e2, 1 / 3), T([2 * math.cos(math.pi / 6), 3 * math.sin(math.pi / 6)]))
    colinear = 2.5 * v0
    assert torch.allclose(slerp(v0, colinear, 0.3), 0.7 * v0 + 0.3 * colinear)
    # through a recipe: base is the t = 0 end
    recipe = Recipe("slerp", ("b", "x"), {"t": 0.0}, base="b")
    assert torch.equal(materialize_tensor(recipe, "w", {"b": v0, "x": v1}), v0)


def test_per_input_and_per_tensor_parameters_in_a_merge_recipe():
    x1, x2 = T([1.0, 1.0]), T([3.0, 5.0])
    recipe = Recipe("linear", ("a", "b"), {
        "weight": 1.0,
        "normalize": True,
        "num_layers": 3,
        "per_input": {"b": {"weight": [{"filter": "mlp", "value": 3.0}, {"value": [0.0, 2.0]}]}},
    })
    mlp = materialize_tensor(recipe, "model.layers.0.mlp.w", {"a": x1, "b": x2})
    assert torch.equal(mlp, (x1 + 3 * x2) / 4)
    first_attn = materialize_tensor(recipe, "model.layers.0.attn.w", {"a": x1, "b": x2})  # t = 0 -> 0
    assert torch.equal(first_attn, x1)
    last_attn = materialize_tensor(recipe, "model.layers.2.attn.w", {"a": x1, "b": x2})  # t = 1 -> 2
    assert torch.equal(last_attn, (x1 + 2 * x2) / 3)


def test_merges_keep_inputs_and_dtype():
    base, x1 = T([1.0, 2.0], dtype=torch.bfloat16), T([3.0, 2.0], dtype=torch.bfloat16)
    keep = (base.clone(), x1.clone())
    out = materialize_tensor(Recipe("ties", ("x",), {"weight": 1.0, "density": 0.5}, base="b"),
                             "w", {"x": x1, "b": base})
    assert out.dtype == torch.bfloat16 and torch.equal(out, T([3.0, 2.0], dtype=torch.bfloat16))
    assert torch.equal(base, keep[0]) and torch.equal(x1, keep[1])


def _reference_ties(base, tensors, weights, densities, normalize, scale, mergekit_order=False):
    """TIES written the direct way (whole tensors, sort-based trim keeping, among equal
    magnitudes, the lowest indices or whichever mergekit's unstable argsort keeps, stacked
    sign election) to check the chunked, branch-free implementation."""
    deltas = []
    for x, w, d in zip(tensors, weights, densities):
        tau = (x - base).reshape(-1)
        k = max(1, int(d * tau.numel()))
        order = (torch.argsort(tau.abs(), descending=True) if mergekit_order  # mergekit's selection
                 else torch.sort(tau.abs(), descending=True, stable=True).indices)[:k]
        trimmed = torch.zeros_like(tau)
        trimmed[order] = tau[order]
        deltas.append(trimmed * w)
    stacked = torch.stack(deltas)  # (N, n)
    majority = torch.where(stacked.sum(0) >= 0, 1.0, -1.0)
    agree = stacked.sign() == majority
    mixed = (stacked * agree).sum(0)
    if normalize:
        divisor = (torch.tensor(weights)[:, None] * agree).sum(0)
        divisor[divisor == 0] = 1
        mixed = mixed / divisor
    return (base.reshape(-1) + scale * mixed).reshape(base.shape)


@pytest.mark.parametrize("chunk", [7, 1000, 1 << 16])
def test_chunked_ties_matches_the_direct_definition_even_with_ties(chunk):
    g = torch.Generator().manual_seed(6)
    base = torch.randn(120, 100, generator=g)
    # quantised task vectors: many equal magnitudes straddle every threshold
    tensors = [base + torch.randint(-4, 5, base.shape, generator=g).float() / 8 for _ in range(3)]
    weights, densities = [0.5, -0.3, 0.8], [0.3, 0.5, 0.9]
    for normalize, mergekit_order in ((True, False), (False, False), (True, True), (False, True)):
        ours = task_vector_merge(base, tensors, weights, densities=densities, sparsify="magnitude",
                                 consensus=True, normalize=normalize, scale=0.9, chunk=chunk,
                                 mergekit_order=mergekit_order)
        expected = _reference_ties(base, tensors, weights, densities, normalize, 0.9, mergekit_order)
        assert torch.allclose(ours, expected, atol=1e-6)
