"""The training loops scripts/bench_peers.py times, one class per way of running KD on the same pair, data and batch.

Every runner gets its own deep copies of the same student and teacher (kdrun's models, same initial weights), the
same SGD settings (kdrun's `optim`: lr, momentum, weight decay) and the same KD loss, (1 - alpha) CE + alpha T^2
KL with kdrun's `method=kd` T and alpha, and trains on batches from the same `Cycle` over one kdrun TensorLoader
(uint8 CIFAR-shaped random images, crop 4 + flip on the device, normalized). So the loaders are equal and what
differs is the training loop alone: RepDistiller's own loaders (torchvision transforms on PIL images in
DataLoader workers) and torchdistill's are not timed.

`train(loader)` runs one pass over the loader and returns images/s (device synchronized before and after).
"""
from __future__ import annotations

import contextlib
import copy
import importlib
import io
import sys
import time
import warnings
from pathlib import Path
from types import SimpleNamespace

import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_steps import CLASSES, Variant, sync  # noqa: E402  (kdrun's own step: Method + train_epoch)

from kdrun.schedule import build_scheduler  # noqa: E402
from kdrun.speed.cache_policy import CachePlan  # noqa: E402
from kdrun.speed.teacher_cache import TeacherOutputs, build_outputs  # noqa: E402
from kdrun.train import CONSTANT_SCHEDULE  # noqa: E402


class Skipped(Exception):
    """A runner that cannot run here (a peer not installed, a kdrun feature not in this tree): the message says why."""


class Cycle:
    """`steps` batches drawn from `loader`, starting a new pass over it whenever one ends (so the data set can be
    small, which keeps the teacher-output cache cheap to build); yields the loader's own (images, labels, index),
    so the cache finds each batch's views by its index tensor."""

    def __init__(self, loader, steps: int):
        self.loader, self.steps = loader, steps
        self.batch_size = loader.batch_size

    @property
    def num_samples(self) -> int:
        return self.steps * self.batch_size  # the loader's size is a multiple of the batch (bench_peers.py)

    def __len__(self) -> int:
        return self.steps

    def __iter__(self):
        given = 0
        while True:
            for batch in self.loader:
                if given == self.steps:
                    return
                given += 1
                yield batch


def images_per_second(device: torch.device, loader, run) -> float:
    sync(device)
    started = time.perf_counter()
    run()
    sync(device)
    return loader.num_samples / (time.perf_counter() - started)


def frozen_teacher(teacher: nn.Module, device: torch.device) -> nn.Module:
    teacher = copy.deepcopy(teacher).to(device).eval()
    for param in teacher.parameters():
        param.requires_grad_(False)
    return teacher


def sgd(params, cfg) -> torch.optim.SGD:
    return torch.optim.SGD(params, lr=cfg.optim.lr, momentum=cfg.optim.momentum, weight_decay=cfg.optim.weight_decay,
                           nesterov=bool(cfg.optim.get("nesterov", False)))


# ----- kdrun -------------------------------------------------------------------------------------------------
class SharedCache:
    """The exact teacher-output table of the data set (every image x every crop/flip view), built once per pair as
    `teacher.cache_outputs` builds it (`build_outputs`), timed apart (the sweep estimate charges the build), and
    shared by the runners that look it up: their teachers are copies of one teacher, run as it is (eager, NCHW)."""

    def __init__(self, cfg, loader):
        self.cfg, self.loader = cfg, loader
        self.logits = self.build_seconds = self.views_built = None

    def attach(self, method, settings) -> None:
        loader = self.loader
        plan = CachePlan(True, torch.float32, torch.float32, loader.view_count, CLASSES, loader.num_samples)
        if self.logits is None:
            sync(settings.device)
            started = time.perf_counter()
            self.logits = build_outputs(self.cfg, method, loader, plan, settings, "teacher outputs (bench)",
                                        Path("memory (not stored)"))
            sync(settings.device)
            self.build_seconds = time.perf_counter() - started
            self.views_built = loader.num_samples * loader.view_count
        method.use_teacher_output_cache(TeacherOutputs(self.logits, loader, plan.output_dtype))


class Kdrun:
    """kdrun's own step (scripts/bench_steps.py's Variant: the registered `kd` Method, kdrun's optimizer,
    `train.train_epoch`, `step_speed.fast_steps`); `kind` plain, compiled (channels_last + torch.compile,
    bench_steps' `both`), cache (plain, with the teacher's logits looked up in the teacher-output cache) or
    cache_compiled (both: the student compiled, the teacher's logits looked up)."""

    def __init__(self, kind: str, cfg, student, teacher, device, stack: contextlib.ExitStack,
                 cache: SharedCache | None = None, compile_mode: str = "default"):
        self.name = {"plain": "kdrun", "compiled": "kdrun compiled+CL", "cache": "kdrun cache",
                     "cache_compiled": "kdrun cache + compiled+CL"}[kind]
        self.variant = Variant("both" if kind in ("compiled", "cache_compiled") else "plain", cfg, student, teacher,
                               device, compile_mode, stack)
        if kind in ("cache", "cache_compiled"):
            cache.attach(self.variant.method, self.variant.settings)

    def train(self, loader) -> float:
        return self.variant.train(loader)


