"""The contract every fitness task kind keeps, checked for each registered kind but lm_eval.

One parametrized class (as Optuna tests each storage against one contract): each kind is
scored on small files written here and compared with a plain computation — explicit loops over
items, one unbatched model call at a time — and then held to the common properties: evaluate
is deterministic, a subsample is the same as its indices, metrics are finite floats with a
"score", per-example scores add up to the score, and a subset's per-example scores are the
full run's. lm_eval is checked against lm-eval itself in tests/test_lm_eval_parity.py.
"""
from __future__ import annotations

import json
import math

import pytest
import torch

from search.fitness import (
    TASK_KINDS,
    FitnessTask,
    TaskError,
    TaskSpec,
    build_task,
    register_task_kind,
    subsample_indices,
)
from search.models.tiny import tiny_llama

REL = 1e-5
DOCS = [
    "The quick brown fox jumps over the lazy dog.",
    "Python lets you work quickly.\nCafé, naïve: bytes are not characters.",
    "short",
    "A fourth document, so that subsets have something to leave out.",
    "def f(x):\n    return x + 1\n",
]
MC_ROWS = [
    {"context": "The capital of France is", "choices": ["Paris", "London", "a big city"], "label": 0},
    {"context": "2 + 2 =", "choices": ["4", "5"], "label": 0},
    {"context": "Q: Which is a colour?\nA:", "choices": ["red", "dog", "seven", "run"], "label": 0},
    {"context": "Café au lait is made with", "choices": ["milk", "crème fraîche"], "label": 1},
    {"context": "The opposite of up is", "choices": ["down", "sideways"], "label": 0},
]
PROMPTS = ["Q: What is 2 + 3?\nA:", "Hello", "A much longer prompt that pads the others", "x", "def f("]
KL_TEXT = " ".join(DOCS) * 2


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return str(path)


def logprobs(model, ids: list[int]) -> torch.Tensor:
    """log p(next token) at every position of one unbatched sequence, float64.  -> (len(ids), V)"""
    with torch.no_grad():
        return torch.log_softmax(model(torch.tensor([ids])).logits[0].double(), dim=-1)


def argmax_first(values: list[float]) -> int:
    return max(range(len(values)), key=lambda i: (values[i], -i))


# ----------------------------------------------------------------------------- one case per kind


class PerplexityCase:
    kind = "perplexity"

    def build(self, tmp_path, tokenizer, model):
        path = write_jsonl(tmp_path / "docs.jsonl", [{"text": d} for d in DOCS])
        return build_task(TaskSpec("perplexity", path, options={"context_length": 512}), tokenizer)

    def evaluate(self, task, model, **kwargs):
        return task.evaluate(model, **kwargs)

    def plain(self, task, model, tokenizer):
        """Each document in one pass over [BOS] + tokens: LL_d = sum_j log p(t_j | t_<j)."""
        values, weights = [], []
        for doc in DOCS:
            tokens = tokenizer.encode(doc)
            logp = logprobs(model, [tokenizer.bos_token_id, *tokens])
            values.append(sum(float(logp[j, t]) for j, t in enumerate(tokens)))
            weights.append(float(len(tokens)))
        nll = -sum(values)
        metrics = {"score": -nll / sum(weights), "nll_sum": nll, "tokens": sum(weights),
                   "byte_perplexity": math.exp(nll / sum(len(d.encode()) for d in DOCS))}
        return metrics, values, weights


class MultipleChoiceCase:
    kind = "multiple_choice"

    def build(self, tmp_path, tokenizer, model):
        return build_task(TaskSpec("multiple_choice", write_jsonl(tmp_path / "mc.jsonl", MC_ROWS)), tokenizer)

    def evaluate(self, task, model, **kwargs):
        return task.evaluate(model, **kwargs)

    def plain(self, task, model, tokenizer):
        """LL of " " + choice after the context (byte tokens: the joint encoding is the concatenation)."""
        hits = {"acc": [], "acc_norm": [], "acc_bytes": []}
        for row in MC_ROWS:
            ctx = tokenizer.encode(row["context"])
            lls = []
            for choice in row["choices"]:
                cont = tokenizer.encode(" " + choice)
                logp = logprobs(model, ctx + cont)
                lls.append(sum(float(logp[len(ctx) - 1 + j, t]) for j, t in enumerate(cont)))
            chars = [ll / len(c) for ll, c in zip(lls, row["choices"])]
            n_bytes = [ll / len(c.encode()) for ll, c in zip(lls, row["choices"])]
            for key, scores in (("acc", lls), ("acc_norm", chars), ("acc_bytes", n_bytes)):
                hits[key].append(float(argmax_first(scores) == row["label"]))
        metrics = {key: sum(v) / len(v) for key, v in hits.items()}
        return {"score": metrics["acc_norm"], **metrics}, hits["acc_norm"], [1.0] * len(MC_ROWS)


