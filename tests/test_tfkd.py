"""Tf-KD (Yuan et al. CVPR 2020) as the authors' code computes it: tfkd_reg, tfkd_self and the two recipes.

The reference formulas are transcribed from yuanli2333/Teacher-free-Knowledge-Distillation my_loss_function.py
(written out here in float64, term by term; nothing is imported from it):
  loss_kd_regularization: (1 - a) CE + a * multiplier * sum(q (log q - log_softmax(z))) / (N K),
                          q = softmax(p^d / T), p^d = 0.99 on the true class, 0.01 / (K - 1) elsewhere
  loss_kd_self:           (1 - a) CE + a * multiplier * T^2 sum(p_t (log p_t - log_softmax(z / T))) / (N K),
                          p_t = softmax(z_t / T)
  loss_kd:                loss_kd_self without the multiplier
`nn.KLDivLoss()` is the default reduction 'mean': the summed KL divided by every element, N x K.
"""
import csv
import math
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from conftest import compose_config
from kdrun.errors import ConfigError
from kdrun.experiment import prepare
from kdrun.methods import METHODS
from kdrun.methods.base import Forward
from kdrun.methods.kd import kd_loss
from kdrun.methods.tfkd_reg import tfkd_reg_loss


def plan_for(*overrides):
    return prepare(compose_config("device=cpu", *overrides))


def official_reg(z, labels, alpha, T, multiplier, correct_prob=0.99):
    """loss_kd_regularization, transcribed (float64)."""
    z = z.double()
    n, k = z.shape
    teacher_soft = torch.ones_like(z) * (1 - correct_prob) / (k - 1)
    for i in range(n):
        teacher_soft[i, labels[i]] = correct_prob
    q = torch.softmax(teacher_soft / T, dim=1)
    kl_mean = (q * (q.log() - torch.log_softmax(z, dim=1))).sum() / (n * k)
    ce = -torch.log_softmax(z, dim=1)[torch.arange(n), labels].mean()
    return (1 - alpha) * ce + alpha * kl_mean * multiplier


def official_self(z, labels, t, alpha, T, multiplier=1.0):
    """loss_kd_self (loss_kd with multiplier 1), transcribed (float64)."""
    z, t = z.double(), t.double()
    n, k = z.shape
    p_t = torch.softmax(t / T, dim=1)
    kl_mean = (p_t * (p_t.log() - torch.log_softmax(z / T, dim=1))).sum() / (n * k)
    ce = -torch.log_softmax(z, dim=1)[torch.arange(n), labels].mean()
    return (1 - alpha) * ce + alpha * kl_mean * T * T * multiplier


def weighted_total(method, logits, labels, t_logits=None):
    """The loss the runner minimises for these logits: sum of weight x term over the method's terms."""
    fw = Forward(logits, t_logits, {}, {}, labels, torch.arange(len(labels)))
    terms = method.response_terms(fw)
    terms.update(method.method_terms(fw))
    weights = method.step_weights()
    return sum(weights[name] * value for name, value in terms.items())


def random_batch(n=16, k=10, scale=3.0, seed=0):
    torch.manual_seed(seed)
    return scale * torch.randn(n, k), torch.randint(0, k, (n,)), scale * torch.randn(n, k)


def value_and_grad(fn, z):
    z = z.detach().clone().requires_grad_()
    value = fn(z)
    (grad,) = torch.autograd.grad(value, z)
    return value.item(), grad


# ----- tfkd_reg -------------------------------------------------------------------------------------------
@pytest.mark.parametrize("n, k, T, alpha, multiplier", [
    (16, 10, 40.0, 0.95, 1.0),    # mobilenetv2's values (the default)
    (32, 100, 20.0, 0.1, 100.0),  # resnet18's values, on CIFAR-100's K
    (8, 100, 10.0, 0.95, 1.0),    # shufflenetv2's
])
def test_tfkd_reg_loss_value_and_gradient_equal_the_official_formula(n, k, T, alpha, multiplier):
    z, y, _ = random_batch(n, k)
    ref, ref_grad = value_and_grad(lambda v: official_reg(v, y, alpha, T, multiplier), z)
    ours, grad = value_and_grad(
        lambda v: (1 - alpha) * torch.nn.functional.cross_entropy(v, y) + alpha * tfkd_reg_loss(v, y, 0.99, T, multiplier), z)
    assert ours == pytest.approx(ref, rel=1e-5)  # float32 against float64
    assert torch.allclose(grad.double(), ref_grad.double(), rtol=1e-5, atol=1e-6)


