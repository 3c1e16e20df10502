"""Save and load compressed models whose modules no longer match what their config builds.

A model pruned with the same widths in every block saves as an ordinary Hugging Face directory
(`save_pretrained`; the config carries the new intermediate_size / head counts / head_dim) and
loads with plain `AutoModelForCausalLM.from_pretrained`. A model whose blocks differ (per-layer
ratios, TTM layers, ...) saves the same way plus a small `evofuse_structure.json` beside the
safetensors weights; plain transformers then refuses it with a shape-mismatch error, and
`load_compressed(dir)` rebuilds it: the model from its config, then every module listed in the
structure file replaced by one of the recorded kind and shape, then the weights.

    {"format": "evofuse-structure", "version": 1,
     "modules": {"model.layers.3.mlp.down_proj": {"kind": "linear", "in_features": 1100,
                                                  "out_features": 576, "bias": false}},
     "attributes": {"model.layers.3.self_attn": {"num_key_value_groups": 2}}}

Module kinds are a small registry. A kind says which module type it covers, how to describe a
module as JSON-able constructor arguments, and how to build an empty module from them (weights
are loaded afterwards by state-dict name). Another compression method registers its own, e.g.

    register_kind("ttm", TTMLinear, describe=lambda m: {...}, build=lambda spec: TTMLinear(**spec))

Saving records every module whose description differs from the one in a reference model built
from the config on the meta device (or that the reference lacks); loading replaces parents
before children. Plain integer attributes that transformers reads at run time and that pruning
changes (WIDTH_ATTRIBUTES) are recorded the same way.
"""
from __future__ import annotations

import json
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch
import torch.nn as nn
from compression.errors import CompressionError

STRUCTURE_FILE = "evofuse_structure.json"
STRUCTURE_FORMAT = "evofuse-structure"
STRUCTURE_VERSION = 1
WIDTH_ATTRIBUTES = ("num_key_value_groups", "num_heads", "num_key_value_heads", "intermediate_size", "head_dim")


class StructureError(CompressionError):
    """A structure file that cannot be applied; the message is one line naming the file."""


@dataclass(frozen=True)
class ModuleKind:
    name: str
    module_type: type[nn.Module]
    describe: Callable[[nn.Module], dict[str, Any]]  # module -> JSON-able constructor arguments
    build: Callable[[dict[str, Any]], nn.Module]  # arguments -> module (weights loaded later)


_KINDS: dict[str, ModuleKind] = {}


def register_kind(name: str, module_type: type[nn.Module], describe, build) -> None:
    """Register (or replace) a module kind. The most specific registered type wins."""
    _KINDS[name] = ModuleKind(name, module_type, describe, build)


def registered_kinds() -> dict[str, ModuleKind]:
    return dict(_KINDS)


def kind_of(module: nn.Module) -> ModuleKind | None:
    """The registered kind for `module`: exact type first, else the nearest base class."""
    for cls in type(module).__mro__:
        for kind in _KINDS.values():
            if kind.module_type is cls:
                return kind
    return None


register_kind(
    "linear",
    nn.Linear,
    describe=lambda m: {"in_features": m.in_features, "out_features": m.out_features, "bias": m.bias is not None},
    build=lambda spec: nn.Linear(spec["in_features"], spec["out_features"], bias=spec["bias"]),
)


def _reference_model(config) -> nn.Module:
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(config)


def describe_structure(model: nn.Module) -> dict[str, Any]:
    """The structure entries of `model` that differ from what `model.config` builds."""
    reference = dict(_reference_model(model.config).named_modules())
    modules: dict[str, dict] = {}
    attributes: dict[str, dict] = {}
    for name, module in model.named_modules():
        kind = kind_of(module)
        ref = reference.get(name)
        if kind is not None:
            spec = {"kind": kind.name, **kind.describe(module)}
            ref_kind = kind_of(ref) if ref is not None else None
            ref_spec = {"kind": ref_kind.name, **ref_kind.describe(ref)} if ref_kind is not None else None
            if spec != ref_spec:
                modules[name] = spec
        changed = {
            attr: getattr(module, attr)
            for attr in WIDTH_ATTRIBUTES
            if isinstance(getattr(module, attr, None), int)
            and (ref is None or getattr(ref, attr, None) != getattr(module, attr))
        }
        if changed:
            attributes[name] = changed
    return {"format": STRUCTURE_FORMAT, "version": STRUCTURE_VERSION, "modules": modules, "attributes": attributes}


def apply_structure(model: nn.Module, structure: dict[str, Any], source: str = STRUCTURE_FILE) -> None:
    """Replace the recorded modules (parents before children) and set the recorded attributes."""
    if not isinstance(structure, dict) or structure.get("format") != STRUCTURE_FORMAT or structure.get("version") != STRUCTURE_VERSION:
        raise StructureError(f"{source}: not an {STRUCTURE_FORMAT} v{STRUCTURE_VERSION} file")
    modules, attributes = structure.get("modules", {}), structure.get("attributes", {})
    for key, table in (("modules", modules), ("attributes", attributes)):
        if not isinstance(table, dict) or not all(isinstance(k, str) and isinstance(v, dict) for k, v in table.items()):
            raise StructureError(f"{source}: {key!r} must map module names to objects")
    for name in sorted(modules, key=lambda n: n.count(".")):
        spec = dict(modules[name])
        kind_name = spec.pop("kind", None)
        if kind_name not in _KINDS:
            raise StructureError(
                f"{source}: module {name}: unknown kind {kind_name!r} (registered: {', '.join(sorted(_KINDS))}; "
                "import the module that registers it)"
            )
        parent_name, _, child = name.rpartition(".")
        try:
            parent = model.get_submodule(parent_name)
        except AttributeError:
            raise StructureError(f"{source}: module {name}: no parent {parent_name!r} in the model") from None
        try:
            module = _KINDS[kind_name].build(spec)
        except (KeyError, TypeError, ValueError, RuntimeError) as exc:
            raise StructureError(f"{source}: module {name}: bad {kind_name} entry ({type(exc).__name__}: {exc})") from None
        setattr(parent, child, module)
    for name, attrs in attributes.items():
        try:
            module = model.get_submodule(name)
        except AttributeError:
            raise StructureError(f"{source}: attributes of {name}: no such module") from None
        for attr, value in attrs.items():
            if attr not in WIDTH_ATTRIBUTES or isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise StructureError(f"{source}: attributes of {name}: {attr}={value!r} is not a width attribute (an integer >= 0)")
            setattr(module, attr, value)


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write through a temporary file in the same directory, fsync it, rename it over `path` and
    fsync the directory: after a crash `path` holds the old bytes or the new ones, never a part."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)


