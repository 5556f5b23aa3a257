"""Li, Li, Yang, Zhao, Song, Luo, Li & Yang 2023, "Curriculum Temperature for Knowledge Distillation" (CTKD, AAAI;
official zhengli97/CTKD: train_student.py, helper/loops.py, models/temp_global.py, distiller_zoo/KD.py,
scripts/run_cifar_distill.sh; the instance-wise loss of its README).

KD at a temperature that is learned adversarially: the temperature module is trained through a
gradient-reversal layer to maximise the KD loss the student minimises, and the reversal's strength grows
along a cosine curriculum (0 to full reversal over the first 10 epochs). The official CIFAR run is CTKD+KD,
`0.1 CE + 0.9 KD_tau` (`-r 0.1 -a 0.9 -b 0`); kdrun weighs the `ctkd` term by `beta` (the official `-a`) and
CE by `ce_weight` (`-r`). The temperature module (ctkd_temperature.py) is a submodule of the method, so it is
trained by the run's optimizer with the student's learning rate, momentum and weight decay and saved with
the checkpoint, as the official code puts it in the student's SGD (`trainable_list`).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from kdrun.errors import ConfigError
from kdrun.methods.base import Forward, Method
from kdrun.methods.common import config_number, full_precision
from kdrun.methods.ctkd_temperature import (GlobalTemperature, InstanceTemperature, TemperatureModule,
                                            cosine_decay, linear_decay)
from kdrun.methods.registry import register_method

TEMPERATURE_KINDS = ("global", "instance")
INSTANCE_EPS = 1e-7  # the README's KL_Loss: `softmax(t / T) + 10 ** (-7)` before the log


def ctkd_loss(s_logits: torch.Tensor, t_logits: torch.Tensor, temperature: torch.Tensor) -> torch.Tensor:
    """Global temperature (distiller_zoo/KD.py::DistillKL): `T^2 * sum_i KL(softmax(t_i / T) || softmax(s_i / T)) / N`
    with `T` a one-element tensor. `T` is not detached anywhere, the T^2 factor included, so its gradient is
    that of the whole term, as in the official code."""
    T = temperature.float().reshape(())
    log_p_s = F.log_softmax(s_logits.float() / T, dim=1)
    log_p_t = F.log_softmax(t_logits.float() / T, dim=1)
    return F.kl_div(log_p_s, log_p_t, reduction="sum", log_target=True) * (T * T) / s_logits.shape[0]


def ctkd_instance_loss(s_logits: torch.Tensor, t_logits: torch.Tensor, temperature: torch.Tensor) -> torch.Tensor:
    """Instance-wise temperature (the official README's KL_Loss, averaged over the batch): with `T_i` sample i's
    temperature and `q_i = softmax(t_i / T_i) + 1e-7`,
    `mean_i T_i^2 sum_k q_ik (log q_ik - log_softmax(s_i / T_i)_k)`; `T` is not detached either."""
    T = temperature.float().reshape(-1, 1)
    log_p_s = F.log_softmax(s_logits.float() / T, dim=1)
    q_t = F.softmax(t_logits.float() / T, dim=1) + INSTANCE_EPS
    return (T.squeeze(1) ** 2 * (q_t * (q_t.log() - log_p_s)).sum(dim=1)).mean()


def check_plain_number(cfg, key: str, default: float) -> float:
    value = cfg.get(key, default)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ConfigError(f"method.{key}={value} is not allowed: must be a finite number")
    return float(value)


@register_method("ctkd")
class CTKD(Method):
    """Li et al. 2023, Curriculum Temperature for Knowledge Distillation: KD at an adversarially learned temperature.

    `ce_weight * CE + beta * tau^2 KL(p_t^tau || p_s^tau)` with `tau = t_start + t_end * sigmoid(theta)`;
    `theta`'s gradient is multiplied by the curriculum's value at the epoch (`cosine_decay(epoch, decay_max,
    decay_min, decay_loops)`, official 0 -> -1 over 10 epochs; `cosine_decay=false` the official LinearDecay).
    `temp=global` learns one scalar (Global_T); `temp=instance` one temperature per sample from a small MLP
    on the two models' probabilities, whose architecture the repository does not contain (see
    InstanceTemperature). The extra `temperature` term (weight 0) logs the batch's mean temperature, so the
    metrics' `loss_temperature` column is its mean over each epoch; result.json keeps the last one
    (`ctkd_temperature`) and the last curriculum value (`ctkd_decay_value`).

    Under `method.logit_standardize` (the logit-standardization repository's CTKD/scripts/run_cifar_distill.sh,
    which standardizes although it passes no `--logit_stand`: that flag is inverted in its train_student.py:314): both
    models' logits are z-scored before the learned temperature, CE keeps 0.1 and the ctkd term gets
    `ls_weight` (its script's `-a 9`); the temperature stays learned in (t_start, t_start + t_end), `base_T`
    only sets the temperature of an extra fixed-T KD term (`alpha`, 0 by default)."""

    official_code = ("zhengli97/CTKD models/temp_global.py, helper/loops.py, train_student.py (CosineDecay; the "
                     "instance-wise MLP, not in the repository, is a 2-layer ReLU MLP on detached [p_t, p_s])")
    teacher_access = "probabilities"  # softmax(z_t / tau) and p_t only: log p_T serves as the logits
    term_names = ("ctkd",)
    ls_terms = ("ctkd",)

    def __init__(self, cfg, student, teacher, num_classes):
        super().__init__(cfg, student, teacher, num_classes)
        self.kind = cfg.get("temp", "global")
        if self.kind not in TEMPERATURE_KINDS:
            raise ConfigError(f"method.temp={self.kind} is not allowed: one of {', '.join(TEMPERATURE_KINDS)} "
                              "(one learned temperature, or one per sample)")
        t_start = config_number(cfg, "t_start", 1.0, strict=True)
        t_end = config_number(cfg, "t_end", 20.0)
        self.decay_max = check_plain_number(cfg, "decay_max", 0.0)
        self.decay_min = check_plain_number(cfg, "decay_min", -1.0)
        self.decay_loops = config_number(cfg, "decay_loops", 10.0, strict=True)
        cosine = cfg.get("cosine_decay", True)
        if not isinstance(cosine, bool):
            raise ConfigError(f"method.cosine_decay={cosine} is not allowed: true (cosine curriculum) or false "
                              "(the official linear one)")
        self.curriculum = cosine_decay if cosine else linear_decay
        if self.kind == "global":
            self.temperature_module: TemperatureModule = GlobalTemperature(t_start, t_end)
        else:
            hidden = config_number(cfg, "instance_hidden", 256, minimum=1, integer=True)
            self.temperature_module = InstanceTemperature(num_classes, hidden, t_start, t_end)
        self.decay_value = self.curriculum(0, self.decay_max, self.decay_min, self.decay_loops)
        self.last_temperature = float("nan")

    def uses_teacher_outputs(self) -> bool:
        return self.distilling()  # the ctkd term needs the teacher even with alpha 0

    def begin_epoch(self, epoch: int) -> None:
        super().begin_epoch(epoch)
        self.decay_value = self.curriculum(epoch, self.decay_max, self.decay_min, self.decay_loops)

    def weights(self) -> dict[str, float]:
        return {**super().weights(), "temperature": 0.0}  # logged, not trained on

    def method_terms(self, fw: Forward) -> dict[str, torch.Tensor]:
        s, t = self.distil_logits(fw.s_logits), self.distil_logits(fw.t_logits)
        with full_precision(s.device):  # a bf16 temperature would be off by up to 0.4% before it divides
            temperature = self.temperature_module(t.float(), s.float(), self.decay_value)
        loss = (ctkd_loss if self.kind == "global" else ctkd_instance_loss)(s, t, temperature)
        mean_temperature = temperature.detach().mean()
        self.last_temperature = mean_temperature  # a tensor: no device sync per step
        return {"ctkd": loss, "temperature": mean_temperature}

    def record_extras(self) -> dict:
        return {"ctkd_temperature": float(self.last_temperature), "ctkd_decay_value": self.decay_value}
