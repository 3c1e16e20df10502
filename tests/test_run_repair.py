"""The pieces of "nothing lost" that need no search (issues 17 and 18), in-process and fast:

- `RunStore.repair` leaves a killed run's directory as the checkpoint had it: temporary files of
  interrupted writes, torn log lines (Optuna's too), a stale Optuna lock, logbook lines and
  weights files newer than the checkpoint are gone;
- the run lock: re-entrant in its process, refused to another with the holder's pid, and `status`
  tells a driver that is gone; a stop the driver controls is recorded in the checkpoint;
- every kill point fires at its n-th pass, and only there;
- a generation in which every candidate failed stops the run with one line;
- history-seeded samplers: a study resumed in a new process asks what an uninterrupted one asks,
  including trials asked before a kill and never checkpointed;
- any journalled candidate exports by replaying its recipe, or the message says why not;
- a model directory's own code never runs, even when a terminal answers "y".
"""
from __future__ import annotations

import json
import os
import pty
import select
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

from evolve.materialize import materialize
from evolve.population import make_member, member_to_json
from evolve.recipe import Recipe
from search.cli import main
from search.config import dump_config, load_config
from search.run import faults
from search.run.lock import RunLock
from search.run.store import RunStore

ROOT = Path(__file__).resolve().parent.parent


def test_repair_leaves_the_directory_the_checkpoint_had(tmp_path):
    store = RunStore(tmp_path / "run")
    keep = store.save_weights("g000-001", {"w": torch.ones(2)})
    store.save_weights("g001-000", {"w": torch.zeros(2)})  # written after the checkpoint
    store.write_state({"generation": 1, "weight_checksums": {"g000-001": keep}, "status": "running"})
    for gen in (0, 1):  # generation 1's line was appended, its checkpoint never written
        store.append_logbook({"gen": gen, "best": -1.0})
    store.append_journal({"id": "a", "split": "dev"})
    with open(store.journal_path, "ab") as handle:
        handle.write(b'{"id": "b", "spl')  # torn by a kill
    (store.root / "optuna.journal").write_bytes(b'{"op": 1}\n{"op"')
    (store.root / "optuna.journal.lock").symlink_to(store.root / "optuna.journal")
    temporaries = [store.root / ".state.json.abcd1234.tmp", store.root / ".state.json.x1y2z3w4",  # ours, older versions'
                   store.weights_dir / ".g001-001.safetensors.k2j3h4g5.tmp", store.exports_dir / ".g000-001.q1w2e3r4.tmp"]
    for path in temporaries:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.mkdir() if path.parent == store.exports_dir else path.write_bytes(b"partial")
    store.lock_path.touch()

    store.repair(store.read_state())
    assert [r["gen"] for r in store.read_logbook()] == [0]
    assert store.journal_path.read_bytes().endswith(b"\n") and [r["id"] for r in store.read_journal()] == ["a"]
    assert (store.root / "optuna.journal").read_bytes() == b'{"op": 1}\n'
    assert not (store.root / "optuna.journal.lock").is_symlink()
    assert not any(p.exists() for p in temporaries)
    assert sorted(p.name for p in store.weights_dir.iterdir()) == ["g000-001.safetensors"]
    assert store.lock_path.exists()  # not a temporary: the lock stays


