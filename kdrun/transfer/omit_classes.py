"""`transfer=omit_classes` with `transfer.classes=[3]` (Hinton et al. 2015, Sec. 3): the transfer set holds no
image of those classes; the teacher trained on all of them. `transfer.bias_shift=auto` then adds one constant
to the omitted classes' output biases, chosen on a validation split held out of the training data
(`transfer.val_fraction`, all classes, stratified) -- never the test set, on which the paper tuned it."""
from __future__ import annotations

import torch

from kdrun.errors import ConfigError
from kdrun.transfer.base import TransferSet, fraction, require_in_memory, stratified_split
from kdrun.transfer.bias_shift import output_bias
from kdrun.transfer.registry import register_transfer

BIAS_SHIFTS = ("none", "auto")


def omitted_classes(cfg, num_classes: int) -> list[int]:
    value = cfg.transfer.get("classes")
    values = list(value) if value is not None and not isinstance(value, (str, int)) else [value]
    ok = values and all(isinstance(c, int) and not isinstance(c, bool) and 0 <= c < num_classes for c in values)
    if not ok or len(set(values)) >= num_classes:
        raise ConfigError(f"transfer.classes={value} is not allowed: a non-empty list of class indices in "
                          f"0..{num_classes - 1} that leaves at least one class, e.g. [3]")
    return sorted(set(values))


class OmitClassesSet(TransferSet):
    def check_method(self, cfg, method) -> None:
        """The bias shift needs a classifier bias to shift: refused before training, not after it."""
        if self.val is None:
            return
        student = next(iter(method.eval_models().values()))
        try:
            output_bias(student, self.teacher_data.num_classes)
        except ValueError as err:
            raise ConfigError(f"transfer.bias_shift=auto is not allowed with student={cfg.student.name}: {err}") from None


@register_transfer("omit_classes", "the labelled training split without the images of transfer.classes (Hinton)")
def build(cfg, data) -> TransferSet:
    require_in_memory(cfg, data, "omit_classes")
    classes = omitted_classes(cfg, data.num_classes)
    shift = cfg.transfer.get("bias_shift", "none")
    if shift not in BIAS_SHIFTS:
        raise ConfigError(f"transfer.bias_shift={shift} is not allowed: one of {', '.join(BIAS_SHIFTS)}")
    images, labels, val = data.train_images, data.train_labels, None
    if shift == "auto":
        held = fraction(cfg, "val_fraction", 0.1)
        rest, val_index = stratified_split(labels, 1.0 - held, int(cfg.transfer.get("split_seed", 0)))
        val = (images[val_index], labels[val_index])
        images, labels = images[rest], labels[rest]
    keep = ~torch.isin(labels, torch.tensor(classes))
    return OmitClassesSet("omit_classes", images[keep], labels[keep], data, val=val,
                       record={"transfer_omitted_images": int((~keep).sum()),
                               "transfer_val_images": 0 if val is None else len(val[1])})
