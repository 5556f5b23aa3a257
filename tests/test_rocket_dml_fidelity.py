"""rocket and dml against their official code: loss values and gradients, rocket's conv sharing, end-to-end runs.

The references below transcribe the official FORMULAS: zhougr1993/Rocket-Launching `rocket_interval.py`
(hint `gamma * ((y_course - ys) * (y_course - ys)).sum() / opt.batchSize`, `y_course` the booster's logits
without gradient) and YingZhangDUT/Deep-Mutual-Learning `train_models.py` (`kl_loss_compute`: batch mean of
`sum_k p2 log(1e-8 + p2 / (p1 + 1e-8))`; `_tower_loss`: peer i's loss is its CE plus each of the K-1 KL
terms, and its optimizer's var_list holds peer i's own variables only).
"""
import csv
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from conftest import compose_config
from kdrun.errors import ConfigError
from kdrun.experiment import prepare
from kdrun.methods.dml import dml_loss
from kdrun.methods.rocket import rocket_loss


def plan_for(*overrides):
    return prepare(compose_config("device=cpu", *overrides))


def fixed_logits(*shape, seed, scale=3.0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64) * scale


# ----- rocket: the hint term ------------------------------------------------------------------------------
def official_hint(ys, y, gamma):
    y_course = y.detach()  # grad_block: Variable(y.data, requires_grad=False)
    return gamma * ((y_course - ys) * (y_course - ys)).sum() / ys.shape[0]


def test_rocket_hint_value_and_gradient_match_the_official_formula():
    gamma = 0.03
    z_light = fixed_logits(8, 10, seed=1).requires_grad_()
    z_booster = fixed_logits(8, 10, seed=2).requires_grad_()
    expected = official_hint(z_light, z_booster, gamma)
    (grad_expected,) = torch.autograd.grad(expected, z_light)
    ours = gamma * rocket_loss(z_light, z_booster)
    assert ours.item() == pytest.approx(expected.item(), rel=1e-6)  # K = 10 times the mean over N x K
    ours.backward()
    assert torch.allclose(z_light.grad, grad_expected, rtol=1e-5, atol=1e-8)
    assert z_booster.grad is None  # gradient block


# ----- rocket: which parameters the two nets share --------------------------------------------------------
def convs(module):
    return [m for m in module.modules() if isinstance(m, nn.Conv2d)]


def bns(module):
    return [m for m in module.modules() if isinstance(m, nn.BatchNorm2d)]


@pytest.mark.parametrize("light_name, booster_name, shortcut_convs", [
    ("resnet14", "resnet26", 2),   # 2 of 4 blocks per stage; shortcut convs open layer2 and layer3
    ("wrn_16_2", "wrn_40_2", 3),   # 2 of 6 blocks per stage; 16 -> 32 channels needs a shortcut in layer1 too
])
def test_rocket_shares_the_first_blocks_convs_and_keeps_bn_separate(light_name, booster_name, shortcut_convs):
    method = plan_for("method=rocket", f"student={light_name}", f"method.booster={booster_name}").method
    light, booster = method.student, method.booster
    light_stem = light.stem if isinstance(light.stem, nn.Conv2d) else light.stem[0]
    booster_stem = booster.stem if isinstance(booster.stem, nn.Conv2d) else booster.stem[0]
    assert light_stem.weight is booster_stem.weight
    shared = {id(light_stem.weight)}
    for stage in ("layer1", "layer2", "layer3"):
        light_blocks, booster_blocks = light.get_submodule(stage), booster.get_submodule(stage)
        assert len(light_blocks) == 2 < len(booster_blocks)
        for i, booster_block in enumerate(booster_blocks):
            if i < len(light_blocks):  # block i of the light net: every conv is the booster's block i conv
                pairs = list(zip(convs(light_blocks[i]), convs(booster_block), strict=True))
                assert all(a.weight is b.weight for a, b in pairs)
                shared |= {id(a.weight) for a, _ in pairs}
            else:  # the booster's deeper blocks are its own
                assert all(id(c.weight) not in shared for c in convs(booster_block))
    assert len(shared) == 1 + 3 * 2 * 2 + shortcut_convs
    light_params = {id(p) for p in light.parameters()}
    # Every BN layer (stem, blocks, shortcuts, WRN's final BN) and the classifier are separate tensors.
    assert all(id(p) not in light_params for m in [*bns(booster), booster.fc] for p in m.parameters())
    assert {id(p) for p in light.parameters()} & {id(p) for p in booster.parameters()} == shared
    assert all(b.running_mean is not a.running_mean for a, b in zip(bns(light), bns(booster)))
    # One optimizer over method.parameters() sees each shared tensor once.
    params = list(method.parameters())
    assert len(params) == len({id(p) for p in params}) == len(light_params | {id(p) for p in booster.parameters()})


def test_rocket_hint_reaches_the_shared_convs_through_the_light_net_only():
    method = plan_for("method=rocket", "student=resnet8", "method.booster=resnet26").method
    light, booster = method.student, method.booster
    shared = {id(p) for p in light.parameters()} & {id(p) for p in booster.parameters()}
    booster_own = [p for p in booster.parameters() if id(p) not in shared]
    light_own = [p for p in light.parameters() if id(p) not in shared]
    images, labels = torch.randn(6, 1, 8, 8), torch.tensor([0, 1, 2, 3, 4, 5])
    method(images, labels, torch.arange(6)).terms["hint"].backward()
    assert all(p.grad is None for p in booster_own)  # the hint never updates the booster
    assert light.stem[0].weight.grad.abs().sum() > 0 and light.fc.weight.grad.abs().sum() > 0

    method.zero_grad(set_to_none=True)
    method(images, labels, torch.arange(6)).terms["ce_booster"].backward()
    assert light.stem[0].weight.grad.abs().sum() > 0  # the booster trains the shared convs too ...
    assert all(p.grad is None for p in light_own)     # ... but not the light net's BN layers nor its fc


