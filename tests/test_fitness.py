"""Fitness tasks: definitions checked against direct computations on a tiny Llama."""
from __future__ import annotations

import json
import math

import pytest
import torch

from compression.calibration import DataSpecError
from search.fitness import (
    TaskError,
    TaskSpec,
    aggregate,
    build_task,
    encode_pair,
    parse_task_arg,
    rolling_windows,
    subsample_indices,
)

DOCS = [
    "The quick brown fox jumps over the lazy dog. It was a sunny day in the park, and nobody minded.",
    "Python lets you work quickly.\nCafé, naïve, 東京: bytes are not characters.",
    "short",
]
MC_ROWS = [
    {"context": "The capital of France is", "choices": ["Paris", "London", "a big city"], "label": 0},
    {"context": "2 + 2 =", "choices": ["4", "5"], "label": 0},
    {"context": "Q: Which is a colour?\nA: ", "choices": ["red", "dog", "seven", "run"], "label": 0},
    {"context": "", "choices": ["yes", "no"], "label": 1},
    {"context": "Café au lait is made with", "choices": ["milk", "crème fraîche"], "label": 1},
]


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return str(path)


@pytest.fixture()
def docs_file(tmp_path):
    return write_jsonl(tmp_path / "docs.jsonl", [{"text": d} for d in DOCS])


@pytest.fixture()
def mc_file(tmp_path):
    return write_jsonl(tmp_path / "mc.jsonl", MC_ROWS)


def direct_doc_loglik(model, tokens, prefix):
    """log p(doc) in one unbatched forward pass over [prefix] + tokens (doc shorter than L)."""
    ids = torch.tensor([[prefix, *tokens]])
    with torch.no_grad():
        logp = torch.log_softmax(model(ids).logits[0, :-1].double(), -1)  # (n, V)
    return float(logp.gather(1, torch.tensor(tokens)[:, None]).sum())


# ----------------------------------------------------------------------------- specs and helpers


def test_parse_task_arg():
    spec = parse_task_arg("perplexity:pydoc:test")
    assert (spec.kind, spec.data, spec.label) == ("perplexity", "pydoc:test", "perplexity:pydoc:test")
    assert parse_task_arg("multiple_choice:dev.jsonl").data == "dev.jsonl"
    assert TaskSpec("generate", "x.jsonl", name="arith").label == "arith"
    for bad in ("perplexity", "perplexity:", "ppl:pydoc:test"):
        with pytest.raises(TaskError, match="--task"):
            parse_task_arg(bad)


@pytest.mark.parametrize("n", [1, 5, 8, 9, 16, 17, 30])
def test_rolling_windows_predict_every_token_once(n):
    tokens = list(range(100, 100 + n))
    windows = rolling_windows(tokens, prefix=7, max_len=8)
    predicted = []
    for seq, n_scored in windows:
        assert 2 <= len(seq) <= 9 and 1 <= n_scored <= len(seq) - 1  # input of at most L tokens
        predicted += seq[len(seq) - n_scored :]
    assert predicted == tokens
    assert windows[0][0][0] == 7  # the first token is predicted from the prefix
    # a later window reads the L tokens just before its last target
    for seq, _ in windows[1:]:
        assert len(seq) == 9
    assert rolling_windows([], 7, 8) == []


def test_subsample_indices_are_seeded_and_sorted():
    a = subsample_indices(100, 10, seed=3)
    assert a == subsample_indices(100, 10, seed=3) and a == sorted(a) and len(set(a)) == 10
    assert a != subsample_indices(100, 10, seed=4)
    assert len(subsample_indices(100, 0.25, seed=0)) == 25
    assert subsample_indices(5, 10, seed=0) == list(range(5))
    assert subsample_indices(5, None, seed=0) == list(range(5))
    for bad in (0, -1, 1.5, "3", True):
        with pytest.raises(TaskError, match="subsample"):
            subsample_indices(5, bad, seed=0)


def test_aggregate():
    assert aggregate({"a": 1.0, "b": 3.0}, {"a": 1, "b": 1}) == 2.0
    assert aggregate({"a": 1.0, "b": 3.0, "c": 99.0}, {"a": 3, "b": 1}) == 1.5
    assert aggregate({"a": float("nan"), "b": 3.0}, {"a": 1, "b": 1}) == float("-inf")
    with pytest.raises(TaskError, match="'b'"):
        aggregate({"a": 1.0}, {"a": 1, "b": 1})
    with pytest.raises(TaskError, match="sum to 0"):
        aggregate({"a": 1.0}, {"a": 0})


