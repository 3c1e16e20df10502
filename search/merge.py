"""`evofuse merge CONFIG OUT`: a one-shot merge from a mergekit YAML, streamed tensor by tensor.

Accepted YAML (mergekit's, for evofuse's methods; any other key is refused by name):

    merge_method: ties          # any registered merge (`merge_method_names()`), passthrough included
    base_model: path/to/base    # required by the task-vector methods; slerp's t = 0 end
    models:                     # either models: (every model's whole depth) ...
      - model: path/to/expert_a # a Hugging Face directory or a built-in name (smollm2-135m)
        parameters: {weight: 0.5, density: 0.7}
    slices:                     # ... or slices: output layers slice after slice
      - sources:                #   sources of one slice have layer ranges of equal length
          - {model: path/a, layer_range: [0, 24], parameters: {...}}
          - {model: path/b, layer_range: [8, 32]}
        base_model: path/a      #   optional, per slice
        parameters: {t: [0, 1]} #   optional, per slice (then the shared ones)
    parameters: {normalize: true, weight: [0, 0.5, 1]}   # shared; gradients and filters allowed
    dtype: bfloat16             # the computation dtype: inputs are cast to it on load
    out_dtype: float32          # optional: the result's (default: dtype, else as stored)
    tokenizer_source: union     # optional: union, base or a model path (rows re-indexed to its vocabulary)
    tokenizer: {source: union, tokens: {...}, pad_to_multiple_of: 64}   # or this (not both)

Semantics are mergekit 0.1.5's (`evolve.recipe`, `evolve.merge_methods`, `evolve.slices`): a
gradient runs over each slice; a passthrough of stacked ranges makes a model of another depth
(config.json gets its `num_hidden_layers` and per-layer lists); with a float16 / bfloat16
`dtype`, every method but linear and slerp computes in that dtype with mergekit's rounding,
those two in float32 as mergekit's do. Without a tokenizer source the reference's tokenizer files
are copied; with one, embeddings and LM heads are re-indexed to its vocabulary first
(`search.tokenizer_union`). Relative model paths are taken
from the current directory (as mergekit does), then from the config's directory. Each slice's
merge is a `Recipe`, as a search uses.

How it streams (`search.models.tensors`): safetensors headers are read first (every input
checked for the same tensor names and shapes, the output shards and their headers planned),
then each tensor's inputs are taken as views of the memory-mapped files (their pages leave the
process' resident set once the tensor is merged), merged, and appended to the open output shard, whose pages the kernel is asked to start writing to disk at once. Reading, merging and
writing overlap (a reader, two merge threads and the writer): merges run ahead of the writer by
two tensors and by up to LOOKAHEAD_BYTES (128 MiB) of merged output more, so that a large tensor
being merged or written does not leave the other thread idle; what is in memory at once is
bounded by that, not by the model's size.

Output: `model-0000i-of-0000N.safetensors` + `model.safetensors.index.json`, `config.json`
(the reference's: the base, else the first model; dtype set to the output's, depth the slices'), generation config and tokenizer files from the tokenizer source,
and `mergekit_config.yml`, the YAML exactly as it ran (mergekit writes the same file, and
mergekit can re-run it). Every file is written atomically. `python -m search.merge CONFIG OUT`
is `evofuse merge CONFIG OUT`.
"""
from __future__ import annotations

import json
import pickle
import sys
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Callable, Iterable, Literal, Optional

import torch
from pydantic import ValidationError, field_validator, model_validator

from compression.loader import atomic_write_bytes, atomic_write_text
from evolve.materialize import materialize_tensor
from evolve.recipe import Recipe, RecipeError, layer_index
from evolve.registry import get_operator, merge_method_names, validate_recipe
from evolve.slices import OutputSlice, OutputTensor, SliceSource, layered_config, plan_output_tensors
from search.errors import EvofuseError
from search.models.tensors import (
    TensorFileError,
    TensorSpec,
    check_same_tensors,
    nbytes_of,
    open_source,
    write_sharded_streaming,
)
from search.schema import Strict, read_yaml
from search.tokenizer_union import (
    TokenEntry,
    TokenizerEntry,
    VocabularyError,
    VocabularyPlan,
    align_rows,
    aligned_index,
    is_vocabulary_tensor,
    plan_vocabulary,
    tokenizer_setting,
)

