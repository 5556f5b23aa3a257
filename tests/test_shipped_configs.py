"""The shipped experiment recipes compose, and the shipped sweeps expand to the intended jobs."""

import pytest
import yaml
from hydra.core.override_parser.overrides_parser import OverridesParser

from conftest import compose_config
from kdrun.paths import conf_dir

EXPERIMENTS = {
    "repdistiller_cifar100": dict(dataset="cifar100", teacher="resnet32x4", student="resnet8x4", epochs=240, T=4.0),
    "ruffy_cifar10_resnet8": dict(dataset="cifar10", teacher="resnet26", student="resnet8", epochs=200, T=5.0),
    "takd_cifar100": dict(dataset="cifar100", teacher="resnet110", student="resnet8", epochs=160, T=5.0),
    "tfkd_poor_teacher": dict(dataset="cifar100", teacher="resnet18", student="mobilenetv2", epochs=200, T=20.0),
    "tfkd_reverse_kd": dict(dataset="cifar100", teacher="mobilenetv2", student="resnet18", epochs=200, T=20.0),
}
SWEEP_JOBS = {"all_methods": 26 * 3, "teacher_sizes": 8 * 3, "t_alpha_grid": 5 * 3 * 3, "ta_chains": 5 * 3,
              "kd_as_init": 5 * 3, "no_residual_students": 3 * 2 * 3, "linear_theory": 6 * 3 * 3}


@pytest.mark.parametrize("name, expected", EXPERIMENTS.items())
def test_experiment_recipes_compose(name, expected):
    cfg = compose_config(f"+experiment={name}")
    assert cfg.dataset.name == expected["dataset"] and cfg.epochs == expected["epochs"]
    assert (cfg.teacher.name, cfg.student.name, cfg.method.T) == (expected["teacher"], expected["student"], expected["T"])


def test_recipe_details():
    assert list(compose_config("+experiment=takd_cifar100").assistants) == ["resnet20"]
    assert compose_config("+experiment=tfkd_poor_teacher").teacher.snapshot_epoch == 1
    assert list(compose_config("+experiment=repdistiller_cifar100").sched.milestones) == [150, 180, 210]


def test_every_shipped_sweep_is_listed_here():
    assert {p.stem for p in (conf_dir() / "sweep").glob("*.yaml")} == set(SWEEP_JOBS)


@pytest.mark.parametrize("name, jobs", SWEEP_JOBS.items())
def test_sweeps_expand_to_the_intended_jobs(name, jobs):
    params = yaml.safe_load((conf_dir() / "sweep" / f"{name}.yaml").read_text())["hydra"]["sweeper"]["params"]
    overrides = OverridesParser.create().parse_overrides([f"{k}={v}" for k, v in params.items()])
    count = 1
    for override in overrides:
        count *= len(list(override.sweep_iterator())) if override.is_sweep_override() else 1
    assert count == jobs
    compose_config(f"+sweep={name}")  # and the file composes with the main config


def test_all_methods_sweep_names_only_registered_methods():
    from kdrun.methods import METHODS

    params = yaml.safe_load((conf_dir() / "sweep" / "all_methods.yaml").read_text())["hydra"]["sweeper"]["params"]
    assert set(params["method"].split(",")) <= set(METHODS.names())
