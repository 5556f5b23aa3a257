"""End-to-end runs through the CLI: outputs, teacher cache, frozen teacher, refusals, multirun."""
import csv
from pathlib import Path

import pytest
import torch

from conftest import FAST, compose_config, run_cli


def read_csv(path):
    with open(path) as f:
        return list(csv.DictReader(f))


def test_default_run_writes_config_metrics_result_and_checkpoint(kdrun):
    code, results = kdrun("epochs=2")
    assert code == 0
    result = results[0]
    run_dir = Path(result["run_dir"])
    assert run_dir.parent == kdrun.root / "runs"
    for key in ("method", "teacher", "student", "dataset", "seed", "T", "alpha", "epochs", "teacher_acc",
                "teacher_source", "teacher_sha256", "best_acc", "best_epoch", "last_acc", "wall_s", "device", "status"):
        assert key in result, key
    assert (result["method"], result["teacher"], result["student"], result["dataset"]) == ("kd", "resnet26", "resnet8", "digits")
    assert result["status"] == "completed" and result["teacher_source"] == "trained"
    assert len(result["teacher_sha256"]) == 64 and 0 <= result["teacher_acc"] <= 100
    rows = read_csv(run_dir / "metrics.csv")
    assert [r["epoch"] for r in rows] == ["1", "2"]
    for column in ("stage", "epoch", "lr", "loss_ce", "loss_kd", "train_loss", "train_acc", "test_loss", "test_acc",
                   "epoch_s", "images_per_s"):
        assert column in rows[0], column
    assert result["last_acc"] == pytest.approx(float(rows[-1]["test_acc"]))
    assert result["best_acc"] == max(float(r["test_acc"]) for r in rows)
    assert (run_dir / "config.yaml").read_text().count("name: kd") == 1
    checkpoint = torch.load(run_dir / "checkpoint.pt", weights_only=True)
    assert {"model", "optimizer", "scheduler", "epoch", "rng"} <= set(checkpoint) and checkpoint["epoch"] == 2


def test_second_run_reuses_the_cached_teacher_and_other_settings_make_another(kdrun):
    _, first = kdrun()
    _, both = kdrun("seed=1")
    second = next(r for r in both if r["seed"] == 1)
    assert first[0]["teacher_source"] == "trained" and second["teacher_source"] == "cache"
    assert second["teacher_sha256"] == first[0]["teacher_sha256"]
    _, runs = kdrun("teacher.epochs=2", "seed=2")  # a different (better trained) teacher: a new cache entry
    assert next(r for r in runs if r["seed"] == 2)["teacher_source"] == "trained"
    assert len(list((kdrun.root / "teachers").glob("resnet26_digits_*"))) == 2


def test_explicit_teacher_checkpoint(kdrun):
    kdrun()
    cached = next((kdrun.root / "teachers").glob("resnet26_digits_*/checkpoint.pt"))
    code, results = kdrun(f"teacher.checkpoint={cached}", "seed=5")
    record = next(r for r in results if r["seed"] == 5)
    assert code == 0 and record["teacher_source"] == "checkpoint"


def test_ce_needs_no_teacher(kdrun):
    code, results = kdrun("method=ce")
    assert code == 0 and results[0]["teacher"] is None and results[0]["teacher_acc"] is None
    assert not (kdrun.root / "teachers").exists()


def test_teacher_is_frozen_during_distillation():
    from kdrun.experiment import prepare

    cfg = compose_config(*FAST, "results_dir=/nonexistent")
    plan = prepare(cfg)
    teacher = plan.method.teacher
    # Give the teacher fixed weights through an explicit, pre-resolved source.
    before = {k: v.clone() for k, v in teacher.state_dict().items()}
    from kdrun.train import fit
    from kdrun.data import make_loaders

    train_loader, test_loader = make_loaders(plan.data, 128, "cpu", 0)

    class Quiet:
        def start_stage(self, *a): pass
        def advance(self): pass
        def end_epoch(self, row): pass

    fit(plan.method, train_loader, test_loader, plan.method.stages(1), cfg.optim, cfg.sched, 0.05, plan.settings, Quiet())
    after = teacher.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before), "teacher weights and BN statistics unchanged"
    assert not teacher.training and all(not p.requires_grad for p in teacher.parameters())