class GenerateCase:
    kind = "generate"
    MAX_NEW = 5

    def greedy(self, model, tokenizer, prompt: str) -> str:
        """Argmax one token at a time, no cache, no batch; stop at EOS or once a "\\n" appears."""
        ids, out = tokenizer.encode(prompt), []
        for _ in range(self.MAX_NEW):
            token = int(logprobs(model, ids + out)[-1].argmax())
            if token == tokenizer.eos_token_id:
                break
            out.append(token)
            if "\n" in tokenizer.decode(out):
                break
        return tokenizer.decode(out, skip_special_tokens=True).split("\n", 1)[0]

    def build(self, tmp_path, tokenizer, model):
        self.outputs = [self.greedy(model, tokenizer, p) for p in PROMPTS]
        # answers: right, wrong, right, a prefix of the output (contains), wrong
        answers = [f" {self.outputs[0]} ", "\x01no", self.outputs[2], self.outputs[3][:1], "\x01no"]
        path = write_jsonl(tmp_path / "gen.jsonl", [{"prompt": p, "answer": a} for p, a in zip(PROMPTS, answers)])
        self.answers = answers
        return build_task(TaskSpec("generate", path, options={"max_new_tokens": self.MAX_NEW}), tokenizer)

    def evaluate(self, task, model, **kwargs):
        return task.evaluate(model, **kwargs)

    def plain(self, task, model, tokenizer):
        outputs = [self.greedy(model, tokenizer, p) for p in PROMPTS]
        exact = [float(o.strip() == a.strip()) for o, a in zip(outputs, self.answers)]
        contains = [float(a.strip() in o) for o, a in zip(outputs, self.answers)]
        metrics = {"score": sum(exact) / 5, "exact_match": sum(exact) / 5, "contains": sum(contains) / 5}
        return metrics, exact, [1.0] * 5


class KLCase:
    kind = "kl"
    T, N = 16, 5

    def build(self, tmp_path, tokenizer, model):
        (tmp_path / "calib.txt").write_text(KL_TEXT, encoding="utf-8")
        options = {"seq_len": self.T, "num_sequences": self.N, "batch_size": 2, "reference_dtype": "float32"}
        self.reference_model = tiny_llama(seed=1)
        return build_task(TaskSpec("kl", str(tmp_path / "calib.txt"), options=options), tokenizer)

    def evaluate(self, task, model, **kwargs):
        if not hasattr(task, "_contract_reference"):
            task._contract_reference = task.reference(self.reference_model)
        return task.evaluate(model, reference=task._contract_reference, **kwargs)

    def plain(self, task, model, tokenizer):
        """Windows cut from the .txt's tokens + EOS; KL(P || Q) summed position by position."""
        stream = tokenizer.encode(KL_TEXT) + [tokenizer.eos_token_id]
        windows = [stream[n * self.T : (n + 1) * self.T] for n in range(self.N)]
        assert task.windows.tolist() == windows
        values = []
        for window in windows:
            logp, logq = logprobs(self.reference_model, window), logprobs(model, window)  # (T, V)
            kl = sum(float((logp[t].exp() * (logp[t] - logq[t])).sum()) for t in range(self.T))
            values.append(-kl)
        positions = float(self.N * self.T)
        return {"kl": -sum(values) / positions, "score": sum(values) / positions, "tokens": positions}, values, [
            float(self.T)] * self.N


CASES = [PerplexityCase(), MultipleChoiceCase(), GenerateCase(), KLCase()]


def test_cases_cover_every_kind_but_lm_eval():
    assert TASK_KINDS[:5] == ("perplexity", "multiple_choice", "generate", "lm_eval", "kl")
    assert {c.kind for c in CASES} == set(TASK_KINDS) - {"lm_eval"}


@pytest.fixture(params=CASES, ids=lambda c: c.kind)
def case(request):
    return request.param


@pytest.fixture()
def task(case, tmp_path, tokenizer, tiny_model):
    return case.build(tmp_path, tokenizer, tiny_model)


# ----------------------------------------------------------------------------- the contract


