"""One run over several processes (kdrun/distributed.py): torchrun with the gloo backend on the CPU.

The end-to-end tests start `torchrun --standalone --nproc-per-node=2` (a few seconds each, marked slow); the
checks of shares and refusals set up a pretend world in this process."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import torch

from kdrun import distributed
from kdrun.data.loader import TensorLoader
from kdrun import distributed_checks
from kdrun.data.shards import ShardedLoader
from kdrun.distributed import World
from kdrun.errors import ConfigError

from conftest import compose_config

TESTS = Path(__file__).parent
LINEAR = ["method=kd", "teacher=linear", "student=linear", "dataset=linear_teacher", "dataset.n_train=101",
          "batch_size=30", "epochs=3", "teacher.cache_outputs=false"]  # 101 = 3 x 30 + 11: the last batch splits 5 / 6
TIMING = ("epoch_s", "images_per_s")


def torchrun(cwd: Path, *args: str, script: list[str] | None = None, env: dict | None = None,
             processes: int = 2) -> subprocess.CompletedProcess:
    target = script or ["-m", "kdrun"]
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={processes}",
               *target, *args]
    return subprocess.run(command, cwd=cwd, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "OMP_NUM_THREADS": "1", **(env or {})})


def one_process(cwd: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "kdrun", *args], cwd=cwd, capture_output=True, text=True,
                          timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})


def metrics(run_dir: Path) -> pd.DataFrame:
    return pd.read_csv(run_dir / "metrics.csv").drop(columns=list(TIMING))


def files_below(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file())


@pytest.fixture
def pretend_world(monkeypatch):
    def make(rank: int = 0, size: int = 2):
        monkeypatch.setattr(distributed, "_world", World(rank, size, rank, "gloo"))
    return make


# ----- shares of a batch ---------------------------------------------------------------------------------

def test_shares_of_every_batch_are_the_single_process_batch_in_order():
    images = torch.arange(11 * 1 * 2 * 2, dtype=torch.uint8).view(11, 1, 2, 2)
    labels = torch.arange(11)

    def loader():
        return TensorLoader(images, labels, 4, (0.0,), (1.0,), train=True, crop_padding=1, seed=3)

    whole = [(x.clone(), y.clone()) for x, y, _ in loader()]
    shards = [ShardedLoader(loader(), rank, 2) for rank in range(2)]
    parts = [[(x, y, s.grad_scale) for x, y, _ in s] for s in shards]
    assert len(parts[0]) == len(parts[1]) == len(whole) == 3
    for (x, y), (x0, y0, g0), (x1, y1, g1) in zip(whole, *parts):
        assert torch.equal(torch.cat([x0, x1]), x) and torch.equal(torch.cat([y0, y1]), y)
        # DDP averages the two gradients of share means: with the shares' factors, each image weighs 1 / N
        for g, share in ((g0, y0), (g1, y1)):
            assert g / (2 * len(share)) == pytest.approx(1 / len(y))
    assert [len(p[2][1]) for p in parts] == [1, 2]  # the last batch of 3 splits 1 / 2
    assert shards[0].num_samples == 11  # the whole loader's figures: images/s, class counts


def test_an_image_folder_decodes_only_its_share_of_each_batch(tmp_path):
    """Shuffled as one process shuffles, then each process's sampler keeps its contiguous share of the indices."""
    from test_datasets import write_folder

    from kdrun.data import load_dataset
    from kdrun.data.loader import make_loaders
    from omegaconf import OmegaConf

    write_folder(tmp_path, per_class=(4, 3), sizes=((16, 16),))  # 12 training images; 9 test: the last batch is 1
    cfg = OmegaConf.create({"name": "imagefolder", "root": str(tmp_path), "image_size": 16, "crop_padding": 0,
                            "hflip": False, "workers": 0})
    data = load_dataset(cfg)

    def loaders():
        return make_loaders(data, batch_size=4, device="cpu", seed=5, eval_batch_size=4)

    def shares(split: int) -> list[list]:
        parts = []
        for rank in range(2):
            loader = loaders()[split]
            loader.take_share(rank, 2)
            parts.append([(x, i, loader.grad_scale) for x, _, i in loader])
        assert loader.sharded and loader.num_samples == (12, 9)[split]  # the whole split's count
        return parts

    train = [(x, i) for x, _, i in loaders()[0]]
    rank0, rank1 = shares(0)
    assert len(rank0) == len(rank1) == len(train) == 3
    for (x, i), (x0, i0, g0), (x1, i1, g1) in zip(train, rank0, rank1):
        assert torch.equal(torch.cat([i0, i1]), i) and torch.equal(torch.cat([x0, x1]), x)
        assert g0 == g1 == 1.0
    test0, test1 = shares(1)  # batches of 4, 4, 1: rank 0's share of the last one is empty, and left out
    assert [len(i) for _, i, _ in test0] == [2, 2] and [len(i) for _, i, _ in test1] == [2, 2, 1]
    seen = torch.cat([i for _, i, _ in test0 + test1])
    assert sorted(seen.tolist()) == list(range(9))


