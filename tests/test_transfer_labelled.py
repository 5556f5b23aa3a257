"""transfer=labelled, the default: the runner's behaviour as before the transfer group, bit for bit."""
import csv
import json
import platform
from pathlib import Path

import pytest
import torch

from conftest import compose_config
from kdrun.data import load_dataset, make_loaders
from kdrun.experiment import config_hash
from kdrun.teachers import teacher_cache_dir, teacher_identity
from kdrun.transfer import build_transfer
from kdrun.transfer.runtime import student_loaders

DATA = Path(__file__).parent / "data"
GOLDEN = json.loads((DATA / "kd_digits_before_transfer.json").read_text())
TIMING = {"epoch_s", "images_per_s"}


def read_rows(path: Path) -> list[dict]:
    with open(path) as f:
        return list(csv.DictReader(f))


def this_cpu() -> str:
    """The CPU's vector ISA as torch dispatches to it, and its model name."""
    info = Path("/proc/cpuinfo")
    lines = info.read_text().splitlines() if info.exists() else []
    model = next((line.split(":", 1)[1].strip() for line in lines if line.startswith("model name")),
                 platform.processor())
    return f"{torch.backends.cpu.get_cpu_capability()} {model}"


def test_default_run_writes_the_metrics_it_wrote_before_the_transfer_group(kdrun):
    """Same overrides as the recorded run: every column it had holds the same text (floats written by repr,
    so equal text is equal bits); only the new columns (per-class accuracy, teacher queries) are added."""
    if torch.__version__ != GOLDEN["torch"]:
        pytest.skip(f"the recorded metrics come from torch {GOLDEN['torch']}; float results of another build "
                    f"({torch.__version__}) differ in the last bits")
    here = this_cpu()
    recorded = next((r for r in GOLDEN["recorded"] if r["cpu"] == here), None)
    if recorded is None:  # the CPU's kernels (ISA, vendor) change the last bits of convolutions
        pytest.skip(f"the metrics were recorded on {', '.join(str(r['cpu']) for r in GOLDEN['recorded'])}, "
                    f"not on this CPU ({here})")
    code, records = kdrun(*GOLDEN["overrides"], fast=False)
    assert code == 0
    run_dir = Path(records[0]["run_dir"])
    for mine, theirs in ((run_dir / "metrics.csv", DATA / recorded["student"]),
                         (next((kdrun.root / "teachers").glob("*/metrics.csv")), DATA / recorded["teacher"])):
        now, before = read_rows(mine), read_rows(theirs)
        assert len(now) == len(before)
        for row_now, row_before in zip(now, before):
            assert {k: v for k, v in row_before.items() if k not in TIMING} == \
                   {k: row_now[k] for k in row_before if k not in TIMING}
    assert {f"test_acc_class{k}" for k in range(10)} <= set(now[0])


def test_default_transfer_keeps_the_config_hash_and_teacher_cache_key():
    """Runs and cached teachers made before the transfer group still match (resume, skip_completed, cache)."""
    cfg = compose_config(*GOLDEN["overrides"])
    assert config_hash(cfg) == "049d6ae8c691e488"
    assert teacher_cache_dir(cfg).name == "resnet8_digits_fb73b54c10e4"
    assert "train_subset" not in teacher_identity(cfg)
    assert config_hash(compose_config(*GOLDEN["overrides"], "transfer.labelled_fraction=0.5")) != config_hash(cfg)


def test_labelled_transfer_batches_are_the_datasets_own():
    cfg = compose_config("batch_size=64")
    data = load_dataset(cfg.dataset)
    transfer = build_transfer(cfg, data)
    ours, _ = student_loaders(transfer, data, 64, "cpu", 3, 512)
    theirs, _ = make_loaders(data, 64, "cpu", 3, 512)
    for (a, la, ia), (b, lb, ib) in zip(ours, theirs):
        assert torch.equal(a, b) and torch.equal(la, lb) and torch.equal(ia, ib)
    assert transfer.record == {"transfer": "labelled", "transfer.labelled_fraction": 1.0, "transfer.split_seed": 0,
                               "transfer_size": 1437}


def test_labelled_fraction_is_stratified_and_keys_the_teacher():
    cfg = compose_config("transfer.labelled_fraction=0.1")
    data = load_dataset(cfg.dataset)
    transfer = build_transfer(cfg, data)
    counts = torch.bincount(transfer.labels, minlength=10)
    full = torch.bincount(data.train_labels, minlength=10)
    assert torch.all((counts - 0.1 * full).abs() <= 1)
    assert transfer.teacher_data.train_labels.tolist() == transfer.labels.tolist()  # teacher and student alike
    assert teacher_identity(cfg)["train_subset"] == {"labelled_fraction": 0.1, "split_seed": 0}
    other = compose_config("transfer.labelled_fraction=0.1", "transfer.split_seed=1")
    assert teacher_cache_dir(other) != teacher_cache_dir(cfg)
    assert not torch.equal(build_transfer(other, data).images, transfer.images)


@pytest.mark.parametrize("value", [0, 1.5, -0.1, "half"])
def test_labelled_fraction_out_of_range_is_refused(value):
    cfg = compose_config(f"transfer.labelled_fraction={value}")
    with pytest.raises(Exception, match=r"transfer.labelled_fraction=.* is not allowed: a fraction in \(0, 1\]"):
        build_transfer(cfg, load_dataset(cfg.dataset))
