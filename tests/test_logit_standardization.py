"""Logit standardization (Sun et al. 2024) as a modifier of the logit methods: the z-score and the KD and DKD
losses against a transcription of the official code (sunshangquan/logit-standardization-KD,
mdistiller/distillers/KD.py, DKD.py, tools/train.py), the official weights it switches to, and refusals."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from conftest import FAST, compose_config
from kdrun.experiment import prepare
from kdrun.methods.base import Forward, Stage
from kdrun.methods.logit_standardization import standardize_logits


def official_normalize(logit):  # KD.py::normalize
    mean = logit.mean(dim=-1, keepdims=True)
    stdv = logit.std(dim=-1, keepdims=True)
    return (logit - mean) / (1e-7 + stdv)


def official_kd_loss(logits_student_in, logits_teacher_in, temperature):  # KD.py::kd_loss, logit_stand=True
    logits_student = official_normalize(logits_student_in)
    logits_teacher = official_normalize(logits_teacher_in)
    log_pred_student = F.log_softmax(logits_student / temperature, dim=1)
    pred_teacher = F.softmax(logits_teacher / temperature, dim=1)
    loss_kd = F.kl_div(log_pred_student, pred_teacher, reduction="none").sum(1).mean()
    return loss_kd * temperature ** 2


def official_dkd_loss(logits_student_in, logits_teacher_in, target, alpha, beta, temperature):  # DKD.py::dkd_loss
    logits_student = official_normalize(logits_student_in)
    logits_teacher = official_normalize(logits_teacher_in)
    gt_mask = torch.zeros_like(logits_student).scatter_(1, target.unsqueeze(1), 1).bool()
    other_mask = torch.ones_like(logits_student).scatter_(1, target.unsqueeze(1), 0).bool()
    pred_student = F.softmax(logits_student / temperature, dim=1)
    pred_teacher = F.softmax(logits_teacher / temperature, dim=1)

    def cat_mask(t):
        return torch.cat([(t * gt_mask).sum(1, keepdims=True), (t * other_mask).sum(1, keepdims=True)], dim=1)

    pred_student, pred_teacher = cat_mask(pred_student), cat_mask(pred_teacher)
    tckd = F.kl_div(torch.log(pred_student), pred_teacher, reduction="sum") * temperature ** 2 / target.shape[0]
    part2_t = F.softmax(logits_teacher / temperature - 1000.0 * gt_mask, dim=1)
    part2_s = F.log_softmax(logits_student / temperature - 1000.0 * gt_mask, dim=1)
    nckd = F.kl_div(part2_s, part2_t, reduction="sum") * temperature ** 2 / target.shape[0]
    return alpha * tckd + beta * nckd


def method_of(*overrides: str):
    return prepare(compose_config(*FAST, "results_dir=/nonexistent", *overrides)).method


def batch(seed=0, n=16, k=10):
    g = torch.Generator().manual_seed(seed)
    s = (torch.randn(n, k, generator=g) * 3).requires_grad_()
    t = torch.randn(n, k, generator=g) * 7 + 2
    return s, t, torch.randint(0, k, (n,), generator=g)


def test_standardized_logits_have_zero_mean_and_unit_unbiased_std():
    z = torch.randn(5, 10) * 4 + 3
    out = standardize_logits(z)
    assert torch.allclose(out.mean(1), torch.zeros(5), atol=1e-6)
    assert torch.allclose(out.std(1), torch.ones(5), atol=1e-5)
    assert torch.allclose(standardize_logits(z * 10 - 5), out, atol=1e-5)  # scale and shift invariant


def test_kd_with_standardization_equals_the_official_loss_value_and_gradient():
    method = method_of("method=kd", "method.logit_standardize=true")
    assert method.T == 2.0 and method.weights() == {"ce": pytest.approx(0.1), "kd": 9.0}
    s, t, y = batch()
    ours = method.response_terms(Forward(s, t, {}, {}, y, torch.arange(16)))["kd"]
    (g_ours,) = torch.autograd.grad(ours, s)
    theirs = official_kd_loss(s, t, 2.0)
    (g_theirs,) = torch.autograd.grad(theirs, s)
    assert torch.allclose(ours, theirs, atol=1e-6) and torch.allclose(g_ours, g_theirs, atol=1e-7)


def test_dkd_with_standardization_equals_the_official_loss_times_the_kd_weight():
    method = method_of("method=dkd", "method.logit_standardize=true")
    method.begin_stage(Stage("main", 30))
    for epoch in range(1, 26):
        method.begin_epoch(epoch)
    assert method.T == 2.0 and method.weights()["dkd"] == 9.0 and method.weights()["ce"] == 1.0
    s, t, y = batch(1)
    ours = method.weights()["dkd"] * method.method_terms(Forward(s, t, {}, {}, y, torch.arange(16)))["dkd"]
    (g_ours,) = torch.autograd.grad(ours, s)
    theirs = official_dkd_loss(s, t, y, 1.0 * 9, 8.0 * 9, 2.0)  # tools/train.py: ALPHA, BETA times --kd-weight
    (g_theirs,) = torch.autograd.grad(theirs, s)
    assert torch.allclose(ours, theirs, rtol=1e-5) and torch.allclose(g_ours, g_theirs, rtol=1e-4, atol=1e-7)


def test_explicit_base_temperature_and_weight_are_used():
    method = method_of("method=kd", "method.logit_standardize=true", "method.base_T=3", "method.ls_weight=5")
    assert method.T == 3.0 and method.weights()["kd"] == 5.0


def test_off_by_default_the_logits_pass_unchanged():
    method = method_of("method=kd")
    z = torch.randn(3, 10)
    assert method.distil_logits(z) is z and method.T == 4.0


def test_refused_for_methods_without_a_logit_term_and_for_non_booleans(kdrun, capsys):
    code, _ = kdrun("method=at", "+method.logit_standardize=true")
    err = capsys.readouterr().err
    assert code == 2 and "method.logit_standardize=true is not allowed with method=at" in err and "kd" in err
    code, _ = kdrun("method=kd", "method.logit_standardize=maybe")
    assert code == 2 and "method.logit_standardize=maybe is not allowed" in capsys.readouterr().err
    code, _ = kdrun("method=kd", "method.logit_standardize=true", "method.base_T=0")
    assert code == 2 and "method.base_T=0" in capsys.readouterr().err


def test_a_digits_run_with_standardized_kd_trains(kdrun):
    code, (record,) = kdrun("method=kd", "method.logit_standardize=true")
    assert code == 0 and record["status"] == "completed"
    assert record["method.logit_standardize"] is True and record["method.base_T"] == 2.0 and record["T"] == 2.0


def test_runs_without_the_modifier_record_none_of_its_keys(kdrun):
    code, (record,) = kdrun("method=kd")
    assert code == 0 and not any(k.startswith(("method.logit_standardize", "method.base_T", "method.ls_weight"))
                                 for k in record)
    assert record["augmentation"] == "crop pad 1"  # digits' training augmentation, for compare --protocol


def test_ls_methods_lists_the_modifiers_and_the_methods_that_take_them(capsys):
    from conftest import run_cli

    assert run_cli("ls", "methods") == 0
    out = " ".join(capsys.readouterr().out.split())
    assert "method modifiers" in out and "Sun et al. 2024" in out and "DOT" in out
    for name in ("reviewkd", "dist", "mlkd", "ctkd", "wttm", "ttm", "nkd", "simkd"):
        assert f" {name} " in out, name


def test_an_assistants_cache_key_holds_no_modifier_left_off():
    from kdrun.chain import link_identity

    plain = link_identity(compose_config("method=kd", "assistants=[resnet14]"), "resnet14", {"root": 1})["method"]
    assert not {"logit_standardize", "base_T", "ls_weight", "dot", "dot_delta"} & set(plain)
    on = link_identity(compose_config("method=kd", "method.logit_standardize=true", "assistants=[resnet14]"),
                       "resnet14", {"root": 1})["method"]
    assert on["logit_standardize"] is True and on["base_T"] == 2.0


def test_refused_with_ssld_symmetric_kl(kdrun, capsys):
    code, _ = kdrun("method=kd", "method.alpha=1", "method.logit_standardize=true", "transfer=label_free")
    err = capsys.readouterr().err
    assert code == 2 and "method.logit_standardize=true is not allowed with transfer=label_free" in err


def test_the_record_shows_the_temperature_the_run_trained_at(tmp_path):
    from kdrun.experiment import base_record

    rec = base_record(compose_config("method=kd", "method.logit_standardize=true"), tmp_path / "run", "cpu")
    assert rec["T"] == 2.0 and rec["method.base_T"] == 2.0
    assert base_record(compose_config("method=kd"), tmp_path / "run", "cpu")["T"] == 4.0


@pytest.mark.parametrize("method, teacher, student, base_T, weight", [
    ("kd", "resnet32x4", "resnet8x4", 2.0, 9.0), ("kd", "vgg13", "vgg8", 3.0, 9.0),
    ("kd", "resnet110", "resnet20", 4.0, 12.0), ("dkd", "resnet56", "resnet20", 3.0, 18.0),
    ("dkd", "wrn_40_2", "wrn_16_2", 2.0, 12.0), ("mlkd", "vgg13", "vgg8", 2.0, 6.0),
    ("mlkd", "vgg13", "mobilenetv2_half", 2.0, 6.0), ("mlkd", "resnet32x4", "resnet8x4", 2.0, 9.0)])
def test_the_official_logs_settings_per_pair_are_the_defaults(method, teacher, student, base_T, weight):
    cfg = compose_config(f"method={method}", f"teacher={teacher}", f"student={student}")
    assert (cfg.method.base_T, cfg.method.ls_weight) == (base_T, weight)


def test_dkd_beta_under_the_recipe_follows_the_standardized_runs():
    recipe = ("+experiment=repdistiller_cifar100", "method=dkd", "teacher=wrn_40_2", "student=wrn_16_2")
    assert compose_config(*recipe).method.dkd_beta == 6.0  # mdistiller's
    assert compose_config(*recipe, "method.logit_standardize=true").method.dkd_beta == 2.0  # the LS log's
    assert compose_config("+experiment=repdistiller_cifar100", "method=at").method.dkd_beta is None
