"""Issue 18: what a practitioner with their own models, data and tasks got wrong without a word.

One test (or a few) per item, each failing on the code before the fix:
1. multiple choice: choices that already begin with a space were scored after a doubled space;
2. the expert cache ignored the fine-tune data's content (and the base's weights, versions);
3. an lm-eval task used as fitness selected on its test split (dev = test went unnoticed);
4. a plan space the base architecture cannot take was accepted;
5. the summary said "the best candidate beats the experts' average" when it was a parent, and
   printed a failed expert's score as -1e30;
7. `--quiet` silenced the progress of long set-up steps entirely.
"""
from __future__ import annotations

import io
import json
import logging
import shutil
from pathlib import Path

import pytest
import torch
import yaml

from search.config import ConfigError, load_config, parse_config
from search.fitness import TaskSpec, build_task

ROOT = Path(__file__).resolve().parents[1]


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


# --------------------------------------------------------------------------- 1. the delimiter

ANIMALS = [
    {"context": "The dog says", "choices": ["woof", "meow", "moo"], "label": 0},
    {"context": "The cat says", "choices": ["woof", "meow", "moo"], "label": 1},
    {"context": "Q: Which one moos?\nA:", "choices": ["a cow", "a dog"], "label": 0},
]


def spaced(rows: list[dict]) -> list[dict]:
    """The same questions in the other common format: every choice begins with a space."""
    return [{**r, "choices": [" " + c for c in r["choices"]]} for r in rows]


def test_choices_that_begin_with_a_space_score_exactly_as_lm_eval_format(tokenizer, tiny_model, tmp_path, caplog):
    plain = build_task(TaskSpec("multiple_choice", str(write_jsonl(tmp_path / "plain.jsonl", ANIMALS))), tokenizer)
    with caplog.at_level(logging.WARNING, logger="search.fitness.multiple_choice"):
        spaced_task = build_task(TaskSpec("multiple_choice", str(write_jsonl(tmp_path / "spaced.jsonl", spaced(ANIMALS)))), tokenizer)
    # the scored text is context + " woof" in both formats: one space, never two
    first = spaced_task.items[0]
    assert tokenizer.decode(first.context) == "The dog says"
    assert [tokenizer.decode(c) for c in first.continuations] == [" woof", " meow", " moo"]
    for a, b in zip(plain.items, spaced_task.items):
        assert (a.context, a.continuations, a.chars, a.bytes) == (b.context, b.continuations, b.chars, b.bytes)
    assert plain.evaluate(tiny_model) == spaced_task.evaluate(tiny_model)
    # and it is said, once per task
    warned = [r for r in caplog.records if "begin with whitespace" in r.getMessage()]
    assert len(warned) == 1 and "8 of 8 choices" in warned[0].getMessage() and "target_delimiter" in warned[0].getMessage()
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="search.fitness.multiple_choice"):
        build_task(TaskSpec("multiple_choice", str(tmp_path / "spaced.jsonl")), tokenizer)
    assert not [r for r in caplog.records if "begin with whitespace" in r.getMessage()]


def test_target_delimiter_is_an_explicit_option(tokenizer, tmp_path, caplog):
    data = str(write_jsonl(tmp_path / "mc.jsonl", ANIMALS))
    default = build_task(TaskSpec("multiple_choice", data), tokenizer)
    explicit = build_task(TaskSpec("multiple_choice", data, options={"target_delimiter": " "}), tokenizer)
    assert default.items[0].continuations == explicit.items[0].continuations
    newline = build_task(TaskSpec("multiple_choice", data, options={"target_delimiter": "\n"}), tokenizer)
    assert tokenizer.decode(newline.items[0].continuations[0]) == "\nwoof"
    # data in the spaced format with the delimiter stated as "": the same text, and no warning
    spaced_data = str(write_jsonl(tmp_path / "spaced.jsonl", spaced(ANIMALS)))
    with caplog.at_level(logging.WARNING, logger="search.fitness.multiple_choice"):
        stated = build_task(TaskSpec("multiple_choice", spaced_data, name="stated", options={"target_delimiter": ""}), tokenizer)
    assert stated.items[0].continuations == default.items[0].continuations
    assert not [r for r in caplog.records if "begin with whitespace" in r.getMessage()]
    with pytest.raises(Exception, match="not both"):
        build_task(TaskSpec("multiple_choice", data, options={"target_delimiter": " ", "delimiter": " "}), tokenizer)
    with pytest.raises(Exception, match="target_delimiter must be a string"):
        build_task(TaskSpec("multiple_choice", data, options={"target_delimiter": 1}), tokenizer)


