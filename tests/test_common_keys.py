"""Keys every method has: ce_weight (declared, CE independent of alpha for feature methods), kl_reduction,
kd_until_epoch; and `kdrun ls methods` naming the official code each method follows."""
from __future__ import annotations

import csv
from pathlib import Path

import pytest
import torch

from conftest import FAST, compose_config, run_cli
from kdrun.experiment import prepare
from kdrun.methods.base import Stage


def method_of(*overrides: str):
    return prepare(compose_config(*FAST, "results_dir=/nonexistent", *overrides)).method


def test_the_readme_crd_plus_kd_command_is_accepted(capsys):
    assert run_cli("--cfg", "job", "method=crd", "method.alpha=1", "method.ce_weight=1") == 0
    assert "ce_weight: 1" in capsys.readouterr().out


@pytest.mark.parametrize("name", ["at", "crd", "fitnet", "rkd", "nst"])
def test_alpha_1_on_a_feature_method_keeps_ce(name):
    weights = method_of(f"method={name}", "method.alpha=1").weights()
    assert weights["ce"] == 1.0 and weights["kd"] == 1.0


def test_kd_keeps_hintons_convex_mix_and_ce_weight_overrides_it():
    assert method_of("method=kd", "method.alpha=0.9").weights()["ce"] == pytest.approx(0.1)
    assert method_of("method=kd", "method.ce_weight=0.5").weights()["ce"] == 0.5
    assert method_of("method=at", "method.ce_weight=0").weights()["ce"] == 0.0


def test_kl_reduction_mean_is_batchmean_over_the_classes():
    torch.manual_seed(0)
    s, t = torch.randn(8, 10), torch.randn(8, 10)
    method = method_of("method=kd", "method.kl_reduction=mean")
    from kdrun.methods.base import Forward

    fw = Forward(s, t, {}, {}, torch.zeros(8, dtype=torch.long), torch.arange(8))
    mean = method.response_terms(fw)["kd"]
    p_t, log_p_s = torch.softmax(t / 4, 1), torch.log_softmax(s / 4, 1)
    expected = (p_t * (p_t.log() - log_p_s)).sum() / (8 * 10) * 16  # nn.KLDivLoss()(...) * T^2
    assert torch.allclose(mean, expected, atol=1e-6)


def test_bad_common_key_values_are_refused(kdrun, capsys):
    code, _ = kdrun("method.kl_reduction=sum")
    assert code == 2 and "method.kl_reduction=sum is not allowed" in capsys.readouterr().err
    code, _ = kdrun("method.kd_until_epoch=-1")
    assert code == 2 and "method.kd_until_epoch=-1 is not allowed" in capsys.readouterr().err


def test_kd_until_epoch_trains_on_ce_alone_afterwards(kdrun):
    code, (record,) = kdrun("epochs=3", "method.kd_until_epoch=1")
    assert code == 0
    with open(Path(record["run_dir"]) / "metrics.csv") as f:
        rows = list(csv.DictReader(f))
    assert rows[0]["loss_kd"] != "" and rows[1]["loss_kd"] == rows[2]["loss_kd"] == ""
    assert float(rows[1]["train_loss"]) == pytest.approx(float(rows[1]["loss_ce"]))  # CE at weight 1, alone
    method = method_of("method.kd_until_epoch=1")
    method.begin_stage(Stage("main", 3))
    method.begin_epoch(1)
    method.begin_epoch(2)
    assert method.step_weights() == {"ce": 1.0, "kd": 0.0} and not method.uses_teacher_outputs()


def test_kd_until_epoch_counts_the_main_stage_only_and_keeps_supervised_terms():
    method = method_of("method=fitnet", "method.hint_epochs=5", "method.kd_until_epoch=2", "method.alpha=0.5")
    for stage in method.stages(4):
        method.begin_stage(stage)
        for _ in range(stage.epochs):
            method.begin_epoch(method.epoch + 1)
            if stage.name == "hint" or method.stage_epoch <= 2:
                assert method.distilling() and method.step_weights() == method.weights()
            else:
                assert method.step_weights() == {"ce": 1.0, "kd": 0.0, "hint": 0.0}
    rocket = method_of("method=rocket", "teacher=resnet14", "method.kd_until_epoch=0")
    rocket.begin_stage(Stage("main", 1))
    rocket.begin_epoch(1)
    assert rocket.step_weights() == {"ce": 1.0, "ce_booster": 1.0, "hint": 0.0}


def test_fixed_weight_methods_honour_ce_weight_and_ls_refuses_it(kdrun, capsys):
    assert method_of("method=dml", "method.ce_weight=0.5").weights()["ce"] == 0.5
    assert method_of("method=cskd", "method.ce_weight=0.5").weights()["ce"] == 0.5
    code, _ = kdrun("method=ls", "method.ce_weight=0.5")
    assert code == 2 and "method.ce_weight=0.5 is not allowed with method=ls" in capsys.readouterr().err


def test_ls_methods_names_the_official_code(capsys):
    assert run_cli("ls", "methods") == 0
    out = capsys.readouterr().out
    assert "follows" in out and "RepDistiller" in out


def test_the_readme_names_the_official_code_of_every_method():
    from kdrun.methods import METHODS

    readme = (Path(__file__).parents[1] / "README.md").read_text()
    for name in METHODS.names():
        code = METHODS.get(name).official_code
        assert code, f"{name} does not say which official code it follows"
        assert f"| `{name}` | {code.replace('|', chr(92) + '|')} |" in readme, name


def test_records_carry_dataset_and_model_options_for_compare(kdrun):
    _, (record,) = kdrun("student.residual=false")
    assert record["student.residual"] is False and "teacher.residual" in record
    assert "dataset.root" not in record
    from kdrun.compare_records import identity_keys

    assert "student.residual" in identity_keys(record.keys())
