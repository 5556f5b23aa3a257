"""Zhao, Song, Yu, Zhang, Wang, Song & Wang 2023, "DOT: A Distillation-Oriented Trainer" (ICCV; official code
megvii-research/mdistiller, mdistiller/engine/dot.py::DistillationOrientedTrainer and
mdistiller/engine/trainer.py::DOT).

Not a method but a modifier of the optimizer (`method.dot=true`): SGD keeps two momentum buffers per parameter,
one for the task loss's gradient (momentum `optim.momentum - dot_delta`) and one for the distillation loss's
(momentum `optim.momentum + dot_delta`): the paper finds the distillation loss under-optimized when the two are
summed, and the larger momentum speeds its optimization. One step, as the official `DOT.train_iter`: the
distillation loss is backpropagated first and its gradients set aside (`step_kd`), then the task loss's, and
`step` updates the parameters with both buffers. The task loss is the method's supervised terms (CE), every
other weighted term is the distillation loss (the official `loss_ce` and `loss_kd`, both already weighted). A
parameter that only one of the two losses reaches uses the plain `optim.momentum` (the official `(momentum_kd +
momentum) / 2`); weight decay is added to the task gradient, or to the distillation gradient of a parameter the
task loss does not reach. With `dot_delta=0` the step is SGD on the summed loss (but for the quirk below).

The official optimizer has neither nesterov, AdamW nor a gradient scaler, so `optim.nesterov=true`,
`optim=adamw` and `precision=fp16` are refused (bf16 needs no scaler). Its quirk is kept: on a parameter's
first step the distillation buffer starts from the bare gradient, without weight decay, even for a parameter
only the distillation loss reaches.
"""
from __future__ import annotations

import torch
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from kdrun.errors import ConfigError

OFFICIAL_CODE = ("mdistiller mdistiller/engine/dot.py, engine/trainer.py::DOT (task = supervised terms, "
                 "distillation = all others; several param groups allowed)")
DEFAULT_DELTA = 0.075  # mdistiller cfg.py SOLVER.DOT.DELTA and every configs/cifar100/dot/*.yaml


class DistillationOrientedSGD(torch.optim.Optimizer):
    """The official DistillationOrientedTrainer's update, written here because no library ships it (torch's
    optimizers keep one momentum buffer a parameter; the class exists only inside mdistiller's trainer).
    `momentum` is the task buffer's, `momentum_kd` the distillation buffer's. Per step: backward of the
    distillation loss, `step_kd()` (takes its gradients away), backward of the task loss, `step()`. The
    buffers live in the optimizer state as `momentum_buffer` and `momentum_kd_buffer`, so `state_dict()`
    carries both."""

    def __init__(self, params, lr: float, momentum: float, momentum_kd: float, weight_decay: float = 0.0):
        for name, value in (("lr", lr), ("momentum", momentum), ("momentum_kd", momentum_kd),
                            ("weight_decay", weight_decay)):
            if value < 0.0:
                raise ValueError(f"invalid {name}: {value}")
        super().__init__(params, dict(lr=lr, momentum=momentum, momentum_kd=momentum_kd,
                                      weight_decay=weight_decay))
        self._kd_grads: dict[torch.Tensor, torch.Tensor] = {}  # between step_kd and step only, never saved

    @torch.no_grad()
    def step_kd(self) -> None:
        """Set the distillation gradients aside; the parameters' `.grad` is cleared for the task backward
        (the official keeps references and relies on `zero_grad(set_to_none=True)` for the same effect)."""
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is not None:
                    self._kd_grads[p] = p.grad
                    p.grad = None

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        kd_grads, self._kd_grads = self._kd_grads, {}
        for group in self.param_groups:
            lr, wd = group["lr"], group["weight_decay"]
            m_task, m_kd = group["momentum"], group["momentum_kd"]
            m_shared = (m_task + m_kd) / 2.0
            task_params = [p for p in group["params"] if p.grad is not None]
            kd_params = [p for p in group["params"] if p in kd_grads]
            for p in task_params:
                grad = p.grad.add(p, alpha=wd) if wd != 0 else p.grad
                state = self.state[p]
                buf = state.get("momentum_buffer")
                if buf is None:
                    buf = state["momentum_buffer"] = grad.clone()
                else:
                    buf.mul_(m_task if p in kd_grads else m_shared).add_(grad)
                p.add_(buf, alpha=-lr)
            task_set = set(task_params)
            for p in kd_params:  # after every task update, as the official's second loop
                grad = kd_grads[p]
                state = self.state[p]
                buf = state.get("momentum_kd_buffer")
                if buf is None:  # the bare gradient, without weight decay, as the official's first step
                    buf = state["momentum_kd_buffer"] = grad.clone()
                elif p in task_set:
                    buf.mul_(m_kd).add_(grad)
                else:
                    buf.mul_(m_shared).add_(grad.add(p, alpha=wd) if wd != 0 else grad)
                p.add_(buf, alpha=-lr)
        return loss


