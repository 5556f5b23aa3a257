"""bss (Heo et al. 2019, boundary supporting samples) against bhheo/BSS_distillation, transcribed by hand.

The loss of train_BSS_distillation.py line 141, the attack of attacks/attack_BSS.py, the target sampling of
lines 119-131 and base-sample selection of lines 106-117, the KD weight of line 197. The method's schedule,
frozen teacher and CLI run: tests/test_bss_method.py."""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from omegaconf import OmegaConf
from torch import nn

from kdrun.methods import METHODS
from kdrun.methods.bss import (bss_attack, bss_loss, bss_target_probs, sample_targets, select_base_samples)
from kdrun.methods.kd import kd_loss
from kdrun.models import create_model
from kdrun.paths import conf_dir

DIGITS = (1, 8, 8)
CLASSES = 10


def method_cfg(**overrides):
    return OmegaConf.merge(OmegaConf.load(conf_dir() / "method" / "bss.yaml"), overrides)


def build(epochs: int = 80, teacher: nn.Module | None = None, student: nn.Module | None = None, **overrides):
    torch.manual_seed(0)
    teacher = teacher if teacher is not None else create_model("resnet8", CLASSES, DIGITS[0])
    student = student if student is not None else copy.deepcopy(teacher)  # agrees with it: base samples exist
    method = METHODS.get("bss")(method_cfg(**overrides), student, teacher, CLASSES)
    method.prepare(DIGITS)
    (stage,) = method.stages(epochs)
    method.begin_stage(stage)
    return method


def teacher_labelled_batch(teacher: nn.Module, n: int = 64, seed: int = 1):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, *DIGITS, generator=gen)
    with torch.no_grad():
        y = teacher.eval()(x).argmax(1)
    return x, y


# ----- official transcriptions --------------------------------------------------------------------------
def official_soft_ce(s_logits, t_logits, T):
    """train_BSS_distillation.py:141 (and :102): -(softmax(t/T).detach() * log_softmax(s/T)).sum() / N."""
    return -(F.softmax(t_logits / T, 1).detach() * F.log_softmax(s_logits / T, 1)).sum() / s_logits.shape[0]


def official_attack(model, inputs, target, num_steps=10, step_alpha=0.3, clamp=(-2.5, 2.5)):
    """attacks/attack_BSS.py::AttackBSS.run, Variables and zero_gradients replaced by their torch 2 forms;
    `model` gets its own copy with gradients on, since the official loss.backward() also fills them."""
    model = copy.deepcopy(model).requires_grad_(True)
    input_var = inputs.clone().requires_grad_(True)
    GT_var = target.clone()
    step = 0
    input_adv = None
    while step < num_steps:
        if input_var.grad is not None:
            input_var.grad.zero_()
        output = model(input_var)
        if not step:
            GT_var = output.data.max(1)[1]
        score_GT = output.gather(1, GT_var.unsqueeze(1))
        score_target = output.gather(1, target.unsqueeze(1))
        loss = (score_target - score_GT).sum()
        loss.backward()
        step_alpha_t = step_alpha * (GT_var.data == output.data.max(1)[1]).float()
        step_alpha_t = step_alpha_t.unsqueeze(1).unsqueeze(1).unsqueeze(1)
        if step_alpha_t.sum() == 0:
            break
        pert = (score_GT.data - score_target.data).unsqueeze(1).unsqueeze(1)
        grad = input_var.grad.data
        norm = grad * grad
        for a in reversed(range(1, grad.dim())):  # helpers.py::l2_norm
            norm = norm.sum(a, keepdim=True)
        normed_grad = step_alpha_t * (pert + 1e-4) * grad / norm.sqrt()
        step_adv = input_var.data + (1 + 0.0) * normed_grad
        total_adv = step_adv - inputs
        input_adv = inputs + total_adv
        if clamp is not None:
            input_adv = torch.clamp(input_adv, *clamp)
        input_var.data = input_adv
        step += 1
    return input_adv


