"""student.quantize=int8: the quantization-aware student trains (with a kdrun Method around it) and evaluates
without moving its quantisation ranges; the converted int8 model is smaller than the fp32 one, really holds
int8 weights, loads from disk and gives the outputs it gave before saving.

torchao's conversion costs seconds whatever the model (it builds its BN-folding patterns with torch.export),
so one module-scoped student is trained and converted for all the assertions: init=teacher + unstructured
pruning + int8, the issue's "quantized copy of the teacher" with every step in the path."""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from omegaconf import OmegaConf

from test_compress_helpers import CLASSES, SHAPE, batch, compress_cfg, model
from kdrun.compress import (QUANTIZED_FILE, QuantizationAwareStudent, compress_student, finish_student,
                            load_quantized)
from kdrun.compress.quantize import int8_weights
from kdrun.methods.kd import KD
from kdrun.train import TrainSettings, evaluate

CFG = compress_cfg(init="teacher", prune=0.5, quantize="int8")
STEPS = 8


class Loader:
    """The shape of kdrun's in-memory loaders: (images, labels, index) batches and `num_samples`."""

    def __init__(self, images, labels, size=8):
        self.images, self.labels, self.size = images, labels, size
        self.num_samples = len(images)

    def __iter__(self):
        for i in range(0, self.num_samples, self.size):
            yield self.images[i:i + self.size], self.labels[i:i + self.size], torch.arange(i, min(i + self.size, self.num_samples))


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    teacher = model(seed=1)
    student, record = compress_student(CFG, model(seed=2), teacher, torch.zeros(2, *SHAPE))
    method = KD(OmegaConf.create({"name": "kd", "T": 4.0, "alpha": 0.5}), student, teacher, CLASSES)
    method.prepare(SHAPE)
    optimizer = torch.optim.SGD(method.parameters(), lr=0.05, momentum=0.9, weight_decay=5e-4)
    images, labels = batch(16)
    losses = []
    method.train()
    for _ in range(STEPS):
        out = method(images, labels, torch.arange(16))
        loss = sum(w * out.terms[k] for k, w in method.step_weights().items() if k in out.terms)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    method.eval()
    loader = Loader(images, labels)
    settings = TrainSettings(torch.device("cpu"))
    run_dir = tmp_path_factory.mktemp("run")
    done = finish_student(CFG, student, lambda m: evaluate(m, loader, settings)[1], run_dir)
    return dict(student=student, record=record, losses=losses, done=done, run_dir=run_dir, loader=loader,
                settings=settings, teacher=teacher)


def test_student_is_quantization_aware_and_trains(trained):
    assert isinstance(trained["student"], QuantizationAwareStudent)
    assert trained["record"]["student_init"] == "teacher"
    losses = trained["losses"]
    assert losses[-1] < 0.7 * losses[0], losses


def test_evaluation_moves_neither_ranges_nor_bn(trained):
    student = trained["student"].eval()
    state = {k: v.clone() for k, v in student.state_dict().items()}
    x = torch.randn(4, *SHAPE)
    with torch.no_grad():
        first = student(x)
        student(10 * torch.randn(32, *SHAPE))  # images far outside the ranges seen in training
        again = student(x)
    assert torch.equal(first, again)
    # BN's num_batches_tracked still counts (an add_ the exported graph keeps; unused with BN's momentum 0.1)
    assert all(torch.equal(state[k], v) for k, v in student.state_dict().items() if "num_batches_tracked" not in k)


def test_int8_model_is_smaller(trained):
    done = trained["done"]
    assert done["student_size_bytes"] < done["student_size_bytes_fp32"]
    assert done["student_weight_bytes"] < 0.35 * done["student_weight_bytes_fp32"]  # int8 weights, fp32 biases/scales
    assert (trained["run_dir"] / QUANTIZED_FILE).stat().st_size == done["student_size_bytes"]


def test_int8_model_holds_int8_weights_and_no_bn(trained):
    quantized = trained["student"].converted
    assert sum(w.numel() for w in int8_weights(quantized)) > 0.95 * trained["record"]["student_params_before"]
    ops = {str(n.target) for n in quantized.graph.graph.nodes if n.op == "call_function"}
    assert not any("batch_norm" in op for op in ops), ops  # folded into the convs
    assert any("quantize_per_tensor" in op for op in ops)
    assert trained["done"]["student_zero_fraction"] >= 0.5   # the pruned weights are int8 zeros


def test_saved_model_loads_with_the_same_outputs_and_accuracy(trained):
    path = trained["run_dir"] / QUANTIZED_FILE
    assert (path.parent / (path.name + ".sha256")).read_text().split()[1] == QUANTIZED_FILE
    before = trained["student"].converted  # the int8 model as it was before saving
    loaded = load_quantized(path)
    for n in (1, 5):  # any batch size
        x = torch.randn(n, *SHAPE)
        with torch.no_grad():
            assert torch.equal(before(x), loaded(x))
    assert evaluate(loaded, trained["loader"], trained["settings"])[1] == trained["done"]["quantized_acc"]
    plain = torch.export.load(path).module()  # without kdrun
    x = torch.randn(3, *SHAPE)
    with torch.no_grad():
        assert torch.equal(plain(x), loaded(x))


def test_int8_model_ignores_autocast(trained):
    loaded = load_quantized(trained["run_dir"] / QUANTIZED_FILE)
    x = torch.randn(2, *SHAPE)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        y = loaded(x)
    assert y.dtype == torch.float32
    assert torch.equal(y, loaded(x))


def test_a_damaged_file_is_refused(trained, tmp_path):
    copy_path = tmp_path / QUANTIZED_FILE
    data = bytearray((trained["run_dir"] / QUANTIZED_FILE).read_bytes())
    data[len(data) // 2] ^= 0xFF
    copy_path.write_bytes(bytes(data))
    (tmp_path / (QUANTIZED_FILE + ".sha256")).write_text((trained["run_dir"] / (QUANTIZED_FILE + ".sha256")).read_text())
    with pytest.raises(Exception, match="sha256"):
        load_quantized(copy_path)


def test_a_rebuilt_student_takes_the_trained_state(trained):
    # What a resumed run does: compress again from the same config, then load the checkpoint's state strictly.
    rebuilt, _ = compress_student(CFG, model(seed=2), trained["teacher"], torch.zeros(2, *SHAPE))
    rebuilt.load_state_dict(trained["student"].state_dict(), strict=True)
    rebuilt.eval()
    x = torch.randn(4, *SHAPE)
    with torch.no_grad():
        assert torch.equal(rebuilt(x), trained["student"].eval()(x))


def test_float_weights_load_into_the_plain_model(trained):
    plain = model()
    plain.load_state_dict(trained["student"].float_state_dict(), strict=True)
    assert torch.equal(plain.fc.bias, trained["student"].qat.fc.bias)
