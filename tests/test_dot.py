"""DOT (Zhao et al. 2023) as a modifier of the optimizer: its two-momentum SGD against a transcription of the
official DistillationOrientedTrainer (mdistiller/engine/dot.py) stepped as the official DOT trainer does
(mdistiller/engine/trainer.py::DOT.train_iter), SGD at delta 0, refusals, runs through the CLI and resume."""
from __future__ import annotations

import copy

import pandas as pd
import pytest
import torch
import torch.nn.functional as F
from omegaconf import OmegaConf
from torch import nn
from torch.optim.optimizer import Optimizer

from conftest import FAST, compose_config
from kdrun import train as kdrun_train
from kdrun.checkpoint import load_verified
from kdrun.errors import ConfigError
from kdrun.experiment import prepare
from kdrun.interrupt import Interrupted
from kdrun.methods.base import StepOutput
from kdrun.methods.dot import DistillationOrientedSGD, dot_step, make_dot_optimizer
from kdrun.methods.kd import KD
from kdrun.models import create_model

LR, MOMENTUM, DELTA, WEIGHT_DECAY = 0.05, 0.9, 0.075, 5e-4  # configs/cifar100/dot/res32x4_res8x4.yaml
WEIGHTS = {"ce": 0.1, "kd": 0.9}  # mdistiller cfg.py KD.LOSS.CE_WEIGHT, KD_WEIGHT


# ----- the official optimizer, transcribed ------------------------------------------------------------------
def check_in(t, l):
    for i in l:
        if t is i:
            return True
    return False


def official_dot(params, d_p_list, momentum_buffer_list, kd_grad_buffer, kd_momentum_buffer, kd_params, *,
                 weight_decay, momentum, momentum_kd, lr, dampening):
    for i, param in enumerate(params):
        d_p = d_p_list[i]
        if weight_decay != 0:
            d_p = d_p.add(param, alpha=weight_decay)
        if momentum != 0:
            buf = momentum_buffer_list[i]
            if buf is None:
                buf = torch.clone(d_p).detach()
                momentum_buffer_list[i] = buf
            elif check_in(param, kd_params):
                buf.mul_(momentum).add_(d_p, alpha=1 - dampening)
            else:
                buf.mul_((momentum_kd + momentum) / 2.).add_(d_p, alpha=1 - dampening)
            d_p = buf
        param.add_(d_p, alpha=-lr)
    for i, (d_p, buf, p) in enumerate(zip(kd_grad_buffer, kd_momentum_buffer, kd_params)):
        if buf is None:
            buf = torch.clone(d_p).detach()
            kd_momentum_buffer[i] = buf
        elif check_in(p, params):
            buf.mul_(momentum_kd).add_(d_p, alpha=1 - dampening)
        else:
            if weight_decay != 0:
                d_p = d_p.add(p, alpha=weight_decay)
            buf.mul_((momentum_kd + momentum) / 2.).add_(d_p, alpha=1 - dampening)
        p.add_(buf, alpha=-lr)


class OfficialDOT(Optimizer):
    def __init__(self, params, lr, momentum=0, momentum_kd=0, dampening=0, weight_decay=0):
        defaults = dict(lr=lr, momentum=momentum, momentum_kd=momentum_kd, dampening=dampening,
                        weight_decay=weight_decay)
        self.kd_grad_buffer, self.kd_grad_params, self.kd_momentum_buffer = [], [], []
        super().__init__(params, defaults)

    @torch.no_grad()
    def step_kd(self):
        group = self.param_groups[0]
        params_with_grad, d_p_list, momentum_kd_buffer_list = [], [], []
        for p in group['params']:
            if p.grad is not None:
                params_with_grad.append(p)
                d_p_list.append(p.grad)
                momentum_kd_buffer_list.append(self.state[p].get('momentum_kd_buffer'))
        self.kd_momentum_buffer, self.kd_grad_buffer, self.kd_grad_params = (
            momentum_kd_buffer_list, d_p_list, params_with_grad)

    @torch.no_grad()
    def step(self):
        group = self.param_groups[0]
        params_with_grad, d_p_list, momentum_buffer_list = [], [], []
        for p in group['params']:
            if p.grad is not None:
                params_with_grad.append(p)
                d_p_list.append(p.grad)
                momentum_buffer_list.append(self.state[p].get('momentum_buffer'))
        official_dot(params_with_grad, d_p_list, momentum_buffer_list, self.kd_grad_buffer,
                     self.kd_momentum_buffer, self.kd_grad_params, weight_decay=group['weight_decay'],
                     momentum=group['momentum'], momentum_kd=group['momentum_kd'], lr=group['lr'],
                     dampening=group['dampening'])
        for p, momentum_buffer in zip(params_with_grad, momentum_buffer_list):
            self.state[p]['momentum_buffer'] = momentum_buffer
        for p, momentum_kd_buffer in zip(self.kd_grad_params, self.kd_momentum_buffer):
            self.state[p]['momentum_kd_buffer'] = momentum_kd_buffer
        self.kd_grad_buffer, self.kd_grad_params, self.kd_momentum_buffer = [], [], []


