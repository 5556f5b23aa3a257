"""Resume: a run killed at any point (SIGKILL in a preliminary stage, between epochs, mid-epoch, while its
teacher or an assistant trains) or stopped by SIGTERM continues from its last epoch checkpoint and ends
with the metrics of an uninterrupted run; run directories of other configurations are refused."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

from conftest import FAST, run_cli

KILL_AT = Path(__file__).with_name("kill_at.py")
TIMING = ["epoch_s", "images_per_s"]  # wall-clock columns: the only ones a resumed run may differ in

# 1437 digits training images at batch 128: 12 steps per epoch.
BASE = ["epochs=3", "teacher.epochs=2", "batch_size=128"]
CASES = {
    # kill point, overrides
    "teacher_mid_epoch": ("step=18", BASE),                                    # teacher epoch 2
    "student_mid_epoch": ("step=30", BASE),                                    # student epoch 1
    "between_student_epochs": ("checkpoint=4", BASE),                          # after student epoch 2
    "hint_stage": ("step=30", [*BASE, "method=fitnet", "method.hint_epochs=2"]),  # fitnet's hint stage
    "assistant_link": ("step=30", [*BASE, "teacher=resnet14", "assistants=[resnet8]"]),  # the TA trains
}


def kill_run(point: str, root: Path, *overrides: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    flags = [o for o in overrides if o.startswith("-")]  # Hydra wants its flags before the overrides
    settings = [o for o in overrides if not o.startswith("-")]
    return subprocess.run([sys.executable, str(KILL_AT), point, *flags, f"results_dir={root}", *settings],
                          capture_output=True, text=True, env=env, timeout=600)


def run_records(root: Path) -> list[dict]:
    return [json.loads(p.read_text()) for p in sorted(root.rglob("result.json")) if "teachers" not in p.parts
            and ".jobs" not in p.parts]


def metrics(record: dict) -> pd.DataFrame:
    return pd.read_csv(Path(record["run_dir"]) / "metrics.csv").drop(columns=TIMING)


def assert_same_run(resumed: dict, reference: dict) -> None:
    pd.testing.assert_frame_equal(metrics(resumed), metrics(reference), check_exact=True)
    for key in ("best_acc", "best_epoch", "last_acc", "teacher_acc", "status"):
        assert resumed[key] == reference[key], key
    if "chain" in reference:
        assert [link["acc"] for link in resumed["chain"]] == [link["acc"] for link in reference["chain"]]


@pytest.mark.slow
@pytest.mark.parametrize("case", CASES)
def test_a_killed_run_resumes_to_the_metrics_of_an_uninterrupted_one(tmp_path, case):
    point, overrides = CASES[case]
    assert run_cli(f"results_dir={tmp_path / 'reference'}", *overrides) == 0
    (reference,) = run_records(tmp_path / "reference")

    killed = kill_run(point, tmp_path / "killed", *overrides)
    assert killed.returncode == -9, killed.stderr[-2000:]
    assert run_cli(f"results_dir={tmp_path / 'killed'}", *overrides) == 0
    records = run_records(tmp_path / "killed")
    assert len(records) == 1, "the killed run is continued in its own directory, not started anew"
    assert_same_run(records[0], reference)
    assert not list((tmp_path / "killed").rglob("*.tmp"))


@pytest.mark.slow
@pytest.mark.parametrize("step", [18, 30], ids=["teacher_mid_epoch", "student_mid_epoch"])
def test_sigterm_ends_the_run_as_interrupted_and_it_resumes_mid_epoch(tmp_path, step):
    """SIGTERM stops after the current step and checkpoints that point: the resumed run finishes the epoch
    from the next batch, with the sums of the batches before it, and ends as an uninterrupted run."""
    assert run_cli(f"results_dir={tmp_path / 'reference'}", *BASE) == 0
    (reference,) = run_records(tmp_path / "reference")
    stopped = kill_run(f"sigterm={step}", tmp_path / "run", *BASE)
    assert stopped.returncode == 143
    last_line = stopped.stderr.strip().splitlines()[-1]
    assert "interrupted" in last_line and "Traceback" not in stopped.stderr
    (record,) = run_records(tmp_path / "run")
    assert record["status"] == "interrupted" and "resume" in record["error"]
    assert run_cli(f"results_dir={tmp_path / 'run'}", *BASE) == 0
    (resumed,) = run_records(tmp_path / "run")
    assert resumed["resumed"] == 1
    assert_same_run(resumed, reference)


@pytest.mark.slow
def test_resume_never_starts_fresh_and_resume_dir_names_the_run(tmp_path):
    kill_run("step=30", tmp_path, *BASE)
    (killed,) = run_records(tmp_path)
    assert run_cli(f"results_dir={tmp_path}", "resume=never", *BASE) == 0
    assert len(run_records(tmp_path)) == 2
    assert run_cli(f"results_dir={tmp_path}", f"resume={killed['run_dir']}", *BASE) == 0
    by_dir = {r["run_dir"]: r for r in run_records(tmp_path)}
    assert by_dir[killed["run_dir"]]["status"] == "completed" and by_dir[killed["run_dir"]]["resumed"] == 1


def test_run_dir_of_another_configuration_is_refused_and_a_completed_one_left_alone(kdrun, capsys):
    run_dir = kdrun.root / "mine"
    assert kdrun(f"run_dir={run_dir}")[0] == 0
    before = {p.name: p.read_bytes() for p in run_dir.iterdir() if p.is_file()}
    capsys.readouterr()
    code, _ = kdrun(f"run_dir={run_dir}", "method.T=2")
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "another configuration" in err[0]
    code, _ = kdrun(f"run_dir={run_dir}")
    captured = capsys.readouterr()
    assert code == 0 and "left alone" in captured.err and "completed in" in captured.out
    assert {p.name: p.read_bytes() for p in run_dir.iterdir() if p.is_file()} == before


def test_a_damaged_run_checkpoint_is_moved_aside_and_the_run_starts_over(kdrun, capsys):
    code, (record,) = kdrun("epochs=2")
    run_dir = Path(record["run_dir"])
    record["status"] = "running"  # as a killed run leaves it
    (run_dir / "result.json").write_text(json.dumps(record))
    (run_dir / "checkpoint.pt").write_bytes((run_dir / "checkpoint.pt").read_bytes()[:1000])
    capsys.readouterr()
    code, records = kdrun("epochs=2")
    assert code == 0 and len(records) == 1 and records[0]["status"] == "completed"
    assert "moved it aside (checkpoint.pt.corrupt-" in capsys.readouterr().err
    assert list(run_dir.glob("checkpoint.pt.corrupt-*")) and list(run_dir.glob("metrics.csv.corrupt-*"))


def test_bad_resume_value_is_refused(kdrun, capsys):
    code, _ = kdrun("resume=/no/such/run")
    assert code == 2 and "resume=/no/such/run is not allowed" in capsys.readouterr().err


def submitit_job_pids() -> list[int]:
    pids = []
    for entry in Path("/proc").iterdir():
        try:
            if entry.name.isdigit() and b"submitit.core._submit" in (entry / "cmdline").read_bytes():
                pids.append(int(entry.name))
        except OSError:
            continue
    return pids


@pytest.mark.slow
def test_a_preempted_submitit_job_is_requeued_and_resumes(tmp_path):
    """submitit signals preemption or a time limit with SIGUSR2; its Hydra launcher requeues the job, which
    then continues its run from the last epoch checkpoint."""
    pytest.importorskip("hydra_plugins.hydra_submitit_launcher")
    import signal
    import time

    job = ["method=ce", "epochs=12", "batch_size=32"]
    assert run_cli(f"results_dir={tmp_path / 'reference'}", *job) == 0
    (reference,) = run_records(tmp_path / "reference")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    sweep = subprocess.Popen([sys.executable, "-m", "kdrun", "-m", "hydra/launcher=submitit_local", *job,
                              f"results_dir={tmp_path / 'sweep'}"], env=env, stdout=subprocess.PIPE,
                             stderr=subprocess.STDOUT, text=True)
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:  # preempt once the run has a checkpoint to resume from
        metrics_files = list((tmp_path / "sweep").rglob("metrics.csv"))
        if metrics_files and len(metrics_files[0].read_text().splitlines()) >= 3 and submitit_job_pids():
            break
        time.sleep(0.2)
    for pid in submitit_job_pids():
        os.kill(pid, signal.SIGUSR2)
    output, _ = sweep.communicate(timeout=600)
    assert sweep.returncode == 0, output[-3000:]
    (record,) = run_records(tmp_path / "sweep")
    assert record["resumed"] == 1 and record["status"] == "completed"
    assert_same_run(record, reference)


@pytest.mark.slow
def test_a_sweep_resumes_its_killed_job_and_skips_the_completed_one(tmp_path, capsys):
    sweep = ["-m", "method=ce", "seed=0,1", "epochs=3", "batch_size=128"]
    killed = kill_run("step=50", tmp_path, *sweep)  # job 0 completes in 36 steps; job 1 dies in its epoch 2
    assert killed.returncode == -9
    capsys.readouterr()
    assert run_cli("-m", f"results_dir={tmp_path}", *sweep[1:]) == 0
    out = capsys.readouterr().out
    records = {r["seed"]: r for r in run_records(tmp_path) if r["status"] == "completed"}
    assert set(records) == {0, 1} and len(run_records(tmp_path)) == 2
    assert "skipped" in out and records[1].get("resumed") == 1
