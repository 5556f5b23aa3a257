"""simkd (Chen et al. 2022) against DefangChen/SimKD, transcribed by hand: the SimKD module of models/util.py
(projector, spatial alignment, prediction through the teacher's classifier), the loss of helper/loops.py
(`nn.MSELoss()` on that module's outputs, with scripts/run_distill.sh's -c 0 -d 0 -b 1). Then the frozen teacher
head, the parameter counts, the refusals and two CLI runs (digits with a teacher trained in the run, whose saved
deployed student is reloaded; vgg13 -> mobilenetv2)."""
from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from omegaconf import OmegaConf
from torch import nn

from conftest import compose_config, results_under, run_cli
from kdrun.checkpoint import load_checkpoint
from kdrun.data import load_dataset, make_loaders
from kdrun.errors import ConfigError
from kdrun.features import feature_shapes
from kdrun.methods import METHODS, Stage
from kdrun.methods.simkd import align_spatial, simkd_loss
from kdrun.models import create_model
from kdrun.paths import conf_dir
from kdrun.train import TrainSettings, evaluate
from kdrun.transfer.bias_shift import output_bias

DIGITS = (1, 8, 8)
CIFAR = (3, 32, 32)
QUARTER = ["transfer.labelled_fraction=0.25"]  # a few training steps: the runs check the plumbing, not learning


def method_cfg(**overrides):
    return OmegaConf.merge(OmegaConf.load(conf_dir() / "method" / "simkd.yaml"), overrides)


def build(teacher: str, student: str, shape=DIGITS, classes: int = 10, **overrides):
    torch.manual_seed(0)
    t, s = create_model(teacher, classes, shape[0]), create_model(student, classes, shape[0])
    method = METHODS.get("simkd")(method_cfg(**overrides), s, t, classes)
    method.prepare(shape)
    return method


