"""Per-file metadata of a bulk job: `metadata.csv` or `metadata.jsonl` with a `file` column."""

from __future__ import annotations

import csv
import io
import json
import math
import posixpath
import re
from typing import Any

from service.errors import ApiError

METADATA_NAMES = ("metadata.csv", "metadata.jsonl")
_INT = re.compile(r"^[+-]?(0|[1-9][0-9]*)$")
_FLOAT = re.compile(r"^[+-]?([0-9]+\.[0-9]*|\.[0-9]+|[0-9]+)([eE][+-]?[0-9]+)?$")


def typed_value(raw: str) -> Any:
    """A CSV cell as JSON: integers, floats, true/false; everything else (dates too) a string."""
    text = raw.strip()
    lowered = text.lower()
    if lowered in ("true", "false"):
        return lowered == "true"
    # Leading zeros ("007", zip codes) are identifiers, not numbers.
    if _INT.match(text):
        return int(text)
    if _FLOAT.match(text) and not re.match(r"^[+-]?0[0-9]", text):
        value = float(text)
        if math.isfinite(value):
            return value
    return raw


def normalise_key(name: str) -> str:
    """The lookup key of a file name: forward slashes, no `./`, no leading slash."""
    path = posixpath.normpath(name.replace("\\", "/")).lstrip("/")
    return "" if path == "." else path


def parse_metadata(data: bytes, filename: str | None) -> dict[str, dict[str, Any]]:
    """Metadata by file key from CSV (typed cells) or JSON Lines (JSON values kept as they are)."""
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise ApiError("invalid_metadata", "the metadata file is not UTF-8") from exc
    name = (filename or "").lower()
    is_jsonl = name.endswith((".jsonl", ".ndjson", ".json")) or (
        not name.endswith(".csv") and text.lstrip().startswith("{"))
    return _parse_jsonl(text) if is_jsonl else _parse_csv(text)


def _cell(key: str, value: str) -> Any:
    # A cell holds one string, and tags are a list of words: "red; summer" or "red, summer".
    if key == "tags":
        return [t.strip() for t in re.split(r"[;,]", value) if t.strip()]
    return typed_value(value)


def _parse_csv(text: str) -> dict[str, dict[str, Any]]:
    reader = csv.DictReader(io.StringIO(text))
    out: dict[str, dict[str, Any]] = {}
    line = 1
    try:
        if not reader.fieldnames or "file" not in reader.fieldnames:
            raise ApiError("invalid_metadata", "metadata.csv needs a header with a 'file' column")
        for line, row in enumerate(reader, start=2):
            if None in row:
                raise ApiError("invalid_metadata", f"metadata.csv line {line} has extra cells")
            key = normalise_key(row.pop("file") or "")
            if not key:
                raise ApiError("invalid_metadata", f"metadata.csv line {line} has no file")
            if key in out:
                raise ApiError("invalid_metadata", f"metadata.csv line {line} repeats {key!r}")
            # Empty cells are absent values, not empty strings.
            out[key] = {k: _cell(k, v) for k, v in row.items() if k and v is not None and v != ""}
    except csv.Error as exc:  # a cell over the csv module's field limit, a stray NUL, …
        raise ApiError("invalid_metadata", f"metadata.csv line {line + 1}: {exc}") from exc
    return out


def _parse_jsonl(text: str) -> dict[str, dict[str, Any]]:
    out: dict[str, dict[str, Any]] = {}
    for line, raw in enumerate(text.splitlines(), start=1):
        if not raw.strip():
            continue
        try:
            row = json.loads(raw)
        except ValueError as exc:
            raise ApiError("invalid_metadata", f"metadata.jsonl line {line}: {exc}") from exc
        except RecursionError as exc:
            raise ApiError("invalid_metadata",
                           f"metadata.jsonl line {line} is nested too deeply") from exc
        if not isinstance(row, dict) or not isinstance(row.get("file"), str):
            raise ApiError("invalid_metadata",
                           f"metadata.jsonl line {line} must be an object with a 'file' string")
        key = normalise_key(row.pop("file"))
        if not key:
            raise ApiError("invalid_metadata", f"metadata.jsonl line {line} has no file")
        if key in out:
            raise ApiError("invalid_metadata", f"metadata.jsonl line {line} repeats {key!r}")
        out[key] = row
    return out


class MetadataIndex:
    """Looks up a file's metadata by its relative path, else by its unique base name."""

    def __init__(self, rows: dict[str, dict[str, Any]]) -> None:
        self.rows = rows
        by_base: dict[str, list[str]] = {}
        for key in rows:
            by_base.setdefault(posixpath.basename(key), []).append(key)
        self.by_base = {base: keys[0] for base, keys in by_base.items() if len(keys) == 1}

    def lookup(self, name: str) -> dict[str, Any]:
        """Metadata of `name` (a path relative to the job's root), or an empty object."""
        key = normalise_key(name)
        if key in self.rows:
            return dict(self.rows[key])
        # The CSV may name files relative to a folder the archive wraps them in, or vice versa.
        base = self.by_base.get(posixpath.basename(key))
        return dict(self.rows[base]) if base is not None else {}
