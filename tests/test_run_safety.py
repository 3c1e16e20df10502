"""Nothing lost, nothing run that should not be (issue 17), with real runs on tiny models:

- a run SIGKILLed at write boundaries (EVOFUSE_FAULT_KILL_AT: an fsync or rename of the journal,
  the state, the weights, the logbook and the end-of-run export), resumed after each kill, leaves
  the very run directory an uninterrupted run leaves: every file, not only the journal (merge
  mode, and joint mode with its Optuna study, whose sampler resumes exactly);
- one driver per run directory: a second `resume` exits 2 naming the holder's pid; a SIGKILLed
  driver's lock goes with it, `status` says its driver is gone, and its local Ray goes too.

Every run is a real `evofuse` process killed for real. To keep this fast on a small machine the
processes are forked from one that has imported evofuse already (`forkserver`: the interpreter
start and imports are shared, nothing else), and the kill chains join the session's Ray cluster
(`--address`, conftest) instead of starting a local Ray each; the lock test uses a local Ray, as a
user does.
"""
from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from benchmarks.ray_head import RayHead, kill_session, session_processes
from search.run.store import RunStore

ROOT = Path(__file__).resolve().parent.parent
pytestmark = pytest.mark.slow

# Each step's kill point, one process after another: `search` dies at the first, each `resume`
# at the next, and a last `resume` runs to the end. Between them every kind of write is hit.
KILLS = {
    "merge": [
        "weights.fsync:1",  # generation 1 scored; a new member's weights in a temporary file, not renamed
        "logbook.fsync:1",  # the generation's logbook line written, its checkpoint not
        "state.rename:1",  # the checkpoint renamed into place, old weights not yet pruned
        "journal.fsync:3",  # the last test-split evaluation journalled, the run not marked finished
        "export.write:1",  # the best candidate's export complete in its temporary directory
    ],
    "joint": [
        "journal.fsync:6",  # generation 1's last candidate journalled (plans asked and checkpointed)
        "weights.rename:1",  # a new member's weights renamed into place, no checkpoint yet
        "logbook.torn:1",  # half of the generation's logbook line
        "state.fsync:2",  # generation 2's plans asked from Optuna, their checkpoint not written
        "export.rename:1",  # the export renamed into place, nothing after it
    ],
}
# (A kill mid-append of the journal and re-scoring of what was lost: tests/test_search.py and
# tests/test_joint.py kill inside a generation; tests/test_run_repair.py tears a line.)


FORKSERVER = r"""
import json, os, sys, traceback
import search.cli, search.run.session, search.run.loop, search.results.export, search.results.report
import search.models.experts, search.tuning.planner, search.fitness
import optuna, ray, safetensors.torch, torch, transformers
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer
print("ready", flush=True)
for line in sys.stdin:
    job = json.loads(line)
    if job["op"] == "wait":
        _, status = os.waitpid(job["pid"], 0)
        print(json.dumps(os.waitstatus_to_exitcode(status)), flush=True)
        continue
    pid = os.fork()
    if pid:
        print(json.dumps(pid), flush=True)
        continue
    code = 1
    try:
        os.setsid()
        os.environ.update(job["env"])
        os.dup2(os.open(os.devnull, os.O_RDONLY), 0)  # not the request pipe
        log = os.open(job["log"], os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        os.dup2(log, 1)
        os.dup2(log, 2)
        code = search.cli.main(job["argv"])
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else 1
    except BaseException:
        traceback.print_exc()
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code or 0)
"""


