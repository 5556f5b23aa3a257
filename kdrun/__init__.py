"""kdrun: a config-driven runner for knowledge-distillation experiments on PyTorch."""

__version__ = "0.1.0"
