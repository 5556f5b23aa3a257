"""Faster steps that leave a run's results as they are (up to float rounding): `compile=true` (torch.compile of
the student and the teacher), `channels_last=true` (models and batches in that memory format), `tf32` (TF32
matmuls and convolutions on CUDA) and `eval_batch_size=auto` (the evaluation batch chosen per device).

Compilation works on the models, not on `Method.forward`: a method's step reads its config, per-epoch Python
state (warm-up factors, kd_until_epoch), memory banks and random draws, which would break the graph or recompile
it every epoch, while a model's forward is the same tensor program at every step. `module.compile()`-style
compilation in place keeps state_dict keys and checkpoints as they are, and traces the feature taps' forward
hooks into the graph (guarded on whether the tap is recording, so a plain evaluation stores nothing); the
student's backward is compiled with its forward (AOTAutograd). The loss terms stay eager: a few kernels. A model
torch.compile cannot handle runs eagerly after one line saying so.

Both `compile` and `channels_last` hold during `fit` only (`fast_steps`): afterwards the models are eager and
contiguous again, so what runs after training (quantization, pruning checks, the bias shift) sees the models
as before, and a deep copy never carries a compiled forward that would still call the original module.
"""
from __future__ import annotations

import contextlib

import torch
from omegaconf import DictConfig, OmegaConf, open_dict
from rich.markup import escape
from torch import nn

from kdrun.errors import ConfigError

COMPILE_MODES = ("default", "reduce-overhead", "max-autotune")
AUTO = "auto"
# On two CPU cores batch 512 evaluated 2.1-2.7x slower than 64 (scripts/bench_steps.py measures it again, as
# "eval batch 64" against "eval batch 512"); a GPU wants large batches.
AUTO_EVAL_BATCH_SIZE = {"cpu": 64, "cuda": 512}
# What `eval_batch_size=auto` counts as in the config hash: the default before auto existed, so the runs made
# then keep their identity (resume, skip_completed, compare's repeats). The evaluation batch changes neither
# training nor which test images are classified right, and auto sums the test loss over blocks of this many
# images (train.BlockedLossSum), so it is the same number too.
EVAL_BATCH_SIZE_BEFORE_AUTO = 512
AUTO_RESOLVER = "kdrun.auto_eval_batch_size"
# Graphs a run may compile per code object: train and eval mode, with and without gradients, the first
# batch size and then a dynamic one, for student, teacher and the teacher's own training in the same process.
RECOMPILE_LIMIT = 32


# ----- the keys ---------------------------------------------------------------------------------------------
def _require(ok: bool, key: str, value, allowed: str) -> None:
    if not ok:
        shown = str(value).lower() if isinstance(value, bool) or value is None else value
        raise ConfigError(f"{key}={shown} is not allowed: {allowed}")


def check_speed_keys(cfg: DictConfig) -> None:
    """Refuse a bad `eval_batch_size`, `channels_last`, `tf32` or `compile` value before any work."""
    value = cfg.get("eval_batch_size")
    _require(value == AUTO or (isinstance(value, int) and not isinstance(value, bool) and value >= 1),
             "eval_batch_size", value, "auto (64 on the CPU, 512 on CUDA) or an integer >= 1")
    channels_last = cfg.get("channels_last", False)
    _require(isinstance(channels_last, bool), "channels_last", channels_last, "true or false")
    tf32 = cfg.get("tf32")
    _require(tf32 is None or isinstance(tf32, bool), "tf32", tf32,
             "true, false or null (PyTorch's defaults: TF32 cuDNN convolutions, full-fp32 matmuls)")
    compile_mode(cfg)


def compile_mode(cfg: DictConfig) -> str | None:
    """The torch.compile mode of `compile=true` (None when off); refuses an unknown mode even when off, so a
    typo never waits for the day compilation is switched on."""
    node = cfg.get("compile")
    if node is None:
        return None
    if not isinstance(node, DictConfig):
        raise ConfigError(f"compile={node} is not allowed: choose the group option compile=true or compile=false")
    enabled = node.get("enabled", False)
    _require(isinstance(enabled, bool), "compile.enabled", enabled, "true or false (or choose compile=true)")
    mode = node.get("mode", "default")
    _require(mode in COMPILE_MODES, "compile.mode", mode, f"one of {', '.join(COMPILE_MODES)}")
    return mode if enabled else None