class Forkserver:
    """`evofuse` CLI processes forked from one that has imported everything (see the docstring)."""

    def __init__(self, logs: Path):
        self.logs, self.count = logs, 0
        env = {**os.environ, "RAY_AUTH_MODE": "disabled", "TOKENIZERS_PARALLELISM": "false"}
        self.proc = subprocess.Popen([sys.executable, "-c", FORKSERVER], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     text=True, env=env, cwd=ROOT)
        assert self.proc.stdout.readline().strip() == "ready"

    def _ask(self, request: dict):
        self.proc.stdin.write(json.dumps(request) + "\n")
        self.proc.stdin.flush()
        return json.loads(self.proc.stdout.readline())

    def start(self, *argv: str, **env: str) -> tuple[int, Path]:
        self.count += 1
        log = self.logs / f"{self.count:02d}-{argv[0]}.log"
        return self._ask({"op": "run", "argv": list(argv), "env": env, "log": str(log)}), log

    def wait(self, started: tuple[int, Path]) -> tuple[int, str]:
        pid, log = started
        try:
            return self._ask({"op": "wait", "pid": pid}), log.read_text()
        finally:
            kill_session(pid)  # what a killed driver left (a joined cluster's actors go by themselves)

    def run(self, *argv: str, **env: str) -> tuple[int, str]:
        return self.wait(self.start(*argv, **env))

    def close(self) -> None:
        self.proc.stdin.close()
        self.proc.wait(timeout=60)


@pytest.fixture(scope="module")
def forkserver(tmp_path_factory):
    server = Forkserver(tmp_path_factory.mktemp("logs"))
    yield server
    server.close()


@pytest.fixture(scope="module")
def cluster(request):
    """The session's Ray cluster (conftest), or a throwaway one of this module's: the kill chains join it."""
    if os.environ.get("RAY_ADDRESS"):
        yield os.environ["RAY_ADDRESS"]
        return
    head = RayHead(num_cpus=4, tag="k")
    request.getfixturevalue("forkserver")  # started while the cluster starts
    try:
        yield head.wait()
    finally:
        head.stop()


def run_config(tmp: Path, mode: str) -> Path:
    raw = yaml.safe_load((ROOT / "configs" / ("tiny.yaml" if mode == "merge" else "tiny-joint.yaml")).read_text())
    raw["evolver"]["generations"] = 1 if mode == "merge" else 2
    raw["export_top"] = 1
    path = tmp / f"{mode}.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def snapshot(run: Path) -> dict[str, object]:
    """Every file of a run directory, by relative path, with what may differ between two runs
    (wall-clock times, the worker's name, the run directory's own path) left out."""
    out: dict[str, object] = {}
    for path in sorted(run.rglob("*")):
        if path.is_dir():
            continue
        rel = path.relative_to(run).as_posix()
        if rel in ("journal.jsonl", "logbook.jsonl"):
            volatile = {"time", "timing", "memory", "worker", "wall_s"}
            rows = [json.loads(line) for line in path.read_text().splitlines()]
            out[rel] = [{k: v for k, v in row.items() if k not in volatile} for row in rows]
        elif rel == "state.json":
            out[rel] = {k: v for k, v in json.loads(path.read_text()).items() if k not in ("started", "finished", "checksum")}
        elif rel == "config.yaml":
            out[rel] = {k: v for k, v in yaml.safe_load(path.read_text()).items() if k != "run_dir"}
        elif rel == "optuna.journal":
            out[rel] = study_trials(path)
        else:
            out[rel] = hashlib.sha256(path.read_bytes()).hexdigest()
    return out


def study_trials(path: Path) -> list[tuple]:
    """Every trial as the study holds it (number, state, params, values, attributes)."""
    import optuna
    from optuna.storages import JournalStorage
    from optuna.storages.journal import JournalFileBackend

    storage = JournalStorage(JournalFileBackend(str(path)))
    (summary,) = optuna.get_all_study_summaries(storage)
    study = optuna.load_study(study_name=summary.study_name, storage=storage)
    return [(t.number, t.state.name, t.params, t.values, t.user_attrs, t.system_attrs) for t in study.trials]


