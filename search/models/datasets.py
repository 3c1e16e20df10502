"""Task data: JSONL files and built-in sets generated deterministically from a seed.

Built-in sets, each with `train`, `dev` and `test` splits (`NAME:SPLIT`):

- `pydoc`      text: the Python language reference topics (see compression.calibration).
- `arithmetic` generate: two-digit addition, `{"prompt": "Q: What is 23 + 58?\\nA:", "answer": "81"}`.
- `compare`    multiple_choice: pick the largest of four two-digit numbers.

The splits of a generated set never share an item: every item's split is fixed by a hash of the
item itself (so adding rows to one split cannot move an item into another), and each split's
rows are drawn in a fixed order from a generator seeded by the set's name and split.

`GENERATOR_VERSION` is raised whenever a generator, or the way `training_texts` writes a solved
example, changes what it produces; `data_fingerprint` (what caches of fine-tuned experts are
keyed by) covers it together with the content itself.
"""
from __future__ import annotations

import hashlib
import json
import random
import sys
from pathlib import Path
from typing import Callable

from compression.calibration import CalibrationData, DataSpecError, pydoc_topics, read_jsonl, windows_from_texts
from compression.calibration import load_texts as compression_texts

SPLITS = ("train", "dev", "test")
GENERATOR_VERSION = 1  # raise when a generated set or the solved-example text format changes
SPLIT_SIZES = {"train": 512, "dev": 64, "test": 128}


def _split_of(item: tuple) -> str:
    """Assign an item to a split by a stable hash: 50% train, 25% dev, 25% test."""
    bucket = hashlib.blake2b(repr(item).encode(), digest_size=2).digest()[0] % 4
    return ("train", "train", "dev", "test")[bucket]


def _draw(name: str, split: str, make_item: Callable[[random.Random], tuple]) -> list[tuple]:
    rng = random.Random(f"evofuse:{name}:{split}")
    items, seen = [], set()
    while len(items) < SPLIT_SIZES[split]:
        item = make_item(rng)
        if item not in seen and _split_of(item) == split:
            seen.add(item)
            items.append(item)
    return items


def arithmetic_rows(split: str) -> list[dict]:
    pairs = _draw("arithmetic", split, lambda rng: (rng.randint(10, 99), rng.randint(10, 99)))
    return [{"prompt": f"Q: What is {a} + {b}?\nA:", "answer": str(a + b)} for a, b in pairs]


def compare_rows(split: str) -> list[dict]:
    quads = _draw("compare", split, lambda rng: tuple(rng.sample(range(10, 100), 4)))
    rows = []
    for quad in quads:
        listed = ", ".join(map(str, quad))
        rows.append(
            {
                "context": f"Q: Which number is the largest: {listed}?\nA:",
                "choices": [str(n) for n in quad],
                "label": quad.index(max(quad)),
            }
        )
    return rows


GENERATED: dict[str, Callable[[str], list[dict]]] = {"arithmetic": arithmetic_rows, "compare": compare_rows}
BUILTIN_KIND = {"pydoc": "perplexity", "arithmetic": "generate", "compare": "multiple_choice"}


def builtin_name(spec: str) -> str | None:
    """`NAME` when spec is a built-in `NAME:SPLIT`, else None (a file path)."""
    name, sep, split = str(spec).partition(":")
    if sep and name in BUILTIN_KIND:
        if split not in SPLITS:
            raise DataSpecError(f"{spec}: unknown split {split!r} (valid: {', '.join(SPLITS)})")
        return name
    return None


def load_rows(spec: str | Path) -> list[dict]:
    """Rows of a JSONL file or a built-in generated set; errors name the file and line."""
    spec = str(spec)
    name = builtin_name(spec)
    if name is not None:
        if name not in GENERATED:
            raise DataSpecError(f"{spec}: built-in {name!r} is text, not JSONL rows")
        return GENERATED[name](spec.split(":", 1)[1])
    path = Path(spec)
    if not path.is_file():
        raise DataSpecError(f"{spec}: no such file")
    rows = [row for _, row in read_jsonl(path)]
    if not rows:
        raise DataSpecError(f"{path}: no rows")
    return rows


def training_texts(spec: str | Path) -> list[str]:
    """Texts to fine-tune on: documents for text data, the solved example for task rows."""
    spec = str(spec)
    name = builtin_name(spec)
    if name == "pydoc" or (name is None and not spec.endswith(".jsonl")):
        return compression_texts(spec)
    if name is not None and spec.split(":", 1)[1] not in SPLITS:
        raise DataSpecError(f"{spec}: unknown split (valid: {', '.join(SPLITS)})")
    rows = load_rows(spec)
    if "text" in rows[0]:
        return [row["text"] for row in rows]
    if "prompt" in rows[0]:
        return [f"{row['prompt']} {row['answer']}" for row in rows]
    if "context" in rows[0]:
        return [f"{row['context']} {row['choices'][row['label']]}" for row in rows]
    raise DataSpecError(f"{spec}: rows have none of text / prompt+answer / context+choices+label")


def data_fingerprint(spec: str | Path) -> dict:
    """What a fine-tune on `spec` reads, as a cache key: the sha256 of its training texts (a
    file's content; a built-in's generated rows or pydoc topics, which follow the Python
    version), plus the generator version and, for built-ins, the Python version."""
    texts = training_texts(spec)
    digest = hashlib.sha256(json.dumps(texts, ensure_ascii=False).encode("utf-8")).hexdigest()
    key = {"sha256": digest, "generator_version": GENERATOR_VERSION}
    if builtin_name(str(spec)) is not None:  # a file is its content, wherever it lies
        key["builtin"] = str(spec)
        key["python"] = ".".join(map(str, sys.version_info[:3]))  # pydoc_data.topics ships with CPython
    return key


def load_texts(spec: str | Path) -> list[str]:
    """Documents of a text spec: compression's (pydoc, text and JSONL files), or a generated
    task set's solved examples (`arithmetic:train`)."""
    if builtin_name(str(spec)) in GENERATED:
        return training_texts(spec)
    return compression_texts(spec)


def calibration_windows(tokenizer, spec: str | Path, seq_len: int, num_sequences: int | None = None) -> CalibrationData:
    """Fixed-length token windows of any text spec this package knows (see `load_texts`)."""
    return windows_from_texts(tokenizer, load_texts(spec), seq_len, num_sequences, origin=str(spec))


__all__ = [
    "DataSpecError", "GENERATOR_VERSION", "load_rows", "load_texts", "training_texts", "builtin_name", "pydoc_topics",
    "calibration_windows", "data_fingerprint",
]