class Fused:
    """kdrun's fused students (kdrun/fused, `fuse=true`): K jobs of one pair (here K copies of the same job: a T x
    alpha sweep's jobs differ only in those scalars) on the same batches, driven as `fused.trainer.fit_together`
    drives them: per batch the teacher runs once, or its cache is looked up once (`teacher_outputs`), then every
    job takes its own step (`train.EpochRun.step`, its own Method, optimizer, scheduler and random state) with
    those outputs. images/s counts every job's images (K x the batches). `channels_last`: every job's models and
    batches in channels_last (fused groups allow it; they refuse compile)."""

    def __init__(self, jobs: int, cfg, student, teacher, device, stack: contextlib.ExitStack,
                 cache: SharedCache | None = None, channels_last: bool = False):
        try:
            from kdrun.fused.trainer import RandomState, teacher_outputs
            from kdrun.train import EpochRun
        except ImportError:
            raise Skipped("skipped: not available (no kdrun/fused trainer in this tree)") from None
        self.teacher_outputs, self.epoch_run, self.random_state = teacher_outputs, EpochRun, RandomState
        self.name = f"kdrun fused K={jobs}" + (" + cache" if cache is not None else "") + (" + CL" if channels_last
                                                                                          else "")
        kind = "channels_last" if channels_last else "plain"
        self.variants = [Variant(kind, cfg, student, teacher, device, "default", stack) for _ in range(jobs)]
        if not hasattr(self.variants[0].method, "use_given_teacher_outputs"):
            raise Skipped("skipped: not available (Method.use_given_teacher_outputs missing)")
        if cache is not None:
            cache.attach(self.variants[0].method, self.variants[0].settings)  # the provider: first job's method
        self.rngs = [RandomState(device) for _ in range(jobs)]
        self.device = device

    def train(self, loader) -> float:
        rate = images_per_second(self.device, loader, lambda: self._epoch(loader))
        return rate * len(self.variants)

    def _epoch(self, loader) -> None:
        settings = self.variants[0].settings
        runs = []
        for variant in self.variants:
            variant.epoch += 1
            scheduler = build_scheduler(variant.optimizer, CONSTANT_SCHEDULE, 1, len(loader))
            scaler = torch.amp.GradScaler(settings.device.type, enabled=False)
            runs.append(self.epoch_run(variant.method, variant.optimizer, scheduler, settings, scaler,
                                       variant.epoch, 0))
        jobs = [SimpleNamespace(method=variant.method) for variant in self.variants]
        counts: dict = {}
        for images, labels, index in loader:
            given = self.teacher_outputs(jobs, images, index, settings, counts)
            for job, run, rng in zip(jobs, runs, self.rngs):
                with rng.active():
                    if given is not None:
                        job.method.use_given_teacher_outputs(*given, images)
                    run.step(images, labels, index)
        for run in runs:
            run.finish()


# ----- the minimal loop --------------------------------------------------------------------------------------
class Minimal:
    """The floor for framework overhead: teacher forward under no_grad, student forward, (1 - a) CE + a T^2 KL,
    backward, SGD step. Nothing else (no metrics, no .item())."""

    name = "minimal"

    def __init__(self, cfg, student, teacher, device):
        self.device = device
        self.student = copy.deepcopy(student).to(device)
        self.teacher = frozen_teacher(teacher, device)
        self.optimizer = sgd(self.student.parameters(), cfg)
        self.T, self.alpha = float(cfg.method.T), float(cfg.method.alpha)

    def train(self, loader) -> float:
        return images_per_second(self.device, loader, lambda: self._epoch(loader))

    def _epoch(self, loader) -> None:
        T, alpha = self.T, self.alpha
        self.student.train()
        for images, labels, _ in loader:
            with torch.no_grad():
                teacher_logits = self.teacher(images)
            logits = self.student(images)
            kl = F.kl_div(F.log_softmax(logits / T, 1), F.log_softmax(teacher_logits / T, 1), reduction="batchmean",
                          log_target=True)
            loss = (1 - alpha) * F.cross_entropy(logits, labels) + alpha * T * T * kl
            self.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            self.optimizer.step()


