"""Row files of prompts: JSONL (one JSON object per line) or Parquet, read into (where, row)
pairs, and the fields of a row found by dotted keys with ``|`` between alternatives
(:class:`~trb_nemo.config.schema.DataConfig`). A file that does not parse is a ConfigError naming
the key and the row (``p.jsonl:3`` is line 3, ``p.parquet row 2`` the 0-based row).
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from pathlib import Path

from trb_nemo.config.schema import ConfigError

JSONL_SUFFIXES = (".jsonl", ".json")


PARQUET_SUFFIXES = (".parquet", ".pq")


USER_ROLES = ("user", "human")
"""Chat-message roles (``role`` or ``from``) whose first turn is the prompt."""


MISSING = object()


def _lookup(row, path: str):
    if isinstance(row, dict) and path in row:  # a flat column that has a dot in its name
        return row[path]
    node = row
    for part in path.split("."):
        if isinstance(node, dict) and part in node:
            node = node[part]
        elif isinstance(node, list) and re.fullmatch(r"-?\d+", part) \
                and -len(node) <= int(part) < len(node):
            node = node[int(part)]
        else:
            return MISSING
    return node


def field_of(row, key: str):
    """The value at ``key`` (dotted path, ``|`` between alternatives: the first one the row has
    with a non-null value); ``MISSING`` when none."""
    for path in key.split("|"):
        value = _lookup(row, path.strip())
        if value is not MISSING and value is not None:
            return value
    return MISSING


def fields_here(row: dict, columns: list[str] | None) -> str:
    names = columns if columns is not None else list(row)
    return ", ".join(map(repr, names)) or "none"


def prompt_text(value) -> str | None:
    """The prompt text of a field value: a string, or the first user turn of chat messages;
    None when it is neither."""
    if isinstance(value, str):
        return value
    if isinstance(value, list) and all(isinstance(m, dict) for m in value):
        for m in value:
            if m.get("role", m.get("from")) in USER_ROLES:
                text = m.get("content", m.get("value"))
                return text if isinstance(text, str) else None
    return None


def file_format(path: str, key: str) -> str:
    """``jsonl`` or ``parquet`` from the suffix; ConfigError(key) for a missing file or another
    suffix."""
    file = Path(path)
    if not file.is_file():
        what = "neither toy_math nor a file" if key in ("data.source", "eval.source") else \
            "not a file"
        raise ConfigError(key, f"{path!r} is {what}")
    suffix = file.suffix.lower()
    if suffix in JSONL_SUFFIXES:
        return "jsonl"
    if suffix in PARQUET_SUFFIXES:
        return "parquet"
    raise ConfigError(key, f"{path}: unknown format {suffix or '(no suffix)'!r}; use a .jsonl "
                      "(one JSON object per line) or .parquet file")


def read_rows(path: str, key: str, fields: Sequence[str] = ()) -> tuple[list[tuple[str, dict]],
                                                                        list[str] | None]:
    """(where, row) of every row of a JSONL or Parquet file (``where``: ``p.jsonl:3``, line 3,
    or ``p.parquet row 2``, 0-based), and a Parquet file's columns (None for JSONL). A Parquet
    file is read for the columns ``fields`` (keys: dotted paths with ``|``) need only.
    ConfigError(key) for a file that does not parse."""
    if file_format(path, key) == "parquet":
        return _parquet_rows(path, key, fields)
    text = Path(path).read_text()
    if text.lstrip().startswith("["):
        raise ConfigError(key, f"{path} is one JSON array, not JSONL: write one JSON "
                          "object per line (e.g. jq -c '.[]' in.json > prompts.jsonl)")
    rows = []
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise ConfigError(key, f"{path}:{number}: not valid JSON ({e.msg})") from None
        if not isinstance(row, dict):
            raise ConfigError(key, f"{path}:{number}: a JSON {type(row).__name__}, not an object")
        rows.append((f"{path}:{number}", row))
    return rows, None


def _parquet_rows(path: str, key: str, fields: Sequence[str]):
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        file = pq.ParquetFile(path)
        names = file.schema_arrow.names
        wanted = {n for k in fields for alt in k.split("|") for n in names
                  if alt.strip() == n or alt.strip().split(".")[0] == n}
        if wanted:
            rows = file.read(columns=[n for n in names if n in wanted]).to_pylist()
        else:  # no column the keys name: every row lacks them
            rows = [{} for _ in range(file.metadata.num_rows)]
    except (pa.ArrowException, OSError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ConfigError(key, f"{path} does not read as Parquet: {first}") from None
    return [(f"{path} row {i}", row) for i, row in enumerate(rows)], names


def count_rows(path: str) -> int | None:
    """Rows of a JSONL or Parquet file, cheaply (no parsing); None if it does not read."""
    try:
        if Path(path).suffix.lower() in PARQUET_SUFFIXES:
            import pyarrow.parquet as pq

            return pq.ParquetFile(path).metadata.num_rows
        return sum(1 for line in Path(path).read_text().splitlines() if line.strip())
    except Exception:  # noqa: BLE001 - the pre-flight says what is wrong with it
        return None


def files_digest(paths: Sequence[str]) -> str | None:
    """``sha256:<16 hex>`` of the bytes of ``paths`` in order (their names included), or None
    for none. Reads every byte (the pre-flight reads the prompts anyway)."""
    import hashlib

    if not paths:
        return None
    h = hashlib.sha256()
    for path in paths:
        h.update(f"{path}\0".encode())
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(1 << 22), b""):
                h.update(block)
    return "sha256:" + h.hexdigest()[:16]
