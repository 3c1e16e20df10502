"""evofuse's fitness numbers equal lm-evaluation-harness's on the same model, data and lengths.

lm-eval (tested with 0.4.13) is a test dependency; without it these tests are skipped. Two
tokenizers: the byte tokenizer (no special tokens added) and a small BPE trained here whose
post-processor adds BOS, so token merges cross the context/continuation boundary and lm-eval's
BOS handling is exercised.
"""
from __future__ import annotations

import copy
import json
import os

import pytest
import torch

lm_eval = pytest.importorskip("lm_eval")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from lm_eval.api.instance import Instance  # noqa: E402
from lm_eval.models.huggingface import HFLM  # noqa: E402
from lm_eval.utils import get_rolling_token_windows, make_disjoint_window  # noqa: E402

from compression.calibration import pydoc_topics  # noqa: E402
from search.models.datasets import load_rows  # noqa: E402
from search.fitness import TaskError, TaskSpec, build_task, rolling_windows, sequence_logprobs  # noqa: E402
from search.models.tiny import tiny_llama  # noqa: E402

REL = 1e-4
MAX_LEN = 48  # short, so documents span several rolling windows and long MC rows are cut
DOCS = [
    "The quick brown fox jumps over the lazy dog. It was a sunny day in the park, and nobody minded at all.",
    "Python lets you work quickly and integrate systems more effectively.\nCafé, naïve, 東京: bytes differ from characters.",
    "short",
    " leading space and trailing space ",
]
MC_ROWS = [
    {"context": "The capital of France is", "choices": ["Paris", "London", "a big city"], "label": 0},
    {"context": "Q: Which is a colour?\nA: ", "choices": ["red", "dog", "seven", "run"], "label": 0},
    {"context": "", "choices": ["yes", "no"], "label": 1},
    {"context": "Café au lait is made with", "choices": ["milk", "crème fraîche"], "label": 1},
    {"context": "A context long enough that context plus continuation is cut on the left, as lm-eval does",
     "choices": ["short", "a somewhat longer continuation"], "label": 1},
]


