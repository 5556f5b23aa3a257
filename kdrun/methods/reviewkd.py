"""Chen, Liu, Zhao & Jia 2021, "Distilling Knowledge via Knowledge Review" (mdistiller
mdistiller/distillers/ReviewKD.py; the authors' dvlab-research/ReviewKD CIFAR-100/model/reviewkd.py)."""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from kdrun.errors import ConfigError
from kdrun.features import layer_pairs, model_device, pair_error
from kdrun.methods.base import Forward, Method
from kdrun.methods.common import config_number, is_auto, stage_lists
from kdrun.methods.registry import register_method

HCL_LEVELS = (4, 2, 1)  # the pyramid's pooled sizes, each weighted half the one before
REVIEWABLE = "needs C x H x W feature maps or pooled D vectors (taken as D x 1 x 1) on both sides"


def hcl_loss(s_feats: Sequence[torch.Tensor], t_feats: Sequence[torch.Tensor]) -> torch.Tensor:
    """Hierarchical context loss, summed over levels: per level, `mean((f_s - f_t)^2)` plus the same on both maps
    average-pooled to 4x4, 2x2, 1x1 (only the sizes below the map's height), the k-th pooled size weighted
    1/2^k, all divided by the sum of the weights. `s_feats[i]` is the ABF output at `t_feats[i]`'s shape."""
    total = 0.0
    for f_s, f_t in zip(s_feats, t_feats, strict=True):
        f_s, f_t = f_s.float(), f_t.float()
        height = f_s.shape[2]
        loss, weight, weights = F.mse_loss(f_s, f_t), 1.0, 1.0
        for size in HCL_LEVELS:
            if size >= height:
                continue
            weight /= 2.0
            loss = loss + weight * F.mse_loss(F.adaptive_avg_pool2d(f_s, size), F.adaptive_avg_pool2d(f_t, size))
            weights += weight
        total = total + loss / weights
    return total


class ABF(nn.Module):
    """Attention-based fusion: a 1x1 conv + BN takes the student's map to `mid_channels`; with `fuse`, the
    residual from the deeper level, resized (nearest) to this map's size, is mixed in by two sigmoid attention
    maps from a 1x1 conv on both; the result is resized (nearest) to the teacher's size and a 3x3 conv + BN
    gives the teacher's channels. Returns (output, residual for the next shallower level)."""

    def __init__(self, in_channels: int, mid_channels: int, out_channels: int, fuse: bool):
        super().__init__()
        self.conv1 = nn.Sequential(nn.Conv2d(in_channels, mid_channels, kernel_size=1, bias=False),
                                   nn.BatchNorm2d(mid_channels))
        self.conv2 = nn.Sequential(nn.Conv2d(mid_channels, out_channels, kernel_size=3, padding=1, bias=False),
                                   nn.BatchNorm2d(out_channels))
        self.att_conv = nn.Sequential(nn.Conv2d(2 * mid_channels, 2, kernel_size=1), nn.Sigmoid()) if fuse else None
        nn.init.kaiming_uniform_(self.conv1[0].weight, a=1)
        nn.init.kaiming_uniform_(self.conv2[0].weight, a=1)

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None,
                out_size: Sequence[int] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        x = self.conv1(x)
        if self.att_conv is not None:
            if residual is None:
                raise ValueError("a fusing ABF needs the residual of the deeper level")
            residual = F.interpolate(residual, tuple(x.shape[2:]), mode="nearest")
            attention = self.att_conv(torch.cat([x, residual], dim=1))
            x = x * attention[:, 0:1] + residual * attention[:, 1:2]
        if out_size is not None and tuple(x.shape[2:]) != tuple(out_size):
            x = F.interpolate(x, tuple(out_size), mode="nearest")
        return self.conv2(x), x


def review(abfs: Sequence[ABF], s_feats: Sequence[torch.Tensor],
           out_sizes: Sequence[Sequence[int]]) -> list[torch.Tensor]:
    """The review path: from the deepest level (whose ABF does not fuse) to the shallowest, each ABF fuses its
    student map with the residual of the level below; lists are shallow to deep, so is the result."""
    outputs = []
    residual = None
    for abf, feat, size in zip(reversed(abfs), reversed(s_feats), reversed(out_sizes), strict=True):
        out, residual = abf(feat, residual, size)
        outputs.insert(0, out)
    return outputs


def as_map(feature: torch.Tensor) -> torch.Tensor:
    """A pooled N x D feature as the N x D x 1 x 1 map mdistiller makes of `pooled_feat`."""
    return feature[:, :, None, None] if feature.dim() == 2 else feature


def map_shape(shape) -> tuple[int, int, int] | None:
    """A recorded (per-sample) shape as C x H x W, or None when it is neither a map nor a vector."""
    if len(shape) == 1:
        return (int(shape[0]), 1, 1)
    return tuple(int(d) for d in shape) if len(shape) == 3 else None