# ----- a tiny model with parameters both losses reach, one only CE reaches, one only KD reaches ---------------
class Tiny(nn.Module):
    def __init__(self, branches: bool):
        super().__init__()
        self.body = nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 5))
        self.ce_bias = nn.Parameter(torch.randn(5)) if branches else None
        self.kd_scale = nn.Parameter(torch.ones(5) + 0.1 * torch.randn(5)) if branches else None

    def terms(self, x, y, t_logits) -> StepOutput:
        z = self.body(x)
        ce_z = z + self.ce_bias if self.ce_bias is not None else z
        kd_z = z * self.kd_scale if self.kd_scale is not None else z
        log_p_s, p_t = F.log_softmax(kd_z / 4.0, dim=1), F.softmax(t_logits / 4.0, dim=1)
        kd = F.kl_div(log_p_s, p_t, reduction="none").sum(1).mean() * 16.0  # mdistiller KD.py::kd_loss
        return StepOutput({"ce": F.cross_entropy(ce_z, y), "kd": kd}, z)


def batches(steps=3):
    g = torch.Generator().manual_seed(1)
    return [(torch.randn(16, 6, generator=g), torch.randint(0, 5, (16,), generator=g),
             torch.randn(16, 5, generator=g) * 3) for _ in range(steps)]


NO_SCALER = torch.amp.GradScaler("cpu", enabled=False)


def kdrun_steps(model, optimizer, data):
    for x, y, t in data:
        dot_step(model.terms(x, y, t), WEIGHTS, optimizer, NO_SCALER, ("ce",))


def official_steps(model, optimizer, data):  # trainer.py::DOT.train_iter
    for x, y, t in data:
        terms = model.terms(x, y, t).terms
        loss_ce, loss_kd = WEIGHTS["ce"] * terms["ce"], WEIGHTS["kd"] * terms["kd"]
        optimizer.zero_grad(set_to_none=True)
        loss_kd.backward(retain_graph=True)
        optimizer.step_kd()
        optimizer.zero_grad(set_to_none=True)
        loss_ce.backward()
        optimizer.step()


def twins(branches=True):
    torch.manual_seed(0)
    model = Tiny(branches)
    return model, copy.deepcopy(model)


def test_three_steps_match_the_official_optimizer_parameters_and_both_buffers():
    mine, theirs = twins()
    initial = copy.deepcopy(mine)
    ours = DistillationOrientedSGD(mine.parameters(), lr=LR, momentum=MOMENTUM - DELTA,
                                   momentum_kd=MOMENTUM + DELTA, weight_decay=WEIGHT_DECAY)
    official = OfficialDOT(theirs.parameters(), lr=LR, momentum=MOMENTUM - DELTA, momentum_kd=MOMENTUM + DELTA,
                           weight_decay=WEIGHT_DECAY)
    data = batches()
    kdrun_steps(mine, ours, data)
    official_steps(theirs, official, data)
    for p, q in zip(mine.parameters(), theirs.parameters()):
        assert torch.allclose(p, q, atol=1e-7, rtol=0)
        for key in ("momentum_buffer", "momentum_kd_buffer"):
            mine_buf, their_buf = ours.state[p].get(key), official.state[q].get(key)
            assert (mine_buf is None) == (their_buf is None), key
            assert mine_buf is None or torch.allclose(mine_buf, their_buf, atol=1e-7, rtol=0)
    assert "momentum_kd_buffer" not in ours.state[mine.ce_bias] and "momentum_buffer" not in ours.state[mine.kd_scale]
    # every parameter moved, so the comparison is not of untouched copies
    assert all(not torch.equal(p, q) for p, q in zip(mine.parameters(), initial.parameters()))


