"""ttm and wttm (Zheng & Yang 2024) against zkxufo/TTM, transcribed by hand.

The losses of distiller_zoo/ttm.py and distiller_zoo/wttm.py (TTM.forward, WTTM.forward), the weights of
helper/loops.py:83 (`gamma * CE + alpha * add + beta * kd`), then the refusals and CLI runs on digits."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from omegaconf import OmegaConf

from conftest import results_under, run_cli
from kdrun.errors import ConfigError
from kdrun.methods import METHODS, Forward
from kdrun.methods.kd import kd_loss
from kdrun.methods.ttm import ttm_loss
from kdrun.methods.wttm import wttm_loss
from kdrun.models import create_model
from kdrun.paths import conf_dir

CLASSES = 10
LOSSES = {"ttm": ttm_loss, "wttm": wttm_loss}


# ----- official transcriptions --------------------------------------------------------------------------
def official_ttm(y_s, y_t, l):
    """distiller_zoo/ttm.py, TTM.forward."""
    p_s = F.log_softmax(y_s, dim=1)
    p_t = torch.pow(torch.softmax(y_t, dim=1), l)
    norm = torch.sum(p_t, dim=1)
    p_t = p_t / norm.unsqueeze(1)
    KL = torch.sum(F.kl_div(p_s, p_t, reduction='none'), dim=1)
    return torch.mean(KL)


def official_wttm(y_s, y_t, l):
    """distiller_zoo/wttm.py, WTTM.forward: the same KL, each sample weighted by the power sum `norm`."""
    p_s = F.log_softmax(y_s, dim=1)
    p_t = torch.pow(torch.softmax(y_t, dim=1), l)
    norm = torch.sum(p_t, dim=1)
    p_t = p_t / norm.unsqueeze(1)
    KL = torch.sum(F.kl_div(p_s, p_t, reduction='none'), dim=1)
    return torch.mean(norm * KL)


OFFICIAL = {"ttm": official_ttm, "wttm": official_wttm}


def value_and_grad(loss_fn, s, t, gamma):
    s = s.clone().requires_grad_(True)
    with torch.no_grad():  # the official loop's teacher forward
        t = t.clone()
    value = loss_fn(s, t, gamma)
    (grad,) = torch.autograd.grad(value, s)
    return value.detach(), grad


# ----- the losses ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", LOSSES)
@pytest.mark.parametrize("gamma", [0.1, 0.2, 0.5, 1.0, 2.0])
def test_loss_and_gradient_match_the_official_code(name, gamma):
    torch.manual_seed(0)
    s, t = torch.randn(16, 100) * 2, torch.randn(16, 100) * 3
    ours, ours_grad = value_and_grad(LOSSES[name], s, t, gamma)
    official, official_grad = value_and_grad(OFFICIAL[name], s, t, gamma)
    assert torch.allclose(ours, official, atol=1e-5, rtol=1e-6)
    assert torch.allclose(ours_grad, official_grad, atol=1e-7, rtol=1e-5)


@pytest.mark.parametrize("name", LOSSES)
def test_near_one_hot_teacher_stays_finite_and_official(name):
    """Logit gaps of 30 to 1000: the official softmax underflows to exact zeros, which the power keeps at zero;
    the log-space target differs by at most e^(-gamma * gap), far below the tolerance."""
    torch.manual_seed(1)
    s = torch.randn(8, CLASSES) * 5
    t = torch.randn(8, CLASSES)
    t[torch.arange(8), torch.arange(8)] += torch.tensor([30.0, 60.0, 100.0, 200.0, 400.0, 700.0, 1000.0, 1000.0])
    s[7, 7] += 1000.0  # and a student as confident as its teacher
    for gamma in (0.1, 0.5, 1.0):
        ours, ours_grad = value_and_grad(LOSSES[name], s, t, gamma)
        official, official_grad = value_and_grad(OFFICIAL[name], s, t, gamma)
        assert torch.isfinite(ours) and torch.isfinite(ours_grad).all()
        assert torch.allclose(ours, official, atol=1e-5, rtol=1e-5)
        assert torch.allclose(ours_grad, official_grad, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("name", LOSSES)
def test_where_the_official_float32_softmax_underflows_the_loss_is_its_float64_value(name):
    """The deliberate difference: gaps of 104 to ~200 underflow to 0 in float32 while their power 0.1 is not
    negligible; the log-space loss keeps the value the official code computes in float64."""
    torch.manual_seed(5)
    s, t = torch.randn(4, 100), torch.randn(4, 100)
    t[:, 0] += 120.0
    ours, ours_grad = value_and_grad(LOSSES[name], s, t, 0.1)
    exact, exact_grad = value_and_grad(OFFICIAL[name], s.double(), t.double(), 0.1)
    official32, _ = value_and_grad(OFFICIAL[name], s, t, 0.1)
    assert torch.allclose(ours.double(), exact, atol=1e-5) and torch.allclose(ours_grad.double(), exact_grad, atol=1e-7)
    assert not torch.allclose(official32.double(), exact, atol=1e-3)


def test_gamma_one_is_kd_at_temperature_one_and_the_weight_is_the_power_sum():
    torch.manual_seed(2)
    s, t = torch.randn(6, CLASSES), torch.randn(6, CLASSES)
    assert torch.allclose(ttm_loss(s, t, 1.0), kd_loss(s, t, 1.0), atol=1e-6)
    assert torch.allclose(wttm_loss(s, t, 1.0), kd_loss(s, t, 1.0), atol=1e-6)  # sum_k p_t(k) = 1
    uniform = torch.zeros(6, CLASSES)  # U = K * (1 / K)^gamma = K^(1 - gamma) for every sample
    assert torch.allclose(wttm_loss(s, uniform, 0.2), CLASSES ** 0.8 * ttm_loss(s, uniform, 0.2), atol=1e-5)
    assert ttm_loss(t * 0.1, t, 0.1).item() == pytest.approx(0.0, abs=1e-6)  # softmax(z_t / T) matched exactly


@pytest.mark.parametrize("name", LOSSES)
def test_teacher_probabilities_suffice(name):
    """teacher_access=probabilities: a constant shift of the teacher's logits, or log p_t in their place,
    leaves both losses unchanged."""
    torch.manual_seed(3)
    s, t = torch.randn(8, CLASSES), torch.randn(8, CLASSES) * 4
    loss = LOSSES[name]
    assert METHODS.get(name).teacher_access == "probabilities"
    assert torch.allclose(loss(s, t + torch.randn(8, 1) * 50, 0.2), loss(s, t, 0.2), atol=1e-5)
    assert torch.allclose(loss(s, F.log_softmax(t, 1), 0.2), loss(s, t, 0.2), atol=1e-6)


# ----- the methods --------------------------------------------------------------------------------------
def build(name: str, **overrides):
    cfg = OmegaConf.merge(OmegaConf.load(conf_dir() / "method" / f"{name}.yaml"), overrides)
    torch.manual_seed(0)
    method = METHODS.get(name)(cfg, create_model("resnet8", CLASSES, 1), create_model("resnet14", CLASSES, 1),
                               CLASSES)
    method.prepare((1, 8, 8))
    return method


@pytest.mark.parametrize("name, gamma, beta", [("ttm", 0.1, 45.0), ("wttm", 0.2, 4.0)])
def test_official_weights_and_one_step(name, gamma, beta):
    method = build(name)
    assert method.gamma == gamma and method.weights() == {"ce": 1.0, "kd": 0.0, name: beta}
    assert method.uses_teacher_outputs()  # alpha 0, yet the teacher is run
    x, y = torch.randn(4, 1, 8, 8), torch.tensor([0, 1, 2, 3])
    out = method(x, y, torch.arange(4))
    assert set(out.terms) == {"ce", name}
    with torch.no_grad():
        t_logits = method.teacher(x)
    assert torch.allclose(out.terms[name], OFFICIAL[name](out.logits, t_logits, gamma), atol=1e-6)
    sum(method.weights()[k] * v for k, v in out.terms.items()).backward()
    assert all(p.grad is not None for p in method.student.parameters())
    assert all(p.grad is None for p in method.teacher.parameters())


def test_method_terms_use_the_configured_gamma():
    method = build("wttm", gamma=0.5)
    torch.manual_seed(4)
    s, t = torch.randn(4, CLASSES), torch.randn(4, CLASSES)
    fw = Forward(s, t, {}, {}, torch.zeros(4, dtype=torch.long), torch.arange(4))
    assert torch.allclose(method.method_terms(fw)["wttm"], official_wttm(s, t, 0.5), atol=1e-6)


@pytest.mark.parametrize("name", LOSSES)
@pytest.mark.parametrize("gamma", [0, -1, "high"])
def test_bad_gamma_is_refused(name, gamma):
    with pytest.raises(ConfigError, match=rf"^method.gamma={gamma} is not allowed: must be a number > 0$"):
        build(name, gamma=gamma)


def test_logit_standardization_is_refused_in_one_line(kdrun, capsys):
    code, _ = kdrun("method=wttm", "+method.logit_standardize=true")
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and "method.logit_standardize=true is not allowed with method=wttm" in err[-1]


@pytest.mark.parametrize("name, access", [("ttm", "full"), ("wttm", "probabilities")])
def test_cli_run_on_digits(kdrun, name, access):
    code, (record,) = kdrun(f"method={name}", f"teacher.access={access}")
    assert code == 0 and record["status"] == "completed"


def test_wttm_vgg13_teaches_mobilenetv2(tmp_path, vgg13_teacher):
    code = run_cli("epochs=1", "batch_size=128", f"results_dir={tmp_path}", "teacher=vgg13", "student=mobilenetv2",
                   f"teacher.checkpoint={vgg13_teacher}", "method=wttm", "optim.lr=0.01")
    (record,) = results_under(tmp_path)
    assert code == 0 and record["status"] == "completed"
    assert (record["teacher"], record["student"]) == ("vgg13", "mobilenetv2")
