"""nkd (Yang et al. 2023, Normalized KD) against a hand transcription of the official yzd-v/cls_KD
mmcls/models/dis_losses/nkd.py::NKDLoss (the fixed mask of its last commit), with the temp and gamma of
configs/distillers/cifar100/res34_distill_res18_cifar.py and the distiller's `ori_loss + loss_nkd`."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from conftest import FAST, compose_config, results_under, run_cli
from kdrun.experiment import prepare
from kdrun.methods.base import Forward
from kdrun.methods.logit_standardization import standardize_logits
from kdrun.methods.nkd import NKD, nkd_loss
from kdrun.teacher_access import as_logits


# ----- official transcription (NKDLoss.forward) ------------------------------------------------------------------
class OfficialNKD(nn.Module):
    def __init__(self, temp=1.0, gamma=1.5):
        super().__init__()
        self.temp, self.gamma = temp, gamma
        self.log_softmax = nn.LogSoftmax(dim=1)

    def forward(self, logit_s, logit_t, gt_label):
        if len(gt_label.size()) > 1:
            label = torch.max(gt_label, dim=1, keepdim=True)[1]
        else:
            label = gt_label.view(len(gt_label), 1)
        N, c = logit_s.shape
        s_i = self.log_softmax(logit_s)
        t_i = F.softmax(logit_t, dim=1)
        s_t = torch.gather(s_i, 1, label)
        t_t = torch.gather(t_i, 1, label).detach()
        loss_t = - (t_t * s_t).mean()
        mask = torch.ones_like(logit_s).scatter_(1, label, 0).bool()
        logit_s = logit_s[mask].reshape(N, -1)
        logit_t = logit_t[mask].reshape(N, -1)
        S_i = self.log_softmax(logit_s / self.temp)
        T_i = F.softmax(logit_t / self.temp, dim=1)
        loss_non = (T_i * S_i).sum(dim=1).mean()
        loss_non = - self.gamma * (self.temp ** 2) * loss_non
        return loss_t + loss_non


def batch(n, k, seed, disagree=False):
    g = torch.Generator().manual_seed(seed)
    s = torch.randn(n, k, generator=g) * 3
    labels = torch.randint(0, k, (n,), generator=g)
    if disagree:  # the teacher is sure of a wrong class and ranks the rest opposite to the student
        t = -4 * s + 20 * F.one_hot((labels + 1) % k, k)
    else:
        t = torch.randn(n, k, generator=g) * 5 + 1
    return s.requires_grad_(), t, labels


def method_of(*overrides: str):
    return prepare(compose_config(*FAST, "results_dir=/nonexistent", "method=nkd", *overrides)).method


# ----- the loss ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("n, k, disagree, temp, gamma", [
    (16, 10, False, 3.0, 3.5),   # the CIFAR-100 config
    (16, 10, True, 3.0, 3.5),    # the teacher puts its mass on a wrong class
    (8, 100, False, 1.0, 1.5),   # the ImageNet config, NKDLoss's own defaults
    (2, 10, True, 3.0, 3.5),
    (1, 10, False, 3.0, 3.5),
    (3, 2, False, 3.0, 3.5),     # one non-target class: its renormalised softmax is 1, the term 0
])
def test_nkd_loss_equals_the_official_value_and_gradient(n, k, disagree, temp, gamma):
    s, t, labels = batch(n, k, seed=n + k, disagree=disagree)
    ours = nkd_loss(s, t, labels, temp, gamma)
    theirs = OfficialNKD(temp, gamma)(s, t, labels)
    (g_ours,) = torch.autograd.grad(ours, s)
    (g_theirs,) = torch.autograd.grad(theirs, s)
    assert torch.allclose(ours, theirs, atol=1e-6) and torch.allclose(g_ours, g_theirs, atol=1e-7)
    assert torch.isfinite(g_ours).all() and g_ours.abs().sum() > 0


def test_the_non_target_term_ignores_the_target_logit():
    s, t, labels = batch(8, 10, seed=1)
    bumped = t + 30 * F.one_hot(labels, 10)  # the teacher's target probability changes, its non-targets' ratios not
    target_only = OfficialNKD(3.0, 0.0)
    difference = nkd_loss(s, bumped, labels, 3.0, 3.5) - nkd_loss(s, t, labels, 3.0, 3.5)
    assert torch.allclose(difference, target_only(s, bumped, labels) - target_only(s, t, labels), atol=1e-6)


def test_a_per_sample_shift_of_the_teacher_leaves_the_loss_unchanged():
    s, t, labels = batch(16, 10, seed=11)
    shift = torch.randn(16, 1) * 50
    assert torch.allclose(nkd_loss(s, t + shift, labels, 3.0, 3.5), nkd_loss(s, t, labels, 3.0, 3.5), atol=1e-5)
    standardized = nkd_loss(s, standardize_logits(t + shift), labels, 2.0, 3.5)
    assert torch.allclose(standardized, nkd_loss(s, standardize_logits(t), labels, 2.0, 3.5), atol=1e-5)
    log_p = as_logits(torch.softmax(t, 1), "probabilities")
    assert torch.allclose(nkd_loss(s, log_p, labels, 3.0, 3.5), nkd_loss(s, t, labels, 3.0, 3.5), atol=1e-5)
    assert NKD.teacher_access == "probabilities" and NKD.uses_labels


# ----- the method ----------------------------------------------------------------------------------------------
def test_defaults_are_the_official_cifar_config_and_the_term_is_the_official_loss():
    method = method_of()
    assert method.T == 3.0 and method.gamma == 3.5
    assert method.weights() == {"ce": 1.0, "kd": 0.0, "nkd": 1.0}  # the distiller's ori_loss + loss_nkd
    assert method.uses_teacher_outputs()
    s, t, labels = batch(16, 10, seed=13)
    term = method.method_terms(Forward(s, t, {}, {}, labels, torch.arange(16)))
    assert torch.allclose(term["nkd"], OfficialNKD(3.0, 3.5)(s, t, labels), atol=1e-6)


def test_one_step_with_logit_standardization():
    method = method_of("method.logit_standardize=true")
    assert method.T == 2.0 and method.weights() == {"ce": 1.0, "kd": 0.0, "nkd": 9.0}
    torch.manual_seed(0)
    images, labels = torch.randn(8, 1, 8, 8), torch.arange(8)
    out = method(images, labels, torch.arange(8))
    with torch.no_grad():
        t_logits = method.teacher(images)
    expected = OfficialNKD(2.0, 3.5)(standardize_logits(out.logits), standardize_logits(t_logits), labels)
    assert torch.allclose(out.terms["nkd"], expected, atol=1e-6)
    sum(method.weights()[name] * value for name, value in out.terms.items()).backward()
    assert all(p.grad is not None for p in method.student.parameters())


def test_a_bad_gamma_is_refused_in_one_line(kdrun, capsys):
    code, _ = kdrun("method=nkd", "method.gamma=-0.5")
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and "method.gamma=-0.5 is not allowed: must be a number >= 0" in err[-1]


def test_a_digits_run_distils(kdrun):
    code, (record,) = kdrun("method=nkd", "teacher=resnet8")
    assert code == 0 and record["status"] == "completed" and record["method"] == "nkd"


def test_vgg13_teaches_mobilenetv2(tmp_path, vgg13_teacher):
    code = run_cli("epochs=1", "batch_size=128", f"results_dir={tmp_path}", "teacher=vgg13", "student=mobilenetv2",
                   f"teacher.checkpoint={vgg13_teacher}", "method=nkd", "optim.lr=0.01")
    (record,) = results_under(tmp_path)
    assert code == 0 and record["status"] == "completed"
    assert (record["teacher"], record["student"]) == ("vgg13", "mobilenetv2")
