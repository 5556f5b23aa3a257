"""Every response- and feature-based method distils across model families (VGG -> MobileNetV2), end to end."""
import pytest
import torch

from conftest import run_cli, results_under
from kdrun.models import create_model

# Preliminary stages shortened to one epoch so each run stays a few seconds on digits.
METHODS = {
    "kd": [], "logits": [], "dkd": [], "nst": [], "vid": [], "ofd": [], "at": [],
    "fitnet": ["method.hint_epochs=1"], "ab": ["method.init_epochs=1"], "ft": ["method.init_epochs=1"],
}


@pytest.fixture(scope="module")
def teachers(tmp_path_factory):
    """Saved teacher weights (digits: 1 input channel, 10 classes): training them is tested elsewhere."""
    root = tmp_path_factory.mktemp("teachers")
    paths = {}
    for name in ("vgg13", "wrn_16_1"):
        torch.manual_seed(0)
        paths[name] = root / f"{name}.pt"
        torch.save({"model": create_model(name, 10, 1).state_dict()}, paths[name])
    return paths


def distil(tmp_path, teacher: str, student: str, checkpoint, *overrides: str):
    code = run_cli("epochs=1", "batch_size=128", f"results_dir={tmp_path}", f"teacher={teacher}",
                   f"student={student}", f"teacher.checkpoint={checkpoint}", *overrides)
    return code, results_under(tmp_path)


@pytest.mark.parametrize("method", METHODS)
def test_vgg13_teaches_mobilenetv2(tmp_path, teachers, method):
    code, results = distil(tmp_path, "vgg13", "mobilenetv2", teachers["vgg13"], f"method={method}",
                           "optim.lr=0.01", *METHODS[method])
    assert code == 0 and results[0]["status"] == "completed"
    assert (results[0]["teacher"], results[0]["student"]) == ("vgg13", "mobilenetv2")


def test_fsp_across_families_where_channels_match_and_refused_where_not(tmp_path, teachers, capsys):
    code, results = distil(tmp_path / "ok", "wrn_16_1", "resnet20", teachers["wrn_16_1"], "method=fsp",
                           "method.init_epochs=1", "optim.lr=0.01")
    assert code == 0 and results[0]["status"] == "completed"
    code, _ = distil(tmp_path / "refused", "vgg13", "mobilenetv2", teachers["vgg13"], "method=fsp")
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and "FSP matrices cannot be compared" in err[-1]
    assert not (tmp_path / "refused").exists()
