"""Shared fixtures: tiny models built from transformers configs, a byte tokenizer, pydoc text,
and one Ray cluster for the whole session.

Starting a local Ray costs a run about 10 s and 9 CPU-s more than joining a running cluster
(GCS, raylet, dashboard process, agents, monitors: `python -m benchmarks.bench_ray_start`), and
the suite's real runs would start two dozen. So the session starts one cluster (xdist's
controller, before its workers), and every test process and `evofuse` process joins it through
RAY_ADDRESS, the variable evofuse reads as Ray does. A test about a local Ray's own life sets
RAY_ADDRESS empty for its driver. `RAY_ADDRESS= pytest ...` starts none (each run its own local
Ray); `RAY_ADDRESS=HOST:PORT pytest ...` joins that cluster instead.
"""
from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch

torch.set_num_threads(1)  # tiny models: threads only contend (with Ray actors, other jobs)

from benchmarks.ray_head import RayHead  # noqa: E402
from compression.calibration import calibration_windows  # noqa: E402
from search.models.tiny import byte_tokenizer, tiny_llama  # noqa: E402


# A line Ray's log monitor forwards to a process that has a Ray driver (the test process, once an
# in-process test has started one): "(raylet) ...", "(pid=123) ...", "(Evaluator pid=123) ...",
# maybe coloured. Not evofuse's output (a raylet's low-disk warning once landed among it).
RAY_FORWARDED = re.compile(r"^(\x1b\[[0-9;]*m)?\((raylet|gcs_server|pid=\d+|\w+ pid=\d+)\)")


@pytest.fixture()
def cli_stderr(capsys):
    """Reads what the command printed to stderr since the last read (capsys), less Ray's
    forwarded lines: what the one-line-error checks look at."""
    def read() -> str:
        lines = capsys.readouterr().err.strip().splitlines()
        return "\n".join(line for line in lines if not RAY_FORWARDED.match(line))

    return read


@pytest.fixture(scope="session")
def tokenizer():
    return byte_tokenizer()


@pytest.fixture()
def tiny_model():
    return tiny_llama(seed=0)


@pytest.fixture(scope="session")
def calibration(tokenizer):
    return calibration_windows(tokenizer, "pydoc:train", seq_len=64, num_sequences=16)


@pytest.fixture()
def search_killed_at():
    """`kill(config, run_dir, candidate_id)`: run `evofuse search` in its own process group, stall it
    right after `candidate_id` is journalled (EVOFUSE_FAULT_STALL), then SIGKILL the whole group
    (the driver, and a local Ray's raylet and actors; a joined cluster ends the driver's actors
    itself) as a crash or an OOM killer would."""
    from search.run.store import RunStore

    def kill(config: Path, run_dir: Path, candidate_id: str, timeout: float = 300) -> None:
        proc = subprocess.Popen(
            [sys.executable, "-m", "search.cli", "search", str(config), "--run-dir", str(run_dir), "--quiet"],
            env={**os.environ, "EVOFUSE_FAULT_STALL": candidate_id},
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
        )
        try:
            deadline = time.time() + timeout
            while time.time() < deadline and not any(e["id"] == candidate_id for e in RunStore(run_dir).read_journal()):
                assert proc.poll() is None, "the run ended before it could be killed"
                time.sleep(0.2)
        finally:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()

    return kill


# ---- one Ray cluster for the session ---------------------------------------------------------
def pytest_configure(config):
    if hasattr(config, "workerinput") or os.environ.get("RAY_ADDRESS") is not None:
        return  # an xdist worker (its controller started the cluster), or the caller chose
    # Logical CPUs: both xdist workers' runs and a kill chain's concurrent drivers place actors
    # at once; the cores are shared however many are declared.
    head = RayHead(num_cpus=16, tag="s")
    os.environ.update(RAY_ADDRESS=head.address, RAY_AUTH_MODE="disabled", EVOFUSE_TEST_RAY_READY=str(head.ready))
    config.stash[RAY_HEAD] = head

    def started() -> None:  # the cluster starts while the workers start and collect
        try:
            head.wait()
            head.ready.write_text("ok")
        except Exception as exc:  # noqa: BLE001 (whatever it was, the tests say it)
            head.ready.write_text(str(exc))

    threading.Thread(target=started, daemon=True).start()


def pytest_unconfigure(config):
    head = config.stash.get(RAY_HEAD, None)
    if head is not None:
        head.stop()
        for name in ("RAY_ADDRESS", "EVOFUSE_TEST_RAY_READY"):
            os.environ.pop(name, None)


@pytest.fixture(scope="session", autouse=True)
def session_ray_cluster():
    """Waits for the session's cluster to have started (pytest_configure) before the first test."""
    ready = os.environ.get("EVOFUSE_TEST_RAY_READY")
    if ready:
        deadline = time.time() + 300
        while not os.path.exists(ready) and time.time() < deadline:
            time.sleep(0.1)
        status = Path(ready).read_text() if os.path.exists(ready) else "no cluster after 300 s"
        if status != "ok":
            pytest.exit(f"the session's Ray cluster: {status}", returncode=3)
    return os.environ.get("RAY_ADDRESS") or None


RAY_HEAD = pytest.StashKey[RayHead]()
