"""student.prune: unstructured pruning zeroes the fraction and keeps it zero through optimizer steps;
structured pruning really shrinks parameters and MACs, and the smaller model still runs and trains."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from test_compress_helpers import CLASSES, SHAPE, batch, compress_cfg, model
from kdrun.compress import compress_student, finish_student
from kdrun.compress.measure import macs_and_params
from kdrun.compress.prune import MASK, prunable_weights, zero_fraction


def train_steps(net, optimizer, steps: int = 3) -> list[float]:
    images, labels = batch()
    losses = []
    net.train()
    for _ in range(steps):
        loss = F.cross_entropy(net(images), labels)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    return losses


@pytest.mark.parametrize("optimizer", ["sgd", "adamw"])
def test_unstructured_zeroes_the_fraction_and_keeps_it_zero(optimizer, tmp_path):
    student, record = compress_student(compress_cfg(prune=0.5), model(), None, torch.zeros(2, *SHAPE))
    weights = [m.weight for m, _ in prunable_weights(student)]
    total = sum(w.numel() for w in weights)
    zeros = [w == 0 for w in weights]
    assert sum(int(z.sum()) for z in zeros) == round(0.5 * total)  # global: exactly the fraction of all weights
    assert record["student_zero_fraction_after"] == pytest.approx(0.5, abs=1 / total)
    assert record["student_params_after"] == record["student_params_before"] - round(0.5 * total)
    assert record["student_macs_after"] == record["student_macs_before"]  # dense kernels run the zeros
    per_layer = [float(z.float().mean()) for z in zeros]
    assert max(per_layer) - min(per_layer) > 0.05  # global, not the same fraction in every layer
    before = [w.detach().clone() for w in weights]
    opt = (torch.optim.SGD(student.parameters(), lr=0.1, momentum=0.9, weight_decay=5e-4, nesterov=True)
           if optimizer == "sgd" else torch.optim.AdamW(student.parameters(), lr=0.01, weight_decay=0.05))
    train_steps(student, opt)
    for w, z, old in zip(weights, zeros, before):
        assert torch.all(w[z] == 0)             # pruned: still exactly zero
        assert not torch.equal(w[~z], old[~z])  # the others trained
    done = finish_student(compress_cfg(prune=0.5), student, None, tmp_path)
    assert done["student_zero_fraction"] >= 0.5
    assert done["student_params_final"] == record["student_params_before"]
    fresh = model()
    fresh.load_state_dict(student.state_dict(), strict=True)  # masks released: the model's own keys
    assert not any(k.endswith(MASK) for k in student.state_dict())


def test_unstructured_masks_live_in_the_state_dict():
    # A resumed run restores the masks with the weights, so the same weights stay at zero.
    student, _ = compress_student(compress_cfg(prune=0.3), model(), None, torch.zeros(2, *SHAPE))
    masks = [k for k in student.state_dict() if k.endswith(MASK)]
    assert len(masks) == len(prunable_weights(student))
    assert torch.equal(student.state_dict()["fc." + MASK] == 0, student.fc.weight == 0)


def test_structured_shrinks_params_and_macs_and_trains():
    example = torch.zeros(2, *SHAPE)
    student, record = compress_student(compress_cfg(prune=0.5, prune_kind="structured"), model(), None, example)
    macs, params = macs_and_params(student, example)
    assert (record["student_macs_after"], record["student_params_after"]) == (macs, params)
    assert record["student_params_after"] < 0.4 * record["student_params_before"]   # ~ (1 - 0.5)^2
    assert record["student_macs_after"] < 0.4 * record["student_macs_before"]
    assert student.fc.out_features == CLASSES      # the classes are never pruned
    assert student.stem[0].in_channels == SHAPE[0]  # nor the input
    assert student.stem[0].out_channels == 8
    assert zero_fraction(student) < 0.01            # removed, not zeroed
    assert student(torch.randn(5, *SHAPE)).shape == (5, CLASSES)
    old = student.fc.weight.detach().clone()
    losses = train_steps(student, torch.optim.SGD(student.parameters(), lr=0.1, momentum=0.9), steps=2)
    assert all(map(torch.isfinite, map(torch.tensor, losses)))
    assert not torch.equal(old, student.fc.weight)


def test_structured_pruning_leaves_bn_statistics_alone():
    # The dependency graph is traced in eval mode: a teacher copy's running statistics are not moved by it.
    teacher = model(seed=3)
    teacher.train()(torch.randn(8, *SHAPE))
    student, _ = compress_student(compress_cfg(init="teacher", prune=0.25, prune_kind="structured"), model(seed=4),
                                  teacher, torch.randn(2, *SHAPE))
    assert student.fc.in_features < teacher.fc.in_features
    kept = student.layer3[0].bn2.running_var.numel()
    # The kept channels' statistics are some of the teacher's, exactly.
    teacher_var = teacher.layer3[0].bn2.running_var
    assert all(bool((teacher_var == v).any()) for v in student.layer3[0].bn2.running_var[:kept])
