"""The two calls the runner makes: `compress_student` before training, `finish_student` after it."""
from __future__ import annotations

from pathlib import Path
from typing import Callable

import torch
from torch import nn

from kdrun.compress.init_from_teacher import copy_teacher_weights
from kdrun.compress.measure import macs_and_params, param_count, program_tensor_bytes
from kdrun.compress.options import options_of
from kdrun.compress.prune import (masked_count, prune_structured, prune_unstructured, release_masks,
                                  zero_fraction)
from kdrun.compress.quantize import (QUANTIZED_FILE, QuantizationAwareStudent, batch_of, convert_to_int8,
                                     int8_weights, load_quantized, prepare_qat, save_quantized)
from kdrun.errors import RunError


def compress_student(cfg, student: nn.Module, teacher: nn.Module | None, example: torch.Tensor
                     ) -> tuple[nn.Module, dict]:
    """Initialise from the teacher, prune, prepare quantization-aware training, in that order (after
    `check_compression`, with the teacher's weights loaded). `example`: a batch of inputs on the training
    device (its values are not used). Returns the student to train (the same module, or with quantize a new
    `QuantizationAwareStudent`) and the record's entries: parameters and MACs (one image) before and after."""
    options = options_of(cfg.student)
    if not options.active:
        return student, {}
    example = batch_of(tuple(example.shape[1:]), example.device)
    record: dict = {"student_init": "teacher" if options.init else "random"}
    if options.init:
        copy_teacher_weights(student, teacher)
    macs, params = macs_and_params(student, example)
    record.update(student_params_before=params, student_macs_before=macs)
    if options.prune is not None:
        if options.prune_kind == "structured":
            prune_structured(student, example, options.prune)
        else:
            prune_unstructured(student, options.prune)
        macs, params = macs_and_params(student, example)
        params -= masked_count(student)  # unstructured: the weights left; the tensors keep their shapes
        record["student_zero_fraction_after"] = zero_fraction(student)
    record.update(student_params_after=params, student_macs_after=macs)
    if options.quantize:
        student = prepare_qat(student, example)
    return student, record


def finish_student(cfg, student: nn.Module, evaluate_fn: Callable[[nn.Module], float], run_dir: Path) -> dict:
    """After training. Quantized: convert to int8, measure its test accuracy with `evaluate_fn(model) ->
    accuracy` (as quantized), write `run_dir/student_quantized.pt2` and check it reads back to the same
    outputs (the int8 model stays at hand as `student.converted`). Unstructured pruning's masks are dropped in place (the model's own keys in a state_dict saved
    after this; the zeros stay). Returns the record's entries."""
    options = options_of(cfg.student)
    if not options.active:
        return {}
    record: dict = {}
    if options.quantize:
        if not isinstance(student, QuantizationAwareStudent):
            raise RuntimeError("finish_student: student.quantize is set but the student was not prepared by "
                               "compress_student")
        quantized = convert_to_int8(student)
        student._converted = (quantized,)
        record["quantized_acc"] = float(evaluate_fn(quantized))
        path = Path(run_dir) / QUANTIZED_FILE
        program, size = save_quantized(quantized, path)
        check_reload(program, path)
        record.update(student_size_bytes=size, student_weight_bytes=program_tensor_bytes(program),
                      **student.fp32_sizes, quantized_file=path.name)
        if options.prune is not None:
            weights = int8_weights(quantized)
            total = sum(w.numel() for w in weights)
            record["student_zero_fraction"] = sum(int((w == 0).sum()) for w in weights) / total if total else 0.0
    elif options.prune is not None:
        release_masks(student)
        record["student_zero_fraction"] = zero_fraction(student)
    if options.prune is not None:
        record["student_params_final"] = param_count(student)
    return record


@torch.no_grad()
def check_reload(program, path: Path) -> None:
    """The file must give the outputs of the program that was saved (a torn or foreign file would not)."""
    shape = tuple(program.example_inputs[0][0].shape[1:])
    x = torch.randn(3, *shape, generator=torch.Generator().manual_seed(0))
    expected, got = program.module()(x), load_quantized(path)(x)
    if not torch.equal(expected, got):
        raise RunError(f"{path} does not read back to the model just saved (outputs differ by "
                       f"{(expected - got).abs().max().item():.3g})")