def fsync_dir(directory: Path) -> None:
    """Make a rename or a new file in `directory` durable (the entry, not only the data)."""
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write_bytes(path, text.encode())


def save_compressed(model: nn.Module, tokenizer, out_dir: str | Path) -> Path:
    """Write `model` (and `tokenizer`, if given) to `out_dir`.

    Uniform widths: a plain `save_pretrained` directory. Otherwise the same plus
    evofuse_structure.json, which `load_compressed` needs. Returns the directory.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    try:  # keep config widths in step with the blocks where they agree
        from compression.width import sync_config_widths

        sync_config_widths(model)
    except (ValueError, AttributeError):
        pass  # not a Llama-family model: nothing width-specific to sync
    structure = describe_structure(model)
    model.save_pretrained(out)
    target = out / STRUCTURE_FILE
    if structure["modules"] or structure["attributes"]:
        atomic_write_text(target, json.dumps(structure, indent=1, sort_keys=True) + "\n")
    else:
        target.unlink(missing_ok=True)
    if tokenizer is not None:
        tokenizer.save_pretrained(out)
    return out


def _read_state_dict(directory: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    index = directory / "model.safetensors.index.json"
    try:
        shards = sorted(set(json.loads(index.read_text())["weight_map"].values())) if index.is_file() else ["model.safetensors"]
    except (ValueError, KeyError, TypeError, AttributeError):
        raise StructureError(f"{index}: not a weights index (no weight_map)") from None
    state: dict[str, torch.Tensor] = {}
    for shard in shards:
        if not (directory / shard).is_file():
            raise StructureError(f"{directory / shard}: missing weights file")
        try:
            state.update(load_file(str(directory / shard)))
        except Exception as exc:  # safetensors' own error types: a damaged file
            raise StructureError(f"{directory / shard}: not a readable safetensors file ({str(exc).splitlines()[0][:120]})") from None
    return state


def _config_dict(directory: Path) -> dict:
    try:
        data = json.loads((directory / "config.json").read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise StructureError(f"{directory / 'config.json'}: not valid JSON") from None
    if not isinstance(data, dict):
        raise StructureError(f"{directory / 'config.json'}: not a JSON object")
    return data


def load_compressed(directory: str | Path, dtype: torch.dtype | None = None, trust_remote_code: bool = False) -> nn.Module:
    """Load a directory written by `save_compressed` (or any plain HF causal-LM directory).
    A directory that asks to run its own code (`auto_map`) is refused unless `trust_remote_code`."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from compression.plan import registered_ops

    registered_ops()  # importing the op modules registers their module kinds (e.g. "ttm")
    directory = Path(directory)
    if not (directory / "config.json").is_file():
        raise StructureError(f"{directory}: no config.json (not a saved model directory)")
    if _config_dict(directory).get("auto_map") and not trust_remote_code:
        raise StructureError(f"{directory / 'config.json'}: asks to run the directory's own Python code (auto_map); refused")
    structure_path = directory / STRUCTURE_FILE
    if not structure_path.is_file():
        return AutoModelForCausalLM.from_pretrained(str(directory), dtype=dtype, trust_remote_code=trust_remote_code).eval()
    try:
        structure = json.loads(structure_path.read_text(encoding="utf-8"))
    except UnicodeDecodeError:
        raise StructureError(f"{structure_path}: not UTF-8 text") from None
    except json.JSONDecodeError as exc:
        raise StructureError(f"{structure_path}: not JSON ({exc.msg})") from None
    try:
        config = AutoConfig.from_pretrained(str(directory), trust_remote_code=trust_remote_code)
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise StructureError(f"{directory / 'config.json'}: not a usable model config ({str(exc).splitlines()[0][:160]})") from None
    model = AutoModelForCausalLM.from_config(config, trust_remote_code=trust_remote_code)
    apply_structure(model, structure, str(structure_path))
    if dtype is not None:
        model.to(dtype)
    state = _read_state_dict(directory)
    try:
        missing, unexpected = model.load_state_dict(state, strict=False)
    except RuntimeError as exc:
        raise StructureError(f"{directory}: weights do not match the structure ({str(exc).splitlines()[-1].strip()})") from None
    tied = {k for k in missing if _is_tied(model, k)}
    if unexpected or set(missing) - tied:
        bad = sorted(unexpected) or sorted(set(missing) - tied)
        raise StructureError(f"{directory}: weights do not match the structure (e.g. {bad[0]!r})")
    if tied:
        model.tie_weights()
    return model.eval()


def _is_tied(model: nn.Module, key: str) -> bool:
    """True for a parameter that save_pretrained leaves out because it is tied to another."""
    return bool(getattr(model.config, "tie_word_embeddings", False)) and key.endswith("lm_head.weight")
