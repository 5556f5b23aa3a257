"""`kdrun compare` on synthetic result.json / metrics.csv files (no training)."""
from __future__ import annotations

import io
import json
import re
from pathlib import Path

import pandas as pd
import pytest

from conftest import run_cli
from kdrun.compare import detect_group_keys, load_runs
from kdrun.plots import curves_chart, read_curve

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
    kd = method == "kd"
    return {
        "run_id": f"{method}_{student}_s{seed}", "status": "completed", "error": None, "method": method,
        "teacher": "resnet26" if kd else None, "student": student, "dataset": "digits", "seed": seed,
        "T": 4.0 if kd else None, "alpha": 0.9 if kd else None, "beta": None, "epochs": 3, "batch_size": 64,
        "lr": 0.05, "precision": "fp32", "teacher_epochs": 3 if kd else None,
        "teacher_acc": TEACHER_ACCS[seed % 3] if kd else None, "teacher_source": "trained" if kd else None,
        "teacher_sha256": None, "best_acc": None, "best_epoch": 3, "last_acc": None, "wall_s": 1.0,
        "device": "cpu", "config_hash": f"{method}{student}{seed}", "run_dir": "/elsewhere", **changes,
    }


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


def test_means_stds_n_teacher_and_delta(results, capsys):
    table = compare_csv(capsys, str(results))
    assert list(table.columns[:3]) == ["method", "teacher", "student"]  # T, alpha only repeat kd vs ce
    assert len(table) == 4
    kd8 = row(table, method="kd", student="resnet8")
    assert kd8["n"] == 3  # the failed and the running seed stay out
    assert kd8["best_acc_mean"] == pytest.approx(94.0) and kd8["best_acc_std"] == pytest.approx(1.0)
    assert kd8["last_acc_mean"] == pytest.approx(93.0) and kd8["last_acc_std"] == pytest.approx(3 ** 0.5)
    assert kd8["teacher_acc_mean"] == pytest.approx(98.0)
    assert kd8["delta_best_acc"] == pytest.approx(94.0 - 91.0)
    kd14 = row(table, method="kd", student="resnet14")
    assert kd14["best_acc_std"] == pytest.approx(2.0) and kd14["delta_best_acc"] == pytest.approx(95.0 - 92.0)
    ce8 = row(table, method="ce", student="resnet8")
    assert ce8["delta_best_acc"] == pytest.approx(0.0) and pd.isna(ce8["teacher_acc_mean"])
    assert pd.isna(ce8["teacher"])


def test_default_order_is_by_keys_and_sort_is_by_metric(results, capsys):
    by_keys = compare_csv(capsys, str(results))
    assert list(zip(by_keys["method"], by_keys["student"])) == [
        ("ce", "resnet8"), ("ce", "resnet14"), ("kd", "resnet8"), ("kd", "resnet14")]  # natural order
    best_first = compare_csv(capsys, str(results), "--sort")
    assert best_first["best_acc_mean"].tolist() == [95.0, 94.0, 92.0, 91.0]
    last_first = compare_csv(capsys, str(results), "--sort", "--metric", "last_acc")
    assert last_first["last_acc_mean"].tolist() == [93.0, 91.0, 90.0, 90.0]


def test_metric_drives_the_delta(results, capsys):
    table = compare_csv(capsys, str(results), "--metric", "last_acc")
    assert "delta_best_acc" not in table.columns
    assert row(table, method="kd", student="resnet14")["delta_last_acc"] == pytest.approx(90.0 - 91.0)
    assert row(table, method="kd", student="resnet8")["delta_last_acc"] == pytest.approx(93.0 - 90.0)


