"""ctkd (Li et al. 2023, Curriculum Temperature for KD) against zhengli97/CTKD, transcribed by hand: the
gradient-reversal layer and Global_T of models/temp_global.py, CosineDecay/LinearDecay of train_student.py, the
temperature mapping of helper/loops.py, DistillKL of distiller_zoo/KD.py, the instance-wise KL_Loss of the
README, and DistillKL_logit_stand of the logit-standardization repository's CTKD/distiller_zoo/KD.py."""
from __future__ import annotations

import csv
import math
from pathlib import Path

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.autograd import Function

from conftest import FAST, compose_config, results_under, run_cli
from kdrun.errors import ConfigError
from kdrun.experiment import prepare
from kdrun.methods.base import Forward, Stage
from kdrun.methods.ctkd import ctkd_instance_loss, ctkd_loss
from kdrun.methods.ctkd_temperature import GlobalTemperature, InstanceTemperature, cosine_decay, linear_decay


# ----- official transcriptions ----------------------------------------------------------------------------
class OfficialCosineDecay(object):  # train_student.py
    def __init__(self, max_value, min_value, num_loops):
        self._max_value = max_value
        self._min_value = min_value
        self._num_loops = num_loops

    def get_value(self, i):
        if i < 0:
            i = 0
        if i >= self._num_loops:
            i = self._num_loops
        value = (math.cos(i * math.pi / self._num_loops) + 1.0) * 0.5
        value = value * (self._max_value - self._min_value) + self._min_value
        return value


class OfficialLinearDecay(OfficialCosineDecay):  # train_student.py (the same __init__)
    def get_value(self, i):
        if i < 0:
            i = 0
        if i >= self._num_loops:
            i = self._num_loops - 1
        value = (self._max_value - self._min_value) / self._num_loops
        value = i * (-value)
        return value


class OfficialGradientReversalFunction(Function):  # models/temp_global.py
    @staticmethod
    def forward(ctx, x, lambda_):
        ctx.lambda_ = lambda_
        return x.clone()

    @staticmethod
    def backward(ctx, grads):
        lambda_ = ctx.lambda_
        lambda_ = grads.new_tensor(lambda_)
        dx = lambda_ * grads
        return dx, None


class OfficialGlobalT(nn.Module):  # models/temp_global.py
    def __init__(self):
        super(OfficialGlobalT, self).__init__()
        self.global_T = nn.Parameter(torch.ones(1), requires_grad=True)

    def forward(self, fake_input1, fake_input2, lambda_):
        return OfficialGradientReversalFunction.apply(self.global_T, lambda_)


def official_distill_kl(y_s, y_t, T):  # distiller_zoo/KD.py::DistillKL.forward
    KD_loss = 0
    KD_loss += nn.KLDivLoss(reduction='batchmean')(F.log_softmax(y_s / T, dim=1), F.softmax(y_t / T, dim=1)) * T * T
    return KD_loss


def official_normalize(logit):  # logit-standardization-KD CTKD/distiller_zoo/KD.py
    mean = logit.mean(dim=-1, keepdims=True)
    stdv = logit.std(dim=-1, keepdims=True)
    return (logit - mean) / (1e-7 + stdv)


def official_kl_loss(output_batch, teacher_outputs, T):  # README, instance-wise temperature
    output_batch = output_batch.unsqueeze(0)
    teacher_outputs = teacher_outputs.unsqueeze(0)
    output_batch = F.log_softmax(output_batch / T, dim=1)
    teacher_outputs = F.softmax(teacher_outputs / T, dim=1) + 10 ** (-7)
    loss = T * T * torch.sum(torch.mul(teacher_outputs, torch.log(teacher_outputs) - output_batch))
    return loss


def official_instance_kd(y_s, y_t, T):  # README: DistillKL.forward with per-sample T
    KD_loss = 0
    for i in range(T.shape[0]):
        KD_loss += official_kl_loss(y_s[i], y_t[i], T[i])
    KD_loss /= T.shape[0]
    return KD_loss


def official_temperature(mlp_net, logit_t, logit_s, cos_value, t_start=1.0, t_end=20.0):  # helper/loops.py
    temp = mlp_net(logit_t, logit_s, cos_value)
    temp = t_start + t_end * torch.sigmoid(temp)
    return temp


