"""Compressed students through the CLI: a quantized copy of the teacher distilled from synthetic data in one
command, a structured-pruned student, and the record of both."""
from pathlib import Path

from kdrun.compress import load_quantized

SMALL = ("teacher=resnet8", "student=resnet8")


def test_a_quantized_copy_of_the_teacher_from_synthetic_data_in_one_command(kdrun):
    code, records = kdrun(*SMALL, "student.quantize=int8", "student.init=teacher", "transfer=synthetic",
                          "transfer.synth=bn_stats", "transfer.images=64", "transfer.iterations=2",
                          "transfer.batch_size=64", "method.alpha=1", "batch_size=32")
    assert code == 0
    record = records[-1]
    assert record["status"] == "completed" and record["student_init"] == "teacher"
    assert record["student.quantize"] == "int8" and 0 <= record["quantized_acc"] <= 100
    assert record["student_weight_bytes"] < record["student_weight_bytes_fp32"]
    model = load_quantized(Path(record["run_dir"]) / record["quantized_file"])
    import torch

    assert model(torch.zeros(2, 1, 8, 8)).shape == (2, 10)


def test_a_structured_pruned_student_is_smaller_and_trains(kdrun):
    code, records = kdrun(*SMALL, "student.prune=0.5", "student.prune_kind=structured")
    assert code == 0
    record = records[-1]
    assert record["status"] == "completed"
    assert record["student_params_after"] < record["student_params_before"]
    assert record["student_macs_after"] < record["student_macs_before"]
    assert record["student.prune"] == 0.5 and record["student.prune_kind"] == "structured"


def test_init_from_a_teacher_of_another_architecture_is_refused_before_anything_is_written(kdrun):
    code, records = kdrun("teacher=resnet14", "student=resnet8", "student.init=teacher")
    assert code != 0 and records == [] and not any(kdrun.root.iterdir())
