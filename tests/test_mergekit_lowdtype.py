"""`evofuse merge` with `dtype: float16` / `bfloat16` gives mergekit 0.1.5's numbers, bit for bit.

mergekit casts every input to the config's `dtype` on load and runs each method in that dtype
(linear and slerp: in float32, rounding the result to it), so its fp16 / bf16 results carry the
rounding of every step. evofuse picks the same compute dtype (`search.merge.compute_dtype`) and
its methods round where mergekit's do. Here every deterministic method (DARE and DELLA at
density 1) is merged by both on the tiny test Llama: evofuse through the recipe `evofuse merge`
builds from the YAML (`build_slice_recipe`, `materialize_tensor` with the driver's compute
dtype), mergekit through its in-memory `merge_state_dicts` with `dtype=`, in process. The
tiny weights are made once per module and nothing touches the disk, so the file runs in a
few seconds; the float32 end-to-end runs of the same methods are in `test_mergekit_methods.py`
and `test_mergekit_parity.py`, and one end-to-end run per dtype is at the end here.

Tolerance 0 everywhere: every case is bit-identical (both tools on the same number of torch
threads: whole-tensor reductions split their partial sums by thread). One nuance, arcee_fusion:
mergekit multiplies the task vector by a float32 mask, so its result is float32 even with a
bf16 `dtype` (its file then holds float32 tensors when no `out_dtype` is given); evofuse casts
that float32 result straight to the output dtype, so it is mergekit's with `out_dtype:
float32` and mergekit's rounded to the `dtype` without one (both asserted below).
"""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
import yaml

mergekit = pytest.importorskip(
    "mergekit", reason="mergekit is not installed: `.venv/bin/pip install mergekit==0.1.5` to run the parity tests"
)

from evolve.materialize import materialize_tensor  # noqa: E402
from evolve.registry import merge_method_names  # noqa: E402
from search.merge import MergeConfig, build_slice_recipe, compute_dtype, normalized_slices  # noqa: E402

DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16}
LAYERS = 4  # the tiny Llama's depth


@pytest.fixture(scope="module")
def weights() -> dict[str, dict[str, torch.Tensor]]:
    """A tiny base and three 'fine-tunes' (base + seeded noise), as float32 state dicts."""
    from test_mergekit_methods import noisy_fine_tunes

    return {label: {name: t.detach().clone() for name, t in model.state_dict().items()}
            for label, model in noisy_fine_tunes()}


