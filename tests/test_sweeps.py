"""Ablation protocols and sweeps: TA chains, poor-teacher snapshots, launchers, failures, skipping."""
import csv
import hashlib
from pathlib import Path

import pytest


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_three_link_chain_trains_each_link_once_across_invocations(kdrun):
    chain = ["teacher=resnet20", "assistants=[resnet14,resnet8]", "student=resnet8"]
    code, first = kdrun(*chain)
    assert code == 0
    record = first[0]
    assert record["assistants"] == ["resnet14", "resnet8"]
    assert [link["model"] for link in record["chain"]] == ["resnet14", "resnet8"]
    assert record["teacher_source"] == "trained" and [l["source"] for l in record["chain"]] == ["trained", "trained"]
    code, both = kdrun(*chain, "seed=1")
    second = next(r for r in both if r["seed"] == 1)
    assert second["teacher_source"] == "cache" and [l["source"] for l in second["chain"]] == ["cache", "cache"]
    assert [l["sha256"] for l in second["chain"]] == [l["sha256"] for l in record["chain"]]
    # teacher + two assistants, each trained once
    assert len(list((kdrun.root / "teachers").glob("*/checkpoint.pt"))) == 3
    # a different chain above the last assistant is a different assistant
    kdrun("teacher=resnet20", "assistants=[resnet8]", "student=resnet8")
    assert len(list((kdrun.root / "teachers").glob("*/checkpoint.pt"))) == 4


def test_snapshot_epoch_picks_that_epoch_of_one_teacher_run(kdrun):
    code, results = kdrun("teacher.epochs=3", "teacher.snapshot_epoch=2")
    assert code == 0
    record = results[0]
    cache = next((kdrun.root / "teachers").glob("resnet26_digits_*"))
    assert sorted(p.name for p in (cache / "snapshots").glob("*.pt")) == [f"epoch_000{k}.pt" for k in (1, 2, 3)]
    assert record["teacher_sha256"] == sha256(cache / "snapshots" / "epoch_0002.pt")
    with open(cache / "metrics.csv") as f:
        rows = list(csv.DictReader(f))
    assert record["teacher_acc"] == pytest.approx(float(rows[1]["test_acc"]))
    assert record["teacher_snapshot_epoch"] == 2
    # another snapshot of the same teacher run: no retraining
    _, results = kdrun("teacher.epochs=3", "teacher.snapshot_epoch=1", "seed=1")
    other = next(r for r in results if r["seed"] == 1)
    assert other["teacher_source"] == "cache"
    assert other["teacher_sha256"] == sha256(cache / "snapshots" / "epoch_0001.pt")


def test_a_failing_job_does_not_stop_the_sweep(kdrun):
    code, results = kdrun("-m", "method.alpha=0.5,1.5,0.9")
    assert code == 1  # the sweep goes on, and its exit status says a job failed
    by_alpha = {r["alpha"]: r for r in results}
    assert by_alpha[0.5]["status"] == "completed" and by_alpha[0.9]["status"] == "completed"
    assert by_alpha[1.5]["status"] == "failed" and "method.alpha=1.5" in by_alpha[1.5]["error"]


def test_rerunning_a_sweep_skips_completed_jobs(kdrun, capsys):
    kdrun("-m", "method=ce,kd")
    capsys.readouterr()
    code, results = kdrun("-m", "method=ce,kd", "seed=0,1")
    out = capsys.readouterr().err
    assert code == 0
    assert out.count("skipped") == 2
    assert len(results) == 4 and all(r["status"] == "completed" for r in results)
    kdrun("-m", "method=ce", "skip_completed=false")
    assert len([p for p in kdrun.root.rglob("result.json") if "teachers" not in p.parts]) == 5


def test_joblib_launcher_runs_jobs_in_parallel_workers(kdrun):
    code, results = kdrun("-m", "hydra/launcher=joblib", "hydra.launcher.n_jobs=2", "method=ce", "seed=0,1")
    assert code == 0
    assert sorted(r["seed"] for r in results) == [0, 1] and all(r["status"] == "completed" for r in results)


def test_submitit_local_executor(kdrun):
    pytest.importorskip("hydra_plugins.hydra_submitit_launcher")
    code, results = kdrun("-m", "hydra/launcher=submitit_local", "method=ce", "seed=0,1")
    assert code == 0
    assert sorted(r["seed"] for r in results) == [0, 1] and all(r["status"] == "completed" for r in results)


def test_snapshots_can_be_switched_off_and_asking_for_one_then_says_so(kdrun, capsys):
    code, _ = kdrun("teacher.epochs=2", "teacher.keep_snapshots=false")
    assert code == 0 and not list((kdrun.root / "teachers").glob("*/snapshots/*.pt"))
    code, _ = kdrun("teacher.epochs=2", "teacher.snapshot_epoch=1", "seed=1")
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and "teacher.keep_snapshots=false" in err[-1]


def test_an_assistant_chain_works_with_a_method_that_wraps_the_loader(kdrun):
    code, results = kdrun("method=crd", "teacher=resnet20", "assistants=[resnet14]")
    assert code == 0 and results[0]["chain"][0]["source"] == "trained"


def test_a_long_sweep_job_name_is_shortened_with_a_hash_not_refused_by_the_filesystem():
    from kdrun.resolvers import JOB_DIRNAME_LIMIT, job_dirname

    short = "method=kd,seed=0"
    assert job_dirname(short) == short
    long = ",".join(f"transfer.key{i}=value{i}" for i in range(40))
    name = job_dirname(long)
    assert len(name.encode()) <= JOB_DIRNAME_LIMIT and name.startswith("transfer.key0=value0")
    assert job_dirname(long + "x") != name  # the hash tells long names apart
