"""`kdrun compare` and the records it reads: unreadable files listed with their reason, repeats of one
configuration and seed counted once (the newest kept)."""
from __future__ import annotations

import json
import os
from pathlib import Path

import pandas as pd
import pytest

from compare_data import compare, compare_csv, record, rerun, results, row  # noqa: F401


# ---- corrupt files, repeats, unfolded cells -------------------------------------------------------------

def write_file(root: Path, name: str, content: str | bytes) -> Path:
    path = root / "runs" / name / "result.json"
    path.parent.mkdir(parents=True)
    path.write_bytes(content if isinstance(content, bytes) else content.encode())
    return path


CUT = "truncated: not valid JSON, the file ends mid-record"
CORRUPT = {  # run directory -> (result.json content, the reason compare gives)
    "syntax": ('{"status": "completed" "method": "kd"}', "not valid JSON (line 1 column 24)"),
    "cut": (json.dumps(record("kd", "resnet8", 5, best_acc=93.0))[:60], f"{CUT} (line 1 column 47)"),
    "cut_between": ('{"status": "completed", ', f"{CUT} (line 1 column 25)"),
    "empty": ("", "empty file"),
    "latin1": (b'{"student": "r\xe9snet8"}', "not UTF-8 text"),
    "array": ("[1, 2]", "not a JSON object (an array)"),
    "partial": ('{"method": "kd"}', "missing keys: status, student"),
    "no_acc": (json.dumps(record("kd", "resnet8", 6)), "completed but best_acc is missing"),
    "text_acc": (json.dumps(record("kd", "resnet8", 7, best_acc="high")),
                 'completed but best_acc is not a number ("high")'),
}


def test_unreadable_files_are_listed_with_their_reason(results, capsys, monkeypatch):
    monkeypatch.setenv("COLUMNS", "200")
    paths = {name: write_file(results, name, content) for name, (content, _) in CORRUPT.items()}
    cache = results / "teachers" / "broken"
    cache.mkdir()
    (cache / "result.json").write_text("{not json")  # a teacher cache: not a run, skipped silently
    code, out, err = compare(capsys, str(results))
    assert code == 0 and err == ""
    main, listing = out.split("unreadable result.json, left out: 9 files")
    assert "94.00 ± 1.00" in main and "runs/syntax" not in main
    for name, (_, reason) in CORRUPT.items():
        assert f"{paths[name]}: {reason}" in listing
    assert "broken" not in out
    # Machine-readable formats: stdout stays the data, the listing goes to stderr.
    table = compare_csv(capsys, str(results))
    assert row(table, method="kd", student="resnet8")["n"] == 3
    _, out, err = compare(capsys, str(results), "--format", "csv")
    assert "unreadable" not in out and f"{paths['partial']}: missing keys: status, student" in err


def test_only_unreadable_files_is_a_one_line_error(tmp_path, capsys):
    for name in ("array", "partial"):
        write_file(tmp_path, name, CORRUPT[name][0])
    code, out, err = compare(capsys, str(tmp_path))
    assert code == 2 and out == "" and len(err.strip().splitlines()) == 1
    assert "all 2 run result.json files below" in err and "cannot be used" in err and "(and 1 more)" in err
    assert "not a JSON object (an array)" in err and "no run result.json" not in err


def test_a_directory_of_teacher_caches_holds_no_runs(tmp_path, capsys):
    cache = tmp_path / "teachers" / "resnet26_digits_abc"
    cache.mkdir(parents=True)
    (cache / "result.json").write_text(json.dumps({"model": "resnet26", "dataset": "digits", "status": "completed",
                                                   "test_acc": 97.0, "best_acc": 97.0, "epoch_acc": [90.0, 97.0]}))
    code, _, err = compare(capsys, str(tmp_path / "teachers"))
    assert code == 2 and "no run result.json below" in err


def test_repeats_count_once_and_the_newest_is_kept(results, capsys, monkeypatch):
    monkeypatch.setenv("COLUMNS", "200")
    # The fixture's kd resnet8 seed 0 (94.0) has no timestamp: its file's mtime (now) orders it.
    kd0 = record("kd", "resnet8", 0, best_acc=93.0, last_acc=92.0)
    newer = rerun(results, kd0, "kd_resnet8_s0_again", 99.0, finished_at="2999-05-02T10:00:00")
    older = rerun(results, kd0, "kd_resnet8_s0_before", 50.0, finished_at="2024-04-01T10:00:00+00:00")
    rerun(results, kd0, "kd_resnet8_s0_failed", 0.0, status="failed", error="OOM", finished_at="2999-06-01T10:00:00")
    rerun(results, record("kd", "resnet8", 0, T=2.0), "kd_T2_s0", 80.0)  # another configuration: no repeat
    rerun(results, record("ce", "resnet8", 0), "ce_resnet8_s0_again", 96.0, updated_at="2999-01-01T00:00:00")
    table = compare_csv(capsys, str(results))
    kd8 = row(table, method="kd", student="resnet8", T=4)
    assert kd8["n"] == 3 and kd8["best_acc_mean"] == pytest.approx((99.0 + 94.0 + 95.0) / 3)
    assert row(table, method="kd", student="resnet8", T=2)["n"] == 1
    ce8 = row(table, method="ce", student="resnet8")
    assert ce8["n"] == 3 and ce8["best_acc_mean"] == pytest.approx((96.0 + 91.0 + 92.0) / 3)
    assert kd8["delta_best_acc"] == pytest.approx(kd8["best_acc_mean"] - ce8["best_acc_mean"])  # baseline too
    code, out, _ = compare(capsys, str(results))
    main, notes = out.split("left out of the means")
    assert "n counts each seed once" in main
    heading = next(line for line in notes.splitlines() if line.startswith("repeats"))
    assert heading.startswith("repeats (same configuration and seed; the newest is kept): ")
    assert "2 of ce, resnet8, seed 0" in heading and "3 of kd, resnet26, resnet8, T=4, seed 0" in heading
    listed = [(line.split()[0], line.split()[-1]) for line in notes.splitlines() if "runs/kd_resnet8_s0" in line]
    assert listed == [("kept", str(newer)), ("left", str(results / "runs" / "kd_resnet8_s0")), ("left", str(older))]
    assert "kd_resnet8_s0_failed" in notes.split("repeats")[0]  # a failed rerun is left out, it is no repeat


def test_running_one_command_twice_is_one_seed(tmp_path, capsys):
    """Repeats without config_hash or timestamps (older records): identity keys and seed, newest by mtime."""
    first = record("ce", "resnet8", 0, best_acc=90.0, last_acc=90.0)
    del first["config_hash"]
    older = rerun(tmp_path, first, "ce_s0", 90.0)
    newer = rerun(tmp_path, first, "ce_s0_2", 91.0)
    os.utime(older / "result.json", (1_000_000, 1_000_000))
    os.utime(newer / "result.json", (2_000_000, 2_000_000))
    table = compare_csv(capsys, str(tmp_path))
    assert table["n"].tolist() == [1] and table["best_acc_mean"].tolist() == [91.0]
    assert pd.isna(table["best_acc_std"].iloc[0])
    code, out, _ = compare(capsys, str(tmp_path), "--format", "markdown")
    assert "| 1 | 91.00 |" in out and "± 0.00" not in out
