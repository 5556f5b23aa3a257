"""Yuan, Tay, Li, Wang & Feng CVPR 2020, "Revisiting Knowledge Distillation via Label Smoothing Regularization":
Tf-KD self-training, KD whose teacher is the student's own architecture trained normally (the authors' code,
yuanli2333/Teacher-free-Knowledge-Distillation my_loss_function.py::loss_kd_self)."""
from __future__ import annotations

from omegaconf import OmegaConf

from kdrun.methods.common import config_number
from kdrun.methods.kd import KD
from kdrun.methods.registry import register_method


@register_method("tfkd_self")
class TfKDSelf(KD):
    """Yuan et al. CVPR 2020, Tf-KD self: KD from a teacher of the student's own model, trained first.

    The teacher node is set to the student's model (name and options) whatever `teacher=` says, keeping its
    control keys (checkpoint, epochs, lr, seed, snapshot_epoch), so the teacher cache trains and reuses it
    like any other teacher. The loss is the authors' `loss_kd_self`:
    `(1 - alpha) CE + alpha * multiplier * T^2 KL`, the KL averaged over N x K (`nn.KLDivLoss()`'s default,
    `method.kl_reduction=mean`; batchmean, the paper's and Hinton's, is K times larger). The `kd` column
    logs the plain KD term; `multiplier` scales its weight, not the logged value.
    """

    official_code = "yuanli2333/Teacher-free-Knowledge-Distillation my_loss_function.py::loss_kd_self"
    uses_labels = True  # a transfer set without labels refuses it

    @classmethod
    def configure(cls, cfg) -> None:
        from kdrun.compress.options import COMPRESS_KEYS
        from kdrun.teachers import TEACHER_CONTROL_KEYS  # teachers imports the methods package: import on use

        config_number(cfg.method, "multiplier", 1.0)
        teacher = OmegaConf.to_container(cfg.teacher, resolve=False)
        controls = {k: v for k, v in teacher.items() if k in TEACHER_CONTROL_KEYS and k != "name"}
        model = {k: v for k, v in OmegaConf.to_container(cfg.student, resolve=False).items()
                 if k not in COMPRESS_KEYS}  # the student's compression is not the teacher's
        cfg.teacher = {**model, **controls}

    def weights(self) -> dict[str, float]:
        weights = super().weights()  # ce: 1 - alpha, from alpha alone (the multiplier is inside the KD term)
        weights["kd"] *= config_number(self.cfg, "multiplier", 1.0)
        return weights
