"""What a compressed student costs: parameters, MACs (torch-pruning's counter) and size in bytes."""
from __future__ import annotations

import io

import torch
from torch import nn


def param_count(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def macs_and_params(model: nn.Module, example: torch.Tensor) -> tuple[int, int]:
    """Multiply-accumulates of one image's forward and the parameter count (`tp.utils.count_ops_and_params`
    runs a deep copy in eval mode, so the model's BN statistics are untouched)."""
    import torch_pruning as tp

    macs, params = tp.utils.count_ops_and_params(model, example[:1])
    return int(macs), int(params)


def tensor_bytes(tensors) -> int:
    """Bytes of the distinct storages behind `tensors` (a tied weight counts once)."""
    seen, total = set(), 0
    for t in tensors:
        if not isinstance(t, torch.Tensor):
            continue
        key = (t.untyped_storage().data_ptr(), t.device)
        if key not in seen:
            seen.add(key)
            total += t.untyped_storage().nbytes()
    return total


def program_tensor_bytes(program) -> int:
    """Bytes of an exported program's weights and constants (its graph excluded)."""
    return tensor_bytes([*program.state_dict.values(), *program.constants.values()])


def program_bytes(program) -> bytes:
    """The exported program as `torch.export.save` writes it (graph, weights, constants)."""
    buffer = io.BytesIO()
    torch.export.save(program, buffer)
    return buffer.getvalue()