def dot_setting(cfg) -> bool:
    """`method.dot`, validated with `method.dot_delta` when the method is built; when the method's config is
    part of a run's, its `optim` and `precision` are checked too, so a refusal comes before anything runs."""
    value = cfg.get("dot", False)
    if not isinstance(value, bool):
        raise ConfigError(f"method.dot={value} is not allowed: true or false")
    if not value:
        return False
    delta = dot_delta(cfg)
    optim_cfg, precision = run_setting(cfg, "optim"), run_setting(cfg, "precision")
    if optim_cfg is not None:
        dot_momenta(delta, optim_cfg)
    if precision is not None:
        check_precision(precision)
    return True


def run_setting(cfg, key: str):
    """A key of the run's config that holds this method config, or None for a method config of its own."""
    if not isinstance(cfg, DictConfig):
        return None
    try:
        return OmegaConf.select(cfg, f"..{key}", default=None)
    except OmegaConfBaseException:  # no parent: a method built outside a run
        return None


def dot_delta(cfg) -> float:
    value = cfg.get("dot_delta", DEFAULT_DELTA)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0:
        raise ConfigError(f"method.dot_delta={value} is not allowed: must be a number >= 0")
    return float(value)


def dot_momenta(delta: float, optim_cfg) -> tuple[float, float]:
    """(task momentum, distillation momentum) = (momentum - delta, momentum + delta), as the official
    `DOT.init_optimizer`; refuses what its SGD cannot do."""
    if optim_cfg.name != "sgd":
        raise ConfigError(f"optim={optim_cfg.name} is not allowed with method.dot=true: DOT is a two-momentum "
                          "SGD (use optim=sgd)")
    if optim_cfg.get("nesterov", False):
        raise ConfigError("optim.nesterov=true is not allowed with method.dot=true: the official DOT optimizer "
                          "has plain momentum")
    momentum = float(optim_cfg.momentum)
    if not delta < min(momentum, 1.0 - momentum):
        raise ConfigError(f"method.dot_delta={delta:g} is not allowed: must be < optim.momentum ({momentum:g}) "
                          f"and < 1 - optim.momentum, so both momenta lie in (0, 1)")
    return momentum - delta, momentum + delta


def check_precision(precision: str) -> None:
    if precision == "fp16":
        raise ConfigError("precision=fp16 is not allowed with method.dot=true: DOT's two backward passes have "
                          "no gradient scaler (use bf16 or fp32)")


def make_dot_optimizer(params, optim_cfg, lr: float, method_cfg) -> DistillationOrientedSGD:
    m_task, m_kd = dot_momenta(dot_delta(method_cfg), optim_cfg)
    params = [p for p in params if p.requires_grad]
    return DistillationOrientedSGD(params, lr=lr, momentum=m_task, momentum_kd=m_kd,
                                   weight_decay=float(optim_cfg.weight_decay))


def dot_step(out, weights: dict[str, float], optimizer: DistillationOrientedSGD, scaler,
             supervised_terms) -> torch.Tensor:
    """The official `DOT.train_iter` backward: distillation loss, `step_kd`, task loss, `step`. A loss with no
    term this step (no distillation past `kd_until_epoch`, a hint stage without CE) is skipped, leaving its
    parameters on the plain momentum. Returns the summed loss."""
    if scaler.is_enabled():
        check_precision("fp16")
    zero = out.logits.new_zeros((), dtype=torch.float32)
    task = sum((weights[n] * t for n, t in out.terms.items() if n in supervised_terms), zero)
    distil = sum((weights[n] * t for n, t in out.terms.items() if n not in supervised_terms), zero)
    optimizer.zero_grad(set_to_none=True)
    if distil.requires_grad:
        distil.backward(retain_graph=task.requires_grad)
    optimizer.step_kd()
    optimizer.zero_grad(set_to_none=True)
    if task.requires_grad:
        task.backward()
    optimizer.step()
    return task.detach() + distil.detach()
