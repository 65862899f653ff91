"""Training data files of the curvature passes: ``.jsonl`` (one JSON object a line) and
``.csv`` (a header row), read with line numbers so that every error names its line; labels as
integers or class names."""

from __future__ import annotations

import csv
import json
import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from epimer.errors import InputError

DATA_SUFFIXES = (".jsonl", ".csv")


@dataclass(frozen=True)
class Record:
    """One sample of the data file: its text field(s), raw label and line number."""

    texts: tuple[str, ...]
    label: Any
    line: int


def read_records(path: Path, text_fields: Sequence[str], label_field: str | None) -> list[Record]:
    """Samples of a .jsonl (one JSON object a line) or .csv (with a header) file.

    ``label_field=None`` reads no labels (``estimator="true"`` draws them from the model).
    """
    if not path.is_file():
        raise InputError(f"{path}: data file not found")
    fields = [*text_fields, *([label_field] if label_field else [])]
    if path.suffix == ".jsonl":
        rows = _jsonl_rows(path)
    elif path.suffix == ".csv":
        rows = _csv_rows(path, fields)
    else:
        raise InputError(f"{path}: unsupported data file type {path.suffix!r}; use {' or '.join(DATA_SUFFIXES)}")
    records = []
    for line, row in rows:
        for field in fields:
            if field not in row:
                raise InputError(f"{path}:{line}: no field {field!r} (fields: {', '.join(map(str, row))})")
        texts = tuple(row[f] for f in text_fields)
        for field, text in zip(text_fields, texts):
            if not isinstance(text, str):
                raise InputError(f"{path}:{line}: field {field!r} is {type(text).__name__}, expected text")
        records.append(Record(texts, row[label_field] if label_field else None, line))
    if not records:
        raise InputError(f"{path}: no samples in the data file")
    return records


def read_rows(path: Path) -> list[tuple[int, dict[str, Any]]]:
    """(line, JSON object) of every sample of a .jsonl file (causal-LM data: nested fields)."""
    if not path.is_file():
        raise InputError(f"{path}: data file not found")
    if path.suffix != ".jsonl":
        raise InputError(f"{path}: causal-LM data is a .jsonl file (one JSON object a line); got {path.suffix!r}")
    rows = list(_jsonl_rows(path))
    if not rows:
        raise InputError(f"{path}: no samples in the data file")
    return rows


def _jsonl_rows(path: Path) -> Iterator[tuple[int, dict[str, Any]]]:
    try:
        with path.open(encoding="utf-8-sig") as f:  # -sig: a byte order mark is not data
            for line, text in enumerate(f, start=1):
                if not text.strip():
                    continue
                try:
                    row = json.loads(text)
                except json.JSONDecodeError as e:
                    raise InputError(f"{path}:{line}: not valid JSON ({e.msg})") from None
                if not isinstance(row, dict):
                    raise InputError(f"{path}:{line}: expected a JSON object, got {type(row).__name__}")
                yield line, row
    except UnicodeDecodeError:
        raise _not_utf8(path) from None


def _csv_rows(path: Path, fields: Sequence[str]) -> Iterator[tuple[int, dict[str, Any]]]:
    try:
        with path.open(encoding="utf-8-sig", newline="") as f:
            reader = csv.DictReader(f)
            columns = reader.fieldnames or []
            for field in fields:
                if field not in columns:
                    raise InputError(f"{path}:1: no column {field!r} (columns: {', '.join(columns) or 'none'})")
            for row in reader:
                yield reader.line_num, row
    except UnicodeDecodeError:
        raise _not_utf8(path) from None


def _not_utf8(path: Path) -> InputError:
    """The error for a data file that is not UTF-8, naming its first undecodable line (the
    text reader decodes in blocks, so its position is found again line by line: no UTF-8
    character holds a newline byte)."""
    with path.open("rb") as f:
        for line, raw in enumerate(f, start=1):
            try:
                raw.decode("utf-8")
            except UnicodeDecodeError as e:
                byte = raw[e.start]
                return InputError(
                    f"{path}:{line}: not UTF-8 text (byte 0x{byte:02x} at column {e.start + 1}); "
                    "save the file as UTF-8"
                )
    return InputError(f"{path}: not UTF-8 text; save the file as UTF-8")  # pragma: no cover


def label_id(raw: Any, label2id: dict[str, int], num_labels: int, where: str) -> int:
    """Class index of a label: an int, a name in config.label2id, or an integer written as text."""
    if isinstance(raw, str) and raw in label2id:
        idx = int(label2id[raw])
    elif isinstance(raw, int) and not isinstance(raw, bool):
        idx = raw
    elif isinstance(raw, str) and re.fullmatch(r"\s*-?\d+\s*", raw):
        idx = int(raw)
    else:
        names = ", ".join(repr(k) for k in sorted(label2id))
        raise InputError(
            f"{where}: unknown label {raw!r}; the model's labels are {names} or integers 0..{num_labels - 1}"
        )
    if not 0 <= idx < num_labels:
        raise InputError(f"{where}: label {raw!r} is out of range for a model with {num_labels} labels")
    return idx
