"""`evofuse merge` agrees with mergekit (the reference users know) to 1e-6 in fp32.

mergekit is a test dependency (`mergekit==0.1.5`); it is run in process through its Python
API on the same tiny Llama directories and the same YAML as `search.merge.run_merge`. DARE is
compared at density 1 (its random masks cannot match mergekit's unseeded global RNG).
"""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
import yaml

mergekit = pytest.importorskip(
    "mergekit", reason="mergekit is not installed: `.venv/bin/pip install mergekit==0.1.5` to run the parity tests"
)

from safetensors.torch import load_file  # noqa: E402

from search.merge import run_merge  # noqa: E402

TOLERANCE = 1e-6


@pytest.fixture(scope="session")
def models(tmp_path_factory) -> dict[str, Path]:
    """A tiny base and three 'fine-tunes' (base + seeded noise), saved as HF directories."""
    from search.models.tiny import byte_tokenizer, tiny_llama

    root = tmp_path_factory.mktemp("parity_models")
    tokenizer = byte_tokenizer()
    paths = {}
    for label, seed in (("base", None), ("a", 1), ("b", 2), ("c", 3)):
        model = tiny_llama(seed=0)
        if seed is not None:
            g = torch.Generator().manual_seed(seed)
            with torch.no_grad():
                for p in model.parameters():
                    p.add_(0.02 * torch.randn(p.shape, generator=g))
        paths[label] = root / label
        model.save_pretrained(paths[label])
        tokenizer.save_pretrained(paths[label])
    return paths


def _merge_both(config: dict, tmp_path: Path) -> tuple[dict, dict]:
    from mergekit.config import MergeConfiguration
    from mergekit.merge import MergeOptions
    from mergekit.merge import run_merge as mergekit_run

    path = tmp_path / "merge.yml"
    path.write_text(yaml.safe_dump(config))
    run_merge(path, tmp_path / "evofuse", quiet=True)
    mergekit_run(MergeConfiguration.model_validate(config), str(tmp_path / "mergekit"),
                 MergeOptions(quiet=True, write_model_card=False, copy_tokenizer=False))

    def load(d: Path) -> dict:
        state = {}
        for f in sorted(d.glob("*.safetensors")):
            state.update(load_file(str(f)))
        return state

    return load(tmp_path / "evofuse"), load(tmp_path / "mergekit")


def _worst(ours: dict, theirs: dict) -> float:
    assert set(ours) == set(theirs)
    for name in ours:
        assert ours[name].dtype == theirs[name].dtype == torch.float32, name
    return max(float((ours[n] - theirs[n]).abs().max()) for n in ours)


def _models(paths, *entries):
    return [{"model": str(paths[label]), **({"parameters": params} if params else {})} for label, params in entries]


CASES = {
    "linear_normalized": lambda p: {
        "merge_method": "linear",
        "models": _models(p, ("a", {"weight": 0.5}), ("b", {"weight": 0.3}), ("c", {"weight": 0.4})),
    },
    "linear_raw_gradient_filter": lambda p: {
        "merge_method": "linear",
        "models": _models(p, ("a", {"weight": [0.1, 0.9, 0.3]}),
                          ("b", {"weight": [{"filter": "mlp", "value": 0.7}, {"value": 0.2}]})),
        "parameters": {"normalize": False},
    },
    "linear_with_unlisted_base": lambda p: {  # mergekit adds the base as one more input
        "merge_method": "linear", "base_model": str(p["base"]),
        "models": _models(p, ("a", {"weight": 0.5}), ("b", {"weight": 0.3})),
        "parameters": {"weight": 0.2},
    },
    "task_arithmetic": lambda p: {
        "merge_method": "task_arithmetic", "base_model": str(p["base"]),
        "models": _models(p, ("a", {"weight": 0.5}), ("b", {"weight": -0.3}), ("c", {"weight": 0.8})),
        "parameters": {"lambda": 0.7},
    },
    "task_arithmetic_normalized": lambda p: {
        "merge_method": "task_arithmetic", "base_model": str(p["base"]),
        "models": _models(p, ("base", None), ("a", {"weight": 0.5}), ("b", {"weight": 0.3})),
        "parameters": {"normalize": True},
    },
    "ties": lambda p: {
        "merge_method": "ties", "base_model": str(p["base"]),
        "models": _models(p, ("a", {"weight": 0.5, "density": 0.5}), ("b", {"weight": [0.2, 0.8], "density": 0.7}),
                          ("c", {"weight": [{"filter": "self_attn", "value": 0.9}, {"value": 0.3}], "density": 0.3})),
        "parameters": {"lambda": 1.1},
        "dtype": "float32",
    },
    "ties_unnormalized": lambda p: {
        "merge_method": "ties", "base_model": str(p["base"]),
        "models": _models(p, ("a", {"weight": 1.0, "density": 0.2}), ("b", {"weight": 1.0, "density": 0.9})),
        "parameters": {"normalize": False, "density": 0.5},
    },
    "dare_linear_density_1": lambda p: {
        "merge_method": "dare_linear", "base_model": str(p["base"]),
        "models": _models(p, ("a", {"weight": 0.6, "density": 1.0}), ("b", {"weight": 0.4, "density": 1.0})),
    },
    "dare_ties_density_1": lambda p: {
        "merge_method": "dare_ties", "base_model": str(p["base"]),
        "models": _models(p, ("a", {"weight": 0.6}), ("b", {"weight": 0.4}), ("c", {"weight": 0.5})),
        "parameters": {"density": 1.0, "normalize": True},
    },
    "slerp": lambda p: {
        "merge_method": "slerp", "base_model": str(p["base"]),
        "models": _models(p, ("base", None), ("a", None)),
        "parameters": {"t": 0.3},
    },
    "slerp_gradient_filters": lambda p: {
        "merge_method": "slerp", "base_model": str(p["a"]),
        "models": _models(p, ("a", None), ("b", None)),
        "parameters": {"t": [{"filter": "self_attn", "value": [0, 0.5, 0.3, 0.7, 1]},
                             {"filter": "mlp", "value": [1, 0.5, 0.7, 0.3, 0]}, {"value": 0.5}]},
    },
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_same_weights_as_mergekit(case, models, tmp_path):
    ours, theirs = _merge_both(CASES[case](models), tmp_path)
    assert _worst(ours, theirs) <= TOLERANCE
    # and the merge did something: it is none of its inputs
    for label in ("base", "a", "b"):
        assert _worst(ours, load_file(str(models[label] / "model.safetensors"))) > 1e-3, label
