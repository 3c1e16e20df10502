"""The run directory: resolved config, state checkpoints, journal, logbook and weights.

    runs/<name>/
      config.yaml                  the resolved config, as run
      identity.json                its fingerprint (and the config it was taken of), written
                                   before config.yaml: the run's identity from its first moment
      .lock                        the driver's exclusive lock (empty; `fcntl.flock`)
      state.json                   generation, population, hall of fame, status, format version,
                                   and a checksum of its own content and of every weights file
      journal.jsonl                append-only, one line per finished evaluation, fsynced
      logbook.jsonl                one line per generation
      weights/<id>.safetensors     weights of population members that are not parents
      exports/<id>/                exported Hugging Face directories

Every file but the two append-only logs is written atomically (temporary file `.NAME.*.tmp`,
fsync, rename, fsync of the directory); an export is written into a temporary directory and
renamed into place. A process killed mid-append can leave a torn last log line; `read_journal`
drops it and `repair` cuts it off, so the evaluation is simply done again. `repair` (run by
`resume` under the lock) also removes the temporary files of interrupted writes, logbook lines
of generations the checkpoint does not hold yet and weights files it does not name: after it,
the directory is what an uninterrupted run had at that checkpoint. Nothing is unpickled; a file
that does not parse is a `CorruptRunError` naming it (and the line).

One driver at a time: `RunLock` holds `fcntl.flock` on `.lock` for the life of the process (the
kernel drops it when the process dies, so a killed driver never leaves a stale lock), and
`lock_holder` reads who holds it (`/proc/locks`), so `status` can tell a running run from one
whose driver is gone. Readers (`status`, `report`, `export`) take no lock.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import Iterable

import torch

from compression.loader import fsync_dir

from search.errors import EvofuseError, RunDirError
from search.run import faults

FORMAT_VERSION = 1
LOCK_NAME = ".lock"
TEMP_SUFFIX = ".tmp"
# temporary files of atomic writes: ours (`.NAME.xxxxxxxx.tmp`) and those of older versions
# (`.state.json.xxxxxxxx`, `.g000-000.safetensors.xxxxxxxx`)
_TEMP = re.compile(r"^\..+\.tmp$|^\..+\.(json|yaml|jsonl|safetensors)\.[A-Za-z0-9_]{8}$")


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


def atomic_write(path: Path, data: bytes, kind: str = "file") -> None:
    """Write through `.NAME.*.tmp` in the same directory, fsync it, rename it over `path` and
    fsync the directory: after a crash `path` holds the old bytes or the new ones, never a part.
    `kind` names the kill points (`<kind>.fsync`, `<kind>.rename`, search.run.faults)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=TEMP_SUFFIX, dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as handle:
            os.fchmod(handle.fileno(), 0o644)
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        faults.kill_point(f"{kind}.fsync")
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    faults.kill_point(f"{kind}.rename")
    fsync_dir(path.parent)


def _json_type(value) -> str:
    names = {dict: "object", list: "array", str: "string", bool: "boolean", int: "number", float: "number"}
    return "null" if value is None else names.get(type(value), type(value).__name__)


def _decode(path: Path, data: bytes) -> str:
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        raise CorruptRunError(f"{path}: not UTF-8 text (corrupt file)") from None


