"""Shared fixtures: tiny models built from transformers configs, a byte tokenizer, pydoc text."""
from __future__ import annotations

import os

import pytest
import torch

torch.set_num_threads(1)  # tiny models: threads only contend (with Ray actors, other jobs)

from compression.calibration import calibration_windows  # noqa: E402
from search.tiny import byte_tokenizer, tiny_llama  # noqa: E402


@pytest.fixture(scope="session")
def tokenizer():
    return byte_tokenizer()


@pytest.fixture()
def tiny_model():
    return tiny_llama(seed=0)


@pytest.fixture(scope="session")
def calibration(tokenizer):
    return calibration_windows(tokenizer, "pydoc:train", seq_len=64, num_sequences=16)