def test_tfkd_reg_method_minimises_the_official_loss():
    method = plan_for("method=tfkd_reg", "method.multiplier=50", "method.T=20", "method.alpha=0.1").method
    z, y, _ = random_batch(12, 10, seed=1)
    ref, ref_grad = value_and_grad(lambda v: official_reg(v, y, 0.1, 20.0, 50.0), z)
    ours, grad = value_and_grad(lambda v: weighted_total(method, v, y), z)
    assert ours == pytest.approx(ref, rel=1e-5)  # float32 against float64
    assert torch.allclose(grad.double(), ref_grad.double(), rtol=1e-5, atol=1e-6)


def test_tfkd_reg_is_not_the_papers_formula():
    # The authors' code softens p^d, not the student; no T^2. The paper's T^2 KL(p^d || p_s^T) is far off.
    z, y, _ = random_batch(16, 10)
    papers = torch.nn.functional.kl_div(torch.log_softmax(z / 40, 1), torch.full((16, 10), 0.01 / 9)
                                        .scatter(1, y[:, None], 0.99), reduction="batchmean") * 1600
    assert tfkd_reg_loss(z, y, 0.99, 40.0).item() < papers.item() / 100


def test_tfkd_reg_batchmean_is_k_times_mean():
    z, y, _ = random_batch(8, 10)
    mean = tfkd_reg_loss(z, y, 0.99, 20.0, reduction="mean")
    assert tfkd_reg_loss(z, y, 0.99, 20.0, reduction="batchmean").item() == pytest.approx(10 * mean.item(), rel=1e-6)
    method = plan_for("method=tfkd_reg", "method.kl_reduction=batchmean").method
    fw = Forward(z, None, {}, {}, y, torch.arange(8))
    expected = 10 * tfkd_reg_loss(z, y, 0.99, 40.0).item()
    assert method.method_terms(fw)["virtual_kd"].item() == pytest.approx(expected, rel=1e-6)


def test_tfkd_reg_defaults_are_the_authors_mobilenetv2_run():
    # base_mobilenetv2/params.json: reg_temperature 40, reg_alpha 0.95, multiplier 1; correct_prob 0.99 in the code.
    node = OmegaConf.to_container(compose_config("method=tfkd_reg").method, resolve=True)
    assert {k: node[k] for k in ("a", "T", "alpha", "multiplier", "kl_reduction")} == \
        {"a": 0.99, "T": 40.0, "alpha": 0.95, "multiplier": 1.0, "kl_reduction": "mean"}
    method = plan_for("method=tfkd_reg").method
    assert method.weights() == {"ce": pytest.approx(0.05), "virtual_kd": 0.95}
    assert "loss_kd_regularization" in METHODS.get("tfkd_reg").official_code


def test_tfkd_multiplier_must_be_a_number_at_least_zero():
    for name in ("tfkd_reg", "tfkd_self"):
        with pytest.raises(ConfigError, match=r"method.multiplier=-1 is not allowed"):
            plan_for(f"method={name}", "method.multiplier=-1")


# ----- tfkd_self and kd_loss's reduction --------------------------------------------------------------------
def test_kd_loss_mean_is_batchmean_over_the_classes():
    z, _, t = random_batch(16, 10)
    for T in (1.0, 4.0, 20.0):
        assert kd_loss(z, t, T, reduction="mean").item() == \
            pytest.approx(kd_loss(z, t, T, reduction="batchmean").item() / 10, rel=1e-6)


@pytest.mark.parametrize("T, alpha, multiplier", [(20.0, 0.95, 1.0), (6.0, 0.95, 50.0), (20.0, 0.9, 100.0)])
def test_tfkd_self_loss_equals_the_official_formula(T, alpha, multiplier):
    method = plan_for("method=tfkd_self", f"method.T={T}", f"method.alpha={alpha}",
                      f"method.multiplier={multiplier}").method
    assert method.kl_reduction == "mean"
    z, y, t = random_batch(16, 10, seed=2)
    ref, ref_grad = value_and_grad(lambda v: official_self(v, y, t, alpha, T, multiplier), z)
    ours, grad = value_and_grad(lambda v: weighted_total(method, v, y, t), z)
    assert ours == pytest.approx(ref, rel=1e-5)  # float32 against float64
    assert torch.allclose(grad.double(), ref_grad.double(), rtol=1e-5, atol=1e-6)
    # the multiplier scales the KD weight; CE keeps 1 - alpha; the logged kd term is the plain KD term
    assert method.weights() == {"ce": pytest.approx(1 - alpha), "kd": pytest.approx(alpha * multiplier)}
    fw = Forward(z, t, {}, {}, y, torch.arange(16))
    assert method.response_terms(fw)["kd"].item() == pytest.approx(kd_loss(z, t, T, "mean").item(), rel=1e-6)


