"""`student.quantize=int8`: quantization-aware training through torchao's PT2E flow, then a real int8 model.

Why PT2E: torchao's module-swap QAT (`QATConfig`) fake-quantizes nn.Linear and nn.Embedding only, and kdrun's
students are convolutional; eager `torch.ao.quantization` QAT needs QuantStub/FloatFunctional edits inside every
model (residual additions); PT2E captures the model with `torch.export` and quantizes the graph, so every
registered model works unchanged. `torch.ao.quantization.quantize_pt2e` is gone from torch 2.14; the flow
lives in `torchao.quantization.pt2e`. The quantizer is `X86InductorQuantizer` in its QAT configuration
(uint8 activations per tensor, int8 weights per output channel, symmetric; conv+BN folded during training
as it will be after conversion).

Flow: `prepare_qat` exports the student (train mode, a dynamic batch dimension) and inserts fake
quantisation (`prepare_qat_pt2e`); the result, wrapped in `QuantizationAwareStudent`, trains with any
response method (it maps images to logits, but the graph has no module calls, so feature taps and module
hooks on it find nothing). After training `convert_to_int8` runs `convert_pt2e`: BN folded into the convs,
weights stored as int8 with their scales, activations quantized/dequantized between ops (torchao's reference
representation: weights and activations on the int8 grid, computed with fp32 kernels, so it runs on any
device; `torch.compile` with inductor lowers it to x86 int8 kernels).
`save_quantized` writes it with `torch.export.save`; `load_quantized` (or plain
`torch.export.load(path).module()`) reads it back.

int4: torchao 0.18 trains int4 weights quantization-aware only inside nn.Linear (QATConfig); its conv path
(`IntxWeightOnlyConfig`) is post-training and stores the values in int8 bytes. kdrun's students are
convolutional, so `checks.py` refuses int4 for them.
"""
from __future__ import annotations

import contextlib
import copy
import hashlib
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from kdrun.checkpoint import atomic_write_bytes, atomic_write_text, hash_path, recorded_hashes, sha256_file
from kdrun.compress.measure import program_bytes, tensor_bytes
from kdrun.compress.prune import MASK, hold_pruned_at_zero, release_masks
from kdrun.errors import DamagedFile

QUANTIZED_FILE = "student_quantized.pt2"  # torch.export's recommended suffix: it is not a torch.load file


def batch_of(input_shape, device) -> torch.Tensor:
    """An example batch of two: torch.export specialises a batch of one to the constant 1."""
    return torch.zeros(2, *input_shape, device=device)


def export(model: nn.Module, example: torch.Tensor):
    """`torch.export.export` with the batch dimension left dynamic (any batch size, the last short batch too)."""
    batch = torch.export.Dim("batch", min=1)
    return torch.export.export(model, (example,), dynamic_shapes=({0: batch},))


def fp32_sizes(student: nn.Module, example: torch.Tensor) -> dict:
    """The float student's size, measured the way the int8 one will be: its exported inference program's
    bytes, and the bytes of its weights alone (without unstructured pruning's masks)."""
    plain = copy.deepcopy(student).eval()
    release_masks(plain)
    with torch.no_grad():
        program = export(plain, example)
    return {"student_size_bytes_fp32": len(program_bytes(program)),
            "student_weight_bytes_fp32": tensor_bytes(plain.state_dict().values())}


def export_error(student: nn.Module, exc: Exception) -> str:
    text = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:160]
    return f"torch.export cannot capture {getattr(student, 'model_name', type(student).__name__)} ({text})"


