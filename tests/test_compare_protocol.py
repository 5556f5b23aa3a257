"""`kdrun compare --protocol`: per row the augmentation, epochs, batch, the recipe's statistic and the method
keys changed from their shipped defaults; without the flag, a note when rows differ in protocol."""
from __future__ import annotations

from compare_data import compare, compare_csv, record, results, row, write_run  # noqa: F401


def test_protocol_columns_show_the_facts_of_each_row(results, capsys):
    root = results
    for seed in range(2):
        write_run(root, record("kd", "resnet20", seed, best_acc=80.0, last_acc=79.0, epochs=240, batch_size=128,
                               T=2.0, alpha=0.9, augmentation="crop pad 4 + flip", compare_metric="last_acc",
                               **{"method.logit_standardize": True, "method.base_T": 2.0, "method.ls_weight": 9.0}))
    table = compare_csv(capsys, str(root), "--protocol")
    plain = row(table, method="kd", student="resnet8")
    assert plain["protocol.augmentation"] == "-" and plain["protocol.epochs"] == 3
    assert plain["protocol.batch"] == 64 and plain["protocol.statistic"] == "best"
    assert plain["protocol.changed keys"] == "none"
    ls = row(table, method="kd", student="resnet20")
    assert ls["protocol.augmentation"] == "crop pad 4 + flip" and ls["protocol.epochs"] == 240
    assert ls["protocol.batch"] == 128 and ls["protocol.statistic"] == "last"
    assert ls["protocol.changed keys"] == "logit_standardize=True base_T=2 ls_weight=9"


def test_without_the_flag_a_note_names_what_differs(results, capsys):
    write_run(results, record("kd", "resnet20", 0, best_acc=80.0, last_acc=79.0, epochs=240))
    code, out, _ = compare(capsys, str(results))
    assert code == 0 and "the rows differ in protocol (epochs); kdrun compare --protocol" in " ".join(out.split())
    assert "changed keys" not in out


def test_no_note_when_every_row_shares_the_protocol(results, capsys):
    code, out, _ = compare(capsys, str(results))
    assert code == 0 and "differ in protocol" not in out


def test_the_table_and_markdown_show_the_columns(results, capsys):
    code, out, _ = compare(capsys, str(results), "--protocol", "--format", "markdown")
    header, rule = out.splitlines()[:2]
    assert code == 0 and header.endswith("| augmentation | epochs | batch | statistic | changed keys |")
    assert rule.endswith("| --- | ---: | ---: | --- | --- |")
    code, out, _ = compare(capsys, str(results), "--protocol")
    assert code == 0 and "statistic" in out and "changed keys" in out


def test_records_without_the_augmentation_do_not_make_a_protocol_difference(results, capsys):
    for seed in range(2):  # the kd resnet8 configuration again, recorded with its augmentation
        write_run(results, record("kd", "resnet8", seed + 10, best_acc=94.0, last_acc=93.0,
                                  augmentation="crop pad 1"))
    code, out, _ = compare(capsys, str(results))
    assert code == 0 and "differ in protocol" not in out
    table = compare_csv(capsys, str(results), "--protocol")
    assert row(table, method="kd", student="resnet8")["protocol.augmentation"] == "crop pad 1"
    assert row(table, method="ce", student="resnet8")["protocol.augmentation"] == "-"
