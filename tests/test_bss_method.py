"""bss as a method: the teacher stays bitwise frozen through training, the official schedule (the attack stops
at three quarters of the epochs), the YAML's official defaults, refusals, and a CLI run on digits. The losses,
the attack and the draws against the official code: tests/test_bss.py."""
from __future__ import annotations

import csv
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from kdrun.errors import ConfigError
from kdrun.methods import METHODS
from kdrun.methods.bss import bss_ratio, kd_ratio
from kdrun.paths import conf_dir

from test_bss import CLASSES, build, teacher_labelled_batch


def test_training_steps_leave_the_teacher_bitwise_unchanged():
    method = build(80)
    method.begin_epoch(1)
    teacher = method.teacher
    before = {k: v.clone() for k, v in teacher.state_dict().items()}
    assert any("num_batches_tracked" in k for k in before) and any("running_mean" in k for k in before)
    optimizer = torch.optim.SGD(method.parameters(), lr=0.05, momentum=0.9)
    assert not any(p is q for p in method.parameters() for q in teacher.parameters())
    x, y = teacher_labelled_batch(teacher)
    weights = method.step_weights()
    seen = 0
    for _ in range(3):
        method.train()
        out = method(x, y, torch.arange(len(y)))
        assert set(out.terms) == {"ce", "kd", "bss"}
        seen += out.extra["bss_samples"]
        total = sum(weights[n] * v for n, v in out.terms.items())
        optimizer.zero_grad()
        total.backward()
        assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in method.student.parameters())
        optimizer.step()
    assert seen > 0, "the steps attacked no sample"
    assert not teacher.training
    assert all(p.grad is None and not p.requires_grad for p in teacher.parameters())
    after = teacher.state_dict()
    assert before.keys() == after.keys()
    for key, value in before.items():
        assert torch.equal(value, after[key]), key


def test_the_bss_term_alone_trains_the_student_only():
    method = build(80, alpha=0.0, ce_weight=0.0)
    method.begin_epoch(1)
    x, y = teacher_labelled_batch(method.teacher)
    method.train()
    out = method(x, y, torch.arange(len(y)))
    assert "kd" not in out.terms and out.extra["bss_samples"] > 0
    out.terms["bss"].backward()
    assert all(p.grad is None for p in method.teacher.parameters())
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in method.student.parameters())


def test_paper_variant_attacks_every_other_class_weighted_by_p_k():
    method = build(80, targets="all", attack_size=4)
    method.begin_epoch(1)
    x, y = teacher_labelled_batch(method.teacher)
    method.train()
    out = method(x, y, torch.arange(len(y)))
    assert out.extra["bss_samples"] == 4 * (CLASSES - 1)
    assert torch.isfinite(out.terms["bss"]) and out.terms["bss"] > 0


# ----- 5. the schedule --------------------------------------------------------------------------------------
def test_schedule_is_the_official_one_and_bss_stops_at_three_quarters():
    method = build(80)
    x, y = teacher_labelled_batch(method.teacher)
    for epoch in range(1, 81):
        method.begin_epoch(epoch)
        weights = method.step_weights()
        assert weights["kd"] * 9 == pytest.approx(max(3 * (1 - epoch / 80), 0) + 1, rel=1e-12)  # :197, T 3
        assert weights["bss"] == max(2 * (1 - 4 / 3 * epoch / 80), 0) + 0  # :198
        assert weights["ce"] == 1.0
        if epoch in (1, 59, 60, 80):
            method.train()
            terms = method(x, y, torch.arange(len(y))).terms
            assert ("bss" in terms) == (epoch < 60), epoch
    assert bss_ratio(59, 80) > 0 and bss_ratio(60, 80) == 0
    assert kd_ratio(80, 80) == 1.0 and kd_ratio(1, 80) == pytest.approx(3.9625)


def test_schedule_follows_the_epochs_of_the_run_and_replays():
    method = build(2)
    method.begin_epoch(1)
    assert method.weights()["bss"] == pytest.approx(2 / 3)
    method.begin_epoch(2)
    assert method.weights()["bss"] == 0.0 and method.weights()["kd"] == pytest.approx(1 / 9)
    replayed = build(2)  # a resumed run replays begin_stage / begin_epoch: the same weights
    replayed.begin_epoch(1)
    replayed.begin_epoch(2)
    assert replayed.weights() == method.weights()


def test_kd_until_epoch_turns_the_attack_off_too():
    method = build(10, kd_until_epoch=1)
    method.begin_epoch(1)
    method.begin_epoch(2)
    x, y = teacher_labelled_batch(method.teacher)
    method.train()
    assert set(method(x, y, torch.arange(len(y))).terms) == {"ce"} and not method.uses_teacher_outputs()


# ----- configuration ----------------------------------------------------------------------------------------
def test_yaml_holds_the_official_defaults():
    text = (conf_dir() / "method" / "bss.yaml").read_text()
    assert text.startswith("# ")
    cfg = OmegaConf.create(text)
    expected = {"T": 3.0, "ce_weight": 1.0, "alpha": 1.0, "alpha_decay": 3.0, "beta": 2.0, "bss_until": 0.75,
                "attack_size": 64, "targets": "sample", "bss_kl": False, "steps": 10, "eta": 0.3, "eps": 1e-4,
                "clamp": [-2.5, 2.5]}
    assert {k: cfg[k] for k in expected} == expected
    cls = METHODS.get("bss")
    assert METHODS.describe("bss").startswith("Heo et al. 2019")
    assert cls.official_code.startswith("bhheo/BSS_distillation") and "\n" not in cls.official_code
    assert cls.teacher_access == "full" and cls.uses_labels and cls.term_names == ("bss",)


@pytest.mark.parametrize("key, value", [("targets", "some"), ("clamp", [1.0, -1.0]), ("clamp", "wide"),
                                        ("steps", 2.5), ("bss_until", 0), ("attack_size", 0), ("bss_kl", "yes")])
def test_bad_values_are_refused(key, value):
    with pytest.raises(ConfigError, match=f"method.{key}="):
        build(10, **{key: value})


# ----- 6. end to end ----------------------------------------------------------------------------------------
@pytest.mark.slow
def test_cli_run_on_digits(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-m", "kdrun", "method=bss", "epochs=2", "teacher.epochs=1",
                           "student=resnet8", "teacher=resnet8", "batch_size=128", f"results_dir={tmp_path}"],
                          capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    (path,) = [p for p in tmp_path.rglob("result.json") if "teachers" not in p.parts]
    record = json.loads(path.read_text())
    assert record["status"] == "completed" and record["method"] == "bss"
    rows = list(csv.DictReader((Path(record["run_dir"]) / "metrics.csv").open()))
    assert [r["epoch"] for r in rows] == ["1", "2"]
    assert math.isfinite(float(rows[0]["loss_bss"])) and float(rows[0]["loss_bss"]) > 0  # epoch 1 of 2: on
    assert rows[1]["loss_bss"] == ""  # epoch 2 of 2 is past 3/4: no attack
    assert all(math.isfinite(float(r["loss_ce"])) and math.isfinite(float(r["loss_kd"])) for r in rows)
