"""Fault injection for the tests that kill, crash and poison real runs; inert unless asked.

Each hook is switched on by one environment variable and does nothing otherwise:

    EVOFUSE_FAULT_STALL=<id>           the driver hangs right after journalling candidate <id>
                                       (the kill tests SIGKILL it there)
    EVOFUSE_FAULT_CRASH=<id>@<marker>  the actor scoring <id> dies once (os._exit), leaving
                                       <marker> so the retry succeeds
    EVOFUSE_FAULT_NAN=<id>             candidate <id>'s weights are filled with NaN
    EVOFUSE_FAULT_KILL_AT=<label>:<n>[,<label>:<n>...]
                                       the driver SIGKILLs itself the n-th time (counted from 1,
                                       per process) it reaches the kill point <label>

Kill points sit at the boundaries of every write to a run directory (search/run/store.py,
search/results/export.py), so a test can stop a run between any two steps that reach the disk:

    <kind>.fsync    an atomic write's temporary file is written and fsynced, not yet renamed
                    (kinds: config, state, weights)
    <kind>.rename   an atomic write's file has just been renamed into place
    <log>.torn      half of an append-only log's line is written and fsynced (logs: journal,
                    logbook): the torn last line of a kill mid-append
    <log>.fsync     a whole line is appended and fsynced
    export.write    an export's files are all written into its temporary directory
    export.rename   an export's directory has just been renamed into place

Local Ray actors get the actor-side variables through the runtime environment (`worker_env`);
kill points are the driver's only.
"""
from __future__ import annotations

import os
import signal
import threading
import time
from collections import Counter

STALL_ENV = "EVOFUSE_FAULT_STALL"
CRASH_ENV = "EVOFUSE_FAULT_CRASH"
NAN_ENV = "EVOFUSE_FAULT_NAN"
KILL_ENV = "EVOFUSE_FAULT_KILL_AT"

_hits: Counter = Counter()  # kill-point label -> times reached in this process
_hits_lock = threading.Lock()  # members are replayed side by side (WeightBank.keep_all)


def stall_after_journal(candidate_id: str) -> None:
    if os.environ.get(STALL_ENV) == candidate_id:
        time.sleep(3600)


def crash_once(candidate_id: str) -> None:
    target, sep, marker = os.environ.get(CRASH_ENV, "").partition("@")
    if sep and target == candidate_id and not os.path.exists(marker):
        open(marker, "w").close()
        os._exit(1)


def poison_weights(candidate_id: str, params: dict) -> bool:
    """NaN weights for the named candidate; True when this one was poisoned."""
    if os.environ.get(NAN_ENV) == candidate_id:
        next(iter(params.values())).fill_(float("nan"))
        return True
    return False


def _armed(label: str, hit: int) -> bool:
    for item in os.environ.get(KILL_ENV, "").split(","):
        name, _, n = item.strip().rpartition(":")
        if name == label and n.isdigit() and int(n) == hit:
            return True
    return False


def kill_point(label: str) -> None:
    """Count one pass through `label`; SIGKILL this process when EVOFUSE_FAULT_KILL_AT asks."""
    if not os.environ.get(KILL_ENV):
        return
    with _hits_lock:
        _hits[label] += 1
        hit = _hits[label]
    if _armed(label, hit):
        os.kill(os.getpid(), signal.SIGKILL)


def torn_append(handle, data: bytes, label: str) -> bytes:
    """Count one pass through `label` and return the bytes still to write: at the armed hit,
    half of `data` is written, flushed and fsynced (a torn last line) and the process dies."""
    if not os.environ.get(KILL_ENV):
        return data
    _hits[label] += 1
    if not _armed(label, _hits[label]):
        return data
    handle.write(data[: len(data) // 2])
    handle.flush()
    os.fsync(handle.fileno())
    os.kill(os.getpid(), signal.SIGKILL)
    return b""  # not reached


def worker_env() -> dict[str, str]:
    """The fault variables (and the model cache) that actors must see."""
    return {k: v for k, v in os.environ.items() if k in (CRASH_ENV, NAN_ENV, "EVOFUSE_CACHE")}


__all__ = [
    "STALL_ENV", "CRASH_ENV", "NAN_ENV", "KILL_ENV", "stall_after_journal", "crash_once", "poison_weights",
    "kill_point", "torn_append", "worker_env",
]
