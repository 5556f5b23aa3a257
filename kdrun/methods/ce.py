"""Cross-entropy alone, no teacher: the student baseline every table compares against."""
from __future__ import annotations

from kdrun.methods.base import Method
from kdrun.methods.registry import register_method


@register_method("ce")
class CE(Method):
    """No distillation: the student trained on labels alone (the baseline)."""

    official_code = "- (plain cross-entropy, the student baseline)"
    uses_labels = True  # a transfer set without labels refuses it

    needs_teacher = False

    def weights(self) -> dict[str, float]:
        return {"ce": 1.0}
