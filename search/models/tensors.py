"""safetensors I/O one tensor at a time: headers, a streaming reader, streaming writers.

A safetensors file is an 8-byte little-endian header length, a JSON header mapping each
tensor name to `{"dtype", "shape", "data_offsets": [begin, end]}` (offsets relative to the end
of the header; an optional `"__metadata__"` of strings), then the raw little-endian bytes.

* Reading: `read_header` parses one file's header without touching the data;
  `SafetensorsSource` gives one tensor at a time: `view` maps the file (no copy; `release`
  drops a tensor's pages from the resident set once used, so they do not pile up there), `read`
  copies into a reusable caller-owned buffer with plain `preadv`.
  `PickleSource` is the same interface over `.bin` pickles (`weights_only=True`), used only
  when a caller allows pickles.
* Writing: the header is computed from the specs `(name, dtype, shape)` alone, so a file is
  written header first and then each tensor's bytes as `produce(name)` makes them, never
  holding more than one tensor. `write_safetensors_streaming` writes one file and returns its
  sha256; `write_sharded_streaming` writes mergekit/transformers-style shards plus
  `model.safetensors.index.json`. Every file is written atomically: a temporary file in the
  same directory, fsync, rename, fsync of the directory (as `compression.loader.atomic_write_bytes`).
* `check_same_tensors`: every model of a merge or a run shares tensor names and shapes; the
  first difference is one line naming the model and the tensor.
"""
from __future__ import annotations

import ctypes
import hashlib
import json
import mmap
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import torch

from compression.loader import atomic_write_text, fsync_dir
from evolve import prefetch
from search.errors import EvofuseError

__all__ = [
    "ST_DTYPES",
    "ST_CODES",
    "INDEX_FILE",
    "TensorFileError",
    "TensorInfo",
    "TensorSpec",
    "read_header",
    "weight_files",
    "SafetensorsSource",
    "PickleSource",
    "open_source",
    "check_same_tensors",
    "write_safetensors_streaming",
    "write_sharded_streaming",
    "safetensors_order",
    "nbytes_of",
]

# safetensors dtype codes <-> torch dtypes
ST_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
             "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8,
             "U8": torch.uint8, "BOOL": torch.bool}
ST_CODES = {v: k for k, v in ST_DTYPES.items()}
# How `safetensors.torch.save` lays a file out: by dtype in this order (its Rust `Dtype` order,
# largest first), then by name. `safetensors_order` puts specs in it.
SAVE_ORDER = ("I64", "F64", "F32", "I32", "BF16", "F16", "I16", "I8", "U8", "BOOL")
INDEX_FILE = "model.safetensors.index.json"
MAX_HEADER_BYTES = 100_000_000
TensorSpec = tuple[str, torch.dtype, tuple[int, ...]]  # (name, dtype, shape) of one tensor to write


class TensorFileError(EvofuseError):
    """A weights file that cannot be used, or models whose tensors differ; one line naming it."""


@dataclass(frozen=True)
class TensorInfo:
    file: Path
    dtype: torch.dtype
    shape: tuple[int, ...]
    start: int  # absolute byte offset in the file
    nbytes: int


def nbytes_of(dtype: torch.dtype, shape: Sequence[int]) -> int:
    count = 1
    for size in shape:
        count *= size
    return count * dtype.itemsize


# --- reading ------------------------------------------------------------------------------


def read_header(file: Path) -> dict[str, TensorInfo]:
    """The tensors of one safetensors file, from its JSON header (8-byte length + JSON)."""
    with open(file, "rb") as handle:
        size_bytes = handle.read(8)
        if len(size_bytes) != 8:
            raise TensorFileError(f"{file}: not a safetensors file (too short)")
        size = int.from_bytes(size_bytes, "little")
        if size > MAX_HEADER_BYTES:
            raise TensorFileError(f"{file}: not a safetensors file (header of {size} bytes)")
        try:
            header = json.loads(handle.read(size))
        except (UnicodeDecodeError, json.JSONDecodeError):
            raise TensorFileError(f"{file}: not a safetensors file (bad header)") from None
    data_start = 8 + size
    tensors = {}
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        if entry.get("dtype") not in ST_DTYPES:
            raise TensorFileError(f"{file}: tensor {name!r} has unsupported dtype {entry.get('dtype')!r}")
        begin, end = entry["data_offsets"]
        tensors[name] = TensorInfo(file, ST_DTYPES[entry["dtype"]], tuple(entry["shape"]),
                                   data_start + begin, end - begin)
    return tensors


