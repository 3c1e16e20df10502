"""Evolver operators, recipes and seeded draws (evolve/recipe.py, evolve/rng.py, evolve/steps.py,
evolve/registry.py, evolve/materialize.py)."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from evolve.materialize import is_excluded, materialize, materialize_tensor
from evolve.registry import validate_recipe
from evolve.steps import de_rand_1_step, evolver_step
from evolve.recipe import Recipe, RecipeError, derive_seed, layer_fraction, resolve_setting
from evolve.rng import CHUNK_DRAWS, draw_threshold, keep_mask, uniform16_chunks


def _pair(shape=(300, 70), seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=g), torch.randn(shape, generator=g)


# --- seeds and draws ----------------------------------------------------------------------


def test_derive_seed_is_a_fixed_function_and_separates_parts():
    # fixed values: the same in every process and platform (no use of Python's salted hash());
    # if this changes, every recorded recipe replays differently
    assert derive_seed(7, "cand-3", "model.layers.0.mlp.up_proj.weight") == 4556122506385783071
    assert derive_seed(0) == 4517149112608553758
    assert derive_seed("ab", "c") != derive_seed("a", "bc")
    assert derive_seed(1) != derive_seed("1")
    with pytest.raises(TypeError):
        derive_seed(1.5)


def test_draw_stream_does_not_depend_on_chunking():
    whole = np.concatenate(list(uniform16_chunks(5, 10_001, chunk=16_384)))
    pieces = np.concatenate(list(uniform16_chunks(5, 10_001, chunk=1_000)))
    assert whole.dtype == np.uint16 and whole.shape == (10_001,)
    assert np.array_equal(whole, pieces)
    # the stream is PCG64DXSM's raw words, little-endian, four draws per word
    words = np.random.PCG64DXSM(5).random_raw(3)
    assert np.array_equal(whole[:12], words.astype("<u8").view("<u2"))


def test_keep_mask_rate_and_exact_ends():
    mask = keep_mask(11, (400, 500), 0.3)
    assert mask.dtype == torch.bool and mask.shape == (400, 500)
    assert abs(mask.float().mean().item() - 0.3) < 0.005
    assert keep_mask(11, (7, 9), 1.0).all() and not keep_mask(11, (7, 9), 0.0).any()
    assert torch.equal(mask, keep_mask(11, (400, 500), 0.3))
    assert not torch.equal(mask, keep_mask(12, (400, 500), 0.3))
    assert draw_threshold(0.5) == 32768
    with pytest.raises(ValueError):
        draw_threshold(1.5)


# --- the Evolver step ---------------------------------------------------------------------


def test_F_zero_returns_the_parent_bit_exactly():
    x, ref = _pair()
    assert torch.equal(evolver_step(x, ref, F=0.0, CR=0.7, seed=1), x)


def test_CR_one_returns_the_mutant_and_CR_zero_the_parent():
    x, ref = _pair()
    mutant = (1 - 0.3) * x + 0.3 * ref
    out = evolver_step(x, ref, F=0.3, CR=1.0, seed=1)
    assert torch.equal(out, torch.lerp(x, ref, 0.3))
    assert torch.allclose(out, mutant, atol=1e-6)
    assert torch.equal(evolver_step(x, ref, F=0.3, CR=0.0, seed=1), x)


def test_crossover_takes_each_coordinate_from_mutant_or_parent_at_rate_CR():
    x, ref = _pair((1200, 1000))  # > one chunk of draws, so chunk boundaries are crossed
    assert x.numel() > CHUNK_DRAWS
    out = evolver_step(x, ref, F=1.0, CR=0.25, seed=3)
    from_ref, from_x = out == ref, out == x
    assert torch.all(from_ref | from_x)
    assert abs(from_ref.float().mean().item() - 0.25) < 0.005
    # the mask is exactly keep_mask(seed, shape, CR): the same draws a CUDA actor makes
    assert torch.equal(from_ref, keep_mask(3, x.shape, 0.25))
    assert torch.equal(out, evolver_step(x, ref, F=1.0, CR=0.25, seed=3))
    assert not torch.equal(out, evolver_step(x, ref, F=1.0, CR=0.25, seed=4))


def test_de_rand_1_mutant_and_crossover():
    g = torch.Generator().manual_seed(2)
    target, r1, r2, r3 = (torch.randn(50, 40, generator=g) for _ in range(4))
    out = de_rand_1_step(target, r1, r2, r3, F=0.8, CR=1.0, seed=0)
    assert torch.allclose(out, r1 + 0.8 * (r2 - r3), atol=1e-6)
    assert torch.equal(de_rand_1_step(target, r1, r2, r3, F=0.0, CR=1.0, seed=0), r1)
    half = de_rand_1_step(target, r1, r2, r3, F=0.8, CR=0.5, seed=9)
    taken = keep_mask(9, target.shape, 0.5)
    assert torch.equal(half[~taken], target[~taken])
    assert torch.equal(half[taken], out[taken])


def test_inputs_are_never_written_and_read_only_arrays_work():
    x, ref = _pair()
    x_np, ref_np = x.numpy().copy(), ref.numpy().copy()
    x_np.flags.writeable = False
    ref_np.flags.writeable = False
    with pytest.warns(UserWarning):  # torch warns about non-writable arrays; we only read them
        x_ro, ref_ro = torch.from_numpy(x_np), torch.from_numpy(ref_np)
    recipe = Recipe("evolver", ("x", "ref"), {"F": 0.5, "CR": 0.5}, seed=4)
    out = materialize_tensor(recipe, "w", {"x": x_ro, "ref": ref_ro})
    assert np.array_equal(x_np, x.numpy()) and np.array_equal(ref_np, ref.numpy())
    assert torch.equal(out, evolver_step(x, ref, 0.5, 0.5, derive_seed(4, "w")))


def test_materialize_tensor_writes_into_out_of_another_dtype():
    x, ref = _pair()
    recipe = Recipe("evolver", ("x", "ref"), {"F": 0.5, "CR": 0.5}, seed=4)
    expected = materialize_tensor(recipe, "w", {"x": x, "ref": ref})
    out = torch.empty(x.shape, dtype=torch.bfloat16)
    returned = materialize_tensor(recipe, "w", {"x": x, "ref": ref}, out=out)
    assert returned is out and torch.equal(out, expected.to(torch.bfloat16))
    fp32_out = torch.full_like(x, float("nan"))
    materialize_tensor(recipe, "w", {"x": x, "ref": ref}, out=fp32_out)
    assert torch.equal(fp32_out, expected)
    # bf16 parents: computed in fp32, F = 0 still gives the parent exactly
    x16, ref16 = x.to(torch.bfloat16), ref.to(torch.bfloat16)
    zero = Recipe("evolver", ("x", "ref"), {"F": 0.0, "CR": 0.5}, seed=4)
    assert torch.equal(materialize_tensor(zero, "w", {"x": x16, "ref": ref16}), x16)


# --- whole weight sets ------------------------------------------------------------------


@pytest.fixture()
def parents():
    from search.models.tiny import tiny_llama

    sets = {}
    for i, seed in enumerate((0, 1, 2, 3)):
        sets[f"p{i}"] = {k: v.detach().clone() for k, v in tiny_llama(seed=seed).state_dict().items()}
    return sets


def test_materialize_is_tensor_by_tensor_deterministic_and_respects_exclude(parents):
    names = sorted(parents["p0"])
    recipe = Recipe("evolver", ("p0", "p1"), {"F": 0.5, "CR": 0.5}, seed=21)
    exclude = ["*lm_head*", "re:layers\\.0\\."]
    first = materialize(recipe, parents, names, exclude=exclude)
    again = materialize(recipe, parents, names, exclude=exclude)
    assert all(torch.equal(first[n], again[n]) for n in names)
    for name in names:
        if is_excluded(name, exclude):
            assert torch.equal(first[name], parents["p0"][name]), name
        elif not torch.equal(parents["p0"][name], parents["p1"][name]):  # norms are all ones in both
            assert not torch.equal(first[name], parents["p0"][name]), name
    assert is_excluded("lm_head.weight", exclude) and is_excluded("model.layers.0.mlp.up_proj.weight", exclude)
    # a tensor depends only on (seed, name): materialising one name alone gives the same values
    one = "model.layers.2.self_attn.q_proj.weight"
    alone = materialize(recipe, parents, [one])
    assert torch.equal(alone[one], first[one])
    # parents untouched
    from search.models.tiny import tiny_llama

    assert torch.equal(parents["p0"][one], tiny_llama(seed=0).state_dict()[one])


def test_materialize_overwrites_a_model_in_place(parents):
    from search.models.tiny import tiny_llama

    model = tiny_llama(seed=9)
    params = dict(model.named_parameters())
    before = {n: p.data_ptr() for n, p in params.items()}
    recipe = Recipe("evolver", ("p0", "p1"), {"F": 0.0, "CR": 0.5}, seed=1)
    with torch.no_grad():
        materialize(recipe, parents, list(params), out={n: p.data for n, p in params.items()})
    assert all(p.data_ptr() == before[n] for n, p in model.named_parameters())
    assert all(torch.equal(p, parents["p0"][n]) for n, p in model.named_parameters())


def test_de_rand_1_recipe_over_weight_sets(parents):
    names = sorted(parents["p0"])
    recipe = Recipe("de_rand_1", ("p0", "p1", "p2", "p3"), {"F": 0.5, "CR": 1.0}, seed=0)
    out = materialize(recipe, parents, names)
    for n in names[:3]:
        expected = parents["p1"][n] + 0.5 * (parents["p2"][n] - parents["p3"][n])
        assert torch.allclose(out[n], expected, atol=1e-6)


# --- recipes ----------------------------------------------------------------------------


def test_recipe_round_trip_and_input_ids():
    recipe = Recipe("ties", ("a", "b"), {"weight": 0.5, "density": [0.2, 0.8], "num_layers": 4,
                                          "per_input": {"a": {"weight": 1.0}}}, seed=3, base="base")
    again = Recipe.from_dict(json.loads(json.dumps(recipe.to_dict())))
    assert again == recipe and again.fingerprint() == recipe.fingerprint()
    assert recipe.input_ids() == ("a", "b", "base")
    assert Recipe("linear", ("a", "b")).input_ids() == ("a", "b")
    validate_recipe(recipe)


@pytest.mark.parametrize("recipe, message", [
    (Recipe("avg", ("a",)), "unknown op 'avg'; valid: arcee_fusion, breadcrumbs, breadcrumbs_ties, copy, dare_linear"),
    (Recipe("ties", ("a", "b"), {"density": 0.5}, base="c"), "needs parameter 'weight'"),
    (Recipe("ties", ("a", "b"), {"weight": 1.0}), "needs recipe field 'base'"),
    (Recipe("evolver", ("a",)), "takes 2 inputs"),
    (Recipe("evolver", ("a", "b"), {"F": 0.5, "G": 1}), "unknown parameter 'G' for op 'evolver'; valid: CR, F"),
    (Recipe("ties", ("a", "b"), {"weight": 1, "per_input": {"a": {"lambda": 2}}}, base="c"), "shared by all inputs"),
    (Recipe("linear", ("a", "b"), {"weight": 1, "per_input": {"z": {"weight": 2}}}), "not an input"),
    (Recipe("evolver", ("a", "b"), {"F": 0.5, "CR": 1.5}), "parameter 'CR' in params of op 'evolver': must be in [0, 1]"),
    (Recipe("linear", ("a", "b"), {"weight": 1, "normalize": "maybe"}), "parameter 'normalize' in params"),
])
def test_bad_recipes_raise_one_line(recipe, message):
    with pytest.raises(RecipeError) as info:
        validate_recipe(recipe)
    assert message in str(info.value) and "\n" not in str(info.value)


def test_recipe_from_dict_rejects_unknown_fields():
    with pytest.raises(RecipeError, match="unknown recipe field 'weights'"):
        Recipe.from_dict({"op": "linear", "inputs": ["a"], "weights": [1]})
    with pytest.raises(RecipeError, match="'inputs' is missing"):
        Recipe.from_dict({"op": "linear"})


def test_bad_parameter_values_name_the_parameter():
    x, ref = _pair((4, 4))
    recipe = Recipe("evolver", ("x", "ref"), {"F": 0.5, "CR": 1.5})
    with pytest.raises(RecipeError, match="parameter 'CR'.*must be in"):
        materialize_tensor(recipe, "w", {"x": x, "ref": ref})


def test_settings_follow_mergekit_gradients_and_filters():
    def never():
        raise AssertionError("t not needed")

    assert resolve_setting(0.5, "x", never, float) == 0.5
    # gradient [0, 1, 0.5] at t = 0.75: scaled 1.5 -> halfway between 1 and 0.5
    assert resolve_setting([0, 1, 0.5], "x", lambda: 0.75, float) == pytest.approx(0.75)
    conditional = [{"filter": "self_attn", "value": 0.2}, {"filter": "mlp", "value": [0, 1]}, {"value": 0.9}]
    assert resolve_setting(conditional, "model.layers.1.self_attn.q_proj.weight", never, float) == 0.2
    assert resolve_setting(conditional, "model.layers.1.mlp.up_proj.weight", lambda: 0.25, float) == 0.25
    assert resolve_setting(conditional, "model.norm.weight", never, float) == 0.9
    assert resolve_setting([{"filter": "mlp", "value": 1}], "model.norm.weight", never, float) is None
    assert layer_fraction("model.layers.3.mlp.up_proj.weight", 4) == 1.0
    assert layer_fraction("model.layers.1.mlp.up_proj.weight", 4) == pytest.approx(1 / 3)
    assert layer_fraction("model.embed_tokens.weight", 4) == 0.0
    with pytest.raises(RecipeError, match="num_layers"):
        layer_fraction("model.layers.1.mlp.up_proj.weight", None)


def test_per_tensor_overrides_reach_the_operator():
    x, ref = _pair((8, 8))
    recipe = Recipe("evolver", ("x", "ref"),
                    {"F": [{"filter": "mlp", "value": 0.0}, {"value": 1.0}], "CR": 1.0})
    assert torch.equal(materialize_tensor(recipe, "model.layers.0.mlp.w", {"x": x, "ref": ref}), x)
    assert torch.equal(materialize_tensor(recipe, "model.layers.0.attn.w", {"x": x, "ref": ref}), ref)
    graded = Recipe("evolver", ("x", "ref"), {"F": [0.0, 1.0], "CR": 1.0, "num_layers": 3})
    assert torch.equal(materialize_tensor(graded, "model.layers.0.mlp.w", {"x": x, "ref": ref}), x)
    assert torch.equal(materialize_tensor(graded, "model.layers.2.mlp.w", {"x": x, "ref": ref}), ref)
    middle = materialize_tensor(graded, "model.layers.1.mlp.w", {"x": x, "ref": ref})
    assert torch.equal(middle, torch.lerp(x, ref, 0.5))


def test_offspring_can_overwrite_its_target_in_place():
    x, ref = _pair((1100, 1000))
    expected = evolver_step(x, ref, F=0.7, CR=0.4, seed=5)
    same = x.clone()
    assert evolver_step(same, ref, F=0.7, CR=0.4, seed=5, out=same) is same
    assert torch.equal(same, expected)


def test_population_merge_and_seed_recipes(parents):
    from evolve.population import population_merge_recipe, seed_recipes

    names = sorted(parents["p0"])
    average = population_merge_recipe(["p1", "p2", "p3"])
    merged = materialize(average, parents, names)
    for n in names[:4]:
        expected = (parents["p1"][n] + parents["p2"][n] + parents["p3"][n]) / 3
        assert torch.allclose(merged[n], expected, atol=1e-6)
    seeds = seed_recipes(["p1", "p2", "p3"], base="p0", seed=5)
    assert [r.op for r in seeds] == ["linear", "task_arithmetic", "ties", "dare_ties", "slerp"]
    for recipe in seeds:
        out = materialize(recipe, parents, names[:3])
        assert all(torch.isfinite(t).all() for t in out.values())


# --- the registry: one-way imports, rules declared with each operator ----------------------


def test_registry_imports_no_operator_module_and_evolve_has_no_import_cycle():
    import ast
    import subprocess
    import sys
    from pathlib import Path

    code = ("import sys, evolve.registry as r; "
            "assert not {'evolve.merge_methods', 'evolve.steps'} & set(sys.modules); "
            "print(','.join(r.registered_operators()))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          cwd=Path(__file__).resolve().parents[1])
    assert done.returncode == 0, done.stderr
    assert set(done.stdout.strip().split(",")) >= {"linear", "ties", "slerp", "evolver", "de_rand_1", "copy"}
    package = Path(__file__).resolve().parents[1] / "evolve"
    graph = {}
    for path in package.glob("*.py"):
        imported = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom):
                module = "evolve." + node.module if node.level else node.module
                imported.add(module)
                imported.update(f"{module}.{alias.name}" for alias in node.names)
            elif isinstance(node, ast.Import):
                imported.update(alias.name for alias in node.names)
        graph[f"evolve.{path.stem}"] = {m for m in imported if m.startswith("evolve.")} - {f"evolve.{path.stem}"}

    def reaches(start, goal, seen=()):
        return any(m == goal or (m in graph and m not in seen and reaches(m, goal, seen + (m,)))
                   for m in graph.get(start, ()))

    assert not [m for m in graph if reaches(m, m)]


@pytest.mark.parametrize("inputs, base, ok", [
    (("b", "x"), "b", True),  # a base plus one other model (the base listed)
    (("x",), "b", True),  # a base plus one other model (the base not listed)
    (("x", "y"), None, True),  # two endpoints
    (("x", "y"), "b", False),  # a base plus two others
    (("x",), None, False),  # one endpoint
])
def test_slerp_input_rule_is_declared_with_the_operator(inputs, base, ok):
    from evolve.registry import get_operator

    op = get_operator("slerp")
    assert (op.base, op.min_inputs, op.max_inputs) == ("endpoint", 2, 2)
    recipe = Recipe("slerp", inputs, {"t": 0.5}, base=base)
    if ok:
        validate_recipe(recipe)
    else:
        with pytest.raises(RecipeError, match="op 'slerp' takes 2 inputs"):
            validate_recipe(recipe)


def test_merge_methods_come_from_the_registry():
    from evolve.registry import merge_method_names

    names = merge_method_names()
    assert names[:6] == ("linear", "task_arithmetic", "ties", "dare_linear", "dare_ties", "slerp")
    assert {"della", "breadcrumbs_ties", "model_stock", "nuslerp", "multislerp", "karcher", "sce", "nearswap", "arcee_fusion"} <= set(names)
