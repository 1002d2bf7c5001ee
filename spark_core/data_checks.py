"""Opening a question file and checking it before anything expensive starts.

`read_file_rows` reads a Parquet, JSON lines, JSON array or CSV file into rows and says *where* each
row came from (``line 4, row 3`` for JSON lines, ``row 3`` otherwise), so every later complaint names
the place to fix. Every failure is a `DataError` (a ValueError) that starts with the file name.

`spark_core.data.check_data_source` (built on these) is what the CLI and the flows call before a
Prefect server, a model or any task starts.
"""

from __future__ import annotations

import io
import json
from typing import Any

# A question or answer longer than this is a broken export (a whole document in one cell), not a
# math problem; it would only blow up the prompt length later, far from its row.
MAX_TEXT_CHARS = 100_000

TABLE_SUFFIXES = (".parquet", ".pq")
JSON_SUFFIXES = (".jsonl", ".ndjson", ".json")
CSV_SUFFIXES = (".csv",)


class DataError(ValueError):
    """The data source cannot be used; the message names the file and the line or row."""


def _decode(path: str, data: bytes) -> str:
    """UTF-8 text of a file; a bad byte is reported with its line and column."""
    try:
        return data.decode("utf-8-sig")  # a leading BOM (Excel's CSV export) is not data
    except UnicodeDecodeError as err:
        line = data.count(b"\n", 0, err.start) + 1
        column = err.start - (data.rfind(b"\n", 0, err.start) + 1) + 1
        raise DataError(
            f"{path}: line {line}, column {column}: not UTF-8 (byte 0x{data[err.start]:02x}); "
            "re-save the file as UTF-8"
        ) from None


def _read_bytes(path: str) -> bytes:
    import fsspec

    try:
        with fsspec.open(path, "rb") as fh:
            return fh.read()
    except FileNotFoundError:
        raise DataError(f"{path}: file not found") from None
    except IsADirectoryError:
        raise DataError(f"{path}: is a folder, not a file") from None


def _json_rows(path: str, text: str) -> tuple[list[dict[str, Any]], list[str]]:
    if path.lower().endswith(".json") and text.lstrip().startswith("["):
        try:
            rows = json.loads(text)
        except json.JSONDecodeError as err:
            raise DataError(f"{path}: line {err.lineno}, column {err.colno}: not valid JSON ({err.msg})") from None
        labels = [f"row {i}" for i in range(len(rows))]
    else:
        rows, labels = [], []
        for number, line in enumerate(text.splitlines(), start=1):
            if not line.strip():
                continue
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as err:
                raise DataError(
                    f"{path}: line {number}, column {err.colno}: not valid JSON ({err.msg})"
                ) from None
            labels.append(f"line {number}, row {len(labels)}")
    for row, label in zip(rows, labels):
        if not isinstance(row, dict):
            raise DataError(f"{path}: {label}: expected a JSON object, got {type(row).__name__}")
    return rows, labels


def _parquet_rows(path: str, data: bytes) -> tuple[list[str], list[dict[str, Any]]]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        table = pq.read_table(pa.BufferReader(data))
    except (pa.ArrowException, OSError) as err:
        # pyarrow names the in-memory buffer, not the file: keep only its reason.
        reason = str(err).replace("Could not open Parquet input source '<Buffer>': ", "")
        raise DataError(f"{path}: not a readable Parquet file ({reason})") from None
    return table.column_names, table.to_pylist()


def _csv_rows(path: str, text: str) -> tuple[list[str], list[dict[str, Any]]]:
    import pandas as pd

    try:
        # Every cell as text, empty cells as "" (not NaN): answers like "007" or "1e3" stay as written.
        df = pd.read_csv(io.StringIO(text), dtype=str, keep_default_na=False)
    except pd.errors.EmptyDataError:
        raise DataError(f"{path}: the file is empty (a CSV needs a header line)") from None
    except pd.errors.ParserError as err:
        raise DataError(f"{path}: not valid CSV ({err})") from None
    return [str(c) for c in df.columns], df.to_dict("records")


def read_file_rows(path: str, max_rows: int | None = None) -> tuple[list[str], list[dict[str, Any]], list[str]]:
    """(columns, rows, where each row is) of a local or fsspec Parquet/JSONL/JSON/CSV file."""
    name = path.split("?")[0].lower()
    if not name.endswith(TABLE_SUFFIXES + JSON_SUFFIXES + CSV_SUFFIXES):
        raise DataError(f"{path}: unsupported file type; use .parquet, .jsonl (JSON lines), .json or .csv")
    data = _read_bytes(path)
    if name.endswith(TABLE_SUFFIXES):
        columns, rows = _parquet_rows(path, data)
        labels = [f"row {i}" for i in range(len(rows))]
    elif name.endswith(CSV_SUFFIXES):
        columns, rows = _csv_rows(path, _decode(path, data))
        labels = [f"row {i}" for i in range(len(rows))]
    else:
        # Parsed with `json`, not pyarrow: a column whose type varies between rows (a number among
        # strings) must reach the row checks instead of failing the whole file.
        rows, labels = _json_rows(path, _decode(path, data))
        columns = list(dict.fromkeys(key for row in rows for key in row))
    if not rows:
        raise DataError(f"{path}: the file has no rows")
    if max_rows is not None:
        rows, labels = rows[:max_rows], labels[:max_rows]
    return columns, rows, labels


def text_problem(question: str, answer: str, seen: dict[str, str] | None, label: str) -> str | None:
    """What is wrong with a row whose question and answer are strings (None: nothing).

    With `seen` (question text -> where it first was), a repeated question is a problem too: training
    data with duplicates over-weights them silently. Benchmarks pass None (their sets are as published).
    """
    for what, text in (("question", question), ("answer", answer)):
        if len(text) > MAX_TEXT_CHARS:
            return f"{what} is {len(text):,} characters long (at most {MAX_TEXT_CHARS:,})"
    if seen is None:
        return None
    key = " ".join(question.split())
    if key in seen:
        return f"duplicate question (same text as {seen[key]})"
    seen[key] = label
    return None