def official_targets(out_t, u):
    """train_BSS_distillation.py:120-131 with the uniform draws `u` given."""
    attack_class = out_t.sort(dim=1, descending=True)[1][:, 1].clone()
    class_score, class_idx = F.softmax(out_t, 1).sort(dim=1, descending=True)
    class_score, class_idx = class_score[:, 1:], class_idx[:, 1:]
    rand_seed = (class_score.sum(dim=1) * u).unsqueeze(1)
    prob = class_score.cumsum(dim=1)
    for k in range(out_t.shape[0]):
        for c in range(prob.shape[1]):
            if prob[k, c] >= rand_seed[k]:
                attack_class[k] = class_idx[k, c]
                break
    return attack_class


def official_selection(out_t, out_s, targets, attack_size=64):
    """train_BSS_distillation.py:106-117 (attack_idx kept 1-D for a single candidate)."""
    condition1 = targets == out_t.sort(dim=1, descending=True)[1][:, 0]
    condition2 = targets == out_s.sort(dim=1, descending=True)[1][:, 0]
    attack_idx = (condition1 & condition2).nonzero().flatten()
    if attack_idx.shape[0] > attack_size:
        diff = (F.softmax(out_t[attack_idx, :], 1) - F.softmax(out_s[attack_idx, :], 1)) ** 2
        distill_score = diff.sum(dim=1) - diff.gather(1, targets[attack_idx].unsqueeze(1)).squeeze()
        attack_idx = attack_idx[distill_score.sort(descending=True)[1][:attack_size]]
    return attack_idx


def linear_teacher(dim: int = 16, classes: int = 4, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Flatten(), nn.Linear(dim, classes)).eval().requires_grad_(False)


# ----- 1. the loss ----------------------------------------------------------------------------------------
def test_bss_loss_is_the_official_soft_cross_entropy_in_value_and_gradient():
    torch.manual_seed(0)
    s = torch.randn(37, CLASSES, requires_grad=True)
    t = 3 * torch.randn(37, CLASSES)
    for T in (3.0, 1.0, 4.5):
        expected = official_soft_ce(s, t, T)
        (g_expected,) = torch.autograd.grad(expected, s)
        mine = bss_loss(s, t, None, T)
        (g_mine,) = torch.autograd.grad(mine, s)
        assert torch.allclose(mine, expected, rtol=1e-6, atol=1e-7)
        assert torch.allclose(g_mine, g_expected, rtol=1e-6, atol=1e-9)
        # kl=True: the paper's KL, the soft cross-entropy less the teacher's entropy, the same gradient
        p_t = F.softmax(t / T, 1)
        kl = bss_loss(s, t, None, T, kl=True)
        (g_kl,) = torch.autograd.grad(kl, s)
        entropy = -(p_t * F.log_softmax(t / T, 1)).sum() / 37
        assert torch.allclose(kl, expected - entropy, atol=1e-5)
        assert torch.allclose(g_kl, g_expected, rtol=1e-5, atol=1e-8)
    assert bss_loss(t, t, None, 3.0, kl=True).abs() < 1e-6
    # weights: sum_i w_i H_i / sum_i w_i (the paper's P^k per adversarial sample)
    w = torch.rand(37)
    per_row = -(F.softmax(t / 3, 1) * F.log_softmax(s / 3, 1)).sum(1)
    assert torch.allclose(bss_loss(s, t, w, 3.0), (w * per_row).sum() / w.sum(), rtol=1e-6)


def test_the_teacher_logits_get_no_gradient_from_the_bss_loss():
    s, t = torch.randn(5, 4, requires_grad=True), torch.randn(5, 4, requires_grad=True)
    bss_loss(s, t, None, 3.0).backward()
    assert t.grad is None and s.grad is not None


