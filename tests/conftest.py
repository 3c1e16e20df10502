"""Shared fixtures: tiny models built from transformers configs, a byte tokenizer, pydoc text."""
from __future__ import annotations

import os
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
