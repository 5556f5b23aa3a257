"""The records `kdrun compare` reads: every result.json below the given directories, checked one by one.

A file that cannot be used (not JSON, cut off, not a run record, a completed run without its accuracy) is
kept apart with the reason, so that the table never silently shrinks. Repeats (runs of one configuration
with one seed) are found here too: only the newest of them may enter a mean.
"""
from __future__ import annotations

import json
import math
import numbers
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

import pandas as pd

from kdrun.errors import ConfigError

RESULT_FILE = "result.json"
TEACHER_CACHE_DIR = "teachers"
METRICS = ("best_acc", "last_acc")
DEFAULT_METRIC = "best_acc"
RECORDED_METRIC = "compare_metric"  # the statistic a run's recipe reports (RepDistiller: last epoch), in its record
STATISTICS = {"best_acc": "best-epoch accuracy", "last_acc": "last-epoch accuracy"}  # what a table shows, in words
REQUIRED_KEYS = ("status", "method", "student")
# What makes a configuration; `method.*` keys are inserted after beta. Seeds are what gets aggregated.
IDENTITY_KEYS = ("method", "teacher", "student", "dataset", "T", "alpha", "beta", "epochs", "teacher_epochs",
                 "teacher_snapshot_epoch", "assistants", "lr", "batch_size", "precision")
TIMESTAMP_KEYS = ("finished_at", "updated_at")
RUN_DIR = "_dir"  # where the record was found (run_dir in the record may point where the run was made)
FINISHED = "_finished"  # when the run ended, as a POSIX time: orders repeats
REPEAT = "_repeat"  # in the repeats listing: which configuration and seed a run repeats
KEPT = "_kept"  # in the repeats listing: the repeat that stays in the mean
JSON_KINDS = ((bool, "a boolean"), (numbers.Number, "a number"), (str, "a string"), (list, "an array"))

# Always shown when they vary, even when another shown key already tells the rows apart.
CORE_KEYS = ("method", "teacher", "student", "dataset", "transfer")
BASELINE_METHOD = "ce"
# A baseline must have trained the same student the same way, so that the delta measures the teacher alone.
BASELINE_KEYS = ("student", "dataset", "epochs", "batch_size", "lr", "precision")


class UnusableRecord(Exception):
    """A result.json that is not a usable run record; the message says why."""


@dataclass
class Unreadable:
    path: str
    reason: str


@dataclass
class RunRecords:
    runs: pd.DataFrame
    unreadable: list[Unreadable] = field(default_factory=list)


def load_records(dirs: list[str]) -> RunRecords:
    """Every run record below `dirs` (teacher caches skipped), identity values made hashable, and the
    files that could not be used, each with its reason."""
    records, unreadable = [], []
    for path in find_result_files(dirs):
        try:
            record = read_run_record(path)
        except UnusableRecord as exc:
            unreadable.append(Unreadable(str(path), str(exc)))
            continue
        if record is not None:
            records.append(record)
    if not records:
        raise ConfigError(nothing_usable(dirs, unreadable))
    return RunRecords(normalise(pd.DataFrame(records)), unreadable)


def load_runs(dirs: list[str]) -> pd.DataFrame:
    return load_records(dirs).runs


def nothing_usable(dirs: list[str], unreadable: list[Unreadable]) -> str:
    where = ", ".join(dirs)
    if not unreadable:
        return f"no run result.json below {where}; give directories that hold kdrun results (default: results)"
    first = unreadable[0]
    more = f" (and {len(unreadable) - 1} more)" if len(unreadable) > 1 else ""
    count = "the only run result.json" if len(unreadable) == 1 else f"all {len(unreadable)} run result.json files"
    return f"{count} below {where} cannot be used: {first.path}: {first.reason}{more}"


# Keys every method has since they were declared; records written before carry their value implicitly.
# Keys a record written before they existed lacks; such a run had these values.
IMPLICIT_DEFAULTS = {"method.kl_reduction": "batchmean", "transfer": "labelled", "transfer.labelled_fraction": 1.0,
                     "transfer.split_seed": 0, "method.logit_standardize": False, "method.dot": False}


def normalise(runs: pd.DataFrame) -> pd.DataFrame:
    for key, default in IMPLICIT_DEFAULTS.items():
        if key in runs.columns:
            runs[key] = runs[key].where(runs[key].notna() | runs["method"].isna(), default)
    for key in identity_keys(runs.columns):
        runs[key] = runs[key].map(hashable)
    for key in (*METRICS, "teacher_acc"):
        runs[key] = pd.to_numeric(runs[key], errors="coerce") if key in runs else math.nan
    return runs


def find_result_files(dirs: list[str]) -> list[Path]:
    found: dict[Path, None] = {}
    for name in dirs:
        root = Path(name)
        if not root.is_dir():
            raise ConfigError(f"results directory {name} does not exist; give directories that hold kdrun results "
                              f"(default: results)")
        for path in sorted(root.rglob(RESULT_FILE)):
            if TEACHER_CACHE_DIR not in path.relative_to(root).parts[:-1]:
                found[path.resolve()] = None
    return list(found)


def read_run_record(path: Path) -> dict | None:
    """The record, with where and when it was found; None for a teacher cache entry (a directory of
    caches given directly); UnusableRecord for anything else that is not a complete run record."""
    record = parse_json(path)
    if not isinstance(record, dict):
        raise UnusableRecord(f"not a JSON object ({json_kind(record)})")
    if is_teacher_cache(record):
        return None
    missing = [key for key in REQUIRED_KEYS if key not in record]
    if missing:
        raise UnusableRecord(f"missing keys: {', '.join(missing)}")
    if record["status"] == "completed":
        check_accuracy(record, "best_acc")
    return {**record, RUN_DIR: str(path.parent), FINISHED: finished_time(record, path)}