def test_tfkd_self_defaults_are_the_authors_mobilenetv2_run():
    # mobilenet_distill/mobilenet_self_teacher/params.json: temperature 20, alpha 0.95, multiplier 1.
    node = OmegaConf.to_container(compose_config("method=tfkd_self").method, resolve=True)
    assert {k: node[k] for k in ("T", "alpha", "multiplier", "kl_reduction")} == \
        {"T": 20.0, "alpha": 0.95, "multiplier": 1.0, "kl_reduction": "mean"}
    assert "loss_kd_self" in METHODS.get("tfkd_self").official_code


def test_tfkd_self_kd_until_epoch_still_drops_the_scaled_kd():
    method = plan_for("method=tfkd_self", "method.multiplier=50", "method.kd_until_epoch=2").method
    method.begin_stage(method.stages(3)[-1])
    for epoch in (1, 2, 3):
        method.begin_epoch(epoch)
    assert method.step_weights() == {"ce": 1.0, "kd": 0.0}


# ----- recipes ---------------------------------------------------------------------------------------------
PROTOCOL = dict(epochs=200, batch_size=128, lr=0.1, momentum=0.9, nesterov=False, weight_decay=5e-4,
                milestones=[60, 120, 160], gamma=0.2, warmup_epochs=1, dataset="cifar100")


@pytest.mark.parametrize("recipe, teacher, student, T, alpha, snapshot", [
    ("tfkd_poor_teacher", "resnet18", "mobilenetv2", 20.0, 0.95, 1),   # mobilenet_distill/resnet18_teacher
    ("tfkd_reverse_kd", "mobilenetv2", "resnet18", 20.0, 0.6, None),   # resnet18_distill/mobilenet_v2_teacher
])
def test_recipes_carry_the_authors_values(recipe, teacher, student, T, alpha, snapshot):
    cfg = compose_config(f"+experiment={recipe}")
    got = dict(epochs=cfg.epochs, batch_size=cfg.batch_size, lr=cfg.optim.lr, momentum=cfg.optim.momentum,
               nesterov=cfg.optim.nesterov, weight_decay=cfg.optim.weight_decay,
               milestones=list(cfg.sched.milestones), gamma=cfg.sched.gamma,
               warmup_epochs=cfg.sched.warmup_epochs, dataset=cfg.dataset.name)
    assert got == PROTOCOL
    assert (cfg.method.name, cfg.method.T, cfg.method.alpha, cfg.method.kl_reduction) == ("kd", T, alpha, "mean")
    assert cfg.method.get("multiplier") is None  # loss_kd has none
    assert (cfg.teacher.name, cfg.student.name, cfg.teacher.snapshot_epoch) == (teacher, student, snapshot)
    assert cfg.teacher.lr == 0.1 and cfg.teacher.epochs == 200  # the authors' teachers: base_<model>/params.json


# ----- end to end ------------------------------------------------------------------------------------------
def metrics_of(results, method):
    run_dir = Path(next(r for r in results if r["method"] == method)["run_dir"])
    with open(run_dir / "metrics.csv") as f:
        return list(csv.DictReader(f))


def test_tfkd_reg_trains(kdrun):
    code, results = kdrun("method=tfkd_reg")
    assert code == 0 and results[0]["status"] == "completed" and results[0]["teacher"] is None
    assert (results[0]["method.multiplier"], results[0]["method.kl_reduction"]) == (1.0, "mean")
    row = metrics_of(results, "tfkd_reg")[-1]
    assert math.isfinite(float(row["loss_virtual_kd"])) and float(row["loss_virtual_kd"]) > 0


def test_tfkd_self_trains(kdrun):
    code, results = kdrun("method=tfkd_self", "method.multiplier=10", "student=resnet8", "teacher=resnet26")
    record = next(r for r in results if r["method"] == "tfkd_self")
    assert code == 0 and record["status"] == "completed" and record["teacher"] == "resnet8"
    row = metrics_of(results, "tfkd_self")[-1]
    assert math.isfinite(float(row["loss_kd"])) and float(row["loss_kd"]) > 0
