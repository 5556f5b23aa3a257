"""compile=true: torch.compile of the student (forward and backward, feature taps included) and of the teacher,
in place and for the duration of `fit`; a model torch.compile cannot handle runs eagerly after one line."""
import csv
from pathlib import Path

import pytest
import torch
import torch._dynamo.exc

from conftest import compose_config
from kdrun.experiment import prepare
from kdrun.models import create_model
from kdrun.step_speed import compile_in_place, fast_steps, step_models


class Refused(torch._dynamo.exc.TorchDynamoException):
    pass


@pytest.fixture
def fake_compile(monkeypatch):
    """torch.compile replaced by a recorder: `fail=True` makes the compiled call raise as a failed trace does."""
    state = {"modes": [], "fail": False, "calls": 0}

    def compile(fn, mode=None, **_):
        state["modes"].append(mode)

        def compiled(*args, **kwargs):
            state["calls"] += 1
            if state["fail"]:
                raise Refused("cannot trace this call\nthe rest of the trace")
            return fn(*args, **kwargs)
        return compiled

    monkeypatch.setattr(torch, "compile", compile)
    return state


def test_a_model_torch_compile_cannot_handle_runs_eagerly_after_one_line(fake_compile, capsys):
    fake_compile["fail"] = True
    model = create_model("resnet8", 10, 1).eval()
    x = torch.randn(2, 1, 8, 8)
    expected = model(x)
    assert compile_in_place(model, "max-autotune", "student")
    assert torch.equal(model(x), expected) and model._compiled_call_impl is None
    assert torch.equal(model(x), expected) and fake_compile["calls"] == 1  # eager from then on
    err = capsys.readouterr().err
    assert fake_compile["modes"] == ["max-autotune"] and len(err.strip().splitlines()) == 1
    assert "compile: torch.compile cannot compile the student (resnet8): Refused: cannot trace this call; " \
           "it runs eagerly" in err


def test_compiling_keeps_the_state_dict_and_a_compiled_module_is_left_alone(fake_compile):
    model = create_model("resnet8", 10, 1)
    keys = list(model.state_dict())
    assert compile_in_place(model, "default", "student")
    assert not compile_in_place(model, "default", "student")  # compiled already (by kdrun or anyone)
    assert list(model.state_dict()) == keys and fake_compile["modes"] == ["default"]


def test_fit_compiles_student_teacher_and_tap_graphs_and_undoes_it(fake_compile, capsys):
    plan = prepare(compose_config("method=fitnet", "method.pairs=[[fx:layer2.0.add,s2]]", "compile=true",
                                  "compile.mode=reduce-overhead", "teacher=resnet8", "student=resnet8"))
    method = plan.method
    labels = [label for label, _ in step_models(method)]
    assert labels == ["student", "teacher", "student_tap feature graph"]  # an fx tap runs its graph module
    with fast_steps(method, plan.settings):
        assert all(module._compiled_call_impl is not None for _, module in step_models(method))
        assert fake_compile["modes"] == ["reduce-overhead"] * 3
    assert all(module._compiled_call_impl is None for _, module in step_models(method))  # eager after fit
    assert "compile: student, teacher, student_tap feature graph with torch.compile (mode reduce-overhead)" in \
        capsys.readouterr().err


def test_a_wrapper_around_the_student_is_left_to_the_compiled_student_inside():
    plan = prepare(compose_config("method=simkd", "teacher=resnet8", "student=resnet8"))
    models = dict((label, id(module)) for label, module in step_models(plan.method))
    assert models == {"student": id(plan.method.student), "teacher": id(plan.method.teacher)}


def test_compile_off_compiles_nothing(fake_compile):
    plan = prepare(compose_config("teacher=resnet8", "student=resnet8"))
    with fast_steps(plan.method, plan.settings):
        assert plan.method.student._compiled_call_impl is None
    assert fake_compile["modes"] == []


def read_rows(path: Path) -> list[dict]:
    with open(path) as f:
        return list(csv.DictReader(f))


@pytest.mark.slow
def test_a_compiled_run_on_the_cpu_gives_the_plain_runs_losses(kdrun, capsys):
    """One epoch of FitNet (+ KD) on digits, compiled: torch.compile traces the feature taps' hooks of student and
    teacher; losses and accuracy as in the plain run with the same (cached) teacher. Batch 479 divides the 1437
    training images and one evaluation batch holds the 360 test images: one graph per kind, so it compiles fast."""
    run = ["method=fitnet", "method.alpha=0.9", "teacher=resnet8", "student=resnet8", "epochs=1", "teacher.epochs=1",
           "batch_size=479", "eval_batch_size=360"]
    code, (plain,) = kdrun(*run, fast=False)
    assert code == 0
    capsys.readouterr()
    code, records = kdrun(*run, "compile=true", fast=False)
    err = capsys.readouterr().err
    assert "compile: student, teacher with torch.compile (mode default)" in err and "cannot compile" not in err
    (compiled,) = [r for r in records if r["run_dir"] != plain["run_dir"]]
    assert code == 0 and compiled["compile"] == "default" and compiled["teacher_source"] == "cache"
    (a,), (b,) = (read_rows(Path(r["run_dir"]) / "metrics.csv") for r in (plain, compiled))
    for key in ("loss_ce", "loss_kd", "loss_hint", "train_loss"):  # measured along the way: 1e-5 apart here
        assert float(b[key]) == pytest.approx(float(a[key]), rel=1e-3, abs=1e-5), key
    # after the epoch: fused kernels round differently, and the hint's weight 100 carries it into the weights
    assert float(b["test_loss"]) == pytest.approx(float(a["test_loss"]), rel=1e-2)
    for key in ("train_acc", "test_acc"):
        assert float(b[key]) == pytest.approx(float(a[key]), abs=0.6), key  # at most 2 of 360 test images