def test_killed_at_every_kind_of_write_resumes_to_the_uninterrupted_directory(tmp_path, forkserver, cluster):
    """Merge and joint chains side by side: references first, then kill after kill."""
    modes = list(KILLS)
    configs = {mode: run_config(tmp_path, mode) for mode in modes}
    where = {mode: (tmp_path / f"{mode}-reference", tmp_path / f"{mode}-run") for mode in modes}
    references = {m: forkserver.start("search", str(configs[m]), "--run-dir", str(where[m][0]), "--quiet", "--address", cluster)
                  for m in modes}
    begun = time.time()
    for step in range(len(KILLS["merge"]) + 1):
        started = {}
        for mode in modes:
            run = where[mode][1]
            args = ("search", str(configs[mode]), "--run-dir", str(run)) if step == 0 else ("resume", str(run))
            kill_at = KILLS[mode][step] if step < len(KILLS[mode]) else ""
            started[mode] = (kill_at, forkserver.start(*args, "--quiet", "--address", cluster, EVOFUSE_FAULT_KILL_AT=kill_at))
        for mode, (kill_at, job) in started.items():
            rc, log = forkserver.wait(job)
            print(f"{mode} step {step} {kill_at}: {time.time() - begun:.1f} s")
            expected = -signal.SIGKILL if kill_at else 0
            assert rc == expected, f"{mode} {kill_at or 'final resume'}: exit {rc}\n{log[-3000:]}"
    for mode in modes:
        rc, log = forkserver.wait(references[mode])
        assert rc == 0, log[-3000:]
        got, want = snapshot(where[mode][1]), snapshot(where[mode][0])
        assert sorted(got) == sorted(want), f"{mode}: files differ: {sorted(set(got) ^ set(want))}"
        assert [n for n in want if got[n] != want[n]] == [], f"{mode}: contents differ"
        assert (where[mode][1] / ".lock").is_file() and not RunStore(where[mode][1]).lock_holder()


def wait_for(predicate, timeout: float, what: str) -> None:
    deadline = time.time() + timeout
    while not predicate():
        assert time.time() < deadline, f"timed out waiting for {what}"
        time.sleep(0.2)


def test_one_driver_per_run_status_knows_a_gone_driver_and_local_ray_dies_with_it(tmp_path, forkserver, capsys, cli_stderr):
    config, run = run_config(tmp_path, "merge"), tmp_path / "run"
    pid, log = forkserver.start("search", str(config), "--run-dir", str(run), "--quiet", EVOFUSE_FAULT_STALL="g000-000",
                                RAY_ADDRESS="")  # a local Ray of its own, not the session's cluster
    try:
        check_lock_and_status(run, config, pid, forkserver, capsys, cli_stderr)
    finally:
        kill_session(pid)


def check_lock_and_status(run: Path, config: Path, pid: int, forkserver, capsys, cli_stderr) -> None:
    from search.cli import main

    store = RunStore(run)
    journalled = lambda cid: lambda: any(e["id"] == cid for e in store.read_journal())  # noqa: E731
    wait_for(journalled("g000-000"), 240, "the first offspring")

    # a second driver is refused, naming the first; status names it as running
    assert main(["resume", str(run)]) == 2
    err = cli_stderr()
    assert err.count("\n") == 0 and f"in use by evofuse process {pid}" in err, err
    assert main(["search", str(config), "--run-dir", str(run)]) == 2
    assert "a run is already there" in capsys.readouterr().err
    assert main(["status", str(run), "--json"]) == 0
    status = json.loads(capsys.readouterr().out)
    assert (status["status"], status["driver_pid"]) == ("running", pid)

    # SIGKILL the driver alone: its lock, and every process its local Ray started, go with it
    assert len(session_processes(pid)) > 3  # Ray's GCS, raylet, agents, the actor, ...
    os.kill(pid, signal.SIGKILL)
    assert forkserver._ask({"op": "wait", "pid": pid}) == -signal.SIGKILL
    wait_for(lambda: not session_processes(pid), 20, f"Ray's processes to end: {session_processes(pid)}")
    assert main(["status", str(run), "--json"]) == 0
    status = json.loads(capsys.readouterr().out)
    assert (status["status"], status["driver_pid"], status["driver_alive"]) == ("stopped", None, False)
