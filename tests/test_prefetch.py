"""`evofuse merge`'s TIES prefetch (evolve/prefetch.py): what it plans from a YAML, that the
worker's thresholds are `magnitude_threshold`'s, and that a merge with it writes the same bytes.

The worker is a forked process and forks only before torch is imported, so the end-to-end
checks run in a fresh interpreter (a subprocess), as `evofuse merge` does.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import save_file

from evolve import prefetch
from evolve.slices import OutputSlice, SliceSource, plan_output_tensors
from search.merge import run_merge

ROOT = Path(__file__).resolve().parents[1]


def write_model(directory: Path, tensors: dict[str, torch.Tensor]) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(directory / "model.safetensors"))
    (directory / "config.json").write_text(json.dumps({"model_type": "llama", "num_hidden_layers": 2}))
    return directory


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict[str, Path]:
    """A base and three fine-tunes whose task vectors are rounded to 0.01 (many tied
    magnitudes), with tensors small and large enough for both threshold paths."""
    root = tmp_path_factory.mktemp("prefetch_models")
    generator = torch.Generator().manual_seed(0)
    shapes = {"model.embed_tokens.weight": (300, 64), "model.norm.weight": (64,), "lm_head.weight": (300, 64)}
    for layer in range(2):
        shapes |= {f"model.layers.{layer}.mlp.up_proj.weight": (128, 64),
                   f"model.layers.{layer}.self_attn.q_proj.weight": (64, 64),
                   f"model.layers.{layer}.input_layernorm.weight": (64,)}
    base = {name: torch.randn(shape, generator=generator) for name, shape in shapes.items()}
    paths = {"base": write_model(root / "base", base)}
    for label in "abc":
        paths[label] = write_model(root / label, {
            name: tensor + (0.03 * torch.randn(tensor.shape, generator=generator)).round(decimals=2)
            for name, tensor in base.items()})
    return paths


def ties_config(models: dict[str, Path], **changes) -> dict:
    config = {"merge_method": "ties", "base_model": str(models["base"]),
              "models": [{"model": str(models[label]), "parameters": {"weight": w, "density": d}}
                         for label, w, d in (("a", 0.4, 0.5), ("b", 0.3, 0.3), ("c", 0.3, 0.7))],
              "parameters": {"normalize": True}, "dtype": "float32"}
    config.update(changes)
    return config


def write_config(tmp_path: Path, config: dict) -> Path:
    path = tmp_path / "merge.yml"
    path.write_text(yaml.safe_dump(config))
    return path


def test_plans_one_job_per_tensor_and_trimmed_expert_in_the_merges_order(models, tmp_path):
    jobs = prefetch.plan_jobs(write_config(tmp_path, ties_config(models)))
    assert len(jobs) == 9 * 3  # 3 outside the layers, 3 in each of 2 layers
    # the base's bytes are dropped after the last expert of each tensor only
    assert [last for _, last in jobs] == [False, False, True] * 9
    densities = [key[3] for key, _ in jobs[:3]]
    assert densities == [0.5, 0.3, 0.7]
    # the order `plan_output_tensors` merges (and writes) an unsliced model in
    base = prefetch._float32_tensors(models["base"])  # {name: (shape, file, offset)}
    planned = plan_output_tensors([OutputSlice((SliceSource("base", 0, 2),))],
                                  {"base": {name: ((1,), "F32") for name in base}}, {"base": 2})
    name_at = {offset: name for name, (_, _, offset) in base.items()}
    assert [name_at[key[1][1]] for key, _ in jobs[::3]] == [tensor.name for tensor in planned]


@pytest.mark.parametrize("change", [
    {"merge_method": "dare_ties"},
    {"dtype": "bfloat16"},
    {"slices": [{"sources": [{"model": "x", "layer_range": [0, 2]}]}]},
    {"tokenizer_source": "union"},
    {"base_model": "HuggingFaceTB/SmolLM2-135M"},  # a hub name: nothing local to read
])
def test_plans_nothing_it_cannot_match_exactly(models, tmp_path, change):
    assert prefetch.plan_jobs(write_config(tmp_path, ties_config(models, **change))) == []


def test_skips_experts_without_one_scalar_density_below_one(models, tmp_path):
    config = ties_config(models)
    config["models"][0]["parameters"]["density"] = [0.2, 0.8]  # a gradient
    config["models"][1]["parameters"]["density"] = 1.0  # nothing trimmed
    del config["models"][2]["parameters"]["density"]
    config["parameters"]["density"] = 0.25  # the config's default
    config["models"].append({"model": str(models["base"])})  # the base: no task vector
    jobs = prefetch.plan_jobs(write_config(tmp_path, config))
    assert {key[3] for key, _ in jobs} == {0.25} and len(jobs) == 9


def test_relative_model_paths_resolve_from_the_configs_directory(models, tmp_path):
    # as the merge resolves them when they are not found from the working directory
    config = ties_config(models)
    config["base_model"] = os.path.relpath(models["base"], tmp_path)
    for entry in config["models"]:
        entry["model"] = os.path.relpath(entry["model"], tmp_path)
    assert len(prefetch.plan_jobs(write_config(tmp_path, config))) == 9 * 3


def run_fresh(script: str, *args: str) -> dict:
    """`script` in a fresh interpreter (torch not yet loaded), its last stdout line as JSON."""
    done = subprocess.run([sys.executable, "-c", script, *args], capture_output=True, text=True, cwd=ROOT,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


MERGE_WITH_PREFETCH = """
import json, sys
from evolve import prefetch
started = prefetch.start(sys.argv[1])
import torch  # what the worker overlaps
from search.merge import run_merge
try:
    run_merge(sys.argv[1], sys.argv[2], quiet=True)
