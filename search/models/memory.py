"""A process's own memory: what it holds, and giving back what it freed.

glibc's malloc keeps freed heap for later allocations instead of returning it to the kernel, so
a process's resident set stays at the high-water mark of its last large job: after a
multiple-choice pass an actor keeps 0.56 GiB it no longer uses, 0.30 after `malloc_trim`
(benchmarks/results/scoring_memory.md); after fine-tuning, the driver kept 0.65 GiB of
optimizer state and activations (search_memory.md). `release_freed_heap` hands it back.
Handing it back costs the next job the page faults of taking it again: after every job of
the demo's mix, 5% more time (11% on first-stage screens) for a 6% lower peak
(benchmarks/results/heap_release.md), so actors keep theirs. `resident_memory` reads the
kernel's count of the process's resident set, its private part and its peak (Linux; None
elsewhere).
"""
from __future__ import annotations

import ctypes
from pathlib import Path


def release_freed_heap() -> None:
    """Return the heap glibc keeps after frees to the kernel (a no-op without glibc)."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def resident_memory() -> dict[str, int] | None:
    """Bytes this process holds, by the kernel's count: `rss` resident now, `private` of it its
    own (anonymous) pages, the rest mapped files and shared memory such as the object store's;
    `peak` the most ever resident (VmHWM). None where /proc/self/status does not say."""
    try:
        text = Path("/proc/self/status").read_text()
    except OSError:
        return None
    wanted = {"VmRSS": "rss", "RssAnon": "private", "VmHWM": "peak"}
    fields = {}
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key in wanted:
            fields[wanted[key]] = int(value.split()[0]) * 1024  # the kernel writes kB
    return fields if len(fields) == len(wanted) else None