class QuantizationAwareStudent(nn.Module):
    """The student while it trains with fake quantisation: the PT2E graph, callable as `model(x) -> logits`.

    An exported graph ignores `train()`/`eval()` (torchao disables them on it), so this wrapper switches the
    graph's BN (and dropout) ops with torchao's `move_exported_model_to_train/eval`, and the observers with
    `enable_observer`/`disable_observer`: evaluation then neither updates BN statistics nor moves the
    quantisation ranges on test images. `freeze_bn()` keeps the BN ops in eval mode in training too (the
    Gaussian synthesis' frozen BN); the observers still learn."""

    def __init__(self, prepared: nn.Module, model_name: str, input_shape: tuple[int, ...], sizes: dict):
        super().__init__()
        self.qat = prepared
        self.model_name = model_name
        self.input_shape = tuple(input_shape)
        self.fp32_sizes = dict(sizes)
        self.bn_frozen = False
        self._converted: tuple[QuantizedStudent | None] = (None,)  # a tuple: not a submodule, not in state_dict
        self.train(True)

    @property
    def converted(self) -> "QuantizedStudent | None":
        """The int8 model `finish_student` converted from this student (None before)."""
        return self._converted[0]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.qat(x)

    def float_state_dict(self) -> dict[str, torch.Tensor]:
        """The trained float weights under the model's own keys (fake-quantisation state and pruning masks
        left out): loads strictly into the (pruned) student architecture, e.g. as a float checkpoint."""
        return {k: v for k, v in self.qat.state_dict().items()
                if not k.startswith("activation_post_process_") and not k.endswith(MASK) and k != "_guards_fn"}

    def train(self, mode: bool = True):
        from torchao.quantization.pt2e import (disable_observer, enable_observer, move_exported_model_to_eval,
                                               move_exported_model_to_train)

        self.training = mode  # not nn.Module.train: it would call the graph's disabled train()
        graph_mode = mode and not self.bn_frozen
        (move_exported_model_to_train if graph_mode else move_exported_model_to_eval)(self.qat)
        self.qat.apply(enable_observer if mode else disable_observer)
        return self

    def freeze_bn(self, frozen: bool = True) -> None:
        self.bn_frozen = frozen
        self.train(self.training)


def prepare_qat(student: nn.Module, example: torch.Tensor) -> QuantizationAwareStudent:
    from torchao.quantization.pt2e.quantize_pt2e import prepare_qat_pt2e
    from torchao.quantization.pt2e.quantizer.x86_inductor_quantizer import (
        X86InductorQuantizer, get_default_x86_inductor_quantization_config)

    example = batch_of(example.shape[1:], example.device)
    sizes = fp32_sizes(student, example)
    was_training = student.training
    graph = export(student.train(), example).module()
    student.train(was_training)
    quantizer = X86InductorQuantizer().set_global(get_default_x86_inductor_quantization_config(is_qat=True))
    prepared = prepare_qat_pt2e(graph, quantizer)
    hold_pruned_at_zero(prepared)  # unstructured pruning's masks came along as buffers of the same names
    return QuantizationAwareStudent(prepared, getattr(student, "model_name", type(student).__name__),
                                    tuple(example.shape[1:]), sizes)


class QuantizedStudent(nn.Module):
    """The converted int8 model for inference: `model(x) -> logits` in fp32 math on int8 weights and
    activations, whatever autocast the caller runs under (the q/dq ops take float32). `train()` only sets
    the flag: an exported graph has no training mode."""

    def __init__(self, graph: nn.Module, model_name: str, input_shape: tuple[int, ...]):
        super().__init__()
        self.graph = graph
        self.model_name = model_name
        self.input_shape = tuple(input_shape)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with torch.autocast(x.device.type, enabled=False):
            return self.graph(x.float())

    def train(self, mode: bool = True):
        self.training = mode
        return self


def convert_to_int8(student: QuantizationAwareStudent) -> QuantizedStudent:
    """`convert_pt2e` on a copy of the trained graph (the QAT student stays as it was)."""
    from torchao.quantization.pt2e import move_exported_model_to_eval
    from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e

    prepared = copy.deepcopy(student.qat)
    move_exported_model_to_eval(prepared)
    with fold_only_present_convs(prepared):
        converted = convert_pt2e(prepared)
    drop_unused_attributes(converted)
    return QuantizedStudent(converted, student.model_name, student.input_shape)


