"""Preliminary stages run at their own constant lr; the main stage follows the run's schedule."""
import csv
from pathlib import Path

import pytest


@pytest.mark.parametrize("method, stage", [("ab", "init"), ("ft", "paraphraser"), ("fsp", "fsp")])
def test_first_stage_lr_is_constant_and_main_stage_is_scheduled(kdrun, method, stage):
    code, results = kdrun(f"method={method}", "method.init_epochs=2", "epochs=4", "optim.lr=0.05",
                          "method.init_lr=0.002", "teacher.epochs=5")
    assert code == 0
    with open(Path(results[0]["run_dir"]) / "metrics.csv") as f:
        rows = [(r["stage"], float(r["lr"])) for r in csv.DictReader(f)]
    assert rows[:2] == [(stage, pytest.approx(0.002)), (stage, pytest.approx(0.002))]
    # multistep milestones 0.625/0.75/0.875 of 4 epochs -> x0.1 from epoch index 3 (round(2.5) = 2 in Python)
    assert [r[0] for r in rows[2:]] == ["main"] * 4
    assert [lr for _, lr in rows[2:]] == pytest.approx([0.05, 0.05, 0.005, 0.0005])


def test_ft_paraphraser_lr_defaults_to_repdistillers_choice():
    from conftest import compose_config
    from kdrun.methods.ft import FT
    from kdrun.models import create_model

    def paraphraser_stage(student: str):
        cfg = compose_config("method=ft", f"student={student}").method
        method = FT(cfg, create_model(student, 10, 1), create_model("resnet26", 10, 1), 10)
        return method.stages(5)[0]

    assert paraphraser_stage("resnet8").lr == 0.01 and paraphraser_stage("wrn_16_2").lr == 0.01
    assert paraphraser_stage("vgg8").lr is None  # the run's own lr
    assert paraphraser_stage("resnet8").constant_lr