# ----- helpers ------------------------------------------------------------------------------------------
def method_of(*overrides: str):
    return prepare(compose_config(*FAST, "results_dir=/nonexistent", "method=ctkd", *overrides)).method


def logits(seed=0, n=16, k=10):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(n, k, generator=g) * 2).requires_grad_(), torch.randn(n, k, generator=g) * 4 + 1


# ----- gradient reversal --------------------------------------------------------------------------------
@pytest.mark.parametrize("strength", [0.0, 0.3, 1.0])
def test_the_temperature_gets_minus_lambda_times_the_kd_gradient_and_the_student_its_plain_one(strength):
    s, t = logits()
    module = GlobalTemperature(1.0, 20.0)
    ours = ctkd_loss(s, t, module(t, s, -strength))
    g_theta, g_s = torch.autograd.grad(ours, (module.global_T, s))
    theta = torch.ones(1, requires_grad=True)  # the same temperature without the reversal layer
    (g_plain,) = torch.autograd.grad(ctkd_loss(s, t, 1 + 20 * torch.sigmoid(theta)), theta)
    assert g_plain.abs() > 1e-4
    assert torch.allclose(g_theta, -strength * g_plain, rtol=1e-5, atol=1e-9)
    (g_fixed,) = torch.autograd.grad(ctkd_loss(s, t, (1 + 20 * torch.sigmoid(torch.ones(1))).detach()), s)
    assert torch.allclose(g_s, g_fixed, atol=1e-9)
    official = OfficialGlobalT()  # and the whole official path: Global_T, loops.py's mapping, DistillKL
    theirs = official_distill_kl(s, t, official_temperature(official, t, s, -strength))
    g_theta_off, g_s_off = torch.autograd.grad(theirs, (official.global_T, s))
    assert torch.allclose(ours, theirs, atol=1e-6)
    # d/dtheta is a small difference of float32 sums (1e-2 against a loss of 7): equal to 1e-4 relative
    assert torch.allclose(g_theta, g_theta_off, rtol=2e-4) and torch.allclose(g_s, g_s_off, atol=1e-7)


def test_reversed_steps_raise_the_kd_loss_the_student_lowers():
    s, t = logits(1)
    module = GlobalTemperature(1.0, 20.0)
    before = ctkd_loss(s, t, module(t, s, -1.0))
    before.backward()
    with torch.no_grad():
        module.global_T -= 0.5 * module.global_T.grad  # a descent step on the reversed gradient
    assert ctkd_loss(s, t, module(t, s, -1.0)) > before


def test_the_instance_module_gradient_scales_with_the_factor_and_the_student_gets_none_through_it():
    torch.manual_seed(0)
    s, t = logits(2)
    module = InstanceTemperature(10, 8, 1.0, 20.0)
    grads = {}
    for factor in (1.0, -0.4):
        loss = ctkd_instance_loss(s, t, module(t, s, factor))
        grads[factor] = torch.autograd.grad(loss, [s, *module.parameters()])
    for plain, reversed_ in zip(grads[1.0][1:], grads[-0.4][1:]):
        assert plain.abs().sum() > 0 and torch.allclose(reversed_, -0.4 * plain, rtol=1e-5, atol=1e-9)
    assert torch.allclose(grads[1.0][0], grads[-0.4][0])  # the student's: the KD term's at that temperature
    assert torch.autograd.grad(module.raw(t, s).sum(), s, allow_unused=True) == (None,)  # detached inputs


# ----- the curriculum ------------------------------------------------------------------------------------
EPOCHS = [0, 1, 2, 3, 5, 7, 9, 10, 11, 150, 240]


@pytest.mark.parametrize("max_value, min_value, loops", [(0, -1, 10), (0.5, -2.0, 7.0), (0, -1, 40)])
def test_cosine_and_linear_curricula_are_the_officials(max_value, min_value, loops):
    cosine, linear = OfficialCosineDecay(max_value, min_value, loops), OfficialLinearDecay(max_value, min_value, loops)
    for epoch in EPOCHS:
        assert cosine_decay(epoch, max_value, min_value, loops) == pytest.approx(cosine.get_value(epoch), abs=1e-12)
        assert linear_decay(epoch, max_value, min_value, loops) == pytest.approx(linear.get_value(epoch), abs=1e-12)


