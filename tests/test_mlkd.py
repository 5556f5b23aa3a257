"""mlkd against Jin-Ying/Multi-Level-Logit-Distillation mdistiller/distillers/KD_ours.py, transcribed by hand:
kd_loss / cc_loss / bc_loss (lines 13-47) and forward_train (numpy-percentile masks, the five temperatures,
the strong view's quirks); logit standardization as sunshangquan/logit-standardization-KD's MLKD.py
(`normalize` inside kd_loss only, `--base-temp` as KD.TEMPERATURE, `--kd-weight` as KD_WEIGHT)."""
from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from omegaconf import OmegaConf

from conftest import method_defaults, run_cli, results_under
from kdrun.data import TensorLoader
from kdrun.errors import ConfigError
from kdrun.methods import METHODS
from kdrun.methods.mlkd_loss import (alignment_terms, bc_loss, cc_loss, confidence_masks, masked_kd_loss,
                                     mlkd_loss)
from kdrun.models import create_model
from kdrun.paths import conf_dir


# ----- official transcriptions ------------------------------------------------------------------------------
def official_normalize(logit):
    mean = logit.mean(dim=-1, keepdims=True)
    stdv = logit.std(dim=-1, keepdims=True)
    return (logit - mean) / (1e-7 + stdv)


def official_kd_loss(logits_student, logits_teacher, temperature, logit_stand=False):
    logits_student = official_normalize(logits_student) if logit_stand else logits_student
    logits_teacher = official_normalize(logits_teacher) if logit_stand else logits_teacher
    log_pred_student = F.log_softmax(logits_student / temperature, dim=1)
    pred_teacher = F.softmax(logits_teacher / temperature, dim=1)
    loss_kd = F.kl_div(log_pred_student, pred_teacher, reduction="none").sum(1).mean()
    loss_kd *= temperature ** 2
    return loss_kd


def official_cc_loss(logits_student, logits_teacher, temperature):
    batch_size, class_num = logits_teacher.shape
    pred_student = F.softmax(logits_student / temperature, dim=1)
    pred_teacher = F.softmax(logits_teacher / temperature, dim=1)
    student_matrix = torch.mm(pred_student.transpose(1, 0), pred_student)
    teacher_matrix = torch.mm(pred_teacher.transpose(1, 0), pred_teacher)
    return ((teacher_matrix - student_matrix) ** 2).sum() / class_num


def official_bc_loss(logits_student, logits_teacher, temperature):
    batch_size, class_num = logits_teacher.shape
    pred_student = F.softmax(logits_student / temperature, dim=1)
    pred_teacher = F.softmax(logits_teacher / temperature, dim=1)
    student_matrix = torch.mm(pred_student, pred_student.transpose(1, 0))
    teacher_matrix = torch.mm(pred_teacher, pred_teacher.transpose(1, 0))
    return ((teacher_matrix - student_matrix) ** 2).sum() / batch_size


def official_masks(logits_teacher_weak):
    pred_teacher_weak = F.softmax(logits_teacher_weak.detach(), dim=1)
    confidence, pseudo_labels = pred_teacher_weak.max(dim=1)
    conf_thresh = np.percentile(confidence.cpu().numpy().flatten(), 50)
    mask = confidence.le(conf_thresh).bool()
    class_confidence = torch.sum(pred_teacher_weak, dim=0)
    class_confidence_thresh = np.percentile(class_confidence.cpu().numpy().flatten(), 50)
    class_conf_mask = class_confidence.le(class_confidence_thresh).bool()
    return mask, class_conf_mask


def official_forward_train(sw, ss, tw, ts, target, temperature=4.0, ce_loss_weight=0.1, kd_loss_weight=0.9,
                           logit_stand=False):
    """forward_train's losses_dict, with the teacher's logits given. Each sum lists the official calls."""
    mask, class_conf_mask = official_masks(tw)
    temps = [temperature, 3.0, 5.0, 2.0, 6.0]
    loss_ce = ce_loss_weight * (F.cross_entropy(sw, target) + F.cross_entropy(ss, target))
    loss_kd_weak = sum(kd_loss_weight * ((official_kd_loss(sw, tw, T, logit_stand) * mask).mean()) for T in temps)
    strong_calls = [(ss, ts, temperature), (ss, ts, 3.0), (ss, ts, 5.0), (sw, tw, 2.0), (sw, tw, 6.0)]
    loss_kd_strong = sum(kd_loss_weight * official_kd_loss(s, t, T, logit_stand) for s, t, T in strong_calls)
    loss_cc_weak = sum(kd_loss_weight * ((official_cc_loss(sw, tw, T) * class_conf_mask).mean()) for T in temps)
    loss_bc_weak = sum(kd_loss_weight * ((official_bc_loss(sw, tw, T) * mask).mean()) for T in temps)
    return {"loss_ce": loss_ce, "loss_kd": loss_kd_weak + loss_kd_strong, "loss_cc": loss_cc_weak,
            "loss_bc": loss_bc_weak}


