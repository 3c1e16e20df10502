"""The root of compression's bad-input errors, and how a pydantic error becomes one line.

Every error that means "the input cannot work" (a plan, a structure file, a data spec, an
architecture, a TTM shape) derives from `CompressionError`; the command line reports any of
them as one line with exit code 2. `search` builds on the same formatter for its configs.
"""
from __future__ import annotations

from pydantic import ValidationError


class CompressionError(ValueError):
    """Bad input to a compression step; the message is one line naming the field or file."""


def validation_location(loc: tuple) -> str:
    """pydantic's location tuple as a path: ('tasks', 1, 'dev') -> 'tasks[1].dev'."""
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out


def first_validation_error(exc: ValidationError, where: str = "", unknown_key: str = "unknown key") -> str:
    """The first error of a pydantic ValidationError as `where.location: message`.

    `unknown_key` words a key the model forbids (run configs say "unknown key"; plan steps keep
    pydantic's "Extra inputs are not permitted", which their users have seen since the start).
    """
    err = exc.errors()[0]
    location = validation_location(err["loc"])
    path = f"{where}.{location}" if where and location else (where or location)
    msg = unknown_key if err["type"] == "extra_forbidden" else err["msg"].removeprefix("Value error, ")
    return f"{path}: {msg}" if path else msg


__all__ = ["CompressionError", "first_validation_error", "validation_location"]