def test_encode_pair_moves_trailing_space_and_splits_joint_tokens(tokenizer):
    ctx, cont = encode_pair(tokenizer, "Answer: ", "yes", prefix=1)
    assert tokenizer.decode(ctx) == "Answer:" and tokenizer.decode(cont) == " yes"
    ctx, cont = encode_pair(tokenizer, "", "yes", prefix=1)
    assert ctx == [1] and tokenizer.decode(cont) == "yes"


# ----------------------------------------------------------------------------- perplexity


def test_perplexity_matches_direct_computation(tokenizer, tiny_model, docs_file):
    task = build_task(TaskSpec("perplexity", docs_file, options={"context_length": 512}), tokenizer)
    metrics = task.evaluate(tiny_model)
    lls = [direct_doc_loglik(tiny_model, tokenizer.encode(d), 1) for d in DOCS]
    tokens = sum(len(tokenizer.encode(d)) for d in DOCS)
    n_bytes = sum(len(d.encode()) for d in DOCS)
    words = sum(len(d.split()) for d in DOCS)
    nll = -sum(lls)
    assert metrics["tokens"] == tokens == n_bytes  # byte tokenizer: one token per byte
    assert metrics["nll_sum"] == pytest.approx(nll, rel=1e-5)
    assert metrics["score"] == pytest.approx(-nll / tokens, rel=1e-5)
    assert metrics["token_perplexity"] == pytest.approx(math.exp(nll / tokens), rel=1e-5)
    assert metrics["byte_perplexity"] == pytest.approx(math.exp(nll / n_bytes), rel=1e-5)
    assert metrics["word_perplexity"] == pytest.approx(math.exp(nll / words), rel=1e-4)
    assert metrics["bits_per_byte"] == pytest.approx(nll / n_bytes / math.log(2), rel=1e-5)


def test_perplexity_chunks_are_items_scored_as_documents(tokenizer, tiny_model, docs_file):
    """chunk_tokens: N cuts each document into consecutive N-token pieces, each an item scored
    after the prefix alone; every token is still predicted exactly once."""
    size = 7
    task = build_task(TaskSpec("perplexity", docs_file, options={"chunk_tokens": size}), tokenizer)
    pieces = [t[i:i + size] for d in DOCS for t in [tokenizer.encode(d)] for i in range(0, len(t), size)]
    assert len(task) == len(pieces) == sum(math.ceil(len(tokenizer.encode(d)) / size) for d in DOCS)
    metrics = task.evaluate(tiny_model, per_example=True)
    lls = [direct_doc_loglik(tiny_model, piece, 1) for piece in pieces]
    assert metrics["tokens"] == sum(len(tokenizer.encode(d)) for d in DOCS)
    assert metrics["nll_sum"] == pytest.approx(-sum(lls), rel=1e-5)
    assert metrics["examples"]["value"] == pytest.approx(lls, rel=1e-5)
    assert metrics["examples"]["weight"] == [float(len(piece)) for piece in pieces]
    some = task.evaluate(tiny_model, indices=[1, 3])  # a subset costs its share of the tokens
    assert some["tokens"] == len(pieces[1]) + len(pieces[3])
    with pytest.raises(TaskError, match="chunk_tokens"):
        build_task(TaskSpec("perplexity", docs_file, options={"chunk_tokens": 0}), tokenizer)


def test_perplexity_windows_and_batching_do_not_change_the_sum(tokenizer, tiny_model, docs_file):
    """Short windows change the context, so the NLL differs; batch shape must not."""
    spec = dict(context_length=16)
    one = build_task(TaskSpec("perplexity", docs_file, options={**spec, "batch_size": 1}), tokenizer)
    many = build_task(TaskSpec("perplexity", docs_file, options={**spec, "batch_tokens": 100_000}), tokenizer)
    a, b = one.evaluate(tiny_model), many.evaluate(tiny_model)
    assert a["nll_sum"] == pytest.approx(b["nll_sum"], rel=1e-6)
    long = build_task(TaskSpec("perplexity", docs_file, options={"context_length": 512}), tokenizer)
    assert long.evaluate(tiny_model)["nll_sum"] != pytest.approx(a["nll_sum"], rel=1e-6)


def test_perplexity_subsample_and_training_flag(tokenizer, tiny_model):
    task = build_task(TaskSpec("perplexity", "pydoc:dev", options={"context_length": 64}), tokenizer)
    tiny_model.train()
    a = task.evaluate(tiny_model, subsample=2, seed=5)
    assert tiny_model.training  # restored
    assert a["documents"] == 2 and a == task.evaluate(tiny_model, subsample=2, seed=5)
    assert a["tokens"] != task.evaluate(tiny_model, subsample=2, seed=6)["tokens"]


