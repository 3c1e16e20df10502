"""`evofuse merge CONFIG OUT`: a one-shot merge from a mergekit YAML, streamed tensor by tensor.

Accepted YAML (the mergekit subset for evofuse's methods; any other key is refused by name):

    merge_method: ties          # linear | task_arithmetic | ties | dare_linear | dare_ties | slerp
    base_model: path/to/base    # required by the task-vector methods and slerp
    models:
      - model: path/to/expert_a # a Hugging Face directory or a built-in name (smollm2-135m)
        parameters: {weight: 0.5, density: 0.7}
    parameters: {normalize: true, weight: [0, 0.5, 1]}   # shared; gradients and filters allowed
    dtype: float32              # inputs are cast to it (and the output, unless out_dtype)
    out_dtype: bfloat16         # optional
    tokenizer_source: base      # optional: base (default) or a model path

Relative model paths are taken from the current directory (as mergekit does), then from the
config's directory. Parameter semantics are mergekit's (see `evolve.recipe`,
`evolve.merge_methods`); the merge is the same `Recipe` a search uses.

How it streams: safetensors headers are read first (every input checked for the same tensor
names and shapes, the output shards and their headers planned), then for each tensor the
inputs' bytes are read with plain `readinto` into reused buffers (no memory map, so touched
pages do not pile up in the process' resident set), merged, and appended to the open output
shard. At most one tensor per input plus the merge's temporaries are in memory at once; the
reading of the next tensor overlaps the merge of the current one in a helper thread.

Output: `model-0000i-of-0000N.safetensors` + `model.safetensors.index.json`, `config.json`
(dtype set to the output's), generation config and tokenizer files from the tokenizer source,
and `mergekit_config.yml`, the YAML exactly as it ran (mergekit writes the same file, and
mergekit can re-run it).
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Optional

import torch
import yaml
from pydantic import BaseModel, ConfigDict, ValidationError, field_validator

from evolve.operators import materialize_tensor, validate_recipe
from evolve.recipe import Recipe, RecipeError

from search.errors import EvofuseError

__all__ = ["MergeConfigError", "MergeConfig", "run_merge", "main"]

MERGE_METHODS = ("linear", "task_arithmetic", "ties", "dare_linear", "dare_ties", "slerp")
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16,
          "float64": torch.float64}
DEFAULT_SHARD_BYTES = 5_000_000_000  # mergekit's default --out-shard-size (5B)
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.json",
                   "merges.txt", "tokenizer.model", "added_tokens.json", "chat_template.jinja")
RUN_CONFIG_NAME = "mergekit_config.yml"

# safetensors dtype codes <-> torch dtypes
ST_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
             "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8,
             "U8": torch.uint8, "BOOL": torch.bool}
ST_CODES = {v: k for k, v in ST_DTYPES.items()}


class MergeConfigError(EvofuseError):
    """Bad merge input; the message is one line naming the field or file."""


# --- the config ---------------------------------------------------------------------------


class ModelEntry(BaseModel):
    model_config = ConfigDict(extra="forbid")
    model: str
    parameters: Optional[dict[str, Any]] = None


class MergeConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")
    merge_method: str
    models: list[ModelEntry]
    base_model: Optional[str] = None
    parameters: Optional[dict[str, Any]] = None
    dtype: Optional[Literal["float32", "float16", "bfloat16", "float64"]] = None
    out_dtype: Optional[Literal["float32", "float16", "bfloat16", "float64"]] = None
    tokenizer_source: Optional[str] = None

    @field_validator("merge_method")
    @classmethod
    def known_method(cls, value: str) -> str:
        if value not in MERGE_METHODS:
            raise ValueError(f"unknown merge method {value!r}; valid: {', '.join(MERGE_METHODS)}")
        return value

    @field_validator("models")
    @classmethod
    def some_models(cls, value: list[ModelEntry]) -> list[ModelEntry]:
        if not value:
            raise ValueError("at least one model is needed")
        return value


def load_config(config_path: str | Path) -> tuple[MergeConfig, str]:
    path = Path(config_path)
    try:
        text = path.read_text()
    except OSError as exc:
        raise MergeConfigError(f"{path}: cannot read ({exc.strerror})") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise MergeConfigError(f"{path}: not valid YAML ({str(exc).splitlines()[0]})") from None
    if not isinstance(data, dict):
        raise MergeConfigError(f"{path}: expected a mapping with merge_method and models")
    try:
        return MergeConfig.model_validate(data), text
    except ValidationError as exc:
        error = exc.errors()[0]
        where = ".".join(str(p) for p in error["loc"]) or "(top level)"
        if error["type"] == "extra_forbidden":
            raise MergeConfigError(
                f"{path}: field {where!r} is not supported by evofuse merge "
                f"(supported: {', '.join(MergeConfig.model_fields)})") from None
        message = error["msg"].removeprefix("Value error, ")
        raise MergeConfigError(f"{path}: field {where!r}: {message}") from None


def resolve_model(reference: str, config_dir: Path, field: str, allow_pickle: bool) -> Path:
    from search.models.sources import SourceError, resolve_source

    candidates = [reference]
    if not Path(reference).is_absolute() and not Path(reference).exists():
        candidates.append(str(config_dir / reference))
    error = None
    for candidate in candidates:
        try:
            return resolve_source(candidate, allow_pickle=allow_pickle)
        except SourceError as exc:
            error = error or exc
    raise MergeConfigError(f"field {field!r}: {error}")


def build_recipe(config: MergeConfig, num_layers: int | None) -> Recipe:
    """The merge as a recipe over model references (ids are the references as written)."""
    ids = [entry.model for entry in config.models]
    duplicates = sorted({i for i in ids if ids.count(i) > 1})
    if duplicates:
        raise MergeConfigError(f"field 'models': {duplicates[0]!r} is listed twice")
    params: dict[str, Any] = dict(config.parameters or {})
    per_input = {entry.model: dict(entry.parameters) for entry in config.models if entry.parameters}
    base = config.base_model
    if base is not None and base not in ids:
        ids.append(base)  # mergekit adds a base that is not listed (for linear: as one more input)
    if config.merge_method in ("task_arithmetic", "ties", "dare_linear", "dare_ties", "slerp"):
        # mergekit ignores the base's non-shared parameters (its task vector is zero)
        per_input.pop(base, None)
    if per_input:
        params["per_input"] = per_input
    if num_layers is not None:
        params["num_layers"] = num_layers
    return Recipe(op=config.merge_method, inputs=tuple(ids), params=params, seed=0,
                  base=base if config.merge_method != "linear" else None)


# --- safetensors reading and writing -----------------------------------------------------


@dataclass(frozen=True)
class TensorInfo:
    file: Path
    dtype: torch.dtype
    shape: tuple[int, ...]
    start: int  # absolute byte offset in the file
    nbytes: int


def read_header(file: Path) -> dict[str, TensorInfo]:
    """The tensors of one safetensors file, from its JSON header (8-byte length + JSON)."""
    with open(file, "rb") as handle:
        size_bytes = handle.read(8)
        if len(size_bytes) != 8:
            raise MergeConfigError(f"{file}: not a safetensors file (too short)")
        size = int.from_bytes(size_bytes, "little")
        if size > 100_000_000:
            raise MergeConfigError(f"{file}: not a safetensors file (header of {size} bytes)")
        try:
            header = json.loads(handle.read(size))
        except (UnicodeDecodeError, json.JSONDecodeError):
            raise MergeConfigError(f"{file}: not a safetensors file (bad header)") from None
    data_start = 8 + size
    tensors = {}
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        if entry.get("dtype") not in ST_DTYPES:
            raise MergeConfigError(f"{file}: tensor {name!r} has unsupported dtype {entry.get('dtype')!r}")
        begin, end = entry["data_offsets"]
        tensors[name] = TensorInfo(file, ST_DTYPES[entry["dtype"]], tuple(entry["shape"]),
                                   data_start + begin, end - begin)
    return tensors


class SafetensorsSource:
    """One model directory's tensors, read one at a time into caller-owned buffers."""

    def __init__(self, directory: Path):
        self.directory = directory
        files = sorted(directory.glob("*.safetensors"))
        index = directory / "model.safetensors.index.json"
        if index.is_file():
            weight_map = json.loads(index.read_text()).get("weight_map", {})
            files = sorted({directory / f for f in weight_map.values()})
        self.tensors: dict[str, TensorInfo] = {}
        for file in files:
            self.tensors.update(read_header(file))
        self._handles: dict[Path, Any] = {}

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
        while done < info.nbytes:  # one readinto may return less than asked
            got = os.preadv(handle.fileno(), [view[done:]], info.start + done)
            if got <= 0:
                raise MergeConfigError(f"{info.file}: truncated while reading tensor {name!r}")
            done += got
        return raw.view(info.dtype).view(info.shape), buffer

    def close(self) -> None:
        for handle in self._handles.values():
            handle.close()
        self._handles.clear()


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

    def close(self) -> None:
        self._state.clear()