@pytest.mark.parametrize("branches,weight_decay", [(False, WEIGHT_DECAY), (True, 0.0)])
def test_delta_zero_is_sgd_on_the_summed_loss(branches, weight_decay):
    """Exact for parameters both losses reach; a KD-only parameter's first distillation step skips weight
    decay (the official quirk), so the branchy model is compared without it."""
    mine, reference = twins(branches)
    ours = DistillationOrientedSGD(mine.parameters(), lr=LR, momentum=MOMENTUM, momentum_kd=MOMENTUM,
                                   weight_decay=weight_decay)
    sgd = torch.optim.SGD(reference.parameters(), lr=LR, momentum=MOMENTUM, weight_decay=weight_decay)
    data = batches(4)
    kdrun_steps(mine, ours, data)
    for x, y, t in data:
        terms = reference.terms(x, y, t).terms
        sgd.zero_grad()
        sum(WEIGHTS[n] * v for n, v in terms.items()).backward()
        sgd.step()
    for p, q in zip(mine.parameters(), reference.parameters()):
        assert torch.allclose(p, q, atol=1e-6, rtol=0)


def test_a_restored_optimizer_continues_identically():
    mine, restored_model = twins()
    settings = dict(lr=LR, momentum=MOMENTUM - DELTA, momentum_kd=MOMENTUM + DELTA, weight_decay=WEIGHT_DECAY)
    data = batches(5)
    straight = DistillationOrientedSGD(mine.parameters(), **settings)
    kdrun_steps(mine, straight, data)
    first = DistillationOrientedSGD(restored_model.parameters(), **settings)
    kdrun_steps(restored_model, first, data[:3])
    saved = copy.deepcopy(first.state_dict())
    kinds = sorted(tuple(sorted(s)) for s in saved["state"].values())  # body: both; ce_bias, kd_scale: one each
    assert kinds == [("momentum_buffer",)] + [("momentum_buffer", "momentum_kd_buffer")] * 4 + [("momentum_kd_buffer",)]
    second = DistillationOrientedSGD(restored_model.parameters(), lr=1.0, momentum=0.0, momentum_kd=0.0)
    second.load_state_dict(saved)
    kdrun_steps(restored_model, second, data[3:])
    assert all(torch.equal(p, q) for p, q in zip(mine.parameters(), restored_model.parameters()))


# ----- refusals ------------------------------------------------------------------------------------------------
def build(*overrides: str):
    return prepare(compose_config(*FAST, "results_dir=/nonexistent", *overrides)).method


@pytest.mark.parametrize("overrides,message", [
    (["method.dot_delta=-0.1"], "method.dot_delta=-0.1 is not allowed: must be a number >= 0"),
    (["method.dot_delta=0.9"], "method.dot_delta=0.9 is not allowed: must be < optim.momentum (0.9)"),
    (["method.dot_delta=0.1"], "and < 1 - optim.momentum"),
    (["optim=adamw"], "optim=adamw is not allowed with method.dot=true"),
    (["optim.nesterov=true"], "optim.nesterov=true is not allowed with method.dot=true"),
    (["method.dot=yes"], "method.dot=yes is not allowed: true or false"),
])
def test_bad_settings_are_refused_when_the_method_is_built(overrides, message):
    with pytest.raises(ConfigError) as refused:
        build("method.dot=true", *overrides)
    text = str(refused.value)
    assert message in text and text.startswith(("method.dot", "optim")) and "\n" not in text


def test_fp16_is_refused_at_build_and_at_the_step():
    cfg = compose_config("method.dot=true", "precision=fp16")  # fp16 needs CUDA: the method is built by hand
    with pytest.raises(ConfigError, match="^precision=fp16 is not allowed with method.dot=true"):
        KD(cfg.method, create_model("resnet8", 10, 1), create_model("resnet8", 10, 1), 10)
    model = Tiny(False)
    optimizer = DistillationOrientedSGD(model.parameters(), lr=LR, momentum=0.8, momentum_kd=0.9)
    x, y, t = batches(1)[0]
    with pytest.raises(ConfigError, match="^precision=fp16"):
        dot_step(model.terms(x, y, t), WEIGHTS, optimizer, torch.amp.GradScaler("cpu"), ("ce",))


