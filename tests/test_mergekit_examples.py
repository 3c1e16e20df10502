"""mergekit's `examples/` YAMLs (our own equivalents on tiny local Llamas) through both tools.

Each YAML keeps the shape of a mergekit 0.1.5 example (`linear.yml`, `ties.yml`,
`gradient-slerp.yml`, `orcamini-platy-44layer.yml`, `bio-merge.yml`, ...) with hub names
replaced by tiny local models of one architecture (4 layers), and runs through `evofuse merge`
(the CLI entry point, in process) and mergekit in process. Asserted:

* deterministic methods: the same tensor names, dtypes and values to <= 1e-6, in the examples'
  own dtypes (float16 / bfloat16: mergekit's rounding is reproduced) and in float32;
* slices and passthrough: the output's depth, config.json and a forward pass in plain
  transformers;
* DARE at density < 1 (random drops; mergekit's come from its global RNG): per tensor, the kept
  fractions agree within the binomial spread of their difference, and both rescale the kept
  entries by the same factor `L1(tau) / L1(kept tau)`; at density 1 they are equal.
"""
from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
import yaml

mergekit = pytest.importorskip(
    "mergekit", reason="mergekit is not installed: `.venv/bin/pip install mergekit==0.1.5` to run the parity tests"
)

from benchmarks.merge_examples import DEPTH, EXAMPLES, render  # noqa: E402  (shared with bench_merge_table)
from search.merge import MergeConfigError, run_merge  # noqa: E402
from test_mergekit_methods import _load, _merge_both  # noqa: E402  (evofuse CLI + mergekit in process)
from test_mergekit_parity import models  # noqa: E402,F401,F811  (the session's tiny base and three fine-tunes)

TOLERANCE = 1e-6
SIGMAS = 5  # binomial tolerance per tensor: |z| > 5 has probability 6e-7

def example(name: str, paths: dict[str, Path]) -> dict:
    return render(EXAMPLES[name], paths)


@pytest.mark.parametrize("name", sorted(EXAMPLES))
def test_example_yaml_gives_mergekits_weights(name, models, tmp_path):  # noqa: F811
    config = example(name, models)
    ours, theirs = _merge_both(config, tmp_path)
    assert set(ours) == set(theirs)
    for tensor in ours:
        assert ours[tensor].dtype == theirs[tensor].dtype, tensor
        assert float((ours[tensor].double() - theirs[tensor].double()).abs().max()) <= TOLERANCE, tensor
    ours_config = json.loads((tmp_path / "evofuse" / "config.json").read_text())
    assert ours_config["num_hidden_layers"] == DEPTH.get(name, 4)
    assert json.loads((tmp_path / "mergekit" / "config.json").read_text())["num_hidden_layers"] == DEPTH.get(name, 4)


def test_frankenmerge_loads_and_runs_in_plain_transformers(models, tmp_path):  # noqa: F811
    from transformers import AutoModelForCausalLM

    path = tmp_path / "franken.yml"
    path.write_text(yaml.safe_dump(example("orcamini_platy_frankenmerge", models)))
    out = run_merge(path, tmp_path / "out", quiet=True)
    merged = AutoModelForCausalLM.from_pretrained(out)
    assert merged.config.num_hidden_layers == 6 and len(merged.model.layers) == 6
    a, b = _load(models["a"]), _load(models["b"])
    state = merged.state_dict()
    # output layers 0-2 are a's 0-2, layers 3-5 are b's 1-3; embeddings a's, head and norm b's
    for out_layer, (source, layer) in enumerate([(a, 0), (a, 1), (a, 2), (b, 1), (b, 2), (b, 3)]):
        name = "self_attn.q_proj.weight"
        assert torch.equal(state[f"model.layers.{out_layer}.{name}"].float(),
                           source[f"model.layers.{layer}.{name}"].half().float())
    assert torch.equal(state["model.embed_tokens.weight"].float(), a["model.embed_tokens.weight"].half().float())
    assert torch.equal(state["lm_head.weight"].float(), b["lm_head.weight"].half().float())
    with torch.no_grad():
        logits = merged(torch.tensor([[5, 6, 7, 8]])).logits
    assert logits.shape == (1, 4, merged.config.vocab_size) and torch.isfinite(logits).all()


