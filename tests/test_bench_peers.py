"""scripts/bench_peers.py runs end to end on a tiny setting: the minimal KD loop, kdrun plain and fused K=4, one
round (no timing is checked)."""
import importlib.util
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "bench_peers.py"


def load_script():
    spec = importlib.util.spec_from_file_location("bench_peers", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_bench_peers_prints_the_table(capsys, tmp_path):
    out = tmp_path / "peers.md"
    text = load_script().main(["--rounds", "1", "--steps", "2", "--warmup", "1", "--pairs", "resnet26:resnet8",
                               "--device", "cpu", "--threads", "1", "--variants", "minimal,kdrun,fused", "--out", str(out)])
    printed = capsys.readouterr().out
    assert "resnet26 -> resnet8: training images/s (median) and ratios" in printed
    assert "median images/s" in printed and "x minimal" in printed
    rows = [line.split() for line in printed.splitlines() if line.strip().startswith(("minimal ", "kdrun "))]
    assert {row[0] for row in rows} >= {"minimal", "kdrun"}
    assert any(line.strip().startswith("kdrun fused K=4") and "skipped" not in line for line in printed.splitlines())
    assert "16 jobs x 50000 images x 240 epochs" in printed
    assert "| kdrun |" in text and out.read_text() == text