def test_a_method_built_outside_a_run_checks_the_momentum_with_its_optimizer():
    optim_cfg = OmegaConf.create({"name": "sgd", "momentum": 0.9, "nesterov": False, "weight_decay": 5e-4})
    with pytest.raises(ConfigError, match="must be < optim.momentum"):
        make_dot_optimizer(Tiny(False).parameters(), optim_cfg, LR, OmegaConf.create({"dot_delta": 0.95}))
    optimizer = make_dot_optimizer(Tiny(False).parameters(), optim_cfg, LR, OmegaConf.create({}))
    assert optimizer.defaults["momentum"] == pytest.approx(0.825)
    assert optimizer.defaults["momentum_kd"] == pytest.approx(0.975)


def test_refusal_through_the_cli_is_one_line_and_writes_nothing(kdrun, capsys):
    code, _ = kdrun("method.dot=true", "method.dot_delta=0.5")
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "method.dot_delta=0.5 is not allowed" in err[0]
    assert not list(kdrun.root.iterdir())


# ----- through the CLI ---------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def teacher(tmp_path_factory):
    """`teacher.checkpoint=` a saved random resnet26 (digits: 1 channel, 10 classes), so no run trains one."""
    path = tmp_path_factory.mktemp("teachers") / "resnet26.pt"
    torch.manual_seed(0)
    torch.save({"model": create_model("resnet26", 10, 1).state_dict()}, path)
    return f"teacher.checkpoint={path}"


def assert_momenta(record, task: float, kd: float) -> None:
    """The run's checkpoint holds the DOT optimizer: both momenta, and both buffers for every parameter."""
    state, _ = load_verified(f"{record['run_dir']}/checkpoint.pt")
    optimizer = state["optimizer"]
    (group,) = optimizer["param_groups"]
    assert (group["momentum"], group["momentum_kd"]) == (pytest.approx(task), pytest.approx(kd))
    assert len(optimizer["state"]) == len(group["params"])
    assert all({"momentum_buffer", "momentum_kd_buffer"} <= set(s) for s in optimizer["state"].values())


@pytest.mark.slow
def test_dkd_with_dot_runs(kdrun, teacher):
    code, (record,) = kdrun("method=dkd", "method.dot=true", "method.dot_delta=0.05",
                            teacher)
    assert code == 0 and record["status"] == "completed" and record["method"] == "dkd"
    assert_momenta(record, 0.85, 0.95)


@pytest.mark.slow
def test_kd_with_dot_stopped_mid_epoch_resumes_to_the_uninterrupted_metrics(kdrun, teacher, monkeypatch):
    run = ["method=kd", "method.dot=true", teacher]
    code, (reference,) = kdrun(*run, f"run_dir={kdrun.root / 'reference'}")
    assert code == 0 and reference["status"] == "completed"
    assert_momenta(reference, 0.825, 0.975)
    calls = {"n": 0}
    original = kdrun_train.check_stop

    def stop_mid_epoch():  # called once before the epoch, then after each of its 12 steps
        calls["n"] += 1
        if calls["n"] == 7:
            raise Interrupted("stopped by SIGTERM")
        original()

    monkeypatch.setattr(kdrun_train, "check_stop", stop_mid_epoch)
    stopped_dir = kdrun.root / "stopped"
    code, _ = kdrun(*run, f"run_dir={stopped_dir}")
    assert code != 0 and calls["n"] == 7
    monkeypatch.undo()
    code, records = kdrun(*run, f"run_dir={stopped_dir}")
    resumed = next(r for r in records if r["run_dir"] == str(stopped_dir))
    assert code == 0 and resumed["status"] == "completed" and resumed["resumed"] == 1
    timing = ["epoch_s", "images_per_s"]
    pd.testing.assert_frame_equal(pd.read_csv(stopped_dir / "metrics.csv").drop(columns=timing),
                                  pd.read_csv(kdrun.root / "reference" / "metrics.csv").drop(columns=timing),
                                  check_exact=True)
    assert resumed["best_acc"] == reference["best_acc"] and resumed["last_acc"] == reference["last_acc"]
