"""reviewkd (Chen et al. 2021) against mdistiller mdistiller/distillers/ReviewKD.py, transcribed by hand: hcl_loss
(lines 11-28), ABF.forward (lines 116-133), the review loop of forward_train (lines 75-93) with the hard-coded
channel and size lists of mdistiller's cfg.py REVIEWKD defaults (resnet32x4 -> resnet8x4) and of the authors'
CIFAR-100/model/reviewkd.py::build_review_kd (vgg13 -> MobileNetV2)."""
from __future__ import annotations

import csv
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from omegaconf import OmegaConf

from conftest import method_defaults, results_under, run_cli
from kdrun.errors import ConfigError
from kdrun.methods import METHODS
from kdrun.methods.reviewkd import ABF, hcl_loss, review, warmup_factor
from kdrun.models import create_model

CIFAR = (3, 32, 32)


def build(teacher: str, student: str, input_shape=CIFAR, classes: int = 100, **overrides):
    # the composed defaults: the weight is the authors' for the pair (an interpolation of the models' names)
    cfg = OmegaConf.merge(method_defaults("reviewkd", teacher, student), overrides)
    channels = (input_shape or CIFAR)[0]
    torch.manual_seed(0)
    method = METHODS.get("reviewkd")(cfg, create_model(student, classes, channels),
                                     create_model(teacher, classes, channels), classes)
    if input_shape is not None:
        method.prepare(input_shape)
    return method


# ----- official transcriptions --------------------------------------------------------------------------
def official_hcl(fstudent, fteacher):
    """ReviewKD.py::hcl_loss: per level the full MSE, then pooled 4, 2, 1 (below h) at halving weights."""
    loss_all = 0.0
    for fs, ft in zip(fstudent, fteacher):
        n, c, h, w = fs.shape
        loss = F.mse_loss(fs, ft, reduction="mean")
        cnt, tot = 1.0, 1.0
        for l in [4, 2, 1]:
            if l >= h:
                continue
            cnt /= 2.0
            loss += F.mse_loss(F.adaptive_avg_pool2d(fs, (l, l)), F.adaptive_avg_pool2d(ft, (l, l))) * cnt
            tot += cnt
        loss_all = loss_all + loss / tot
    return loss_all


def train_bn(x, bn):
    return F.batch_norm(x, None, None, bn.weight, bn.bias, training=True, eps=bn.eps)


def official_abf(abf, x, y=None, shape=None, out_shape=None):
    """ReviewKD.py::ABF.forward written in functional ops on the module's parameters (BN in train mode)."""
    n, _, h, w = x.shape
    x = train_bn(F.conv2d(x, abf.conv1[0].weight), abf.conv1[1])
    if abf.att_conv is not None:
        y = F.interpolate(y, (shape, shape), mode="nearest")
        z = torch.cat([x, y], dim=1)
        z = torch.sigmoid(F.conv2d(z, abf.att_conv[0].weight, abf.att_conv[0].bias))
        x = x * z[:, 0].view(n, 1, h, w) + y * z[:, 1].view(n, 1, h, w)
    if x.shape[-1] != out_shape:
        x = F.interpolate(x, (out_shape, out_shape), mode="nearest")
    y = train_bn(F.conv2d(x, abf.conv2[0].weight, stride=1, padding=1), abf.conv2[1])
    return y, x


def official_review(abfs, feats, shapes, out_shapes):
    """forward_train's loop: features and ABFs deepest first, shapes/out_shapes as in mdistiller's lists."""
    x = feats[::-1]
    abfs = list(abfs)[::-1]
    results = []
    out_features, res_features = official_abf(abfs[0], x[0], out_shape=out_shapes[0])
    results.append(out_features)
    for features, abf, shape, out_shape in zip(x[1:], abfs[1:], shapes[1:], out_shapes[1:]):
        out_features, res_features = official_abf(abf, features, res_features, shape, out_shape)
        results.insert(0, out_features)
    return results


