"""Compressed students: `student.quantize`, `student.init=teacher`, `student.prune` / `student.prune_kind`.

Glue around the field's libraries: torchao's PT2E flow (quantization-aware training, int8 conversion),
torch-pruning (structured), torch.nn.utils.prune (unstructured). The runner calls three functions:

    check_compression(cfg, student, teacher, input_shape, device, method)   # in prepare: may refuse
    student, record = compress_student(cfg, student, teacher, example)     # in execute, teacher loaded
    record.update(finish_student(cfg, student, evaluate_fn, run_dir))      # after training

The libraries are imported on use, so `import kdrun` does not pay for torchao."""
from kdrun.compress.checks import check_compression
from kdrun.compress.options import COMPRESS_DEFAULTS, COMPRESS_KEYS, CompressOptions, options_of
from kdrun.compress.pipeline import compress_student, finish_student
from kdrun.compress.quantize import QUANTIZED_FILE, QuantizationAwareStudent, QuantizedStudent, load_quantized

__all__ = ["COMPRESS_DEFAULTS", "COMPRESS_KEYS", "CompressOptions", "QUANTIZED_FILE", "QuantizationAwareStudent",
           "QuantizedStudent", "check_compression", "compress_student", "finish_student", "load_quantized",
           "options_of"]
