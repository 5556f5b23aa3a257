"""Per-run outputs: `metrics.csv` (one row per epoch) and `result.json` (one flat record), written atomically."""
from __future__ import annotations

import csv
import io
import errno
import json
import os
from datetime import datetime, timezone
from pathlib import Path

from kdrun.checkpoint import atomic_write_text
from kdrun.errors import OutputError

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
    """Write the record atomically, stamped with `updated_at`. On a full disk the new record is written over
    the old file in place instead: a small file's disk block is already allocated, so the record that says
    the disk is full still reaches the disk."""
    stamped = {**record, "updated_at": datetime.now(timezone.utc).isoformat(timespec="seconds")}
    text = json.dumps(stamped, indent=2, sort_keys=False, default=str) + "\n"
    try:
        atomic_write_text(path, text)
    except OutputError as exc:
        if exc.errno not in (errno.ENOSPC, errno.EDQUOT) or not overwrite_in_place(Path(path), text.encode()):
            raise


def overwrite_in_place(path: Path, data: bytes) -> bool:
    """Rewrite an existing file within the disk blocks it already holds; False when it does not fit."""
    try:
        if os.stat(path).st_blocks * 512 < len(data):
            return False
        with open(path, "r+b") as f:
            f.write(data)
            f.truncate(len(data))
            f.flush()
            os.fsync(f.fileno())
        return True
    except OSError:
        return False


def read_result(path: Path) -> dict | None:
    try:
        return json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError):
        return None