# ----- the loss -----------------------------------------------------------------------------------------
def test_hcl_loss_value_and_gradient_match_the_official():
    torch.manual_seed(0)
    shapes = [(4, 3, 8, 8), (4, 5, 4, 4), (4, 6, 2, 2), (4, 7, 1, 1)]  # every pyramid depth: 3, 2, 1, 0 pools
    f_s = [torch.randn(s, requires_grad=True) for s in shapes]
    f_t = [torch.randn(s) for s in shapes]
    ours = hcl_loss(f_s, f_t)
    grads = torch.autograd.grad(ours, f_s)
    expected = official_hcl(f_s, f_t)
    expected_grads = torch.autograd.grad(expected, f_s)
    assert torch.allclose(ours, expected, atol=1e-6)
    assert all(torch.allclose(g, e, atol=1e-7) for g, e in zip(grads, expected_grads))
    # by hand for one 2x2 map: (mse + mse of the means / 2) / 1.5
    s, t = torch.tensor([[[[1.0, 2.0], [3.0, 6.0]]]]), torch.zeros(1, 1, 2, 2)
    assert hcl_loss([s], [t]).item() == pytest.approx((50 / 4 + 9 / 2) / 1.5)


# ----- ABF ----------------------------------------------------------------------------------------------
def randomize_batchnorms(module):
    for bn in (m for m in module.modules() if isinstance(m, torch.nn.BatchNorm2d)):
        torch.nn.init.uniform_(bn.weight, 0.5, 1.5)
        torch.nn.init.uniform_(bn.bias, -0.5, 0.5)


@pytest.mark.parametrize("out_size", [4, 8])  # the teacher's map as large as the student's, or twice it
def test_abf_fuse_path_matches_the_official(out_size):
    torch.manual_seed(0)
    abf = ABF(6, 8, 5, fuse=True)
    randomize_batchnorms(abf)
    x = torch.randn(4, 6, 4, 4, requires_grad=True)
    residual = torch.randn(4, 8, 2, 2, requires_grad=True)  # the deeper level's, upsampled to 4x4
    out, res = abf(x, residual, (out_size, out_size))
    expected, expected_res = official_abf(abf, x, residual, 4, out_size)
    assert out.shape == (4, 5, out_size, out_size) and res.shape == (4, 8, out_size, out_size)
    assert torch.allclose(out, expected, atol=1e-5) and torch.allclose(res, expected_res, atol=1e-6)
    weights = torch.randn_like(out)
    grads = torch.autograd.grad((out * weights).sum() + res.sum(), (x, residual))
    expected_grads = torch.autograd.grad((expected * weights).sum() + expected_res.sum(), (x, residual))
    assert all(torch.allclose(g, e, atol=1e-5) for g, e in zip(grads, expected_grads))


def test_the_deepest_abf_does_not_fuse_and_matches_the_official():
    torch.manual_seed(1)
    abf = ABF(7, 4, 3, fuse=False)
    randomize_batchnorms(abf)
    assert abf.att_conv is None
    x = torch.randn(4, 7, 1, 1)
    out, res = abf(x, out_size=(1, 1))
    expected, expected_res = official_abf(abf, x, out_shape=1)
    assert torch.allclose(out, expected, atol=1e-5) and torch.allclose(res, expected_res, atol=1e-6)


# ----- the ABF stack from the recorded shapes -----------------------------------------------------------
def abf_channels(method):
    return [(a.conv1[0].in_channels, a.conv1[0].out_channels, a.conv2[0].out_channels, a.att_conv is not None)
            for a in method.abfs]


def assert_review_matches_official(method, shapes, out_shapes):
    torch.manual_seed(2)
    feats = [torch.randn(2, a.conv1[0].in_channels, s, s) for a, s in zip(method.abfs, shapes[::-1])]
    ours = review(method.abfs, feats, method.out_sizes)
    expected = official_review(method.abfs, feats, shapes, out_shapes)
    assert [tuple(o.shape[2:]) for o in ours] == [(s, s) for s in out_shapes[::-1]]
    assert all(torch.allclose(o, e, atol=1e-5) for o, e in zip(ours, expected))


def test_resnet32x4_to_resnet8x4_stack_is_mdistillers_default_lists():
    method = build("resnet32x4", "resnet8x4")
    assert method.pairs == [("s1", "s1_pre"), ("s2", "s2_pre"), ("s3", "s3_pre"), ("pool", "pool")]
    # cfg.py: IN_CHANNELS = OUT_CHANNELS = [64, 128, 256, 256], SHAPES = OUT_SHAPES = [1, 8, 16, 32]; mid 256
    assert abf_channels(method) == [(64, 256, 64, True), (128, 256, 128, True), (256, 256, 256, True),
                                    (256, 256, 256, False)]
    assert method.out_sizes == [(32, 32), (16, 16), (8, 8), (1, 1)]
    assert {id(p) for p in method.abfs.parameters()} <= {id(p) for p in method.parameters()}
    assert any(k.startswith("abfs.") for k in method.state_dict())  # saved and trained with the student
    assert_review_matches_official(method, [1, 8, 16, 32], [1, 8, 16, 32])