__all__ = ["MergeConfigError", "MergeConfig", "load_config", "run_merge"]

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16,
          "float64": torch.float64}
DEFAULT_SHARD_BYTES = 5_000_000_000  # mergekit's default --out-shard-size (5B)
MERGE_WORKERS = 2  # tensors merged at once: both cores of a small machine, one more input set in memory
# Merged bytes that may wait, beyond the next tensor to write, for the writer (`_stream`): while
# one thread merges or writes a large tensor, the other goes on with the next ones
LOOKAHEAD_BYTES = 128 << 20
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.json",
                   "merges.txt", "tokenizer.model", "added_tokens.json", "chat_template.jinja")
RUN_CONFIG_NAME = "mergekit_config.yml"
# mergekit 0.1.5 runs every method in its inputs' dtype (the config's `dtype`, else the stored
# ones promoted), except these two, which compute in float32 (float64 for float64 inputs) and
# round the result to the inputs' dtype; evofuse does the same
FLOAT32_METHODS = frozenset({"linear", "slerp"})


class MergeConfigError(EvofuseError):
    """Bad merge input; the message is one line naming the field or file."""


# --- the config ---------------------------------------------------------------------------


class ModelEntry(Strict):
    model: str
    parameters: Optional[dict[str, Any]] = None


class SliceSourceEntry(Strict):
    model: str
    layer_range: tuple[int, int]
    parameters: Optional[dict[str, Any]] = None


class SliceEntry(Strict):
    sources: list[SliceSourceEntry]
    base_model: Optional[str] = None
    parameters: Optional[dict[str, Any]] = None


class MergeConfig(Strict):
    merge_method: str
    models: Optional[list[ModelEntry]] = None
    slices: Optional[list[SliceEntry]] = None
    base_model: Optional[str] = None
    parameters: Optional[dict[str, Any]] = None
    dtype: Optional[Literal["float32", "float16", "bfloat16", "float64"]] = None
    out_dtype: Optional[Literal["float32", "float16", "bfloat16", "float64"]] = None
    tokenizer_source: Optional[str] = None
    tokenizer: Optional[TokenizerEntry] = None

    @field_validator("merge_method")
    @classmethod
    def known_method(cls, value: str) -> str:
        methods = merge_method_names()
        if value not in methods:
            raise ValueError(f"unknown merge method {value!r}; valid: {', '.join(methods)}")
        return value

    @field_validator("models", "slices")
    @classmethod
    def not_empty(cls, value: list | None) -> list | None:
        if value is not None and not value:
            raise ValueError("at least one entry is needed")
        return value

    @model_validator(mode="after")
    def models_or_slices(self) -> "MergeConfig":
        if (self.models is None) == (self.slices is None):
            raise ValueError("give either 'models' or 'slices' (as mergekit: exactly one of them)")
        if self.tokenizer_source is not None and self.tokenizer is not None:
            raise ValueError("give either 'tokenizer_source' or 'tokenizer' (as mergekit: not both)")
        return self


def _field_error(exc: ValidationError) -> str:
    """The first validation error in merge's wording: `field 'models': at least one ...`."""
    error = exc.errors()[0]
    where = ".".join(str(p) for p in error["loc"]) or "(top level)"
    if error["type"] == "extra_forbidden":
        names = [p for p in error["loc"] if isinstance(p, str)][:-1]  # the mappings above the key
        owner = {(): MergeConfig, ("models",): ModelEntry, ("slices",): SliceEntry,
                 ("slices", "sources"): SliceSourceEntry, ("tokenizer",): TokenizerEntry}.get(
            tuple(names), TokenEntry if names[:2] == ["tokenizer", "tokens"] else MergeConfig)
        return (f"field {where!r} is not supported by evofuse merge "
                f"(supported: {', '.join(owner.model_fields)})")
    return f"field {where!r}: {error['msg'].removeprefix('Value error, ')}"