def open_source(directory: Path):
    if any(directory.glob("*.safetensors")):
        return SafetensorsSource(directory)
    return PickleSource(directory)


class ShardWriter:
    """Writes planned safetensors shards, one tensor at a time, without holding a shard in memory.

    The header of each shard is known up front (names, dtypes and shapes of the output), so the
    shard is written header first, then each tensor's bytes as they are produced, in order.
    """

    def __init__(self, out_dir: Path, plan: list[tuple[str, torch.dtype, tuple[int, ...]]], max_shard_bytes: int):
        self.out_dir = out_dir
        self.shards: list[list[tuple[str, torch.dtype, tuple[int, ...], int]]] = [[]]
        size = 0
        for name, dtype, shape in plan:
            nbytes = _numel(shape) * _element_size(dtype)
            if self.shards[-1] and size + nbytes > max_shard_bytes:
                self.shards.append([])
                size = 0
            self.shards[-1].append((name, dtype, shape, nbytes))
            size += nbytes
        count = len(self.shards)
        self.file_names = [f"model-{i + 1:05d}-of-{count:05d}.safetensors" for i in range(count)]
        self.order = [(s, entry) for s, shard in enumerate(self.shards) for entry in shard]
        self._position = 0
        self._handle = None
        self._shard = -1
        self.total_bytes = sum(e[3] for _, e in self.order)

    def _open_shard(self, index: int) -> None:
        self._close_shard()
        offsets, header = 0, {"__metadata__": {"format": "pt"}}
        for name, dtype, shape, nbytes in self.shards[index]:
            header[name] = {"dtype": ST_CODES[dtype], "shape": list(shape), "data_offsets": [offsets, offsets + nbytes]}
            offsets += nbytes
        text = json.dumps(header, separators=(",", ":")).encode()
        text += b" " * (-len(text) % 8)  # data starts 8-byte aligned
        path = self.out_dir / (self.file_names[index] + ".partial")
        self._handle = open(path, "wb")
        self._handle.write(len(text).to_bytes(8, "little") + text)
        self._shard = index

    def _close_shard(self) -> None:
        if self._handle is not None:
            self._handle.flush()
            os.fsync(self._handle.fileno())
            self._handle.close()
            partial = self.out_dir / (self.file_names[self._shard] + ".partial")
            os.replace(partial, self.out_dir / self.file_names[self._shard])
            self._handle = None

    def write(self, name: str, tensor: torch.Tensor) -> None:
        shard, (expected, dtype, shape, nbytes) = self.order[self._position]
        if name != expected or tensor.dtype != dtype or tuple(tensor.shape) != shape:
            raise RuntimeError(f"shard writer expected {expected} {dtype} {shape}, got {name} {tensor.dtype}")
        if shard != self._shard:
            self._open_shard(shard)
        data = tensor.contiguous().view(-1).view(torch.uint8).numpy()
        self._handle.write(memoryview(data))
        self._position += 1

    def finish(self) -> None:
        self._close_shard()
        for stale in self.out_dir.glob("model*.safetensors"):  # from an earlier run into this directory:
            if stale.name not in self.file_names:  # transformers would load a stale model.safetensors
                stale.unlink()
        weight_map = {name: self.file_names[s] for s, (name, *_rest) in self.order}
        index = {"metadata": {"total_size": self.total_bytes}, "weight_map": weight_map}
        _write_text(self.out_dir / "model.safetensors.index.json", json.dumps(index, indent=2) + "\n")


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