# --------------------------------------------------------------------------- 2. the expert cache


def expert_config(data: Path, base: str = "tiny-llama") -> dict:
    tune = {"steps": 1, "batch_size": 2, "seq_len": 16, "lora_rank": 0, "lr": 1e-3}
    return {
        "name": "cache",
        "parents": {
            "base": {"name": "base", "source": base},
            "experts": [
                {"name": "mine", "source": "base", "finetune": {"data": str(data), **tune}},
                {"name": "arith", "source": "base", "finetune": {"data": "arithmetic:train", **tune}},
            ],
        },
        "tasks": [{"name": "a", "kind": "perplexity", "dev": "arithmetic:dev", "test": "arithmetic:test"}],
    }


def test_editing_the_finetune_data_rebuilds_the_expert(tmp_path, monkeypatch):
    from search.models import experts

    monkeypatch.setenv("EVOFUSE_CACHE", str(tmp_path / "cache"))
    builds = []
    real = experts.finetune
    monkeypatch.setattr(experts, "finetune", lambda model, tok, spec, **kw: builds.append(spec.data) or real(model, tok, spec, **kw))
    data = write_jsonl(tmp_path / "ft.jsonl", [{"text": f"def f{i}(x):\n    return x + {i}\n"} for i in range(40)])
    config = parse_config(expert_config(data))

    first = experts.resolve_parents(config, quiet=True)
    assert len(builds) == 2
    assert experts.resolve_parents(config, quiet=True) == first and len(builds) == 2  # cached: nothing rebuilt
    data.write_text(data.read_text())  # rewritten, same content: still the same expert
    assert experts.resolve_parents(config, quiet=True) == first and len(builds) == 2

    write_jsonl(data, [{"text": f"class C{i}:\n    pass\n"} for i in range(40)])  # edited in place, same name
    second = experts.resolve_parents(config, quiet=True)
    assert second["mine"] != first["mine"] and builds[-1] == str(data) and len(builds) == 3
    assert second["arith"] == first["arith"]  # its data did not change
    key = json.loads((second["mine"] / "evofuse_expert.json").read_text())
    assert key["data"]["sha256"] != json.loads((first["mine"] / "evofuse_expert.json").read_text())["data"]["sha256"]
    from safetensors.torch import load_file

    old, new = load_file(str(first["mine"] / "model.safetensors")), load_file(str(second["mine"] / "model.safetensors"))
    assert any(not torch.equal(old[k], new[k]) for k in old)


def test_the_expert_key_covers_base_weights_settings_and_versions(tmp_path, monkeypatch):
    from search.config import FineTune
    from search.models import experts
    from search.models.tiny import byte_tokenizer, tiny_llama

    monkeypatch.setenv("EVOFUSE_CACHE", str(tmp_path / "cache"))
    base = tmp_path / "base"
    tiny_llama(seed=0).save_pretrained(base)
    byte_tokenizer().save_pretrained(base)
    spec = FineTune(data="arithmetic:train", steps=3)
    digest = lambda identity, s=spec: json.dumps(experts.expert_key(identity, s), sort_keys=True)  # noqa: E731
    before = digest(experts.directory_fingerprint(base))
    assert digest(experts.directory_fingerprint(base)) == before
    tiny_llama(seed=1).save_pretrained(base)  # other weights, same path and file names
    assert digest(experts.directory_fingerprint(base)) != before
    identity = experts.directory_fingerprint(base)
    for change in ({"steps": 4}, {"lr": 1e-3}, {"seed": 1}, {"lora_alpha": 8.0}, {"seq_len": 64}, {"batch_size": 4}):
        assert digest(identity, spec.model_copy(update=change)) != digest(identity), change
    plain = digest(identity)
    monkeypatch.setattr(torch, "__version__", "0.0.0")
    assert digest(identity) != plain
    key = experts.expert_key(identity, spec)
    assert {"torch", "transformers", "version", "source", "data", "finetune"} <= set(key)
    assert key["data"]["generator_version"] >= 1 and key["data"]["builtin"] == "arithmetic:train"


# --------------------------------------------------------------------------- 3. dev and test


