"""Bad input is reported as bad input (issue 17, items 1-10): every case of the table exits 2
with one line on stderr naming the file or field, and leaves every run directory as it was
(and creates none). Cases run the CLI in-process (`search.cli.main`) on a small finished run
directory written here (a real config, checkpoint, journal and weights files); none gets as far
as starting Ray, which is the point.

Also here, the pieces of "nothing lost" that need no run: the store's repair after a kill, the
clean end state of a stopped driver, export of a journalled candidate by replaying its recipe,
and that a model directory's own code never runs (a real terminal answering y).
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import pytest
import torch
import yaml

from evolve.population import make_member, member_to_json
from evolve.recipe import Recipe
from search.cli import main
from search.config import dump_config, load_config
from search.run.store import RunStore

ROOT = Path(__file__).resolve().parent.parent


# ---- a finished run directory, without running anything -------------------------------------
def tiny_raw(**changes) -> dict:
    raw = yaml.safe_load((ROOT / "configs" / "tiny.yaml").read_text())
    raw["evolver"]["generations"] = 1
    raw.update(changes)
    return raw


def write_run(root: Path, raw: dict | None = None, parent_dirs: dict | None = None, journal_extra=()) -> RunStore:
    """config.yaml, identity.json, state.json (finished), journal and one member's weights."""
    config_path = root.parent / f"{root.name}.yaml"
    config_path.write_text(yaml.safe_dump(raw or tiny_raw()))
    config = load_config(config_path)
    config.run_dir = str(root)
    store = RunStore(root)
    root.mkdir(parents=True)
    store.write_identity(config.fingerprint(), config.model_dump(mode="json", exclude={"run_dir"}))
    store.write_config(dump_config(config))
    names = [p.name for p in config.parents.all()]
    child = Recipe(op="linear", inputs=tuple(names[1:]), params={"weight": [0.5, 0.5]}, seed=1)
    weights = {"w": torch.arange(6, dtype=torch.float32).reshape(2, 3)}
    checksums = {} if parent_dirs else {"g000-001": store.save_weights("g000-001", weights)}
    members = [member_to_json(make_member(n, Recipe(op="copy", inputs=(n,)), -2.0 - i)) for i, n in enumerate(names)]
    members[1] = member_to_json(make_member("g000-001", child, -1.5))
    rows = [{"id": n, "recipe": {"op": "copy", "inputs": [n]}, "plan": [], "split": split, "status": "ok",
             "metrics": {}, "score": -2.0 - i} for i, n in enumerate(names) for split in ("dev", "test")]
    rows.append({"id": "g000-001", "recipe": child.to_dict(), "plan": [], "split": "dev", "status": "ok", "metrics": {}, "score": -1.5})
    for row in [*rows, *journal_extra]:
        store.append_journal(row)
    store.append_logbook({"gen": 0, "evals": 3, "best": -1.5, "mean": -2.0, "replaced": 1, "best_id": "g000-001", "wall_s": 1.0})
    store.write_state({
        "generation": 1, "status": "finished", "dense_params": 100, "evaluations": 6, "started": 0.0,
        "parents": {n: {"score": -2.0 - i, "num_params": 100, "latency_ms": None} for i, n in enumerate(names)},
        "weight_checksums": checksums, "fingerprint": config.fingerprint(),
        "population": members, "hall_of_fame": members[1:2],
    })
    return store


def tree(*roots: Path) -> dict[str, str]:
    """Every path under the roots with a hash of its content (directories too)."""
    out = {}
    for root in roots:
        if root.exists():
            for path in sorted([root, *root.rglob("*")]):
                out[str(path)] = "dir" if path.is_dir() else hashlib.sha256(path.read_bytes()).hexdigest()
    return out