def test_where_selects_and_keeps_the_baseline_for_the_delta(results, capsys):
    kd_only = compare_csv(capsys, str(results), "--where", "method=kd")
    assert list(kd_only.columns[:2]) == ["student", "n"]  # only the student varies among kd runs
    assert kd_only["best_acc_mean"].tolist() == [94.0, 95.0]
    assert row(kd_only, student="resnet8")["delta_best_acc"] == pytest.approx(3.0)
    one = compare_csv(capsys, str(results), "--where", "method=kd", "--where", "student=resnet8")
    assert list(one.columns[:4]) == ["method", "teacher", "student", "dataset"]  # nothing varies: who is it
    assert one["n"].tolist() == [3] and one["best_acc_mean"].tolist() == [94.0]
    either = compare_csv(capsys, str(results), "--where", "student=resnet8,resnet14", "--where", "T=4")
    assert either["best_acc_mean"].tolist() == [94.0, 95.0]
    seed2 = compare_csv(capsys, str(results), "--where", "seed=2", "--where", "method=kd")
    assert row(seed2, student="resnet8")["delta_best_acc"] == pytest.approx(95.0 - 92.0)  # ce seed 2 only
    no_teacher = compare_csv(capsys, str(results), "--where", "teacher=null")
    assert no_teacher["best_acc_mean"].tolist() == [91.0, 92.0]


def test_by_groups_by_exactly_the_given_keys(results, capsys):
    table = compare_csv(capsys, str(results), "--by", "method")
    assert list(table.columns[:2]) == ["method", "n"]
    ce = row(table, method="ce")
    assert ce["n"] == 6
    assert ce["best_acc_mean"] == pytest.approx((90 + 91 + 92 + 3 * 92) / 6)
    assert ce["best_acc_std"] == pytest.approx(pd.Series([90, 91, 92, 92, 92, 92]).std())
    assert pd.isna(ce["delta_best_acc"])  # two students in one row: no single baseline


def test_detected_keys_follow_what_varies(tmp_path):
    root = tmp_path / "sweep"
    for seed in range(2):
        write_run(root, record("ce", "resnet8", seed, best_acc=90.0, last_acc=90.0))
        for T in (2.0, 4.0):
            write_run(root, record("kd", "resnet8", seed, run_id=f"kd_T{T}_s{seed}", T=T, best_acc=91.0,
                                   last_acc=91.0, **{"method.extra": [1, 2]}))
    runs = load_runs([str(root)])
    assert detect_group_keys(runs) == ["method", "teacher", "T"]
    assert detect_group_keys(runs[runs["method"] == "kd"]) == ["T"]
    assert detect_group_keys(runs[runs["T"] != 4.0]) == ["method", "teacher"]  # ce and kd with T=2
    assert detect_group_keys(runs[runs["T"] == 4.0].iloc[:1]) == ["method", "teacher", "student", "dataset"]


def test_list_values_group_and_match(tmp_path, capsys):
    root = tmp_path / "ta"
    for seed in range(2):
        for chain in ([], ["resnet20"], ["resnet20", "resnet14"]):
            write_run(root, record("kd", "resnet8", seed, run_id=f"ta{len(chain)}_s{seed}", assistants=chain,
                                   best_acc=90.0 + len(chain) + seed, last_acc=90.0))
    table = compare_csv(capsys, str(root))
    assert table["assistants"].fillna("-").tolist() == ["resnet20", "resnet20+resnet14", "-"]  # missing last
    assert table["n"].tolist() == [2, 2, 2] and table["best_acc_mean"].tolist() == [91.5, 92.5, 90.5]
    chosen = compare_csv(capsys, str(root), "--where", "assistants=resnet20+resnet14")
    assert chosen["best_acc_mean"].tolist() == [92.5]


def test_failed_and_running_runs_are_listed_apart(results, capsys, monkeypatch):
    monkeypatch.setenv("COLUMNS", "200")
    code, out, err = compare(capsys, str(results))
    assert code == 0 and err == ""
    main, left_out = out.split("left out of the means")
    assert "1 failed, 1 running" in left_out
    assert "kd_resnet8_s3" in left_out and "RuntimeError: boom" in left_out and "kd_resnet8_s4" in left_out
    assert "kd_resnet8_s3" not in main and "94.00 ± 1.00" in main and "+3.00" in main
    code, out, _ = compare(capsys, str(results), "--where", "status=failed,running")
    assert code == 0 and out.startswith("no completed run matches") and "kd_resnet8_s3" in out
    # Machine-readable formats keep stdout clean: the list goes to stderr.
    code, out, err = compare(capsys, str(results), "--format", "csv")
    assert "boom" not in out and "boom" in err and "kd_resnet8_s4" in err


