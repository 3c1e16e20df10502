"""The run store: atomic checkpoints, torn journal lines, corruption detection."""
from __future__ import annotations

import json

import pytest
import torch

from search.run.store import CorruptRunError, RunStore


def test_state_round_trip_and_checksum(tmp_path):
    store = RunStore(tmp_path)
    store.write_state({"generation": 2, "population": [{"id": "a", "score": 1.5}]})
    state = store.read_state()
    assert state["generation"] == 2 and state["format_version"] == 1
    raw = json.loads(store.state_path.read_text())
    raw["generation"] = 3  # edited by hand or half-written by something else
    store.state_path.write_text(json.dumps(raw))
    with pytest.raises(CorruptRunError, match="state.json: checksum mismatch"):
        store.read_state()


def test_state_from_another_format_version_is_refused(tmp_path):
    store = RunStore(tmp_path)
    store.write_state({"generation": 0})
    raw = json.loads(store.state_path.read_text())
    raw["format_version"] = 99
    store.state_path.write_text(json.dumps(raw))
    with pytest.raises(CorruptRunError, match="format version 99"):
        store.read_state()


def test_torn_last_journal_line_is_dropped_and_repaired(tmp_path):
    store = RunStore(tmp_path)
    store.append_journal({"id": "a", "split": "dev", "score": 1.0})
    store.append_journal({"id": "b", "split": "dev", "score": 2.0})
    with open(store.journal_path, "a") as handle:
        handle.write('{"id": "c", "split": "de')  # killed mid-append
    assert [e["id"] for e in store.read_journal()] == ["a", "b"]
    store.repair_logs()
    store.append_journal({"id": "c", "split": "dev", "score": 3.0})
    assert [e["id"] for e in store.read_journal()] == ["a", "b", "c"]


def test_weights_checksum_detects_corruption(tmp_path):
    store = RunStore(tmp_path)
    checksum = store.save_weights("g000-001", {"w": torch.arange(6.0).view(2, 3)})
    assert torch.equal(store.load_weights("g000-001", checksum)["w"], torch.arange(6.0).view(2, 3))
    path = store.weights_path("g000-001")
    data = bytearray(path.read_bytes())
    data[-1] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(CorruptRunError, match="g000-001.safetensors: checksum mismatch"):
        store.verify_weights({"g000-001": checksum})
    path.unlink()
    with pytest.raises(CorruptRunError, match="missing weights"):
        store.load_weights("g000-001", checksum)