class TestTaskContract:
    def test_matches_plain_computation(self, case, task, tiny_model, tokenizer):
        metrics = case.evaluate(task, tiny_model, per_example=True)
        expected, values, weights = case.plain(task, tiny_model, tokenizer)
        for key, value in expected.items():
            assert metrics[key] == pytest.approx(value, rel=REL, abs=1e-12), key
        assert metrics["examples"]["value"] == pytest.approx(values, rel=REL, abs=1e-12)
        assert metrics["examples"]["weight"] == weights

    def test_deterministic(self, case, task, tiny_model):
        assert case.evaluate(task, tiny_model) == case.evaluate(task, tiny_model)

    def test_subsample_is_its_indices(self, case, task, tiny_model):
        chosen = subsample_indices(len(task), 3, seed=7)
        assert len(chosen) == 3
        sub = case.evaluate(task, tiny_model, subsample=3, seed=7, per_example=True)
        assert sub == case.evaluate(task, tiny_model, indices=chosen, per_example=True)
        assert sub["examples"]["index"] == chosen

    def test_subset_scores_are_the_full_runs(self, case, task, tiny_model):
        full = case.evaluate(task, tiny_model, per_example=True)["examples"]
        subset = [4, 0, 2]
        part = case.evaluate(task, tiny_model, indices=subset, per_example=True)
        assert part["examples"]["index"] == subset
        assert part["examples"]["value"] == pytest.approx([full["value"][i] for i in subset], rel=REL, abs=1e-12)
        assert part["examples"]["weight"] == [full["weight"][i] for i in subset]
        expected = sum(full["value"][i] for i in subset) / sum(full["weight"][i] for i in subset)
        assert part["score"] == pytest.approx(expected, rel=REL, abs=1e-12)

    def test_metrics_are_finite_floats_with_a_score(self, case, task, tiny_model):
        tiny_model.train()
        metrics = case.evaluate(task, tiny_model)
        assert tiny_model.training  # restored after scoring in eval mode
        assert "score" in metrics and "examples" not in metrics
        for key, value in metrics.items():
            assert type(value) is float and math.isfinite(value), key

    def test_per_example_scores_add_up_to_the_score(self, case, task, tiny_model):
        metrics = case.evaluate(task, tiny_model, per_example=True)
        examples = metrics.pop("examples")
        assert json.loads(json.dumps(examples)) == examples
        assert examples["index"] == list(range(len(task)))
        assert all(type(i) is int for i in examples["index"])
        assert all(type(v) is float for v in examples["value"] + examples["weight"])
        assert all(w > 0 for w in examples["weight"])
        assert sum(examples["value"]) / sum(examples["weight"]) == pytest.approx(metrics["score"], rel=1e-12, abs=1e-15)
        assert metrics == case.evaluate(task, tiny_model)  # per_example only adds "examples"

    def test_the_metrics_of_parts_join_to_the_wholes(self, case, task, tiny_model):
        """A staged run scores a contender's last stage on the items its screens lacked and joins
        the parts (`FitnessTask.joined_metrics`): every metric as if the whole were scored."""
        whole = case.evaluate(task, tiny_model)
        parts = [case.evaluate(task, tiny_model, indices=list(range(start, len(task), 2))) for start in (1, 0)]
        joined = type(task).joined_metrics(parts)
        assert type(task).joins_metrics and joined is not None and joined.keys() == whole.keys()
        for key, value in whole.items():
            assert joined[key] == pytest.approx(value, rel=REL, abs=1e-12), key
        assert type(task).joined_metrics([parts[0], {k: v for k, v in parts[1].items() if k != "score"}]) is None

    @pytest.mark.parametrize("indices, message", [([99], "out of range"), ([1, 1], "distinct"), ([], "non-empty"),
                                                  ([0.5], "integers"), ([True], "integers")])
    def test_bad_indices(self, case, task, tiny_model, indices, message):
        with pytest.raises(TaskError, match=message):
            case.evaluate(task, tiny_model, indices=indices)


# ----------------------------------------------------------------------------- the registry


def test_a_kind_registered_elsewhere_is_built_and_checked(tokenizer, monkeypatch):
    from search.fitness import spec

    monkeypatch.setattr(spec, "_KINDS", dict(spec._KINDS))  # the registration is undone afterwards

    @register_task_kind("constant", {"value"})
    class ConstantTask(FitnessTask):
        def __init__(self, task_spec, tok):
            super().__init__(task_spec, tok)
            self.items = [0, 1]

    assert spec.task_kinds()[-1] == "constant" and ConstantTask.kind == "constant"
    assert isinstance(build_task(TaskSpec("constant", "-", options={"value": 1}), tokenizer), ConstantTask)
    with pytest.raises(TaskError, match="unknown option 'stride' for constant"):
        build_task(TaskSpec("constant", "-", options={"stride": 1}), tokenizer)
    with pytest.raises(TaskError, match="already registered"):
        register_task_kind("perplexity", set())(ConstantTask)