# ----- RepDistiller ------------------------------------------------------------------------------------------
class WithFeatures(nn.Module):
    """RepDistiller's model call, `model(x, is_feat=True, preact=False) -> (features, logits)`, around a kdrun
    model; KD reads no features, so the list is empty (RepDistiller's own models only return references)."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, x, is_feat: bool = False, preact: bool = False):
        logits = self.model(x)
        return ([], logits) if is_feat else logits


@contextlib.contextmanager
def cuda_available_as(device: torch.device):
    """train_distill moves each batch to CUDA whenever torch.cuda.is_available(): on `--device cpu` of a GPU
    machine it must see False."""
    original = torch.cuda.is_available
    torch.cuda.is_available = lambda: device.type == "cuda"
    try:
        yield
    finally:
        torch.cuda.is_available = original


class RepDistiller:
    """RepDistiller's `helper.loops.train_distill` with `distiller_zoo.DistillKL`, set up as its train_student.py
    does for `--distill kd -r (1 - alpha) -a alpha -b 0 --kd_T T`: module_list [student, teacher] (teacher last,
    after the optimizer), criterion_list [CrossEntropyLoss, DistillKL(T), DistillKL(T)], SGD on the student only.
    Its per-step metrics (loss.item(), top-1/top-5) are part of its loop and are timed; its prints are not shown."""

    name = "RepDistiller"

    def __init__(self, path: str | None, cfg, student, teacher, device):
        if not path:
            raise Skipped("skipped: give --repdistiller PATH (a copy of github.com/HobbitLong/RepDistiller)")
        root = Path(path).expanduser().resolve()
        if not (root / "helper" / "loops.py").is_file() or not (root / "distiller_zoo").is_dir():
            raise Skipped(f"skipped: {root} holds no RepDistiller code (helper/loops.py, distiller_zoo/)")
        if str(root) not in sys.path:
            sys.path.insert(0, str(root))
        try:
            self.loops = importlib.import_module("helper.loops")
            distill_kl = importlib.import_module("distiller_zoo").DistillKL
        except Exception as exc:  # its imports (tensorboard_logger is only train_student's) or a broken copy
            raise Skipped(f"skipped: cannot import RepDistiller from {root}: {type(exc).__name__}: {exc}") from None
        self.device = device
        alpha, T = float(cfg.method.alpha), float(cfg.method.T)
        self.opt = SimpleNamespace(distill="kd", gamma=1 - alpha, alpha=alpha, beta=0.0, kd_T=T, print_freq=10 ** 9)
        model_s = WithFeatures(copy.deepcopy(student))
        model_t = WithFeatures(frozen_teacher(teacher, device))
        self.module_list = nn.ModuleList([model_s])
        trainable_list = nn.ModuleList([model_s])
        self.criterion_list = nn.ModuleList([nn.CrossEntropyLoss(), distill_kl(T), distill_kl(T)])
        self.optimizer = sgd(trainable_list.parameters(), cfg)
        self.module_list.append(model_t)
        self.module_list.to(device)
        self.criterion_list.to(device)
        self.epoch = 0

    def train(self, loader) -> float:
        self.epoch += 1

        def run():
            with contextlib.redirect_stdout(io.StringIO()), cuda_available_as(self.device), warnings.catch_warnings():
                warnings.simplefilter("ignore")  # DistillKL's size_average=False is deprecated
                self.loops.train_distill(self.epoch, loader, self.module_list, self.criterion_list, self.optimizer,
                                         self.opt)

        return images_per_second(self.device, loader, run)


# ----- torchdistill ------------------------------------------------------------------------------------------
class Torchdistill:
    """torchdistill's DistillationBox (`get_distillation_box`) configured as its sample KD configs are: teacher
    and student `forward_batch_only`, teacher frozen, `WeightedSumLoss` of one `KDLoss` on the models' outputs
    (its alpha weighs CE, beta T^2 KL: here 1 - alpha and alpha), SGD; driven as its image_classification.py's
    train_one_epoch does: pre_epoch_process, then per batch forward_process, post_forward_process (backward,
    step) and loss.item() for its metric logger."""

    name = "torchdistill"

    def __init__(self, cfg, student, teacher, device):
        try:
            from torchdistill.core.distillation import get_distillation_box
        except ImportError:
            raise Skipped("skipped: torchdistill is not installed (pip install 'kdrun[bench]')") from None
        import logging

        logging.getLogger("torchdistill").setLevel(logging.WARNING)
        self.device = device
        alpha, T = float(cfg.method.alpha), float(cfg.method.T)
        kd = {"key": "KDLoss", "kwargs": {"student_module_path": ".", "student_module_io": "output",
                                         "teacher_module_path": ".", "teacher_module_io": "output",
                                         "temperature": T, "alpha": 1 - alpha, "beta": alpha,
                                         "reduction": "batchmean"}}
        train_config = {
            "num_epochs": 1,
            "teacher": {"forward_proc": "forward_batch_only", "requires_grad": False},
            "student": {"forward_proc": "forward_batch_only", "requires_grad": True},
            "optimizer": {"key": "SGD", "kwargs": {"lr": cfg.optim.lr, "momentum": cfg.optim.momentum,
                                                   "weight_decay": cfg.optim.weight_decay}},
            "criterion": {"key": "WeightedSumLoss", "kwargs": {"sub_terms": {"kd": {"criterion": kd, "weight": 1.0}}}},
        }
        self.box = get_distillation_box(frozen_teacher(teacher, device), copy.deepcopy(student).to(device), {},
                                        train_config, device, None, False, 1)
        self.epoch = 0

    def train(self, loader) -> float:
        self.epoch += 1
        return images_per_second(self.device, loader, lambda: self._epoch(loader))

    def _epoch(self, loader) -> None:
        box = self.box
        box.pre_epoch_process(epoch=self.epoch)
        for images, labels, _ in loader:
            loss = box.forward_process(images, labels, {})
            box.post_forward_process(loss=loss)
            loss.item()
