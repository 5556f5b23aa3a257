"""transfer=label_free (SSLD): no ground-truth label reaches the loss; unlabelled pools, per-class selection."""
from pathlib import Path

import pytest
import torch
from PIL import Image

from conftest import compose_config
from kdrun.data import load_dataset
from kdrun.errors import ConfigError
from kdrun.experiment import prepare
from kdrun.methods.kd import symmetric_kl_loss
from kdrun.transfer import NO_LABEL, build_transfer
from kdrun.transfer.label_free import select_per_class_top

BASE = ("transfer=label_free", "results_dir=/nonexistent", "batch_size=64")
LABEL_FREE = (*BASE, "method.alpha=1")


def write_folder(root: Path, n: int, shape=(1, 8, 8), seed=0) -> Path:
    generator = torch.Generator().manual_seed(seed)
    root.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        sub = root / f"part{i % 2}"  # any layout: files are found below the folder
        sub.mkdir(exist_ok=True)
        pixels = torch.randint(0, 256, shape, dtype=torch.uint8, generator=generator)
        array = pixels[0].numpy() if shape[0] == 1 else pixels.permute(1, 2, 0).numpy()
        Image.fromarray(array).save(sub / f"{i}.png")
    return root


def test_symmetric_kl_is_paddleclas_dmlloss():
    """PaddleClas ppcls/loss/dmlloss.py, transcribed: softmax both, eps 1e-12, (kl(x,t) + kl(t,x)) / 2 with
    kl(x, t) = t log((t+eps)/(x+eps)) * C, then the mean over N x C elements."""
    torch.manual_seed(0)
    s = torch.randn(6, 5, dtype=torch.float64, requires_grad=True)
    t = torch.randn(6, 5, dtype=torch.float64)
    eps, C = 1e-12, 5
    x, target = torch.softmax(s, 1), torch.softmax(t, 1)

    def kldiv(x, target):
        return target * torch.log((target + eps) / (x + eps)) * C

    official = ((kldiv(x, target) + kldiv(target, x)) / 2).mean()
    ours = symmetric_kl_loss(s, t)
    assert torch.allclose(ours.double(), official, rtol=1e-6, atol=1e-9)
    g_ours, = torch.autograd.grad(ours, s)
    g_official, = torch.autograd.grad(official, s)
    assert torch.allclose(g_ours.double(), g_official, rtol=1e-5, atol=1e-8)


def test_no_label_reaches_the_loss():
    plan = prepare(compose_config(*LABEL_FREE, "teacher=resnet8", "student=resnet8"))
    images, labels, index = next(iter(plan.train_loader))
    assert torch.all(labels == NO_LABEL)
    assert plan.transfer.has_labels is False
    plan.method.train()
    torch.manual_seed(0)
    with_none = plan.method(images, labels, index).terms
    torch.manual_seed(0)
    with_truth = plan.method(images, plan.data.train_labels[index], index).terms
    assert set(with_none) == {"kd"}  # no CE term at all
    assert torch.equal(with_none["kd"], with_truth["kd"])
    assert plan.method.kd_divergence == "js"


@pytest.mark.parametrize("overrides, message", [
    (("method.alpha=0.9",), r"gives the student no labels, but its CE weight is 0.1 \(1 - method.alpha\)"),
    (("method=at",), r"CE weight is 1 .*method.ce_weight=0"),
    (("method=dkd", "method.ce_weight=0"), r"method=dkd is not allowed with transfer=label_free: its loss reads"),
    (("method=ce", "method.ce_weight=0"), r"method=ce is not allowed with transfer=label_free: .* needs a teacher"),
    (("method.kd_until_epoch=2",), r"method.kd_until_epoch is not allowed with transfer=label_free"),
    (("transfer.divergence=jsd",), r"transfer.divergence=jsd is not allowed: one of kl, js"),
    (("transfer.select=top",), r"transfer.select=top is not allowed: one of all, per_class_top"),
    (("transfer.per_class=5",), r"transfer.per_class is not allowed with transfer.select=all"),
    (("transfer.select=per_class_top", "transfer.per_class=5"), r"per_class_top is not allowed without unlabelled"),
    (("transfer.select=per_class_top", "transfer.labelled_fraction=0.5"), r"transfer.per_class=None is not allowed"),
    (("transfer.unlabelled=nosuchset",), r"transfer.unlabelled=nosuchset is not allowed: a dataset name"),
    (("transfer.unlabelled=/no/such/folder",), r"transfer.unlabelled=/no/such/folder is not allowed: no such folder"),
])
def test_refusals_name_the_problem(overrides, message):
    alpha = () if any(o.startswith(("method=ce", "method.alpha")) for o in overrides) else ("method.alpha=1",)
    with pytest.raises(ConfigError, match=message):
        prepare(compose_config(*BASE, *alpha, *overrides))


