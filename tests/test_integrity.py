"""Never trust damaged files, never lose written ones: the teacher cache checks hashes and accuracy, a full
disk or a file in the way is one line, temp files of killed writers are cleaned up, sweeps report failures."""
from __future__ import annotations

import errno
import json
import os
from pathlib import Path

import pytest
import torch

import kdrun.checkpoint
from kdrun.checkpoint import HOST, atomic_write_text, hash_path, load_verified, save_checkpoint
from kdrun.errors import DamagedFile

TEACHER = ["teacher.epochs=3"]  # accurate enough that damaged weights measure visibly worse


def cache_entry(root: Path) -> Path:
    (entry,) = [p for p in (root / "teachers").iterdir() if p.is_dir() and ".corrupt-" not in p.name]
    return entry


def spoil(path: Path, rehash: bool) -> None:
    """Replace the weights with zeros: still a valid checkpoint of the right architecture."""
    state = torch.load(path, weights_only=True)
    state["model"] = {k: torch.zeros_like(v) for k, v in state["model"].items()}
    torch.save(state, path)
    if rehash:  # a hostile edit that also rewrites the hash file
        hash_path(path).write_text(f"{kdrun.checkpoint.sha256_file(path)}  {path.name}\n")


def test_every_checkpoint_has_its_hash_and_a_changed_byte_is_detected(tmp_path):
    path = tmp_path / "c.pt"
    digest = save_checkpoint(path, {"w": torch.ones(3)})
    assert hash_path(path).read_text().split() == [digest, "c.pt"]
    assert load_verified(path)[1] == digest
    data = bytearray(path.read_bytes())
    data[-1] ^= 1
    path.write_bytes(bytes(data))
    with pytest.raises(DamagedFile, match="sha256"):
        load_verified(path)


def test_a_cached_teacher_with_other_weights_is_moved_aside_and_retrained(kdrun, capsys):
    _, (first,) = kdrun(*TEACHER)
    entry = cache_entry(kdrun.root)
    spoil(entry / "checkpoint.pt", rehash=False)
    capsys.readouterr()
    code, records = kdrun(*TEACHER, "seed=1")
    second = next(r for r in records if r["seed"] == 1)
    assert code == 0 and second["teacher_source"] == "trained"
    assert "is damaged" in capsys.readouterr().err
    assert second["teacher_acc"] == first["teacher_acc"]  # retrained to the same weights
    assert len(list((kdrun.root / "teachers").glob("*.corrupt-*"))) == 1


def test_a_cached_teacher_whose_hash_was_rewritten_is_caught_by_its_accuracy(kdrun, capsys):
    _, (first,) = kdrun(*TEACHER)
    spoil(cache_entry(kdrun.root) / "checkpoint.pt", rehash=True)
    capsys.readouterr()
    code, _ = kdrun(*TEACHER, "seed=1")
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 1 and len(err) == 1
    assert f"{first['teacher_acc']:.2f}%" in err[0] and "measure" in err[0]
    assert not [p for p in (kdrun.root / "teachers").iterdir() if p.is_dir() and ".corrupt-" not in p.name]
    code, records = kdrun(*TEACHER, "seed=1")  # the damaged entry was moved aside: the rerun retrains
    rerun = next(r for r in records if r["seed"] == 1 and r["status"] == "completed")
    assert code == 0 and rerun["teacher_source"] == "trained" and rerun["teacher_acc"] == first["teacher_acc"]


def test_a_truncated_cache_entry_is_moved_aside_with_a_message(kdrun, capsys):
    kdrun()
    checkpoint = cache_entry(kdrun.root) / "checkpoint.pt"
    checkpoint.write_bytes(checkpoint.read_bytes()[:500])
    capsys.readouterr()
    code, records = kdrun("seed=1")
    assert code == 0 and next(r for r in records if r["seed"] == 1)["teacher_source"] == "trained"
    assert "moved it to" in capsys.readouterr().err


