"""`kdrun compare` on synthetic result.json / metrics.csv files (no training): the table, its formats and plots."""
from __future__ import annotations

import io
import math
import re

import pandas as pd
import pytest
from matplotlib.container import ErrorbarContainer

from compare_data import (PNG_SIGNATURE, compare, compare_csv, record, rerun, results,  # noqa: F401
                          row, write_run)
from conftest import run_cli
from kdrun import plots
from kdrun.compare import detect_group_keys
from kdrun.compare_records import load_runs
from kdrun.plots import accuracy_axis, bar_chart, curves_chart, read_curve


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
    assert list(table.columns[4:8]) == ["last_acc_mean", "last_acc_std", "best_acc_mean", "best_acc_std"]


@pytest.mark.parametrize("metric, statistic, columns, bold", [
    ("best_acc", "best-epoch accuracy", ["best acc", "last acc"], ("kd", "resnet14")),  # best 95
    ("last_acc", "last-epoch accuracy", ["last acc", "best acc"], ("kd", "resnet8")),   # last 93
])
def test_metric_drives_title_columns_and_bold_row(results, capsys, monkeypatch, metric, statistic, columns, bold):
    from kdrun import compare_render as compare_module

    tables, draw = [], compare_module.rich_table
    monkeypatch.setattr(compare_module, "rich_table", lambda *args: tables.append(draw(*args)) or tables[-1])
    code, out, _ = compare(capsys, str(results), "--metric", metric)
    table = tables[0]
    assert code == 0 and table.title.startswith(f"kdrun compare: {statistic} ({metric}), 4 configurations")
    assert statistic in out
    headers = [column.header for column in table.columns]
    assert headers[4:6] == columns and headers[-1] == f"Δ {metric.removesuffix('_acc')} vs ce"
    cells = {(table.columns[0]._cells[i], table.columns[2]._cells[i]): r.style for i, r in enumerate(table.rows)}
    assert [key for key, style in cells.items() if style == "bold"] == [bold]
    _, out, _ = compare(capsys, str(results), "--metric", metric, "--format", "markdown")
    assert out.splitlines()[0].startswith(f"| method | teacher | student | n | {columns[0]} | {columns[1]} |")


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
    # pdflatex typesets neither a raw ± nor a raw Δ
    assert "kd & resnet26 & resnet8 & 3 & 94.00 $\\pm$ 1.00 & 93.00 $\\pm$ 1.73" in out
    assert "±" not in out and "Δ" not in out and "delta best vs ce" in out


@pytest.mark.parametrize("fmt", ["csv", "markdown", "latex", "table"])
def test_out_writes_the_file(results, capsys, tmp_path, fmt):
    target = tmp_path / "out" / f"table.{fmt}"
    code, out, err = compare(capsys, str(results), "--format", fmt, "--out", str(target))
    assert code == 0 and str(target) in err and "94.00" not in out
    text = target.read_text()
    if fmt == "csv":
        assert row(pd.read_csv(target), method="kd", student="resnet8")["best_acc_mean"] == pytest.approx(94.0)
    else:
        assert ("94.00 $\\pm$ 1.00" if fmt == "latex" else "94.00 ± 1.00") in text


def test_plots_are_written(results, capsys, tmp_path, monkeypatch):
    drawn = []
    monkeypatch.setattr(plots, "bar_chart", lambda *args: drawn.append(args) or bar_chart(*args))
    bar, curves = tmp_path / "plots" / "bar.png", tmp_path / "plots" / "curves.png"
    code, _, _ = compare(capsys, str(results), "--plot", str(bar), "--curves", str(curves))
    assert code == 0
    for path in (bar, curves):
        data = path.read_bytes()
        assert data.startswith(PNG_SIGNATURE) and len(data) > 10_000
    _, labels, means, _, ns, *_ = drawn[0]
    assert ns == [3, 3, 3, 3] and means[labels.index("kd, resnet26, resnet8")] == pytest.approx(94.0)


@pytest.mark.parametrize("lows, highs", [([99.3], [99.4]), ([93.0, 93.1], [93.0, 93.1]), ([80.0], [99.0])])
def test_bar_chart_axis_starts_low_enough_to_be_honest(lows, highs):
    start, end = accuracy_axis(lows, highs)
    assert start <= min(lows) - 1.0 and start == round(start)  # a round number, a point or more below
    # Longest over shortest bar: at most 2, and a 0.1-point difference at most 1.1 (not a bar many times another).
    ratio = (max(highs) - start) / (min(lows) - start)
    assert ratio <= 2 and ratio <= 1 + (max(highs) - min(lows)) + 1e-9
    assert max(highs) < end <= 100.0


def test_bar_chart_axis_starts_at_zero_for_far_apart_values_and_ends_at_100():
    assert accuracy_axis([30.0, 90.0], [40.0, 95.0])[0] == 0.0
    assert accuracy_axis([97.0], [100.0])[1] == 100.0


def test_bar_chart_marks_the_zoom_shows_n_and_stays_within_100(tmp_path):
    figure = bar_chart(tmp_path / "bar.png", ["ce", "kd", "kd, T=2"], [99.35, 99.9, 99.5], [0.16, 0.3, math.nan],
                       [3, 3, 1], "best_acc", [True, False, False])
    axes = figure.axes[0]
    start, end = axes.get_xlim()
    assert 0 < start < 99.35 - 0.16 and end == 100.0
    assert f"axis starts at {start:g}, not 0" in axes.get_xlabel()
    bars = next(c for c in axes.containers if isinstance(c, ErrorbarContainer))
    error_bars = bars.lines[2][0].get_segments()
    assert max(x for segment in error_bars for x, _ in segment) == pytest.approx(100.0)  # 99.9 + 0.3 clipped
    values = axes.child_axes[0].get_yticklabels()
    assert [v.get_text() for v in values] == ["99.35 ± 0.16 (n=3)", "99.90 ± 0.30 (n=3)", "99.50 (n=1)"]
    renderer = figure.canvas.get_renderer()
    figure.draw(renderer)
    assert all(figure.bbox.contains(*corner) for v in values for corner in v.get_window_extent(renderer).corners())


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


def test_table_cells_never_fold_in_a_narrow_terminal(results, capsys, monkeypatch):
    monkeypatch.setenv("COLUMNS", "40")
    rerun(results, record("kd", "wide_resnet_16_2_long_name", 0), "wide", 90.0)
    code, out, _ = compare(capsys, str(results))
    main = out.split("left out of the means")[0]
    assert code == 0 and "…" not in main
    lines = main.splitlines()
    for cell in ("94.00 ± 1.00", "93.00 ± 1.73", "wide_resnet_16_2_long_name", "resnet26", "+3.00"):
        assert any(cell in line for line in lines), cell


def test_the_baseline_shares_the_students_options(tmp_path, capsys):
    """A no-residual kd student is compared with the no-residual ce baseline, not with both ce variants."""
    root = tmp_path / "results"
    for seed, (residual, method, acc) in enumerate([(True, "ce", 95.0), (False, "ce", 90.0), (False, "kd", 92.0)]):
        write_run(root, record(method, "resnet20", seed, best_acc=acc, last_acc=acc, **{"student.residual": residual},
                               run_id=f"{method}_{residual}", config_hash=f"{method}{residual}"))
    code = run_cli("compare", str(root), "--format", "csv")
    table = pd.read_csv(io.StringIO(capsys.readouterr().out))
    kd = table[table["method"] == "kd"].iloc[0]
    assert code == 0 and kd["delta_best_acc"] == pytest.approx(2.0)