def test_bfloat16_model_scores_close_to_float32(tokenizer, tiny_model, docs_file):
    task = build_task(TaskSpec("perplexity", docs_file, options={"context_length": 64}), tokenizer)
    full = task.evaluate(tiny_model)["score"]
    half = task.evaluate(tiny_model.to(torch.bfloat16))["score"]
    assert half == pytest.approx(full, rel=2e-2)


# ----------------------------------------------------------------------------- multiple choice


def test_multiple_choice_shared_prefix_equals_full_sequences(tokenizer, tiny_model, mc_file):
    task = build_task(TaskSpec("multiple_choice", mc_file, options={"context_length": 512}), tokenizer)
    with torch.inference_mode():
        shared = task.choice_logprobs(tiny_model, task.items)
        task.share_prefix = False
        full = task.choice_logprobs(tiny_model, task.items)
    for a, b in zip(shared, full):
        assert a == pytest.approx(b, rel=1e-5, abs=1e-5)
    # and one choice by hand: log p(" Paris" | "The capital of France is")
    ctx = tokenizer.encode("The capital of France is")
    cont = tokenizer.encode(" Paris")
    ids = torch.tensor([ctx + cont])
    with torch.no_grad():
        logp = torch.log_softmax(tiny_model(ids).logits[0].double(), -1)
    by_hand = sum(float(logp[len(ctx) - 1 + k, t]) for k, t in enumerate(cont))
    assert shared[0][0] == pytest.approx(by_hand, rel=1e-5)


def test_multiple_choice_batches_bound_the_cache_and_logits(tokenizer, tiny_model, mc_file, monkeypatch):
    """By default a shared-prefix batch's choice rows (their cache and logits) stay within the
    budget; the scores are those of one batch."""
    from search.fitness import kernels

    task = build_task(TaskSpec("multiple_choice", mc_file, options={"context_length": 512}), tokenizer)
    with torch.inference_mode():
        whole = kernels.shared_prefix_logprobs(tiny_model, task.items, batch_tokens=100_000)
    config = tiny_model.config
    kv = kernels.kv_bytes_per_token(tiny_model)
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    assert kv == 2 * config.num_hidden_layers * config.num_key_value_heads * head_dim * 4  # float32
    one = [kernels.choice_batch_bytes(len(q.context), len(q.continuations), max(map(len, q.continuations)) - 1, 1,
                                      kv, config.vocab_size) for q in task.items]
    budget = 2 * max(one)  # room for two questions at most
    monkeypatch.setattr(kernels, "BATCH_BUDGET_BYTES", budget)
    passes = []  # (rows, input width, cached tokens after the pass) of each forward

    def record(module, args, kwargs, output):
        passes.append((kwargs["input_ids"].shape[0], kwargs["input_ids"].shape[1], output.past_key_values.get_seq_length()))

    hook = tiny_model.register_forward_hook(record, with_kwargs=True)
    try:
        with torch.inference_mode():
            bounded = kernels.shared_prefix_logprobs(tiny_model, task.items)
    finally:
        hook.remove()
    contexts, choices = passes[0::2], passes[1::2]  # each batch: its contexts' pass, then its choices'
    assert len(choices) == len(kernels.choice_batches(tiny_model, task.items)) > 2
    for (questions, _, _), (rows, width, cached) in zip(contexts, choices):
        assert rows * cached * kv + (rows * width + 2 * questions) * 4 * config.vocab_size <= budget
    for a, b in zip(bounded, whole):
        assert a == pytest.approx(b, rel=1e-5, abs=1e-5)


