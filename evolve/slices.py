"""mergekit's `slices:`: which input tensors make each output tensor, and the output's config.

A merge is a list of output slices; slice `s` lists sources `(model, [start, end))` of equal
length `n_s`, and its layers are output layers `o_s .. o_s + n_s - 1`, where `o_s` is the sum
of the earlier slices' lengths. Output layer `o_s + j` is the slice's merge of layer
`start + j` of each source, so the output has `sum_s n_s` layers: a `passthrough` of two
overlapping ranges is a "frankenmerge" deeper than either input. As in mergekit 0.1.5:

* a gradient parameter runs over the slice, not the whole output: layer `j` of a slice of
  `n` layers has `t = j / (n - 1)` (1 when n = 1); tensors outside the layers have t = 0;
* the tensors before the layers (embeddings) are merged from the first slice's sources with
  that slice's parameters, the ones after (final norm, LM head) from the last slice's;
* a plain `models:` list is one slice of every model's whole depth.

Functions here are pure: they take {model: {tensor name: (shape, dtype)}} indexes and give
`OutputTensor` plans; reading and writing are `search.merge`'s.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Mapping, Sequence

from evolve.recipe import LAYER_PATTERN, RecipeError

__all__ = ["SliceSource", "OutputSlice", "OutputTensor", "is_pre_layer", "split_layer_name",
           "plan_output_tensors", "layered_config"]

# Names of tensors that come before the decoder layers (mergekit's "pre_weights"): embeddings.
PRE_LAYER = re.compile(r"(embed|wte|wpe|tok_embeddings|word_embeddings)")


@dataclass(frozen=True)
class SliceSource:
    model: str  # the model reference as written in the config (the recipe's input id)
    start: int  # first layer taken
    end: int  # one past the last


@dataclass(frozen=True)
class OutputSlice:
    sources: tuple[SliceSource, ...]

    @property
    def length(self) -> int:
        return self.sources[0].end - self.sources[0].start


@dataclass(frozen=True)
class OutputTensor:
    name: str  # the tensor's name in the output
    slice_index: int  # whose recipe (parameters, base) merges it
    param_name: str  # the name parameters are resolved for: the layer index is the slice offset
    inputs: tuple[tuple[str, str], ...]  # (model, tensor name in that model) per slice source
    shape: tuple[int, ...]
    dtype: Any  # the first source's stored dtype


def is_pre_layer(name: str) -> bool:
    """True for tensors before the decoder layers (embeddings), False for those after."""
    return bool(PRE_LAYER.search(name))


def split_layer_name(name: str) -> tuple[str, int, str] | None:
    """`model.layers.7.mlp.up_proj.weight` -> ('model.layers.', 7, '.mlp.up_proj.weight')."""
    match = LAYER_PATTERN.search(name)
    if match is None:
        return None
    return name[: match.start(1)], int(match.group(1)), name[match.end(1):]


def _layer_tensors(index: Mapping[str, Any]) -> dict[int, dict[str, str]]:
    """{layer: {(prefix, suffix) key: full name}} of one model's index."""
    layers: dict[int, dict[str, str]] = {}
    for name in index:
        parts = split_layer_name(name)
        if parts is not None:
            prefix, layer, suffix = parts
            layers.setdefault(layer, {})[prefix + "\0" + suffix] = name
    return layers


def check_slices(slices: Sequence[OutputSlice], layer_counts: Mapping[str, int]) -> None:
    """Ranges inside each model's depth and of one length per slice; one line naming the field."""
    if not slices:
        raise RecipeError("field 'slices': at least one slice is needed")
    for s, output_slice in enumerate(slices):
        if not output_slice.sources:
            raise RecipeError(f"field 'slices.{s}.sources': at least one source is needed")
        models = [source.model for source in output_slice.sources]
        repeated = sorted({m for m in models if models.count(m) > 1})
        if repeated:
            raise RecipeError(f"field 'slices.{s}.sources': {repeated[0]!r} is listed twice in one slice")
        for i, source in enumerate(output_slice.sources):
            field = f"slices.{s}.sources.{i}.layer_range"
            depth = layer_counts[source.model]
            if not 0 <= source.start < source.end <= depth:
                raise RecipeError(f"field {field!r}: [{source.start}, {source.end}] is not a non-empty "
                                  f"range inside the model's {depth} layers")
            if source.end - source.start != output_slice.length:
                raise RecipeError(f"field {field!r}: {source.end - source.start} layers, but the slice's "
                                  f"first source has {output_slice.length} (all sources of a slice must match)")


