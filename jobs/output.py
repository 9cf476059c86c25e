"""Printing results: aligned text tables for people, JSON for programs (stdout only); result files."""

from __future__ import annotations

import json
import sys
from collections.abc import Sequence
from typing import Any, TextIO

import pyarrow as pa
import pyarrow.parquet as pq

from encoders.errors import MmembedError


class OutputError(MmembedError):
    """A result file could not be written."""


def _cell(value: Any, width: int = 60) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, (list, tuple)) and value and isinstance(value[0], float):
        return "[" + ", ".join(f"{v:.3f}" for v in value[:4]) + (", …]" if len(value) > 4 else "]")
    text = "" if value is None else str(value)
    return text if len(text) <= width else text[: width - 1] + "…"


def table(rows: Sequence[dict], columns: Sequence[str] | None = None, out: TextIO | None = None) -> None:
    out = out or sys.stdout
    if not rows:
        print("(no rows)", file=out)
        return
    columns = list(columns or rows[0].keys())
    cells = [[_cell(r.get(c)) for c in columns] for r in rows]
    widths = [max(len(c), *(len(row[i]) for row in cells)) for i, c in enumerate(columns)]
    print("  ".join(c.ljust(w) for c, w in zip(columns, widths)).rstrip(), file=out)
    print("  ".join("-" * w for w in widths), file=out)
    for row in cells:
        print("  ".join(v.ljust(w) for v, w in zip(row, widths)).rstrip(), file=out)


def to_json(value: Any) -> str:
    return json.dumps(value, default=str, ensure_ascii=False)


def emit_json(value: Any) -> None:
    print(to_json(value), flush=True)


def write_parquet(table: pa.Table, path: str) -> None:
    try:
        pq.write_table(table, path)
    except OSError as e:
        raise OutputError(f"cannot write {path}: {e}") from None