@register_method("reviewkd")
class ReviewKD(Method):
    """Chen et al. 2021, Distilling Knowledge via Knowledge Review: ABF fusion of the student's levels, HCL loss.

    Keys: `pairs` (student, teacher) layers, shallow to deep, default `auto`: every stage plus the pooled
    feature, as mdistiller pairs the student's feats[1:] + pooled_feat (preact_feats with `stu_preact`) with the
    teacher's preact_feats[1:] + pooled_feat, so s1..sN + pool with s1_pre..sN_pre + pool. With different stage
    counts (resnet8x4 -> vgg13: 3 and 4) the last k stages of each are paired (mdistiller has no rule there: its
    channel and size lists are written per pair). One ABF per pair, its channels and sizes taken from the
    recorded shapes instead of mdistiller's IN_CHANNELS / OUT_CHANNELS / SHAPES / OUT_SHAPES lists; mid channels
    `min(max_mid_channel, C of the deepest student layer)` (mdistiller writes 512 and leaves MAX_MID_CHANNEL
    unused). The term `reviewkd` (`hcl_loss` of the ABF outputs against the teacher's features) has weight
    `beta * min(epoch / warmup, 1)`, epochs from 1 as mdistiller counts them (the authors' train.py counts from
    0, so its first epoch has weight 0). CE keeps `ce_weight` (1); `alpha` adds an optional Hinton KD term.
    """

    term_names = ("reviewkd",)
    official_code = ("mdistiller mdistiller/distillers/ReviewKD.py (ABF channels and sizes from the recorded "
                     "feature shapes, not per-pair lists; the last k stages when the stage counts differ)")

    def __init__(self, cfg, student, teacher, num_classes):
        super().__init__(cfg, student, teacher, num_classes)
        self.warmup = config_number(cfg, "warmup", 20.0)
        self.max_mid_channel = config_number(cfg, "max_mid_channel", 512, minimum=0, strict=True, integer=True)
        self.stu_preact = cfg.get("stu_preact", False)
        if not isinstance(self.stu_preact, bool):
            raise ConfigError(f"method.stu_preact={self.stu_preact} is not allowed: true or false")
        self.pairs = self._default_pairs(cfg) if is_auto(cfg.get("pairs")) else self._given_pairs(cfg)
        self.abfs = nn.ModuleList()
        self.out_sizes: list[tuple[int, int]] = []
        self.warmup_factor = 0.0

    def _default_pairs(self, cfg) -> list[tuple[str, str]]:
        def example(s_stages, t_stages):
            k = min(len(s_stages), len(t_stages))
            return "[" + ",".join(f"[{s},{t}_pre]" for s, t in zip(s_stages[-k:], t_stages[-k:])) + ",[pool,pool]]"

        s_stages, t_stages = stage_lists("reviewkd", self.student, self.teacher, example, align_last=True)
        s_suffix = "_pre" if self.stu_preact else ""
        return [(s + s_suffix, t + "_pre") for s, t in zip(s_stages, t_stages)] + [("pool", "pool")]

    @staticmethod
    def _given_pairs(cfg) -> list[tuple[str, str]]:
        value = cfg.get("pairs")
        if isinstance(value, str):
            raise ConfigError(f"method.pairs={value} is not allowed: auto, or a non-empty list of [student, "
                              "teacher] layer names, shallow to deep, e.g. [[s2,s2_pre],[s3,s3_pre],[pool,pool]]")
        return layer_pairs(value)

    def build(self, s_shapes, t_shapes) -> None:
        s_maps, t_maps = [], []
        for s, t in self.pairs:
            s_map, t_map = map_shape(s_shapes[s]), map_shape(t_shapes[t])
            if s_map is None or t_map is None:
                raise pair_error("reviewkd", (s, t), s_shapes[s], t_shapes[t], REVIEWABLE)
            s_maps.append(s_map)
            t_maps.append(t_map)
        mid_channels = min(self.max_mid_channel, s_maps[-1][0])
        last = len(self.pairs) - 1
        for i, (s_map, t_map) in enumerate(zip(s_maps, t_maps)):
            self.abfs.append(ABF(s_map[0], mid_channels, t_map[0], fuse=i < last))
        self.out_sizes = [t_map[1:] for t_map in t_maps]
        self.abfs.to(model_device(self.student))

    def begin_epoch(self, epoch: int) -> None:
        super().begin_epoch(epoch)
        self.warmup_factor = warmup_factor(epoch, self.warmup)

    def weights(self) -> dict[str, float]:
        weights = super().weights()
        weights["reviewkd"] *= self.warmup_factor
        return weights

    def method_terms(self, fw: Forward) -> dict[str, torch.Tensor]:
        s_feats = [as_map(fw.s_feats[s]) for s, _ in self.pairs]
        t_feats = [as_map(fw.t_feats[t]) for _, t in self.pairs]
        return {"reviewkd": hcl_loss(review(self.abfs, s_feats, self.out_sizes), t_feats)}


def warmup_factor(epoch: int, warmup: float) -> float:
    """`min(epoch / warmup, 1)`, epochs from 1; no warm-up (1) when `warmup` is 0."""
    return min(epoch / warmup, 1.0) if warmup > 0 else 1.0
