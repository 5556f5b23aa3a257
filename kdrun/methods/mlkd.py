"""Jin, Wang & Lin 2023, "Multi-Level Logit Distillation" (CVPR; official code
Jin-Ying/Multi-Level-Logit-Distillation, mdistiller/distillers/KD_ours.py, its strong-view dataset in
mdistiller/dataset/cifar100.py and trainer `ours`)."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from kdrun.data.strong_augment import StrongAugment, StrongViewLoader
from kdrun.errors import ConfigError
from kdrun.methods.base import Forward, Method, StepOutput
from kdrun.methods.common import config_number, full_precision
from kdrun.methods.mlkd_loss import alignment_terms
from kdrun.methods.registry import register_method


@register_method("mlkd")
class MLKD(Method):
    """Jin et al. 2023, Multi-Level Logit Distillation: instance, batch and class alignment over 5 temperatures.

    Every batch comes with a strong view of the same images (the weak crop and flip drawn anew, RandAugment
    with two ops, Cutout; kdrun/data/strong_augment.py), which `wrap_train_loader` builds on the device and
    hands over before the step. Student and teacher each see both views, the student in two forward passes
    (batch norm statistics per view, as the official code). Terms: `ce` = CE(weak) + CE(strong) at
    `ce_weight` 0.1, and `instance`, `batch`, `class` (kdrun/methods/mlkd_loss.py) at `beta` 0.9, the
    official KD.LOSS weights. Logit standardization z-scores the instance term's logits only, as the official
    LS code, and gives the three terms `ls_weight` (its `--kd-weight` replaces KD_WEIGHT). A black-box
    teacher's stored answer for an image serves both of its views.
    """
    ddp_refusal = "its strong views are built for the whole batch and handed to the step before it"

    official_code = ("Jin-Ying/Multi-Level-Logit-Distillation mdistiller/distillers/KD_ours.py (strong view: "
                     "its RandAugment + Cutout batched on the device)")
    uses_labels = True  # CE on both views
    teacher_access = "probabilities"  # softmaxes of the teacher only (and its z-scores, shift-invariant)

    term_names = ("instance", "batch", "class")
    ls_terms = term_names

    def __init__(self, cfg, student, teacher, num_classes):
        super().__init__(cfg, student, teacher, num_classes)
        self.percentile = config_number(cfg, "percentile", 50.0)
        if self.percentile > 100:
            raise ConfigError(f"method.percentile={cfg.percentile} is not allowed: a percentile in [0, 100]")
        self.rand_ops = config_number(cfg, "rand_ops", 2, integer=True)
        self.cutout = config_number(cfg, "cutout", 0.5)
        if self.cutout > 1:
            raise ConfigError(f"method.cutout={cfg.cutout} is not allowed: the largest Cutout side as a fraction of "
                              "the image width, in [0, 1]")
        self._strong_view: tuple[torch.Tensor, torch.Tensor] | None = None

    def uses_teacher_outputs(self) -> bool:
        return self.teacher is not None and self.distilling()  # the alignment terms need it even with alpha 0

    def wrap_train_loader(self, loader):
        augment = StrongAugment(getattr(loader, "crop_padding", 0), getattr(loader, "hflip", False),
                                self.rand_ops, self.cutout)
        return StrongViewLoader(loader, augment, self.receive_strong_view)

    def receive_strong_view(self, index: torch.Tensor, strong: torch.Tensor) -> None:
        self._strong_view = (index, strong)

    def _take_strong_view(self, index: torch.Tensor) -> torch.Tensor:
        stored, self._strong_view = self._strong_view, None
        if stored is None or stored[0] is not index:
            raise RuntimeError("mlkd trains on batches from its wrap_train_loader, which delivers each batch's "
                               "strong view before the step")
        return stored[1]

    def forward(self, images: torch.Tensor, labels: torch.Tensor, index: torch.Tensor) -> StepOutput:
        strong = self._take_strong_view(index)
        t_weak, _ = self.run_teacher(images, index)
        t_strong, _ = self.run_teacher(strong, index)
        s_weak, _ = self._student_tap(images)
        s_strong, _ = self._student_tap(strong)
        terms = self.response_terms(Forward(s_weak, t_weak, {}, {}, labels, index))  # `kd` only with alpha > 0
        if "ce" in terms:
            terms["ce"] = terms["ce"] + F.cross_entropy(s_strong, labels)
        if self.distilling():
            with full_precision(images.device):  # batch correlations of probabilities: bf16 drowns them
                terms.update(alignment_terms(s_weak, s_strong, t_weak, t_strong, self.T, self.percentile,
                                             self.logit_standardize))
        return StepOutput(terms, s_weak)
