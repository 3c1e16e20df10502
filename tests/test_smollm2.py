"""The real default model: the built-in SmolLM2-135M-Instruct loads from its wheel and scores."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest

pytestmark = pytest.mark.slow


def test_builtin_smollm2_loads_and_scores_a_tiny_dev_set():
    from search.fitness import TaskSpec, build_task
    from search.models.sources import load_model, resolve_source, tensor_index

    model, tokenizer = load_model("smollm2-135m")
    assert model.config.num_hidden_layers == 30 and model.config.hidden_size == 576
    assert sum(p.numel() for p in model.parameters()) == 134_515_008
    index = tensor_index(resolve_source("smollm2-135m"))
    assert len(index) == 272 and "lm_head.weight" not in index  # tied to the embeddings
    ppl = build_task(TaskSpec("perplexity", "pydoc:dev", options={"context_length": 256}), tokenizer)
    metrics = ppl.evaluate(model, subsample=2, seed=0)
    assert 2.0 < metrics["token_perplexity"] < 40.0, metrics  # a real language model, not noise
    mc = build_task(TaskSpec("multiple_choice", "compare:dev"), tokenizer).evaluate(model, subsample=8, seed=0)
    assert 0.0 <= mc["acc"] <= 1.0 and 0.0 <= mc["acc_norm"] <= 1.0


def test_eval_cli_json_on_the_builtin():
    proc = subprocess.run(
        [sys.executable, "-m", "search.cli", "eval", "smollm2-135m", "--task", "generate:arithmetic:dev", "--json"],
        capture_output=True, text=True,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    result = json.loads(proc.stdout)
    assert set(result) == {"generate:arithmetic:dev"}
    assert 0.0 <= result["generate:arithmetic:dev"]["exact_match"] <= 1.0
