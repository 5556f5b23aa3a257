"""Label smoothing (Szegedy et al. 2016): cross-entropy against `(1 - eps) * onehot + eps / K`, no teacher."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from kdrun.errors import ConfigError
from kdrun.methods.base import Forward, Method
from kdrun.methods.registry import register_method


def ls_loss(s_logits: torch.Tensor, target: torch.Tensor, eps: float) -> torch.Tensor:
    """Mean over the batch of `CE(q', p_s)` with `q' = (1 - eps) q + eps / K` (eps spread over all K classes,
    the true one included)."""
    return F.cross_entropy(s_logits.float(), target, label_smoothing=eps)


@register_method("ls")
class LabelSmoothing(Method):
    """Szegedy et al. 2016, Rethinking the Inception Architecture: label smoothing, a teacher-free regulariser."""

    official_code = "- (Szegedy et al. 2016 label smoothing; no teacher)"
    uses_labels = True  # a transfer set without labels refuses it

    needs_teacher = False
    term_names = ("ls",)

    def __init__(self, cfg, student, teacher, num_classes):
        super().__init__(cfg, student, teacher, num_classes)
        self.eps = cfg.get("eps", 0.1)
        if isinstance(self.eps, bool) or not isinstance(self.eps, (int, float)) or not 0 <= self.eps < 1:
            raise ConfigError(f"method.eps={self.eps} is not allowed: must lie in [0, 1)")
        for key in ("ce_weight", "kd_until_epoch"):  # no CE term and nothing distilled: they would do nothing
            if cfg.get(key) is not None:
                raise ConfigError(f"method.{key}={cfg.get(key)} is not allowed with method=ls: its smoothed CE "
                                  "replaces the CE term and it has no teacher (leave it null)")

    def weights(self) -> dict[str, float]:
        return {"ls": 1.0}  # the smoothed CE replaces the plain one

    def method_terms(self, fw: Forward) -> dict[str, torch.Tensor]:
        return {"ls": ls_loss(fw.s_logits, fw.labels, float(self.eps))}
