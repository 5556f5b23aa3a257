"""The student node's compression keys, their defaults, and the one-line refusal of a bad value.

`student.quantize`: null | int8 | int4, `student.init`: null | teacher, `student.prune`: null | a fraction in
(0, 1), `student.prune_kind`: unstructured | structured. They are not model options (the runner leaves them
out of `create_model`'s keyword arguments)."""
from __future__ import annotations

from dataclasses import dataclass

from kdrun.errors import ConfigError

COMPRESS_DEFAULTS = {
    "quantize": None,              # int8: quantization-aware training, a real int8 model at the end
    "init": None,                  # teacher: start from the teacher's weights (same architecture only)
    "prune": None,                 # fraction of weights (unstructured) or of channels (structured) removed
    "prune_kind": "unstructured",  # unstructured (torch.nn.utils.prune) | structured (torch-pruning)
}
COMPRESS_KEYS = tuple(COMPRESS_DEFAULTS)
QUANTIZE_CHOICES = ("int8", "int4")
INIT_CHOICES = ("teacher",)
PRUNE_KINDS = ("unstructured", "structured")


@dataclass(frozen=True)
class CompressOptions:
    quantize: str | None = None
    init: str | None = None
    prune: float | None = None
    prune_kind: str = "unstructured"

    @property
    def active(self) -> bool:
        return bool(self.quantize or self.init or self.prune)


def refusal(key: str, value, why: str, allowed: str) -> ConfigError:
    """`student.<key>=<value> is not allowed: <why>; <what is allowed>`."""
    shown = "null" if value is None else str(value).lower() if isinstance(value, bool) else value
    return ConfigError(f"student.{key}={shown} is not allowed: {why}; {allowed}")


def options_of(student_node) -> CompressOptions:
    """The compression options of a student node (absent keys take their defaults); unknown values refused."""
    get = student_node.get if hasattr(student_node, "get") else (lambda k, d=None: d)
    quantize, init = get("quantize", None), get("init", None)
    prune, kind = get("prune", None), get("prune_kind", "unstructured")
    if quantize is not None and quantize not in QUANTIZE_CHOICES:
        raise refusal("quantize", quantize, "unknown quantisation", f"one of null, {', '.join(QUANTIZE_CHOICES)}")
    if init is not None and init not in INIT_CHOICES:
        raise refusal("init", init, "unknown initialisation", "null (the model's own random init) or teacher")
    if kind not in PRUNE_KINDS:
        raise refusal("prune_kind", kind, "unknown kind of pruning", f"one of {', '.join(PRUNE_KINDS)}")
    if prune is not None:
        if isinstance(prune, bool) or not isinstance(prune, (int, float)):
            raise refusal("prune", prune, "not a number", "a fraction strictly between 0 and 1, or null")
        if not 0.0 < float(prune) < 1.0:
            raise refusal("prune", prune, "out of range", "a fraction strictly between 0 and 1 (e.g. 0.5), or null "
                                                          "for no pruning")
        prune = float(prune)
    return CompressOptions(quantize, init, prune, kind)
