"""dist (Huang et al. 2022, Knowledge Distillation from A Stronger Teacher) against a hand transcription of the
official hunto/image_classification_sota lib/models/losses/dist_kd.py (DIST_KD's classification submodule), with
the weights of configs/strategies/distill/dist_cifar.yaml and lib/models/losses/kd_loss.py (`dist_t4`)."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from conftest import FAST, compose_config, results_under, run_cli
from kdrun.experiment import prepare
from kdrun.methods.base import Forward
from kdrun.methods.dist import DIST, dist_loss, inter_class_relation, intra_class_relation
from kdrun.methods.logit_standardization import standardize_logits
from kdrun.teacher_access import as_logits


# ----- official transcription (dist_kd.py; kd_loss.py builds DIST(beta=1, gamma=1, tau=float("4"))) ------------
def cosine_similarity(a, b, eps=1e-8):
    return (a * b).sum(1) / (a.norm(dim=1) * b.norm(dim=1) + eps)


def pearson_correlation(a, b, eps=1e-8):
    return cosine_similarity(a - a.mean(1).unsqueeze(1), b - b.mean(1).unsqueeze(1), eps)


def official_inter(y_s, y_t):
    return 1 - pearson_correlation(y_s, y_t).mean()


def official_intra(y_s, y_t):
    return official_inter(y_s.transpose(0, 1), y_t.transpose(0, 1))


class OfficialDIST(nn.Module):
    def __init__(self, beta=1.0, gamma=1.0, tau=1.0):
        super().__init__()
        self.beta, self.gamma, self.tau = beta, gamma, tau

    def forward(self, z_s, z_t):
        y_s = (z_s / self.tau).softmax(dim=1)
        y_t = (z_t / self.tau).softmax(dim=1)
        inter_loss = self.tau ** 2 * official_inter(y_s, y_t)
        intra_loss = self.tau ** 2 * official_intra(y_s, y_t)
        return self.beta * inter_loss + self.gamma * intra_loss


def logits(n, k, seed, disagree=False):
    g = torch.Generator().manual_seed(seed)
    s = torch.randn(n, k, generator=g) * 3
    t = -4 * s + torch.randn(n, k, generator=g) if disagree else torch.randn(n, k, generator=g) * 5 + 1
    return s.requires_grad_(), t


def method_of(*overrides: str):
    return prepare(compose_config(*FAST, "results_dir=/nonexistent", "method=dist", *overrides)).method


# ----- the loss ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("n, k, disagree, beta, gamma, tau", [
    (16, 10, False, 1.0, 1.0, 4.0),   # the CIFAR defaults
    (16, 10, True, 1.0, 1.0, 4.0),    # the teacher ranks the classes opposite to the student
    (8, 100, False, 2.0, 0.5, 1.0),   # ImageNet's tau 1, unequal weights
    (2, 10, False, 1.0, 1.0, 4.0),    # two samples: each class's Pearson is about +-1, eps still counts
    (1, 10, True, 1.0, 1.0, 4.0),     # one sample: every centred column is 0, the intra term the constant 1
])
def test_dist_loss_equals_the_official_value_and_gradient(n, k, disagree, beta, gamma, tau):
    s, t = logits(n, k, seed=n + k, disagree=disagree)
    ours = dist_loss(s, t, beta, gamma, tau)
    theirs = OfficialDIST(beta, gamma, tau)(s, t)
    (g_ours,) = torch.autograd.grad(ours, s)
    (g_theirs,) = torch.autograd.grad(theirs, s)
    assert torch.allclose(ours, theirs, atol=1e-6) and torch.allclose(g_ours, g_theirs, atol=1e-7)
    assert torch.isfinite(g_ours).all() and g_ours.abs().sum() > 0


def test_strong_disagreement_costs_more_than_agreement():
    s, t = logits(16, 10, seed=3, disagree=True)
    assert dist_loss(s, t, tau=4.0) > 16 * 1.5  # Pearson < 0: each relation term above tau^2
    assert dist_loss(s, s.detach(), tau=4.0).item() == pytest.approx(0.0, abs=1e-5)


def test_a_batch_of_one_has_a_constant_intra_term():
    s, t = logits(1, 10, seed=5)
    p_s, p_t = s.softmax(1), t.softmax(1)
    intra = intra_class_relation(p_s, p_t)
    assert intra.item() == 1.0
    (grad,) = torch.autograd.grad(intra, s)
    assert torch.equal(grad, torch.zeros_like(grad))


def test_relations_are_pearson_correlations_so_an_affine_teacher_is_matched():
    s, _ = logits(6, 10, seed=7)
    p = s.softmax(1).detach()
    assert inter_class_relation(p, 3 * p + 0.1).item() == pytest.approx(0.0, abs=1e-6)
    assert intra_class_relation(p, p).item() == pytest.approx(0.0, abs=1e-4)  # eps vs columns of ~1e-3 spread
    assert torch.allclose(intra_class_relation(p, p.flip(0)), inter_class_relation(p.T, p.flip(0).T))


def test_a_per_sample_shift_of_the_teacher_leaves_the_loss_unchanged():
    s, t = logits(16, 10, seed=11)
    shift = torch.randn(16, 1) * 50
    for standardize in (False, True):
        z_t = standardize_logits(t) if standardize else t
        shifted = standardize_logits(t + shift) if standardize else t + shift
        assert torch.allclose(dist_loss(s, shifted, tau=4.0), dist_loss(s, z_t, tau=4.0), atol=1e-6)
    log_p = as_logits(torch.softmax(t, 1), "probabilities")
    assert torch.allclose(dist_loss(s, log_p, tau=4.0), dist_loss(s, t, tau=4.0), atol=1e-5)
    assert DIST.teacher_access == "probabilities"


# ----- the method ----------------------------------------------------------------------------------------------
def test_defaults_are_the_official_cifar_weights_and_the_term_is_the_official_loss():
    method = method_of()
    assert method.T == 4.0 and (method.dist_beta, method.dist_gamma) == (1.0, 1.0)
    assert method.weights() == {"ce": 1.0, "kd": 0.0, "dist": 2.0}  # ori_loss_weight 1, kd_loss_weight 2
    assert method.uses_teacher_outputs() and not method.uses_labels
    s, t = logits(16, 10, seed=13)
    term = method.method_terms(Forward(s, t, {}, {}, torch.zeros(16, dtype=torch.long), torch.arange(16)))
    assert torch.allclose(term["dist"], OfficialDIST(1.0, 1.0, 4.0)(s, t), atol=1e-6)


def test_one_step_with_logit_standardization():
    method = method_of("method.logit_standardize=true")
    assert method.T == 2.0 and method.weights() == {"ce": 1.0, "kd": 0.0, "dist": 9.0}
    torch.manual_seed(0)
    images, labels = torch.randn(8, 1, 8, 8), torch.arange(8)
    out = method(images, labels, torch.arange(8))
    with torch.no_grad():
        t_logits = method.teacher(images)
    expected = OfficialDIST(1.0, 1.0, 2.0)(standardize_logits(out.logits), standardize_logits(t_logits))
    assert torch.allclose(out.terms["dist"], expected, atol=1e-6)
    sum(method.weights()[name] * value for name, value in out.terms.items()).backward()
    assert all(p.grad is not None for p in method.student.parameters())


def test_a_bad_weight_is_refused_in_one_line(kdrun, capsys):
    code, _ = kdrun("method=dist", "method.dist_beta=-1")
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and "method.dist_beta=-1 is not allowed: must be a number >= 0" in err[-1]


def test_a_digits_run_distils(kdrun):
    code, (record,) = kdrun("method=dist", "teacher=resnet8")
    assert code == 0 and record["status"] == "completed" and record["method"] == "dist"


def test_vgg13_teaches_mobilenetv2(tmp_path, vgg13_teacher):
    code = run_cli("epochs=1", "batch_size=128", f"results_dir={tmp_path}", "teacher=vgg13", "student=mobilenetv2",
                   f"teacher.checkpoint={vgg13_teacher}", "method=dist", "optim.lr=0.01")
    (record,) = results_under(tmp_path)
    assert code == 0 and record["status"] == "completed"
    assert (record["teacher"], record["student"]) == ("vgg13", "mobilenetv2")
