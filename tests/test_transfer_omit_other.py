"""transfer=omit_classes (Hinton's omitted 3s, the bias shift) and transfer=other_dataset; per-class accuracy."""
import pytest
import torch
from torch import nn

from conftest import compose_config
from kdrun.data import TensorLoader, load_dataset
from kdrun.errors import ConfigError
from kdrun.experiment import prepare
from kdrun.train import TrainSettings, class_columns, evaluate_classes
from kdrun.transfer import NO_LABEL, build_transfer
from kdrun.transfer.bias_shift import apply_shift, choose_shift, output_bias
from test_transfer_label_free import write_folder

DIGITS = load_dataset(compose_config().dataset)


def test_omitted_classes_leave_the_transfer_set_not_the_test_set():
    cfg = compose_config("transfer=omit_classes", "transfer.classes=[3,7]")
    transfer = build_transfer(cfg, DIGITS)
    assert not torch.isin(transfer.labels, torch.tensor([3, 7])).any()
    assert transfer.size == int((~torch.isin(DIGITS.train_labels, torch.tensor([3, 7]))).sum())
    assert transfer.teacher_data is DIGITS  # the teacher saw every class
    assert transfer.val is None and transfer.record["transfer_omitted_images"] == 1437 - transfer.size


def test_bias_shift_holds_out_a_validation_split_of_every_class():
    cfg = compose_config("transfer=omit_classes", "transfer.bias_shift=auto", "transfer.val_fraction=0.2")
    transfer = build_transfer(cfg, DIGITS)
    val_images, val_labels = transfer.val
    assert set(val_labels.tolist()) == set(range(10))
    assert (val_labels == 3).any() and not (transfer.labels == 3).any()
    assert len(val_labels) + transfer.size + transfer.record["transfer_omitted_images"] == 1437
    # held out of the training split: no validation image is in the transfer set
    rows = {tuple(x.flatten().tolist()) for x in transfer.images}
    assert sum(tuple(x.flatten().tolist()) in rows for x in val_images) <= 2  # digits has a few duplicate images


@pytest.mark.parametrize("value", ["[10]", "[-1]", "[]", "[0,1,2,3,4,5,6,7,8,9]", "three"])
def test_classes_out_of_range_are_refused(value):
    cfg = compose_config("transfer=omit_classes", f"transfer.classes={value}")
    with pytest.raises(ConfigError, match=r"transfer.classes=.* is not allowed: a non-empty list of class indices in 0..9"):
        build_transfer(cfg, DIGITS)


def test_choose_shift_finds_the_constant_that_restores_the_omitted_class():
    torch.manual_seed(0)
    labels = torch.arange(300) % 3
    logits = torch.nn.functional.one_hot(labels, 3).float() * 2 + 0.1 * torch.randn(300, 3)
    logits[:, 1] -= 3.0  # class 1 was never seen: its logit is 3 too low
    shift = choose_shift(logits, labels, [1])
    shifted = logits.clone()
    shifted[:, 1] += shift
    assert (shifted.argmax(1) == labels).float().mean() == 1.0
    assert 1.0 < shift < 5.0
    assert choose_shift(torch.nn.functional.one_hot(labels, 3).float(), labels, [1]) == 0.0  # ties: no shift


def test_apply_shift_moves_only_the_omitted_classes_bias():
    model = nn.Sequential(nn.Flatten(), nn.Linear(4, 16), nn.ReLU(), nn.Linear(16, 5))
    before = model[3].bias.detach().clone()
    hidden = model[1].bias.detach().clone()
    apply_shift(model, 5, [2, 4], 1.5)
    assert torch.allclose(model[3].bias - before, torch.tensor([0, 0, 1.5, 0, 1.5]))
    assert torch.equal(model[1].bias, hidden)
    assert output_bias(model, 5) is model[3].bias


def test_per_class_accuracy():
    class Oracle(nn.Module):  # right on every class but 2, which it calls 0
        def forward(self, x):
            labels = x[:, 0, 0, 0].round().long()
            labels = torch.where(labels == 2, 0, labels)
            return torch.nn.functional.one_hot(labels, 4).float()

    labels = torch.tensor([0, 1, 2, 2, 3, 3])
    images = (labels.view(-1, 1, 1, 1) * 1.0).expand(-1, 1, 1, 1).contiguous().float()
    loader = TensorLoader(images, labels, 4, (0.0,), (1.0,), train=False)
    _, accuracy, per_class = evaluate_classes(Oracle(), loader, TrainSettings(torch.device("cpu")))
    assert per_class == [100.0, 100.0, 0.0, 100.0] and accuracy == pytest.approx(400 / 6)
    assert class_columns(per_class)["test_acc_class2"] == 0.0
    assert class_columns([50.0] * 21) == {}  # more than 20 classes: result.json only


def test_other_dataset_learns_from_a_folder_without_labels(tmp_path):
    folder = write_folder(tmp_path / "other", 40, shape=(1, 28, 28))
    cfg = compose_config("transfer=other_dataset", f"transfer.images={folder}", "transfer.resize=true",
                         "method.alpha=1", "batch_size=16", "results_dir=/nonexistent")
    plan = prepare(cfg)
    assert plan.transfer.size == 40 and torch.all(plan.transfer.labels == NO_LABEL)
    assert plan.transfer.images.shape[1:] == (1, 8, 8)
    assert plan.test_loader.num_samples == len(DIGITS.test_labels)  # tested on the dataset's own test split
    batch = next(iter(plan.train_loader))
    assert torch.all(batch[1] == NO_LABEL)


@pytest.mark.parametrize("overrides, message", [
    (("transfer.images=digits",), r"transfer.images=digits is not allowed: it is the dataset itself"),
    ((), r"transfer.images is not set"),
    (("transfer.images=mnist", "transfer.root=/nonexistent"),
     r"transfer.images=mnist: transfer.root=/nonexistent has no MNIST files .*transfer.download=true"),
])
def test_other_dataset_refusals(overrides, message):
    cfg = compose_config("transfer=other_dataset", "method.alpha=1", "results_dir=/nonexistent", *overrides)
    with pytest.raises(ConfigError, match=message):
        prepare(cfg)


def test_bias_shift_needs_a_classifier_bias_and_says_so_before_training():
    cfg = compose_config("dataset=linear_teacher", "student=linear", "method=ce", "transfer=omit_classes",
                         "transfer.classes=[1]", "transfer.bias_shift=auto", "batch_size=16",
                         "results_dir=/nonexistent")
    with pytest.raises(ConfigError, match=r"transfer.bias_shift=auto is not allowed with student=linear: .*no linear "
                                          r"classifier with a bias"):
        prepare(cfg)
