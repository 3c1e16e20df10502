"""Shared fixtures: tiny models built from transformers configs, a byte tokenizer, pydoc text."""
from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

torch.set_num_threads(1)  # tiny models: threads only contend (with Ray actors, other jobs)

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
    (driver, raylet, actors) as a crash or an OOM killer would."""
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
