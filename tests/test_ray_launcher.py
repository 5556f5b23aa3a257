"""Sweeps on Ray (`kdrun -m hydra/launcher=ray ...`, the optional extra kdrun[ray]): the refusals in one line
without Ray, kdrun's launcher defaults, and an end-to-end sweep on a local Ray cluster where Ray is installed."""
import importlib.util
from pathlib import Path

import pytest

from kdrun.ray_launcher import RAY_PLUGIN


def error_lines(capsys) -> list[str]:
    return [line for line in capsys.readouterr().err.splitlines() if line.strip()]


def test_ray_without_the_plugin_says_how_to_install_it_in_one_line(kdrun, capsys, monkeypatch):
    # As if kdrun[ray] were not installed, wherever it is.
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *args: None if name == RAY_PLUGIN else real_find_spec(name, *args))
    code, results = kdrun("-m", "hydra/launcher=ray", "method=ce,kd")
    lines = error_lines(capsys)
    assert code == 2 and results == [] and not any(kdrun.root.iterdir())
    assert len(lines) == 1 and 'pip install "kdrun[ray]"' in lines[0] and "hydra/launcher=ray" in lines[0]


def test_an_unknown_launcher_is_refused_in_one_line_with_close_matches(kdrun, capsys):
    code, _ = kdrun("-m", "hydra/launcher=jobilb", "method=ce,kd")
    lines = error_lines(capsys)
    assert code == 2 and len(lines) == 1
    assert "unknown hydra/launcher 'jobilb'; did you mean joblib?" in lines[0]


def test_fuse_cannot_be_combined_with_ray(kdrun, capsys):
    code, _ = kdrun("-m", "hydra/launcher=ray", "fuse=true", "method.T=2,4")
    lines = error_lines(capsys)
    assert code == 2 and len(lines) == 1 and "cannot be combined with hydra/launcher=ray" in lines[0]


# With the plugin installed Hydra warns that it validates the file against the plugin's schema (kdrun's CLI hides it)
@pytest.mark.filterwarnings(r"ignore:\s*'hydra/launcher/ray' is validated against ConfigStore schema")
@pytest.mark.parametrize("cuda", [False, True])
def test_the_ray_launcher_defaults_give_each_job_a_gpu_when_there_is_one(monkeypatch, cuda):
    import torch
    from hydra import compose, initialize_config_dir

    from kdrun.config_store import register_model_groups
    from kdrun.paths import conf_dir

    monkeypatch.setattr(torch.cuda, "is_available", lambda: cuda)
    register_model_groups()
    with initialize_config_dir(config_dir=str(conf_dir()), version_base="1.3"):
        cfg = compose(config_name="config", overrides=["hydra/launcher=ray"], return_hydra_config=True)
    launcher = cfg.hydra.launcher
    assert launcher._target_ == "hydra_plugins.hydra_ray_launcher.ray_launcher.RayLauncher"
    assert launcher.ray.remote.num_gpus == (1 if cuda else 0) and launcher.ray.remote.num_cpus == 1
    # present and null: the plugin would otherwise ask for 75 MB, which ray.init refuses with an address
    assert "object_store_memory" in launcher.ray.init and launcher.ray.init.object_store_memory is None


@pytest.fixture
def local_ray():
    """The sweeps below share one local cluster (the launcher keeps Ray running in this process); shut it down."""
    ray = pytest.importorskip("ray")
    pytest.importorskip(RAY_PLUGIN)
    yield
    ray.shutdown()


@pytest.mark.slow
def test_a_sweep_on_a_local_ray_cluster_records_skips_and_summarises_like_the_other_launchers(kdrun, capsys,
                                                                                                  local_ray):
    from kdrun.sweep_summary import read_reports

    sweep = ["-m", "hydra/launcher=ray", "hydra.launcher.ray.init.num_cpus=2", "method.alpha=0.5,1.5"]
    code, results = kdrun(*sweep)
    out = capsys.readouterr().out
    assert code == 1  # one job failed, the other went on
    by_alpha = {r["alpha"]: r for r in results}
    assert by_alpha[0.5]["status"] == "completed" and by_alpha[1.5]["status"] == "failed"
    assert "method.alpha=1.5" in by_alpha[1.5]["error"]
    run_dirs = {Path(r["run_dir"]) for r in results}
    assert len(run_dirs) == 2  # each job its own directory, written by its Ray worker
    done = Path(by_alpha[0.5]["run_dir"])
    assert all((done / name).is_file() for name in ("config.yaml", "metrics.csv", "result.json"))
    assert "sweep: 2 jobs: 1 completed, 1 failed" in out

    code, results = kdrun(*sweep)  # the same sweep again: the completed job is a twin, skipped
    out = capsys.readouterr().out
    assert code == 1 and "sweep: 2 jobs: 1 skipped, 1 failed" in out
    reports = read_reports(max(kdrun.root.glob("multirun/*"), key=lambda p: p.stat().st_mtime))
    assert [r["status"] for r in reports] == ["skipped", "failed"] and Path(reports[0]["run_dir"]) == done
    assert len([r for r in results if r["status"] == "completed"]) == 1
