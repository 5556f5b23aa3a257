"""Shared by the test_compress_* files (no tests here): tiny configs and models, resnet8 on 1 x 8 x 8 images (digits' shape), 10 classes."""
from __future__ import annotations

import torch
from omegaconf import OmegaConf

from kdrun.models import create_model

SHAPE = (1, 8, 8)
CLASSES = 10


def compress_cfg(student: str = "resnet8", teacher: str = "resnet8", method: str = "kd", access: str = "full",
                 student_options: dict | None = None, **keys):
    return OmegaConf.create({
        "method": {"name": method},
        "teacher": {"name": teacher, "residual": True, "access": access, "checkpoint": None, "epochs": 1},
        "student": {"name": student, "residual": True, **(student_options or {}), **keys},
    })


def model(name: str = "resnet8", seed: int = 0, **options):
    torch.manual_seed(seed)
    return create_model(name, CLASSES, SHAPE[0], **options)


def batch(n: int = 16, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, *SHAPE, generator=g), torch.randint(0, CLASSES, (n,), generator=g)
