"""The `kl` fitness kind: KL(reference || candidate) of next-token distributions on a tiny Llama."""
from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F

from search.fitness import TaskError, TaskSpec, build_task
from search.fitness.kl import KLReference
from search.models.tiny import tiny_llama

SMALL = {"seq_len": 32, "num_sequences": 4, "batch_size": 3}  # 3 + 1 windows: two batches
V = 259  # the byte tokenizer's vocabulary


def kl_task(tokenizer, **options):
    return build_task(TaskSpec("kl", "pydoc:dev", options={**SMALL, **options}), tokenizer)


@pytest.fixture(scope="module")
def models():
    """A tiny Llama and a copy with every weight perturbed by 50% of its mean magnitude."""
    ref = tiny_llama(seed=0)
    cand = tiny_llama(seed=0)
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in cand.parameters():
            p.add_(torch.randn(p.shape, generator=generator) * 0.5 * p.abs().mean())
    return ref, cand


def plain_kl(ref, cand, windows) -> list[float]:
    """Per window: sum over positions of KL(P || Q), full softmax in float64, one window at a time."""
    out = []
    with torch.no_grad():
        for window in windows:
            logp = torch.log_softmax(ref(window[None]).logits[0].double(), -1)  # (T, V)
            logq = torch.log_softmax(cand(window[None]).logits[0].double(), -1)  # (T, V)
            # kl_div(input=log Q, target=log P, log_target) = sum P (log P - log Q)
            out.append(float(F.kl_div(logq, logp, reduction="sum", log_target=True)))
    return out


def test_kl_of_a_model_against_its_own_reference_is_zero(tokenizer, models):
    ref, _ = models
    for options in ({}, {"top_k": 8}, {"reference_dtype": "float32"}):
        task = kl_task(tokenizer, **options)
        metrics = task.evaluate(ref, reference=task.reference(ref))
        assert abs(metrics["kl"]) < 1e-6 and metrics["score"] == -metrics["kl"], options
        assert metrics["tokens"] == 4 * 32


def test_kl_matches_plain_computation(tokenizer, models):
    ref, cand = models
    exact = kl_task(tokenizer, reference_dtype="float32")
    expected = plain_kl(ref, cand, exact.windows)
    mean = sum(expected) / (4 * 32)
    assert 1e-3 < mean < 1  # a real difference
    metrics = exact.evaluate(cand, reference=exact.reference(ref), per_example=True)
    assert metrics["kl"] == pytest.approx(mean, rel=1e-5)
    assert [-v for v in metrics["examples"]["value"]] == pytest.approx(expected, rel=1e-5)
    # float16 storage (the default): half the memory, an approximation of the same number
    half = kl_task(tokenizer)
    assert half.evaluate(cand, reference=half.reference(ref))["kl"] == pytest.approx(mean, rel=2e-3)


@pytest.mark.parametrize("options", [{}, {"top_k": 8}, {"reference_dtype": "float32"}])
def test_kl_under_a_bfloat16_screen_is_the_float32_kl_to_within_its_rounding(tokenizer, models, options):
    """A screening stage (`fitness.screen_dtype`) runs the reference's and the candidate's forward
    under autocast; the distribution math after it stays exact, so a model against its own
    screened reference is still 0 and a real difference keeps its size."""
    ref, cand = models
    task = kl_task(tokenizer, **options)
    exact = task.evaluate(cand, reference=task.reference(ref))["kl"]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        screened_ref = task.reference(ref)
        assert abs(task.evaluate(ref, reference=screened_ref)["kl"]) < 1e-6
        screened = task.evaluate(cand, reference=screened_ref)["kl"]
    assert screened == pytest.approx(exact, rel=0.1) and screened != exact


@pytest.mark.parametrize("dtype", ["float16", "float32"])
def test_top_k_converges_to_full_and_equals_it_at_v(tokenizer, models, dtype):
    ref, cand = models
    full_task = kl_task(tokenizer, reference_dtype=dtype)
    full = full_task.evaluate(cand, reference=full_task.reference(ref))["kl"]
    values = []
    for k in (1, 4, 16, 64, 256, V, V + 10):
        task = kl_task(tokenizer, top_k=k, reference_dtype=dtype)
        values.append(task.evaluate(cand, reference=task.reference(ref))["kl"])
    # merging outcomes never increases a divergence: KL_k grows with k, from below
    assert all(a <= b * (1 + 1e-9) for a, b in zip(values, values[1:])), values
    assert values[0] < 0.5 * full and all(v <= full * (1 + 1e-9) for v in values)
    assert values[-2] == pytest.approx(full, rel=1e-9) and values[-1] == pytest.approx(full, rel=1e-9)


