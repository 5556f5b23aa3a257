"""Yuan, Tay, Li, Wang & Feng CVPR 2020, "Revisiting Knowledge Distillation via Label Smoothing Regularization":
Tf-KD self-training, KD whose teacher is the student's own architecture trained normally."""
from __future__ import annotations

from omegaconf import OmegaConf

from kdrun.methods.kd import KD
from kdrun.methods.registry import register_method


@register_method("tfkd_self")
class TfKDSelf(KD):
    """Yuan et al. CVPR 2020, Tf-KD self: ordinary KD from a teacher of the student's own model, trained first.

    The teacher node is set to the student's model (name and options) whatever `teacher=` says, keeping its
    control keys (checkpoint, epochs, lr, seed, snapshot_epoch), so the teacher cache trains and reuses it
    like any other teacher. The loss is `kd`'s: `(1 - alpha) CE + alpha T^2 KL` with batchmean, as the paper
    writes it; the authors' code divides the KL by the number of classes too (nn.KLDivLoss's default mean)
    and multiplies it by a per-experiment `multiplier`.
    """

    @classmethod
    def configure(cls, cfg) -> None:
        from kdrun.teachers import TEACHER_CONTROL_KEYS  # teachers imports the methods package: import on use

        teacher = OmegaConf.to_container(cfg.teacher, resolve=False)
        controls = {k: v for k, v in teacher.items() if k in TEACHER_CONTROL_KEYS and k != "name"}
        cfg.teacher = {**OmegaConf.to_container(cfg.student, resolve=False), **controls}