def parse_json(path: Path):
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise UnusableRecord("not UTF-8 text") from None
    except OSError as exc:
        raise UnusableRecord(f"cannot be read ({exc.strerror or type(exc).__name__})") from None
    if not text.strip():
        raise UnusableRecord("empty file")
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        place = f"line {exc.lineno} column {exc.colno}"
        # A writer killed mid-write leaves a prefix of a record: say so, it is the usual cause.
        if exc.pos >= len(text.rstrip()) or exc.msg.startswith("Unterminated string"):
            raise UnusableRecord(f"truncated: not valid JSON, the file ends mid-record ({place})") from None
        raise UnusableRecord(f"not valid JSON ({place})") from None


def json_kind(value) -> str:
    if value is None:
        return "null"
    return next((kind for cls, kind in JSON_KINDS if isinstance(value, cls)), type(value).__name__)


def is_teacher_cache(record: dict) -> bool:
    """Teacher and assistant caches name their `model` and keep per-epoch accuracies; runs name a method."""
    return "method" not in record and {"model", "epoch_acc"} <= record.keys()


def check_accuracy(record: dict, key: str) -> None:
    value = record.get(key)
    if value is None:
        raise UnusableRecord(f"completed but {key} is missing")
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value):
        raise UnusableRecord(f"completed but {key} is not a number ({json.dumps(value)[:40]})")


def finished_time(record: dict, path: Path) -> float:
    """When the run last wrote its record: its own timestamp if it has one (copies keep it), else the
    file's mtime (older records have no timestamp)."""
    for key in TIMESTAMP_KEYS:
        stamp = record.get(key)
        if isinstance(stamp, str):
            try:
                return datetime.fromisoformat(stamp).timestamp()
            except ValueError:
                pass
    return path.stat().st_mtime


def recorded_metric(done: pd.DataFrame) -> tuple[str, str | None]:
    """The statistic the runs record as `compare_metric` (what their recipe's paper reports) when they agree;
    else best_acc and the one line that says why."""
    if done.empty or RECORDED_METRIC not in done.columns:
        return DEFAULT_METRIC, None
    # Records from before the key existed were made under its default.
    recorded = done[RECORDED_METRIC].map(lambda v: DEFAULT_METRIC if is_missing(v) else str(v)).value_counts()
    if len(recorded) == 1 and recorded.index[0] in METRICS:
        return recorded.index[0], None
    counts = ", ".join(f"{value} ({n} run{'s' if n != 1 else ''})" for value, n in sorted(recorded.items()))
    return DEFAULT_METRIC, (f"{RECORDED_METRIC}: the runs record {counts}; the table shows {DEFAULT_METRIC}; "
                            f"choose with --metric {'|'.join(METRICS)}")


def identity_keys(columns) -> list[str]:
    """The keys that make a configuration: the fixed ones with the method's, dataset's and models' options
    (`method.*`, `dataset.*`, `teacher.*`, `student.*`) after beta."""
    options = sorted(c for c in columns if c == "transfer"
                     or c.startswith(("method.", "dataset.", "teacher.", "student.", "transfer.")))
    ordered = [*IDENTITY_KEYS[:7], *options, *IDENTITY_KEYS[7:]]
    return [key for key in ordered if key in columns]


def hashable(value):
    """Lists (assistant chains, layer lists) become `a+b` so that they group and match `--where` values;
    an empty list (no assistants) is a missing value."""
    if isinstance(value, (list, tuple)):
        return "+".join(str(v) for v in value) or None
    if isinstance(value, dict):
        return json.dumps(value, sort_keys=True)
    return value


def is_missing(value) -> bool:
    return value is None or (isinstance(value, float) and math.isnan(value))


# ---- repeats --------------------------------------------------------------------------------------------

def split_repeats(done: pd.DataFrame) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(runs to aggregate, repeats): of completed runs that share configuration and seed only the newest
    is kept, since a second run of one seed is not another sample. The repeats frame holds every run of
    each repeated configuration and seed (its REPEAT key), newest first, the kept one marked in KEPT."""
    if done.empty:
        return done, done.assign(**{REPEAT: pd.Series(dtype=str), KEPT: pd.Series(dtype=bool)})
    keys = identity_keys(done.columns)
    key = done.apply(lambda run: repeat_key(run, keys), axis=1)
    newest_first = done.assign(**{REPEAT: key}).sort_values(FINISHED, ascending=False, kind="stable")
    newest = ~newest_first.duplicated(REPEAT, keep="first")
    kept = done[newest.reindex(done.index)]
    repeated = newest_first[newest_first.duplicated(REPEAT, keep=False)]
    return kept, repeated.assign(**{KEPT: newest[repeated.index]})


def repeat_key(run: pd.Series, keys: list[str]) -> str:
    """The configuration hash and seed; for records written before the hash existed, the identity keys."""
    seed = plain(run.get("seed"))
    if not is_missing(run.get("config_hash")):
        return json.dumps(["config_hash", str(run["config_hash"]), seed], default=str)
    return json.dumps(["identity", *(plain(run.get(key)) for key in keys), seed], default=str)


def plain(value):
    """Missing values alike (None and NaN), 4.0 as 4, so that equal settings give equal keys."""
    if is_missing(value):
        return None
    if isinstance(value, float) and value.is_integer():
        return int(value)
    return value


def metric_order(metric: str) -> list[str]:
    """The accuracy statistics, the table's own first."""
    return [metric, *(m for m in METRICS if m != metric)]
