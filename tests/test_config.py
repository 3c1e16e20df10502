"""Bad configs: each exits 2 with one line naming the field or file."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from search.config import ConfigError, apply_overrides, load_config

TINY = Path(__file__).resolve().parent.parent / "configs" / "tiny.yaml"


def tiny_raw() -> dict:
    return yaml.safe_load(TINY.read_text())


def write(tmp_path: Path, raw: dict) -> Path:
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def test_shipped_configs_load():
    not_run_configs = {"plan.yaml", "mergekit-style.yaml"}  # a compression plan, a one-shot merge
    for path in sorted((TINY.parent).glob("*.yaml")):
        if path.name not in not_run_configs:
            load_config(path)


@pytest.mark.parametrize(
    "mutate, expected",
    [
        (lambda r: r.update(colour="red"), "colour: unknown key"),
        (lambda r: r["evolver"].update(F="big"), "evolver.F: must be a number or a range [lo, hi], got 'big'"),
        (lambda r: r["evolver"].update(CR=1.5), "evolver.CR: must lie in [0, 1], got 1.5"),
        (lambda r: r["evolver"].update(F=[0.9, 0.1]), "evolver.F: a range [lo, hi] needs lo <= hi, got [0.9, 0.1]"),
        (lambda r: r["evolver"].update(CR=[0.2, 0.5, 0.8]), "evolver.CR: must be a number or a range [lo, hi]"),
        (lambda r: r["evolver"].update(generatons=3), "evolver.generatons: unknown key"),
        (lambda r: r["tasks"][1].update(dev="missing/dev.jsonl"), "tasks[1].dev: no such file 'missing/dev.jsonl'"),
        (lambda r: r["tasks"][0].update(kind="bleu"), "tasks[0].kind: Input should be"),
        (lambda r: r["tasks"][0].update(dev="pydoc:validation"), "tasks[0].dev: pydoc:validation: unknown split"),
        (lambda r: r["parents"]["experts"].pop(), "parents.experts: merge runs need at least 2 experts, got 1"),
        (lambda r: r["parents"]["experts"][0].update(source="no/such/dir"), "parents.experts[0].source: 'no/such/dir' is not a directory"),
        (lambda r: r["workers"].update(count=0), "workers.count: Input should be greater than or equal to 1"),
        (lambda r: r.setdefault("compress", {}).update(latency={"repeats": 0}), "compress.latency.repeats: Input should be greater than or equal to 1"),
        (lambda r: r["evolver"].update(share_recipe=True), "evolver.share_recipe: for joint runs"),
        (lambda r: r["workers"].update(recipe_stats_gib=1.0), "workers.recipe_stats_gib: bounds what an actor keeps of a shared recipe"),
        (lambda r: r["workers"].update(recipe_stats_gib=-1), "workers.recipe_stats_gib: Input should be greater than or equal to 0"),
        (lambda r: r.update(fitness={"screen_dtype": "bfloat16"}), "fitness.screen_dtype: screens the stages before the last"),
        (lambda r: r.update(fitness={"stages": [0.5, 1.0], "screen_dtype": "int8"}), "fitness.screen_dtype: Input should be"),
        (lambda r: r.update(fitness={"stages": [0.1, 0.5, 1.0], "advance": [1, 4]}),
         "fitness.advance: must be a positive number, or one per stage before the last, non-increasing; got [1, 4]"),
        (lambda r: r.update(fitness={"stages": [0.1, 0.5, 1.0], "advance": [4, 2, 1]}),
         "fitness: advance: 3 values for 2 stages before the last (stages [0.1, 0.5, 1.0])"),
        (lambda r: r.update(fitness={"stages": [0.1, 0.5, 1.0], "race": 0.5}),
         "fitness.race: must be a confidence in (0.5, 1), or one (or null) per stage before the last; got 0.5"),
        (lambda r: r.update(fitness={"stages": [0.1, 0.5, 1.0], "race": [0.9, 1.0]}), "fitness.race: must be a confidence in (0.5, 1)"),
        (lambda r: r.update(fitness={"stages": [0.1, 0.5, 1.0], "race": [0.9]}),
         "fitness: race: 1 values for 2 stages before the last (stages [0.1, 0.5, 1.0])"),
        (lambda r: r.update(fitness={"race": 0.9}), "fitness.race: races siblings after the stages before the last; this run has one stage"),
        (lambda r: r.update(mode="compress", fitness={"stages": [0.5, 1.0], "race": 0.9}),
         "fitness.race: races siblings by stage score, for merge runs (a compress run's siblings differ in size"),
    ],
)
def test_bad_config_names_the_field(tmp_path, mutate, expected):
    raw = tiny_raw()
    mutate(raw)
    with pytest.raises(ConfigError) as info:
        load_config(write(tmp_path, raw))
    message = str(info.value)
    assert expected in message, message
    assert "\n" not in message


def test_what_an_actor_keeps_of_a_recipe_is_not_part_of_the_runs_identity(tmp_path):
    """workers.recipe_stats_gib changes memory and time, never a score: a run resumes with it
    changed, as with workers.count."""
    raw = yaml.safe_load((TINY.parent / "joint-demo.yaml").read_text())
    default = load_config(write(tmp_path, raw))
    raw["workers"]["recipe_stats_gib"] = 2.5
    bounded = load_config(write(tmp_path, raw))
    assert bounded.workers.recipe_stats_gib == 2.5 and bounded.fingerprint() == default.fingerprint()


def test_cli_exit_code_2_and_one_line(tmp_path):
    raw = tiny_raw()
    raw["evolver"]["F"] = -1
    proc = subprocess.run(
        [sys.executable, "-m", "search.cli", "search", str(write(tmp_path, raw)), "--run-dir", str(tmp_path / "run")],
        capture_output=True, text=True,
    )
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "evolver.F" in lines[0], proc.stderr
    assert not (tmp_path / "run").exists()


def test_set_writes_fields_by_dotted_path_with_yaml_values():
    raw = tiny_raw()
    out = apply_overrides(raw, ["evolver.generations=5", "evolver.F=[0.1, 0.9]", "tasks.1.options.subsample=16",
                                "fitness.audit=0.25", "workers.address=null", "name=tiny-more", "evolver.generations=6"])
    assert out["evolver"]["generations"] == 6  # in order: the last one wins
    assert out["evolver"]["F"] == [0.1, 0.9] and out["name"] == "tiny-more" and out["workers"]["address"] is None
    assert out["tasks"][1]["options"] == {"subsample": 16} and out["fitness"] == {"audit": 0.25}  # made on the way
    assert raw == tiny_raw()  # the document read is not changed
    config = load_config(TINY, ["evolver.generations=5", "evolver.F=[0.1, 0.9]", "fitness.audit=0.25"])
    assert config.evolver.generations == 5 and config.evolver.F == (0.1, 0.9) and config.fitness.audit == 0.25
    assert config.fingerprint() != load_config(TINY).fingerprint()  # a different run, not a resume of one


@pytest.mark.parametrize(
    "override, expected",
    [
        ("evolver.generations", "--set 'evolver.generations': expected KEY=VALUE"),
        ("=3", "--set '=3': expected KEY=VALUE"),
        ("evolver..generations=3", "expected KEY=VALUE with a dotted KEY"),
        ("evolver.F=[0.1, 0.9", "--set evolver.F: the value is not valid YAML"),
        ("tasks.2.dev=x", "--set tasks.2.dev: tasks is a list of 2; index it by 0..1, got '2'"),
        ("tasks.first.dev=x", "--set tasks.first.dev: tasks is a list of 2; index it by 0..1, got 'first'"),
        ("seed.value=1", "--set seed.value: seed is 0, not a mapping"),
        ("evolver.F.low.x=1", "--set evolver.F.low.x: evolver.F is 0.5, not a mapping"),
        ("evolver.generations=-1", "with --set: evolver.generations: Input should be greater than or equal to 0"),
        ("evolver.generatons=3", "with --set: evolver.generatons: unknown key"),
        ("evolver.F=big", "evolver.F: must be a number or a range [lo, hi], got 'big'"),
    ],
)
def test_a_bad_set_is_one_line_naming_the_field(override, expected):
    with pytest.raises(ConfigError) as info:
        load_config(TINY, [override])
    message = str(info.value)
    assert expected in message and "\n" not in message, message


def test_a_run_started_with_set_records_the_config_it_ran(tmp_path, monkeypatch):
    """The run directory's config.yaml is the config as run: a resume reads it and needs no --set
    (and `resume --config` with the file alone is refused as a different config)."""
    import search.run.session as session

    ran = []
    monkeypatch.setattr(session, "run_search", lambda config, store, address, quiet: ran.append(config) or store.root)
    root = session.start_search(TINY, tmp_path / "run", quiet=True, overrides=["evolver.generations=2", "fitness.audit=0.5"])
    stored = load_config(root / "config.yaml")
    assert ran[0].evolver.generations == stored.evolver.generations == 2 and stored.fitness.audit == 0.5
    assert stored.fingerprint() == ran[0].fingerprint() == load_config(TINY, ["evolver.generations=2", "fitness.audit=0.5"]).fingerprint()
    store = session.RunStore(root)
    assert session.check_run(store)[0].fingerprint() == stored.fingerprint()  # the identity vouches for the stored config
    with pytest.raises(ConfigError, match="differs from the config"):
        session.check_run(store, config_path=TINY)


def test_a_resume_may_set_who_computes_the_run_not_what_it_computes(tmp_path, monkeypatch):
    """`resume --workers` / `--set` change fields outside the run's identity (workers.count,
    address, recipe_stats_gib), recorded in config.yaml for the resumes after it; a field that
    changes results is refused, naming it, and the run directory is left as it was."""
    import search.run.session as session

    ran = []
    monkeypatch.setattr(session, "run_search", lambda config, store, address, quiet, verified=False: ran.append(config) or store.root)
    root = session.start_search(TINY, tmp_path / "run", quiet=True)
    before = (root / "config.yaml").read_text()
    with pytest.raises(ConfigError) as info:
        session.resume_search(root, quiet=True, overrides=["workers.count=3", "evolver.CR=0.9"])
    assert str(info.value).startswith("--set: evolver.CR: 0.5 -> 0.9 would change the run's results; a resume can change only workers.count")
    assert (root / "config.yaml").read_text() == before
    session.resume_search(root, quiet=True, workers=3, overrides=["workers.address=10.0.0.7:6379"])
    assert ran[-1].workers.count == 3 and ran[-1].workers.address == "10.0.0.7:6379"
    stored = load_config(root / "config.yaml")
    assert stored.workers.count == 3 and stored.workers.address == "10.0.0.7:6379"
    assert stored.fingerprint() == load_config(TINY).fingerprint()
    session.resume_search(root, quiet=True)  # the next resume runs as the last one did
    assert ran[-1].workers.count == 3


def test_missing_config_file(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "search.cli", "search", str(tmp_path / "nope.yaml")], capture_output=True, text=True)
    assert proc.returncode == 2 and "nope.yaml: no such config file" in proc.stderr


def test_a_config_path_is_taken_as_written_first_then_beside_the_config(tmp_path, monkeypatch):
    from search.schema import beside_config

    config_dir, work = tmp_path / "configs", tmp_path / "work"
    (config_dir / "data").mkdir(parents=True)
    (config_dir / "data" / "dev.jsonl").write_text("{}\n")
    work.mkdir()
    monkeypatch.chdir(work)
    assert beside_config("data/dev.jsonl", config_dir) == config_dir / "data" / "dev.jsonl"
    assert beside_config("data/dev.jsonl", None) == Path("data/dev.jsonl")  # no config directory known
    assert beside_config("data", config_dir, Path.is_dir) == config_dir / "data"
    assert beside_config("data", config_dir, Path.is_file) == Path("data")  # a directory is not a file
    assert beside_config("missing.jsonl", config_dir) == Path("missing.jsonl")  # the caller names it in its error
    (work / "data").mkdir()
    (work / "data" / "dev.jsonl").write_text("{}\n")
    assert beside_config("data/dev.jsonl", config_dir) == Path("data/dev.jsonl")  # the working directory's wins
    absolute = tmp_path / "elsewhere.jsonl"
    assert beside_config(absolute, config_dir) == absolute


def test_a_race_reads_as_one_confidence_per_stage_before_the_last(tmp_path):
    raw = tiny_raw()
    raw["fitness"] = {"stages": [0.1, 0.5, 1.0], "race": [0.9, None], "advance": [8, 2]}
    fitness = load_config(write(tmp_path, raw)).fitness
    assert fitness.race_per_stage == (0.9, None) and fitness.advance_per_stage == (8, 2)
    raw["fitness"]["race"] = 0.75
    assert load_config(write(tmp_path, raw)).fitness.race_per_stage == (0.75, 0.75)
