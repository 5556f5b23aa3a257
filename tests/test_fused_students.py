"""Fused students (`kdrun -m ... fuse=true`): jobs differing only in method scalars, the student or (with
data_seed) the seed train in one process on the same batches, one teacher forward per batch for the group,
each job's outputs as if it had run alone."""
import csv
import json
from pathlib import Path

import pytest
import torch

from conftest import compose_config, run_cli

FAST = ["epochs=2", "teacher.epochs=1", "batch_size=128", "teacher.cache_outputs=false"]
TIMING = {"epoch_s", "images_per_s"}


def metrics(run_dir: Path) -> list[dict]:
    with open(Path(run_dir) / "metrics.csv") as f:
        return [{k: v for k, v in row.items() if k not in TIMING} for row in csv.DictReader(f)]


def result(run_dir: Path) -> dict:
    return json.loads((Path(run_dir) / "result.json").read_text())


def sweep_jobs(root: Path) -> dict[str, Path]:
    """{overrides: run dir} of the newest sweep's job reports."""
    sweep = sorted((root / "multirun").iterdir())[-1]
    reports = [json.loads(p.read_text()) for p in sorted((sweep / ".jobs").glob("*.json"))]
    return sweep, {r["overrides"]: r for r in reports}


def run_alone(root: Path, name: str, *overrides: str) -> Path:
    run_dir = root / "alone" / name
    assert run_cli(*FAST, f"results_dir={root}", f"run_dir={run_dir}", *overrides) == 0
    return run_dir


def same_checkpoints(a: Path, b: Path) -> bool:
    one, two = (torch.load(p / "checkpoint.pt", weights_only=False) for p in (a, b))
    return all(torch.equal(one["model"][k], two["model"][k]) for k in one["model"]) and \
        one["model"].keys() == two["model"].keys()