@pytest.mark.parametrize("overrides, reason", [
    (["method.booster=wrn_16_2"], "only two CIFAR ResNets or two WRNs"),
    (["student=resnet26", "method.booster=resnet8"], r"the booster's layer1 is shallower than the light net's \(1 vs 4 blocks\)"),
    (["method.booster=resnet8x4"], r"their stem convolutions differ \(stem.0 \(16, 1, 3, 3\) vs stem.0 \(32, 1, 3, 3\)\)"),
    (["student.residual=false"], "their layer2.0 convolutions differ"),
])
def test_rocket_refuses_pairs_that_cannot_share_in_one_line(overrides, reason):
    with pytest.raises(ConfigError, match=r"method.booster=\S+ is not allowed with student=\S+ and "
                                          r"method.shared=interval: " + reason) as info:
        plan_for("method=rocket", *overrides)
    assert "\n" not in str(info.value) and "method.shared=none" in str(info.value)


def test_rocket_shared_key_and_the_unshared_ablation():
    with pytest.raises(ConfigError, match="method.shared=s1 is not allowed: one of interval, none"):
        plan_for("method=rocket", "method.shared=s1")
    method = plan_for("method=rocket", "method.shared=none", "method.booster=vgg8").method
    assert not {id(p) for p in method.student.parameters()} & {id(p) for p in method.booster.parameters()}
    node = compose_config("method=rocket").method
    assert (node["lambda"], node.shared) == (0.03, "interval")  # official README: --gamma 0.03


# ----- dml: K = 3, both reductions ------------------------------------------------------------------------
def official_kl(logits1, logits2):
    pred1, pred2 = logits1.softmax(1), logits2.softmax(1)
    return (pred2 * torch.log(1e-8 + pred2 / (pred1 + 1e-8))).sum(1).mean()


def official_peer_losses(z, labels, mean):
    k = len(z)
    return [F.cross_entropy(z[i], labels) + sum(official_kl(z[i], z[j]) for j in range(k) if j != i)
            / ((k - 1) if mean else 1) for i in range(k)]


@pytest.mark.parametrize("reduction", ["sum", "mean"])
def test_dml_three_peers_value_and_gradient_match_the_official_formula(reduction):
    # Unit-scale logits: no probability is near the official 1e-8 guards, which kdrun leaves out.
    z = [fixed_logits(8, 10, seed=10 + i, scale=1.0).requires_grad_() for i in range(3)]
    labels = torch.randint(0, 10, (8,), generator=torch.Generator().manual_seed(0))
    losses = official_peer_losses(z, labels, mean=reduction == "mean")  # "mean": the paper's 1/(K-1)
    # Peer i's optimizer holds peer i's variables only: its gradient is that of its own loss w.r.t. z_i.
    expected_grads = [torch.autograd.grad(loss, z_i, retain_graph=True)[0] for loss, z_i in zip(losses, z)]
    terms = dml_loss(z, labels, 1.0, reduction)
    total = terms["ce"] + terms["dml"]
    assert total.item() == pytest.approx(sum(losses).item(), rel=1e-6)
    total.backward()
    for z_i, expected in zip(z, expected_grads):
        assert torch.allclose(z_i.grad, expected, rtol=1e-5, atol=1e-7)


def test_dml_sum_is_k_minus_1_times_the_mean():
    z = [fixed_logits(4, 5, seed=20 + i) for i in range(4)]
    labels = torch.tensor([0, 1, 2, 3])
    assert dml_loss(z, labels, reduction="sum")["dml"].item() == pytest.approx(
        3 * dml_loss(z, labels, reduction="mean")["dml"].item(), rel=1e-6)


def test_dml_mutual_reduction_defaults_to_the_code_and_refuses_others():
    assert compose_config("method=dml").method.mutual_reduction == "sum"
    with pytest.raises(ConfigError, match=r"^method.mutual_reduction=avg is not allowed: one of sum, mean$"):
        plan_for("method=dml", "method.mutual_reduction=avg")
    with pytest.raises(ConfigError, match="method.mutual_reduction=avg"):
        dml_loss([torch.zeros(2, 3), torch.zeros(2, 3)], torch.tensor([0, 1]), reduction="avg")


# ----- end to end -----------------------------------------------------------------------------------------
def last_row(record):
    with open(Path(record["run_dir"]) / "metrics.csv") as f:
        return list(csv.DictReader(f))[-1]


@pytest.mark.parametrize("method, extra, term, models", [
    ("rocket", ["student=resnet8", "method.booster=resnet14"], "hint", 2),
    ("dml", ["method.peers=[resnet8,resnet8,resnet8]", "method.mutual_reduction=mean"], "dml", 3),
])
def test_one_epoch_trains(kdrun, method, extra, term, models):
    code, results = kdrun(f"method={method}", *extra)
    assert code == 0
    record = next(r for r in results if r["method"] == method)
    assert record["status"] == "completed" and len(record["peer_acc"]) == models
    row = last_row(record)
    loss = float(row[f"loss_{term}"])
    assert math.isfinite(loss) and loss > 0 and float(row["test_acc"]) > 0
