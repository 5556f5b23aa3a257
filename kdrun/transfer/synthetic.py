"""`transfer=synthetic`: a data-free transfer set, images synthesised from the teacher alone
(`transfer.synth=gaussian|inception|bn_stats|deepinversion`, see `kdrun/transfer/synth/`). The student never
sees a real training image and gets no label (kd with `method.alpha=1`); it is tested on the real test split.
The teacher is the one the dataset's training split gives (cached, checkpointed or trained first): data-free
means the student's side.

The set is generated after the teacher is resolved, on the training device, and cached under
`<results_dir>/transfer_sets/synthetic_<synth>_<dataset>_<hash>/` (see `synth/cache.py`; the sample grid is
`samples.png` there). `transfer.competition=true` (Adaptive DeepInversion, deepinversion only) trains in
`transfer.rounds` + 1 rounds: round 0 on the cached DeepInversion set, then before each later round
`transfer.round_images` images made with ADI's competition term against the student as it is join the set;
they are kept in the run directory (`transfer/synthetic_round<r>.pt`), so a resumed run reads them back."""
from __future__ import annotations

import time
from pathlib import Path

import torch

from kdrun.errors import ConfigError
from kdrun.methods.base import Stage
from kdrun.progress import console
from kdrun.transfer.base import NO_LABEL, TransferSet, positive_int, require_in_memory
from kdrun.transfer.registry import register_transfer
from kdrun.transfer.synth import SYNTHESES, GenerationParams, Synthesis, bn_layers, synthesise
from kdrun.transfer.synth.cache import CACHE_FORMAT, GRID, SyntheticCache, entry_dir, write_grid


def freeze_student_bn(method) -> None:
    """A `train_mode_hooks` entry: the student's BN layers normalise with (and keep) their running statistics
    in training too (Haroush et al.'s Gaussian scheme)."""
    from torch.nn.modules.batchnorm import _BatchNorm

    if hasattr(method.student, "freeze_bn"):  # a quantization-aware student: its exported graph's own switch
        method.student.freeze_bn()
        return
    for module in method.student.modules():
        if isinstance(module, _BatchNorm):
            module.eval()


