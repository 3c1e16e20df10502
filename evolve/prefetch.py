"""TIES thresholds found while torch loads: the head start of `evofuse merge`.

A TIES merge of SmolLM2-135M with three experts spends ~1.1 s of one core finding each input's
trim threshold (the k-th largest |x - base| of every tensor), and the process spends its first
~0.75 s importing torch on one core while the other waits. The thresholds need only numpy and
the native bracket kernel (`evolve/magnitude.py`; neither imports torch), so `search/cli.py`
starts this module's worker process for the `merge` verb before anything imports torch, and
`merge_methods.magnitude_cut` takes a prefetched threshold when it is for the very same bytes
(input and base at the same file offsets, the same length, the same density). A prefetched
threshold is what `magnitude_threshold` returns for those bytes, so the merged model is the
same bits with or without it (`EVOFUSE_PREFETCH=0` turns it off).

What is prefetched is read from the YAML conservatively: `merge_method: ties`, no `slices`, no
cast on load (`dtype` absent or float32), no vocabulary union, local safetensors directories,
and per model one scalar density strictly between 0 and 1 (its own or the config's). Then
every float32 tensor the base and an expert share, one job per (tensor, expert), in the order
the merge writes them. Anything else (gradients, per-tensor filters, other methods, a hub name)
prefetches nothing for that model or config, and the merge finds those thresholds itself as
before. Nothing here reports errors: the merge reads the same files and reports them.

Tensors are matched by where their bytes lie, not by name: the merge's reader registers each
file mapping's address range here (`register_mapping`), so a data pointer names a (file, offset).
A job the merge asks for before the worker reaches it is dropped from the worker's queue and
the merge computes it itself; one the worker has begun is waited for.
"""
from __future__ import annotations

import json
import mmap
import os
import signal
import struct
import sys
import threading
from pathlib import Path
from typing import Any

import numpy as np

from evolve import native
from evolve.magnitude import Threshold, magnitude_threshold
from evolve.slices import is_pre_layer, split_layer_name

__all__ = ["start", "stop", "prefetched_threshold", "register_mapping", "unregister_mapping", "last_counts"]

INDEX_FILE = "model.safetensors.index.json"
MAX_HEADER_BYTES = 100 * 2**20

Location = tuple[str, int]  # (real path of the file, byte offset of the tensor's data)
JobKey = tuple[Location, Location, int, float]  # (input, base, element count, density)

_registry_lock = threading.Lock()
_mappings: dict[int, tuple[int, str]] = {}  # start address -> (length, real path) of the merge's mappings
_active: _Prefetch | None = None
_last_counts: dict[str, int] = {}


# ---- the merge's side: where a pointer lies, and the lookup ---------------------------------------


def register_mapping(address: int, length: int, path: str | Path) -> None:
    """A file mapping of the merge's reader: pointers in [address, address + length) lie in `path`."""
    with _registry_lock:
        _mappings[address] = (length, os.path.realpath(path))


def unregister_mapping(address: int) -> None:
    with _registry_lock:
        _mappings.pop(address, None)


def _locate(address: int) -> Location | None:
    with _registry_lock:
        for start, (length, path) in _mappings.items():
            if start <= address < start + length:
                return path, address - start
    return None


def prefetched_threshold(x: np.ndarray, base: np.ndarray, density: float) -> Threshold | None:
    """The threshold for the k-th largest |x - base| (flat arrays) if the prefetch found it, else None."""
    prefetch = _active
    if prefetch is None or x.dtype != np.float32 or base.dtype != np.float32 \
            or not (x.flags.c_contiguous and base.flags.c_contiguous):
        return None
    where_x, where_base = _locate(x.ctypes.data), _locate(base.ctypes.data)
    if where_x is None or where_base is None:
        return None
    return prefetch.take((where_x, where_base, x.shape[0], float(density)))


# ---- the worker process --------------------------------------------------------------------
#
# A process, not a thread: a thread shares the interpreter lock with the import, and each of
# its numpy and kernel calls gives the lock up and waits up to the 5 ms switch interval to get
# it back. Measured here: a thread found 30% of the thresholds during `import torch` (121M of
# 404M coordinates in 0.86 s; alone it finds all in 1.1 s). A forked process does not wait.
#
# The parent and the child share one byte per job (an anonymous shared mapping): 0 queued,
# 1 the child has begun it, 2 the merge took it. The child skips jobs the merge took; the merge
# takes a queued job and computes it itself rather than wait, and waits only for a job the child
# has begun. Should both see 0 at once, both compute it: the same number, a little work twice.
# Results come back through a pipe as fixed-size records (job, threshold, ties, tied).

RECORD = struct.Struct("<qdqq")
QUEUED, BEGUN, TAKEN = 0, 1, 2


