"""Per-run outputs: `metrics.csv` (one row per epoch) and `result.json` (one flat record), written atomically."""
from __future__ import annotations

import csv
import io
import json
from pathlib import Path

from kdrun.checkpoint import atomic_write_text

RESULT_FILE = "result.json"
METRICS_FILE = "metrics.csv"


def write_metrics(path: Path, rows: list[dict]) -> None:
    """Rewrite the whole CSV each epoch; columns are the union of all rows' keys in first-seen order."""
    columns: list[str] = []
    for row in rows:
        columns += [k for k in row if k not in columns]
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=columns, lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    atomic_write_text(path, buffer.getvalue())


def write_result(path: Path, record: dict) -> None:
    atomic_write_text(path, json.dumps(record, indent=2, sort_keys=False, default=str) + "\n")


def read_result(path: Path) -> dict | None:
    try:
        return json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError):
        return None
