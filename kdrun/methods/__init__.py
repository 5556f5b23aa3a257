"""Distillation methods: one module per method, each registering itself; every module here is imported,
so adding a method means adding `kdrun/methods/<name>.py` and `conf/method/<name>.yaml`, nothing else."""
import importlib
import pkgutil

from kdrun.methods.base import Forward, Method, Stage, StepOutput
from kdrun.methods.registry import METHODS, register_method

for _module in pkgutil.iter_modules(__path__):
    if _module.name not in ("base", "registry"):
        importlib.import_module(f"{__name__}.{_module.name}")

__all__ = ["METHODS", "Forward", "Method", "Stage", "StepOutput", "register_method"]