# ----- official transcription: models/util.py::SimKD ------------------------------------------------------
class OfficialSimKD(nn.Module):
    """CVPR-2022: Knowledge Distillation with the Reused Teacher Classifier (models/util.py, as written there)."""

    def __init__(self, *, s_n, t_n, factor=2):
        super(OfficialSimKD, self).__init__()
        self.avg_pool = nn.AdaptiveAvgPool2d((1, 1))

        def conv1x1(in_channels, out_channels, stride=1):
            return nn.Conv2d(in_channels, out_channels, kernel_size=1, padding=0, stride=stride, bias=False)

        def conv3x3(in_channels, out_channels, stride=1, groups=1):
            return nn.Conv2d(in_channels, out_channels, kernel_size=3, padding=1, stride=stride, bias=False,
                             groups=groups)

        setattr(self, 'transfer', nn.Sequential(
            conv1x1(s_n, t_n // factor),
            nn.BatchNorm2d(t_n // factor),
            nn.ReLU(inplace=True),
            conv3x3(t_n // factor, t_n // factor),
            nn.BatchNorm2d(t_n // factor),
            nn.ReLU(inplace=True),
            conv1x1(t_n // factor, t_n),
            nn.BatchNorm2d(t_n),
            nn.ReLU(inplace=True),
        ))

    def forward(self, feat_s, feat_t, cls_t):
        s_H, t_H = feat_s.shape[2], feat_t.shape[2]
        if s_H > t_H:
            source = F.adaptive_avg_pool2d(feat_s, (t_H, t_H))
            target = feat_t
        else:
            source = feat_s
            target = F.adaptive_avg_pool2d(feat_t, (s_H, s_H))
        trans_feat_t = target
        trans_feat_s = getattr(self, 'transfer')(source)
        temp_feat = self.avg_pool(trans_feat_s)
        temp_feat = temp_feat.view(temp_feat.size(0), -1)
        pred_feat_s = cls_t(temp_feat)
        return trans_feat_s, trans_feat_t, pred_feat_s


# The official feat[-2] of each model on CIFAR input (models/resnet.py f3, vgg.py f4, mobilenetv2.py f4).
FEAT_SHAPES = {"resnet32x4": (256, 8, 8), "resnet8x4": (256, 8, 8), "vgg13": (512, 4, 4), "mobilenetv2": (320, 2, 2)}


def both_ways(teacher: str, student: str):
    """Ours and the official module with the same projector weights, on the same random feature maps."""
    method = build(teacher, student, CIFAR, classes=100)
    s_shape, t_shape = FEAT_SHAPES[student], FEAT_SHAPES[teacher]
    assert tuple(feature_shapes(method.student, ["last"], CIFAR)["last"]) == s_shape
    assert tuple(feature_shapes(method.teacher, ["last"], CIFAR)["last"]) == t_shape
    official = OfficialSimKD(s_n=s_shape[0], t_n=t_shape[0], factor=2)
    official.transfer.load_state_dict(method.deployed.projector.state_dict())
    torch.manual_seed(1)
    f_s, f_t = torch.randn(4, *s_shape, requires_grad=True), torch.randn(4, *t_shape)
    return method, official, f_s, f_t


@pytest.mark.parametrize("teacher, student", [("resnet32x4", "resnet8x4"), ("vgg13", "mobilenetv2"),
                                              ("vgg13", "resnet8x4")])
def test_projector_alignment_and_prediction_match_the_official_module(teacher, student):
    method, official, f_s, f_t = both_ways(teacher, student)
    ours, theirs = method.deployed.projector, official.transfer
    assert [type(m) for m in ours] == [type(m) for m in theirs]
    for a, b in zip(ours, theirs):
        if isinstance(a, nn.Conv2d):
            assert (a.weight.shape, a.kernel_size, a.padding, a.groups, a.bias) == \
                   (b.weight.shape, b.kernel_size, b.padding, b.groups, b.bias)
    method.train(), official.train()
    trans_s, trans_t, pred = official(f_s, f_t, method.teacher.fc)  # cls_t: get_feat_modules()[-1]
    projected = method.deployed.project(f_s)
    _, target = align_spatial(f_s, f_t)
    size = min(FEAT_SHAPES[student][1], FEAT_SHAPES[teacher][1])
    assert projected.shape == (4, FEAT_SHAPES[teacher][0], size, size)
    assert torch.allclose(projected, trans_s, atol=1e-6) and torch.equal(target, trans_t)
    assert torch.allclose(method.deployed.head(projected), pred, atol=1e-6)


def test_loss_value_gradient_and_weights_are_the_officials():
    method, official, f_s, f_t = both_ways("resnet32x4", "resnet8x4")
    method.train(), official.train()
    trans_s, trans_t, _ = official(f_s, f_t, method.teacher.fc)
    loss_cls = loss_div = torch.zeros(())
    expected = 0 * loss_cls + 0 * loss_div + 1 * nn.MSELoss()(trans_s, trans_t)  # opt.cls, opt.div, opt.beta
    (expected_grad,) = torch.autograd.grad(expected, f_s)
    _, target = align_spatial(f_s, f_t)
    loss = simkd_loss(method.deployed.project(f_s), target)
    (grad,) = torch.autograd.grad(loss, f_s)
    assert torch.allclose(loss, expected, atol=1e-6) and torch.allclose(grad, expected_grad, atol=1e-8)
    assert method.weights() == {"ce": 0.0, "kd": 0.0, "simkd": 1.0}


def digits_batch(n: int = 32):
    gen = torch.Generator().manual_seed(2)
    return torch.randn(n, *DIGITS, generator=gen), torch.randint(0, 10, (n,), generator=gen), torch.arange(n)


def test_teacher_head_stays_frozen_and_training_accuracy_is_the_deployed_students():
    # CE and KD through the deployed logits: gradients reach the head, which must still not change.
    method = build("wrn_16_1", "resnet8", ce_weight=1.0, alpha=0.5, response_logits="deployed")
    head = method.deployed.head
    assert [type(m).__name__ for m in head] == ["BatchNorm2d", "ReLU", "Sequential", "Linear"]  # WRN: bn, act, pool, fc
    before = {k: v.clone() for k, v in head.state_dict().items()}
    projector_before = method.deployed.projector[0].weight.clone()
    stage = Stage("main", 1)
    method.begin_stage(stage)
    optimizer = method.make_optimizer(method.trainable_parameters(stage), compose_config().optim, 0.1)
    in_optimizer = {id(p) for group in optimizer.param_groups for p in group["params"]}
    assert not any(id(p) in in_optimizer for p in head.parameters())
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    images, labels, index = digits_batch()
    for _ in range(3):
        method.train()
        assert method.training and not head.training
        out = method(images, labels, index)
        assert set(out.terms) == {"ce", "kd", "simkd"}
        assert torch.equal(out.terms["ce"], F.cross_entropy(out.logits, labels))
        method.optimizer_step(out, method.step_weights(), optimizer, scaler)
    after = head.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)  # BN buffers included
    assert torch.equal(after["0.running_mean"], method.teacher.bn.running_mean)
    assert not torch.equal(method.deployed.projector[0].weight, projector_before)
    method.eval()
    assert torch.equal(method(images, labels, index).logits, method.deployed(images))  # train acc = deployed's
    assert output_bias(method.deployed, 10) is head[-1].bias  # transfer.bias_shift shifts the reused classifier


def test_official_ce_and_kd_read_the_plain_students_own_logits():
    method = build("resnet8", "resnet8", ce_weight=1.0)
    method.eval()
    images, labels, index = digits_batch()
    out = method(images, labels, index)
    assert torch.equal(out.terms["ce"], F.cross_entropy(method.student(images), labels))
    assert torch.equal(out.logits, method.deployed(images))


def test_deployed_parameters_are_student_projector_and_teacher_head():
    method = build("resnet32x4", "resnet8x4", CIFAR, classes=100)
    mid = 256 // 2
    projector = 256 * mid + 2 * mid + mid * mid * 9 + 2 * mid + mid * 256 + 2 * 256
    student = sum(p.numel() for p in create_model("resnet8x4", 100, 3).parameters())
    head = 256 * 100 + 100  # resnet32x4's fc: pooling has no parameters
    assert method.record_extras() == {"deployed_params": student + projector + head, "student_params": student,
                                      "projector_params": projector, "teacher_head_params": head}


@pytest.mark.parametrize("overrides, message", [
    ({"pairs": [["last", "last"], ["s2", "s2"]]}, "method.pairs=[[last,last],[s2,s2]] is not allowed for simkd"),
    ({"pairs": [["pool", "pool"]]}, "needs C x H x W feature maps on both sides"),
    ({"pairs": [["last", "s2"]]}, "the teacher's side must be its last stage"),
    ({"factor": 0}, "method.factor=0 is not allowed"),
    ({"factor": 1.5}, "method.factor=1.5 is not allowed"),
    ({"factor": 128}, "method.factor=128 is not allowed: the teacher's last has 64 channels"),
    ({"response_logits": "teacher"}, "method.response_logits=teacher is not allowed"),
    ({"kd_until_epoch": 1}, "method.kd_until_epoch=1 is not allowed with method.response_logits=student"),
], ids=["two_pairs", "pooled", "teacher_s2", "factor_0", "factor_float", "factor_too_big", "response_logits",
        "kd_until_epoch"])
def test_bad_values_are_refused(overrides, message):
    with pytest.raises(ConfigError) as err:
        build("resnet8", "resnet8", **overrides)
    assert message in str(err.value) and "\n" not in str(err.value)


def test_quantizing_the_plain_student_is_refused_in_one_line_before_anything_is_written(kdrun, capsys):
    code, results = kdrun("method=simkd", "student.quantize=int8")
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and "student.quantize=int8 is not allowed: method=simkd deploys the student" in err[-1]
    assert not results and not (kdrun.root / "runs").exists()


@pytest.mark.parametrize("overrides, message", [
    (["student.prune=0.5"], "student.prune=0.5 is not allowed: method=simkd deploys the student"),
    (["assistants=[resnet14]"], "assistants=[resnet14] is not allowed with method=simkd"),
    (["transfer=synthetic", "transfer.competition=true"], "transfer.competition=true is not allowed with method=simkd"),
], ids=["prune", "assistants", "competition"])
def test_options_that_would_act_on_the_plain_student_only_are_refused(overrides, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        METHODS.get("simkd").configure(compose_config("method=simkd", *overrides))


def test_digits_run_saves_a_deployed_student_that_reloads_to_its_accuracy(kdrun):
    code, (record,) = kdrun("method=simkd", "teacher=resnet8", "student=resnet14", *QUARTER)
    assert code == 0 and record["status"] == "completed" and record["teacher_source"] == "trained"
    assert record["deployed_params"] == (record["student_params"] + record["projector_params"]
                                         + record["teacher_head_params"])
    run_dir = Path(record["run_dir"])
    assert "loss_simkd" in (run_dir / "metrics.csv").read_text().splitlines()[0]
    cfg = OmegaConf.load(run_dir / "config.yaml")
    saved = load_checkpoint(run_dir / "checkpoint.pt")
    deployed = {k.removeprefix("deployed."): v for k, v in saved["method"].items() if k.startswith("deployed.")}
    method = METHODS.get("simkd")(cfg.method, create_model("resnet14", 10, 1), create_model("resnet8", 10, 1), 10)
    method.prepare(DIGITS)
    method.deployed.load_state_dict(deployed)
    data = load_dataset(cfg.dataset)
    _, test_loader = make_loaders(data, 128, torch.device("cpu"), 0)
    assert evaluate(method.deployed, test_loader, TrainSettings(torch.device("cpu")))[1] == \
           pytest.approx(record["last_acc"])
    # The head is the teacher trained in this run, not the untrained one the method was built around.
    teacher = load_checkpoint(next((kdrun.root / "teachers").glob("resnet8_digits_*/checkpoint.pt")))["model"]
    assert torch.equal(deployed["head.1.weight"], teacher["fc.weight"])
    # A resumed run loads the whole checkpoint into the method, strictly, as restore_training does.
    method.load_state_dict({**{f"student.{k}": v for k, v in saved["model"].items()}, **saved["method"]})


def test_vgg13_teaches_mobilenetv2(tmp_path):
    torch.manual_seed(0)
    checkpoint = tmp_path / "vgg13.pt"
    torch.save({"model": create_model("vgg13", 10, 1).state_dict()}, checkpoint)
    code = run_cli("epochs=1", "batch_size=128", f"results_dir={tmp_path}", "teacher=vgg13", "student=mobilenetv2",
                   f"teacher.checkpoint={checkpoint}", "method=simkd", "optim.lr=0.01", *QUARTER)
    (record,) = results_under(tmp_path)
    assert code == 0 and record["status"] == "completed"
    assert (record["teacher"], record["student"], record["teacher_head_params"]) == ("vgg13", "mobilenetv2", 5130)