def load_config(config_path: str | Path) -> tuple[MergeConfig, str]:
    """(the validated config, the file's text as it will be written beside the merge)."""
    path = Path(config_path)
    raw = read_yaml(path, MergeConfigError, "merge config")
    if not isinstance(raw, dict):
        raise MergeConfigError(f"{path}: expected a mapping with merge_method and models")
    try:
        config = MergeConfig.model_validate(raw)
    except ValidationError as exc:
        raise MergeConfigError(f"{path}: {_field_error(exc)}") from None
    return config, path.read_text(encoding="utf-8")


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


def _conditions(setting: Any) -> list:
    """A setting as a list of filter conditions (a scalar or gradient matches every tensor)."""
    if isinstance(setting, dict):
        return [setting]
    if isinstance(setting, list) and setting and all(isinstance(item, dict) for item in setting):
        return list(setting)
    return [{"value": setting}]


def _chain(*scopes: Optional[dict[str, Any]]) -> dict[str, Any]:
    """Parameter scopes, highest precedence first, as one: mergekit tries a slice's setting,
    then the global one when none of the slice's filters matches; concatenating their filter
    lists does exactly that."""
    chained: dict[str, Any] = {}
    for scope in scopes:
        for key, setting in (scope or {}).items():
            chained[key] = _conditions(chained[key]) + _conditions(setting) if key in chained else setting
    return chained


def normalized_slices(config: MergeConfig, layer_counts: dict[str, int]) -> list[SliceEntry]:
    """The config as output slices; `models:` is one slice of every model's whole depth, the
    base added as one more source when not listed (mergekit adds it for every method)."""
    if config.slices is not None:
        return config.slices
    entries = list(config.models)
    if config.base_model is not None and config.base_model not in [e.model for e in entries]:
        entries.append(ModelEntry(model=config.base_model))
    return [SliceEntry(sources=[SliceSourceEntry(model=e.model, layer_range=(0, layer_counts[e.model]),
                                                 parameters=e.parameters) for e in entries])]


def build_slice_recipe(config: MergeConfig, entry: SliceEntry, index: int, num_layers: int | None) -> Recipe:
    """The merge of one output slice as a recipe over model references (ids as written)."""
    field = "models" if config.models is not None else f"slices.{index}.sources"
    ids = [source.model for source in entry.sources]
    duplicates = sorted({i for i in ids if ids.count(i) > 1})
    if duplicates:
        raise MergeConfigError(f"field {field!r}: {duplicates[0]!r} is listed twice")
    base = entry.base_model or config.base_model
    op = get_operator(config.merge_method)
    if op.base == "endpoint" and base is None:  # mergekit's slerp: base_model is its t = 0 end
        raise MergeConfigError(f"field 'base_model': {config.merge_method} needs a base_model (its t = 0 end), as mergekit does")
    uses_base = op.base != "ignored" and base is not None
    if uses_base and base not in ids:
        raise MergeConfigError(f"field {field!r}: the base_model {base!r} must be one of the slice's sources")
    params = _chain(entry.parameters, config.parameters)
    per_input = {source.model: dict(source.parameters) for source in entry.sources if source.parameters}
    if uses_base:  # mergekit ignores the base's non-shared parameters (its task vector is zero)
        per_input.pop(base, None)
    if per_input:
        params["per_input"] = per_input
    if num_layers is not None:
        params["num_layers"] = num_layers
    return Recipe(op=config.merge_method, inputs=tuple(ids), params=params, seed=index,
                  base=base if uses_base else None)


# --- the merge ----------------------------------------------------------------------------


def count_layers(config: dict, names: Iterable[str]) -> int:
    """A model's depth: its config's `num_hidden_layers`, else one past its highest layer index."""
    layers = config.get("num_hidden_layers")
    if isinstance(layers, int) and layers > 0:
        return layers
    indices = [i for i in (layer_index(n) for n in names) if i is not None]
    return max(indices) + 1 if indices else 0


def read_config(directory: Path) -> dict:
    try:
        return json.loads((directory / "config.json").read_text())
    except (OSError, json.JSONDecodeError):
        return {}