class _Prefetch:
    def __init__(self, keys: list[JobKey], last_of_tensor: list[bool]):
        self.index = {key: i for i, key in enumerate(keys)}
        self.states = mmap.mmap(-1, len(keys))  # anonymous and shared: the child's writes are seen here
        self.results: dict[int, Threshold | None] = {}
        self.lock = threading.Lock()
        self.counts = {"jobs": len(keys), "used": 0, "taken": 0}
        read_end, write_end = os.pipe()
        self.pid = os.fork()
        if self.pid == 0:  # the child: find the thresholds, report them, leave without cleanup
            code = 1
            try:
                os.close(read_end)
                _work(keys, last_of_tensor, self.states, write_end)
                code = 0
            finally:
                os._exit(code)
        os.close(write_end)
        self.pipe = read_end
        self.pending = b""
        self.ended = False  # the child exited (or died): nothing more will arrive

    def take(self, key: JobKey) -> Threshold | None:
        """The job's threshold (waiting while the child finds it); None if there is no such job,
        the child has not begun it (then it never will: the caller finds it), or it failed."""
        i = self.index.get(key)
        if i is None:
            return None
        with self.lock:
            self._receive(block=False)
            if i not in self.results and self.states[i] == QUEUED:
                self.states[i] = TAKEN
                self.counts["taken"] += 1
                return None
            while i not in self.results and not self.ended:
                self._receive(block=True)
            found = self.results.get(i)
            self.counts["used"] += found is not None
            return found

    def _receive(self, block: bool) -> None:
        """Read what the pipe holds: everything waiting, or when `block` one read that waits."""
        while not self.ended:
            os.set_blocking(self.pipe, block)
            try:
                chunk = os.read(self.pipe, 1 << 16)
            except BlockingIOError:
                return
            if not chunk:
                self.ended = True
                return
            data = self.pending + chunk
            whole = len(data) - len(data) % RECORD.size
            for i, value, ties, tied in RECORD.iter_unpack(data[:whole]):
                self.results[i] = None if ties < 0 else Threshold(value, ties, tied)
            self.pending = data[whole:]
            if block:
                return

    def close(self) -> None:
        """Stop the child if it is still working (its remaining jobs are not needed) and reap it."""
        try:
            os.kill(self.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        os.waitpid(self.pid, 0)
        os.close(self.pipe)
        self.states.close()


def _work(keys: list[JobKey], last_of_tensor: list[bool], states: mmap.mmap, pipe: int) -> None:
    """The child's loop: every job the merge has not taken, in order, one record each."""
    files: dict[str, mmap.mmap] = {}
    for i, key in enumerate(keys):
        if states[i] != QUEUED:
            continue
        states[i] = BEGUN
        try:
            found = _threshold_at(key, last_of_tensor[i], files)
            record = RECORD.pack(i, found.value, found.ties, found.tied)
        except Exception:  # noqa: BLE001 - a file changed under us, ...: the merge finds it itself
            record = RECORD.pack(i, 0.0, -1, -1)
        os.write(pipe, record)  # one record is far below PIPE_BUF: written whole


def _threshold_at(key: JobKey, last_of_tensor: bool, files: dict[str, mmap.mmap]) -> Threshold:
    (x_path, x_offset), (base_path, base_offset), count, density = key
    arrays = []
    for path, offset in ((x_path, x_offset), (base_path, base_offset)):
        if path not in files:
            with open(path, "rb") as handle:
                files[path] = mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_READ)
        arrays.append(np.frombuffer(files[path], dtype=np.float32, count=count, offset=offset))
    found = magnitude_threshold(arrays[0], arrays[1], max(1, int(density * count)))
    del arrays  # the buffer exports, before the pages are dropped
    # keep the resident set to the tensors in flight (the pages stay in the page cache)
    _drop_pages(files[x_path], x_offset, 4 * count)
    if last_of_tensor:
        _drop_pages(files[base_path], base_offset, 4 * count)
    return found


def _drop_pages(mapping: mmap.mmap, offset: int, length: int) -> None:
    begin = offset - offset % mmap.PAGESIZE
    if hasattr(mapping, "madvise") and length:
        mapping.madvise(mmap.MADV_DONTNEED, begin, offset + length - begin)