# case -> (method, {input: its parameters} in the YAML's order, base or None, shared parameters).
# Per-input parameters are given for every non-base input (mergekit's in-memory API takes
# them per id); gradients and filters are covered by the float32 end-to-end tests.
CASES = {
    "linear": ("linear", {"a": {"weight": 0.5}, "b": {"weight": 0.3}, "c": {"weight": 0.4}}, None, {}),
    "task_arithmetic": ("task_arithmetic", {"a": {"weight": 0.5}, "b": {"weight": -0.3}, "c": {"weight": 0.8}},
                        "base", {"lambda": 0.7}),
    "ties": ("ties", {"a": {"weight": 0.5, "density": 0.5}, "b": {"weight": 0.2, "density": 0.7},
                      "c": {"weight": 0.9, "density": 0.3}}, "base", {"lambda": 1.1}),
    "dare_linear_density_1": ("dare_linear", {"a": {"weight": 0.6, "density": 1.0},
                                              "b": {"weight": 0.4, "density": 1.0}}, "base", {}),
    "dare_ties_density_1": ("dare_ties", {"a": {"weight": 0.6, "density": 1.0}, "b": {"weight": 0.4, "density": 1.0},
                                          "c": {"weight": 0.5, "density": 1.0}}, "base", {"normalize": True}),
    "slerp": ("slerp", {"base": {}, "a": {}}, "base", {"t": 0.3}),
    "passthrough_scaled": ("passthrough", {"b": {"scale": 0.7}}, None, {}),
    "della_density_1": ("della", {"a": {"weight": 0.6, "density": 1.0}, "b": {"weight": 0.4, "density": 1.0},
                                  "c": {"weight": 0.9, "density": 1.0}}, "base", {"lambda": 0.9}),
    "della_linear_density_1_normalized": ("della_linear", {"a": {"weight": 0.6, "density": 1.0},
                                                           "b": {"weight": 0.3, "density": 1.0}},
                                          "base", {"normalize": True, "epsilon": 0.05}),
    "breadcrumbs": ("breadcrumbs", {"a": {"weight": 0.5, "density": 0.7, "gamma": 0.05},
                                    "b": {"weight": 0.8, "density": 0.4, "gamma": 0.1}}, "base", {}),
    "breadcrumbs_rescaled_few_outliers": ("breadcrumbs", {"a": {"weight": 0.7, "density": 0.9, "gamma": 0.2},
                                                          "c": {"weight": 0.5, "density": 0.9, "gamma": 0.2}},
                                          "base", {"rescale": True, "normalize": True}),
    "breadcrumbs_ties": ("breadcrumbs_ties", {"a": {"weight": 0.9, "density": 0.5, "gamma": 0.02},
                                              "b": {"weight": 0.6, "density": 0.3, "gamma": 0.02},
                                              "c": {"weight": -0.4, "density": 0.5, "gamma": 0.0}},
                         "base", {"lambda": 1.2}),
    "sce_select": ("sce", {"a": {}, "b": {}, "c": {}}, "base", {"select_topk": 0.4}),
    "sce_all": ("sce", {"base": {}, "a": {}, "b": {}}, "base", {}),
    "nearswap": ("nearswap", {"base": {}, "a": {}}, "base", {"t": 0.01}),
    "arcee_fusion": ("arcee_fusion", {"base": {}, "b": {}}, "base", {}),
    "model_stock": ("model_stock", {"a": {}, "b": {}, "c": {}}, "base", {}),
    "model_stock_filter_wise": ("model_stock", {"base": {}, "a": {}, "c": {}}, "base", {"filter_wise": True}),
    "nuslerp": ("nuslerp", {"a": {"weight": 0.3}, "b": {"weight": 0.7}}, "base", {}),
    "nuslerp_rows": ("nuslerp", {"a": {"weight": 0.2}, "c": {"weight": 0.5}}, "base", {"nuslerp_flatten": False}),
    "nuslerp_row_wise": ("nuslerp", {"b": {"weight": 1.0}, "c": {"weight": 2.0}}, "base",
                         {"nuslerp_flatten": False, "nuslerp_row_wise": True}),
    "multislerp": ("multislerp", {"a": {"weight": 0.5}, "b": {"weight": 0.2}, "c": {"weight": 0.6}}, "base", {}),
    "multislerp_raw_weights": ("multislerp", {"a": {"weight": 0.3}, "b": {"weight": 0.5}}, "base",
                               {"normalize_weights": False}),
    "karcher": ("karcher", {"a": {}, "b": {}, "c": {}}, None, {}),
    "karcher_with_base_few_steps": ("karcher", {"a": {}, "b": {}}, "base", {"max_iter": 3, "tol": 1e-6}),
}


def _cast(weights: dict, dtype: torch.dtype) -> dict[str, dict[str, torch.Tensor]]:
    """Every model's floating tensors in `dtype`: both tools cast the inputs so on load."""
    return {label: {n: t.to(dtype) if t.is_floating_point() else t for n, t in state.items()}
            for label, state in weights.items()}


def _input_ids(case: str) -> list[str]:
    """The merge's inputs in order: the listed models, then the base when it is not listed
    (both tools add it)."""
    _, models, base, _ = CASES[case]
    return list(models) + ([base] if base is not None and base not in models else [])


def _evofuse(case: str, weights: dict, dtype_name: str) -> dict[str, torch.Tensor]:
    """The case's merge as `evofuse merge` computes it: its recipe, its compute dtype."""
    method, models, base, shared = CASES[case]
    config = MergeConfig.model_validate({
        "merge_method": method, "base_model": base, "parameters": shared or None, "dtype": dtype_name,
        "models": [{"model": label, "parameters": params or None} for label, params in models.items()],
    })
    [entry] = normalized_slices(config, dict.fromkeys(weights, LAYERS))
    recipe = build_slice_recipe(config, entry, 0, LAYERS)
    work = compute_dtype(method, DTYPES[dtype_name], ())
    inputs = _cast(weights, DTYPES[dtype_name])
    return {name: materialize_tensor(recipe, name, {i: inputs[i][name] for i in recipe.input_ids()},
                                     compute_dtype=work)
            for name in weights["base"]}