def plan_output_tensors(slices: Sequence[OutputSlice], indexes: Mapping[str, Mapping[str, tuple]],
                        layer_counts: Mapping[str, int]) -> list[OutputTensor]:
    """Every output tensor in order (pre-layer tensors, layers slice by slice, post-layer ones).

    `indexes[model]` is {tensor name: (shape, dtype)}. Every source of a tensor must have it
    with the same shape; the first difference raises a RecipeError naming the model and tensor.
    """
    check_slices(slices, layer_counts)
    first, last = slices[0], slices[-1]
    reference = indexes[first.sources[0].model]
    outside = [n for n in reference if split_layer_name(n) is None]
    plan: list[OutputTensor] = []

    def add(name: str, slice_index: int, param_name: str, inputs: list[tuple[str, str]]) -> None:
        shape, dtype = None, None
        for model, source_name in inputs:
            if source_name not in indexes[model]:
                raise RecipeError(f"model {model!r}: tensor {source_name!r} is missing "
                                  f"(needed for output tensor {name!r})")
            found = tuple(indexes[model][source_name][0])
            if shape is None:
                shape, dtype = found, indexes[model][source_name][1]
            elif found != shape:
                raise RecipeError(f"model {model!r}: tensor {source_name!r} has shape {list(found)}, "
                                  f"{inputs[0][0]!r} has {list(shape)}")
        plan.append(OutputTensor(name, slice_index, param_name, tuple(inputs), shape, dtype))

    for name in sorted(n for n in outside if is_pre_layer(n)):
        add(name, 0, name, [(source.model, name) for source in first.sources])
    layer_maps = {model: _layer_tensors(indexes[model]) for model in {s.model for sl in slices for s in sl.sources}}
    offset = 0
    for s, output_slice in enumerate(slices):
        for j in range(output_slice.length):
            keys = None
            for source in output_slice.sources:
                found = layer_maps[source.model].get(source.start + j, {})
                if keys is None:
                    keys, key_model, key_layer = found, source.model, source.start + j
                elif set(found) != set(keys):
                    raise RecipeError(f"field 'slices.{s}': layer {source.start + j} of {source.model!r} "
                                      f"has other tensors than layer {key_layer} of {key_model!r}")
            for key in sorted(keys):
                prefix, suffix = key.split("\0")
                inputs = [(source.model, layer_maps[source.model][source.start + j][key])
                          for source in output_slice.sources]
                add(f"{prefix}{offset + j}{suffix}", s, f"{prefix}{j}{suffix}", inputs)
        offset += output_slice.length
    for name in sorted(n for n in outside if not is_pre_layer(n)):
        add(name, len(slices) - 1, name, [(source.model, name) for source in last.sources])
    return plan


def layered_config(config: dict, source_configs: Mapping[str, dict], slices: Sequence[OutputSlice]) -> dict:
    """`config` (the reference's config.json) for the sliced output: `num_hidden_layers` is the
    total depth and every per-layer list (e.g. `layer_types`) is rebuilt from the source layer
    each output layer comes from (the slice's first source)."""
    out = dict(config)
    depth = config.get("num_hidden_layers")
    out["num_hidden_layers"] = sum(s.length for s in slices)
    if not isinstance(depth, int):
        return out
    for key, value in config.items():
        if not (isinstance(value, list) and len(value) == depth and key != "architectures"):
            continue
        rebuilt = []
        for output_slice in slices:
            source = output_slice.sources[0]
            values = source_configs[source.model].get(key, value)
            if not (isinstance(values, list) and len(values) >= source.end):
                raise RecipeError(f"config of {source.model!r}: per-layer field {key!r} does not cover "
                                  f"layers [{source.start}, {source.end})")
            rebuilt.extend(values[source.start: source.end])
        out[key] = rebuilt
    return out
