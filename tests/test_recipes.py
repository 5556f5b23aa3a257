"""The shipped recipes follow their official code (RepDistiller, mdistiller, TAKD), and `kdrun compare` shows
the statistic a recipe's paper reports (result.json's compare_metric) unless --metric says otherwise."""
from __future__ import annotations

import io
import json
from pathlib import Path

import pandas as pd
import pytest

from conftest import compose_config, run_cli
from kdrun.experiment import base_record
from kdrun.schedule import lr_factor
from compare_data import ACCURACIES, record, write_run

REPDISTILLER = "+experiment=repdistiller_cifar100"
TAKD = "+experiment=takd_cifar100"


# ---- RepDistiller: lr per model family, for students and teachers ---------------------------------------

@pytest.mark.parametrize("student, lr", [("resnet8x4", 0.05), ("wrn_16_2", 0.05), ("mobilenetv2", 0.01),
                                         ("mobilenetv2_half", 0.01), ("shufflenetv1", 0.01), ("shufflenetv2", 0.01)])
def test_repdistiller_student_lr_follows_the_student(student, lr):
    cfg = compose_config(REPDISTILLER, f"student={student}")
    assert cfg.optim.lr == lr
    assert cfg.teacher.lr == 0.05  # resnet32x4: train_teacher.py's 0.05, whatever the student's lr


@pytest.mark.parametrize("teacher, lr", [("resnet32x4", 0.05), ("shufflenetv2", 0.01), ("shufflenetv1", 0.01),
                                         ("mobilenetv2", 0.01), ("vgg13", 0.05)])
def test_repdistiller_teacher_lr_follows_the_teacher(teacher, lr):
    cfg = compose_config(REPDISTILLER, f"teacher={teacher}", "student=resnet8x4")
    assert cfg.teacher.lr == lr and cfg.optim.lr == 0.05


def test_explicit_values_win_over_the_recipe():
    cfg = compose_config(REPDISTILLER, "student=mobilenetv2", "optim.lr=0.02", "teacher.lr=0.03")
    assert (cfg.optim.lr, cfg.teacher.lr) == (0.02, 0.03)
    cfg = compose_config(REPDISTILLER, "method=dkd", "teacher=resnet56", "student=resnet20", "method.dkd_beta=3")
    assert cfg.method.dkd_beta == 3


# ---- mdistiller's DKD beta per pair (configs/cifar100/dkd/*.yaml) ---------------------------------------

@pytest.mark.parametrize("teacher, student, beta", [
    ("resnet32x4", "resnet8x4", 8.0), ("resnet56", "resnet20", 2.0), ("resnet110", "resnet32", 2.0),
    ("wrn_40_2", "wrn_16_2", 6.0), ("wrn_40_2", "wrn_40_1", 6.0), ("vgg13", "vgg8", 6.0),
    ("vgg13", "mobilenetv2_half", 6.0), ("resnet32x4", "shufflenetv2", 8.0), ("resnet50", "mobilenetv2", 8.0),
    ("wrn_40_2", "shufflenetv1", 8.0),
])
def test_dkd_beta_is_mdistillers_for_the_pair(teacher, student, beta):
    cfg = compose_config(REPDISTILLER, "method=dkd", f"teacher={teacher}", f"student={student}")
    assert cfg.method.dkd_beta == beta
    assert cfg.optim.lr == (0.01 if "mobilenet" in student or "shufflenet" in student else 0.05)  # mdistiller's LR


def test_other_methods_get_no_dkd_beta():
    assert compose_config(REPDISTILLER, "method=kd", "teacher=resnet56", "student=resnet20").method.dkd_beta is None


# ---- TAKD's train.py --------------------------------------------------------------------------------------