def test_vgg13_to_mobilenetv2_stack_is_the_authors_lists():
    method = build("vgg13", "mobilenetv2")
    # build_review_kd('mobile', teacher vgg): out_channels [128, 256, 512, 512, 512], shapes [1, 2, 4, 8, 16],
    # out_shapes [1, 4, 4, 8, 16]; in_channels [12, 16, 48, 160, 1280] there are mobile_half's, here width 1
    assert abf_channels(method) == [(24, 512, 128, True), (32, 512, 256, True), (96, 512, 512, True),
                                    (320, 512, 512, True), (1280, 512, 512, False)]
    assert method.out_sizes == [(16, 16), (8, 8), (4, 4), (4, 4), (1, 1)]
    assert_review_matches_official(method, [1, 2, 4, 8, 16], [1, 4, 4, 8, 16])


def test_pairs_preact_student_and_the_last_stages_when_counts_differ():
    assert build("resnet32x4", "resnet8x4", input_shape=None, stu_preact=True).pairs == [
        ("s1_pre", "s1_pre"), ("s2_pre", "s2_pre"), ("s3_pre", "s3_pre"), ("pool", "pool")]
    assert build("vgg13", "resnet8x4", input_shape=None).pairs == [
        ("s1", "s2_pre"), ("s2", "s3_pre"), ("s3", "s4_pre"), ("pool", "pool")]
    assert abf_channels(build("resnet32x4", "resnet8x4", max_mid_channel=128))[-1] == (256, 128, 256, False)


def test_warmup_factor_is_linear_from_epoch_one():
    method = build("resnet8", "resnet8", input_shape=None)
    for epoch, factor in ((1, 1 / 20), (10, 0.5), (20, 1.0), (60, 1.0)):
        method.begin_epoch(epoch)
        assert method.weights() == {"ce": 1.0, "kd": 0.0, "reviewkd": pytest.approx(5.0 * factor)}
    assert warmup_factor(3, 0) == 1.0


# ----- refusals -----------------------------------------------------------------------------------------
@pytest.mark.parametrize("key, value, message", [
    ("stu_preact", "maybe", "method.stu_preact=maybe is not allowed: true or false"),
    ("max_mid_channel", 0, "method.max_mid_channel=0 is not allowed: must be an integer > 0"),
    ("warmup", -1, "method.warmup=-1 is not allowed"),
    ("pairs", "s2", "method.pairs=s2 is not allowed: auto, or a non-empty list"),
])
def test_bad_values_are_refused_in_one_line(key, value, message):
    with pytest.raises(ConfigError) as info:
        build("resnet8", "resnet8", input_shape=None, **{key: value})
    assert str(info.value).startswith(message) and "\n" not in str(info.value)


def test_a_feature_that_is_neither_map_nor_vector_is_refused_naming_both_shapes():
    method = build("resnet8", "resnet8", input_shape=None, pairs=[["a", "b"]])
    with pytest.raises(ConfigError) as info:
        method.build({"a": torch.Size([5, 4])}, {"b": torch.Size([6, 2, 2])})
    assert str(info.value).startswith("method.pairs=[a,b] is not allowed for reviewkd: student a is 5x4 and "
                                      "teacher b is 6x2x2; needs C x H x W feature maps or pooled D vectors")


# ----- end to end ---------------------------------------------------------------------------------------
def last_row(record):
    with open(Path(record["run_dir"]) / "metrics.csv") as f:
        return list(csv.DictReader(f))[-1]


def test_digits_run_resnet26_teaches_resnet8(kdrun):
    code, records = kdrun("method=reviewkd")
    assert code == 0 and records[0]["status"] == "completed"
    assert (records[0]["teacher"], records[0]["student"]) == ("resnet26", "resnet8")
    assert float(last_row(records[0])["loss_reviewkd"]) > 0


def test_vgg13_teaches_mobilenetv2(tmp_path, vgg13_teacher):
    code = run_cli("epochs=1", "batch_size=128", f"results_dir={tmp_path}", "teacher=vgg13", "student=mobilenetv2",
                   f"teacher.checkpoint={vgg13_teacher}", "method=reviewkd", "optim.lr=0.01")
    (record,) = results_under(tmp_path)
    assert code == 0 and record["status"] == "completed"
    assert (record["teacher"], record["student"]) == ("vgg13", "mobilenetv2")
    assert float(last_row(record)["loss_reviewkd"]) > 0
