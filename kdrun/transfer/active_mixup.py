"""`transfer=active_mixup` (Wang et al., CVPR 2020, "Neural Networks Are More Productive Teachers Than Human
Raters: Active Mixup for Data-Efficient Knowledge Distillation from a Blackbox Model"; official code
dwang181/active-mixup), with a black-box teacher (`teacher.access=probabilities`).

Round 0: `transfer.pool_size` images of the training split, drawn without their labels, are sent to the
teacher and the student trains on them. Each later round scores every candidate mixup
`lambda x_i + (1 - lambda) x_j` (pairs by the official code's index rotation, each pair at every lambda of
`transfer.lambdas`; a pair's score is its lowest student max-probability over the lambdas, at that lambda),
sends the `transfer.per_round` least confident to the teacher, adds them, and trains again: from the initial
weights (`transfer.retrain=scratch`, as the official code builds a new student each round) or on from the
last round's (`continue`). A chosen pair is never offered again. `transfer.acquisition=random` draws pairs and
lambdas at random instead (the baseline at the same number of queries)."""
from __future__ import annotations

import copy
from dataclasses import dataclass, field

import torch

from kdrun.errors import ConfigError
from kdrun.methods.base import Stage
from kdrun.transfer.base import NO_LABEL, TransferSet, positive_int, require_in_memory
from kdrun.transfer.registry import register_transfer

ACQUISITIONS = ("least_confident", "random")
RETRAINS = ("scratch", "continue")
SCORE_BATCH = 2048


