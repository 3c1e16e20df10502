"""A process's memory: freed heap handed back, the kernel's counts read; and an actor's memory
job by job, the journal's record of what each actor held read back as the job that set the
actors' peak."""
from __future__ import annotations

import platform

import pytest

from search.models.memory import release_freed_heap, resident_memory
from search.results.report import actor_memory, format_actor_memory


@pytest.mark.skipif(platform.system() != "Linux" or platform.libc_ver()[0] != "glibc", reason="glibc's malloc_trim")
def test_freed_heap_in_holes_is_handed_back():
    """Freeing every other 32 KiB block of 256 MiB leaves 128 MiB of holes that glibc keeps (no
    free block is at the top of the heap to trim by itself); releasing hands most of it back."""
    blocks = [bytearray(32 * 1024) for _ in range(8192)]
    for block in blocks:  # touch every page, so each block is resident
        block[::4096] = b"\1" * len(block[::4096])
    del blocks[::2]
    held = resident_memory()
    release_freed_heap()
    after = resident_memory()
    assert 0 < after["private"] <= after["rss"] <= after["peak"]
    assert held["rss"] - after["rss"] > 64 * 2**20, f"only {(held['rss'] - after['rss']) / 2**20:.0f} MiB handed back"
    del blocks


def row(cid: str, worker: str, rss: float, peak: float, stage=None, autocast=None) -> dict:
    r = {"id": cid, "split": "dev", "worker": worker, "memory": {"rss_gib": rss, "private_gib": rss - 0.5, "peak_gib": peak}}
    return {**r, **({"stage": stage} if stage is not None else {}), **({"autocast": autocast} if autocast else {})}


def test_the_first_job_at_the_highest_peak_set_it():
    journal = [
        row("base", "h:1", 1.0, 1.5),
        row("g000-001", "h:2", 1.1, 1.6, stage=0, autocast="bfloat16"),
        row("g000-002", "h:1", 1.2, 2.4, stage=2),  # raised actor 1 to the run's peak
        {"id": "g000-003", "split": "dev", "status": "stopped"},  # no job ran: no memory
        row("g000-004", "h:1", 0.9, 2.4, stage=0, autocast="bfloat16"),  # at the peak, did not raise it
        row("g000-005", "h:2", 1.3, 1.7, stage=1),
    ]
    memory = actor_memory(journal)
    assert memory == {"peak_gib": 2.4, "set_by": {"id": "g000-002", "split": "dev", "stage": 2, "autocast": None},
                      "private_gib": 0.8, "actors": 2}  # actor 2's last job; actor 1's was 0.4
    assert format_actor_memory(memory) == ("actors       peak 2.40 GiB resident (object-store pages included), set by "
                                           "g000-002 (dev, stage 2); 0.80 GiB private after the last job (2 actor processes)")
    assert actor_memory([{"id": "base", "split": "dev"}]) is None  # journals of earlier versions