finally:
    prefetch.stop()
print(json.dumps({"started": started, **prefetch.last_counts()}))
"""


def test_a_merge_with_the_prefetch_writes_the_same_bytes_and_uses_its_thresholds(models, tmp_path):
    config = write_config(tmp_path, ties_config(models))
    counts = run_fresh(MERGE_WITH_PREFETCH, str(config), str(tmp_path / "prefetched"))
    assert counts["started"] and counts["jobs"] == 27
    assert counts["used"] >= 1 and counts["used"] + counts["taken"] == 27  # every cut asked for once
    reference = run_merge(config, tmp_path / "reference", quiet=True)  # torch loaded here: no prefetch
    assert not prefetch.start(config)  # torch is loaded in this process: nothing to overlap
    for file in sorted(reference.glob("*.safetensors")):
        assert (tmp_path / "prefetched" / file.name).read_bytes() == file.read_bytes()


TAKE_PROTOCOL = """
import json, os, signal, sys
import numpy as np
from evolve import prefetch
from evolve.magnitude import magnitude_threshold
prefetch.start(sys.argv[1])
worker = prefetch._active
os.kill(worker.pid, signal.SIGSTOP)  # hold the worker on its first job
keys = sorted(worker.index, key=worker.index.get)
last = keys[-1]
queued = worker.states[worker.index[last]] == prefetch.QUEUED
took = worker.take(last)  # queued: the merge takes it and computes it itself
os.kill(worker.pid, signal.SIGCONT)
while not worker.ended:  # every other job done by the worker
    worker._receive(True)
results = {worker.index[key]: worker.take(key) for key in keys[:-1]}
def expected(key):
    (xp, xo), (bp, bo), count, density = key
    x = np.memmap(xp, dtype=np.float32, mode="r", offset=xo, shape=(count,))
    b = np.memmap(bp, dtype=np.float32, mode="r", offset=bo, shape=(count,))
    return list(magnitude_threshold(np.asarray(x), np.asarray(b), max(1, int(density * count))))
print(json.dumps({"queued": bool(queued), "took": took, "skipped": worker.index[last] not in worker.results,
                  "equal": all(list(results[worker.index[k]]) == expected(k) for k in keys[:-1]),
                  "counts": worker.counts}))
prefetch.stop()
"""


def test_the_merge_takes_queued_jobs_and_the_worker_skips_them(tmp_path):
    # one large tensor first: its three jobs (~40 ms) outlast the parent's steps up to SIGSTOP
    generator = torch.Generator().manual_seed(1)
    base = {f"model.layers.0.w{i}": torch.randn(1 << 22 if i == 0 else 1 << 14, generator=generator) for i in range(6)}
    paths = {"base": write_model(tmp_path / "base", base)}
    for label in "abc":
        paths[label] = write_model(tmp_path / label, {n: t + 0.01 * torch.randn(t.shape, generator=generator)
                                                      for n, t in base.items()})
    seen = run_fresh(TAKE_PROTOCOL, str(write_config(tmp_path, ties_config(paths))))
    assert seen["queued"] and seen["took"] is None and seen["skipped"]
    assert seen["equal"] and seen["counts"] == {"jobs": 18, "used": 17, "taken": 1}


def test_the_command_line_module_does_not_import_torch():
    # the prefetch overlaps `import torch` only if nothing before `cmd_merge` imports it
    loaded = run_fresh("import json, sys, search.cli; print(json.dumps('torch' in sys.modules))")
    assert loaded is False