# ---- the table ------------------------------------------------------------------------------
@dataclass
class Ctx:
    tmp: Path
    run: Path

    def file(self, name: str, data: str | bytes) -> Path:
        path = self.tmp / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data if isinstance(data, bytes) else data.encode())
        return path

    def config(self, **changes) -> Path:
        return self.file("bad.yaml", yaml.safe_dump(tiny_raw(**changes)))

    def task_config(self, kind: str, content: str | bytes, split: str = "dev", options: dict | None = None,
                    suffix: str = ".jsonl") -> Path:
        """A config whose only task reads `content` (a file) as its dev (or test) data."""
        data = self.file(f"data/{split}{suffix}", content)
        good = {"perplexity": "arithmetic:dev", "multiple_choice": "compare:dev", "generate": "arithmetic:dev"}[kind]
        task = {"name": "t", "kind": kind, "dev": good, "test": good, "options": options or {}}
        task[split] = str(data)
        return self.config(tasks=[task])

    def model_dir(self, name: str = "model", **edits) -> Path:
        from search.models.tiny import byte_tokenizer, tiny_llama

        path = self.tmp / name
        tiny_llama(seed=0).save_pretrained(path)
        byte_tokenizer().save_pretrained(path)
        for file, content in edits.items():
            (path / file.replace("__", ".")).write_bytes(content if isinstance(content, bytes) else content.encode())
        return path

    def search_with_base(self, directory: Path) -> list[str]:
        raw = tiny_raw()
        raw["parents"]["base"] = {"name": "base", "source": str(directory)}
        return ["search", str(self.file("parents.yaml", yaml.safe_dump(raw))), "--run-dir", str(self.tmp / "new-run")]


def corrupt_header(ctx: Ctx) -> Path:
    path = ctx.model_dir()
    (path / "model.safetensors").write_bytes(b"\xff\xff\x00\x00\x00\x00\x00\x00{not json")
    return path