def logits(n=12, k=7, seed=0):
    gen = torch.Generator().manual_seed(seed)
    sw, ss, tw, ts = (3 * torch.randn(n, k, generator=gen, dtype=torch.float64) for _ in range(4))
    return sw.requires_grad_(True), ss.requires_grad_(True), tw, ts, torch.randint(0, k, (n,), generator=gen)


def grads(value, *inputs):
    return torch.autograd.grad(value, inputs)


# ----- the loss parts --------------------------------------------------------------------------------------
@pytest.mark.parametrize("n", [12, 9])
def test_masks_are_the_official_numpy_percentile_masks_of_the_weak_teacher(n):
    sw, _, tw, _, _ = logits(n)
    tw = torch.cat([tw, tw[:2]])  # ties at the threshold
    mask, class_mask = confidence_masks(tw)
    official_mask, official_class_mask = official_masks(tw)
    assert torch.equal(mask, official_mask) and torch.equal(class_mask, official_class_mask)
    assert not torch.equal(confidence_masks(tw, 30.0)[0], mask)


@pytest.mark.parametrize("T", [4.0, 2.0, 6.0])
def test_each_part_matches_the_official_value_and_gradient(T):
    sw, _, tw, _, _ = logits()
    mask, class_mask = official_masks(tw)
    pairs = [(masked_kd_loss(sw, tw, T, mask), (official_kd_loss(sw, tw, T) * mask).mean()),
             (masked_kd_loss(sw, tw, T), official_kd_loss(sw, tw, T)),
             (bc_loss(sw, tw, T), official_bc_loss(sw, tw, T)),
             (cc_loss(sw, tw, T), official_cc_loss(sw, tw, T))]
    for ours, official in pairs:
        assert torch.allclose(ours.double(), official, rtol=1e-5, atol=1e-7)
        assert torch.allclose(grads(ours, sw)[0].double(), grads(official, sw)[0], rtol=1e-4, atol=1e-7)
    assert not torch.allclose(bc_loss(sw, tw, T), cc_loss(sw, tw, T).float())


def test_the_mask_scales_the_batch_mean_loss_by_its_kept_fraction():
    for n, kept in ((12, 0.5), (9, 5 / 9)):
        sw, _, tw, _, _ = logits(n)
        mask, _ = confidence_masks(tw)
        assert mask.float().mean().item() == pytest.approx(kept)
        assert masked_kd_loss(sw, tw, 4.0, mask).item() == pytest.approx(kept * masked_kd_loss(sw, tw, 4.0).item())


@pytest.mark.parametrize("standardize, T, kd_weight", [(False, 4.0, 0.9), (True, 2.0, 9.0)])
def test_terms_and_total_match_the_official_forward_train(standardize, T, kd_weight):
    sw, ss, tw, ts, y = logits()
    official = official_forward_train(sw, ss, tw, ts, y, T, 0.1, kd_weight, standardize)
    terms = alignment_terms(sw, ss, tw, ts, T, logit_standardize=standardize)
    for ours, name in (("instance", "loss_kd"), ("batch", "loss_bc"), ("class", "loss_cc")):
        assert torch.allclose(kd_weight * terms[ours].double(), official[name], rtol=1e-5, atol=1e-7), ours
    total = mlkd_loss(sw, ss, tw, ts, y, T, 0.1, kd_weight, logit_standardize=standardize)
    official_total = sum(official.values())
    assert torch.allclose(total.double(), official_total, rtol=1e-5)
    for ours, theirs in zip(grads(total, sw, ss), grads(official_total, sw, ss)):
        assert torch.allclose(ours.double(), theirs, rtol=1e-4, atol=1e-7)
    other = alignment_terms(sw, ss, tw, ts, T, logit_standardize=not standardize)
    assert not torch.allclose(other["instance"], terms["instance"])  # standardization reaches it...
    assert torch.allclose(other["batch"], terms["batch"])  # ...and only it


# ----- the method ------------------------------------------------------------------------------------------
def method_cfg(**overrides):
    return OmegaConf.merge(method_defaults("mlkd", "resnet8", "resnet8"), overrides)


def build(**overrides):
    torch.manual_seed(0)
    method = METHODS.get("mlkd")(method_cfg(**overrides), create_model("resnet8", 10, 1),
                                 create_model("resnet8", 10, 1), 10)
    method.prepare((1, 8, 8))
    return method


def digits_like_loader():
    images = torch.randint(0, 256, (40, 1, 8, 8), dtype=torch.uint8, generator=torch.Generator().manual_seed(3))
    return TensorLoader(images, torch.arange(40) % 10, 20, (0.3,), (0.2,), crop_padding=1)


