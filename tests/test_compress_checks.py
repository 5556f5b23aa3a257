"""student.init / prune / quantize refusals: one line each, `student.<key>=<value> is not allowed: <why>; <allowed>`,
before any work; and init=teacher copying the teacher bit for bit."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from test_compress_helpers import SHAPE, compress_cfg, model
from kdrun.compress import COMPRESS_DEFAULTS, COMPRESS_KEYS, check_compression, compress_student
from kdrun.errors import ConfigError


def refused(cfg, student=None, teacher=None, method=None, device="cpu") -> str:
    student = student if student is not None else model()
    with pytest.raises(ConfigError) as info:
        check_compression(cfg, student, teacher, SHAPE, device, method)
    message = str(info.value)
    assert "\n" not in message
    return message


class FeatureMethod:
    """Stands in for a built Method that taps the student's `s2` features."""

    def student_layers(self):
        return ["s2"]


def test_keys_and_defaults():
    assert COMPRESS_KEYS == ("quantize", "init", "prune", "prune_kind")
    assert COMPRESS_DEFAULTS == {"quantize": None, "init": None, "prune": None, "prune_kind": "unstructured"}


def test_nothing_set_checks_nothing():
    check_compression(compress_cfg(), model(), None, SHAPE, "cpu", FeatureMethod())


@pytest.mark.parametrize("keys, start", [
    ({"quantize": "int3"}, "student.quantize=int3 is not allowed: unknown quantisation; one of null, int8, int4"),
    ({"init": "imagenet"}, "student.init=imagenet is not allowed: unknown initialisation;"),
    ({"prune": 0.5, "prune_kind": "channels"}, "student.prune_kind=channels is not allowed: unknown kind of pruning;"),
    ({"prune": 0}, "student.prune=0 is not allowed: out of range; a fraction strictly between 0 and 1"),
    ({"prune": 1.5}, "student.prune=1.5 is not allowed: out of range;"),
    ({"prune": True}, "student.prune=true is not allowed: not a number;"),
    ({"quantize": "int4"}, "student.quantize=int4 is not allowed: resnet8 has 9 convolutions, and torchao trains "
                           "int4 weights quantization-aware only in nn.Linear layers"),
])
def test_values_refused(keys, start):
    assert refused(compress_cfg(**keys), teacher=model()).startswith(start)


def test_init_teacher_across_architectures_refused():
    message = refused(compress_cfg(teacher="resnet14", init="teacher"), teacher=model("resnet14"))
    assert message == ("student.init=teacher is not allowed: the student is resnet8 and the teacher resnet14; "
                       "student=resnet14, or student.init=null")


def test_init_teacher_with_other_options_refused():
    cfg = compress_cfg(init="teacher", student_options={"residual": False})
    message = refused(cfg, student=model(residual=False), teacher=model())
    assert message.startswith("student.init=teacher is not allowed: student and teacher resnet8 differ in residual "
                              "(False vs True);")


def test_init_teacher_with_other_weights_refused():
    # Same name and options, other weight shapes (a student a method rebuilt, say): the layouts are compared too.
    message = refused(compress_cfg(init="teacher"), student=model(), teacher=model("resnet8x4"))
    assert message.startswith("student.init=teacher is not allowed: the student's weights differ from the "
                              "teacher's at stem.0.weight ((16, 1, 3, 3) vs (32, 1, 3, 3))")


def test_init_teacher_without_teacher_refused():
    message = refused(compress_cfg(method="ce", init="teacher"))
    assert message == "student.init=teacher is not allowed: method=ce uses no teacher; student.init=null"


def test_init_teacher_from_black_box_refused():
    message = refused(compress_cfg(init="teacher", access="logits"), teacher=model())
    assert message.startswith("student.init=teacher is not allowed: teacher.access=logits hides the teacher's weights")


def test_quantize_with_feature_method_refused():
    message = refused(compress_cfg(method="fitnet", quantize="int8"), method=FeatureMethod())
    assert message.startswith("student.quantize=int8 is not allowed: method=fitnet taps the student's features (s2)")
    assert message.endswith("; a method that needs only the student's logits (ce, kd, dkd, ...), or "
                            "student.quantize=null")


@pytest.mark.parametrize("keys", [{"quantize": "int8"}, {"prune": 0.5}])
def test_rocket_refused(keys):
    key = next(iter(keys))
    assert refused(compress_cfg(method="rocket", **keys)).startswith(
        f"student.{key}={keys[key]} is not allowed: method=rocket does not work on a")


def test_quantize_on_other_device_refused():
    message = refused(compress_cfg(quantize="int8"), device="meta")
    assert message == ("student.quantize=int8 is not allowed: quantization-aware training runs on cpu or cuda, "
                       "not meta; device=cpu or cuda")


def test_prune_without_prunable_layer_refused():
    class Head(nn.Module):  # a classifier alone: nothing torch-pruning may remove
        def __init__(self):
            super().__init__()
            self.flatten, self.fc = nn.Flatten(), nn.Linear(64, 10)
            self.feature_aliases = {"logits": "fc"}

        def forward(self, x):
            return self.fc(self.flatten(x))

    message = refused(compress_cfg(prune=0.5, prune_kind="structured"), student=Head())
    assert message.startswith("student.prune=0.5 is not allowed: torch-pruning found no channel of Head it may remove")


def test_prune_model_without_conv_or_linear_refused():
    class Raw(nn.Module):
        def __init__(self):
            super().__init__()
            self.w = nn.Parameter(torch.zeros(64, 10))

        def forward(self, x):
            return x.flatten(1) @ self.w

    message = refused(compress_cfg(prune=0.3), student=Raw())
    assert message == "student.prune=0.3 is not allowed: Raw has no convolution or linear layer to prune; student.prune=null"


def test_allowed_combination_passes_and_changes_nothing():
    student, teacher = model(seed=1), model(seed=2)
    before = {k: v.clone() for k, v in student.state_dict().items()}
    check_compression(compress_cfg(init="teacher", prune=0.5, prune_kind="structured", quantize="int8"),
                      student, teacher, SHAPE, "cpu", None)
    assert all(torch.equal(before[k], v) for k, v in student.state_dict().items())


def test_init_teacher_copies_weights_bitwise():
    student, teacher = model(seed=1), model(seed=2)
    teacher.train()(torch.randn(4, *SHAPE))  # running statistics that differ from a fresh model's
    original = {k: v.clone() for k, v in teacher.state_dict().items()}
    student, record = compress_student(compress_cfg(init="teacher"), student, teacher, torch.zeros(2, *SHAPE))
    assert record["student_init"] == "teacher"
    for key, value in teacher.state_dict().items():
        assert torch.equal(student.state_dict()[key], value), key
        assert student.state_dict()[key].data_ptr() != value.data_ptr()  # a copy, not the teacher's tensors
    with torch.no_grad():
        student.fc.weight.add_(1.0)
    assert all(torch.equal(original[k], v) for k, v in teacher.state_dict().items())


def test_structured_trial_that_takes_too_long_refused(monkeypatch):
    import time

    import kdrun.compress.prune as prune

    monkeypatch.setattr(prune, "TRIAL_SECONDS", 0.2)
    monkeypatch.setattr(prune, "prune_structured", lambda *args: time.sleep(5))
    message = refused(compress_cfg(prune=0.5, prune_kind="structured"))
    assert message == ("student.prune=0.5 is not allowed: torch-pruning did not finish tracing resnet8's channel "
                       "dependencies in 0.2 s; student.prune_kind=unstructured")