def weight_files(directory: Path) -> list[Path]:
    """A model directory's safetensors files: those its index names, else every *.safetensors."""
    index = directory / INDEX_FILE
    if index.is_file():
        weight_map = json.loads(index.read_text()).get("weight_map", {})
        return sorted({directory / f for f in weight_map.values()})
    return sorted(directory.glob("*.safetensors"))


def _address(mapping: mmap.mmap) -> int:
    """The first byte's address of a writable mapping (the buffer export ends with the statement)."""
    return ctypes.addressof(ctypes.c_char.from_buffer(mapping))


class SafetensorsSource:
    """One model directory's tensors, one at a time: mapped views, or reads into caller-owned buffers."""

    def __init__(self, directory: Path):
        self.directory = directory
        self.tensors: dict[str, TensorInfo] = {}
        for file in weight_files(directory):
            self.tensors.update(read_header(file))
        self._handles: dict[Path, Any] = {}
        self._maps: dict[Path, mmap.mmap] = {}

    def read(self, name: str, buffer: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """(tensor `name`, the buffer holding it): read into `buffer` (flat uint8) when it is
        large enough, else into a new one the caller may keep for the next read."""
        info = self.tensors[name]
        if buffer is None or buffer.numel() < info.nbytes:
            buffer = torch.empty(max(info.nbytes, 1), dtype=torch.uint8)
        raw = buffer[: info.nbytes]
        handle = self._handles.get(info.file)
        if handle is None:
            handle = self._handles[info.file] = open(info.file, "rb", buffering=0)
        view = memoryview(raw.numpy()).cast("B")
        done = 0
        while done < info.nbytes:  # one read may return less than asked
            got = os.preadv(handle.fileno(), [view[done:]], info.start + done)
            if got <= 0:
                raise TensorFileError(f"{info.file}: truncated while reading tensor {name!r}")
            done += got
        return raw.view(info.dtype).view(info.shape), buffer

    def view(self, name: str) -> torch.Tensor:
        """Tensor `name` without a copy: a view of the file's pages, memory-mapped copy-on-write
        (a stray in-place write never reaches the file, and `release` discards it: callers treat
        views as read-only, as the merge operators treat their inputs). Its pages stay in the
        resident set until `release(name)`. A tensor not aligned to its element size is read
        (copied) instead."""
        info = self.tensors[name]
        itemsize = info.dtype.itemsize
        if info.nbytes == 0 or info.start % itemsize:
            return self.read(name)[0]
        mapping = self._mapping(info.file)
        if info.start + info.nbytes > len(mapping):
            raise TensorFileError(f"{info.file}: truncated while reading tensor {name!r}")
        flat = torch.frombuffer(mapping, dtype=info.dtype, count=info.nbytes // itemsize, offset=info.start)
        return flat.view(info.shape)

    def release(self, name: str) -> None:
        """Drop tensor `name`'s mapped pages from the resident set (they stay in the page cache;
        a view still alive reads them back on its next access)."""
        info = self.tensors[name]
        mapping = self._maps.get(info.file)
        if mapping is None or not hasattr(mapping, "madvise") or info.nbytes == 0:
            return
        begin = info.start - info.start % mmap.PAGESIZE
        mapping.madvise(mmap.MADV_DONTNEED, begin, min(info.start + info.nbytes, len(mapping)) - begin)

    def _mapping(self, file: Path) -> mmap.mmap:
        mapping = self._maps.get(file)
        if mapping is None:
            with open(file, "rb") as handle:
                mapping = self._maps[file] = mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_COPY)
            # where its bytes lie, so that `evofuse merge`'s TIES prefetch can match its views
            prefetch.register_mapping(_address(mapping), len(mapping), file)
        return mapping

    def close(self) -> None:
        for handle in self._handles.values():
            handle.close()
        self._handles.clear()
        for mapping in self._maps.values():
            prefetch.unregister_mapping(_address(mapping))
            try:
                mapping.close()
            except BufferError:  # a tensor still views it: unmapped when the last such tensor goes
                pass
        self._maps.clear()


class PickleSource:
    """A `.bin` model read with `torch.load(weights_only=True, mmap=True)` (only if allowed)."""

    def __init__(self, directory: Path):
        self.directory = directory
        self._state: dict[str, torch.Tensor] = {}
        for file in sorted(directory.glob("*.bin")):
            self._state.update(torch.load(file, map_location="cpu", weights_only=True, mmap=True))
        self.tensors = {n: TensorInfo(directory, t.dtype, tuple(t.shape), 0, t.numel() * t.element_size())
                        for n, t in self._state.items()}

    def read(self, name: str, buffer: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
        return self._state[name], buffer

    def view(self, name: str) -> torch.Tensor:
        return self._state[name]  # torch.load(mmap=True) already maps the file

    def release(self, name: str) -> None:
        pass

    def close(self) -> None:
        self._state.clear()


def open_source(directory: Path) -> SafetensorsSource | PickleSource:
    """The directory's safetensors weights, or its `.bin` pickles when it has no safetensors."""
    if any(directory.glob("*.safetensors")):
        return SafetensorsSource(directory)
    return PickleSource(directory)


# --- the same tensors everywhere -----------------------------------------------------------


def check_same_tensors(
    indexes: Mapping[str, Mapping[str, tuple[Sequence[int], Any]]],
    where: str = "parents",
    *,
    quote: bool = False,
    error: type[Exception] = TensorFileError,
) -> list[str]:
    """The sorted tensor names of the first model, once every model has the same names and shapes.

    `indexes` maps a model's name to {tensor name: (shape, dtype)}; the first entry is the
    reference. The first difference raises `error` with one line naming the model as
    `{where}.{name}` (just `name` when `where` is empty) and the tensor (as `repr` when
    `quote`), e.g. `parents.b: tensor model.norm.weight has shape [64], base has [32]`.
    """
    (base, reference), *others = indexes.items()
    show = repr if quote else str
    for model, index in others:
        label = f"{where}.{model}" if where else model
        for name in sorted(set(reference) | set(index)):
            if name not in index:
                raise error(f"{label}: tensor {show(name)} is missing (present in {base})")
            if name not in reference:
                raise error(f"{label}: tensor {show(name)} is not in {base}")
            if tuple(index[name][0]) != tuple(reference[name][0]):
                raise error(f"{label}: tensor {show(name)} has shape {list(index[name][0])}, "
                            f"{base} has {list(reference[name][0])}")
    return sorted(reference)


# --- writing -------------------------------------------------------------------------------


def _header_bytes(specs: Sequence[TensorSpec], metadata: Mapping[str, str]) -> bytes:
    """8-byte length + JSON header, padded with spaces so that the data starts 8-byte aligned."""
    header: dict[str, Any] = {"__metadata__": dict(metadata)} if metadata else {}
    offset = 0
    for name, dtype, shape in specs:
        if name in header:
            raise ValueError(f"tensor {name!r} is listed twice")
        nbytes = nbytes_of(dtype, shape)
        header[name] = {"dtype": ST_CODES[dtype], "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    return len(text).to_bytes(8, "little") + text


def _tensor_bytes(name: str, tensor: torch.Tensor, dtype: torch.dtype, shape: tuple[int, ...]) -> memoryview:
    if tensor.dtype != dtype or tuple(tensor.shape) != tuple(shape):
        raise ValueError(f"produce({name!r}) gave {tensor.dtype} {tuple(tensor.shape)}, "
                         f"the header says {dtype} {tuple(shape)}")
    flat = tensor.detach().to("cpu").contiguous().view(-1).view(torch.uint8)  # raw little-endian bytes
    return memoryview(flat.numpy())


def _writeback_starter() -> Callable[[int], None]:
    """`start(fd)`: ask the kernel to begin writing a file's dirty pages to disk now, without
    waiting (Linux `sync_file_range(fd, 0, 0, SYNC_FILE_RANGE_WRITE)`), so the disk works
    while the next tensors are made and the closing fsync finds little left (a 538 MB file:
    0.26 s of fsync after the last write, ~0 when started per tensor). A no-op elsewhere."""
    try:
        call = ctypes.CDLL(None, use_errno=True).sync_file_range
    except (AttributeError, OSError):
        return lambda fd: None
    call.argtypes = [ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint]
    call.restype = ctypes.c_int
    return lambda fd: call(fd, 0, 0, SYNC_FILE_RANGE_WRITE)  # a failure is harmless: the fsync writes it all


SYNC_FILE_RANGE_WRITE = 2  # <fcntl.h>
WRITEBACK_MIN_BYTES = 1 << 20  # smaller tensors (norms, biases) wait in the buffer for the next call
_start_writeback = _writeback_starter()


def _write_streaming(path: Path, specs: Sequence[TensorSpec], produce: Callable[[str], torch.Tensor],
                     metadata: Mapping[str, str], digest: Any | None) -> None:
    """Header, then each tensor as produced, into a temporary file renamed over `path` at the end."""
    path.parent.mkdir(parents=True, exist_ok=True)
    header = _header_bytes(specs, metadata)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(header)
            if digest is not None:
                digest.update(header)
            for name, dtype, shape in specs:
                data = _tensor_bytes(name, produce(name), dtype, shape)
                handle.write(data)
                if len(data) >= WRITEBACK_MIN_BYTES:
                    _start_writeback(handle.fileno())
                if digest is not None:
                    digest.update(data)
                del data  # never more than one produced tensor alive
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)


def write_safetensors_streaming(path: str | Path, specs: Sequence[TensorSpec],
                                produce: Callable[[str], torch.Tensor],
                                metadata: Mapping[str, str] | None = None) -> str:
    """Write one safetensors file tensor by tensor, atomically; return the file's sha256 (hex).

    `specs` lists `(name, dtype, shape)` in file order; `produce(name)` is called once per
    tensor, in that order, and must return a tensor of exactly that dtype and shape (any
    device). If `produce` raises, neither the file nor a temporary file is left behind.
    `metadata` defaults to `{"format": "pt"}`, what transformers and the run store write.
    With `safetensors_order(specs)` the file is byte for byte `safetensors.torch.save`'s.
    """
    digest = hashlib.sha256()
    _write_streaming(Path(path), specs, produce, {"format": "pt"} if metadata is None else metadata, digest)
    return digest.hexdigest()


def safetensors_order(specs: Sequence[TensorSpec]) -> list[TensorSpec]:
    """`specs` in the order `safetensors.torch.save` lays tensors out. Streamed in this order
    with the same metadata, a file is byte for byte the one `save` writes (same sha256)."""
    rank = {code: i for i, code in enumerate(SAVE_ORDER)}
    return sorted(specs, key=lambda spec: (rank[ST_CODES[spec[1]]], spec[0]))


def _plan_shards(specs: Sequence[TensorSpec], max_shard_bytes: int) -> list[list[TensorSpec]]:
    """Tensors in order, a new shard whenever the next one would pass `max_shard_bytes`."""
    shards: list[list[TensorSpec]] = [[]]
    size = 0
    for spec in specs:
        nbytes = nbytes_of(spec[1], spec[2])
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(spec)
        size += nbytes
    return shards


def write_sharded_streaming(out_dir: str | Path, specs: Sequence[TensorSpec],
                            produce: Callable[[str], torch.Tensor], max_shard_bytes: int) -> list[Path]:
    """Write `model-0000i-of-0000N.safetensors` shards and `model.safetensors.index.json`.

    Each shard is written as `write_safetensors_streaming` writes a file (`produce` is called
    once per tensor, in `specs` order). `model*.safetensors` files of an earlier write into the
    same directory that are not part of this one are removed (transformers would load a stale
    `model.safetensors`). Returns the shard paths.
    """
    out = Path(out_dir)
    shards = _plan_shards(specs, max_shard_bytes)
    names = [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    for name, shard in zip(names, shards):
        _write_streaming(out / name, shard, produce, {"format": "pt"}, None)
    for stale in out.glob("model*.safetensors"):
        if stale.name not in names:
            stale.unlink()
    weight_map = {spec[0]: name for name, shard in zip(names, shards) for spec in shard}
    total = sum(nbytes_of(dtype, shape) for _, dtype, shape in specs)
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    atomic_write_text(out / INDEX_FILE, json.dumps(index, indent=2) + "\n")
    return [out / name for name in names]