@pytest.mark.parametrize("override, fragment", [
    ("method=kdd", "unknown method 'kdd'; did you mean kd"),
    ("teacher=resnet9", "unknown teacher 'resnet9'; did you mean"),
    ("dataset=cifar", "unknown dataset 'cifar'; did you mean cifar10"),
    ("method.T=0", "method.T=0"),
    ("method.alpha=1.5", "method.alpha=1.5"),
    ("epochs=0", "epochs=0"),
    ("batch_size=0", "batch_size=0"),
    ("device=cuda", "device=cuda"),
    ("precision=fp8", "precision=fp8"),
    ("teacher.checkpoint=/no/such/file.pt", "teacher.checkpoint=/no/such/file.pt"),
    ("dataset=cifar10", "dataset.root="),
    ("method.TT=3", "unknown key method.TT (did you mean method.T?"),
    ("epoch=3", "unknown key epoch (did you mean epochs?"),
])
def test_bad_input_is_refused_in_one_line_before_anything_is_written(tmp_path, capsys, override, fragment):
    if override == "device=cuda" and torch.cuda.is_available():
        pytest.skip("a GPU is present")
    code = run_cli(f"results_dir={tmp_path / 'results'}", "dataset.root=" + str(tmp_path / "none")
                   if override == "dataset=cifar10" else "seed=0", override)
    err = capsys.readouterr().err.strip()
    assert code == 2
    assert fragment in err
    assert len(err.splitlines()) == 1, err
    assert not (tmp_path / "results").exists()


def test_corrupt_and_foreign_teacher_checkpoints_are_refused(tmp_path, capsys):
    corrupt = tmp_path / "corrupt.pt"
    corrupt.write_bytes(b"not a checkpoint")
    foreign = tmp_path / "foreign.pt"
    from kdrun.models import create_model

    torch.save({"model": create_model("resnet8", 10, 1).state_dict()}, foreign)
    for path, fragment in ((corrupt, "not a readable PyTorch checkpoint"), (foreign, "is not a resnet26 checkpoint")):
        code = run_cli(f"results_dir={tmp_path / 'results'}", f"teacher.checkpoint={path}")
        err = capsys.readouterr().err.strip()
        assert code == 2 and fragment in err and len(err.splitlines()) == 1, err
    assert not (tmp_path / "results").exists()


def test_two_job_multirun_writes_one_directory_per_job(kdrun):
    code, results = kdrun("-m", "method=ce,kd")
    assert code == 0
    assert sorted(r["method"] for r in results) == ["ce", "kd"]
    job_dirs = {Path(r["run_dir"]) for r in results}
    assert len(job_dirs) == 2 and all(d.parent.parent == kdrun.root / "multirun" for d in job_dirs)
    assert all((d / "metrics.csv").is_file() for d in job_dirs)


def test_ls_lists_registry_entries(capsys):
    assert run_cli("ls", "models") == 0
    out = capsys.readouterr().out
    assert "resnet26" in out and "CIFAR ResNet-26" in out
    assert run_cli("ls", "methods") == 0 and "Hinton" in capsys.readouterr().out
    assert run_cli("ls", "datasets") == 0 and "digits" in capsys.readouterr().out
    assert run_cli("ls", "layers", "resnet26", "--input", "1x8x8") == 0
    out = capsys.readouterr().out
    assert "s3" in out and "layer3" in out


def test_help_shows_groups_and_cfg_prints_the_composed_config(capsys):
    assert run_cli("--help") == 0
    out = capsys.readouterr().out
    assert "teacher: " in out and "resnet110" in out and "method: " in out and "dataset: " in out
    assert run_cli("--cfg", "job", "method=ce", "student=resnet14") == 0
    out = capsys.readouterr().out
    assert "name: ce" in out and "name: resnet14" in out


def test_a_diverging_run_stops_with_one_line_naming_the_term_and_step(kdrun, capsys):
    code, results = kdrun("method=ce", "optim.lr=1e12")
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 1
    assert "loss term 'ce' is" in err[-1] and "at step" in err[-1]
    assert results[0]["status"] == "failed" and "NonFiniteLoss" in results[0]["error"]


def test_a_run_does_not_depend_on_whether_its_teacher_was_trained_or_cached(kdrun):
    import csv as _csv

    # crd draws negatives at random during training: the run must start from its own seed either way
    _, first = kdrun("method=crd", "epochs=2")
    _, both = kdrun("method=crd", "epochs=2", "run_dir=" + str(kdrun.root / "again"))
    second = next(r for r in both if r["run_dir"].endswith("again"))
    assert (first[0]["teacher_source"], second["teacher_source"]) == ("trained", "cache")

    def losses(record):
        with open(Path(record["run_dir"]) / "metrics.csv") as f:
            return [(row["train_loss"], row["test_acc"]) for row in _csv.DictReader(f)]

    assert losses(first[0]) == losses(second)


def test_outputs_are_readable_by_others_as_the_umask_allows(kdrun):
    import os

    from kdrun.checkpoint import UMASK

    _, results = kdrun("method=ce")
    run_dir = Path(results[0]["run_dir"])
    for name in ("result.json", "metrics.csv", "checkpoint.pt", "config.yaml"):
        assert (run_dir / name).stat().st_mode & 0o777 == 0o666 & ~UMASK, name
