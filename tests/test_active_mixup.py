"""transfer=active_mixup: the official candidate pairs, mixes that are what they claim, least-confident
acquisition, queries per round within the budget, rounds kept in the run directory."""
import json
from pathlib import Path

import pytest
import torch
from torch import nn

from conftest import compose_config
from kdrun.checkpoint import load_verified
from kdrun.errors import ConfigError
from kdrun.experiment import prepare
from kdrun.methods.base import Stage
from kdrun.transfer.active_mixup import mix, pair_scores, rotation_pairs

MIXUP = ("transfer=active_mixup", "teacher.access=probabilities", "method.alpha=1", "teacher=resnet8",
         "student=resnet8", "batch_size=32", "results_dir=/nonexistent")
SMALL = ("transfer.pool_size=41", "transfer.per_round=30", "transfer.rounds=2")


@pytest.mark.parametrize("n", [5, 41])
def test_rotation_pairs_are_every_unordered_pair_once_for_odd_pools(n):
    pairs = rotation_pairs(n)
    assert len(pairs) == n * (n - 1) // 2
    assert len({tuple(sorted(p)) for p in pairs.tolist()}) == len(pairs)
    assert all(a != b for a, b in pairs.tolist())


def test_mixes_are_the_convex_combinations_they_claim():
    images = torch.randint(0, 256, (4, 1, 3, 3), dtype=torch.uint8)
    pairs = torch.tensor([[0, 1], [2, 3]])
    lambdas = torch.tensor([0.3, 0.7])
    mixed = mix(images, pairs, lambdas)
    expected = torch.stack([0.3 * images[0].float() + 0.7 * images[1].float(),
                            0.7 * images[2].float() + 0.3 * images[3].float()]).round().to(torch.uint8)
    assert torch.equal(mixed, expected)


def test_pair_scores_take_each_pairs_least_confident_lambda():
    class Confidence(nn.Module):  # confidence grows with the mean pixel: darker mixes are less sure
        def forward(self, x):
            m = x.mean((1, 2, 3))
            return torch.stack([m * 10, torch.zeros_like(m)], 1)

    images = torch.tensor([0, 200, 100, 250], dtype=torch.uint8).view(4, 1, 1, 1)
    pairs = torch.tensor([[0, 1], [2, 3]])
    lambdas = torch.tensor([0.3, 0.5, 0.7])
    score, best = pair_scores(Confidence(), images, pairs, lambdas, lambda x: x.float() / 255, "cpu")
    # pair (0, 1): the mix 0.7 * 0 + 0.3 * 200 is darkest; pair (2, 3): 0.7 * 100 + 0.3 * 250
    assert best.tolist() == pytest.approx([0.7, 0.7])
    assert score[0] < score[1]


@pytest.mark.parametrize("overrides, message", [
    (("teacher.access=full",), r"transfer=active_mixup is not allowed with teacher.access=full: .*probabilities"),
    (("transfer.pool_size=5000",), r"transfer.pool_size=5000 is not allowed: the training split of digits has 1437"),
    (("transfer.pool_size=11", "transfer.rounds=3", "transfer.per_round=20"), r"a pool of 11 offers 55 pairs"),
    (("transfer.rounds=0",), r"transfer.rounds=0 is not allowed: an integer >= 1"),
    (("transfer.lambdas=[0,0.5]",), r"transfer.lambdas=.* is not allowed: a list of mixing weights in \(0, 1\)"),
    (("transfer.acquisition=entropy",), r"transfer.acquisition=entropy is not allowed: one of least_confident, random"),
    (("teacher.query_budget=100",), r"teacher.query_budget=100 is not allowed: transfer=active_mixup as configured "
                                    r"asks the teacher about 800 images"),
    (("method=fitnet",), r"teacher.access=probabilities is not allowed with method=fitnet"),
])
def test_refusals(overrides, message):
    with pytest.raises(ConfigError, match=message):
        prepare(compose_config(*MIXUP, *overrides))


def test_multi_stage_methods_are_refused():
    """Rounds are the stages: a method with a preliminary stage does not fit them (today every such method
    also needs features, which the black box refuses first)."""
    cfg = compose_config(*MIXUP)
    plan = prepare(cfg)

    class TwoStages:
        def stages(self, epochs):
            return [Stage("init", 1), Stage("main", epochs)]

    plan.transfer.check_method(cfg, plan.method)  # kd: one stage
    with pytest.raises(ConfigError, match="not allowed with transfer=active_mixup: its stages"):
        plan.transfer.check_method(cfg, TwoStages())


def run_rounds(kdrun, *extra):
    code, records = kdrun(*MIXUP[:-1], *SMALL, "teacher.query_budget=101", "epochs=1", *extra)
    assert code == 0
    return records[-1]


def test_rounds_query_the_least_confident_mixes_within_the_budget(kdrun):
    record = run_rounds(kdrun)
    assert record["status"] == "completed"
    assert record["queries_per_round"] == [41, 30, 30] and record["teacher_queries"] == 101 <= 101
    assert record["transfer_size"] == 101
    run_dir = Path(record["run_dir"])
    rows = (run_dir / "metrics.csv").read_text().splitlines()
    header = rows[0].split(",")
    assert "round" in header and [r.split(",")[header.index("round")] for r in rows[1:]] == ["0", "1", "2"]
    pool = load_verified(run_dir / "transfer" / "round0.pt")[0]["images"]
    seen = set()
    for r in (1, 2):
        state = load_verified(run_dir / "transfer" / f"round{r}.pt")[0]
        assert torch.equal(state["images"], mix(pool, state["pairs"], state["lambdas"]))  # the mixes they claim
        assert torch.allclose(state["answers"].sum(1), torch.ones(30))  # probabilities, from the black box
        pairs = {tuple(sorted(p)) for p in state["pairs"].tolist()}
        assert not pairs & seen  # a chosen pair is never offered again
        seen |= pairs
        grid = torch.tensor([0.30 + 0.04 * i for i in range(11)])
        assert ((state["lambdas"][:, None] - grid[None]).abs().min(1).values < 1e-6).all()


def test_a_resumed_run_reads_its_rounds_back_instead_of_asking_again(kdrun):
    record = run_rounds(kdrun)
    run_dir = Path(record["run_dir"])
    before = {r: load_verified(run_dir / "transfer" / f"round{r}.pt")[0] for r in range(3)}
    # as if killed in round 2's first epoch: no epoch checkpoint of round 2, the record says interrupted
    (run_dir / "checkpoint.pt").unlink()
    record["status"] = "interrupted"
    (run_dir / "result.json").write_text(json.dumps(record))
    resumed = run_rounds(kdrun, f"resume={run_dir}")
    assert resumed["run_dir"] == str(run_dir) and resumed["status"] == "completed"
    assert resumed["teacher_queries"] == 101 and resumed["queries_per_round"] == [41, 30, 30]
    for r in range(3):
        after = load_verified(run_dir / "transfer" / f"round{r}.pt")[0]
        assert torch.equal(after["images"], before[r]["images"])


def test_random_acquisition_is_the_baseline_at_the_same_budget(kdrun):
    record = run_rounds(kdrun, "transfer.acquisition=random")
    assert record["queries_per_round"] == [41, 30, 30] and record["teacher_queries"] == 101