def test_the_method_sets_the_official_run_s_factor_each_epoch():
    method = method_of()
    method.begin_stage(Stage("main", 240))
    seen = {}
    for epoch in range(1, 13):
        method.begin_epoch(epoch)
        seen[epoch] = method.decay_value
    # decay_value in the logit-standardization repository's CTKD logs: epoch 1 -0.0244717..., 5 -0.5
    assert seen[1] == pytest.approx(-0.02447174185242318, abs=1e-15) and seen[5] == pytest.approx(-0.5)
    assert seen[10] == seen[12] == -1.0
    linear = method_of("method.cosine_decay=false")
    linear.begin_epoch(4)
    assert linear.decay_value == pytest.approx(-0.4)


# ----- the temperature's range and the instance module ------------------------------------------------------
def test_the_temperature_stays_within_t_start_and_t_start_plus_t_end():
    module = GlobalTemperature(2.0, 3.0)
    s, t = logits()
    assert module(t, s, -1.0).item() == pytest.approx(2 + 3 / (1 + math.exp(-1)))  # Global_T starts at 1
    for raw in (-60.0, -5.0, 0.0, 5.0, 60.0):
        with torch.no_grad():
            module.global_T.fill_(raw)
        assert 2.0 <= module(t, s, -1.0).item() <= 5.0
    assert module(t, s, 1.0).shape == (1,)
    instance = InstanceTemperature(10, 16, 2.0, 3.0)
    with torch.no_grad():
        instance.mlp[2].weight.mul_(1000)  # saturate the sigmoid on both sides
    temperature = instance(t, s, 1.0)
    assert temperature.min() >= 2.0 and temperature.max() <= 5.0 and temperature.std() > 0
    method = method_of("method.t_start=2", "method.t_end=3")
    assert (method.temperature_module.t_start, method.temperature_module.t_end) == (2.0, 3.0)


def test_instance_module_shapes():
    module = InstanceTemperature(10, 7, 1.0, 20.0)
    assert [tuple(p.shape) for p in module.parameters()] == [(7, 20), (7,), (1, 7), (1,)]
    for n in (1, 5):
        s, t = logits(n=n)
        assert module(t, s, -1.0).shape == (n,)
    method = method_of("method.temp=instance", "method.instance_hidden=32")
    assert tuple(method.temperature_module.mlp[0].weight.shape) == (32, 20)


# ----- the loss -------------------------------------------------------------------------------------------
def value_and_grads(loss_fn, s, t, T):
    loss = loss_fn(s, t, T)
    return (loss, *torch.autograd.grad(loss, (s, T)))


def test_global_loss_is_official_distillkl_at_a_learned_t_in_value_and_gradients():
    s, t = logits(3)
    for value in (1.5, 4.0, 15.62):
        T = torch.tensor([value], requires_grad=True)
        (ours, g_s, g_T), (theirs, g_s_off, g_T_off) = (value_and_grads(f, s, t, T)
                                                        for f in (ctkd_loss, official_distill_kl))
        assert torch.allclose(ours, theirs, atol=1e-6) and torch.allclose(g_s, g_s_off, atol=1e-7)
        # d/dT is float32 sums that nearly cancel (5e-3 at T 15.6): both within 1e-6 of the float64 value
        assert torch.allclose(g_T, g_T_off, rtol=1e-5, atol=2e-6)


def test_instance_loss_is_the_readme_kl_loss_in_value_and_gradients():
    s, t = logits(4, n=12)
    T = (1 + 19 * torch.rand(12, generator=torch.Generator().manual_seed(5))).requires_grad_()
    (ours, g_s, g_T), (theirs, g_s_off, g_T_off) = (value_and_grads(f, s, t, T)
                                                    for f in (ctkd_instance_loss, official_instance_kd))
    assert torch.allclose(ours, theirs, rtol=1e-6, atol=1e-6) and torch.allclose(g_s, g_s_off, atol=1e-7)
    assert torch.allclose(g_T, g_T_off, rtol=1e-5, atol=1e-7)


