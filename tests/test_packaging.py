"""The shipped configs travel inside the package: an installed kdrun finds them from any directory."""
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def test_console_script_finds_configs_from_another_directory(tmp_path):
    kdrun = shutil.which("kdrun") or pytest.skip("kdrun console script not installed")
    out = subprocess.run([kdrun, "--cfg", "job", "method=ce"], cwd=tmp_path, capture_output=True, text=True,
                         check=True).stdout
    assert "name: ce" in out and "name: digits" in out


def test_wheel_ships_conf_and_runs_from_anywhere(tmp_path):
    pytest.importorskip("hatchling")
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
                    "-w", str(tmp_path / "dist"), str(ROOT)], check=True)
    wheel = next((tmp_path / "dist").glob("kdrun-*.whl"))
    names = zipfile.ZipFile(wheel).namelist()
    for shipped in ("kdrun/conf/config.yaml", "kdrun/conf/method/kd.yaml", "kdrun/conf/dataset/digits.yaml",
                    "kdrun/conf/optim/sgd.yaml"):
        assert shipped in names, shipped
    site = tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", str(site), str(wheel)],
                   check=True)
    env = {**os.environ, "PYTHONPATH": str(site)}
    script = ("import sys, kdrun, kdrun.paths; print(kdrun.__file__); print(kdrun.paths.conf_dir()); "
              "sys.argv = ['kdrun', '--cfg', 'job', 'student=resnet14']; from kdrun.cli import main; main()")
    out = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, env=env, capture_output=True, text=True,
                         check=True).stdout.splitlines()
    assert out[0].startswith(str(site)) and out[1].startswith(str(site)), out[:2]
    assert "  name: resnet14" in out