def test_takd_recipe_is_the_authors_protocol():
    cfg = compose_config(TAKD)
    assert (cfg.teacher.name, list(cfg.assistants), cfg.student.name, cfg.dataset.name) == (
        "resnet110", ["resnet20"], "resnet8", "cifar100")
    assert (cfg.epochs, cfg.batch_size) == (160, 128)
    assert (cfg.optim.name, cfg.optim.momentum, cfg.optim.nesterov, cfg.optim.weight_decay) == ("sgd", 0.9, False, 1e-4)
    assert cfg.optim.lr == 0.01 and cfg.teacher.lr == 0.01  # the teacher and the assistant train alike
    assert (cfg.method.name, cfg.method.T, cfg.method.alpha, cfg.method.kl_reduction) == ("kd", 5.0, 0.15, "mean")
    assert cfg.method.ce_weight is None  # (1 - lambda) CE
    assert cfg.compare_metric == "best_acc"
    # adjust_learning_rate: 0.01 until epoch int(160 * 3/4) = 120 (0-based), 0.001 from there on.
    factor = lr_factor(cfg.sched, cfg.epochs, steps_per_epoch=1)
    assert [factor(epoch) for epoch in (0, 119, 120, 159)] == [1.0, 1.0, pytest.approx(0.1), pytest.approx(0.1)]


def test_takd_direct_kd_is_one_override_away():
    cfg = compose_config(TAKD, "assistants=[]", "method.T=2", "method.alpha=0.2")
    assert (list(cfg.assistants), cfg.method.T, cfg.method.alpha, cfg.epochs) == ([], 2, 0.2, 160)


# ---- what a run records, and what compare makes of it ---------------------------------------------------

@pytest.mark.parametrize("overrides, metric", [((), "best_acc"), ((REPDISTILLER,), "last_acc"), ((TAKD,), "best_acc"),
                                               ((REPDISTILLER, "compare_metric=best_acc"), "best_acc")])
def test_runs_record_the_recipes_compare_metric(overrides, metric, tmp_path):
    cfg = compose_config(*overrides, "method=dkd", "teacher=resnet56", "student=resnet20")
    rec = base_record(cfg, tmp_path / "run", "cpu")
    assert rec["compare_metric"] == metric
    if overrides[:1] == (REPDISTILLER,):
        assert rec["method.dkd_beta"] == 2.0 and rec["lr"] == 0.05


@pytest.mark.slow
def test_a_recipe_run_through_the_cli_resolves_and_records(kdrun):
    code, records = kdrun(REPDISTILLER, "dataset=digits", "method=dkd", "teacher=resnet56", "student=resnet20")
    assert code == 0 and len(records) == 1
    rec = records[0]
    assert (rec["status"], rec["method.dkd_beta"], rec["lr"], rec["compare_metric"]) == ("completed", 2.0, 0.05,
                                                                                         "last_acc")


def recorded_results(root: Path, metric_of) -> Path:
    """The ACCURACIES runs of test_compare, each recording compare_metric `metric_of(student)` (None: no key)."""
    for (method, student), (bests, lasts) in ACCURACIES.items():
        for seed, (best, last) in enumerate(zip(bests, lasts)):
            extra = {} if metric_of(student) is None else {"compare_metric": metric_of(student)}
            write_run(root, record(method, student, seed, best_acc=best, last_acc=last, **extra))
    return root


def compare(capsys, *args: str) -> tuple[int, str, str]:
    code = run_cli("compare", *args)
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_compare_defaults_to_the_recorded_metric(tmp_path, capsys):
    root = str(recorded_results(tmp_path, lambda student: "last_acc"))
    code, out, err = compare(capsys, root, "--format", "csv", "--sort")
    table = pd.read_csv(io.StringIO(out))
    assert code == 0 and err == "" and "delta_best_acc" not in table.columns
    assert table["last_acc_mean"].tolist() == [93.0, 91.0, 90.0, 90.0]  # sorted by last accuracy
    assert list(table.columns[4:6]) == ["last_acc_mean", "last_acc_std"]
    code, out, _ = compare(capsys, root)
    assert "kdrun compare: last-epoch accuracy (last_acc)" in out and "Δ last vs ce" in out
    code, out, _ = compare(capsys, root, "--metric", "best_acc")  # --metric wins over the record
    assert "kdrun compare: best-epoch accuracy (best_acc)" in out and "compare_metric:" not in out


def test_compare_plots_the_recorded_metric(tmp_path, capsys, monkeypatch):
    from kdrun import plots

    drawn = []
    monkeypatch.setattr(plots, "bar_chart", lambda *args: drawn.append(args))
    root = str(recorded_results(tmp_path / "results", lambda student: "last_acc"))
    assert compare(capsys, root, "--plot", str(tmp_path / "bar.png"))[0] == 0
    _, labels, means, _, _, metric, _ = drawn[0]
    assert metric == "last_acc" and means[labels.index("kd, resnet26, resnet14")] == pytest.approx(90.0)