def test_unlabelled_folder_joins_the_transfer_set(tmp_path):
    folder = write_folder(tmp_path / "pool", 7)
    cfg = compose_config(*LABEL_FREE, f"transfer.unlabelled={folder}", "transfer.labelled_fraction=0.5")
    data = load_dataset(cfg.dataset)
    transfer = build_transfer(cfg, data)
    n_labelled = len(transfer.teacher_data.train_labels)
    assert transfer.size == 1437 + 7  # the whole training split (its labels withheld) and the pool
    assert transfer.record["transfer_pool_images"] == 7
    assert transfer.record["transfer_unlabelled_images"] == 1437 - n_labelled + 7
    assert torch.equal(transfer.images[:n_labelled], transfer.teacher_data.train_images)
    assert int(transfer.candidates.sum()) == 1437 - n_labelled + 7


def test_images_of_another_shape_are_refused_unless_resized(tmp_path):
    folder = write_folder(tmp_path / "rgb", 3, shape=(3, 16, 16))
    cfg = compose_config(*LABEL_FREE, f"transfer.unlabelled={folder}")
    data = load_dataset(cfg.dataset)
    with pytest.raises(ConfigError, match=r"has images of 3x16x16, the dataset's are 1x8x8 .*transfer.resize=true"):
        build_transfer(cfg, data)
    cfg = compose_config(*LABEL_FREE, f"transfer.unlabelled={folder}", "transfer.resize=true")
    transfer = build_transfer(cfg, data)
    assert transfer.images.shape[1:] == (1, 8, 8) and transfer.images.dtype == torch.uint8
    assert transfer.record["transfer_pool_converted"].startswith("3x16x16 -> 1x8x8")


class FakeTeacher:
    """Answers chosen by the test: image i's logits put confidence c_i on class i % 3."""

    queries = 0

    def __init__(self, confidence):
        self.confidence = confidence

    def answers(self, images):
        self.queries += len(images)
        idx = images[:, 0, 0, 0].long()
        logits = torch.zeros(len(images), 3)
        logits[torch.arange(len(images)), idx % 3] = self.confidence[idx]
        return logits

    def probabilities(self, answers):
        return torch.softmax(answers, 1)


def test_per_class_top_keeps_the_most_confident_unlabelled_images_of_each_predicted_class():
    n = 12
    images = torch.zeros(n, 1, 2, 2, dtype=torch.uint8)
    images[:, 0, 0, 0] = torch.arange(n, dtype=torch.uint8)  # the image says who it is
    candidates = torch.arange(n) >= 3  # images 0..2: the teacher's own training images, always kept
    confidence = torch.tensor([0, 0, 0, 1, 9, 2, 8, 3, 7, 4, 6, 5], dtype=torch.float)
    teacher = FakeTeacher(confidence)
    keep, answers = select_per_class_top(teacher, images, candidates, per_class=2)
    # class 0: 3, 6, 9 -> 6 (8), 9 (4); class 1: 4, 7, 10 -> 4 (9), 10 (6); class 2: 5, 8, 11 -> 8 (7), 11 (5)
    assert keep.tolist() == [0, 1, 2, 4, 6, 8, 9, 10, 11]
    assert teacher.queries == 9  # every candidate scored once
    assert torch.isnan(answers[:3]).all()  # not asked: labelled later
    assert not torch.isnan(answers[3:]).any()


def test_selection_cache_key_follows_access_and_images_not_the_loss(tmp_path):
    from kdrun.transfer.label_free import selection_key

    folder = write_folder(tmp_path / "pool", 5)
    base = (*LABEL_FREE, f"transfer.unlabelled={folder}", "transfer.select=per_class_top", "transfer.per_class=3")
    data = load_dataset(compose_config().dataset)

    def key(*extra):
        cfg = compose_config(*base, *extra)
        transfer = build_transfer(cfg, data)
        return selection_key(cfg, "sha", transfer.images, transfer.candidates)

    first = key()
    assert key("transfer.divergence=kl") == first  # the loss does not change the selection
    assert key("teacher.access=probabilities") != first  # its stored answers are probabilities, not logits
    write_folder(tmp_path / "pool", 5, seed=1)  # the same path, other images
    assert key() != first


def test_a_selection_made_with_logits_is_not_reused_as_probabilities(kdrun):
    common = ("teacher=resnet8", "student=resnet8", "transfer=label_free", "method.alpha=1",
              "transfer.labelled_fraction=0.5", "transfer.select=per_class_top", "transfer.per_class=20")
    assert kdrun(*common)[0] == 0
    code, records = kdrun(*common, "teacher.access=probabilities", "teacher.query_budget=1437")
    assert code == 0  # the whole set's size is the plan: scored candidates' answers are their labels
    record = next(r for r in records if r["teacher.access"] == "probabilities")
    from kdrun.checkpoint import load_verified

    answers = load_verified(Path(record["run_dir"]) / "transfer" / "answers.pt")[0]["answers"]
    assert torch.allclose(answers.sum(1), torch.ones(len(answers)), atol=1e-5) and (answers >= 0).all()
    assert record["teacher_queries"] == 1437