def _float32_tensors(directory: Path) -> dict[str, tuple[tuple[int, ...], str, int]] | None:
    """{name: (shape, real path of its file, data offset)} of a safetensors directory's float32
    tensors (aligned, inside their file); None when it has no safetensors weights."""
    index = directory / INDEX_FILE
    if index.is_file():
        files = sorted({directory / f for f in json.loads(index.read_text()).get("weight_map", {}).values()})
    else:
        files = sorted(directory.glob("*.safetensors"))
    if not files:
        return None
    tensors = {}
    for file in files:
        with open(file, "rb") as handle:
            length = int.from_bytes(handle.read(8), "little")
            if length > MAX_HEADER_BYTES:
                return None
            header = json.loads(handle.read(length))
        data_start, size = 8 + length, os.path.getsize(file)
        for name, entry in header.items():
            if name == "__metadata__" or entry.get("dtype") != "F32":
                continue
            begin, end = (data_start + offset for offset in entry["data_offsets"])
            shape = tuple(entry["shape"])
            if begin % 4 == 0 and end <= size and end - begin == 4 * int(np.prod(shape, dtype=np.int64)) > 0:
                tensors[name] = (shape, os.path.realpath(file), begin)
    return tensors


def _local_directory(reference: Any, config_dir: Path) -> Path | None:
    """A model reference as the merge resolves a local one: from the working directory, then the config's."""
    if not isinstance(reference, str):
        return None
    for candidate in (Path(reference), config_dir / reference):
        if candidate.is_dir():
            return candidate.resolve()
    return None


def _scalar_density(value: Any) -> float | None:
    if isinstance(value, (int, float)) and not isinstance(value, bool) and 0 < value < 1:
        return float(value)
    return None


def _merge_order(name: str) -> tuple:
    """The order `evolve.slices.plan_output_tensors` writes an unsliced model's tensors in."""
    parts = split_layer_name(name)
    if parts is None:
        return (0 if is_pre_layer(name) else 2, 0, name)
    prefix, layer, suffix = parts
    return (1, layer, prefix + "\0" + suffix)


def plan_jobs(config_path: str | Path) -> list[tuple[JobKey, bool]]:
    """The (tensor, expert) thresholds a TIES YAML will need, in merge order; [] when in doubt."""
    import yaml  # safe_load only: the same YAML the merge validates itself

    config_path = Path(config_path)
    config = yaml.safe_load(config_path.read_text(encoding="utf-8"))
    if not isinstance(config, dict) or config.get("merge_method") != "ties" \
            or config.get("dtype") not in (None, "float32") \
            or any(config.get(key) is not None for key in ("slices", "tokenizer_source", "tokenizer")):
        return []
    config_dir = config_path.resolve().parent
    base_dir = _local_directory(config.get("base_model"), config_dir)
    base = _float32_tensors(base_dir) if base_dir is not None else None
    defaults = config.get("parameters") or {}
    if base is None or not isinstance(defaults, dict) or not isinstance(config.get("models"), list):
        return []
    experts = []  # (tensors, density) per model that will be trimmed
    for entry in config["models"]:
        if not isinstance(entry, dict):
            return []
        parameters = entry.get("parameters") or {}
        density = _scalar_density(parameters.get("density", defaults.get("density"))) \
            if isinstance(parameters, dict) else None
        directory = _local_directory(entry.get("model"), config_dir)
        if density is not None and directory is not None and directory != base_dir:
            tensors = _float32_tensors(directory)
            if tensors is not None:
                experts.append((tensors, density))
    jobs = []
    for name in sorted(base, key=_merge_order):
        shape, base_file, base_offset = base[name]
        count = int(np.prod(shape, dtype=np.int64))
        keys = [((tensors[name][1], tensors[name][2]), (base_file, base_offset), count, density)
                for tensors, density in experts if name in tensors and tensors[name][0] == shape]
        jobs.extend((key, i == len(keys) - 1) for i, key in enumerate(keys))  # (job, last for its tensor)
    return jobs


# ---- starting and stopping --------------------------------------------------------------------


def start(config_path: str | Path) -> bool:
    """Start finding the YAML's TIES thresholds in a forked process; False when it does not
    start: nothing to find, turned off, not Linux, or torch already loaded (nothing to overlap)."""
    global _active
    stop()
    if os.environ.get("EVOFUSE_PREFETCH", "1") == "0" or not sys.platform.startswith("linux") \
            or "torch" in sys.modules:  # also: never fork a process running torch's threads
        return False
    try:
        jobs = plan_jobs(config_path)
    except Exception:  # noqa: BLE001 - a bad YAML or file: the merge says what is wrong
        return False
    if not jobs:
        return False
    native.library()  # built or loaded once, before the fork: the child inherits it
    _active = _Prefetch([key for key, _ in jobs], [last for _, last in jobs])
    return True


def stop() -> None:
    """End the child (finished or not), and forget the jobs; `last_counts` tells what they did."""
    global _active
    prefetch, _active = _active, None
    if prefetch is None:
        return
    prefetch.close()
    _last_counts.clear()
    _last_counts.update(prefetch.counts)


def last_counts() -> dict[str, int]:
    """The last prefetch's counts: jobs planned, thresholds the merge used, jobs it took from the queue."""
    return dict(_last_counts)
