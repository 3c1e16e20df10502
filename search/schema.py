"""One way to read YAML into pydantic models: strict fields, one-line errors naming the field.

Every config model (run configs, the plan search space, mergekit-style merge configs) derives
from `Strict`, so a typo is an error naming its key rather than a silently ignored option, and
is read by `load_yaml_model`, so every config file reports problems the same way:
`demo.yaml: tasks[1].dev: no such file 'data/dev.jsonl'`.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, TypeVar

import yaml
from pydantic import BaseModel, ConfigDict, ValidationError

from compression.errors import first_validation_error

from search.errors import EvofuseError

Model = TypeVar("Model", bound=BaseModel)


class Strict(BaseModel):
    """A config model that refuses unknown keys."""

    model_config = ConfigDict(extra="forbid")


def beside_config(spec: str | Path, config_dir: Path | None, found: Callable[[Path], bool] = Path.exists) -> Path:
    """A path a config names: as written when it is `found` from the working directory (or is
    absolute, or no config directory is known), else under the config's own directory when it is
    found there; so a config's relative paths work from wherever it is run."""
    path = Path(spec)
    if path.is_absolute() or config_dir is None or found(path) or not found(config_dir / path):
        return path
    return config_dir / path


def read_yaml(path: str | Path, error: type[EvofuseError] = EvofuseError, what: str = "config file") -> Any:
    """The parsed YAML document of `path`; a missing, unreadable or malformed file is one line."""
    path = Path(path)
    if not path.is_file():
        raise error(f"{path}: no such {what}")
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise error(f"{path}: cannot read ({getattr(exc, 'strerror', None) or exc})") from None
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise error(f"{path}: not valid YAML ({str(exc).splitlines()[0]})") from None


def validate(model: type[Model], raw: Any, origin: str, error: type[EvofuseError] = EvofuseError) -> Model:
    """`model` validated from a parsed document; errors read `origin: field: message`."""
    if not isinstance(raw, dict):
        raise error(f"{origin}: expected a mapping at the top level")
    try:
        return model.model_validate(raw)
    except ValidationError as exc:
        raise error(f"{origin}: {first_validation_error(exc)}") from None


def load_yaml_model(model: type[Model], path: str | Path, error: type[EvofuseError] = EvofuseError) -> Model:
    """Read and validate a YAML config file in one step."""
    return validate(model, read_yaml(path, error), str(path), error)


__all__ = ["Strict", "read_yaml", "validate", "load_yaml_model"]
