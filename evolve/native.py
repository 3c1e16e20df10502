"""Native kernels: `ties_kernel.c`, compiled once per machine with the system C compiler.

TIES on float32 CPU tensors is the one merge whose cost is arithmetic rather than reading and
writing: per coordinate it takes some thirty torch / numpy operations, each a pass over a
chunk. `ties_kernel.c` does the same arithmetic in two fused loops, rounding exactly as the torch
path does (no contraction into FMAs, no reassociation), so its results are the same bits
(`tests/test_native.py`).

The library is built on first use with `cc` (`$CC` if set) into the evofuse cache
(`$EVOFUSE_CACHE/kernels`, default `~/.cache/evofuse/kernels`), named by a hash of the source,
the flags, the compiler and the CPU's feature flags (`-march=native` code must not run on a
different CPU of a shared home directory), and loaded with ctypes; `make install` builds it
(`python -m evolve.native`). ctypes releases the GIL during a call, so merge threads run it in
parallel. Without a compiler, or with `EVOFUSE_NATIVE=0`, every caller takes the torch path: same
numbers, slower.

Importing this module does not import torch (the threshold search of `evolve/magnitude.py`
runs before torch is loaded, see `evolve/prefetch.py`); the merge kernel's wrappers take
torch tensors, the bracket's numpy arrays.
"""
from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import tempfile
import threading
from pathlib import Path
from typing import TYPE_CHECKING, Sequence

import numpy as np

if TYPE_CHECKING:
    import torch

__all__ = ["available", "arrays_supported", "library", "magnitude_bracket", "ties_merge", "build"]

log = logging.getLogger(__name__)

SOURCE = Path(__file__).with_name("ties_kernel.c")
FLAGS = ("-O3", "-march=native", "-ffp-contract=off", "-fno-math-errno", "-fPIC", "-shared")
BLOCK = 1024  # ties_kernel.c's block: the merge's scratch holds one block per input

_lock = threading.Lock()
_state: dict[str, object] = {}  # "library": the loaded CDLL, or None once a build failed


def _cache_dir() -> Path:
    # the same root as search.models.sources.cache_root (evolve does not import search)
    return Path(os.environ.get("EVOFUSE_CACHE", Path.home() / ".cache" / "evofuse")) / "kernels"


def _cpu_identity() -> str:
    """The CPU's model and feature flags (Linux), else the platform's processor string."""
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        return platform.machine() + platform.processor()
    wanted = [line for line in lines if line.startswith(("model name", "flags", "Features", "CPU part"))]
    return "\n".join(dict.fromkeys(wanted))  # one copy per distinct line, not one per core


def _library_path(compiler: str) -> Path:
    digest = hashlib.sha256()
    for part in (SOURCE.read_bytes(), " ".join(FLAGS).encode(), compiler.encode(), _cpu_identity().encode()):
        digest.update(part)
        digest.update(b"\0")
    return _cache_dir() / f"ties-{digest.hexdigest()[:16]}.so"


def build() -> Path:
    """Compile `ties_kernel.c` into the cache (atomically; a no-op when already there)."""
    compiler = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    if compiler is None:
        raise RuntimeError("no C compiler (cc / gcc / $CC) on PATH")
    target = _library_path(compiler)
    if target.is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent) as work:
        partial = Path(work) / target.name
        done = subprocess.run([compiler, *FLAGS, "-o", str(partial), str(SOURCE), "-lm"],
                              capture_output=True, text=True)
        if done.returncode != 0:
            raise RuntimeError(f"{compiler} failed on {SOURCE.name}: {done.stderr.strip()[-500:]}")
        os.replace(partial, target)  # two processes building at once: either file is the same
    return target


def _load(path: Path) -> ctypes.CDLL:
    lib = ctypes.CDLL(str(path))
    lib.evofuse_magnitude_bracket.restype = ctypes.c_int64
    lib.evofuse_magnitude_bracket.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64, ctypes.c_float,
                                              ctypes.c_float, ctypes.c_void_p, ctypes.c_int64, ctypes.c_void_p]
    lib.evofuse_ties_merge.restype = None
    lib.evofuse_ties_merge.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int32, ctypes.c_int64,
                                       ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p,
                                       ctypes.c_int32, ctypes.c_float, ctypes.c_void_p, ctypes.c_void_p]
    return lib


def library() -> ctypes.CDLL | None:
    """The loaded kernels, built on first use; None when disabled or when building failed."""
    if os.environ.get("EVOFUSE_NATIVE", "1") == "0":
        return None
    with _lock:
        if "library" not in _state:
            try:
                _state["library"] = _load(build())
            except (OSError, RuntimeError) as exc:  # no compiler, read-only cache, ...: the torch path
                log.info("native TIES kernel unavailable, using torch: %s", exc)
                _state["library"] = None
        return _state["library"]  # type: ignore[return-value]


def available(*tensors: torch.Tensor) -> bool:
    """Whether the merge kernel applies: contiguous float32 CPU tensors and a loaded library."""
    import torch  # loaded by whoever made the tensors

    return all(t.dtype == torch.float32 and t.device.type == "cpu" and t.is_contiguous() for t in tensors) \
        and library() is not None


def arrays_supported(*arrays: np.ndarray) -> bool:
    """Whether the bracket kernel applies: C-contiguous float32 arrays and a loaded library."""
    return all(a.dtype == np.float32 and a.flags.c_contiguous for a in arrays) and library() is not None


def magnitude_bracket(x: np.ndarray, base: np.ndarray, lower: float, upper: float,
                      capacity: int) -> tuple[int, np.ndarray] | None:
    """(#|x - base| > upper, the values in [lower, upper] in index order) over flat float32
    arrays of one length; None when more than `capacity` fall inside (the caller's exact fallback)."""
    inside = np.empty(capacity + 1, dtype=np.float32)  # + 1: see ties_kernel.c
    above = ctypes.c_int64(0)
    found = library().evofuse_magnitude_bracket(x.ctypes.data, base.ctypes.data, x.shape[0], lower, upper,
                                                inside.ctypes.data, capacity, ctypes.byref(above))
    return None if found < 0 else (above.value, inside[:found])


def ties_merge(base: torch.Tensor, tensors: Sequence[torch.Tensor], weights: Sequence[float],
               thresholds: Sequence[float | None], ties: Sequence[int], normalize: bool, scale: float,
               out: torch.Tensor) -> torch.Tensor:
    """`out = base + scale * TIES(w_i trim_i(x_i - base))` (see ties_kernel.c); a threshold of
    None means no trim for that input, `ties[i]` entries equal to threshold i are kept too."""
    count = len(tensors)
    pointers = (ctypes.c_void_p * count)(*[t.data_ptr() for t in tensors])
    thresholds_c = (ctypes.c_float * count)(*[0.0 if t is None else t for t in thresholds])
    trimmed = (ctypes.c_uint8 * count)(*[t is not None for t in thresholds])
    ties_left = (ctypes.c_int64 * count)(*ties)
    weights_c = (ctypes.c_float * count)(*weights)
    scratch = np.empty(count * BLOCK, dtype=np.float32)
    library().evofuse_ties_merge(base.data_ptr(), pointers, count, base.numel(), thresholds_c, trimmed, ties_left,
                                 weights_c, int(normalize), scale, scratch.ctypes.data, out.data_ptr())
    return out


if __name__ == "__main__":  # `python -m evolve.native`: build now (make install does)
    try:
        print(build())
    except RuntimeError as exc:
        print(f"native TIES kernel not built ({exc}); merges use the torch path")