@pytest.fixture
def full_disk_at(monkeypatch):
    """Make the n-th write of a file named `name` fail as a full disk does."""
    real = kdrun.checkpoint.write_and_sync

    def arm(name: str, n: int):
        seen = {"n": 0}

        def write_and_sync(fd, data):
            target = os.readlink(f"/proc/self/fd/{fd}")
            if Path(target).name.startswith(f".{name}.{HOST}-"):
                seen["n"] += 1
                if seen["n"] >= n:
                    os.close(fd)
                    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
            real(fd, data)

        monkeypatch.setattr(kdrun.checkpoint, "write_and_sync", write_and_sync)

    return arm


def test_a_full_disk_is_one_line_and_loses_nothing(kdrun, capsys, full_disk_at):
    kdrun("method=ce", "epochs=1")  # nothing to do with the failing run: must stay intact
    full_disk_at("checkpoint.pt", 2)
    capsys.readouterr()
    code, records = kdrun("method=ce", "epochs=3", "seed=1")
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 1 and "No space left on device" in err[-1] and "Traceback" not in "\n".join(err)
    failed = next(r for r in records if r["seed"] == 1)
    assert failed["status"] == "failed" and "No space left on device" in failed["error"]
    run_dir = Path(failed["run_dir"])
    state, _ = load_verified(run_dir / "checkpoint.pt")  # epoch 1's checkpoint, intact and matching its hash
    assert state["epoch"] == 1
    assert not list(kdrun.root.rglob("*.tmp"))
    assert next(r for r in records if r["seed"] == 0)["status"] == "completed"


def test_a_full_disk_when_the_result_itself_cannot_be_replaced_still_records_it(tmp_path, monkeypatch):
    from kdrun.results import read_result, write_result

    path = tmp_path / "result.json"
    write_result(path, {"status": "running"})

    def no_space(fd, data):
        os.close(fd)
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(kdrun.checkpoint, "write_and_sync", no_space)
    write_result(path, {"status": "failed", "error": "No space left on device"})
    assert read_result(path)["status"] == "failed"
    assert not list(tmp_path.glob("*.tmp"))


def test_results_dir_that_is_a_file_is_one_line_before_any_work(tmp_path, capsys):
    from conftest import FAST, run_cli

    blocker = tmp_path / "results"
    blocker.write_text("not a directory")
    code = run_cli(*FAST, f"results_dir={blocker}")
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 1 and len(err) == 1 and "is a file, not a directory" in err[0]
    assert blocker.read_text() == "not a directory"


def test_temp_files_of_killed_writers_are_removed_and_live_ones_kept(tmp_path):
    dead = tmp_path / f".checkpoint.pt.{HOST}-999999999.abc123.tmp"
    live = tmp_path / f".checkpoint.pt.{HOST}-{os.getpid()}.def456.tmp"
    dead.write_text("half")
    live.write_text("being written")
    atomic_write_text(tmp_path / "other.txt", "x")
    assert not dead.exists() and live.exists()


def test_batch_larger_than_the_training_split_is_refused(kdrun, capsys):
    code, _ = kdrun("batch_size=5000")
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "batch_size=5000" in err[0] and "1437" in err[0]
    assert not (kdrun.root / "runs").exists()


def test_a_sweep_with_a_failed_job_exits_1_with_a_summary(kdrun, capsys):
    code, results = kdrun("-m", "method.alpha=0.5,1.5")
    out = capsys.readouterr().out
    assert code == 1
    assert "sweep: 2 jobs: 1 completed, 1 failed" in out and "method.alpha=1.5" in out
    assert {r["alpha"]: r["status"] for r in results} == {0.5: "completed", 1.5: "failed"}


def test_a_sweep_reports_skipped_jobs_and_exits_0(kdrun, capsys):
    kdrun("-m", "method=ce")
    capsys.readouterr()
    code, _ = kdrun("-m", "method=ce", "seed=0,1")
    assert code == 0 and "1 completed, 1 skipped" in capsys.readouterr().out


@pytest.mark.slow
def test_a_nan_while_training_the_teacher_says_so(kdrun, capsys):
    code, _ = kdrun("optim.lr=1e12")
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 1 and "teacher resnet26" in err[-1] and "teacher.lr" in err[-1]


def test_result_records_say_which_host_and_process_ran_them(kdrun):
    _, (record,) = kdrun()
    assert record["pid"] == os.getpid() and record["host"]
    json.dumps(record)