def step_settings(cfg: DictConfig) -> dict:
    """The TrainSettings fields of these keys."""
    return {"channels_last": bool(cfg.get("channels_last", False)), "compile_mode": compile_mode(cfg),
            "eval_loss_block": EVAL_BATCH_SIZE_BEFORE_AUTO if eval_batch_size_is_auto(cfg) else None}


def speed_record(cfg: DictConfig) -> dict:
    """result.json keys for the options that are on (a run with none of them is recorded as before)."""
    record = {}
    mode = compile_mode(cfg)
    if mode is not None:
        record["compile"] = mode
    if cfg.get("channels_last", False):
        record["channels_last"] = True
    if cfg.get("tf32") is not None:
        record["tf32"] = cfg.tf32
    return record


def hash_as_before(cfg: DictConfig, container: dict) -> None:
    """How these keys count in the config hash (`container` is the resolved config being hashed).

    `compile` and `channels_last` never count, like `device`: they choose how the same computation runs, so a
    compiled run is a twin of the plain one (resume, skip_completed, compare's repeats). `tf32`, a precision
    like `precision`, counts once set. `eval_batch_size=auto` counts as 512, the default every earlier run
    recorded: auto evaluates the same test images with the same accuracy, at 64 on the CPU."""
    container.pop("compile", None)
    container.pop("channels_last", None)
    if "tf32" in container and container["tf32"] is None:
        container.pop("tf32")
    if eval_batch_size_is_auto(cfg):
        container["eval_batch_size"] = EVAL_BATCH_SIZE_BEFORE_AUTO


# ----- eval_batch_size=auto ----------------------------------------------------------------------------------
def auto_eval_batch_size(device_type: str) -> int:
    return AUTO_EVAL_BATCH_SIZE.get(str(device_type), AUTO_EVAL_BATCH_SIZE["cuda"])


def register_auto_resolver() -> None:
    if not OmegaConf.has_resolver(AUTO_RESOLVER):
        OmegaConf.register_new_resolver(AUTO_RESOLVER, auto_eval_batch_size)


def resolve_eval_batch_size(cfg: DictConfig, device: torch.device) -> int:
    """`eval_batch_size=auto` becomes the device's batch size. It stays written as `auto` for the config hash:
    the key becomes the interpolation `${kdrun.auto_eval_batch_size:cpu}`, so every reader gets the number, the
    run's config.yaml (written resolved) holds it, and `hash_as_before` still sees auto. Idempotent."""
    if cfg.get("eval_batch_size") == AUTO:
        register_auto_resolver()
        with open_dict(cfg):
            cfg.eval_batch_size = f"${{{AUTO_RESOLVER}:{device.type}}}"
    return cfg.eval_batch_size


def eval_batch_size_is_auto(cfg: DictConfig) -> bool:
    if "eval_batch_size" not in cfg:
        return False
    raw = OmegaConf.to_container(OmegaConf.masked_copy(cfg, ["eval_batch_size"]), resolve=False)["eval_batch_size"]
    return raw == AUTO or (isinstance(raw, str) and raw.startswith("${" + AUTO_RESOLVER + ":"))


# ----- tf32 --------------------------------------------------------------------------------------------------
def _flags_now() -> tuple[bool, bool]:
    try:
        return bool(torch.backends.cuda.matmul.allow_tf32), bool(torch.backends.cudnn.allow_tf32)
    except RuntimeError:  # flags set through torch's newer fp32_precision API in a way the old one cannot read
        return False, True


TF32_AT_START = _flags_now()  # what tf32=null restores (a sweep's earlier job in this process may have set them)


def apply_tf32(value: bool | None, device: torch.device) -> str | None:
    """Set the process's TF32 flags for this run on CUDA (matmuls and cuDNN convolutions alike); returns a note
    to print when the key cannot have any effect (the CPU has no TF32)."""
    if device.type != "cuda":
        if value is None:
            return None
        return f"tf32={str(value).lower()} has no effect on the CPU (TF32 is a CUDA tensor-core format); ignored"
    matmul, conv = TF32_AT_START if value is None else (value, value)
    torch.backends.cuda.matmul.allow_tf32 = matmul
    torch.backends.cudnn.allow_tf32 = conv
    return None


# ----- during fit ---------------------------------------------------------------------------------------------
def to_step_format(images: torch.Tensor, settings) -> torch.Tensor:
    """A batch in the models' memory format (the loaders yield contiguous NCHW; see augment.random_crop)."""
    if settings.channels_last and images.dim() == 4:
        return images.contiguous(memory_format=torch.channels_last)
    return images