def truncated_weights(ctx: Ctx) -> Path:
    path = ctx.model_dir()
    data = (path / "model.safetensors").read_bytes()
    (path / "model.safetensors").write_bytes(data[: len(data) // 2])
    return path


def journal_line(ctx: Ctx, line: bytes) -> None:
    lines = ctx.run.joinpath("journal.jsonl").read_bytes().splitlines(keepends=True)
    lines[2] = line
    ctx.run.joinpath("journal.jsonl").write_bytes(b"".join(lines))


def pickle_dir(ctx: Ctx) -> Path:
    path = ctx.model_dir()
    (path / "model.safetensors").unlink()
    (path / "pytorch_model.bin").write_bytes(b"PK\x03\x04 this is not a torch pickle")
    return path


def merge_config(ctx: Ctx, models: list[Path], **fields) -> Path:
    return ctx.file("merge.yaml", yaml.safe_dump({"models": [{"model": str(m)} for m in models], **fields}))


def auto_map(ctx: Ctx, file: str) -> Path:
    path = ctx.model_dir()
    data = json.loads((path / file).read_text())
    data["auto_map"] = {"AutoConfig": "evil.EvilConfig", "AutoModelForCausalLM": "evil.EvilModel", "AutoTokenizer": ["evil.Tok", None]}
    (path / file).write_text(json.dumps(data))
    (path / "evil.py").write_text(f"open({str(ctx.tmp / 'RAN')!r}, 'w').close()\n")
    return path


def held_lock(ctx: Ctx) -> list[str]:
    """Another process holds the run's lock (as a live driver does)."""
    code = "import fcntl, sys, time; f = open(sys.argv[1], 'a'); fcntl.flock(f, fcntl.LOCK_EX); print('held', flush=True); time.sleep(600)"
    holder = subprocess.Popen([sys.executable, "-c", code, str(ctx.run / ".lock")], stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline().strip() == "held"
    ctx.holder = holder
    return ["resume", str(ctx.run)]


def read_only(ctx: Ctx, monkeypatch) -> list[str]:
    # root ignores file modes: make the store see what a read-only directory or mount answers
    real = os.access
    monkeypatch.setattr("search.run.store.os.access", lambda p, mode: False if Path(p) == ctx.run else real(p, mode))
    return ["resume", str(ctx.run)]


# ---- a run directory an earlier evofuse wrote ----------------------------------------------
# Fields added to the config after the first runs: an earlier evofuse's config.yaml,
# identity.json and checkpoint fingerprint were made without them.
LATER_FIELDS = {"fitness": None, "evolver": ("offspring_per_member", "share_recipe", "merge_population", "merge_params"),
                "workers": ("recipe_stats_gib",)}


def without_later_fields(dumped: dict) -> dict:
    old = {k: v for k, v in dumped.items() if LATER_FIELDS.get(k, ()) is not None}
    for section, names in LATER_FIELDS.items():
        if names:
            old[section] = {k: v for k, v in old[section].items() if k not in names}
    return old


def made_by_earlier_version(run: Path, identity_edits: dict | None = None) -> Path:
    """Rewrite a run directory as an evofuse before LATER_FIELDS would have written it (its
    identity's config changed by `identity_edits` after its fingerprint was taken)."""
    from search.config import identity_hash

    store = RunStore(run)
    old = without_later_fields(store.read_identity()["config"])
    fingerprint = identity_hash(old)
    for dotted, value in (identity_edits or {}).items():
        *path, last = dotted.split(".")
        section = old
        for key in path:
            section = section[key]
        section[last] = value
    store.write_identity(fingerprint, old)
    store.write_config(yaml.safe_dump(without_later_fields(yaml.safe_load(store.config_path.read_text())), sort_keys=False))
    state = store.read_state()
    store.write_state({**state, "fingerprint": fingerprint})
    return run


R = lambda ctx: str(ctx.run)  # noqa: E731

# (id, what the case sets up and returns as argv, a piece of the one line it must print)
CASES: list[tuple[str, Callable, str]] = [
    # 1. export never deletes what it did not write
    ("export-out-is-run", lambda c: ["export", R(c), "--id", "base", "--out", R(c)], "is the run directory"),
    ("export-out-in-run", lambda c: ["export", R(c), "--top", "1", "--out", R(c) + "/weights"], "inside the run directory"),
    ("export-out-holds-run", lambda c: ["export", R(c), "--id", "base", "--out", str(c.tmp)], "holds the run directory"),
    ("export-out-not-empty", lambda c: ["export", R(c), "--id", "base", "--out", str(c.file("mine/keep.txt", "x").parent)], "not empty"),
    ("export-top-target-not-empty", lambda c: ["export", R(c), "--top", "1", "--out", str(c.file("mine/g000-001/a", "x").parent.parent)],
     "mine/g000-001: not empty"),
    ("export-force-not-an-export", lambda c: ["export", R(c), "--id", "base", "--force", "--out", str(c.file("m/k", "x").parent)],
     "not an earlier evofuse export"),
    ("export-out-file", lambda c: ["export", R(c), "--id", "base", "--out", str(c.file("f.txt", "x"))], "is a file"),
    # 2. one driver per run
    ("resume-locked", held_lock, "in use by evofuse process"),
    # 3. the config is the run's identity from the start
    ("resume-changed-task-before-checkpoint", lambda c: (c.run.joinpath("state.json").unlink(), c.run.joinpath("config.yaml").write_text(
        c.run.joinpath("config.yaml").read_text().replace("arithmetic:dev", "compare:dev")), ["resume", R(c)])[-1],
     "config.yaml: changed since the run started (tasks[0].dev: 'arithmetic:dev' -> 'compare:dev')"),
    ("resume-changed-F", lambda c: (c.run.joinpath("config.yaml").write_text(
        c.run.joinpath("config.yaml").read_text().replace("F: 0.5", "F: 0.9")), ["resume", R(c)])[-1], "evolver.F: 0.5 -> 0.9"),
    ("resume-earlier-version-changed-F", lambda c: (made_by_earlier_version(c.run), c.run.joinpath("config.yaml").write_text(
        c.run.joinpath("config.yaml").read_text().replace("F: 0.5", "F: 0.9")), ["resume", R(c)])[-1], "evolver.F: 0.5 -> 0.9"),
    ("resume-earlier-version-identity-edited", lambda c: (made_by_earlier_version(c.run, {"evolver.F": 0.9}), ["resume", R(c)])[-1],
     "config.yaml: changed since the run started (evolver.F: 0.9 -> 0.5)"),
    ("resume-identity-fingerprint-not-of-its-config", lambda c: (made_by_earlier_version(c.run, {"evolver.CR": 0.9}),
        c.run.joinpath("config.yaml").write_text(c.run.joinpath("config.yaml").read_text().replace("CR: 0.5", "CR: 0.9")),
        ["resume", R(c)])[-1], "changed since the run started (identity.json's fingerprint is not of its config)"),
    ("resume-identity-unknown-field", lambda c: (made_by_earlier_version(c.run, {"evolver.mutation_rate": 0.1}), ["resume", R(c)])[-1],
     "changed since the run started (identity.json's evolver.mutation_rate: Extra inputs are not permitted, as this evofuse reads it)"),
    # 6, 7. task data and options checked when the config loads
    ("task-malformed-line", lambda c: ["search", str(c.task_config("perplexity", '{"text": "a"}\n{"text": \n')), "--run-dir", str(c.tmp / "r")],
     "tasks[0].dev: "),
    ("task-missing-field", lambda c: ["search", str(c.task_config("multiple_choice", '{"context": "q", "choices": ["a", "b"]}\n')),
                                      "--run-dir", str(c.tmp / "r")], "missing field 'label'"),
    ("task-label-out-of-range", lambda c: ["search", str(c.task_config("multiple_choice", '{"context": "q", "choices": ["a", "b"], "label": 5}\n')),
                                           "--run-dir", str(c.tmp / "r")], "\"label\" 5 is not an index"),
    ("task-empty-jsonl", lambda c: ["search", str(c.task_config("perplexity", "")), "--run-dir", str(c.tmp / "r")], "no documents"),
    ("task-empty-txt", lambda c: ["search", str(c.task_config("perplexity", "\n", suffix=".txt")), "--run-dir", str(c.tmp / "r")], "is empty"),
    ("task-empty-text", lambda c: ["search", str(c.task_config("perplexity", '{"text": "  "}\n')), "--run-dir", str(c.tmp / "r")],
     "row 1: empty \"text\""),
    ("task-not-utf8", lambda c: ["search", str(c.task_config("generate", b'{"prompt": "\xff\xfe", "answer": "1"}\n')), "--run-dir", str(c.tmp / "r")],
     "not UTF-8"),
    ("task-json-array", lambda c: ["search", str(c.task_config("generate", '["a", "b"]\n')), "--run-dir", str(c.tmp / "r")],
     "expected a JSON object"),
    ("task-bad-text", lambda c: ["search", str(c.task_config("perplexity", '{"text": 3}\n')), "--run-dir", str(c.tmp / "r")], "string \"text\""),
    ("task-bad-test-split", lambda c: ["search", str(c.task_config("generate", '{"prompt": "q"}\n', split="test")), "--run-dir", str(c.tmp / "r")],
     "tasks[0].test: "),
    ("task-unknown-option", lambda c: ["search", str(c.task_config("generate", '{"prompt": "q", "answer": "a"}\n', options={"temprature": 1})),
                                       "--run-dir", str(c.tmp / "r")], "tasks[0].options: "),
    ("task-non-numeric-option", lambda c: ["search", str(c.task_config("generate", '{"prompt": "q", "answer": "a"}\n', options={"batch_size": "8"})),
                                           "--run-dir", str(c.tmp / "r")], "option batch_size must be an integer"),
    # 8. one line, exit 2, not a traceback
    ("search-corrupt-safetensors", lambda c: c.search_with_base(corrupt_header(c)), "parents.base.source: "),
    ("search-truncated-safetensors", lambda c: c.search_with_base(truncated_weights(c)), "cut short"),
    ("eval-corrupt-safetensors", lambda c: ["eval", str(corrupt_header(c)), "--task", "perplexity:pydoc:dev"], "model.safetensors: not a safetensors file"),
    ("compress-truncated-safetensors", lambda c: ["compress", str(truncated_weights(c)), "--plan", str(c.file("p.yaml", "[{op: remove_blocks, count: 1}]")),
                                                  "--out", str(c.tmp / "small")], "cut short"),
    ("eval-bad-config-json", lambda c: ["eval", str(c.model_dir(config__json="{nope")), "--task", "perplexity:pydoc:dev"], "config.json: not valid JSON"),
    ("eval-config-json-array", lambda c: ["eval", str(c.model_dir(config__json="[1]")), "--task", "perplexity:pydoc:dev"], "config.json: not a JSON object"),
    ("eval-bad-structure-json", lambda c: ["eval", str(c.model_dir(evofuse_structure__json="{")), "--task", "perplexity:pydoc:dev"],
     "evofuse_structure.json: not JSON"),
    ("eval-bad-structure-modules", lambda c: ["eval", str(c.model_dir(evofuse_structure__json=json.dumps(
        {"format": "evofuse-structure", "version": 1, "modules": ["x"]}))), "--task", "perplexity:pydoc:dev"], "'modules' must map"),
    ("eval-bad-structure-entry", lambda c: ["eval", str(c.model_dir(evofuse_structure__json=json.dumps(
        {"format": "evofuse-structure", "version": 1, "modules": {"model.layers.0.mlp.up_proj": {"kind": "linear"}}}))),
        "--task", "perplexity:pydoc:dev"], "bad linear entry"),
    ("resume-corrupt-journal-line", lambda c: (journal_line(c, b'{"id": "arith", "spl\n'), ["resume", R(c)])[-1], "journal.jsonl:3: not valid JSON"),
    ("status-corrupt-journal-line", lambda c: (journal_line(c, b"[1, 2]\n"), ["status", R(c)])[-1], "journal.jsonl:3: a JSON array"),
    ("export-corrupt-journal-line", lambda c: (journal_line(c, b"\x00\xff\n"), ["export", R(c), "--top", "1", "--out", str(c.tmp / "o")])[-1],
     "journal.jsonl: not UTF-8"),
    ("resume-state-random-bytes", lambda c: (c.run.joinpath("state.json").write_bytes(os.urandom(64) + b"\xff"), ["resume", R(c)])[-1],
     "state.json: not UTF-8"),
    ("status-state-array", lambda c: (c.run.joinpath("state.json").write_text("[]"), ["status", R(c)])[-1], "state.json: not a checkpoint (a JSON array"),
    ("export-state-null", lambda c: (c.run.joinpath("state.json").write_text("null"), ["export", R(c), "--top", "1", "--out", str(c.tmp / "o")])[-1],
     "(a JSON null"),
    ("resume-journal-deleted", lambda c: (c.run.joinpath("journal.jsonl").unlink(), ["resume", R(c)])[-1], "journal.jsonl: missing"),
    ("report-journal-deleted", lambda c: (c.run.joinpath("journal.jsonl").unlink(), ["report", R(c)])[-1], "journal.jsonl: missing"),
    ("export-journal-deleted", lambda c: (c.run.joinpath("journal.jsonl").unlink(), ["export", R(c), "--id", "base", "--out", str(c.tmp / "o")])[-1],
     "journal.jsonl: missing"),
    ("resume-read-only", read_only, "not writable"),
    ("eval-malformed-pickle", lambda c: ["eval", str(pickle_dir(c)), "--allow-pickle", "--task", "perplexity:pydoc:dev"], "cannot load the model"),
    ("merge-malformed-pickle", lambda c: ["merge", str(merge_config(c, [pickle_dir(c)], merge_method="linear")), str(c.tmp / "merged"),
                                          "--allow-pickle"], "cannot read its weights"),
    ("compress-seq-len-0", lambda c: ["compress", "tiny-llama", "--plan", "p.yaml", "--out", str(c.tmp / "o"), "--seq-len", "0"],
     "--seq-len: must be at least 2"),
    ("status-not-a-run", lambda c: ["status", str(c.tmp / "nowhere")], "no such run directory"),
    # 9. values that were silently accepted
    ("export-top-negative", lambda c: ["export", R(c), "--top", "-2", "--out", str(c.tmp / "o")], "--top: must be at least 1, got -2"),
    ("export-top-zero", lambda c: ["export", R(c), "--top", "0", "--out", str(c.tmp / "o")], "--top: must be at least 1, got 0"),
    ("eval-context-length-0", lambda c: ["eval", "tiny-llama", "--task", "perplexity:pydoc:dev", "--context-length", "0"], "--context-length: must be at least 1"),
    ("eval-kl-without-reference", lambda c: ["eval", "tiny-llama", "--task", "kl:pydoc:dev"],
     "--task kl:pydoc:dev: a kl task measures how far the model's next-token distributions moved from another model's"),
    ("eval-reference-without-kl", lambda c: ["eval", "tiny-llama", "--task", "perplexity:pydoc:dev", "--reference", "tiny-llama"],
     "--reference: only kl tasks compare with a reference model"),
    ("search-workers-0", lambda c: ["search", str(c.config()), "--workers", "0"], "--workers: must be at least 1"),
    ("search-set-no-value", lambda c: ["search", str(c.config()), "--set", "evolver.generations"], "--set 'evolver.generations': expected KEY=VALUE"),
    ("search-set-out-of-range", lambda c: ["search", str(c.config()), "--set", "evolver.generations=-1"],
     "with --set: evolver.generations: Input should be greater than or equal to 0"),
    ("resume-set-changes-results", lambda c: ["resume", R(c), "--set", "evolver.CR=0.9"],
     "evolver.CR: 0.5 -> 0.9 would change the run's results; a resume can change only workers.count"),
    ("resume-workers-0", lambda c: ["resume", R(c), "--workers", "0"], "--workers: must be at least 1"),
    ("search-set-unknown-key", lambda c: ["search", str(c.config()), "--set", "evolver.generatons=3"], "evolver.generatons: unknown key"),
    ("merge-slerp-without-base", lambda c: ["merge", str(merge_config(c, [c.model_dir("a"), c.model_dir("b")], merge_method="slerp",
                                                                         parameters={"t": 0.5})), str(c.tmp / "merged")], "field 'base_model'"),
    ("run-name-escapes", lambda c: ["search", str(c.config(name="../../escaped"))], "name: '../../escaped' is not a run name"),
    ("run-name-absolute", lambda c: ["search", str(c.config(name=str(c.tmp / "abs")))], "is not a run name"),
    ("run-name-empty", lambda c: ["search", str(c.config(name=""))], "name: '' is not a run name"),
    # 10. a model directory's own code never runs
    ("search-auto-map", lambda c: c.search_with_base(auto_map(c, "config.json")), "asks to run the directory's own Python code"),
    ("eval-auto-map-tokenizer", lambda c: ["eval", str(auto_map(c, "tokenizer_config.json")), "--task", "perplexity:pydoc:dev"],
     "tokenizer_config.json: asks to run"),
    ("merge-auto-map", lambda c: ["merge", str(merge_config(c, [auto_map(c, "config.json")], merge_method="linear")), str(c.tmp / "merged")],
     "asks to run the directory's own Python code"),
]


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory) -> Path:
    return write_run(tmp_path_factory.mktemp("made") / "run").root


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_bad_input_is_one_line_exit_2_and_changes_nothing(case, finished_run, tmp_path, capsys, cli_stderr, monkeypatch):
    name, setup, expected = case
    monkeypatch.chdir(tmp_path)
    ctx = Ctx(tmp_path, tmp_path / "run")
    shutil.copytree(finished_run, ctx.run)
    argv = setup(ctx, monkeypatch) if setup is read_only else setup(ctx)
    capsys.readouterr()  # what making the inputs printed (a save's progress bar) is not the command's
    before = tree(ctx.run)
    try:
        code = main(argv)
    except SystemExit as exc:  # argparse's exit, as the console script would exit
        code = exc.code
    finally:
        if hasattr(ctx, "holder"):
            ctx.holder.kill()
            ctx.holder.wait()
    err = cli_stderr()
    print(f"{name}: {err}")
    assert code == 2, f"exit {code}: {err[-2000:]}"
    assert len(err.splitlines()) == 1 and expected in err, err
    assert tree(ctx.run) == before, "the run directory changed"
    for made in ("r", "new-run", "runs", "o", "merged", "small"):
        assert not (tmp_path / made).exists(), f"{made} was created"
    assert not (tmp_path / "RAN").exists(), "a model directory's code ran"


def test_a_run_an_earlier_evofuse_started_resumes_after_an_upgrade(tmp_path, capsys):
    """A field added to the config changes every fingerprint; a run started before it (config,
    identity and checkpoint without the field) is still the same run: resume, status, report
    and export take it, and a changed value in it is still refused (the table above)."""
    from search.config import load_config

    run = made_by_earlier_version(write_run(tmp_path / "run", tiny_raw(export_top=0)).root)
    assert json.loads((run / "identity.json").read_text())["fingerprint"] != load_config(run / "config.yaml").fingerprint()
    capsys.readouterr()
    assert main(["resume", str(run)]) == 0
    assert "already finished" in capsys.readouterr().err
    for argv in (["status", str(run)], ["report", str(run)], ["export", str(run), "--id", "base", "--out", str(tmp_path / "out")]):
        assert main(argv) == 0, argv
    assert (tmp_path / "out" / "config.json").is_file()
