"""Calibration and evaluation text: the built-in `pydoc` corpus, text/JSONL files, token windows.

The `pydoc` corpus is the Python language reference that ships with CPython
(`pydoc_data.topics`, 79 topics, ~465 KB). Its topics are split in their own order, the same
way everywhere in evofuse:

    train (calibration, fine-tuning) = first 50% of topics
    dev   (selection)                = next 25%
    test  (reporting only)           = last 25%

with boundaries at int(0.5 * n) and int(0.75 * n): 39 / 20 / 20 topics.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator, Sequence

import torch
from compression.errors import CompressionError

PYDOC_SPLITS = ("train", "dev", "test")


class DataSpecError(CompressionError):
    """A data spec (file or built-in split) that cannot be read; the message is one line."""


def pydoc_topics(split: str) -> list[str]:
    """Texts of the `pydoc` split, one per topic, in the order CPython lists them."""
    if split not in PYDOC_SPLITS:
        raise DataSpecError(f"pydoc:{split}: unknown split (valid: {', '.join(PYDOC_SPLITS)})")
    from pydoc_data.topics import topics

    texts = [topics[key] for key in topics]
    n = len(texts)
    bounds = {"train": (0, int(0.5 * n)), "dev": (int(0.5 * n), int(0.75 * n)), "test": (int(0.75 * n), n)}
    lo, hi = bounds[split]
    return texts[lo:hi]


# Named text sources, `NAME:SPLIT` -> documents. Callers with data sets of their own load the
# documents themselves and cut windows with `windows_from_texts`.
TEXT_SOURCES: dict[str, Callable[[str], list[str]]] = {"pydoc": pydoc_topics}


def load_texts(spec: str | Path) -> list[str]:
    """Documents from `NAME:SPLIT` (pydoc or a registered source), a JSONL file of
    {"text": ...} lines, or a plain text file.

    A plain text file is one document; a JSONL file gives one document per line.
    """
    spec = str(spec)
    name, sep, split = spec.partition(":")
    if sep and name in TEXT_SOURCES:
        return TEXT_SOURCES[name](split)
    path = Path(spec)
    if not path.is_file():
        raise DataSpecError(f"{spec}: no such file (expected a text file, JSONL with \"text\", or pydoc:SPLIT)")
    if path.suffix == ".jsonl":
        docs = []
        for lineno, row in read_jsonl(path):
            if not isinstance(row.get("text"), str):
                raise DataSpecError(f"{path}:{lineno}: expected an object with a string \"text\"")
            docs.append(row["text"])
        return docs
    return [path.read_text(encoding="utf-8")]


def read_jsonl(path: Path) -> list[tuple[int, dict]]:
    """(line number, object) for every non-blank line; errors name the file and line."""
    rows = []
    for lineno, line in enumerate(Path(path).read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            raise DataSpecError(f"{path}:{lineno}: not JSON ({exc.msg})") from None
        if not isinstance(row, dict):
            raise DataSpecError(f"{path}:{lineno}: expected a JSON object")
        rows.append((lineno, row))
    return rows


def token_stream(tokenizer, texts: Sequence[str]) -> list[int]:
    """All documents tokenised (no special tokens) and joined by the EOS token."""
    sep = tokenizer.eos_token_id
    ids: list[int] = []
    for text in texts:
        ids.extend(tokenizer(text, add_special_tokens=False)["input_ids"])
        if sep is not None:
            ids.append(sep)
    return ids


@dataclass
class CalibrationData:
    """Fixed-length token windows for calibration / local training: input_ids is (N, T)."""

    input_ids: torch.Tensor

    @property
    def num_sequences(self) -> int:
        return self.input_ids.shape[0]

    @property
    def seq_len(self) -> int:
        return self.input_ids.shape[1]

    def batches(self, batch_size: int, device: torch.device | str | None = None) -> Iterator[torch.Tensor]:
        for start in range(0, self.num_sequences, batch_size):
            yield self.input_ids[start : start + batch_size].to(device or "cpu")

    def take(self, n: int) -> "CalibrationData":
        return CalibrationData(self.input_ids[:n])

    def split(self, n_first: int) -> tuple["CalibrationData", "CalibrationData"]:
        return CalibrationData(self.input_ids[:n_first]), CalibrationData(self.input_ids[n_first:])


def calibration_windows(
    tokenizer, spec: str | Path = "pydoc:train", seq_len: int = 128, num_sequences: int | None = None
) -> CalibrationData:
    """Non-overlapping `seq_len`-token windows cut from the joined token stream of `spec`.

    Deterministic: the windows are taken in corpus order, no sampling. A corpus too short for
    one window is an error naming the spec.
    """
    return windows_from_texts(tokenizer, load_texts(spec), seq_len, num_sequences, origin=str(spec))


def windows_from_texts(
    tokenizer, texts: Sequence[str], seq_len: int = 128, num_sequences: int | None = None, origin: str = "texts"
) -> CalibrationData:
    """The windows of `calibration_windows`, cut from documents the caller loaded."""
    ids = token_stream(tokenizer, texts)
    n = len(ids) // seq_len
    if num_sequences is not None:
        n = min(n, num_sequences)
    if n == 0:
        raise DataSpecError(f"{origin}: {len(ids)} tokens, fewer than one window of {seq_len}")
    windows = torch.tensor(ids[: n * seq_len], dtype=torch.long).view(n, seq_len)  # (N, T)
    return CalibrationData(windows)