class SyntheticSet(TransferSet):
    """Placeholder images (zeros) until `after_teacher` generates or reads back the set."""

    synthesis: Synthesis
    params: GenerationParams
    count: int
    shape: tuple[int, int, int]
    freeze_bn: bool
    competition: bool
    rounds: int
    round_images: int

    cuttable = False

    @property
    def fixed_images(self) -> bool:
        return not self.competition  # ADI's rounds add images made against the student as it trains

    # ----- the contract -------------------------------------------------------------------------------
    def check_method(self, cfg, method) -> None:
        teacher = method.teacher
        if teacher is not None and self.synthesis.needs_bn and not bn_layers(teacher):
            raise ConfigError(f"transfer.synth={self.synthesis.name} is not allowed with teacher={cfg.teacher.name}: "
                              "it matches the teacher's batch-norm statistics and this teacher has no BatchNorm "
                              "layer with running statistics; use transfer.synth=gaussian or inception")
        if self.competition and len(method.stages(cfg.epochs)) > 1:
            raise ConfigError(f"method={cfg.method.name} is not allowed with transfer.competition=true: its stages (a "
                              "preliminary stage) do not fit the regeneration rounds; use a single-stage method "
                              "such as kd")

    def bind(self, method) -> None:
        if self.freeze_bn:
            method.train_mode_hooks.append(freeze_student_bn)

    def stages(self, method_stages: list[Stage], epochs: int) -> list[Stage]:
        if not self.competition:
            return method_stages
        return [Stage(f"round{r}", epochs) for r in range(self.rounds + 1)]

    def stage_hook(self, run):
        if not self.competition:
            return None
        return lambda index, stage, fresh: self.begin_round(index, run)

    def annotate(self, row: dict) -> None:
        if self.competition:
            row["round"] = int(row["stage"].removeprefix("round"))

    def cache_name(self, cfg, teacher_sha256: str) -> str:
        """The entry's folder under `<results_dir>/transfer_sets/` (for a runtime that asks the option)."""
        return self.cache_path(cfg, teacher_sha256).name

    def cache_path(self, cfg, teacher_sha256: str) -> Path:
        identity = generation_identity(cfg, self, teacher_sha256)
        return entry_dir(cfg.results_dir, self.synthesis.name, cfg.dataset.name, identity)

    def after_teacher(self, run, settings, cache_dir) -> None:
        """Read the set from its cache entry, or generate it there (under the entry's lock). The entry is
        keyed here (`cache_path`), whatever `cache_dir` the runtime passes."""
        from kdrun.teachers import locked

        cache = SyntheticCache(self.cache_path(run.cfg, run.teacher_sha),
                               generation_identity(run.cfg, self, run.teacher_sha))
        teacher = run.method.teacher
        with locked(cache.path):
            found = cache.read()
            reused = found is not None
            if found is None:
                state, meta = self.generate_into(cache, teacher, settings.device)
            else:
                state, meta = found
                console.print(f"synthetic {self.synthesis.name}: {len(state['images'])} images read back from "
                              f"{cache.path}", highlight=False, soft_wrap=True)
        self.images, self.labels = state["images"], torch.full((len(state["images"]),), NO_LABEL, dtype=torch.long)
        self.targets = state["targets"]
        self.round_sizes = [len(self.images)]
        self.parts = [self.images]
        self.record.update(describe_set(self.synthesis, state, meta, cache.path, reused))

    # ----- generation ---------------------------------------------------------------------------------
    def generate_into(self, cache: SyntheticCache, teacher, device) -> tuple[dict, dict]:
        cache.start()
        data = self.teacher_data
        generated = synthesise(self.synthesis, teacher, self.count, self.shape, data.num_classes, data.mean, data.std,
                               device, self.params, f"synthetic {self.synthesis.name}",
                               load_batch=cache.load_batch, save_batch=cache.save_batch)
        state = {"images": generated.images, "targets": generated.targets, "teacher_pred": generated.teacher_pred,
                 "losses": generated.losses, "clipped": generated.clipped,
                 "stored_as": "uint8 pixels: round(255 (x std + mean)), clamped to 0..255"}
        meta = {"format": CACHE_FORMAT, "images": len(generated.images), "wall_s": generated.wall_s,
                "images_per_s": len(generated.images) / generated.wall_s if generated.wall_s > 0 else None,
                "device": str(device), "batches_reused": generated.batches_reused,
                "finished": time.strftime("%Y-%m-%d %H:%M:%S")}
        cache.finish(state, meta)
        return state, meta

    def begin_round(self, r: int, run) -> None:
        """Round r's ADI images join the set: read back from the run directory when an earlier attempt made
        them, else made now against the student as it is and stored there."""
        if r == 0 or r < len(self.round_sizes):  # round 0 is the cached set; a replayed round is already in
            return
        name = f"synthetic_round{r}"
        stored = run.load(name)
        if stored is None:
            data = self.teacher_data
            generated = synthesise(self.synthesis, run.method.teacher, self.round_images, self.shape,
                                   data.num_classes, data.mean, data.std, run.settings.device, self.params,
                                   f"synthetic {self.synthesis.name} round {r} (competition)", round_index=r,
                                   student=run.method.student)
            stored = {"images": generated.images, "targets": generated.targets,
                      "teacher_pred": generated.teacher_pred, "losses": generated.losses,
                      "clipped": generated.clipped, "wall_s": generated.wall_s}
            run.save(name, stored)
            write_grid(run.store(name).with_suffix(".png"), stored["images"], stored["targets"])
        self.round_sizes.append(len(stored["images"]))
        self.parts.append(stored["images"])
        self.images = torch.cat(self.parts)
        self.labels = torch.full((len(self.images),), NO_LABEL, dtype=torch.long)
        self.record.update(transfer_size=len(self.images), synthetic_round_images=list(self.round_sizes))
        run.notes["synthetic_round_images"] = list(self.round_sizes)
        run.refresh_loader()


def describe_set(synthesis: Synthesis, state: dict, meta: dict, path: Path, reused: bool) -> dict:
    """The record's facts about the set: size, how long it took, where it is, what the teacher makes of it."""
    targets, predicted = state["targets"], state["teacher_pred"]
    record = {"synthetic_synth": synthesis.name, "synthetic_images": len(state["images"]),
              "synthetic_wall_s": meta.get("wall_s"), "synthetic_images_per_s": meta.get("images_per_s"),
              "synthetic_cache": str(path), "synthetic_grid": str(path / GRID), "synthetic_reused": reused,
              "synthetic_clipped_fraction": state["clipped"],
              "synthetic_teacher_classes": int(torch.unique(predicted).numel())}
    if synthesis.targeted:  # how often the teacher calls an image its target class
        record["synthetic_teacher_target_acc"] = 100.0 * (predicted == targets).float().mean().item()
    return record


def generation_identity(cfg, transfer: SyntheticSet, teacher_sha: str) -> dict:
    """Everything the images depend on: the teacher's weights, the synthesis and its keys, the dataset's
    shape, classes and normalisation (not the student, nor the competition keys, which make later rounds in
    the run directory)."""
    p, data = transfer.params, transfer.teacher_data
    keys = {"images": transfer.count, "batch_size": p.batch_size, "seed": p.seed}
    if transfer.synthesis.optimised:
        weights = {k: v for k, v in p.weights.items() if k != "competition"}
        keys.update(iterations=p.iterations, lr=p.lr, betas=list(p.betas), jitter=p.jitter, flip=p.flip, clip=p.clip,
                    weights=weights)
    return {"format": CACHE_FORMAT, "teacher_sha256": teacher_sha, "synth": transfer.synthesis.name, "keys": keys,
            "dataset": {"name": cfg.dataset.name, "shape": list(transfer.shape), "classes": data.num_classes,
                        "mean": list(data.mean), "std": list(data.std)}}