def drop_unused_attributes(graph: nn.Module) -> None:
    """Delete parameters and buffers no graph node reads. Why: `convert_pt2e` leaves the float conv weights
    beside their folded int8 copies, and a re-export would lift (and save) them."""
    used = {n.target for n in graph.graph.nodes if n.op in ("get_attr", "call_module")}
    for name, _ in [*graph.named_parameters(remove_duplicate=False), *graph.named_buffers(remove_duplicate=False)]:
        if name not in used:
            *path, leaf = name.split(".")
            owner = graph.get_submodule(".".join(path)) if path else graph
            if hasattr(owner, leaf):
                delattr(owner, leaf)
    graph.delete_all_unused_submodules()


@contextlib.contextmanager
def fold_only_present_convs(graph: nn.Module):
    """Why: torchao's `convert_pt2e` folds BN into convs by matching 24 pattern variants for each of conv1d,
    conv2d, conv_transpose1d and conv_transpose2d, and it builds every pattern with `torch.export` (0.3-0.7 s
    each, 96 in all, twice on a CUDA machine): about a minute per conversion whatever the model. A pattern of
    a conv kind the graph does not contain cannot match, so those kinds are skipped; the result is the same.
    Without the (private) helper in a later torchao this does nothing and conversion is only slower."""
    try:
        from torchao.quantization.pt2e import qat_utils
        helper = qat_utils._fold_conv_bn_qat_helper
    except (ImportError, AttributeError):
        yield
        return
    aten = torch.ops.aten
    kinds = {F.conv1d: ("conv1d", ("default", "padding")), F.conv2d: ("conv2d", ("default", "padding")),
             F.conv_transpose1d: ("conv_transpose1d", ("default", "input")),
             F.conv_transpose2d: ("conv_transpose2d", ("input", "default"))}
    present = {n.target for n in graph.graph.nodes if n.op == "call_function"}

    def targets(conv_fn):
        op, overloads = kinds[conv_fn]
        packet = getattr(aten, op)
        return {getattr(packet, o) for o in overloads if hasattr(packet, o)}

    def only_present(m, conv_fn, *args, **kwargs):
        if conv_fn in kinds and not present & targets(conv_fn):
            return m
        return helper(m, conv_fn, *args, **kwargs)

    qat_utils._fold_conv_bn_qat_helper = only_present
    try:
        yield
    finally:
        qat_utils._fold_conv_bn_qat_helper = helper


def save_quantized(model: QuantizedStudent, path: Path):
    """Write the int8 model as a CPU `torch.export` program, atomically, with its sha256 beside it (as
    `save_checkpoint` does). Returns the exported program and the bytes written."""
    graph = copy.deepcopy(model.graph).to("cpu")
    with torch.no_grad():
        program = export(graph, batch_of(model.input_shape, "cpu"))
    data = program_bytes(program)
    digest, name = hashlib.sha256(data).hexdigest(), Path(path).name
    previous = [d for d in recorded_hashes(path) if d != digest][:1] if Path(path).exists() else []
    # As save_checkpoint: while the file is replaced its hash file accepts the old and the new bytes.
    atomic_write_text(hash_path(path), "".join(f"{d}  {name}\n" for d in [digest, *previous]))
    atomic_write_bytes(path, data)
    if previous:
        atomic_write_text(hash_path(path), f"{digest}  {name}\n")
    return program, len(data)


def load_quantized(path: Path, device="cpu") -> QuantizedStudent:
    """The int8 student `save_quantized` wrote (its bytes checked against the sha256 beside it):
    `model(x) -> logits` for a batch of images like the training set's (N x C x H x W)."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise DamagedFile(path, "the file is missing")
    expected = recorded_hashes(path)
    if expected and sha256_file(path) not in expected:
        raise DamagedFile(path, f"its sha256 differs from the one {hash_path(path).name} records")
    program = torch.export.load(path)
    shape = tuple(program.example_inputs[0][0].shape[1:]) if program.example_inputs else ()
    graph = program.module().to(device)
    return QuantizedStudent(graph, path.stem, shape)


def int8_weights(model: QuantizedStudent) -> list[torch.Tensor]:
    return [t for t in model.graph.state_dict().values() if t.dtype == torch.int8]