def test_multiple_choice_metrics_from_logliks(tokenizer, mc_file, monkeypatch):
    """acc: raw argmax; acc_norm: per character of the choice; acc_bytes: per UTF-8 byte."""
    task = build_task(TaskSpec("multiple_choice", mc_file), tokenizer)
    lls = [[-10.0, -6.0, -12.0], [-1.0, -2.0], [-3.0, -1.0, -5.0, -4.0], [-5.0, -4.0], [-5.0, -20.0]]
    # row 0: lengths 5/6/10 -> norm -2.0/-1.0/-1.2 -> 1 (wrong); row 3: "yes" -5/3 beats "no" -4/2
    # (acc right, acc_norm wrong); row 4: "milk" -1.25 beats "crème fraîche" -20/13 and -20/15
    monkeypatch.setattr(task, "choice_logprobs", lambda model, questions, progress=False: lls)
    metrics = task.evaluate(model=torch.nn.Linear(1, 1))
    assert metrics["acc"] == pytest.approx(2 / 5)  # rows 1 and 3
    assert metrics["acc_norm"] == pytest.approx(1 / 5) and metrics["acc_bytes"] == pytest.approx(1 / 5)
    lls[4] = [-5.0, -17.0]  # 17/13 = 1.308 > 1.25 > 17/15 = 1.133: bytes pick choice 1, chars do not
    metrics = task.evaluate(model=torch.nn.Linear(1, 1))
    assert metrics["acc_norm"] == pytest.approx(1 / 5) and metrics["acc_bytes"] == pytest.approx(2 / 5)
    assert metrics["score"] == metrics["acc_norm"]
    acc_task = build_task(TaskSpec("multiple_choice", mc_file, options={"metric": "acc"}), tokenizer)
    monkeypatch.setattr(acc_task, "choice_logprobs", lambda model, questions, progress=False: lls)
    assert acc_task.evaluate(model=torch.nn.Linear(1, 1))["score"] == pytest.approx(2 / 5)


def test_multiple_choice_delimiter_and_builtin(tokenizer, tiny_model, mc_file):
    newline = build_task(TaskSpec("multiple_choice", mc_file, options={"delimiter": "\n"}), tokenizer)
    assert tokenizer.decode(newline.items[0].continuations[0]) == "\nParis"
    compare = build_task(TaskSpec("multiple_choice", "compare:dev"), tokenizer)
    metrics = compare.evaluate(tiny_model, subsample=8, seed=0)
    assert metrics["questions"] == 8 and 0 <= metrics["acc"] <= 1


@pytest.mark.parametrize(
    "row, message",
    [
        ({"choices": ["a", "b"], "label": 0}, "row 1: missing field 'context'"),
        ({"context": "c", "choices": "ab", "label": 0}, "row 1: field 'choices' must be list"),
        ({"context": "c", "choices": ["a"], "label": 0}, "at least 2"),
        ({"context": "c", "choices": ["a", ""], "label": 0}, "non-empty"),
        ({"context": "c", "choices": ["a", "b"], "label": 2}, "row 1: \"label\" 2"),
        ({"context": "c", "choices": ["a", "b"], "label": True}, "must be int"),
    ],
)
def test_multiple_choice_bad_rows(tokenizer, tmp_path, row, message):
    path = write_jsonl(tmp_path / "bad.jsonl", [row])
    with pytest.raises(TaskError, match=message) as info:
        build_task(TaskSpec("multiple_choice", path), tokenizer)
    assert "bad.jsonl" in str(info.value) and "\n" not in str(info.value)


def test_bad_specs(tokenizer, tmp_path, mc_file):
    with pytest.raises(DataSpecError, match="no such file"):
        build_task(TaskSpec("multiple_choice", str(tmp_path / "missing.jsonl")), tokenizer)
    with pytest.raises(TaskError, match="unknown option 'stride'"):
        build_task(TaskSpec("perplexity", "pydoc:dev", options={"stride": 3}), tokenizer)
    with pytest.raises(TaskError, match="metric"):
        build_task(TaskSpec("multiple_choice", mc_file, options={"metric": "f1"}), tokenizer)
    with pytest.raises(TaskError, match="unknown kind"):
        build_task(TaskSpec("rouge", "x"), tokenizer)
    with pytest.raises(TaskError, match="batch_size"):
        build_task(TaskSpec("perplexity", "pydoc:dev", options={"batch_size": 0}), tokenizer)


# ----------------------------------------------------------------------------- generation


def hf_greedy(model, tokenizer, prompt, max_new_tokens):
    ids = torch.tensor([tokenizer.encode(prompt)])
    out = model.generate(
        ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens, do_sample=False,
        pad_token_id=0, eos_token_id=None,
    )
    return out[0, ids.shape[1] :].tolist()


def test_generate_batched_greedy_matches_hf_generate(tokenizer, tiny_model, tmp_path):
    prompts = ["Q: What is 2 + 3?\nA:", "Hello", "A much longer prompt that pads the others on the left"]
    path = write_jsonl(tmp_path / "gen.jsonl", [{"prompt": p, "answer": "x"} for p in prompts])
    task = build_task(TaskSpec("generate", path, options={"max_new_tokens": 6, "stop": "\x00"}), tokenizer)
    with torch.inference_mode():
        ours = [task.cut(t) for t in _decode_tokens(task, tiny_model)]
    theirs = [task.cut(hf_greedy(tiny_model, tokenizer, p, 6)) for p in prompts]
    assert ours == theirs


