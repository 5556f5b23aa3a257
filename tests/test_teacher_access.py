"""teacher.access and teacher.query_budget: a black box exposes probabilities (or logits) only, is asked once
per transfer image, counted, and never past its budget."""
import pytest
import torch
from torch import nn

from conftest import compose_config
from kdrun.errors import ConfigError, RunError
from kdrun.experiment import prepare
from kdrun.methods.kd import kd_loss
from kdrun.methods.dkd import dkd_loss
from kdrun.teacher_access import BlackBox, as_logits
from kdrun.transfer.runtime import TransferRun, teacher_client
from kdrun.train import TrainSettings

BOX = ("teacher=resnet8", "student=resnet8", "results_dir=/nonexistent", "batch_size=64")


def test_black_box_answers_probabilities_only_and_counts():
    model = nn.Sequential(nn.Flatten(), nn.Linear(4, 3))
    box = BlackBox(model, "probabilities", budget=10)
    answers = box(torch.randn(6, 1, 2, 2))
    assert torch.allclose(answers.sum(1), torch.ones(6)) and (answers >= 0).all()
    assert box.queries == 6 and box.remaining() == 4
    assert not any(isinstance(v, nn.Module) for v in vars(box).values())  # the module is not an attribute
    with pytest.raises(RunError, match="query budget is spent: 6 of 10 images asked, 5 more wanted"):
        box(torch.randn(5, 1, 2, 2))
    assert box.queries == 6
    logits_box = BlackBox(model, "logits")
    x = torch.randn(2, 1, 2, 2)
    assert torch.allclose(logits_box(x), model(x))


def test_log_probabilities_stand_in_for_logits_in_kd_and_dkd():
    """A constant shift per row leaves softmax(z / T) unchanged, and log p = z - logsumexp(z)."""
    torch.manual_seed(0)
    s, t = torch.randn(8, 10), torch.randn(8, 10) * 3
    log_p = as_logits(torch.softmax(t, 1), "probabilities")
    for T in (1.0, 4.0, 20.0):
        assert torch.allclose(kd_loss(s, log_p, T), kd_loss(s, t, T), atol=1e-5)
    target = torch.randint(0, 10, (8,))
    assert torch.allclose(dkd_loss(s, log_p, target, 1.0, 8.0, 4.0), dkd_loss(s, t, target, 1.0, 8.0, 4.0), atol=1e-5)


@pytest.mark.parametrize("overrides, message", [
    (("teacher.access=probabilities", "method=at"), r"teacher.access=probabilities is not allowed with method=at: "
                                                    r"its loss needs the teacher's features"),
    (("teacher.access=logits", "method=fitnet"), r"teacher.access=logits is not allowed with method=fitnet"),
    (("teacher.access=probabilities", "method=logits"), r"needs the teacher's logits \(teacher.access=logits or full\)"),
    (("teacher.access=everything",), r"teacher.access=everything is not allowed: one of full, logits, probabilities"),
    (("teacher.query_budget=100",), r"teacher.query_budget is not allowed with teacher.access=full"),
    (("teacher.access=logits", "teacher.query_budget=10"), r"teacher.query_budget=10 is not allowed: an integer >= "
                                                            r"batch_size \(64\)"),
    (("teacher.access=logits", "assistants=[resnet14]"), r"teacher.access=logits is not allowed with assistants"),
])
def test_refusals(overrides, message):
    with pytest.raises(ConfigError, match=message):
        prepare(compose_config(*BOX, *overrides))


def test_budget_cuts_the_transfer_set_and_the_student_never_runs_the_teacher(tmp_path):
    cfg = compose_config(*BOX, "teacher.access=probabilities", "teacher.query_budget=300", f"results_dir={tmp_path}")
    plan = prepare(cfg)
    assert plan.transfer.size == 300 and plan.transfer.record["transfer_size_before_budget"] == 1437
    settings = TrainSettings(torch.device("cpu"))
    run = TransferRun(cfg, plan.transfer, plan.method, plan.student_loader,
                      teacher_client(cfg, plan.teacher, plan.data, settings), tmp_path, settings)
    run.prepare()
    assert run.queries == 300
    calls = []
    plan.teacher.register_forward_hook(lambda *_: calls.append(1))
    plan.method.train()
    for images, labels, index in plan.train_loader:
        out = plan.method(images, labels, index)
        assert set(out.terms) == {"ce", "kd"}
    assert calls == [] and plan.method.teacher_queries == 0
    # the stored answers are the box's probabilities of the un-augmented images, as log-probabilities
    t_logits, feats = plan.method.run_teacher(images, index)
    with torch.no_grad():
        probs = torch.softmax(plan.teacher(normalise(plan, plan.transfer.images[index.cpu()])), 1)
    assert feats == {} and torch.allclose(t_logits.exp(), probs, atol=1e-6)
    # a second attempt in the same run directory reads the answers back instead of asking again
    again = TransferRun(cfg, plan.transfer, plan.method, plan.student_loader,
                        teacher_client(cfg, plan.teacher, plan.data, settings), tmp_path, settings)
    again.prepare()
    assert again.client.queries == 0 and again.queries == 300


def normalise(plan, images):
    from kdrun.data.augment import normalize

    return normalize(images, torch.tensor(plan.data.mean).view(1, 1, 1, 1), torch.tensor(plan.data.std).view(1, 1, 1, 1))


def test_full_access_counts_every_image_the_teacher_runs_on():
    plan = prepare(compose_config(*BOX))
    plan.method.train()
    images, labels, index = next(iter(plan.train_loader))
    plan.method(images, labels, index)
    plan.method(images, labels, index)
    assert plan.method.teacher_queries == 2 * len(labels)


def test_the_budget_counts_answers_read_back_from_files(tmp_path):
    cfg = compose_config(*BOX, "teacher.access=probabilities", "teacher.query_budget=300", f"results_dir={tmp_path}")
    plan = prepare(cfg)
    settings = TrainSettings(torch.device("cpu"))
    run = TransferRun(cfg, plan.transfer, plan.method, plan.student_loader,
                      teacher_client(cfg, plan.teacher, plan.data, settings), tmp_path, settings)
    run.count_earlier(250)  # e.g. a cached selection's scoring
    with pytest.raises(RuntimeError, match="query budget is spent: 250 of 300 images asked, 64 more wanted"):
        run.answers(plan.transfer.images[:64])


def test_a_black_box_method_never_falls_back_to_the_module():
    plan = prepare(compose_config(*BOX, "teacher.access=probabilities"))
    plan.method.use_black_box()
    images, labels, index = next(iter(plan.train_loader))
    with pytest.raises(RuntimeError, match="the teacher is a black box and no stored answers are set"):
        plan.method(images, labels, index)