def test_per_example_scores(tokenizer, models):
    ref, cand = models
    task = kl_task(tokenizer, top_k=16)
    reference = task.reference(ref)
    metrics = task.evaluate(cand, reference=reference, per_example=True)
    examples = metrics.pop("examples")
    json.dumps(examples)
    assert examples["index"] == [0, 1, 2, 3] and examples["weight"] == [32.0] * 4
    assert sum(examples["value"]) / sum(examples["weight"]) == pytest.approx(metrics["score"], rel=1e-12)
    assert metrics == task.evaluate(cand, reference=reference)  # per_example adds only "examples"
    part = task.evaluate(cand, reference=reference, indices=[3, 1], per_example=True)
    assert part["examples"]["value"] == pytest.approx([examples["value"][3], examples["value"][1]], rel=1e-6)
    assert part["score"] == pytest.approx((examples["value"][3] + examples["value"][1]) / 64, rel=1e-6)


def test_reference_memory_and_layout(tokenizer, models):
    ref, _ = models
    full = kl_task(tokenizer).reference(ref)
    assert isinstance(full, KLReference) and full.logprobs.dtype == torch.float16
    assert full.nbytes == 4 * 32 * V * 2 and full.logprobs.device.type == "cpu"
    top = kl_task(tokenizer, top_k=8).reference(ref)
    assert top.logprobs is None and top.top_indices.shape == (4, 32, 8) and top.top_indices.dtype == torch.int32
    assert top.nbytes == 4 * 32 * (8 * 2 + 8 * 4 + 2)
    # the k tokens and the tail are a distribution: their probabilities sum to 1
    mass = top.top_logprobs.double().exp().sum(-1) + top.tail_logprob.double().exp()
    assert torch.allclose(mass, torch.ones_like(mass), atol=1e-2)


def test_kl_needs_a_matching_reference(tokenizer, models):
    ref, cand = models
    task = kl_task(tokenizer)
    with pytest.raises(TaskError, match="kl task needs a reference"):
        task.evaluate(cand)
    with pytest.raises(TaskError, match="top_k"):
        task.evaluate(cand, reference=kl_task(tokenizer, top_k=4).reference(ref))
    other = build_task(TaskSpec("kl", "pydoc:test", options=SMALL), tokenizer)
    with pytest.raises(TaskError, match="other windows"):
        task.evaluate(cand, reference=other.reference(ref))
    with pytest.raises(TaskError, match="seq_len 1024 exceeds"):
        kl_task(tokenizer, seq_len=1024, num_sequences=1).reference(ref)


@pytest.mark.parametrize(
    "options, message",
    [({"top_k": -1}, "top_k must be an integer >= 0"), ({"reference_dtype": "int8"}, "reference_dtype"),
     ({"seq_len": 0}, "seq_len"), ({"context_length": 64}, "unknown option 'context_length'")],
)
def test_bad_options(tokenizer, options, message):
    with pytest.raises(TaskError, match=message):
        kl_task(tokenizer, **options)


def test_evofuse_eval_scores_kl_against_a_reference_model(tmp_path, tokenizer, models, capsys):
    """`evofuse eval MODEL --task kl:DATA --reference REF`: the task's own computation, REF's
    distributions taken before MODEL is loaded; a model against itself is 0."""
    from search.cli import main

    ref, cand = models
    for name, model in (("ref", ref), ("cand", cand)):
        model.save_pretrained(tmp_path / name)
        tokenizer.save_pretrained(tmp_path / name)
    task = build_task(TaskSpec("kl", "pydoc:dev"), tokenizer)  # the command's options: the kind's defaults
    expected = task.evaluate(cand, reference=task.reference(ref))
    got = {}
    for name in ("cand", "ref"):
        assert main(["eval", str(tmp_path / name), "--task", "kl:pydoc:dev", "--reference", str(tmp_path / "ref"), "--json"]) == 0
        got[name] = json.loads(capsys.readouterr().out)["kl:pydoc:dev"]
    assert got["cand"]["kl"] == pytest.approx(expected["kl"], rel=1e-6) and got["cand"]["kl"] > 1e-3
    assert got["cand"]["tokens"] == expected["tokens"] == 8 * 128
    assert abs(got["ref"]["kl"]) < 1e-6
