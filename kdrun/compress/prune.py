"""`student.prune=<fraction>` with `student.prune_kind`.

unstructured: `torch.nn.utils.prune.global_unstructured` with `L1Unstructured` chooses the weights, over
    every convolution and linear layer (the classifier included; biases and BN parameters are not pruned).
    Global, not per layer: the `fraction` of the smallest-magnitude weights of the whole network goes (Han et
    al. 2015; Frankle & Carbin's lottery-ticket ResNets), so wide layers full of redundant weights lose more
    than the stem conv, whose few 3x3xC_in weights are all needed.
    The zeros are then made permanent at once (`prune.remove`: a plain `weight` parameter again) and the mask
    is kept as a buffer `weight_prune_mask` beside it, with a gradient hook that multiplies the weight's
    gradient by it. A weight that is 0 and gets gradient 0 stays exactly 0 under SGD (momentum, Nesterov,
    weight decay) and Adam/AdamW, so the pruned weights stay zero through training, as under torch's
    `weight_orig * weight_mask` reparametrisation, but the state_dict keeps the model's own `weight` keys
    (plus the masks, so a resumed run holds the same weights at zero), the model deep-copies, and
    `torch.export` captures a plain conv for quantization-aware training (torchao's convert folds BN only
    into a conv weight that is a graph attribute, which `weight_orig * weight_mask` is not).
    `release_masks` drops the masks after training. MACs are unchanged: dense kernels run the zeros.
structured: torch-pruning's `MetaPruner` with `MagnitudeImportance(p=1)` (filter L1 norm, Li et al. 2017)
    removes the `fraction` of output channels of every layer (uniform per layer, `global_pruning=False`),
    following the dependency graph through residual additions; the classifier's outputs (the classes) are
    never pruned, its inputs follow the last stage. The model really gets smaller (params ~ (1 - f)^2).
"""
from __future__ import annotations

import contextlib
import copy
import signal
import threading
import weakref

import torch
from torch import nn
from torch.nn.utils import prune

from kdrun.compress.options import refusal

PRUNABLE = (nn.modules.conv._ConvNd, nn.Linear)
# torch-pruning's dependency search explodes on some graphs (ShuffleNetV2's channel split and shuffle: many
# minutes); the trial in `check_prunable` gives up after this long and refuses instead.
TRIAL_SECONDS = 60
MASK = "weight_prune_mask"
# Weights already hooked, by id (a copy is another tensor; torch.export shares the model's own parameters).
_HOOKED: "weakref.WeakValueDictionary[int, torch.Tensor]" = weakref.WeakValueDictionary()


def prunable_weights(model: nn.Module) -> list[tuple[nn.Module, str]]:
    return [(m, "weight") for m in model.modules() if isinstance(m, PRUNABLE)]


def prune_unstructured(model: nn.Module, fraction: float) -> None:
    targets = prunable_weights(model)
    prune.global_unstructured(targets, pruning_method=prune.L1Unstructured, amount=fraction)
    for module, name in targets:
        mask = getattr(module, name + "_mask").detach().clone()
        prune.remove(module, name)  # weight = weight_orig * mask, a plain Parameter again
        module.register_buffer(MASK, mask)
    hold_pruned_at_zero(model)


def hold_pruned_at_zero(model: nn.Module) -> int:
    """Hook every weight that has a `weight_prune_mask` beside it (in `model`, or in a graph exported from it,
    whose attribute modules keep the names) so that its gradient is masked. Returns the weights hooked."""
    hooked = 0
    for module in model.modules():
        weight = module._parameters.get("weight") if MASK in module._buffers else None
        if weight is None or _HOOKED.get(id(weight)) is weight:
            continue

        def masked(grad, owner=module):
            mask = owner._buffers.get(MASK)
            return grad if mask is None else grad * mask

        weight.register_hook(masked)
        _HOOKED[id(weight)] = weight
        hooked += 1
    return hooked