def test_markdown_and_latex(results, capsys):
    code, out, _ = compare(capsys, str(results), "--format", "markdown")
    lines = out.splitlines()
    assert code == 0 and len(lines) == 2 + 4
    assert lines[0].startswith("| method | teacher | student | n | best acc")
    assert re.fullmatch(r"\|( -+:? \|)+", lines[1])
    assert "| kd | resnet26 | resnet8 | 3 | 94.00 ± 1.00 | 93.00 ± 1.73 | 98.00 | +3.00 |" in lines
    code, out, _ = compare(capsys, str(results), "--format", "latex")
    assert code == 0 and "\\begin{tabular}" in out and "\\end{tabular}" in out
    assert "kd & resnet26 & resnet8 & 3 & 94.00 ± 1.00" in out and "delta best vs ce" in out


@pytest.mark.parametrize("fmt", ["csv", "markdown", "latex", "table"])
def test_out_writes_the_file(results, capsys, tmp_path, fmt):
    target = tmp_path / "out" / f"table.{fmt}"
    code, out, err = compare(capsys, str(results), "--format", fmt, "--out", str(target))
    assert code == 0 and str(target) in err and "94.00" not in out
    text = target.read_text()
    if fmt == "csv":
        assert row(pd.read_csv(target), method="kd", student="resnet8")["best_acc_mean"] == pytest.approx(94.0)
    else:
        assert "94.00 ± 1.00" in text


def test_plots_are_written(results, capsys, tmp_path):
    bar, curves = tmp_path / "plots" / "bar.png", tmp_path / "plots" / "curves.png"
    code, _, _ = compare(capsys, str(results), "--plot", str(bar), "--curves", str(curves))
    assert code == 0
    for path in (bar, curves):
        data = path.read_bytes()
        assert data.startswith(PNG_SIGNATURE) and len(data) > 10_000


def test_curves_average_the_seeds_found_beside_each_result(results, tmp_path):
    runs = load_runs([str(results)])
    done = runs[runs["status"] == "completed"]
    dirs = [done[done["method"] == method]["_dir"].tolist() for method in ("ce", "kd")]
    assert len(dirs[1]) == 6  # run_dir in the records points elsewhere: the files beside result.json count
    assert curves_chart(tmp_path / "curves.png", ["ce", "kd"], dirs) == 2
    assert curves_chart(tmp_path / "none.png", ["gone"], [[str(tmp_path / "missing")]]) == 0
    assert (tmp_path / "none.png").read_bytes().startswith(PNG_SIGNATURE)


def test_curves_read_the_final_stage(tmp_path):
    run_dir = write_run(tmp_path, record("kd", "resnet8", 0, best_acc=80.0), curve=[10.0, 20.0, 50.0, 80.0],
                        stages=["hint", "hint", "main", "main"])
    curve = read_curve(run_dir)
    assert curve["epoch"].tolist() == [3, 4] and curve["test_acc"].tolist() == [50.0, 80.0]


@pytest.mark.parametrize("args, says", [
    (["{missing}"], "does not exist"),
    (["{empty}"], "no run result.json"),
    (["{results}", "--where", "colour=red"], "unknown key colour; allowed:"),
    (["{results}", "--where", "method"], "expected KEY=VALUE"),
    (["{results}", "--where", "method=kdd"], "values present: ce, kd"),
    (["{results}", "--by", "method,colour"], "unknown key colour; allowed:"),
    (["{results}", "--metric", "top1"], "--metric: invalid choice: 'top1' (choose from"),
    (["{results}", "--format", "xml"], "--format: invalid choice: 'xml' (choose from"),
    (["{results}", "--plot", "bar.jpg"], "allowed: .png, .pdf, .svg"),
    (["{results}", "--where", "status=failed", "--curves", "c.png"], "nothing to plot"),
])
def test_bad_input_is_one_line_and_exit_2(results, tmp_path, capsys, args, says):
    (tmp_path / "empty").mkdir()
    paths = {"missing": tmp_path / "nope", "empty": tmp_path / "empty", "results": results}
    code, out, err = compare(capsys, *(arg.format(**paths) for arg in args))
    assert code == 2 and out == ""
    assert len(err.strip().splitlines()) == 1 and says in err