def write_side_files(out_dir: Path, config: dict, config_dir: Path, tokenizer_dir: Path | None,
                     out_dtype_name: str | None) -> None:
    """config.json, the generation config and the tokenizer files (none when `tokenizer_dir` is None)."""
    config = dict(config)
    if out_dtype_name is not None:  # transformers 5 writes "dtype", older ones "torch_dtype"
        keys = [k for k in ("dtype", "torch_dtype") if k in config] or ["dtype"]
        for key in keys:
            config[key] = out_dtype_name
    atomic_write_text(out_dir / "config.json", json.dumps(config, indent=2, sort_keys=True) + "\n")
    copies = [(config_dir, "generation_config.json")] + [(tokenizer_dir, name) for name in TOKENIZER_FILES
                                                         if tokenizer_dir is not None]
    for directory, name in copies:
        if (directory / name).is_file():
            atomic_write_bytes(out_dir / name, (directory / name).read_bytes())


def _open_sources(directories: dict[str, Path], reference: str) -> dict[str, Any]:
    """Every input's reader, the reference first; an unreadable file is a MergeConfigError."""
    sources: dict[str, Any] = {}
    try:
        for ref in [reference] + [r for r in directories if r != reference]:
            sources[ref] = open_source(directories[ref])
    except (TensorFileError, pickle.UnpicklingError, EOFError, RuntimeError, ValueError, OSError) as exc:
        for source in sources.values():
            source.close()
        if isinstance(exc, TensorFileError):
            raise MergeConfigError(str(exc)) from None
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:160]  # a damaged .bin pickle
        raise MergeConfigError(f"{directories[ref]}: cannot read its weights ({type(exc).__name__}: {first})") from None
    return sources


def _model_fields(config: MergeConfig) -> dict[str, str]:
    """Each referenced model and the first config field naming it (for error messages)."""
    fields: dict[str, str] = {}
    if config.base_model is not None:
        fields[config.base_model] = "base_model"
    for i, entry in enumerate(config.models or []):
        fields.setdefault(entry.model, f"models.{i}.model")
    for s, entry in enumerate(config.slices or []):
        if entry.base_model is not None:
            fields.setdefault(entry.base_model, f"slices.{s}.base_model")
        for i, source in enumerate(entry.sources):
            fields.setdefault(source.model, f"slices.{s}.sources.{i}.model")
    return fields


def _plan_vocabulary(config: MergeConfig, config_dir: Path, directories: dict[str, Path], configs: dict[str, dict],
                     fields: dict[str, str], allow_pickle: bool) -> VocabularyPlan | None:
    """The output vocabulary when the config names a tokenizer source (None: copy the reference's);
    `configs` holds every model's config.json, the reference's first."""
    setting = tokenizer_setting(config.tokenizer_source, config.tokenizer)
    if setting is None:
        return None
    source_dir = None
    if setting.source not in ("union", "base"):
        source_dir = directories.get(setting.source) or resolve_model(setting.source, config_dir, setting.field,
                                                                      allow_pickle)
    return plan_vocabulary(setting, list(configs), directories, configs, fields, source_dir)