def bpe_tokenizer_with_bos():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    core = Tokenizer(models.BPE())
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    core.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400, special_tokens=["<pad>", "<s>", "</s>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    core.train_from_iterator(pydoc_topics("train")[:8] + DOCS, trainer)
    core.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    return PreTrainedTokenizerFast(tokenizer_object=core, pad_token="<pad>", bos_token="<s>", eos_token="</s>")


@pytest.fixture(scope="module", params=["bytes", "bpe+bos"])
def setup(request):
    from search.models.tiny import byte_tokenizer

    tok = byte_tokenizer() if request.param == "bytes" else bpe_tokenizer_with_bos()
    model = tiny_llama(seed=1, vocab_size=max(len(tok), 259))
    return tok, model


def hflm(model, tok, **options):
    return HFLM(pretrained=model, tokenizer=copy.deepcopy(tok), batch_size=3, max_length=MAX_LEN, **options)


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return str(path)


def close(a, b):
    return abs(a - b) <= REL * max(abs(a), abs(b), 1e-12)


@pytest.mark.parametrize("n", [1, 10, 47, 48, 49, 96, 97, 150])
def test_rolling_windows_equal_lm_eval(n):
    tokens = list(range(10, 10 + n))
    theirs = [make_disjoint_window(w) for w in get_rolling_token_windows(tokens, 1, MAX_LEN, 1)]
    ours = rolling_windows(tokens, 1, MAX_LEN)
    assert len(ours) == len(theirs)
    for (seq, n_scored), (ctx, cont) in zip(ours, theirs):
        # lm-eval feeds (ctx + cont)[-(L+1):][:-1] and scores the last len(cont) predictions
        assert seq == (ctx + cont)[-(MAX_LEN + 1) :] and n_scored == len(cont)


def test_loglikelihood_rolling_per_document(setup, tmp_path):
    tok, model = setup
    path = write_jsonl(tmp_path / "docs.jsonl", [{"text": d} for d in DOCS])
    task = build_task(TaskSpec("perplexity", path, options={"context_length": MAX_LEN, "batch_size": 2}), tok)
    reqs = [Instance("loglikelihood_rolling", {}, (d,), i) for i, d in enumerate(DOCS)]
    # logits_cache off: lm-eval 0.4.13's cache can mis-score rolling windows batched across
    # documents (seen on SmolLM2, see search/fitness/lm_eval.py); it never helps rolling scoring.
    theirs = hflm(model, tok, logits_cache=False).loglikelihood_rolling(reqs, disable_tqdm=True)
    with torch.inference_mode():
        ours = [sum(sequence_logprobs(model, rolling_windows(t, task.prefix, MAX_LEN))) for t in task.tokens]
    assert len(task.tokens[0]) > MAX_LEN  # several windows really happened
    for a, b in zip(ours, theirs):
        assert close(a, b), (a, b)


@pytest.mark.parametrize("delimiter", [" ", "\n"])
def test_loglikelihood_per_choice(setup, tmp_path, delimiter):
    tok, model = setup
    path = write_jsonl(tmp_path / "mc.jsonl", MC_ROWS)
    options = {"context_length": MAX_LEN, "delimiter": delimiter, "batch_tokens": 64}
    task = build_task(TaskSpec("multiple_choice", path, options=options), tok)
    reqs = [
        Instance("loglikelihood", {}, (row["context"], delimiter + c), i)
        for i, row in enumerate(MC_ROWS) for c in row["choices"]
    ]
    theirs = [ll for ll, _ in hflm(model, tok).loglikelihood(reqs, disable_tqdm=True)]
    for share in (True, False):
        task.share_prefix = share
        with torch.inference_mode():
            ours = [ll for lls in task.choice_logprobs(model, task.items) for ll in lls]
        assert len(ours) == len(theirs)
        for a, b in zip(ours, theirs):
            assert close(a, b), (share, a, b)


def write_tasks(tmp_path):
    """Local-file lm-eval task YAMLs: rolling perplexity over docs.jsonl, MC over mc.jsonl."""
    docs = write_jsonl(tmp_path / "docs.jsonl", [{"text": d} for d in DOCS])
    mc = write_jsonl(tmp_path / "mc.jsonl", MC_ROWS + load_rows("compare:dev")[:16])
    (tmp_path / "ppl.yaml").write_text(
        f"task: parity_ppl\ndataset_path: json\ndataset_kwargs:\n  data_files:\n    test: {docs}\n"
        "test_split: test\noutput_type: loglikelihood_rolling\ndoc_to_text: ''\ndoc_to_target: text\n"
        "metric_list:\n  - metric: word_perplexity\n  - metric: byte_perplexity\n  - metric: bits_per_byte\n"
    )
    (tmp_path / "mc.yaml").write_text(
        f"task: parity_mc\ndataset_path: json\ndataset_kwargs:\n  data_files:\n    test: {mc}\n"
        "test_split: test\noutput_type: multiple_choice\ndoc_to_text: context\ndoc_to_choice: choices\n"
        "doc_to_target: label\nmetric_list:\n  - metric: acc\n  - metric: acc_norm\n  - metric: acc_bytes\n"
    )
    return docs, mc, [str(tmp_path / "ppl.yaml"), str(tmp_path / "mc.yaml")]


def test_end_to_end_metrics_and_adapter_equal_lm_eval(setup, tmp_path):
    """lm-eval's own aggregates (through the `lm_eval` task kind) equal the native tasks'."""
    tok, model = setup
    docs, mc, yamls = write_tasks(tmp_path)
    options = {"context_length": MAX_LEN}
    adapter = build_task(TaskSpec("lm_eval", ",".join(yamls), options=options), tok)
    theirs = adapter.evaluate(model)
    ppl = build_task(TaskSpec("perplexity", docs, options=options), tok).evaluate(model)
    choice = build_task(TaskSpec("multiple_choice", mc, options=options), tok).evaluate(model)
    for metric in ("word_perplexity", "byte_perplexity", "bits_per_byte"):
        assert close(ppl[metric], theirs[f"parity_ppl/{metric}"]), metric
    for metric in ("acc", "acc_norm", "acc_bytes"):
        assert choice[metric] == pytest.approx(theirs[f"parity_mc/{metric}"], abs=1e-12), metric
    assert 0 < choice["acc"] < 1  # a real test: some right, some wrong
    # adapter score: mean of -log(word_perplexity) and acc_norm
    expected = (-torch.log(torch.tensor(ppl["word_perplexity"], dtype=torch.float64)).item() + choice["acc_norm"]) / 2
    assert close(theirs["score"], expected)
    assert not model.training


def test_adapter_subsample_and_errors(tokenizer, tmp_path):
    tok, model = tokenizer, tiny_llama(seed=1)
    _, _, yamls = write_tasks(tmp_path)
    task = build_task(TaskSpec("lm_eval", yamls[1], options={"context_length": MAX_LEN}), tok)
    a = task.evaluate(model, subsample=5, seed=3)
    assert a == task.evaluate(model, subsample=5, seed=3) and 0 <= a["score"] <= 1
    with pytest.raises(TaskError, match="no such lm-eval task YAML"):
        build_task(TaskSpec("lm_eval", str(tmp_path / "nope.yaml")), tok)
    bad_metric = build_task(TaskSpec("lm_eval", yamls[1], options={"metric": "f1", "context_length": MAX_LEN}), tok)
    with pytest.raises(TaskError, match="no metric 'f1'"):
        bad_metric.evaluate(model, subsample=2)


def test_adapter_has_no_per_example_scores(tokenizer, tmp_path):
    """lm-eval scores its own documents per leaf task: no per-example scores, no explicit indices."""
    _, _, yamls = write_tasks(tmp_path)
    task = build_task(TaskSpec("lm_eval", yamls[1], options={"context_length": MAX_LEN}), tokenizer)
    model = tiny_llama(seed=1)
    with pytest.raises(TaskError, match="per-example scores are not available for lm_eval tasks") as info:
        task.evaluate(model, per_example=True)
    assert "\n" not in str(info.value)
    with pytest.raises(TaskError, match="explicit indices are not available for lm_eval tasks"):
        task.evaluate(model, indices=[0, 1])


def test_lm_eval_missing_is_one_clear_line(tokenizer, monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "lm_eval", None)  # import lm_eval -> ImportError
    with pytest.raises(TaskError, match=r"needs lm-evaluation-harness.*pip install 'lm-eval==") as info:
        build_task(TaskSpec("lm_eval", "hellaswag"), tokenizer)
    assert "\n" not in str(info.value)