def test_a_fused_pair_matches_each_job_run_alone(tmp_path, capsys):
    code = run_cli("-m", *FAST, f"results_dir={tmp_path}", "method.T=2,4", "fuse=true")
    assert code == 0
    out = capsys.readouterr()
    assert "kdrun: fuse: 1 fused group: jobs 0,1 (2 jobs)" in out.err
    assert "sweep: 2 jobs: 2 completed" in out.out and "method.T=2" in out.out and "method.T=4" in out.out
    sweep, jobs = sweep_jobs(tmp_path)
    group = json.loads((sweep / ".fused" / "0.json").read_text())
    fused = {t: Path(next(r["run_dir"] for o, r in jobs.items() if f"method.T={t}" in o)) for t in (2, 4)}
    rows = metrics(fused[2])
    assert group["fused"] is True and group["jobs"] == [0, 1]
    # one teacher forward per batch for the group: 2 epochs of ceil(1437 / 128) steps
    per_epoch = int(float(rows[1]["teacher_queries"]) - float(rows[0]["teacher_queries"]))
    assert group["teacher_forwards"] == group["batches"] == 2 * -(-per_epoch // 128)
    for t in (2, 4):
        alone = run_alone(tmp_path, f"T{t}", f"method.T={t}")
        assert metrics(fused[t]) == metrics(alone)  # exact: the same values to the last digit
        one, two = result(fused[t]), result(alone)
        for key in ("best_acc", "last_acc", "best_epoch", "config_hash", "teacher_sha256", "status"):
            assert one[key] == two[key], key
        assert same_checkpoints(fused[t], alone)
    assert metrics(fused[2]) != metrics(fused[4])  # two different runs, not one run twice


def test_jobs_that_cannot_be_fused_run_alone_in_the_same_sweep(tmp_path, capsys):
    code = run_cli("-m", *FAST, "epochs=1", f"results_dir={tmp_path}", "method.T=2,4,8", "fuse=2")
    assert code == 0
    out = capsys.readouterr()
    assert "kdrun: fuse: 1 fused group: jobs 0,1 (2 jobs); 1 run alone" in out.err
    assert "sweep: 3 jobs: 3 completed" in out.out
    _, jobs = sweep_jobs(tmp_path)
    assert sorted(r["status"] for r in jobs.values()) == ["completed"] * 3
    # the same sweep again: every job, fused or not, is skipped as completed
    assert run_cli("-m", *FAST, "epochs=1", f"results_dir={tmp_path}", "method.T=2,4,8", "fuse=2") == 0
    assert "sweep: 3 jobs: 3 skipped" in capsys.readouterr().out


def test_a_refused_job_of_a_group_fails_alone_and_the_others_train(tmp_path, capsys):
    code = run_cli("-m", *FAST, "epochs=1", f"results_dir={tmp_path}", "method.alpha=0.5,1.5,0.9", "fuse=true")
    assert code == 1
    _, jobs = sweep_jobs(tmp_path)
    by_alpha = {o.split("method.alpha=")[1].split()[0]: r for o, r in jobs.items()}
    assert by_alpha["0.5"]["status"] == by_alpha["0.9"]["status"] == "completed"
    assert by_alpha["1.5"]["status"] == "failed" and "method.alpha=1.5" in by_alpha["1.5"]["error"]
    assert result(by_alpha["1.5"]["run_dir"])["status"] == "failed"


def test_grouping_keeps_other_students_methods_and_seeds_apart():
    from kdrun.fused.grouping import group_jobs

    base = ["batch_size=128"]
    configs = [compose_config(*base, "method.T=2"), compose_config(*base, "method.T=4"),
               compose_config(*base, "method.T=2", "student=resnet14"), compose_config(*base, "method=at"),
               compose_config(*base, "method.T=8", "seed=1"), compose_config(*base, "method.alpha=0.5"),
               compose_config(*base, "method=fitnet"), compose_config(*base, "method=fitnet", "seed=1"),
               compose_config(*base, "method.T=3", "compile=true")]
    groups, alone = group_jobs(configs, None)
    assert groups == [[0, 1, 2, 5]]  # another student sees the same batches; another seed does not
    assert set(alone) == {3, 4, 6, 7, 8}
    assert "several stages" in alone[6] and "compile=true" in alone[8]
    groups, alone = group_jobs(configs, 2)
    assert groups == [[0, 1], [2, 5]]


def test_seeds_that_share_a_data_seed_are_fused_and_others_not():
    from kdrun.fused.grouping import group_jobs

    configs = [compose_config("data_seed=0", "seed=1"), compose_config("data_seed=0", "seed=2", "student=resnet14"),
               compose_config("data_seed=1", "seed=3"), compose_config("seed=4"), compose_config("seed=5")]
    groups, alone = group_jobs(configs, None)
    assert groups == [[0, 1]] and set(alone) == {2, 3, 4}


def test_data_seed_equal_to_the_seed_is_the_same_run_and_another_is_not():
    from kdrun.run_record import config_hash

    plain = config_hash(compose_config("seed=3"))
    assert config_hash(compose_config("seed=3", "data_seed=3")) == plain
    assert config_hash(compose_config("seed=3", "data_seed=0")) != plain


def test_a_negative_data_seed_is_refused_in_one_line(capsys):
    assert run_cli("data_seed=-1") == 2
    err = capsys.readouterr().err
    assert "data_seed=-1" in err and "integer >= 0" in err and len(err.strip().splitlines()) == 1


def test_fused_seeds_and_students_on_one_data_seed_match_each_job_alone(tmp_path, capsys):
    one = [*FAST, "epochs=1"]
    assert run_cli("-m", *one, f"results_dir={tmp_path}", "seed=1,2", "student=resnet8,resnet14",
                   "fuse.data_seed=0") == 0
    assert "kdrun: fuse: 1 fused group: jobs 0,1,2,3 (4 jobs)" in capsys.readouterr().err
    _, jobs = sweep_jobs(tmp_path)
    fused = {o: Path(r["run_dir"]) for o, r in jobs.items()}
    assert len(fused) == 4 and len({tuple(map(str, metrics(d)[0].values())) for d in fused.values()}) == 4
    for seed, student in (("1", "resnet8"), ("2", "resnet14")):
        run_dir = next(d for o, d in fused.items() if f"seed={seed}" in o.split() and f"student={student}" in o)
        alone = tmp_path / "alone" / f"{seed}{student}"
        assert run_cli(*one, f"results_dir={tmp_path}", f"run_dir={alone}", f"seed={seed}", f"student={student}",
                       "data_seed=0") == 0
        assert metrics(run_dir) == metrics(alone)
        assert result(run_dir)["data_seed"] == 0 and result(run_dir)["config_hash"] == result(alone)["config_hash"]


@pytest.mark.parametrize("args", [["fuse=true"], ["-m", "fuse=1"], ["-m", "fuse=yes_please"],
                                  ["-m", "fuse=true", "hydra/launcher=slurm"]])
def test_fuse_is_refused_outside_a_local_sweep(args, capsys):
    assert run_cli(*args, "method.T=2,4") == 2
    assert "fuse" in capsys.readouterr().err


def test_an_interrupted_fused_group_resumes_to_the_uninterrupted_result(tmp_path, monkeypatch):
    import kdrun.fused.trainer as trainer
    import kdrun.interrupt

    original, calls = trainer.check_stop, {"n": 0}
    monkeypatch.setattr(kdrun.interrupt, "_requested", None)  # and None again after the test

    def check_stop():
        calls["n"] += 1
        if calls["n"] == 17:  # in the second epoch (12 steps an epoch, one check before each epoch)
            kdrun.interrupt.request("SIGTERM")
        original()

    monkeypatch.setattr(trainer, "check_stop", check_stop)
    sweep = ["-m", *FAST, f"results_dir={tmp_path}", "method.T=2,4", "fuse=true"]
    assert run_cli(*sweep) == 130
    _, jobs = sweep_jobs(tmp_path)
    assert sorted(r["status"] for r in jobs.values()) == ["interrupted", "interrupted"]
    stopped = {o: r["run_dir"] for o, r in jobs.items()}
    kdrun.interrupt._requested = None
    monkeypatch.setattr(trainer, "check_stop", original)
    assert run_cli(*sweep) == 0
    _, jobs = sweep_jobs(tmp_path)
    assert {o: r["run_dir"] for o, r in jobs.items()} == stopped  # each job resumed its own run directory
    for overrides, report in jobs.items():
        record = result(report["run_dir"])
        assert record["status"] == "completed" and record["resumed"] == 1
        t = next(o.split("=")[1] for o in overrides.split() if o.startswith("method.T="))
        alone = run_alone(tmp_path, f"T{t}", f"method.T={t}")
        assert metrics(report["run_dir"]) == metrics(alone)
        assert same_checkpoints(Path(report["run_dir"]), alone)


def test_a_fused_pair_looks_the_teacher_cache_up_once_per_batch(tmp_path):
    cached = [*FAST, "epochs=1", "teacher.cache_outputs=true"]
    assert run_cli("-m", *cached, f"results_dir={tmp_path}", "method.T=2,4", "fuse=true") == 0
    sweep, jobs = sweep_jobs(tmp_path)
    group = json.loads((sweep / ".fused" / "0.json").read_text())
    assert group.get("teacher_forwards", 0) == 0 and group["teacher_lookups"] == group["batches"]
    for overrides, report in jobs.items():
        t = next(o.split("=")[1] for o in overrides.split() if o.startswith("method.T="))
        alone = tmp_path / "alone" / f"T{t}"
        assert run_cli(*cached, f"results_dir={tmp_path}", f"run_dir={alone}", f"method.T={t}") == 0
        assert result(report["run_dir"])["teacher_cache"] in ("built", "stored")
        assert metrics(report["run_dir"]) == metrics(alone)
        assert same_checkpoints(Path(report["run_dir"]), alone)


def test_a_group_that_cannot_train_together_trains_one_job_after_another(tmp_path, monkeypatch, capsys):
    import kdrun.fused.group

    monkeypatch.setattr(kdrun.fused.group, "can_fuse", lambda runs: "the runs would resume from different points")
    one = [*FAST, "epochs=1"]
    assert run_cli("-m", *one, f"results_dir={tmp_path}", "method.T=2,4", "fuse=true") == 0
    assert "jobs 0,1 train one after another: the runs would resume from different points" in capsys.readouterr().err
    _, jobs = sweep_jobs(tmp_path)
    for overrides, report in jobs.items():
        t = next(o.split("=")[1] for o in overrides.split() if o.startswith("method.T="))
        alone = tmp_path / "alone" / f"T{t}"
        assert run_cli(*one, f"results_dir={tmp_path}", f"run_dir={alone}", f"method.T={t}") == 0
        assert metrics(report["run_dir"]) == metrics(alone)


def test_a_fused_pair_in_channels_last_shares_the_teacher_and_matches_alone(tmp_path):
    cl = [*FAST, "epochs=1", "channels_last=true"]
    assert run_cli("-m", *cl, f"results_dir={tmp_path}", "method.alpha=0.5,0.9", "fuse=true") == 0
    sweep, jobs = sweep_jobs(tmp_path)
    group = json.loads((sweep / ".fused" / "0.json").read_text())
    assert group["teacher_forwards"] == group["batches"]
    for overrides, report in jobs.items():
        a = overrides.split("method.alpha=")[1].split()[0]
        alone = tmp_path / "alone" / f"a{a}"
        assert run_cli(*cl, f"results_dir={tmp_path}", f"run_dir={alone}", f"method.alpha={a}") == 0
        assert metrics(report["run_dir"]) == metrics(alone)
        assert result(report["run_dir"])["teacher_queries"] == result(alone)["teacher_queries"]
