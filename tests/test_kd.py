import math

import pytest
import torch
from omegaconf import OmegaConf

from kdrun.methods.kd import KD, kd_loss
from kdrun.models import create_model


def test_kd_loss_by_hand():
    s = torch.tensor([[1.0, 2.0, 3.0], [0.0, 0.0, 0.0]])
    t = torch.tensor([[3.0, 2.0, 1.0], [1.0, 0.0, -1.0]])
    T = 2.0
    total = 0.0
    for i in range(2):
        p_t = [math.exp(v / T) for v in t[i].tolist()]
        p_s = [math.exp(v / T) for v in s[i].tolist()]
        p_t = [v / sum(p_t) for v in p_t]
        p_s = [v / sum(p_s) for v in p_s]
        total += sum(a * math.log(a / b) for a, b in zip(p_t, p_s))
    expected = total / 2 * T * T  # batchmean (divide by N = 2, not by N * classes), times T^2
    assert kd_loss(s, t, T).item() == pytest.approx(expected, rel=1e-6)


def test_kd_loss_zero_for_equal_logits_and_scales_with_t_squared():
    z = torch.randn(4, 10)
    assert kd_loss(z, z, 4.0).item() == pytest.approx(0.0, abs=1e-6)
    s, t = torch.randn(8, 5), torch.randn(8, 5)
    # For large T, KL(p_t || p_s) ~ var term / (2 T^2): T^2 KL tends to a constant, not to zero.
    assert kd_loss(s, t, 100.0).item() == pytest.approx(kd_loss(s, t, 200.0).item(), rel=0.05)


def test_kd_method_weights_and_gradients_reach_only_the_student():
    torch.manual_seed(0)
    student, teacher = create_model("resnet8", 10, 1), create_model("resnet14", 10, 1)
    method = KD(OmegaConf.create({"name": "kd", "T": 4.0, "alpha": 0.9}), student, teacher, 10)
    method.prepare((1, 8, 8))
    assert method.weights() == {"ce": pytest.approx(0.1), "kd": 0.9}
    out = method(torch.randn(4, 1, 8, 8), torch.tensor([0, 1, 2, 3]), torch.arange(4))
    assert set(out.terms) == {"ce", "kd"}
    sum(method.weights()[k] * v for k, v in out.terms.items()).backward()
    assert all(p.grad is not None for p in student.parameters())
    assert all(p.grad is None for p in teacher.parameters())
    assert "teacher" not in "".join(method.state_dict())  # the teacher is not saved with the student


def test_ce_weight_overrides_one_minus_alpha():
    method = KD(OmegaConf.create({"T": 4.0, "alpha": 0.5, "ce_weight": 1.0}), create_model("resnet8", 10, 1),
                create_model("resnet8", 10, 1), 10)
    assert method.weights() == {"ce": 1.0, "kd": 0.5}