# ----- build: the keys, checked before anything is written ---------------------------------------------
def number(cfg, key: str, positive: bool = False) -> float:
    value = cfg.transfer.get(key)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0 or (positive and value == 0):
        raise ConfigError(f"transfer.{key}={value} is not allowed: a number {'> 0' if positive else '>= 0'}")
    return float(value)


def boolean(cfg, key: str) -> bool:
    value = cfg.transfer.get(key)
    if not isinstance(value, bool):
        raise ConfigError(f"transfer.{key}={value} is not allowed: true or false")
    return value


def auto_or_bool(cfg, key: str, auto: bool) -> bool:
    value = cfg.transfer.get(key)
    if value == "auto":
        return auto
    if not isinstance(value, bool):
        raise ConfigError(f"transfer.{key}={value} is not allowed: auto, true or false")
    return value


def betas_of(cfg) -> tuple[float, float]:
    value = cfg.transfer.get("betas")
    values = list(value) if value is not None and not isinstance(value, (str, int, float)) else None
    if (not values or len(values) != 2
            or not all(isinstance(b, (int, float)) and not isinstance(b, bool) and 0 <= b < 1 for b in values)):
        raise ConfigError(f"transfer.betas={value} is not allowed: two numbers in [0, 1), e.g. [0.9,0.999]")
    return float(values[0]), float(values[1])


def params_of(cfg, synthesis: Synthesis, shape, hflip: bool) -> GenerationParams:
    jitter = positive_int(cfg, "jitter", 0)
    if jitter >= min(shape[1:]):
        raise ConfigError(f"transfer.jitter={jitter} is not allowed: the images are {shape[1]}x{shape[2]}, "
                          f"shift by less than {min(shape[1:])} pixels")
    weights = {term: number(cfg, key) for term, key in synthesis.weights.items()}
    return GenerationParams(iterations=positive_int(cfg, "iterations"), lr=number(cfg, "lr", positive=True),
                            betas=betas_of(cfg), batch_size=positive_int(cfg, "batch_size"), jitter=jitter,
                            flip=auto_or_bool(cfg, "flip", hflip), clip=boolean(cfg, "clip"), weights=weights,
                            seed=positive_int(cfg, "seed", 0),
                            competition_T=number(cfg, "competition_T", positive=True))


@register_transfer("synthetic", "data-free: images synthesised from the teacher (gaussian, inception, bn_stats, "
                                "deepinversion; Adaptive DeepInversion with transfer.competition=true)")
def build(cfg, data) -> TransferSet:
    require_in_memory(cfg, data, "synthetic")
    # Only the test split's shape and the dataset's metadata: the training split is never touched here.
    shape = tuple(data.test_images.shape[1:])
    if data.test_images.dtype != torch.uint8:
        raise ConfigError(f"transfer=synthetic is not allowed with dataset={cfg.dataset.name}: it synthesises "
                          "images, and this dataset holds feature vectors")
    synth = cfg.transfer.get("synth")
    if synth not in SYNTHESES:
        raise ConfigError(f"transfer.synth={synth} is not allowed: one of {', '.join(SYNTHESES.names())}")
    synthesis = SYNTHESES.get(synth)
    if str(cfg.teacher.get("access", "full")) != "full":
        raise ConfigError(f"transfer=synthetic is not allowed with teacher.access={cfg.teacher.get('access')}: "
                          "synthesis reads the teacher as a white box (gradients to its input, its BN statistics); "
                          "give teacher.access=full")
    if list(cfg.get("assistants") or []):
        raise ConfigError("assistants are not allowed with transfer=synthetic: the assistants would learn from "
                          "the real training split the synthetic set stands in for")
    count = positive_int(cfg, "images")
    competition = boolean(cfg, "competition")
    if competition and synth != "deepinversion":
        raise ConfigError(f"transfer.competition=true is not allowed with transfer.synth={synth}: Adaptive "
                          "DeepInversion's competition term is DeepInversion's; give transfer.synth=deepinversion")
    transfer = SyntheticSet("synthetic", torch.zeros((count, *shape), dtype=torch.uint8),
                            torch.full((count,), NO_LABEL, dtype=torch.long), data, has_labels=False,
                            record={"synthetic_synth": synth})
    transfer.synthesis, transfer.count, transfer.shape = synthesis, count, shape
    transfer.params = params_of(cfg, synthesis, shape, bool(data.hflip))
    transfer.freeze_bn = auto_or_bool(cfg, "freeze_bn", synth == "gaussian")
    transfer.competition = competition
    transfer.rounds = positive_int(cfg, "rounds") if competition else 0
    transfer.round_images = positive_int(cfg, "round_images") if competition else 0
    transfer.targets = torch.full((count,), NO_LABEL, dtype=torch.long)
    transfer.round_sizes, transfer.parts = [], []
    return transfer

