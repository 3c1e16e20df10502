"""The run directory: resolved config, state checkpoints, journal, logbook and weights.

    runs/<name>/
      config.yaml                  the resolved config, as run
      state.json                   generation, population, hall of fame, status, format version,
                                   and a checksum of its own content and of every weights file
      journal.jsonl                append-only, one line per finished evaluation, fsynced
      logbook.jsonl                one line per generation
      weights/<id>.safetensors     weights of population members that are not parents
      exports/<id>/                exported Hugging Face directories

Every file but the two append-only logs is written atomically (temporary file, fsync, rename).
A process killed mid-append can leave a torn last journal line; `read_journal` drops it (and
`repair_journal` cuts it off) so the evaluation is simply done again. Nothing is unpickled.
"""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Iterable

import torch

from compression.loader import atomic_write_bytes, atomic_write_text

from search.errors import EvofuseError

FORMAT_VERSION = 1


class CorruptRunError(EvofuseError):
    """A run directory whose files do not match their checksums; one line naming the file."""


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 22), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _content_checksum(state: dict) -> str:
    body = {k: v for k, v in state.items() if k != "checksum"}
    return hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()


class RunStore:
    def __init__(self, root: str | Path):
        self.root = Path(root)

    # paths
    config_path = property(lambda self: self.root / "config.yaml")
    state_path = property(lambda self: self.root / "state.json")
    journal_path = property(lambda self: self.root / "journal.jsonl")
    logbook_path = property(lambda self: self.root / "logbook.jsonl")
    weights_dir = property(lambda self: self.root / "weights")
    exports_dir = property(lambda self: self.root / "exports")

    def exists(self) -> bool:
        return self.state_path.is_file() or self.journal_path.is_file()

    # state
    def write_state(self, state: dict) -> None:
        state = {**state, "format_version": FORMAT_VERSION}
        state["checksum"] = _content_checksum(state)
        atomic_write_text(self.state_path, json.dumps(state, indent=1, sort_keys=True))

    def read_state(self) -> dict | None:
        if not self.state_path.is_file():
            return None
        try:
            state = json.loads(self.state_path.read_text())
        except json.JSONDecodeError:
            raise CorruptRunError(f"{self.state_path}: not valid JSON (corrupt checkpoint)") from None
        if state.get("format_version") != FORMAT_VERSION:
            raise CorruptRunError(
                f"{self.state_path}: format version {state.get('format_version')!r}, this evofuse reads {FORMAT_VERSION}"
            )
        if state.get("checksum") != _content_checksum(state):
            raise CorruptRunError(f"{self.state_path}: checksum mismatch (corrupt checkpoint)")
        return state

    # journal
    def append_journal(self, entry: dict) -> None:
        self._append(self.journal_path, entry)

    def append_logbook(self, record: dict) -> None:
        self._append(self.logbook_path, record)

    def _append(self, path: Path, entry: dict) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        line = json.dumps(entry, sort_keys=True) + "\n"
        with open(path, "a") as handle:
            handle.write(line)
            handle.flush()
            os.fsync(handle.fileno())

    def read_journal(self) -> list[dict]:
        return _read_jsonl(self.journal_path)

    def read_logbook(self) -> list[dict]:
        return _read_jsonl(self.logbook_path)

    def repair_logs(self) -> None:
        """Cut a torn last line (from a kill mid-append) off the append-only logs."""
        for path in (self.journal_path, self.logbook_path):
            if not path.is_file():
                continue
            data = path.read_bytes()
            if data and not data.endswith(b"\n"):
                keep = data[: data.rfind(b"\n") + 1]
                with open(path, "r+b") as handle:
                    handle.truncate(len(keep))
                    handle.flush()
                    os.fsync(handle.fileno())

    # weights
    def weights_path(self, member_id: str) -> Path:
        return self.weights_dir / f"{member_id}.safetensors"

    def save_weights(self, member_id: str, state: dict[str, torch.Tensor] | None = None, *,
                     specs: list[tuple] | None = None, produce=None) -> str:
        """Write a member's weights atomically, one tensor at a time; return the file's sha256.

        Either a whole `state`, or `specs` (`(name, dtype, shape)` of every tensor) and
        `produce(name)`, called once per tensor as it is written, so a replayed member is never
        whole in memory. Either way the file is byte for byte `safetensors.torch.save(state,
        metadata={"format": "pt"})` (tensors by dtype, then name), as stored by earlier versions:
        the checksums of existing runs still match.
        """
        from search.models.tensors import safetensors_order, write_safetensors_streaming

        if state is not None:
            specs = [(name, tensor.dtype, tuple(tensor.shape)) for name, tensor in state.items()]
            produce = state.__getitem__
        if specs is None or produce is None:
            raise TypeError("save_weights needs a state, or specs and produce")
        return write_safetensors_streaming(self.weights_path(member_id), safetensors_order(specs), produce,
                                           metadata={"format": "pt"})

    def load_weights(self, member_id: str, expected_sha256: str | None = None) -> dict[str, torch.Tensor]:
        """A member's weights, memory-mapped by safetensors (pages are read as tensors are used,
        copy-on-write, no bytes copy of the file), after checking the file's sha256 when given."""
        from safetensors.torch import load_file

        path = self.weights_path(member_id)
        if not path.is_file():
            raise CorruptRunError(f"{path}: missing weights of population member {member_id}")
        if expected_sha256 and sha256_file(path) != expected_sha256:
            raise CorruptRunError(f"{path}: checksum mismatch (corrupt checkpoint)")
        return load_file(str(path))

    def verify_weights(self, checksums: dict[str, str]) -> None:
        for member_id, expected in checksums.items():
            path = self.weights_path(member_id)
            if not path.is_file():
                raise CorruptRunError(f"{path}: missing weights of population member {member_id}")
            if sha256_file(path) != expected:
                raise CorruptRunError(f"{path}: checksum mismatch (corrupt checkpoint)")

    def prune_weights(self, keep: Iterable[str]) -> None:
        keep = set(keep)
        for path in self.weights_dir.glob("*.safetensors"):
            if path.stem not in keep:
                path.unlink(missing_ok=True)


def _read_jsonl(path: Path) -> list[dict]:
    if not path.is_file():
        return []
    entries = []
    for line in path.read_text().splitlines(keepends=True):
        if not line.endswith("\n"):
            break  # torn last line of a killed append
        if line.strip():
            entries.append(json.loads(line))
    return entries