def _decode_tokens(task, model):
    from search.fitness import greedy_decode

    return greedy_decode(model, [t for t, _ in task.items], task.max_new_tokens, task.stop_token_mask)


def test_generate_exact_match_and_contains(tokenizer, tiny_model, tmp_path):
    prompts = ["a", "bb", "ccc", "dddd"]
    probe = write_jsonl(tmp_path / "probe.jsonl", [{"prompt": p, "answer": ""} for p in prompts])
    options = {"max_new_tokens": 4, "stop": "\x00"}
    task = build_task(TaskSpec("generate", probe, options=options), tokenizer)
    with torch.inference_mode():
        outputs = task.generate(tiny_model, [t for t, _ in task.items])
    assert all(len(o) > 0 for o in outputs)
    # answers: the model's own output (padded with spaces), a wrong one, a substring, a wrong one
    answers = [f"  {outputs[0]} ", "\x01nope", outputs[2][:1], "\x01nope"]
    path = write_jsonl(tmp_path / "gen.jsonl", [{"prompt": p, "answer": a} for p, a in zip(prompts, answers)])
    metrics = build_task(TaskSpec("generate", path, options=options), tokenizer).evaluate(tiny_model)
    assert metrics["exact_match"] == pytest.approx((1 + (len(outputs[2].strip()) == 1)) / 4)
    assert metrics["contains"] == pytest.approx(2 / 4) and metrics["score"] == metrics["exact_match"]
    contains = build_task(TaskSpec("generate", path, options={**options, "match": "contains"}), tokenizer)
    assert contains.evaluate(tiny_model)["score"] == pytest.approx(2 / 4)


def test_generate_stops_at_newline(tokenizer):
    task = build_task(TaskSpec("generate", "arithmetic:dev"), tokenizer)
    assert task.cut(tokenizer.encode(" 81\nQ: next")) == " 81"
    assert task.cut(tokenizer.encode(" 81") + [tokenizer.eos_token_id] + tokenizer.encode("99")) == " 81"
    mask = task.stop_token_mask(len(tokenizer))
    assert mask[tokenizer.encode("\n")[0]] and mask[tokenizer.eos_token_id] and not mask[tokenizer.encode("8")[0]]


def test_generate_bad_rows(tokenizer, tmp_path):
    path = write_jsonl(tmp_path / "gen.jsonl", [{"prompt": "p", "answer": "a"}, {"prompt": "p", "answer": 3}])
    with pytest.raises(TaskError, match="gen.jsonl: row 2: field 'answer' must be str"):
        build_task(TaskSpec("generate", path), tokenizer)


def test_default_batches_bound_the_logits_and_do_not_change_the_sum(tokenizer, tiny_model, docs_file, monkeypatch):
    """Without `batch_tokens`, a batch's float32 logits stay within the budget (rows x width x
    vocabulary x 4 bytes); the scores are those of one batch per window."""
    from search.fitness import kernels

    spec = dict(context_length=16)
    whole = build_task(TaskSpec("perplexity", docs_file, options={**spec, "batch_tokens": 100_000}), tokenizer)
    expected = whole.evaluate(tiny_model)["nll_sum"]
    vocab = tiny_model.config.vocab_size
    monkeypatch.setattr(kernels, "BATCH_BUDGET_BYTES", 4 * vocab * 40)  # 40 positions' logits
    assert kernels.default_batch_tokens(tiny_model) == 40
    shapes = []
    hook = tiny_model.register_forward_hook(lambda module, inputs, output: shapes.append(output.logits.shape))
    try:
        bounded = build_task(TaskSpec("perplexity", docs_file, options=spec), tokenizer).evaluate(tiny_model)
    finally:
        hook.remove()
    assert len(shapes) > 1 and all(rows * width <= 40 for rows, width, _ in shapes)
    assert bounded["nll_sum"] == pytest.approx(expected, rel=1e-6)


def test_the_default_batch_is_smaller_only_for_a_large_vocabulary():
    from types import SimpleNamespace

    from search.fitness.kernels import DEFAULT_BATCH_TOKENS, default_batch_tokens

    def model(vocab):
        return SimpleNamespace(config=SimpleNamespace(vocab_size=vocab))

    assert default_batch_tokens(model(49152)) == 1365  # SmolLM2: 256 MiB / (4 B x 49,152)
    assert default_batch_tokens(model(8192)) == DEFAULT_BATCH_TOKENS  # 8,192 x 8,192 x 4 B = 256 MiB
    assert default_batch_tokens(model(10**9)) == 1  # a batch is never empty