def test_a_last_batch_too_small_to_share_is_refused(pretend_world):
    pretend_world(0, 2)
    cfg = compose_config(*LINEAR, "batch_size=25")
    with pytest.raises(ConfigError, match="last batch of an epoch has 1 of the 101 training images"):
        distributed_checks.check_shares(cfg, 101)
    distributed_checks.check_shares(compose_config(*LINEAR), 101)


@pytest.mark.parametrize("overrides, message", [
    (["method=crd"], "method=crd cannot train over 2 processes: its memory banks"),
    (["method=cskd"], "method=cskd cannot train over 2 processes"),
    (["method=mlkd"], "method=mlkd cannot train over 2 processes"),
    (["method.dot=true"], "method.dot=true"),
    (["transfer=label_free", "+transfer.unlabelled=x"], "transfer=label_free"),
    (["teacher.cache_outputs=true"], "teacher.cache_outputs=true"),
    (["compile=true"], "compile=true"),
    (["batch_size=1"], "batch_size=1 is the global batch"),
    (["eval_batch_size=1"], "eval_batch_size=1 is shared by the 2 processes"),
    (["ddp.sync_bn=true"], "ddp.sync_bn=true needs CUDA"),
])
def test_what_cannot_run_over_processes_is_refused_in_one_line(pretend_world, overrides, message):
    from kdrun.experiment import configure

    pretend_world(0, 2)
    cfg = compose_config(*overrides)
    method_cls = configure(cfg)
    with pytest.raises(ConfigError, match=message.replace(".", r"\.").replace("(", r"\(")) as err:
        distributed_checks.check_ddp_config(cfg, method_cls, torch.device("cpu"))
    assert "\n" not in str(err.value)


@pytest.mark.parametrize("key, message", [("ddp.sync_bn=yes", "ddp.sync_bn=yes is not allowed: true or false"),
                                          ("ddp.backend=mpi", "ddp.backend=mpi is not allowed: one of auto, gloo, nccl"),
                                          ("ddp.timeout_min=0", "ddp.timeout_min=0 is not allowed")])
def test_bad_ddp_keys_are_refused_even_in_one_process(kdrun, capsys, key, message):
    code, results = kdrun(key)
    lines = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and results == [] and len(lines) == 1 and lines[0].startswith(f"kdrun: error: {message}")


def test_sync_bn_converts_plain_batch_norms_and_refuses_the_others():
    import timm

    from kdrun.models import create_model

    converted = distributed_checks.sync_batchnorm(create_model("resnet8", 10, 1), "resnet8")
    kinds = {type(m) for m in converted.modules()}
    assert torch.nn.SyncBatchNorm in kinds and torch.nn.BatchNorm2d not in kinds
    with pytest.raises(ConfigError, match=r"not available for student=timm/efficientnet_b0: its bn1 is a BatchNormAct2d"):
        distributed_checks.sync_batchnorm(timm.create_model("efficientnet_b0", num_classes=10), "timm/efficientnet_b0")


def test_a_single_process_run_hashes_as_before(pretend_world):
    from kdrun.run_record import config_hash

    cfg = compose_config("method=kd")
    alone = config_hash(cfg)
    assert config_hash(compose_config("method=kd", "ddp.timeout_min=5", "ddp.backend=gloo")) == alone
    pretend_world(0, 2)
    assert config_hash(cfg) != alone  # two processes' batch norms see halves of each batch: not a twin


# ----- end to end over two processes ----------------------------------------------------------------------

@pytest.mark.slow
def test_two_processes_write_the_metrics_one_process_writes(tmp_path):
    """A model without batch statistics: the two runs are the same computation, up to float rounding (the last
    batch of each epoch splits unevenly, 5 / 6)."""
    alone = one_process(tmp_path, *LINEAR, "results_dir=res", "run_dir=res/alone")
    assert alone.returncode == 0, alone.stderr[-2000:]
    shared = torchrun(tmp_path, *LINEAR, "results_dir=res", "run_dir=res/shared")
    assert shared.returncode == 0, shared.stderr[-3000:]
    a, b = metrics(tmp_path / "res/alone"), metrics(tmp_path / "res/shared")
    assert list(a.columns) == list(b.columns) and len(a) == 3
    pd.testing.assert_frame_equal(a, b, check_exact=False, rtol=1e-5, atol=1e-6)
    record = json.loads((tmp_path / "res/shared/result.json").read_text())
    assert record["status"] == "completed" and record["world_size"] == 2
    assert record["teacher_queries"] == json.loads((tmp_path / "res/alone/result.json").read_text())["teacher_queries"]
    # written once: the shared run's directory holds what the single run's holds, nothing twice, no leftovers
    assert files_below(tmp_path / "res/shared") == files_below(tmp_path / "res/alone")
    assert len(list((tmp_path / "res/teachers").glob("linear_*/checkpoint.pt"))) == 1