def test_runs_that_disagree_fall_back_to_best_acc_in_one_line(tmp_path, capsys):
    # resnet8 runs from the RepDistiller recipe (last_acc), resnet14 runs from before the key existed.
    root = str(recorded_results(tmp_path, lambda student: "last_acc" if student == "resnet8" else None))
    code, out, err = compare(capsys, root)
    notes = [line for line in out.splitlines() if line.startswith("compare_metric:")]
    assert code == 0 and "kdrun compare: best-epoch accuracy (best_acc)" in out
    assert notes == ["compare_metric: the runs record best_acc (6 runs), last_acc (6 runs); the table shows "
                     "best_acc; choose with --metric best_acc|last_acc"]
    code, out, err = compare(capsys, root, "--format", "csv")
    assert "delta_best_acc" in out and "compare_metric:" not in out and len(err.strip().splitlines()) == 1
    code, out, _ = compare(capsys, root, "--where", "student=resnet8")  # these agree
    assert "last-epoch accuracy" in out and "compare_metric:" not in out


def test_a_recorded_metric_compare_does_not_know_is_not_used(tmp_path, capsys):
    root = str(recorded_results(tmp_path, lambda student: "top1"))
    code, out, _ = compare(capsys, root)
    assert code == 0 and "best-epoch accuracy" in out and "compare_metric: the runs record top1 (12 runs)" in out


def test_compare_metric_is_no_grouping_key(tmp_path, capsys):
    root = str(recorded_results(tmp_path, lambda student: "last_acc"))
    code, _, err = compare(capsys, root, "--by", "compare_metric")
    assert code == 2 and "unknown key compare_metric" in err
    assert json.loads(next(Path(root).rglob("result.json")).read_text())["compare_metric"] == "last_acc"


# ---- the methods after DKD in the benchmark recipe ---------------------------------------------------------

@pytest.mark.parametrize("teacher, student, lr, epochs", [
    ("resnet32x4", "resnet8x4", 0.025, 240), ("vgg13", "mobilenetv2", 0.01, 480),
    ("resnet32x4", "shufflenetv2", 0.01, 960), ("wrn_40_2", "wrn_16_2", 0.025, 240)])
def test_mlkd_gets_its_own_lr_and_epochs_and_the_teacher_stays_the_same(teacher, student, lr, epochs):
    cfg = compose_config(REPDISTILLER, "method=mlkd", f"teacher={teacher}", f"student={student}")
    assert (cfg.optim.lr, cfg.epochs, cfg.teacher.epochs) == (lr, epochs, 240)
    other = compose_config(REPDISTILLER, "method=kd", f"teacher={teacher}", f"student={student}")
    assert other.epochs == 240 and other.optim.lr in (0.05, 0.01)


@pytest.mark.parametrize("teacher, student, beta", [("resnet32x4", "resnet8x4", 5.0), ("resnet56", "resnet20", 0.6),
                                                   ("resnet110", "resnet32", 1.0), ("resnet32x4", "shufflenetv2", 8.0)])
def test_reviewkd_weight_is_the_authors_for_the_pair(teacher, student, beta):
    cfg = compose_config("method=reviewkd", f"teacher={teacher}", f"student={student}")
    assert cfg.method.beta == beta
    assert compose_config("method=reviewkd", "method.beta=2").method.beta == 2


def test_every_new_method_composes_under_the_recipe():
    for method in ("reviewkd", "dist", "mlkd", "ctkd", "wttm", "ttm", "nkd", "simkd"):
        cfg = compose_config(REPDISTILLER, f"method={method}")
        assert cfg.method.name == method and cfg.compare_metric == "last_acc"


def test_the_teacher_follows_the_students_epochs_except_for_mlkds_longer_runs():
    assert compose_config(REPDISTILLER, "epochs=2").teacher.epochs == 2
    assert compose_config(REPDISTILLER, "method=mlkd", "teacher=vgg13", "student=mobilenetv2",
                          "epochs=3").teacher.epochs == 3