@pytest.mark.parametrize("epoch", [1, 30, 59, 80])
def test_kd_weight_times_kdruns_t2_kl_has_the_official_kd_gradient(epoch):
    method = build(80)
    for e in range(1, epoch + 1):
        method.begin_epoch(e)
    torch.manual_seed(epoch)
    s = torch.randn(16, CLASSES, requires_grad=True)
    t = 2 * torch.randn(16, CLASSES)
    ratio = max(3 * (1 - epoch / 80), 0) + 1  # train_BSS_distillation.py:197
    (g_official,) = torch.autograd.grad(ratio * official_soft_ce(s, t, 3.0), s)
    (g_mine,) = torch.autograd.grad(method.weights()["kd"] * kd_loss(s, t, method.T), s)
    assert torch.allclose(g_mine, g_official, rtol=1e-5, atol=1e-9)
    assert method.weights()["ce"] == 1.0


# ----- 2. the attack --------------------------------------------------------------------------------------
def test_attack_is_the_official_update_on_a_resnet():
    torch.manual_seed(3)
    teacher = create_model("resnet8", CLASSES, DIGITS[0]).eval()
    x = torch.randn(24, *DIGITS)
    with torch.no_grad():
        logits = teacher(x)
    k = sample_targets(logits)
    expected = official_attack(teacher, x, k)
    frozen = copy.deepcopy(teacher).requires_grad_(False)
    adv = bss_attack(frozen, x, k, steps=10, eta=0.3, eps=1e-4, clamp=(-2.5, 2.5))
    assert torch.allclose(adv, expected, rtol=0, atol=1e-6)
    # toward the target: L_k = f_b - f_k shrinks for every sample, and some cross the boundary of b
    with torch.no_grad():
        before, after = logits, teacher(adv)
    b = logits.argmax(1)
    gap = lambda out: out.gather(1, b[:, None]) - out.gather(1, k[:, None])  # noqa: E731
    assert (gap(after) < gap(before)).all()


def linear_gap(teacher, x, b, k):
    """L_k = f_b - f_k of a linear teacher, and ||grad L_k|| = ||w_b - w_k||."""
    weight = teacher[1].weight
    with torch.no_grad():
        out = teacher(x)
    return (out.gather(1, b[:, None]) - out.gather(1, k[:, None])).squeeze(1), (weight[b] - weight[k]).norm(dim=1)


def test_attack_on_a_linear_teacher_closes_the_gap_geometrically():
    # L_k is linear: a step changes it by -eta (L + eps) ||grad L||, so while no sample has crossed,
    # L_n = (L_0 + eps) (1 - eta ||grad L||)^n - eps: toward the boundary, not across it at eta 0.3 (two
    # classes, so that the boundary of b is that of k)
    teacher = linear_teacher(classes=2)
    x = torch.randn(32, 16, 1, 1)
    with torch.no_grad():
        logits = teacher(x)
    k, b = sample_targets(logits), logits.argmax(1)
    gap0, grad_norm = linear_gap(teacher, x, b, k)
    assert (0.3 * grad_norm < 1).all()
    for steps in (1, 3, 10):
        adv = bss_attack(teacher, x, k, steps=steps, eta=0.3, eps=1e-4, clamp=None)
        expected = (gap0 + 1e-4) * (1 - 0.3 * grad_norm) ** steps - 1e-4
        assert torch.allclose(linear_gap(teacher, adv, b, k)[0], expected, rtol=1e-4, atol=1e-5)
        assert torch.allclose(adv, official_attack(teacher, x, k, num_steps=steps, clamp=None), atol=1e-6)


