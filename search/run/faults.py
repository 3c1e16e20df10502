"""Fault injection for the tests that kill, crash and poison real runs; inert unless asked.

Each hook is switched on by one environment variable and does nothing otherwise:

    EVOFUSE_FAULT_STALL=<id>           the driver hangs right after journalling candidate <id>
                                       (the kill tests SIGKILL it there)
    EVOFUSE_FAULT_CRASH=<id>@<marker>  the actor scoring <id> dies once (os._exit), leaving
                                       <marker> so the retry succeeds
    EVOFUSE_FAULT_NAN=<id>             candidate <id>'s weights are filled with NaN

Local Ray actors get these variables through the runtime environment (`worker_env`).
"""
from __future__ import annotations

import os
import time

STALL_ENV = "EVOFUSE_FAULT_STALL"
CRASH_ENV = "EVOFUSE_FAULT_CRASH"
NAN_ENV = "EVOFUSE_FAULT_NAN"


def stall_after_journal(candidate_id: str) -> None:
    if os.environ.get(STALL_ENV) == candidate_id:
        time.sleep(3600)


def crash_once(candidate_id: str) -> None:
    target, sep, marker = os.environ.get(CRASH_ENV, "").partition("@")
    if sep and target == candidate_id and not os.path.exists(marker):
        open(marker, "w").close()
        os._exit(1)


def poison_weights(candidate_id: str, params: dict) -> None:
    if os.environ.get(NAN_ENV) == candidate_id:
        next(iter(params.values())).fill_(float("nan"))


def worker_env() -> dict[str, str]:
    """The fault variables (and the model cache) that actors must see."""
    return {k: v for k, v in os.environ.items() if k in (CRASH_ENV, NAN_ENV, "EVOFUSE_CACHE")}


__all__ = ["STALL_ENV", "CRASH_ENV", "NAN_ENV", "stall_after_journal", "crash_once", "poison_weights", "worker_env"]