def _vocabulary_aligner(vocabulary: VocabularyPlan, slice_bases: list[str | None]) -> Callable[[OutputTensor, dict], dict]:
    """Re-indexes a vocabulary tensor's inputs to the output vocabulary; other tensors pass as they are."""
    def align(spec: OutputTensor, loaded: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        if not is_vocabulary_tensor(spec.inputs[0][1]):
            return loaded
        return align_rows(vocabulary, loaded, slice_bases[spec.slice_index])
    return align


def compute_dtype(method: str, in_dtype: torch.dtype | None, stored: Iterable[torch.dtype]) -> torch.dtype | None:
    """The dtype the merge arithmetic runs in, as in mergekit 0.1.5: the inputs' dtype (`dtype`,
    else the promotion of the stored dtypes), except linear and slerp: float32 (float64 when an
    input is; None here, materialize's default)."""
    if method in FLOAT32_METHODS:
        return None
    if in_dtype is not None:
        return in_dtype
    promoted = None
    for dtype in stored:
        promoted = dtype if promoted is None else torch.promote_types(promoted, dtype)
    return promoted


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
    if out.exists() and not out.is_dir():
        raise MergeConfigError(f"{out}: is a file, not a directory (OUT is the merged model's directory)")
    fields = _model_fields(config)
    directories = {ref: resolve_model(ref, config_dir, field, allow_pickle) for ref, field in fields.items()}
    reference = config.base_model or (config.models[0].model if config.models else config.slices[0].sources[0].model)
    configs = {ref: read_config(directories[ref]) for ref in [reference] + [r for r in directories if r != reference]}
    try:
        vocabulary = _plan_vocabulary(config, config_dir, directories, configs, fields, allow_pickle)
    except VocabularyError as exc:
        raise MergeConfigError(f"{config_path}: {exc}") from None

    sources = _open_sources(directories, reference)
    try:
        indexes = {ref: {n: (i.shape, i.dtype) for n, i in s.tensors.items()} for ref, s in sources.items()}
        if vocabulary is not None:  # vocabulary tensors as the merge sees them: the output's rows
            indexes = {ref: aligned_index(indexes[ref], vocabulary, ref, fields[ref]) for ref in indexes}
        if config.slices is None:  # every input the same tensors (the reference's names and shapes)
            check_same_tensors({str(directories[r]): indexes[r] for r in sources}, "", quote=True,
                               error=MergeConfigError)
        layer_counts = {ref: count_layers(configs[ref], indexes[ref]) for ref in sources}
        slices = normalized_slices(config, layer_counts)
        recipes = [build_slice_recipe(config, entry, s, entry.sources[0].layer_range[1] - entry.sources[0].layer_range[0])
                   for s, entry in enumerate(slices)]
        for s, recipe in enumerate(recipes):
            try:
                validate_recipe(recipe)
            except RecipeError as exc:
                where = "models" if config.slices is None else f"slices.{s}"
                raise MergeConfigError(f"{config_path}: field {where!r}: {exc}") from None
        output_slices = [OutputSlice(tuple(SliceSource(src.model, *src.layer_range) for src in entry.sources))
                         for entry in slices]
        tensors = plan_output_tensors(output_slices, indexes, layer_counts)
        in_dtype = DTYPES.get(config.dtype) if config.dtype else None
        forced_out = DTYPES.get(config.out_dtype or config.dtype or "") if (config.out_dtype or config.dtype) else None
        plan: list[TensorSpec] = [(t.name, (forced_out or t.dtype) if t.dtype.is_floating_point else t.dtype, t.shape)
                                  for t in tensors]
        work_dtype = compute_dtype(config.merge_method, in_dtype,
                                   {d for index in indexes.values() for _, d in index.values() if d.is_floating_point})
        out_config = configs[reference]
        if config.slices is not None:
            out_config = layered_config(out_config, configs, output_slices)
        align = None
        if vocabulary is not None:
            out_config = {**out_config, "vocab_size": vocabulary.size}
            align = _vocabulary_aligner(vocabulary, [entry.base_model or config.base_model for entry in slices])
        out.mkdir(parents=True, exist_ok=True)
        threads = torch.get_num_threads()
        torch.set_num_threads(compute_threads)
        try:
            _stream(recipes, tensors, sources, plan, in_dtype, work_dtype, out, max_shard_bytes, quiet, align)
        finally:
            torch.set_num_threads(threads)
    except (RecipeError, VocabularyError) as exc:  # a vocabulary error may come from the merge thread
        raise MergeConfigError(f"{config_path}: {exc}") from None
    except TensorFileError as exc:
        raise MergeConfigError(str(exc)) from None
    finally:
        for source in sources.values():
            source.close()
    out_dtype_name = next((k for k, v in DTYPES.items() if v == forced_out), None)
    if out_dtype_name is None:
        stored = {d for _, d, _ in plan if d.is_floating_point}
        out_dtype_name = next((k for k, v in DTYPES.items() if stored == {v}), None)
    tokenizer_dir = directories[reference] if vocabulary is None else None  # no source: the reference's files
    write_side_files(out, out_config, directories[reference], tokenizer_dir, out_dtype_name)
    if vocabulary is not None:
        vocabulary.save(out)
    atomic_write_text(out / RUN_CONFIG_NAME, text)
    return out


def _stream(recipes: list[Recipe], tensors: list[OutputTensor], sources: dict[str, Any], plan: list[TensorSpec],
            in_dtype: torch.dtype | None, work_dtype: torch.dtype | None, out: Path, max_shard_bytes: int,
            quiet: bool, align: Callable[[OutputTensor, dict], dict] | None = None) -> None:
    """A three-stage pipeline: tensors are loaded (helper thread) ahead of their merges (W =
    MERGE_WORKERS threads, one tensor each) and written in file order (this thread).

    Inputs are views of the memory-mapped files, not copies: a SmolLM2 linear merge read its
    three 538 MB inputs in 0.46 s with `preadv` into buffers and in 0.09 s through the mapping.
    A tensor's pages leave the resident set once it is merged (once it is written when the
    merge returned a view of it). Writing was a fifth of a linear merge's time and merging a
    quarter: overlapped, not added. A TIES merge is mostly merging, one core's work per tensor:
    two tensors at a time use both cores of a small machine (each tensor's merge is independent
    and seeded by itself, so the output is the same bytes whatever the order).

    How far merges run ahead of the writer: at least W tensors, and more while the merged bytes
    waiting beyond the next tensor to write stay within LOOKAHEAD_BYTES. With W tensors only,
    SmolLM2's 28M-coordinate embedding (a third of a second of TIES on one core, then a quarter
    of a second to write) left the other merge thread idle for most of both; with the
    look-ahead it merges the following layers meanwhile. Memory: besides the tensor being
    written, at most W tensors plus LOOKAHEAD_BYTES of outputs wait at once, whatever the model
    size; a tensor's inputs are released as soon as it is merged, unless its output is a view
    of one of them (then once it is written).
    """
    names = [name for name, _, _ in plan]
    dtypes = {name: dtype for name, dtype, _ in plan}
    shapes = {name: shape for name, _, shape in plan}
    sizes = [nbytes_of(dtype, shape) for _, dtype, shape in plan]
    workers = MERGE_WORKERS

    def load(position: int) -> dict[str, torch.Tensor]:
        loaded = {}
        for model_id, source_name in tensors[position].inputs:
            tensor = sources[model_id].view(source_name)
            if in_dtype is not None and tensor.is_floating_point() and tensor.dtype != in_dtype:
                tensor = tensor.to(in_dtype)  # mergekit's `dtype`: inputs are cast on load
            loaded[model_id] = tensor
        return loaded

    def release(position: int) -> None:
        for model_id, source_name in tensors[position].inputs:
            sources[model_id].release(source_name)

    progress = None
    if not quiet:
        from tqdm import tqdm

        progress = tqdm(total=sum(sizes), unit="B", unit_scale=True, desc="merge", file=sys.stderr)
    buffers = OutputBuffers()
    written: dict[str, torch.Tensor | None] = {"tensor": None}
    with ThreadPoolExecutor(max_workers=1) as reader, ThreadPoolExecutor(max_workers=workers) as merger:
        reads: dict[int, Any] = {}
        merges: dict[int, Any] = {}
        released: set[int] = set()  # positions whose inputs were released as soon as merged
        state = {"position": 0, "next_merge": 0}  # the next tensor to write, the next to submit

        def merge(position: int) -> torch.Tensor:
            loaded = reads.pop(position).result()
            spec = tensors[position]
            if align is not None:  # vocabulary tensors: row i of every input is token i
                loaded = align(spec, loaded)
            recipe = recipes[spec.slice_index]
            if work_dtype is None:  # linear, slerp: float32 inside, rounded to the inputs' dtype as mergekit's
                merged = materialize_tensor(recipe, spec.param_name, loaded).to(dtypes[spec.name])
            else:
                # the others: the method's result cast once, straight to the output dtype, as
                # mergekit casts it (arcee_fusion's is float32 even for float16 / bfloat16 inputs)
                out = buffers.take(dtypes[spec.name], shapes[spec.name])
                merged = materialize_tensor(recipe, spec.param_name, loaded, out=out, compute_dtype=work_dtype)
                if not _shares_memory(merged, out):  # the method made its own result: `out` is free
                    buffers.give(out)
            if not any(_shares_memory(merged, tensor) for tensor in loaded.values()):
                released.add(position)  # its inputs are done with: only the output waits for the writer
                reader.submit(release, position)  # by the reader thread: dropping pages stalls the caller
            return merged

        def schedule() -> None:
            """Submit loads and merges up to W tensors past the write position, and further while
            the bytes beyond the next tensor to write stay within LOOKAHEAD_BYTES."""
            position = state["position"]
            while state["next_merge"] < len(names):
                q = state["next_merge"]
                if q >= position + workers and sum(sizes[position + 2:q + 1]) > LOOKAHEAD_BYTES:
                    break
                for r in (q, q + 1):  # its inputs, and the next tensor's ahead of its merge
                    if r < len(names) and r not in reads:
                        reads[r] = reader.submit(load, r)
                merges[q] = merger.submit(merge, q)
                state["next_merge"] = q + 1

        def produce(name: str) -> torch.Tensor:
            position = state["position"]
            assert names[position] == name, f"merge asked for {name!r}, planned {names[position]!r}"
            if written["tensor"] is not None:  # the writer is done with the last tensor it was given
                buffers.give(written["tensor"])
            merged = written["tensor"] = merges.pop(position).result()
            if position > 0 and position - 1 not in released:
                release(position - 1)  # written by now (its output was a view of an input)
            state["position"] = position + 1
            schedule()
            if progress is not None:
                progress.update(nbytes_of(merged.dtype, merged.shape))
            return merged

        schedule()
        try:
            write_sharded_streaming(out, plan, produce, max_shard_bytes)
        except BaseException:  # a failed merge or write: the merges queued ahead need not run
            for future in [*merges.values(), *reads.values()]:
                future.cancel()
            raise
        if names and len(names) - 1 not in released:
            release(len(names) - 1)
    if progress is not None:
        progress.close()


class OutputBuffers:
    """Merged tensors' buffers, handed back once written and given out again for the next
    tensor of the same dtype and shape.

    A new buffer costs a page fault per 4 KiB page on its first write (the kernel maps and
    zeroes each page; ~2-9 us a page on this VM, 131k pages for SmolLM2's 538 MB): reused, the
    merge writes into pages it already has. At most the tensors in flight are held (W merges
    plus the look-ahead), the same memory the pipeline held before, now without the faults.
    A method writes every element of `out`, so a reused buffer's old values never show."""

    def __init__(self) -> None:
        self._free: dict[tuple, list[torch.Tensor]] = {}
        self._mine: dict[int, torch.Tensor] = {}  # the buffers `take` made, by data pointer
        self._lock = threading.Lock()

    def take(self, dtype: torch.dtype, shape: tuple[int, ...]) -> torch.Tensor:
        with self._lock:
            free = self._free.get((dtype, tuple(shape)))
            if free:
                return free.pop()
        buffer = torch.empty(shape, dtype=dtype)
        with self._lock:
            self._mine[buffer.data_ptr()] = buffer
        return buffer

    def give(self, tensor: torch.Tensor) -> None:
        """Hand a buffer back for reuse; anything else (a method's own result, a view of an
        input or of a buffer) is ignored."""
        with self._lock:
            if tensor.numel() and self._mine.get(tensor.data_ptr()) is tensor:
                self._free.setdefault((tensor.dtype, tuple(tensor.shape)), []).append(tensor)


def _shares_memory(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Whether a's first byte lies in b's bytes (a merge that returned a view of an input)."""
    start = b.data_ptr()
    return a.device == b.device and start <= a.data_ptr() < start + b.numel() * b.element_size()


if __name__ == "__main__":  # `python -m search.merge CONFIG OUT` is `evofuse merge CONFIG OUT`
    from search.cli import main

    raise SystemExit(main(["merge", *sys.argv[1:]]))
