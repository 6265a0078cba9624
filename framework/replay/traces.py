"""Readers for the public serving traces: the Azure LLM inference trace (CSV) and Mooncake's
(JSONL). Both become `TraceRecord`s with timestamps in seconds from the trace's first request."""

from __future__ import annotations

import csv
import json
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

AZURE_COLUMNS = ("TIMESTAMP", "ContextTokens", "GeneratedTokens")
MOONCAKE_BLOCK_TOKENS = 512  # tokens per hash id (the Mooncake trace's README)


class TraceFormatError(ValueError):
    """A trace line that cannot be read; the message names the file and the line."""


@dataclass(frozen=True)
class TraceRecord:
    timestamp: float  # seconds since the trace's first request
    input_len: int
    output_len: int
    hash_ids: tuple[int, ...] | None = None  # Mooncake: one id per prompt block; equal ids, equal blocks


def read_trace(path: str | Path, trace_format: str = "auto") -> list[TraceRecord]:
    """The records of an Azure CSV (`azure`) or Mooncake JSONL (`mooncake`) trace; `auto` tells
    them apart by the file's suffix."""
    path = Path(path)
    if trace_format == "auto":
        trace_format = {".csv": "azure", ".jsonl": "mooncake"}.get(path.suffix.lower(), "")
        if not trace_format:
            raise ValueError(f"{path}: cannot tell the trace format from the suffix; set replay.trace_format=azure|mooncake")
    readers = {"azure": read_azure_csv, "mooncake": read_mooncake_jsonl}
    if trace_format not in readers:
        raise ValueError(f"replay.trace_format must be auto, azure or mooncake; got {trace_format!r}")
    if not path.is_file():
        raise ValueError(f"replay.trace: no such file {path}")
    records = readers[trace_format](path)
    if not records:
        raise TraceFormatError(f"{path}: the trace holds no requests")
    return _from_first(records)


def _from_first(records: list[TraceRecord]) -> list[TraceRecord]:
    start = min(r.timestamp for r in records)
    return [TraceRecord(r.timestamp - start, r.input_len, r.output_len, r.hash_ids) for r in records]


def _count(value, what: str) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, str)):
        raise ValueError(f"{what} must be a whole number, got {value!r}")
    try:
        number = int(value)
    except ValueError:
        raise ValueError(f"{what} must be a whole number, got {value!r}") from None
    if number < 0:
        raise ValueError(f"{what} must not be negative, got {number}")
    return number


def _azure_time(text: str) -> float:
    """'2023-11-16 18:17:03.9799600' (seven fractional digits) as POSIX seconds."""
    whole, _, fraction = text.strip().partition(".")
    try:
        seconds = datetime.strptime(whole, "%Y-%m-%d %H:%M:%S").replace(tzinfo=timezone.utc).timestamp()  # no DST jumps
        return seconds + (float(f"0.{fraction}") if fraction else 0.0)
    except ValueError:
        raise ValueError(f"TIMESTAMP must look like '2023-11-16 18:17:03.9799600', got {text!r}") from None


def read_azure_csv(path: Path) -> list[TraceRecord]:
    records = []
    with open(path, newline="") as f:
        reader = csv.reader(f)
        header = next(reader, None)
        if header is None or tuple(h.strip() for h in header) != AZURE_COLUMNS:
            raise TraceFormatError(f"{path}:1: the header must be {','.join(AZURE_COLUMNS)}; got {header}")
        for row in reader:
            line = reader.line_num
            if not row:
                continue
            try:
                if len(row) != 3:
                    raise ValueError(f"expected 3 fields, got {len(row)}")
                records.append(TraceRecord(_azure_time(row[0]), _count(row[1], "ContextTokens"), _count(row[2], "GeneratedTokens")))
            except ValueError as exc:
                raise TraceFormatError(f"{path}:{line}: {exc}") from None
    return records


def read_mooncake_jsonl(path: Path) -> list[TraceRecord]:
    records = []
    with open(path) as f:
        for line, text in enumerate(f, start=1):
            if not text.strip():
                continue
            try:
                records.append(_mooncake_record(text))
            except ValueError as exc:
                raise TraceFormatError(f"{path}:{line}: {exc}") from None
    return records


def _mooncake_record(text: str) -> TraceRecord:
    try:
        entry = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ValueError(f"not JSON ({exc.msg})") from None
    if not isinstance(entry, dict):
        raise ValueError(f"expected a JSON object, got {type(entry).__name__}")
    missing = [key for key in ("timestamp", "input_length", "output_length") if key not in entry]
    if missing:
        raise ValueError(f"missing {', '.join(missing)}")
    timestamp = entry["timestamp"]
    if isinstance(timestamp, bool) or not isinstance(timestamp, (int, float)) or timestamp < 0:
        raise ValueError(f"timestamp must be a non-negative number of milliseconds, got {timestamp!r}")
    hash_ids = entry.get("hash_ids", [])
    if not isinstance(hash_ids, list) or any(isinstance(h, bool) or not isinstance(h, int) for h in hash_ids):
        raise ValueError(f"hash_ids must be a list of integers, got {hash_ids!r}")
    input_len = _count(entry["input_length"], "input_length")
    if len(hash_ids) * MOONCAKE_BLOCK_TOKENS < input_len:
        raise ValueError(f"{len(hash_ids)} hash_ids of {MOONCAKE_BLOCK_TOKENS} tokens cannot cover input_length {input_len}")
    return TraceRecord(timestamp / 1000.0, input_len, _count(entry["output_length"], "output_length"), tuple(hash_ids))