def test_yaml_defaults_are_the_official_cifar100_ones():
    text = (conf_dir() / "method" / "mlkd.yaml").read_text()
    assert text.startswith("# ") and METHODS.describe("mlkd")
    cfg = OmegaConf.to_container(OmegaConf.create(text))
    assert list(cfg)[0] == "name" and cfg["name"] == "mlkd" and list(cfg)[-3:] == ["logit_standardize", "base_T",
                                                                                  "ls_weight"]
    assert {k: cfg[k] for k in ("T", "alpha", "ce_weight", "beta", "percentile", "rand_ops", "cutout")} == \
        {"T": 4.0, "alpha": 0.0, "ce_weight": 0.1, "beta": 0.9, "percentile": 50, "rand_ops": 2, "cutout": 0.5}


def test_weights_follow_the_official_config_and_logit_standardization():
    assert build().weights() == {"ce": pytest.approx(0.1), "kd": 0.0, "instance": 0.9, "batch": 0.9, "class": 0.9}
    ls = build(logit_standardize=True)
    assert ls.T == 2.0
    assert ls.weights() == {"ce": pytest.approx(0.1), "kd": 0.0, "instance": 9.0, "batch": 9.0, "class": 9.0}


def test_one_step_with_logit_standardization_is_the_loss_of_both_views():
    method = build(logit_standardize=True)
    loader = method.wrap_train_loader(digits_like_loader())
    x, y, i = next(iter(loader))
    strong = method._strong_view[1]
    method.train()
    out = method(x, y, i)
    assert set(out.terms) == {"ce", "instance", "batch", "class"}
    with torch.no_grad():
        s_weak, s_strong = method.student(x), method.student(strong)  # train mode: batch statistics again
        t_weak, t_strong = method.teacher(x), method.teacher(strong)
    expected = alignment_terms(s_weak, s_strong, t_weak, t_strong, 2.0, logit_standardize=True)
    for name, value in expected.items():
        assert torch.allclose(out.terms[name], value, rtol=1e-5), name
    ce = F.cross_entropy(s_weak, y) + F.cross_entropy(s_strong, y)
    assert torch.allclose(out.terms["ce"], ce, rtol=1e-5)
    total = sum(w * out.terms[n] for n, w in method.weights().items() if n in out.terms)
    total.backward()
    assert all(p.grad is not None for p in method.student.parameters())
    assert all(p.grad is None for p in method.teacher.parameters())
    assert method.teacher_queries == 2 * len(y)  # both views


def test_a_batch_without_its_strong_view_is_refused():
    method = build()
    with pytest.raises(RuntimeError, match="wrap_train_loader"):
        method(torch.randn(4, 1, 8, 8), torch.arange(4), torch.arange(4))


@pytest.mark.parametrize("key, value", [("percentile", 150), ("cutout", 2), ("rand_ops", 1.5), ("rand_ops", -1)])
def test_bad_values_are_refused(key, value):
    with pytest.raises(ConfigError, match=f"method.{key}={value} is not allowed"):
        build(**{key: value})


# ----- end to end ------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def teachers(tmp_path_factory):
    """Saved random teachers for digits (1 channel, 10 classes): training them is tested elsewhere."""
    root = tmp_path_factory.mktemp("teachers")
    paths = {}
    for name in ("resnet26", "vgg13"):
        torch.manual_seed(0)
        paths[name] = root / f"{name}.pt"
        torch.save({"model": create_model(name, 10, 1).state_dict()}, paths[name])
    return paths


def test_digits_end_to_end(tmp_path, teachers):
    code = run_cli("epochs=1", "batch_size=128", f"results_dir={tmp_path}", "method=mlkd", "optim.lr=0.025",
                   f"teacher.checkpoint={teachers['resnet26']}")
    (record,) = results_under(tmp_path)
    assert code == 0 and record["status"] == "completed"
    assert record["augmentation"] == "crop pad 1; strong view: crop pad 1 + randaugment 2 + cutout 0.5"
    row = (next(tmp_path.rglob("metrics.csv"))).read_text().splitlines()
    assert {"loss_ce", "loss_instance", "loss_batch", "loss_class"} <= set(row[0].split(","))


def test_vgg13_teaches_mobilenetv2(tmp_path, teachers):
    code = run_cli("epochs=1", "batch_size=128", f"results_dir={tmp_path}", "method=mlkd", "teacher=vgg13",
                   "student=mobilenetv2", f"teacher.checkpoint={teachers['vgg13']}", "optim.lr=0.01")
    (record,) = results_under(tmp_path)
    assert code == 0 and record["status"] == "completed"
    assert (record["teacher"], record["student"]) == ("vgg13", "mobilenetv2")


def test_feature_vectors_are_refused_before_training(kdrun, capsys):
    code, records = kdrun("method=mlkd", "dataset=linear_teacher", "teacher=linear", "student=linear", "epochs=1",
                          "batch_size=50", fast=False)
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and records == []
    assert "method=mlkd needs uint8 images for its strong view; the training set holds float32" in err[-1]