def rotation_pairs(n: int) -> torch.Tensor:
    """The official code's candidate pairs: (k, k - i - 1 mod n) for i < (n - 1) // 2, every k: each unordered
    pair once (for odd n; for even n the pairs at distance n / 2 are left out), P x 2."""
    k = torch.arange(n)
    shifts = torch.arange(1, (n - 1) // 2 + 1)
    partner = (k[None, :] - shifts[:, None]) % n
    return torch.stack([k.expand_as(partner), partner], dim=2).reshape(-1, 2)


def mix(images: torch.Tensor, pairs: torch.Tensor, lambdas: torch.Tensor) -> torch.Tensor:
    """uint8 mixups `round(lambda x_i + (1 - lambda) x_j)`, one per pair (lambdas: one per pair)."""
    lam = lambdas.view(-1, 1, 1, 1).float()
    mixed = lam * images[pairs[:, 0]].float() + (1 - lam) * images[pairs[:, 1]].float()
    return mixed.round().clamp(0, 255).to(torch.uint8)


@torch.no_grad()
def pair_scores(student, images: torch.Tensor, pairs: torch.Tensor, lambdas: torch.Tensor, normalise, device
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """Per pair: the student's lowest max-probability over the lambdas, and the lambda that gives it."""
    was_training = student.training
    student.eval()
    scores = torch.empty(len(pairs), len(lambdas))
    for j, lam in enumerate(lambdas.tolist()):
        for start in range(0, len(pairs), SCORE_BATCH):
            chunk = pairs[start:start + SCORE_BATCH]
            batch = mix(images, chunk, torch.full((len(chunk),), lam)).to(device)
            probs = torch.softmax(student(normalise(batch)).float(), dim=1)
            scores[start:start + len(chunk), j] = probs.max(1).values.cpu()
    student.train(was_training)
    best, which = scores.min(1)
    return best, lambdas[which]


@dataclass(eq=False)
class ActiveMixupSet(TransferSet):
    """The pool, the queried images so far (round by round) and the pairs still on offer."""

    pool: torch.Tensor | None = None      # uint8 images drawn from the training split, their labels unread
    pairs: torch.Tensor | None = None     # P x 2 candidate pairs of pool indices
    lambdas: torch.Tensor | None = None   # the mixing weights each pair is tried at
    rounds: int = 0
    per_round: int = 0
    acquisition: str = "least_confident"
    retrain: str = "scratch"
    available: torch.Tensor | None = None  # P booleans: pairs not chosen yet
    round_sizes: list = field(default_factory=list)
    parts: list = field(default_factory=list)         # each round's images
    answer_parts: list = field(default_factory=list)  # each round's answers
    all_answers: torch.Tensor | None = None
    initial_state: dict | None = None     # the method as built: where each round starts under retrain=scratch

    cuttable = False
    labels_up_front = False  # asked round by round
    fixed_images = False  # each round adds mixups chosen by the student as it is

    def planned_queries(self) -> int:
        return len(self.pool) + self.rounds * self.per_round

    def check_method(self, cfg, method) -> None:
        if len(method.stages(cfg.epochs)) > 1:
            raise ConfigError(f"method={cfg.method.name} is not allowed with transfer=active_mixup: its stages (a "
                              "preliminary stage) do not fit the rounds; use a single-stage method such as kd")

    def bind(self, method) -> None:
        self.initial_state = copy.deepcopy(method.state_dict())

    def stages(self, method_stages: list[Stage], epochs: int) -> list[Stage]:
        return [Stage(f"round{r}", epochs) for r in range(self.rounds + 1)]

    def stage_hook(self, run):
        return lambda index, stage, fresh: self.begin_round(index, fresh, run)

    def annotate(self, row: dict) -> None:
        row["round"] = int(row["stage"].removeprefix("round"))

    def begin_round(self, r: int, fresh: bool, run) -> None:
        """Round r's queried images join the set: read back from the run directory when an earlier attempt
        asked for them, else chosen with the student as it is now and sent to the teacher."""
        if r < len(self.round_sizes):  # already in the set (a replayed round)
            return
        stored = run.load(f"round{r}")
        if stored is None:
            images, pair_index, lambdas = self.choose(r, run)
            answers = run.answers(images).float().cpu()
            stored = {"images": images, "pair_index": pair_index, "pairs": self.pairs[pair_index],
                      "lambdas": lambdas, "answers": answers, "queries": run.queries}
            run.save(f"round{r}", stored)
        else:
            run.queries_before = int(stored["queries"]) - run.client.queries
        self.add_round(stored)
        if fresh and r > 0 and self.retrain == "scratch":
            run.method.load_state_dict(self.initial_state)
        run.method.use_teacher_answers(run.client.as_logits(self.all_answers.to(run.settings.device)))
        run.refresh_loader()
        run.notes["queries_per_round"] = list(self.round_sizes)

    def choose(self, r: int, run) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Round r's images, the indices of their pairs and their lambdas (round 0: the pool itself)."""
        if r == 0:
            return self.pool, torch.empty(0, dtype=torch.long), torch.empty(0)
        remaining = torch.nonzero(self.available).flatten()
        if self.acquisition == "random":
            generator = torch.Generator().manual_seed(int(run.cfg.seed) * 1000 + r)
            picked = remaining[torch.randperm(len(remaining), generator=generator)[:self.per_round]]
            lambdas = self.lambdas[torch.randint(len(self.lambdas), (len(picked),), generator=generator)]
        else:
            from kdrun.data.augment import normalize

            data = self.teacher_data
            c = data.in_channels
            device = run.settings.device
            mean = torch.tensor(data.mean, device=device).view(1, c, 1, 1)
            std = torch.tensor(data.std, device=device).view(1, c, 1, 1)
            score, best_lambda = pair_scores(run.method.student, self.pool, self.pairs[remaining], self.lambdas,
                                             lambda x: normalize(x, mean, std), device)
            order = torch.argsort(score, stable=True)[:self.per_round]
            picked, lambdas = remaining[order], best_lambda[order]
        return mix(self.pool, self.pairs[picked], lambdas), picked, lambdas

    def add_round(self, stored: dict) -> None:
        """Round images join the set; their pairs are no longer on offer (also when read back on resume)."""
        self.round_sizes.append(len(stored["images"]))
        self.available[stored["pair_index"]] = False
        self.parts.append(stored["images"])
        self.answer_parts.append(stored["answers"])
        self.images = torch.cat(self.parts)
        self.labels = torch.full((len(self.images),), NO_LABEL, dtype=torch.long)
        self.all_answers = torch.cat(self.answer_parts)
        self.record.update(transfer_size=len(self.images))


def lambdas_of(cfg) -> torch.Tensor:
    values = cfg.transfer.get("lambdas")
    values = list(values) if values is not None and not isinstance(values, (str, int, float)) else None
    if not values or not all(isinstance(v, (int, float)) and not isinstance(v, bool) and 0 < v < 1 for v in values):
        raise ConfigError(f"transfer.lambdas={cfg.transfer.get('lambdas')} is not allowed: a list of mixing weights "
                          "in (0, 1), e.g. [0.3,0.5,0.7]")
    return torch.tensor(sorted(set(float(v) for v in values)))


@register_transfer("active_mixup", "Active Mixup: a black box asked about the mixups the student is least sure of")
def build(cfg, data) -> TransferSet:
    require_in_memory(cfg, data, "active_mixup")
    if str(cfg.teacher.get("access", "full")) != "probabilities":
        raise ConfigError(f"transfer=active_mixup is not allowed with teacher.access={cfg.teacher.get('access')}: "
                          "its teacher is a black box, give teacher.access=probabilities")
    pool_size = positive_int(cfg, "pool_size", 2)
    n_train = len(data.train_labels)
    if pool_size > n_train:
        raise ConfigError(f"transfer.pool_size={pool_size} is not allowed: the training split of "
                          f"{cfg.dataset.name} has {n_train} images")
    rounds, per_round = positive_int(cfg, "rounds"), positive_int(cfg, "per_round")
    for key, allowed in (("acquisition", ACQUISITIONS), ("retrain", RETRAINS)):
        if cfg.transfer.get(key) not in allowed:
            raise ConfigError(f"transfer.{key}={cfg.transfer.get(key)} is not allowed: one of {', '.join(allowed)}")
    generator = torch.Generator().manual_seed(int(cfg.transfer.get("split_seed", 0)))
    pool = data.train_images[torch.sort(torch.randperm(n_train, generator=generator)[:pool_size]).values]
    pairs = rotation_pairs(pool_size)
    if rounds * per_round > len(pairs):
        raise ConfigError(f"transfer.rounds={rounds} x transfer.per_round={per_round} is not allowed: a pool of "
                          f"{pool_size} offers {len(pairs)} pairs")
    return ActiveMixupSet("active_mixup", pool, torch.full((pool_size,), NO_LABEL, dtype=torch.long), data,
                          has_labels=False, record={"transfer_pool_images": pool_size,
                                                    "transfer_candidate_pairs": len(pairs)},
                          pool=pool, pairs=pairs, lambdas=lambdas_of(cfg), rounds=rounds, per_round=per_round,
                          acquisition=cfg.transfer.acquisition, retrain=cfg.transfer.retrain,
                          available=torch.ones(len(pairs), dtype=torch.bool))