def _mergekit(case: str, weights: dict, dtype_name: str) -> dict[str, torch.Tensor]:
    """The case's merge by mergekit's in-memory API, inputs cast to the dtype as its loader does."""
    from mergekit.merge_methods.api import merge_state_dicts

    method, models, base, shared = CASES[case]
    inputs = _cast(weights, DTYPES[dtype_name])
    per_input = {key: {label: params[key] for label, params in models.items() if key in params}
                 for params in models.values() for key in params}
    return merge_state_dicts({label: inputs[label] for label in _input_ids(case)}, method,
                             parameters={**shared, **per_input}, base=base, dtype=DTYPES[dtype_name])


def _max_diff(ours: dict, theirs: dict, dtype: torch.dtype) -> float:
    """Max |ours - theirs| once mergekit's result is in the dtype evofuse writes."""
    assert set(ours) == set(theirs)
    return max(float((ours[n].float() - theirs[n].to(dtype).float()).abs().max()) for n in ours)


def test_every_merge_method_has_a_case():
    assert {method for method, *_ in CASES.values()} == set(merge_method_names())


@pytest.mark.parametrize("dtype_name", sorted(DTYPES))
@pytest.mark.parametrize("case", sorted(CASES))
def test_bit_identical_to_mergekit(case, dtype_name, weights):
    dtype = DTYPES[dtype_name]
    ours, theirs = _evofuse(case, weights, dtype_name), _mergekit(case, weights, dtype_name)
    assert all(t.dtype == dtype for t in ours.values())
    if CASES[case][0] != "arcee_fusion":  # see the module docstring
        assert all(t.dtype == dtype for n, t in theirs.items() if t.is_floating_point())
    assert _max_diff(ours, theirs, dtype) == 0
    inputs = _cast(weights, dtype)
    for label in _input_ids(case):  # and the merge did something: it is none of its inputs
        assert _max_diff(ours, inputs[label], dtype) > 0, label


# --- end to end: the YAML's dtype / out_dtype through `evofuse merge` and mergekit-yaml --------

END_TO_END = {  # a group method in each dtype; with out_dtype, the results are cast after the merge
    "breadcrumbs_ties_float16": ("breadcrumbs_ties", "float16", None),
    "multislerp_bfloat16_out_float32": ("multislerp", "bfloat16", "float32"),
    "arcee_fusion_bfloat16_out_float32": ("arcee_fusion", "bfloat16", "float32"),  # float32 sums, unrounded
}


@pytest.mark.parametrize("case", sorted(END_TO_END))
def test_end_to_end_as_mergekit(case, weights, tmp_path):
    from mergekit.config import MergeConfiguration
    from mergekit.merge import MergeOptions
    from mergekit.merge import run_merge as mergekit_run
    from safetensors.torch import load_file

    from search.cli import main
    from search.models.tiny import byte_tokenizer, tiny_llama

    key, dtype_name, out_dtype = END_TO_END[case]
    method, models, base, shared = CASES[key]
    model, tokenizer = tiny_llama(seed=0), byte_tokenizer()
    for label in _input_ids(key):  # the module's weights as Hugging Face directories
        model.load_state_dict(weights[label])
        model.save_pretrained(tmp_path / label)
        tokenizer.save_pretrained(tmp_path / label)
    config = {"merge_method": method, "base_model": str(tmp_path / base), "parameters": shared,
              "models": [{"model": str(tmp_path / label), **({"parameters": params} if params else {})}
                         for label, params in models.items()],
              "dtype": dtype_name, **({"out_dtype": out_dtype} if out_dtype else {})}
    (tmp_path / "merge.yml").write_text(yaml.safe_dump(config))
    assert main(["merge", str(tmp_path / "merge.yml"), str(tmp_path / "evofuse"), "--quiet"]) == 0
    # mergekit on one torch thread, as `evofuse merge` computes: a whole-tensor reduction (a
    # norm, an L1 sum) splits its partial sums by thread, so its last bits follow the count
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        mergekit_run(MergeConfiguration.model_validate(config), str(tmp_path / "mergekit"),
                     MergeOptions(quiet=True, write_model_card=False, copy_tokenizer=False))
    finally:
        torch.set_num_threads(threads)
    ours, theirs = ({n: t for f in sorted((tmp_path / d).glob("*.safetensors")) for n, t in load_file(str(f)).items()}
                    for d in ("evofuse", "mergekit"))
    written = getattr(torch, out_dtype or dtype_name)
    assert all(t.dtype == written for t in ours.values()) and all(t.dtype == written for t in theirs.values())
    assert _max_diff(ours, theirs, written) == 0
