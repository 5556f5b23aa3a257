"""channels_last=true: student, teacher and adapters in channels_last memory format during training, the batches
converted in the loop and the evaluation; the metrics are those of the plain run up to float rounding."""
import csv
from pathlib import Path

import pytest
import torch

from conftest import compose_config
from kdrun.experiment import prepare
from kdrun.step_speed import fast_steps, in_channels_last, to_step_format
from kdrun.methods.base import Stage
from kdrun.train import TrainSettings, evaluate, fit

RUN = ["epochs=2", "teacher.epochs=2", "batch_size=128", "teacher=resnet8", "student=resnet8"]


def read_rows(path: Path) -> list[dict]:
    with open(path) as f:
        return list(csv.DictReader(f))


def conv_weights(module):
    return [p for p in module.parameters() if p.dim() == 4 and p.shape[1] > 1 and p.shape[2] * p.shape[3] > 1]


def test_models_are_channels_last_within_fit_only():
    plan = prepare(compose_config("method=fitnet", "method.pairs=[[s1,s2]]", "channels_last=true",
                                  "teacher=resnet8", "student=resnet8"))
    method, settings = plan.method, plan.settings
    adapter = conv_weights(method.regressors)  # a 3x3 stride-2 conv from the student's s1 to the teacher's s2
    assert settings.channels_last and adapter
    holders = [method, method.teacher]  # the method holds student and adapters; the teacher is held apart
    with fast_steps(method, settings):
        for module in holders:
            assert all(p.is_contiguous(memory_format=torch.channels_last) and not p.is_contiguous()
                       for p in conv_weights(module))
        assert all(not p.is_contiguous() for p in adapter)
        assert in_channels_last(method.student) and in_channels_last(method.teacher)
    for module in holders:
        assert all(p.is_contiguous() for p in module.parameters())
    assert not in_channels_last(method.student)


def test_batches_are_converted_only_when_on():
    x = torch.randn(4, 3, 8, 8)
    on, off = TrainSettings(torch.device("cpu"), channels_last=True), TrainSettings(torch.device("cpu"))
    assert to_step_format(x, on).is_contiguous(memory_format=torch.channels_last)
    assert not to_step_format(x, on).is_contiguous()
    assert to_step_format(x, off) is x
    features = torch.randn(4, 16)  # a feature-vector dataset: nothing to convert
    assert to_step_format(features, on) is features


def test_evaluation_is_the_same_in_either_format():
    plan = prepare(compose_config("channels_last=true", "teacher=resnet8", "student=resnet8"))
    plain = evaluate(plan.method.student, plan.test_loader, TrainSettings(torch.device("cpu")))
    with fast_steps(plan.method, plan.settings):
        converted = evaluate(plan.method.student, plan.test_loader, plan.settings)
    assert converted[1] == plain[1] and converted[0] == pytest.approx(plain[0], rel=1e-5)


class QuietProgress:
    def start_stage(self, *args):
        pass

    def advance(self):
        pass

    def end_epoch(self, row):
        pass


def test_fit_feeds_channels_last_batches_to_student_and_teacher():
    plan = prepare(compose_config("channels_last=true", "teacher=resnet8", "student=resnet8", "batch_size=256"))
    method, seen = plan.method, []

    def record(role):
        def hook(module, args):
            seen.append((role, module.training, args[0].is_contiguous(memory_format=torch.channels_last)
                         and not args[0].is_contiguous()))
        return hook

    # digits images have one channel, in either format the same memory: look at the first conv of several
    first_conv = lambda model: next(m for m in model.modules()  # noqa: E731
                                    if isinstance(m, torch.nn.Conv2d) and m.in_channels > 1)
    handles = [first_conv(method.student).register_forward_pre_hook(record("student")),
               first_conv(method.teacher).register_forward_pre_hook(record("teacher"))]
    try:
        rows = fit(method, plan.train_loader, plan.test_loader, [Stage("main", 1)], plan.cfg.optim, plan.cfg.sched,
                   plan.cfg.optim.lr, plan.settings, QuietProgress())
    finally:
        for handle in handles:
            handle.remove()
    assert len(rows) == 1 and rows[0]["test_acc"] >= 0
    assert {(role, training) for role, training, _ in seen} == {("student", True), ("teacher", False),
                                                                ("student", False)}  # train steps, evaluation
    assert all(channels_last for _, _, channels_last in seen)


@pytest.mark.slow
def test_a_channels_last_run_gives_the_plain_runs_metrics(kdrun, tmp_path):
    """Two epochs of teacher and student on digits: every loss and accuracy column as in the plain run (the
    teacher is trained anew in each, in its own results directory)."""
    code, (plain,) = kdrun(*RUN, f"results_dir={tmp_path / 'plain'}", fast=False)
    assert code == 0
    code, records = kdrun(*RUN, f"results_dir={tmp_path / 'channels_last'}", "channels_last=true", fast=False)
    (fast,) = [r for r in records if "channels_last" in Path(r["run_dir"]).parts[-3]]
    assert code == 0 and fast["channels_last"] is True and fast["config_hash"] == plain["config_hash"]
    assert fast["teacher_acc"] == pytest.approx(plain["teacher_acc"], abs=0.6)  # at most 2 of 360 test images
    for name in ("runs/*/metrics.csv", "teachers/*/metrics.csv"):
        (a,), (b,) = (list((tmp_path / d).glob(name)) for d in ("plain", "channels_last"))
        rows_a, rows_b = read_rows(a), read_rows(b)
        assert len(rows_a) == len(rows_b) == 2
        for row_a, row_b in zip(rows_a, rows_b):
            for key in row_a:
                if key.startswith(("loss_", "train_loss", "test_loss")):
                    assert float(row_b[key]) == pytest.approx(float(row_a[key]), rel=1e-3, abs=1e-5), (name, key)
                elif key in ("train_acc", "test_acc"):
                    assert float(row_b[key]) == pytest.approx(float(row_a[key]), abs=0.6), (name, key)