def run_config(tmp_path: Path, tasks: list[dict], name: str = "run.yaml", **extra) -> Path:
    raw = yaml.safe_load((ROOT / "configs" / "tiny.yaml").read_text())
    raw.update(tasks=tasks, **extra)
    path = tmp_path / name
    path.write_text(yaml.safe_dump(raw))
    return path


LM_EVAL_YAML = (ROOT / "configs" / "lm_eval" / "compare.yaml").read_text()


def lm_eval_yaml(tmp_path: Path, name: str, test_split: str | None = "test") -> Path:
    text = LM_EVAL_YAML.replace("configs/lm_eval/", str(ROOT / "configs" / "lm_eval") + "/")
    if test_split != "test":
        text = text.replace("test_split: test", f"test_split: {test_split}")
    path = tmp_path / name
    path.write_text(text)
    return path


def test_an_lm_eval_task_whose_dev_is_its_test_split_is_refused(tmp_path):
    x = lm_eval_yaml(tmp_path, "x.yaml")
    same = {"name": "mc", "kind": "lm_eval", "dev": str(x), "test": str(x)}
    with pytest.raises(ConfigError, match=r"tasks\[0\]: dev .* and test .* are the same documents .*:validation"):
        load_config(run_config(tmp_path, [same]))
    copy = shutil.copy(x, tmp_path / "copy.yaml")  # another file, the same task: still the same documents
    with pytest.raises(ConfigError, match="same documents"):
        load_config(run_config(tmp_path, [{**same, "test": str(copy)}]))
    # lm-eval's default split is test_split: naming validation for dev and nothing for test is fine
    ok = load_config(run_config(tmp_path, [{**same, "dev": f"{x}:validation"}]))
    assert ok.tasks[0].dev.endswith("x.yaml:validation")
    load_config(run_config(tmp_path, [{**same, "dev": f"{x}:validation", "test": f"{copy}:test"}]))
    with pytest.raises(ConfigError, match=r"tasks\[0\]\.dev: .*no training_split"):
        load_config(run_config(tmp_path, [{**same, "dev": f"{x}:train"}]))
    both = lm_eval_yaml(tmp_path, "both.yaml", test_split="validation")  # a YAML whose two splits are one
    with pytest.raises(ConfigError, match="validation_split and test_split are both"):
        load_config(run_config(tmp_path, [{**same, "dev": f"{both}:validation", "test": f"{both}:test"}]))
    # registry tasks are not read at config time: the same name needs two named splits
    named = {"name": "hs", "kind": "lm_eval", "dev": "hellaswag", "test": "hellaswag"}
    for dev, test in (("hellaswag", "hellaswag"), ("hellaswag:validation", "hellaswag"), ("hellaswag:dev", "hellaswag:validation")):
        with pytest.raises(ConfigError, match="do not name two different splits"):
            load_config(run_config(tmp_path, [{**named, "dev": dev, "test": test}]))
    load_config(run_config(tmp_path, [{**named, "dev": "hellaswag:validation", "test": "hellaswag:test"}]))


def test_dev_and_test_with_the_same_documents_are_refused_for_every_kind(tmp_path):
    rows = [{"prompt": f"Q: {i} + 1?\nA:", "answer": str(i + 1)} for i in range(6)]
    dev = write_jsonl(tmp_path / "dev.jsonl", rows)
    test = tmp_path / "test.jsonl"  # the same rows, other order and spacing
    test.write_text("".join(json.dumps(r, indent=None, separators=(", ", ":")) + "\n" for r in reversed(rows)))
    task = {"name": "t", "kind": "generate", "dev": str(dev), "test": str(test)}
    with pytest.raises(ConfigError, match=r"tasks\[0\]\.test: .* same documents as dev"):
        load_config(run_config(tmp_path, [task]))
    text = tmp_path / "a.txt"
    text.write_text("some held-out text " * 20)
    twin = shutil.copy(text, tmp_path / "b.txt")
    with pytest.raises(ConfigError, match="files with the same content"):
        load_config(run_config(tmp_path, [{"name": "p", "kind": "perplexity", "dev": str(text), "test": str(twin)}]))
    with pytest.raises(ConfigError, match="the same split"):
        load_config(run_config(tmp_path, [{"name": "c", "kind": "multiple_choice", "dev": "compare:dev", "test": "compare:dev"}]))
    write_jsonl(test, rows[:3] + [{"prompt": "Q: 9 + 9?\nA:", "answer": "18"}])  # overlapping, not equal: allowed
    load_config(run_config(tmp_path, [task]))


