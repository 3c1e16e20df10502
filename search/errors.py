"""Bad input, and only bad input, is reported as one line with exit code 2.

Each package has one root for the errors that mean "your input cannot work": `EvofuseError`
here (configs, model sources, tasks, run directories, merge configs), `CompressionError` in
`compression` (plans, structure files, data specs, architectures) and `RecipeError` in `evolve`
(recipes). `compression` and `evolve` never import `search`, so they cannot share this class;
`BAD_INPUT` names the three roots, and a new error type is covered by deriving from its
package's root.
"""
from __future__ import annotations

from compression.errors import CompressionError
from evolve.recipe import RecipeError


class EvofuseError(ValueError):
    """Bad input to evofuse; the message is one line that names the field or file."""


class ConfigError(EvofuseError):
    """A bad run config; the message is one line naming the field or file."""


class RunDirError(EvofuseError):
    """A run directory that cannot be used as asked (locked, not writable); one line."""


class RunFailed(Exception):
    """A run that cannot go on (every candidate of a generation failed); one line, exit 1."""


BAD_INPUT: tuple[type[Exception], ...] = (EvofuseError, CompressionError, RecipeError)


def one_line(exc: BaseException) -> str:
    """The first line of an error's message (its type name when it has none)."""
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


__all__ = ["EvofuseError", "ConfigError", "RunDirError", "RunFailed", "BAD_INPUT", "one_line"]