@pytest.mark.slow
def test_a_killed_process_ends_the_run_and_it_resumes(tmp_path):
    """Rank 1 dies (SIGKILL) in the second epoch's third step; torchrun ends rank 0; the run is recorded
    incomplete, and the same command resumes it after epoch 1 to the metrics of an uninterrupted run. The
    teacher is trained by rank 0 inside the first torchrun while rank 1 waits."""
    common = ["method=kd", "teacher=resnet8", "student=resnet8", "epochs=3", "teacher.epochs=1", "batch_size=128",
              "teacher.cache_outputs=false", "results_dir=res"]
    killed = torchrun(tmp_path, "batch=15", *common, "run_dir=res/killed",  # 12 steps an epoch
                      script=[str(TESTS / "kill_at.py")], env={"KILL_RANK": "1"})
    assert killed.returncode != 0
    record = json.loads((tmp_path / "res/killed/result.json").read_text())
    assert record["status"] in ("failed", "interrupted", "running")
    assert len(pd.read_csv(tmp_path / "res/killed/metrics.csv")) >= 1
    assert len(list((tmp_path / "res/teachers").glob("resnet8_*/checkpoint.pt"))) == 1

    resumed = torchrun(tmp_path, *common, "run_dir=res/killed")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resuming" in resumed.stderr
    whole = torchrun(tmp_path, *common, "run_dir=res/whole")
    assert whole.returncode == 0, whole.stderr[-3000:]
    record = json.loads((tmp_path / "res/killed/result.json").read_text())
    assert record["status"] == "completed" and record["resumed_after_epoch"] >= 1
    pd.testing.assert_frame_equal(metrics(tmp_path / "res/killed"), metrics(tmp_path / "res/whole"),
                                  check_exact=False, rtol=1e-4, atol=1e-4)


@pytest.mark.slow
def test_a_signal_to_one_process_stops_all_of_them_at_the_same_step_and_the_run_resumes(tmp_path):
    """Rank 1 alone gets SIGTERM in its 15th step (the second epoch of 10 steps); both stop at the same point (the
    next check every process makes: here the start of epoch 3), none is left waiting in a gradient reduction, the
    run is recorded interrupted after epoch 2, and the same command resumes it."""
    common = [*LINEAR, "dataset.n_train=200", "batch_size=20", "epochs=3", "results_dir=res", "run_dir=res/run"]
    stopped = torchrun(tmp_path, "batch_sigterm=15", *common, script=[str(TESTS / "kill_at.py")],
                       env={"KILL_RANK": "1"})
    assert stopped.returncode != 0
    record = json.loads((tmp_path / "res/run/result.json").read_text())
    assert record["status"] == "interrupted", record.get("error")
    assert len(pd.read_csv(tmp_path / "res/run/metrics.csv")) == 2
    resumed = torchrun(tmp_path, *common)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    record = json.loads((tmp_path / "res/run/result.json").read_text())
    assert record["status"] == "completed" and record["resumed_after_epoch"] == 2
    assert len(pd.read_csv(tmp_path / "res/run/metrics.csv")) == 3


@pytest.mark.slow
def test_a_refusal_that_rank_0_finds_reaches_every_process(tmp_path):
    """The run directory is rank 0's decision: a run_dir holding another configuration is one line from it, and the
    others stop with it rather than wait for a directory."""
    first = one_process(tmp_path, *LINEAR, "results_dir=res", "run_dir=res/taken")
    assert first.returncode == 0, first.stderr[-2000:]
    refused = torchrun(tmp_path, *LINEAR, "epochs=2", "results_dir=res", "run_dir=res/taken")
    assert refused.returncode != 0
    lines = [line for line in refused.stderr.splitlines() if "kdrun: error:" in line]
    assert len(lines) == 1 and lines[0].startswith("kdrun: error:") and "run_dir=" in lines[0]


@pytest.mark.slow
def test_published_weights_are_fetched_by_rank_0_and_its_failure_reaches_the_others(tmp_path):
    """Offline: rank 0's download of a student's published weights fails in one line; rank 1 stops with rank 0's
    error instead of trying the download itself (or waiting)."""
    offline = {"TORCH_HOME": str(tmp_path / "torch"), "https_proxy": "http://127.0.0.1:9",
               "HTTPS_PROXY": "http://127.0.0.1:9", "no_proxy": "", "NO_PROXY": ""}
    result = torchrun(tmp_path, "method=ce", "student=torchvision/resnet18", "student.pretrained=true",
                      "results_dir=res", env=offline)
    assert result.returncode != 0
    errors = [line for line in result.stderr.splitlines() if "kdrun: error:" in line]
    assert len(errors) == 1 and errors[0].startswith("kdrun: error: student.pretrained=true cannot load")
    assert any(line.startswith("[rank 1]") and "rank 0 failed" in line for line in result.stderr.splitlines())
    assert not (tmp_path / "res").exists()


@pytest.mark.slow
def test_a_sweep_under_torchrun_is_refused(tmp_path):
    result = torchrun(tmp_path, "-m", "method=ce,kd", "results_dir=res")
    assert result.returncode != 0
    assert "a sweep (-m) cannot run under torchrun" in result.stderr
    assert not (tmp_path / "res").exists()
