"""Every refusal of the compression keys, in one line, before anything is trained or written."""
from __future__ import annotations

import copy

import torch
from torch import nn

from kdrun.compress.init_from_teacher import check_same_architecture
from kdrun.compress.options import CompressOptions, options_of, refusal
from kdrun.compress.prune import check_prunable
from kdrun.compress.quantize import batch_of, export, export_error

# Methods that reach into the student's modules by position (not through feature taps), which neither an
# exported graph nor a pruned model keeps.
STRUCTURE_METHODS = {"rocket": "it shares the student's convolution weights with its booster layer by layer"}
QUANTIZE_DEVICES = ("cpu", "cuda")


def check_compression(cfg, student: nn.Module, teacher: nn.Module | None, input_shape, device,
                      method=None) -> None:
    """Refuse compression options that cannot work for this student, teacher, device and method (the built
    Method, after its `prepare`: its `student_layers()` say whether it taps the student's features).
    `teacher` is the root teacher (`cfg.teacher`), whose weights `student.init=teacher` copies."""
    options = options_of(cfg.student)
    if not options.active:
        return
    example = batch_of(tuple(input_shape), torch.device(device))
    if options.init:
        check_same_architecture(cfg, student, teacher)
    method_name = str(cfg.method.name)
    if options.prune is not None:
        if method_name in STRUCTURE_METHODS:
            raise refusal("prune", options.prune, f"method={method_name} does not work on a pruned student: "
                          f"{STRUCTURE_METHODS[method_name]}", "student.prune=null")
        check_prunable(student, example, options.prune, options.prune_kind)
    if options.quantize:
        check_quantize(options, student, example, method_name, method)


def check_quantize(options: CompressOptions, student: nn.Module, example: torch.Tensor, method_name: str,
                   method) -> None:
    name = getattr(student, "model_name", type(student).__name__)
    value = options.quantize
    if value == "int4":
        convs = sum(isinstance(m, nn.modules.conv._ConvNd) for m in student.modules())
        why = (f"{name} has {convs} convolutions, and torchao trains int4 weights quantization-aware only in "
               "nn.Linear layers (its int4 conv path is post-training and keeps the values in int8 bytes)" if convs
               else f"kdrun quantizes through torchao's PT2E int8 flow, which has no int4 scheme for {name}")
        raise refusal("quantize", value, why, "student.quantize=int8 or null")
    if example.device.type not in QUANTIZE_DEVICES:
        raise refusal("quantize", value, f"quantization-aware training runs on {' or '.join(QUANTIZE_DEVICES)}, "
                      f"not {example.device.type}", "device=cpu or cuda")
    if method_name in STRUCTURE_METHODS:
        raise refusal("quantize", value, f"method={method_name} does not work on a quantized student: "
                      f"{STRUCTURE_METHODS[method_name]}", "student.quantize=null")
    layers = list(method.student_layers()) if method is not None else []
    if layers:
        raise refusal("quantize", value, f"method={method_name} taps the student's features ({', '.join(layers)}), "
                      "and the quantization-aware student is an exported graph with no modules to hook",
                      "a method that needs only the student's logits (ce, kd, dkd, ...), or student.quantize=null")
    trial = copy.deepcopy(student).train()
    try:
        export(trial, example)
    except Exception as exc:  # noqa: BLE001 - torch.export raises many types on models it cannot capture
        raise refusal("quantize", value, export_error(student, exc), "student.quantize=null") from None