@pytest.mark.skipif(__import__("importlib").util.find_spec("lm_eval") is None, reason="lm-eval is not installed")
def test_lm_eval_items_score_the_split_they_name(tokenizer):
    data = str(ROOT / "configs" / "lm_eval" / "compare.yaml")
    docs = {}
    for split in ("validation", "test"):
        task = build_task(TaskSpec("lm_eval", f"{data}:{split}"), tokenizer)
        docs[split] = [d["context"] for d in task.tasks[0].eval_docs]
    default = build_task(TaskSpec("lm_eval", data), tokenizer)
    expected = [json.loads(line)["context"] for line in (ROOT / "configs/lm_eval/compare_validation.jsonl").read_text().splitlines()]
    assert docs["validation"] == expected
    assert docs["test"] == [d["context"] for d in default.tasks[0].eval_docs]  # lm-eval's own default
    assert not set(docs["validation"]) & set(docs["test"])
    with pytest.raises(Exception, match="no training_split"):
        build_task(TaskSpec("lm_eval", f"{data}:train"), tokenizer)


def test_the_lm_eval_example_config_loads():
    config = load_config(ROOT / "configs" / "lm-eval.yaml")
    task = next(t for t in config.tasks if t.kind == "lm_eval")
    assert task.dev.endswith(":validation") and task.test.endswith(":test")


# --------------------------------------------------------------------------- 4. space vs architecture


def gpt2_dir(tmp_path: Path) -> Path:
    from transformers import GPT2Config, GPT2LMHeadModel

    from search.models.tiny import byte_tokenizer

    path = tmp_path / "gpt2"
    config = GPT2Config(n_layer=4, n_embd=32, n_head=4, vocab_size=259, n_positions=256, bos_token_id=1, eos_token_id=2)
    GPT2LMHeadModel(config).save_pretrained(path)
    byte_tokenizer().save_pretrained(path)
    return path


def test_a_plan_space_the_base_architecture_cannot_take_is_refused(tmp_path, capsys, cli_stderr):
    raw = yaml.safe_load((ROOT / "configs" / "tiny-joint.yaml").read_text())
    base = str(gpt2_dir(tmp_path))
    raw["parents"]["base"] = {"name": "base", "source": base}
    for expert in raw["parents"]["experts"]:
        expert["source"] = "base"
    path = tmp_path / "gpt2-joint.yaml"
    path.write_text(yaml.safe_dump(raw))
    with pytest.raises(ConfigError, match=r"^compress\.space\.width: 'prune_width' cannot change the base model "
                                          r"\(model_type 'gpt2'\).*not model_type 'gpt2'"):
        load_config(path)
    from search.cli import main

    capsys.readouterr()
    assert main(["search", str(path), "--run-dir", str(tmp_path / "run"), "--quiet"]) == 2
    err = cli_stderr().splitlines()
    assert len(err) == 1 and "compress.space.width" in err[0] and not (tmp_path / "run").exists()
    raw["compress"]["space"]["width"] = ["none"]  # without width pruning the same space is fine on GPT-2
    path.write_text(yaml.safe_dump(raw))
    load_config(path)


def test_a_range_end_that_cannot_apply_names_its_field(tmp_path):
    raw = yaml.safe_load((ROOT / "configs" / "tiny-joint.yaml").read_text())
    raw["compress"]["space"]["width_ratio"] = {"low": 0.1, "high": 0.99}  # no head left in a 4-head layer
    path = tmp_path / "joint.yaml"
    path.write_text(yaml.safe_dump(raw))
    with pytest.raises(ConfigError, match=r"^compress\.space\.width_ratio\.high: 'prune_width' with ratio=0\.99 .*narrow the range"):
        load_config(path)


# --------------------------------------------------------------------------- 5. the summary


def summary_of(tmp_path: Path, monkeypatch, rows: list[dict]) -> str:
    from search.results import report
    from search.run.store import RunStore

    config = parse_config(yaml.safe_load((ROOT / "configs" / "tiny.yaml").read_text()))
    store = RunStore(tmp_path)
    store.journal_path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    population = [{"id": r["id"], "score": r["score"]} for r in rows if r["split"] == "dev"]
    monkeypatch.setattr(report, "_load", lambda run_dir: (store, config, {"population": population}))
    return report.results_table(tmp_path)