def _element_size(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


def _write_text(path: Path, text: str) -> None:
    partial = path.with_name(path.name + ".partial")
    partial.write_text(text)
    os.replace(partial, path)


# --- the merge ----------------------------------------------------------------------------


def check_same_tensors(sources: dict[str, Any], reference: str) -> list[str]:
    """Tensor names of the reference model; every input must have the same names and shapes."""
    names = sorted(sources[reference].tensors)
    for model_id, source in sources.items():
        theirs = source.tensors
        for name in names:
            if name not in theirs:
                raise MergeConfigError(f"{source.directory}: tensor {name!r} is missing (present in {reference})")
            if theirs[name].shape != sources[reference].tensors[name].shape:
                raise MergeConfigError(
                    f"{source.directory}: tensor {name!r} has shape {theirs[name].shape}, "
                    f"{sources[reference].tensors[name].shape} in {reference}")
        extra = sorted(set(theirs) - set(names))
        if extra:
            raise MergeConfigError(f"{source.directory}: tensor {extra[0]!r} is not in {reference}")
    return names


def count_layers(directory: Path, names: list[str]) -> int | None:
    from evolve.recipe import layer_index

    try:
        layers = json.loads((directory / "config.json").read_text()).get("num_hidden_layers")
    except (OSError, json.JSONDecodeError):
        layers = None
    if isinstance(layers, int) and layers > 0:
        return layers
    indices = [i for i in (layer_index(n) for n in names) if i is not None]
    return max(indices) + 1 if indices else None


def copy_side_files(out_dir: Path, config_dir: Path, tokenizer_dir: Path, out_dtype_name: str | None) -> None:
    config = json.loads((config_dir / "config.json").read_text())
    if out_dtype_name is not None:  # transformers 5 writes "dtype", older ones "torch_dtype"
        keys = [k for k in ("dtype", "torch_dtype") if k in config] or ["dtype"]
        for key in keys:
            config[key] = out_dtype_name
    _write_text(out_dir / "config.json", json.dumps(config, indent=2, sort_keys=True) + "\n")
    if (config_dir / "generation_config.json").is_file():
        shutil.copyfile(config_dir / "generation_config.json", out_dir / "generation_config.json")
    for name in TOKENIZER_FILES:
        if (tokenizer_dir / name).is_file():
            shutil.copyfile(tokenizer_dir / name, out_dir / name)


def run_merge(config_path: str | Path, out_dir: str | Path, *, allow_pickle: bool = False,
              quiet: bool = False, max_shard_bytes: int = DEFAULT_SHARD_BYTES, compute_threads: int = 1) -> Path:
    """Merge as the YAML at `config_path` says, writing a Hugging Face directory at `out_dir`.

    `compute_threads`: torch threads for the merge arithmetic. One by default: the reading
    thread uses the other core of a 2-core machine, the chunked arithmetic is bound by memory,
    and on a loaded machine a 2-thread pool waits on its slowest thread at every op (measured:
    an elementwise op on 3.5 MB took 23 ms with 2 threads vs 0.3 ms with 1 at load 11).
    """
    config, text = load_config(config_path)
    config_dir = Path(config_path).resolve().parent
    out = Path(out_dir)
    recipe_ids = [e.model for e in config.models] + ([config.base_model] if config.base_model else [])
    fields = {e.model: f"models.{i}.model" for i, e in enumerate(config.models)}
    fields.setdefault(config.base_model, "base_model")
    directories = {ref: resolve_model(ref, config_dir, fields[ref], allow_pickle) for ref in dict.fromkeys(recipe_ids)}
    tokenizer_ref = config.tokenizer_source or "base"
    if tokenizer_ref == "union":
        raise MergeConfigError(f"{config_path}: field 'tokenizer_source': 'union' is not supported (use base or a model)")
    reference = config.base_model or config.models[0].model
    tokenizer_dir = directories[reference] if tokenizer_ref == "base" else resolve_model(
        tokenizer_ref, config_dir, "tokenizer_source", allow_pickle)

    sources = {ref: open_source(d) for ref, d in directories.items()}
    try:
        names = check_same_tensors(sources, reference)
        recipe = build_recipe(config, count_layers(directories[reference], names))
        try:
            validate_recipe(recipe)
        except RecipeError as exc:
            raise MergeConfigError(f"{config_path}: {exc}") from None
        in_dtype = DTYPES.get(config.dtype) if config.dtype else None
        forced_out = DTYPES.get(config.out_dtype or config.dtype or "") if (config.out_dtype or config.dtype) else None
        plan = []
        for name in names:
            stored = sources[reference].tensors[name].dtype
            floating = stored.is_floating_point
            plan.append((name, (forced_out or stored) if floating else stored, sources[reference].tensors[name].shape))
        out.mkdir(parents=True, exist_ok=True)
        writer = ShardWriter(out, plan, max_shard_bytes)
        threads = torch.get_num_threads()
        torch.set_num_threads(compute_threads)
        try:
            _stream(recipe, sources, names, plan, in_dtype, writer, quiet)
        finally:
            torch.set_num_threads(threads)
        writer.finish()
    except RecipeError as exc:
        raise MergeConfigError(f"{config_path}: {exc}") from None
    finally:
        for source in sources.values():
            source.close()
    out_dtype_name = next((k for k, v in DTYPES.items() if v == forced_out), None)
    if out_dtype_name is None:
        stored = {d for _, d, _ in plan if d.is_floating_point}
        out_dtype_name = next((k for k, v in DTYPES.items() if stored == {v}), None)
    copy_side_files(out, directories[reference], tokenizer_dir, out_dtype_name)
    _write_text(out / RUN_CONFIG_NAME, text)
    return out


def _stream(recipe: Recipe, sources: dict[str, Any], names: list[str], plan: list, in_dtype,
            writer: ShardWriter, quiet: bool) -> None:
    """Read (one tensor ahead, in a helper thread), merge and write each tensor in turn."""
    ids = recipe.input_ids()
    # Two buffer sets: the helper fills one while the merge reads the other.
    buffers = [{i: None for i in ids}, {i: None for i in ids}]

    def load(position: int) -> dict[str, torch.Tensor]:
        name = names[position]
        slot = buffers[position % 2]
        tensors = {}
        for model_id in ids:
            tensor, slot[model_id] = sources[model_id].read(name, slot[model_id])
            if in_dtype is not None and tensor.is_floating_point() and tensor.dtype != in_dtype:
                tensor = tensor.to(in_dtype)  # mergekit's `dtype`: inputs are cast on load
            tensors[model_id] = tensor
        return tensors

    progress = None
    if not quiet:
        from tqdm import tqdm

        progress = tqdm(total=writer.total_bytes, unit="B", unit_scale=True, desc="merge", file=sys.stderr)
    with ThreadPoolExecutor(max_workers=1) as reader:
        pending = reader.submit(load, 0) if names else None
        for position, (name, dtype, _shape) in enumerate(plan):
            tensors = pending.result()
            # The next read may reuse the other buffer set only: this one is in use.
            pending = reader.submit(load, position + 1) if position + 1 < len(names) else None
            merged = materialize_tensor(recipe, name, tensors)
            writer.write(name, merged.to(dtype))
            if progress is not None:
                progress.update(merged.numel() * _element_size(dtype))
    if progress is not None:
        progress.close()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m search.merge", description=__doc__.splitlines()[0])
    parser.add_argument("config")
    parser.add_argument("out")
    parser.add_argument("--allow-pickle", action="store_true")
    parser.add_argument("--quiet", action="store_true")
    args = parser.parse_args(argv)
    started = time.perf_counter()
    try:
        run_merge(args.config, args.out, allow_pickle=args.allow_pickle, quiet=args.quiet)
    except (MergeConfigError, RecipeError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if not args.quiet:
        print(f"merged into {args.out} in {time.perf_counter() - started:.1f} s", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
