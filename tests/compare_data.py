"""Synthetic kdrun run records for the `kdrun compare` tests: ce and kd for two students x 3 seeds."""
from __future__ import annotations

import hashlib
import io
import json
from pathlib import Path

import pandas as pd
import pytest

from conftest import run_cli
from kdrun.compare import OUTCOME_KEYS

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"

# (method, student) -> best and last accuracy of seeds 0, 1, 2. Stds are the sample std (ddof=1).
ACCURACIES = {
    ("ce", "resnet8"): ([90.0, 91.0, 92.0], [89.0, 90.0, 91.0]),   # best 91 +- 1,  last 90 +- 1
    ("kd", "resnet8"): ([93.0, 94.0, 95.0], [92.0, 92.0, 95.0]),   # best 94 +- 1,  last 93 +- sqrt(3)
    ("ce", "resnet14"): ([92.0, 92.0, 92.0], [91.0, 91.0, 91.0]),  # best 92 +- 0,  last 91 +- 0
    ("kd", "resnet14"): ([93.0, 95.0, 97.0], [90.0, 90.0, 90.0]),  # best 95 +- 2,  last 90 +- 0
}
TEACHER_ACCS = [97.0, 98.0, 99.0]  # mean 98


def record(method: str, student: str, seed: int, **changes) -> dict:
    """A run record; its config_hash, as kdrun's, follows the configuration and seed (not the outcome)."""
    kd = method == "kd"
    rec = {
        "run_id": f"{method}_{student}_s{seed}", "status": "completed", "error": None, "method": method,
        "teacher": "resnet26" if kd else None, "student": student, "dataset": "digits", "seed": seed,
        "T": 4.0 if kd else None, "alpha": 0.9 if kd else None, "beta": None, "epochs": 3, "batch_size": 64,
        "lr": 0.05, "precision": "fp32", "teacher_epochs": 3 if kd else None,
        "teacher_acc": TEACHER_ACCS[seed % 3] if kd else None, "teacher_source": "trained" if kd else None,
        "teacher_sha256": None, "best_acc": None, "best_epoch": 3, "last_acc": None, "wall_s": 1.0,
        "device": "cpu", "run_dir": "/elsewhere", **changes,
    }
    configuration = {key: value for key, value in rec.items() if key not in OUTCOME_KEYS}
    return {"config_hash": hashlib.sha256(json.dumps(configuration, sort_keys=True).encode()).hexdigest()[:16],
            **rec}


def write_run(root: Path, rec: dict, curve: list[float] | None = None, stages: list[str] | None = None) -> Path:
    run_dir = root / "runs" / rec["run_id"]
    run_dir.mkdir(parents=True)
    (run_dir / "result.json").write_text(json.dumps(rec))
    curve = curve or [rec["best_acc"] or 0.0] * 3
    stages = stages or ["main"] * len(curve)
    pd.DataFrame({"stage": stages, "epoch": range(1, len(curve) + 1), "test_acc": curve}).to_csv(
        run_dir / "metrics.csv", index=False)
    return run_dir


@pytest.fixture
def results(tmp_path) -> Path:
    """ce and kd for two students x 3 seeds, a failed and a running run, and a teacher cache to skip."""
    root = tmp_path / "results"
    for (method, student), (bests, lasts) in ACCURACIES.items():
        for seed, (best, last) in enumerate(zip(bests, lasts)):
            write_run(root, record(method, student, seed, best_acc=best, last_acc=last),
                      curve=[best - 20, best - 5, last])
    write_run(root, record("kd", "resnet8", 3, status="failed", error="RuntimeError: boom"))
    write_run(root, record("kd", "resnet8", 4, status="running", best_acc=10.0, last_acc=10.0))
    cache = root / "teachers" / "resnet26_digits_abc"
    cache.mkdir(parents=True)
    (cache / "result.json").write_text(json.dumps(record("kd", "resnet8", 9, best_acc=0.0, last_acc=0.0)))
    return root


def compare(capsys, *args: str) -> tuple[int, str, str]:
    code = run_cli("compare", *args)
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def compare_csv(capsys, *args: str) -> pd.DataFrame:
    code, out, _ = compare(capsys, *args, "--format", "csv")
    assert code == 0
    return pd.read_csv(io.StringIO(out))


def row(table: pd.DataFrame, **keys) -> pd.Series:
    match = table
    for key, value in keys.items():
        match = match[match[key] == value]
    assert len(match) == 1, keys
    return match.iloc[0]


def rerun(root: Path, rec: dict, name: str, best: float, **changes) -> Path:
    """Another run of the configuration and seed of `rec`, in its own directory."""
    return write_run(root, {**rec, "run_id": name, "best_acc": best, "last_acc": best, **changes})
