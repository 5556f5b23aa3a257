"""Every transfer option trains end to end through the CLI on digits, composes with sweeps and the teacher
cache, and `kdrun compare` shows the option as a varying key."""
import pytest

from test_transfer_label_free import write_folder

SMALL = ("teacher=resnet8", "student=resnet8")


@pytest.mark.parametrize("overrides, expect", [
    (("transfer=label_free", "method.alpha=1", "transfer.labelled_fraction=0.3", "transfer.select=per_class_top",
      "transfer.per_class=20"), {"transfer": "label_free", "transfer.select": "per_class_top"}),
    (("transfer=omit_classes", "transfer.bias_shift=auto"), {"transfer": "omit_classes"}),
    (("transfer=label_free", "method.alpha=1", "teacher.access=probabilities", "teacher.query_budget=256"),
     {"teacher.access": "probabilities", "teacher_queries": 256, "transfer_size": 256}),
    (("transfer=active_mixup", "teacher.access=probabilities", "method.alpha=1", "transfer.pool_size=65", "batch_size=64",
      "transfer.per_round=64", "transfer.rounds=1"), {"queries_per_round": [65, 64], "teacher_queries": 129}),
    (("method=dkd", "teacher.access=logits"), {"teacher.access": "logits", "teacher_queries": 1437}),
])
def test_each_option_trains_end_to_end(kdrun, overrides, expect):
    code, records = kdrun(*SMALL, *overrides)
    assert code == 0
    record = records[-1]
    assert record["status"] == "completed" and len(record["class_acc"]) == 10
    assert {k: record[k] for k in expect} == expect
    if record["transfer"] == "omit_classes":
        assert record["class_acc"][3] is not None and record["omitted_acc_before_shift"] == [record["class_acc"][3]]
        assert {"bias_shift", "acc_before_shift", "acc_after_shift", "omitted_acc_after_shift"} <= set(record)


def test_other_dataset_end_to_end_and_compare_shows_the_transfer_keys(kdrun, tmp_path, capsys):
    folder = write_folder(tmp_path / "elsewhere", 150, shape=(1, 8, 8))
    assert kdrun(*SMALL, "transfer=other_dataset", f"transfer.images={folder}", "method.alpha=1")[0] == 0
    code, records = kdrun("-m", *SMALL, "transfer=omit_classes", "method=kd,ce")
    assert code == 0
    assert kdrun(*SMALL)[0] == 0
    assert len({r["teacher_sha256"] for r in records if r["teacher"]}) == 1  # one cached teacher serves every set
    by = {r["transfer"]: r for r in kdrun(*SMALL)[1]}
    assert by["other_dataset"]["transfer_size"] == 150 and by["labelled"]["transfer_size"] == 1437
    from conftest import run_cli

    capsys.readouterr()
    assert run_cli("compare", str(kdrun.root), "--format", "csv") == 0
    table = capsys.readouterr().out
    header = table.splitlines()[0].split(",")
    assert "transfer" in header  # the varying key that tells the rows apart
    assert {"other_dataset", "omit_classes", "labelled"} <= set(table.replace("\n", ",").split(","))
    assert run_cli("ls", "transfers") == 0
    assert "active_mixup" in capsys.readouterr().out


def test_a_refused_transfer_writes_nothing(kdrun):
    code, records = kdrun(*SMALL, "transfer=label_free")  # alpha 0.9: CE weight 0.1 on labels it has not
    assert code != 0 and records == []
    assert not any(kdrun.root.iterdir())