def release_masks(model: nn.Module) -> int:
    """Drop the masks (plain model keys again); the zeros stay. Returns the masks dropped."""
    owners = [m for m in model.modules() if MASK in m._buffers]
    for module in owners:
        del module._buffers[MASK]
    return len(owners)


def masked_count(model: nn.Module) -> int:
    """Weights a mask holds at zero (0 without masks)."""
    return sum(int((m._buffers[MASK] == 0).sum()) for m in model.modules() if MASK in m._buffers)


@torch.no_grad()
def zero_fraction(model: nn.Module) -> float:
    """Fraction of exactly-zero entries over the conv and linear weights."""
    weights = [m.weight for m, _ in prunable_weights(model)]
    total = sum(w.numel() for w in weights)
    return sum(int((w == 0).sum()) for w in weights) / total if total else 0.0


def classifier_of(model: nn.Module) -> nn.Module | None:
    """The module whose outputs are the logits: the `logits` alias, else the last linear layer."""
    path = getattr(model, "feature_aliases", {}).get("logits")
    if path and not path.endswith(":input"):
        try:
            return model.get_submodule(path)
        except AttributeError:
            pass
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    return linears[-1] if linears else None


def prune_structured(model: nn.Module, example: torch.Tensor, fraction: float) -> None:
    """Remove `fraction` of the channels of every prunable layer, in place. The dependency graph is traced in
    eval mode, so the student's BN running statistics (a copy of the teacher's, say) are left as they were."""
    import torch_pruning as tp

    classifier = classifier_of(model)
    was_training = model.training
    model.eval()
    try:
        pruner = tp.pruner.MetaPruner(model, example[:1], importance=tp.importance.MagnitudeImportance(p=1),
                                      pruning_ratio=fraction, global_pruning=False,
                                      ignored_layers=[classifier] if classifier is not None else [])
        pruner.step()
    finally:
        model.train(was_training)


class TrialTimeout(BaseException):  # not Exception: a library's broad except must not swallow it
    pass


@contextlib.contextmanager
def time_limit(seconds: float):
    """Raise TrialTimeout in the main thread after `seconds` (SIGALRM); elsewhere, no limit."""
    if threading.current_thread() is not threading.main_thread() or not hasattr(signal, "setitimer"):
        yield
        return

    def expire(*_):
        raise TrialTimeout

    previous = signal.signal(signal.SIGALRM, expire)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def check_prunable(model: nn.Module, example: torch.Tensor, fraction: float, kind: str) -> None:
    """Refuse, in one line, a model that this kind of pruning cannot shrink. Structured pruning is tried on a
    copy (the dependency graph must trace, the pruned model must run and be smaller)."""
    name = getattr(model, "model_name", type(model).__name__)
    if not prunable_weights(model):
        raise refusal("prune", fraction, f"{name} has no convolution or linear layer to prune", "student.prune=null")
    if kind != "structured":
        return
    trial = copy.deepcopy(model)
    before = sum(p.numel() for p in trial.parameters())
    try:
        with time_limit(TRIAL_SECONDS):
            prune_structured(trial, example, fraction)
            with torch.no_grad():
                trial.eval()(example[:1])
    except TrialTimeout:
        raise refusal("prune", fraction, f"torch-pruning did not finish tracing {name}'s channel dependencies in "
                      f"{TRIAL_SECONDS} s", "student.prune_kind=unstructured") from None
    except Exception as exc:  # noqa: BLE001 - torch-pruning raises many types on graphs it cannot follow
        text = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:160]
        raise refusal("prune", fraction, f"torch-pruning cannot prune {name}'s channels ({text})",
                      "student.prune_kind=unstructured") from None
    if sum(p.numel() for p in trial.parameters()) >= before:
        raise refusal("prune", fraction, f"torch-pruning found no channel of {name} it may remove (the classifier's "
                      "outputs are kept)", "a larger fraction, or student.prune_kind=unstructured")