def row(cid: str, score: float, arith: float, compare: float, status: str = "ok", split: str = "dev") -> dict:
    metric = lambda s: {"score": s, "token_perplexity": float(torch.tensor(-s).exp())}  # noqa: E731
    metrics = {"arith": metric(arith), "compare": metric(compare)} if status == "ok" else {}
    recipe = {"op": "copy", "inputs": [cid]}
    return {"id": cid, "recipe": recipe, "plan": [], "split": split, "status": status, "metrics": metrics, "score": score}


def test_the_summary_says_plainly_when_no_merged_candidate_beat_the_best_parent(tmp_path, monkeypatch):
    text = summary_of(tmp_path, monkeypatch, [
        row("base", -4.0, -4.0, -4.0), row("arith", -2.5, -1.5, -3.5), row("compare", -2.0, -2.5, -1.5),
        row("g000-002", -2.2, -1.8, -2.6), row("g001-000", -2.4, -2.0, -2.8),
    ])
    assert "beats the experts' average" not in text
    assert "No merged candidate beat the best parent: compare (dev score -2.0000) is ahead of the best merged candidate " \
           "(g000-002, -2.2000) by 0.2000" in text
    assert "| g000-002 | best merged candidate | -2.2000 |" in text
    assert "- arith: no merged candidate beats the best parent: g000-002 token_perplexity 6.0496 against arith 4.4817 " \
           "(difference +1.5680)" in text
    assert "- compare: no merged candidate beats the best parent: g000-002" in text
    better = summary_of(tmp_path, monkeypatch, [
        row("base", -4.0, -4.0, -4.0), row("arith", -2.5, -1.5, -3.5), row("compare", -2.0, -2.5, -1.5),
        row("g000-002", -1.7, -1.6, -1.8),
    ])
    assert "The best merged candidate (g000-002, dev score -1.7000) beats the best parent (compare, -2.0000) by 0.3000" in better


def test_a_failed_or_non_finite_parent_is_shown_as_such(tmp_path, monkeypatch):
    text = summary_of(tmp_path, monkeypatch, [
        row("base", -4.0, -4.0, -4.0), row("arith", -1e30, 0, 0, status="nonfinite"), row("compare", -2.0, -2.5, -1.5),
        row("g000-002", -2.2, -1.8, -2.6), row("g000-003", float("nan"), 0, 0, status="failed"),
    ])
    assert "1000000000000000019884624838656" not in text and "e+30" not in text
    assert "| arith | expert | non-finite | - |" in text
    assert "Left out of every comparison below (no finite dev score): arith (non-finite)." in text
    assert "the experts' average is -2.0000" in text  # the finite expert only


# --------------------------------------------------------------------------- 7. quiet progress


def test_quiet_setup_steps_print_one_line_with_an_eta_and_one_at_the_end():
    from search.models.progress import SetupStep

    clock = iter([0.0, 25.0, 35.0, 60.0]).__next__  # start, after step 1 (warm-up), after step 2, the end
    out = io.StringIO()
    with SetupStep("fine-tune expert arith", total=5, quiet=True, stream=out, clock=clock) as step:
        for _ in range(5):
            step.update(loss="1.0")
    lines = out.getvalue().splitlines()
    assert len(lines) == 2
    assert lines[0].startswith("fine-tune expert arith: 5 steps, ETA 30 s (until ")  # 3 steps left at 10 s each
    assert lines[1] == "fine-tune expert arith: done in 1 min 00 s"
    out = io.StringIO()
    with SetupStep("smollm2-135m: converting the GGUF to safetensors, once", estimate_s=25, stream=out, clock=iter([0.0, 27.0]).__next__):
        pass
    assert out.getvalue().splitlines() == [
        "smollm2-135m: converting the GGUF to safetensors, once (about 25 s) ...",
        "smollm2-135m: converting the GGUF to safetensors, once: done in 27 s",
    ]


def test_expert_finetuning_reports_progress_under_quiet(tokenizer, tiny_model, capsys):
    from search.config import FineTune
    from search.models.experts import finetune

    finetune(tiny_model, tokenizer, FineTune(data="arithmetic:train", steps=2, batch_size=2, seq_len=16, lora_rank=0),
             label="expert arith", quiet=True)
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 2 and err[0].startswith("fine-tune expert arith: 2 steps, ETA ") and "done in" in err[1]