class RunStore:
    def __init__(self, root: str | Path):
        self.root = Path(root)

    # paths
    config_path = property(lambda self: self.root / "config.yaml")
    identity_path = property(lambda self: self.root / "identity.json")
    lock_path = property(lambda self: self.root / LOCK_NAME)
    state_path = property(lambda self: self.root / "state.json")
    journal_path = property(lambda self: self.root / "journal.jsonl")
    logbook_path = property(lambda self: self.root / "logbook.jsonl")
    weights_dir = property(lambda self: self.root / "weights")
    exports_dir = property(lambda self: self.root / "exports")

    def exists(self) -> bool:
        """A run was started here (its config, checkpoint or journal is on disk)."""
        return self.config_path.is_file() or self.state_path.is_file() or self.journal_path.is_file()

    def leftovers_only(self) -> bool:
        """Nothing here but what a start killed before its config leaves (lock, identity, temps)."""
        return all(p.name in (LOCK_NAME, self.identity_path.name) or _TEMP.match(p.name) for p in self.root.iterdir())

    # identity: the resolved config's fingerprint, from the moment the directory is created
    def write_identity(self, fingerprint: str, config: dict) -> None:
        body = {"fingerprint": fingerprint, "format_version": FORMAT_VERSION, "config": config}
        atomic_write(self.identity_path, json.dumps(body, indent=1, sort_keys=True).encode(), "config")

    def read_identity(self) -> dict | None:
        if not self.identity_path.is_file():
            return None
        identity = self._read_json(self.identity_path)
        if not isinstance(identity, dict) or not isinstance(identity.get("fingerprint"), str):
            raise CorruptRunError(f"{self.identity_path}: not an evofuse run identity (corrupt file)")
        return identity

    def write_config(self, text: str) -> None:
        atomic_write(self.config_path, text.encode(), "config")

    # state
    def write_state(self, state: dict) -> None:
        state = {**state, "format_version": FORMAT_VERSION}
        state["checksum"] = _content_checksum(state)
        atomic_write(self.state_path, json.dumps(state, indent=1, sort_keys=True).encode(), "state")

    def read_state(self) -> dict | None:
        if not self.state_path.is_file():
            return None
        state = self._read_json(self.state_path)
        if not isinstance(state, dict):
            raise CorruptRunError(f"{self.state_path}: not a checkpoint (a JSON {_json_type(state)}, expected an object)")
        if state.get("format_version") != FORMAT_VERSION:
            raise CorruptRunError(
                f"{self.state_path}: format version {state.get('format_version')!r}, this evofuse reads {FORMAT_VERSION}"
            )
        if state.get("checksum") != _content_checksum(state):
            raise CorruptRunError(f"{self.state_path}: checksum mismatch (corrupt checkpoint)")
        return state

    def _read_json(self, path: Path):
        try:
            return json.loads(_decode(path, path.read_bytes()))
        except json.JSONDecodeError as exc:
            raise CorruptRunError(f"{path}: not valid JSON ({exc.msg}; corrupt file)") from None

    # journal
    def append_journal(self, entry: dict) -> None:
        self._append(self.journal_path, entry, "journal")

    def append_logbook(self, record: dict) -> None:
        self._append(self.logbook_path, record, "logbook")

    def _append(self, path: Path, entry: dict, kind: str) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        data = (json.dumps(entry, sort_keys=True) + "\n").encode()
        with open(path, "ab") as handle:
            handle.write(faults.torn_append(handle, data, f"{kind}.torn"))
            handle.flush()
            os.fsync(handle.fileno())
        faults.kill_point(f"{kind}.fsync")

    def read_journal(self) -> list[dict]:
        rows = _read_jsonl(self.journal_path)
        for lineno, row in enumerate(rows, 1):
            if not isinstance(row.get("id"), str) or row.get("split") not in ("dev", "test"):
                raise CorruptRunError(f"{self.journal_path}:{lineno}: not an evaluation (no id / split)")
        return rows

    def read_logbook(self) -> list[dict]:
        return _read_jsonl(self.logbook_path)

    def repair_logs(self) -> None:
        """Cut a torn last line (from a kill mid-append) off the append-only logs."""
        for path in (self.journal_path, self.logbook_path, self.root / "optuna.journal"):
            if not path.is_file():
                continue
            data = path.read_bytes()
            if data and not data.endswith(b"\n"):
                keep = data[: data.rfind(b"\n") + 1]
                with open(path, "r+b") as handle:
                    handle.truncate(len(keep))
                    handle.flush()
                    os.fsync(handle.fileno())

    def trim_logbook(self, generations: int) -> None:
        """Drop logbook lines of generations the checkpoint does not hold (a kill between the
        logbook append and the state write): the resumed run writes them again."""
        records = self.read_logbook()
        keep = [r for r in records if not isinstance(r.get("gen"), int) or r["gen"] < generations]
        if len(keep) != len(records):
            text = "".join(json.dumps(r, sort_keys=True) + "\n" for r in keep)
            atomic_write(self.logbook_path, text.encode(), "logbook")

    # repair after a kill
    def remove_temporaries(self) -> list[Path]:
        """Temporary files and directories of interrupted atomic writes and exports, and a stale
        Optuna journal lock (only called under the run lock: no other writer is alive)."""
        removed = []
        for directory in (self.root, self.weights_dir, self.exports_dir):
            if not directory.is_dir():
                continue
            for path in directory.iterdir():
                if _TEMP.match(path.name):
                    shutil.rmtree(path) if path.is_dir() and not path.is_symlink() else path.unlink()
                    removed.append(path)
        optuna_lock = self.root / "optuna.journal.lock"
        if optuna_lock.is_symlink() or optuna_lock.exists():
            optuna_lock.unlink()
            removed.append(optuna_lock)
        return removed

    def repair(self, state: dict | None) -> None:
        """Make the directory what an uninterrupted run had at this checkpoint (see the module
        docstring); `state` is the checkpoint (None before the first one)."""
        self.repair_logs()
        self.remove_temporaries()
        self.trim_logbook(state["generation"] if state else 0)
        if self.weights_dir.is_dir():
            self.prune_weights((state or {}).get("weight_checksums", {}))

    def check_journal(self, state: dict | None) -> None:
        """Every evaluation the checkpoint refers to is in the journal (else one line)."""
        if state is None:
            return
        dev = {row["id"] for row in self.read_journal() if row["split"] == "dev"}
        ids = list(state.get("parents", {})) + [m.get("id") for m in state.get("population", []) + state.get("hall_of_fame", [])]
        missing = [i for i in ids if i not in dev]
        if missing:
            what = "missing" if not self.journal_path.is_file() else f"has no evaluation of {missing[0]!r}"
            raise CorruptRunError(f"{self.journal_path}: {what} (the checkpoint refers to it; the run's evaluations are lost)")

    def check_writable(self) -> None:
        """Refuse a run directory this process cannot write, before any work starts."""
        paths = [self.root] + [p for p in (self.weights_dir, self.exports_dir, self.state_path, self.journal_path,
                                           self.logbook_path, self.config_path, self.lock_path) if p.exists()]
        for path in paths:
            if not os.access(path, os.W_OK):
                raise RunDirError(f"{path}: not writable (a run directory must be writable to run)")
        try:
            fd, probe = tempfile.mkstemp(prefix=".probe.", suffix=TEMP_SUFFIX, dir=self.root)
            os.close(fd)
            os.unlink(probe)
        except OSError as exc:
            raise RunDirError(f"{self.root}: not writable ({exc.strerror})") from None

    # the lock
    def lock(self):
        """Take this run's lock for the life of the process (re-entrant within it)."""
        from search.run.lock import RunLock

        return RunLock.acquire(self)

    def lock_holder(self) -> int | None:
        """The pid of the process holding the run's lock; None when no driver is alive."""
        from search.run.lock import lock_holder

        return lock_holder(self.lock_path)

    # weights
    def weights_path(self, member_id: str) -> Path:
        return self.weights_dir / f"{member_id}.safetensors"

    def save_weights(self, member_id: str, state: dict[str, torch.Tensor] | None = None, *,
                     specs: list[tuple] | None = None, produce=None) -> str:
        """Write a member's weights atomically, one tensor at a time; return the file's sha256.

        Either a whole `state`, or `specs` (`(name, dtype, shape)` of every tensor) and
        `produce(name)`, called once per tensor just before its bytes are written, so a replayed
        member is never whole in memory. Either way the file is byte for byte
        `safetensors.torch.save(state, metadata={"format": "pt"})` (tensors by dtype, then
        name), as earlier versions stored it: existing runs' checksums still match. Written as
        `atomic_write` writes (`.NAME.*.tmp`, fsync, rename, the `weights.*` kill points).
        """
        from search.models.tensors import _header_bytes, _tensor_bytes, safetensors_order

        if state is not None:
            specs = [(name, tensor.dtype, tuple(tensor.shape)) for name, tensor in state.items()]
            produce = state.__getitem__
        if specs is None or produce is None:
            raise TypeError("save_weights needs a state, or specs and produce")
        specs = safetensors_order(specs)
        path = self.weights_path(member_id)
        path.parent.mkdir(parents=True, exist_ok=True)
        digest = hashlib.sha256()
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=TEMP_SUFFIX, dir=path.parent)
        try:
            with os.fdopen(fd, "wb") as handle:
                os.fchmod(handle.fileno(), 0o644)
                header = _header_bytes(specs, {"format": "pt"})
                handle.write(header)
                digest.update(header)
                for name, dtype, shape in specs:
                    data = _tensor_bytes(name, produce(name), dtype, shape)  # a view of one tensor
                    handle.write(data)
                    digest.update(data)
                    del data  # never more than one produced tensor alive
                handle.flush()
                os.fsync(handle.fileno())
            faults.kill_point("weights.fsync")
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        faults.kill_point("weights.rename")
        fsync_dir(path.parent)
        return digest.hexdigest()

    def load_weights(self, member_id: str, expected_sha256: str | None = None) -> dict[str, torch.Tensor]:
        """A member's weights, memory-mapped by safetensors (pages are read as the tensors are
        used, copy-on-write; never a bytes copy of the file), once the file's sha256 matches
        `expected_sha256` when given (hashed in chunks)."""
        from safetensors.torch import load_file

        path = self.weights_path(member_id)
        if not path.is_file():
            raise CorruptRunError(f"{path}: missing weights of population member {member_id}")
        if expected_sha256 and sha256_file(path) != expected_sha256:
            raise CorruptRunError(f"{path}: checksum mismatch (corrupt checkpoint)")
        try:
            return load_file(str(path))
        except Exception as exc:  # safetensors' own error types: a damaged file
            raise CorruptRunError(f"{path}: not a safetensors file ({str(exc).splitlines()[0][:120]})") from None

    def verify_weights(self, checksums: dict[str, str]) -> None:
        if not isinstance(checksums, dict):
            raise CorruptRunError(f"{self.state_path}: weight_checksums is not a mapping (corrupt checkpoint)")
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
    text = _decode(path, path.read_bytes())
    for lineno, line in enumerate(text.splitlines(keepends=True), 1):
        if not line.endswith("\n"):
            break  # torn last line of a killed append
        if not line.strip():
            continue
        try:
            entry = json.loads(line)
        except json.JSONDecodeError as exc:
            raise CorruptRunError(f"{path}:{lineno}: not valid JSON ({exc.msg}; corrupt line)") from None
        if not isinstance(entry, dict):
            raise CorruptRunError(f"{path}:{lineno}: a JSON {_json_type(entry)}, not an object (corrupt line)")
        entries.append(entry)
    return entries


__all__ = ["RunStore", "CorruptRunError", "RunDirError", "FORMAT_VERSION", "atomic_write", "fsync_dir", "sha256_file"]