def test_a_sample_stops_once_it_has_crossed():
    # eta ||grad L|| > 1 overshoots: L_1 < 0, every sample crosses at the first step and stays there
    teacher = linear_teacher(seed=1)
    x = torch.randn(16, 16, 1, 1)
    with torch.no_grad():
        logits = teacher(x)
    k, b = sample_targets(logits), logits.argmax(1)
    eta = 2 / linear_gap(teacher, x, b, k)[1].min().item()
    one = bss_attack(teacher, x, k, steps=1, eta=eta, eps=1e-4, clamp=None)
    ten = bss_attack(teacher, x, k, steps=10, eta=eta, eps=1e-4, clamp=None)
    assert torch.equal(one, ten)
    assert (linear_gap(teacher, one, b, k)[0] < 0).all()  # across the boundary toward k
    with torch.no_grad():
        assert (teacher(one).argmax(1) != b).all()
    # mixed: samples cross at different steps (or not at all); each stops at its own, as the official loop
    teacher = linear_teacher(seed=2)
    x = torch.randn(64, 16, 1, 1)
    with torch.no_grad():
        logits = teacher(x)
    k, b = sample_targets(logits), logits.argmax(1)
    grad_norm = linear_gap(teacher, x, b, k)[1]
    eta = 1.2 / grad_norm.median().item()
    adv = bss_attack(teacher, x, k, steps=10, eta=eta, eps=1e-4, clamp=None)
    with torch.no_grad():
        crossed = teacher(adv).argmax(1) != b
    assert crossed.any() and not crossed.all()
    assert torch.allclose(adv, official_attack(teacher, x, k, step_alpha=eta, clamp=None), atol=1e-6)


def test_attack_clamps_and_leaves_the_teacher_without_gradients():
    teacher = create_model("resnet8", CLASSES, DIGITS[0]).eval().requires_grad_(False)
    x = 3 * torch.randn(8, *DIGITS)
    with torch.no_grad():
        k = sample_targets(teacher(x))
    adv = bss_attack(teacher, x, k, clamp=(-2.5, 2.5))
    assert adv.min() >= -2.5 and adv.max() <= 2.5 and not adv.requires_grad
    assert all(p.grad is None for p in teacher.parameters())


# ----- 3. target classes and base samples -------------------------------------------------------------------
def test_sampled_targets_follow_p_k_and_never_the_top_class():
    t = torch.tensor([[2.0, 0.5, -1.0, 1.0, 0.0], [0.0, 3.0, 1.0, 1.0, -2.0]])
    probs = bss_target_probs(t)
    q = F.softmax(t, 1)
    for row in range(2):
        top = q[row].argmax()
        expected = q[row] / (1 - q[row].max())
        expected[top] = 0
        assert torch.allclose(probs[row], expected, atol=1e-6)
    torch.manual_seed(0)
    n = 20000
    draws = sample_targets(t.repeat_interleave(n, 0)).view(2, n)
    for row in range(2):
        freq = torch.bincount(draws[row], minlength=5).float() / n
        assert freq[t[row].argmax()] == 0
        sigma = (probs[row] * (1 - probs[row]) / n).sqrt()
        assert ((freq - probs[row]).abs() <= 4 * sigma + 1e-6).all(), (freq, probs[row])


def test_sampled_targets_are_the_official_inverse_cdf_draw():
    torch.manual_seed(1)
    logits = 2 * torch.randn(200, CLASSES)
    u = torch.rand(200)
    assert torch.equal(sample_targets(logits, u), official_targets(logits, u))
    # the global RNG: the same seed, the same classes
    torch.manual_seed(7)
    first = sample_targets(logits)
    torch.manual_seed(7)
    assert torch.equal(sample_targets(logits), first)
    torch.manual_seed(7)
    assert torch.equal(first, official_targets(logits, torch.rand(200)))


def test_base_samples_are_the_official_selection():
    torch.manual_seed(2)
    t, s = torch.randn(256, CLASSES), torch.randn(256, CLASSES)
    labels = t.argmax(1)
    s[:160] += 5 * F.one_hot(labels[:160], CLASSES)  # 160+ candidates: the 64 with the largest score
    for size in (64, 500):
        assert torch.equal(select_base_samples(t, s, labels, size), official_selection(t, s, labels, size))
    idx = select_base_samples(t, s, labels, None)
    assert torch.equal(idx, ((t.argmax(1) == labels) & (s.argmax(1) == labels)).nonzero().flatten())
    assert select_base_samples(t, s, (labels + 1) % CLASSES, 64).numel() == 0


# ----- 4. the teacher stays frozen --------------------------------------------------------------------------