def test_lock_is_one_driver_per_run_and_status_tells_a_gone_driver(tmp_path, capsys):
    from search.cli import driver_status

    store = RunStore(tmp_path)
    store.write_state({"generation": 0, "status": "running", "weight_checksums": {}})
    code = "import fcntl, sys, time; f = open(sys.argv[1], 'a'); fcntl.flock(f, fcntl.LOCK_EX); print('held', flush=True); time.sleep(600)"
    holder = subprocess.Popen([sys.executable, "-c", code, str(store.lock_path)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        assert store.lock_holder() == holder.pid
        assert driver_status(store, "running") == {"driver_pid": holder.pid, "driver_alive": True}
        with pytest.raises(Exception, match=f"in use by evofuse process {holder.pid}"):
            store.lock()
    finally:
        holder.kill()  # as SIGKILL: the kernel drops the lock with the process
        holder.wait()
    assert store.lock_holder() is None
    assert driver_status(store, "running")["status"] == "stopped"
    lock = store.lock()
    assert store.lock() is lock and store.lock_holder() == os.getpid()  # re-entrant within a process
    RunLock.release_all()
    assert store.lock_holder() is None


def test_a_stop_the_driver_controls_is_recorded_and_resumed_from(tmp_path, monkeypatch, capsys):
    from search.run import session

    store = RunStore(tmp_path / "run")
    store.write_state({"generation": 0, "status": "running", "weight_checksums": {}})

    class Stops:  # the run loop, stopped by a SIGTERM (which the driver turns into Ctrl-C)
        def __init__(self, *args, **kwargs):
            pass

        def start(self):
            pass

        def run(self):
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(5)

        def shutdown(self):
            pass

    monkeypatch.setattr("search.run.loop.Search", Stops)
    before = signal.getsignal(signal.SIGTERM)  # the default, or Ray's when an earlier test started Ray here
    with pytest.raises(KeyboardInterrupt):
        session.run_search(None, store, None, True)
    state = store.read_state()
    assert state["status"] == "interrupted" and state["stopped"]["reason"] == "terminated (SIGTERM)"
    assert signal.getsignal(signal.SIGTERM) is before  # the driver's handler is gone again

    class Fails(Stops):
        def run(self):
            session.check_generation([type("E", (), {"ok": False, "id": "g000-000", "reason": "TaskError: boom", "status": "failed"})()],
                                     "generation 1")

    monkeypatch.setattr("search.run.loop.Search", Fails)
    with pytest.raises(session.RunFailed, match="generation 1: all 1 candidates failed, e.g. g000-000: TaskError: boom"):
        session.run_search(None, store, None, True)
    assert store.read_state()["status"] == "failed"
    class Runs(Stops):
        def run(self):
            pass

    monkeypatch.setattr("search.run.loop.Search", Runs)
    session.run_search(None, store, None, True)  # resumed: running again, the stop forgotten
    assert store.read_state()["status"] == "running" and "stopped" not in store.read_state()
    RunLock.release_all()


def test_kill_points_fire_at_their_nth_pass_only(tmp_path):
    code = ("import sys; from search.run.store import RunStore; s = RunStore(sys.argv[1]);"
            "[s.append_logbook({'gen': i}) or print(i, flush=True) for i in range(5)]")
    env = {**os.environ, faults.KILL_ENV: "journal.fsync:1,logbook.torn:3"}
    proc = subprocess.run([sys.executable, "-c", code, str(tmp_path)], env=env, capture_output=True, text=True)
    assert proc.returncode == -signal.SIGKILL and proc.stdout.split() == ["0", "1"]
    data = (tmp_path / "logbook.jsonl").read_bytes()
    assert data.count(b"\n") == 2 and not data.endswith(b"\n")  # the third line is torn
    assert [r["gen"] for r in RunStore(tmp_path).read_logbook()] == [0, 1]


def test_history_seeded_sampler_resumes_exactly_even_trials_never_checkpointed(tmp_path):
    """A study asked by two processes in turn (the first killed with a trial asked, not told)
    holds exactly the trials of one uninterrupted process: same numbers, params and states."""
    import optuna

    from search.tuning.planner import Planner
    from search.tuning.space import SpaceConfig
    from search.tuning.study import open_study

    from search.models.tiny import tiny_llama_config

    base = tiny_llama_config()
    space = SpaceConfig.model_validate({"depth": ["none", "remove_blocks"], "block_count": {"low": 1, "high": 2},
                                        "width": ["none", "prune_width"], "width_ratio": {"low": 0.1, "high": 0.45}})

    def drive(run_dir: Path, generations: int, stop_after_ask: int | None = None) -> None:
        study = open_study(run_dir, "t", "nsga2", 7, 3, ["maximize", "minimize"])
        planner = Planner(study, space, base, base.num_hidden_layers, max_params=None)
        asked = 0
        while len([t for t in study.trials if t.state.is_finished()]) < 3 * generations:
            plan, number, _ = planner.ask()
            asked += 1
            if asked == stop_after_ask:
                return  # killed: asked, never checkpointed nor told
            planner.tell(number, (float(len(plan)), float(number % 5)))

    def trials(run_dir: Path) -> list:
        study = open_study(run_dir, "t", "nsga2", 7, 3, ["maximize", "minimize"])
        return [(t.number, t.state, t.params, t.values) for t in study.trials]

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    (tmp_path / "a").mkdir(), (tmp_path / "b").mkdir()
    drive(tmp_path / "a", 4)
    drive(tmp_path / "b", 4, stop_after_ask=5)
    drive(tmp_path / "b", 4)
    assert trials(tmp_path / "b") == trials(tmp_path / "a")
    assert len(trials(tmp_path / "a")) == 12


# ---- export of any journalled candidate ------------------------------------------------------
def dir_run(tmp_path: Path) -> tuple[RunStore, dict[str, Path]]:
    """A finished run whose parents are directories; offspring journalled, none stored."""
    from search.models.tiny import byte_tokenizer, tiny_llama

    dirs = {}
    for seed, name in enumerate(("base", "a", "b")):
        dirs[name] = tmp_path / name
        tiny_llama(seed=seed).save_pretrained(dirs[name])
        byte_tokenizer().save_pretrained(dirs[name])
    raw = yaml.safe_load((ROOT / "configs" / "tiny.yaml").read_text())
    raw["parents"] = {"base": {"name": "base", "source": str(dirs["base"])},
                      "experts": [{"name": n, "source": str(dirs[n])} for n in ("a", "b")]}
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(raw))
    config = load_config(tmp_path / "c.yaml")
    store = RunStore(tmp_path / "run")
    store.root.mkdir()
    store.write_identity(config.fingerprint(), config.model_dump(mode="json", exclude={"run_dir"}))
    store.write_config(dump_config(config))
    recipes = {
        "g000-000": Recipe(op="linear", inputs=("a", "b"), params={"weight": 1.0}, seed=3),
        "g001-000": Recipe(op="linear", inputs=("g000-000", "base"), params={"weight": 1.0}, seed=4),
        "g001-001": Recipe(op="linear", inputs=("a", "base"), params={"weight": 1.0}, seed=5),
        "g001-002": Recipe(op="linear", inputs=("ghost", "base"), params={"weight": 1.0}, seed=6),
    }
    copies = {n: Recipe(op="copy", inputs=(n,)) for n in dirs}
    for cid, recipe in {**copies, **recipes}.items():
        status = "failed" if cid == "g001-001" else "ok"
        store.append_journal({"id": cid, "recipe": recipe.to_dict(), "plan": [], "split": "dev", "status": status,
                              "reason": "PlanError: no" if status == "failed" else None, "metrics": {}, "score": -2.0})
    members = [member_to_json(make_member(n, copies[n], -2.0)) for n in dirs]
    store.write_state({"generation": 2, "status": "finished", "parents": {n: {"score": -2.0} for n in dirs},
                       "weight_checksums": {}, "fingerprint": config.fingerprint(), "population": members, "hall_of_fame": []})
    return store, dirs


def test_any_journalled_candidate_exports_by_replaying_its_recipe(tmp_path, capsys, cli_stderr):
    from safetensors.torch import load_file

    from search.models.sources import load_state

    store, dirs = dir_run(tmp_path)
    out = tmp_path / "exported"
    assert main(["export", str(store.root), "--id", "g001-000", "--out", str(out)]) == 0, capsys.readouterr().err
    parents = {n: {k: v.float() for k, v in load_state(p).items()} for n, p in dirs.items()}
    names = sorted(parents["base"])
    first = materialize(Recipe(op="linear", inputs=("a", "b"), params={"weight": 1.0}, seed=3), parents, names)
    want = materialize(Recipe(op="linear", inputs=("g000-000", "base"), params={"weight": 1.0}, seed=4),
                       {**parents, "g000-000": first}, names)
    got = load_file(str(out / "model.safetensors"))
    assert got and all(torch.equal(got[k], want[k]) for k in got)
    assert json.loads((out / "evofuse_recipe.json").read_text())["lineage"][1]["id"] == "g000-000"
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary left behind
    capsys.readouterr()

    for cid, why in (("g001-001", "its evaluation failed (PlanError: no)"),
                     ("g001-002", "its recipe reads 'ghost', which is not a parent, a stored member or a journalled candidate"),
                     ("g009-000", "not a candidate of")):
        assert main(["export", str(store.root), "--id", cid, "--out", str(tmp_path / cid)]) == 2
        err = cli_stderr()
        assert len(err.splitlines()) == 1 and why in err, err
        assert not (tmp_path / cid).exists()

    # --force replaces an earlier export (and only that), atomically
    assert main(["export", str(store.root), "--id", "a", "--out", str(out), "--force"]) == 0
    assert json.loads((out / "evofuse_recipe.json").read_text())["id"] == "a"


# ---- a model directory's own code never runs ------------------------------------------------
def test_auto_map_code_never_runs_even_when_a_terminal_answers_yes(tmp_path):
    from search.models.tiny import byte_tokenizer, tiny_llama

    model = tmp_path / "model"
    tiny_llama(seed=0).save_pretrained(model)
    byte_tokenizer().save_pretrained(model)
    marker = tmp_path / "RAN"
    (model / "evil.py").write_text(
        f"open({str(marker)!r}, 'w').close()\n"
        "from transformers import LlamaConfig, LlamaForCausalLM\n"
        "class EvilConfig(LlamaConfig):\n    model_type = 'evil'\n"
        "class EvilModel(LlamaForCausalLM):\n    config_class = EvilConfig\n"
    )
    for name in ("config.json", "tokenizer_config.json"):
        data = json.loads((model / name).read_text())
        data["auto_map"] = {"AutoConfig": "evil.EvilConfig", "AutoModelForCausalLM": "evil.EvilModel"}
        data["model_type"] = "evil"  # unknown to transformers: it would ask "run the custom code? [y/N]"
        (model / name).write_text(json.dumps(data))
    master, slave = pty.openpty()  # stdin, stdout and stderr a terminal, answering y to anything
    proc = subprocess.Popen([sys.executable, "-m", "search.cli", "eval", str(model), "--task", "perplexity:pydoc:dev"],
                            stdin=slave, stdout=slave, stderr=slave, cwd=tmp_path, close_fds=True)
    os.close(slave)
    output, deadline = b"", time.time() + 300
    while proc.poll() is None and time.time() < deadline:
        if select.select([master], [], [], 0.5)[0]:
            try:
                output += os.read(master, 4096)
            except OSError:
                break
        os.write(master, b"y\n")
    proc.wait(timeout=60)
    os.close(master)
    text = output.decode(errors="replace").replace("y\r\n", "").strip()
    assert proc.returncode == 2, text[-2000:]
    assert "asks to run the directory's own Python code (auto_map)" in text and len(text.splitlines()) == 1, text
    assert not marker.exists(), "the model directory's code ran"