def test_dare_drops_like_mergekit_in_distribution(models, tmp_path):  # noqa: F811
    """One model at weight 1: merged - base is the dropped, rescaled task vector itself.

    Each entry is kept with probability `density`, so a tensor of n entries keeps K ~ Bin(n, p)
    and the difference of two independent fractions has standard deviation sqrt(2 p (1 - p) / n);
    5 of those are allowed (0.055 for a 64 x 64 tensor). Both tools must scale the kept entries
    by L1(tau) / L1(kept tau) (mergekit's rescaling, whose mean is 1 / density).
    """
    density = 0.4
    config = {"merge_method": "dare_linear", "base_model": str(models["base"]), "dtype": "float32",
              "models": [{"model": str(models["a"]), "parameters": {"weight": 1.0, "density": density}}]}
    ours, theirs = _merge_both(config, tmp_path)
    base, tuned = _load(models["base"]), _load(models["a"])
    kept_fractions = {"ours": [], "mergekit": []}
    for name in base:
        tau = tuned[name] - base[name]
        n = tau.numel()
        for label, merged in (("ours", ours), ("mergekit", theirs)):
            kept = merged[name] != base[name]  # a dropped entry is base + 0, exactly
            kept_fractions[label].append(float(kept.double().mean()))
            factor = tau.abs().sum() / (tau * kept).abs().sum()
            assert torch.allclose(merged[name] - base[name], tau * kept * factor, rtol=0, atol=1e-6), (label, name)
        spread = SIGMAS * math.sqrt(2 * density * (1 - density) / n)
        assert abs(kept_fractions["ours"][-1] - kept_fractions["mergekit"][-1]) <= spread, name
    for fractions in kept_fractions.values():  # and both keep `density` of the whole model
        assert abs(sum(fractions) / len(fractions) - density) < 0.02


@pytest.mark.parametrize("mutate, message", [
    (lambda c: c["slices"][0]["sources"][0].update(layer_range=[0, 5]),
     "field 'slices.0.sources.0.layer_range': [0, 5] is not a non-empty range inside the model's 4 layers"),
    (lambda c: c["slices"][0]["sources"][1].update(layer_range=[0, 3]),
     "field 'slices.0.sources.1.layer_range': 3 layers, but the slice's first source has 4"),
    (lambda c: c.update(base_model=c["base_model"] + "_elsewhere"), "field 'base_model'"),
    (lambda c: c["slices"][0]["sources"].pop(0), "the base_model"),
    (lambda c: c["slices"][0].update(residual_weight=0.5), "field 'slices.0.residual_weight' is not supported"),
    (lambda c: c.update(models=[{"model": c["base_model"]}]), "give either 'models' or 'slices'"),
    (lambda c: c.update(merge_method="passthrough"), "field 'slices.0': op 'passthrough' takes 1 inputs"),
])
def test_bad_slices_raise_one_line_naming_the_field(models, tmp_path, mutate, message):  # noqa: F811
    config = example("gradient_slerp", models)
    mutate(config)
    path = tmp_path / "bad.yml"
    path.write_text(yaml.safe_dump(config))
    with pytest.raises(MergeConfigError) as info:
        run_merge(path, tmp_path / "out", quiet=True)
    assert message in str(info.value) and "\n" not in str(info.value)


def test_ties_on_bfloat16_weights_keeps_mergekits_tied_entries(models, tmp_path):  # noqa: F811
    """bf16-stored weights merged in float32 (`normalize: false`): their task vectors take few
    distinct values, so many entries tie at each trim threshold (the cause of the 4e-4 gap of
    issue 16); with `tie_order: mergekit` evofuse keeps the ones mergekit's argsort keeps (the
    default, lowest index first, differs there only)."""
    import shutil

    from safetensors.torch import save_file

    quantised = {}
    for label in ("base", "a", "b"):
        quantised[label] = tmp_path / f"{label}_bf16"
        shutil.copytree(models[label], quantised[label])
        state = {n: t.to(torch.bfloat16) for n, t in _load(models[label]).items()}
        save_file(state, str(quantised[label] / "model.safetensors"), metadata={"format": "pt"})
    config = render(EXAMPLES["ties_unnormalized_fp32"], quantised)
    tau = _load(quantised["a"])["model.layers.0.mlp.up_proj.weight"].float() - \
        _load(quantised["base"])["model.layers.0.mlp.up_proj.weight"].float()
    threshold = tau.abs().reshape(-1).sort(descending=True).values[int(0.5 * tau.numel()) - 1]
    assert int((tau.abs() == threshold).sum()) > 2  # a real tie at the cut
    (tmp_path / "merge").mkdir()
    ours, theirs = _merge_both(config, tmp_path / "merge")
    differ = [n for n in ours if float((ours[n] - theirs[n]).abs().max()) > TOLERANCE]
    assert differ  # lowest index first is not mergekit's choice everywhere
    config["parameters"]["tie_order"] = "mergekit"  # mergekit ignores parameters it does not know
    (tmp_path / "exact").mkdir()
    ours, theirs = _merge_both(config, tmp_path / "exact")
    assert max(float((ours[n] - theirs[n]).abs().max()) for n in ours) <= TOLERANCE


def test_the_benchmark_table_covers_every_registered_method():
    from benchmarks.merge_examples import METHODS
    from evolve.registry import merge_method_names

    assert set(METHODS) == set(merge_method_names())
    for name, template in METHODS.items():
        assert render(template, dict.fromkeys(("base", "a", "b", "c"), "m"))["merge_method"] == name