def in_channels_last(model: nn.Module) -> bool:
    """Whether the model's convolutions hold channels_last weights (the first weight whose layout tells)."""
    for param in model.parameters():
        if param.dim() == 4 and param.shape[1] > 1 and param.shape[2] * param.shape[3] > 1:
            return param.is_contiguous(memory_format=torch.channels_last) and not param.is_contiguous()
    return False


def begin_step(settings) -> None:
    """CUDA graphs (compile.mode=reduce-overhead) reuse their output memory: a new step starts here, after the
    previous step's outputs were last read."""
    if settings.compile_mode == "reduce-overhead":
        torch.compiler.cudagraph_mark_step_begin()


def step_models(method) -> list[tuple[str, nn.Module]]:
    """The models a step and the evaluation run: student, teacher, any other evaluated model (peers, a deployed
    student), and the graph modules of fx feature taps (which run instead of the model they tap)."""
    from kdrun.features import FeatureTap

    found: list[tuple[str, nn.Module]] = [("student", method.student)]
    if method.teacher is not None:
        found.append(("teacher", method.teacher))
    # An evaluated model around the student (SimKD's deployed student) is left to the compiled student inside.
    found += [(label, model) for label, model in method.eval_models().items()
              if not any(sub is method.student for sub in model.modules())]
    for name, value in vars(method).items():
        extractor = getattr(value, "_extractor", None) if isinstance(value, FeatureTap) else None
        if extractor is not None:
            found.append((f"{name.strip('_')} feature graph", extractor))
    unique, seen = [], set()
    for label, module in found:
        if isinstance(module, nn.Module) and id(module) not in seen:
            seen.add(id(module))
            unique.append((label, module))
    return unique


@contextlib.contextmanager
def fast_steps(method, settings):
    """Within: the method's modules and the teacher in channels_last, and the step models compiled (each as
    chosen in `settings`); on leaving, eager and contiguous again."""
    if not settings.channels_last and settings.compile_mode is None:
        yield
        return
    holders = [method] + ([method.teacher] if method.teacher is not None else [])
    compiled: list[nn.Module] = []
    try:
        if settings.channels_last:
            for module in holders:
                module.to(memory_format=torch.channels_last)
        if settings.compile_mode is not None:
            compiled = compile_step_models(method, settings.compile_mode, settings.device)
        yield
    finally:
        for module in compiled:
            module._compiled_call_impl = None
        if settings.channels_last:
            for module in holders:
                module.to(memory_format=torch.contiguous_format)


def compile_step_models(method, mode: str, device: torch.device) -> list[nn.Module]:
    import torch._dynamo

    from kdrun.progress import console

    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, RECOMPILE_LIMIT)
    models = [(label, module) for label, module in step_models(method) if compile_in_place(module, mode, label)]
    if models:
        where = ("on the CPU each graph takes tens of seconds to compile" if device.type == "cpu"
                 else "each graph compiles once")
        console.print(escape(f"compile: {', '.join(label for label, _ in models)} with torch.compile (mode {mode}); "
                             f"the first steps of each kind compile first ({where})"),
                      highlight=False, soft_wrap=True)
    return [module for _, module in models]


def compile_in_place(module: nn.Module, mode: str, label: str) -> bool:
    """What `module.compile(mode=...)` does, with a fall-back: should torch.compile fail on the module, it runs
    eagerly from then on, after one line naming it. False for a module already compiled (left as it is)."""
    import torch._dynamo.exc

    from kdrun.progress import console

    if getattr(module, "_compiled_call_impl", None) is not None:
        return False
    compiled = torch.compile(module._call_impl, mode=mode)
    failures = torch._dynamo.exc.TorchDynamoException

    def call(*args, **kwargs):
        try:
            return compiled(*args, **kwargs)
        except failures as exc:
            module._compiled_call_impl = None
            reason = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
            name = getattr(module, "model_name", type(module).__name__)
            console.print(escape(f"compile: torch.compile cannot compile the {label} ({name}): "
                                 f"{type(exc).__name__}: {reason[:200]}; it runs eagerly"),
                          highlight=False, soft_wrap=True)
            return module._call_impl(*args, **kwargs)

    module._compiled_call_impl = call
    return True