def test_method_terms_weights_and_the_temperature_module_in_optimizer_and_checkpoint():
    method = method_of()
    assert method.weights() == {"ce": pytest.approx(0.1), "kd": 0.0, "ctkd": 0.9, "temperature": 0.0}
    method.begin_epoch(3)
    s, t = logits(6)
    terms = method.method_terms(Forward(s, t, {}, {}, torch.zeros(16, dtype=torch.long), torch.arange(16)))
    theirs = official_distill_kl(s, t, official_temperature(OfficialGlobalT(), t, s, method.decay_value))
    assert torch.allclose(terms["ctkd"], theirs, atol=1e-6)
    assert terms["temperature"].item() == pytest.approx(1 + 20 / (1 + math.exp(-1)))
    assert method.record_extras()["ctkd_temperature"] == pytest.approx(terms["temperature"].item())
    assert "temperature_module.global_T" in method.state_dict()
    optimizer = method.make_optimizer(method.trainable_parameters(Stage("main", 1)), compose_config().optim, 0.05)
    assert any(p is method.temperature_module.global_T for group in optimizer.param_groups for p in group["params"])


def test_one_step_with_logit_standardization_is_the_official_ls_ctkd():
    method = method_of("method.logit_standardize=true")
    assert method.weights() == {"ce": pytest.approx(0.1), "kd": 0.0, "ctkd": 9.0, "temperature": 0.0}
    method.begin_stage(Stage("main", 240))
    method.begin_epoch(2)
    s, t = logits(7)
    ours = method.method_terms(Forward(s, t, {}, {}, torch.zeros(16, dtype=torch.long), torch.arange(16)))["ctkd"]
    (g_ours,) = torch.autograd.grad(ours, s)
    temp = official_temperature(OfficialGlobalT(), t, s, method.decay_value)  # DistillKL_logit_stand
    theirs = official_distill_kl(official_normalize(s), official_normalize(t), temp)
    (g_theirs,) = torch.autograd.grad(theirs, s)
    assert torch.allclose(ours, theirs, atol=1e-6) and torch.allclose(g_ours, g_theirs, atol=1e-7)
    optimizer = method.make_optimizer(method.parameters(), compose_config().optim, 0.05)
    x, y = torch.randn(8, 1, 8, 8), torch.arange(8)
    out = method(x, y, torch.arange(8))
    method.optimizer_step(out, method.step_weights(), optimizer, torch.amp.GradScaler("cpu", enabled=False))
    assert method.temperature_module.global_T.item() != 1.0 and math.isfinite(out.terms["ctkd"].item())


# ----- refusals and runs ------------------------------------------------------------------------------------
def test_bad_keys_are_refused(kdrun, capsys):
    code, _ = kdrun("method=ctkd", "method.temp=foo")
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and "method.temp=foo is not allowed: one of global, instance" in err[-1]
    for override, message in [("method.decay_loops=0", "method.decay_loops=0 is not allowed"),
                              ("method.cosine_decay=maybe", "method.cosine_decay=maybe is not allowed"),
                              ("method.t_start=0", "method.t_start=0 is not allowed"),
                              ("method.decay_min=null", "method.decay_min=None is not allowed")]:
        with pytest.raises(ConfigError, match=message):
            method_of(override)


def assert_temperature_logged(record) -> None:
    assert record["status"] == "completed"
    assert 1.0 < record["ctkd_temperature"] < 21.0 and record["ctkd_decay_value"] == pytest.approx(-0.02447174185)
    with open(Path(record["run_dir"]) / "metrics.csv") as f:
        (row,) = list(csv.DictReader(f))
    assert 1.0 < float(row["loss_temperature"]) < 21.0 and float(row["loss_ctkd"]) > 0


def test_a_digits_run_with_the_global_temperature_trains_and_logs_it(kdrun):
    code, (record,) = kdrun("method=ctkd")
    assert code == 0
    assert_temperature_logged(record)


def test_vgg13_teaches_mobilenetv2_on_digits_with_instance_temperatures(tmp_path, vgg13_teacher):
    code = run_cli("epochs=1", "batch_size=128", f"results_dir={tmp_path}", "teacher=vgg13", "student=mobilenetv2",
                   f"teacher.checkpoint={vgg13_teacher}", "method=ctkd", "method.temp=instance", "optim.lr=0.01",
                   "transfer.labelled_fraction=0.3")  # a third of the images: MobileNetV2 is the slow part
    (record,) = results_under(tmp_path)
    assert code == 0 and (record["teacher"], record["student"]) == ("vgg13", "mobilenetv2")
    assert record["method.temp"] == "instance"
    assert_temperature_logged(record)
