"""One driver per run directory: an exclusive `fcntl.flock` on RUN/.lock.

The kernel releases the lock when the holding process dies, so a SIGKILLed driver never leaves
a stale lock; `lock_holder` tells `status` whether a driver is alive, and which.
"""
from __future__ import annotations

import errno
import fcntl
import os
from pathlib import Path
from typing import TYPE_CHECKING

from search.errors import RunDirError

if TYPE_CHECKING:
    from search.run.store import RunStore


class RunLock:
    """An exclusive `fcntl.flock` on RUN/.lock, held until `release` or the process ends."""

    _held: dict[Path, "RunLock"] = {}  # resolved run directory -> the lock this process holds

    def __init__(self, path: Path, handle):
        self.path, self.handle = path, handle

    @classmethod
    def acquire(cls, store: RunStore) -> "RunLock":
        key = store.root.resolve()
        if key in cls._held:
            return cls._held[key]
        try:
            handle = open(store.lock_path, "a")
        except OSError as exc:
            raise RunDirError(f"{store.lock_path}: cannot open the run's lock ({exc.strerror})") from None
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            handle.close()
            if exc.errno not in (errno.EAGAIN, errno.EACCES, errno.EWOULDBLOCK):
                raise RunDirError(f"{store.lock_path}: cannot lock ({exc.strerror})") from None
            pid = lock_holder(store.lock_path)
            who = f"evofuse process {pid}" if pid and pid > 0 else "another evofuse process"
            raise RunDirError(f"{store.root}: in use by {who} (one driver per run directory; wait for it or stop it)") from None
        lock = cls(key, handle)
        cls._held[key] = lock
        return lock

    def release(self) -> None:
        if self._held.get(self.path) is self:
            del self._held[self.path]
        self.handle.close()  # closing the only descriptor drops the flock

    @classmethod
    def release_all(cls) -> None:
        for lock in list(cls._held.values()):
            lock.release()


def lock_holder(path: Path) -> int | None:
    """Who holds `path`'s flock: its pid from /proc/locks (Linux); elsewhere a probe that can
    only say whether someone does (-1)."""
    try:
        st = os.stat(path)
    except OSError:
        return None
    try:
        table = Path("/proc/locks").read_text()
    except OSError:
        table = None
    if table is not None:
        device = f"{os.major(st.st_dev):02x}:{os.minor(st.st_dev):02x}:{st.st_ino}"
        same_inode = []  # (exact device match, pid): containers may show another device number
        for line in table.splitlines():
            fields = line.split()
            if "->" in fields or len(fields) < 6 or fields[1] != "FLOCK" or not fields[4].isdigit():
                continue
            if fields[5].rsplit(":", 1)[-1] == str(st.st_ino):
                same_inode.append((fields[5] == device, int(fields[4])))
        return max(same_inode)[1] if same_inode else None
    with open(path) as handle:  # no /proc/locks: a shared probe says held / not held
        try:
            fcntl.flock(handle, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except OSError:
            return -1
        fcntl.flock(handle, fcntl.LOCK_UN)
        return None


__all__ = ["RunLock", "lock_holder"]
