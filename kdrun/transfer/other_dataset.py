"""`transfer=other_dataset` with `transfer.images=<dataset>|<folder>`: the student learns only from another
source's images, labelled by the teacher (its soft outputs; no ground-truth label), and is tested on
`dataset`'s test split, e.g. a fashion_mnist teacher distilled through mnist digits."""
from __future__ import annotations

import torch

from kdrun.errors import ConfigError
from kdrun.transfer.base import NO_LABEL, TransferSet, require_in_memory
from kdrun.transfer.pools import load_pool
from kdrun.transfer.registry import register_transfer


@register_transfer("other_dataset", "another dataset's (or folder's) images, labelled by the teacher only")
def build(cfg, data) -> TransferSet:
    require_in_memory(cfg, data, "other_dataset")
    source = cfg.transfer.get("images")
    if source is None or str(source).strip() == "":
        raise ConfigError("transfer.images is not set: the dataset name or image folder the student learns from, "
                          "e.g. transfer.images=mnist")
    if str(source) == cfg.dataset.name:
        raise ConfigError(f"transfer.images={source} is not allowed: it is the dataset itself; for its images "
                          "without labels use transfer=label_free")
    images, about = load_pool("transfer.images", source, data.image_shape, bool(cfg.transfer.get("resize")),
                              cfg.transfer.get("root"),
                              bool(cfg.transfer.get("download")))
    labels = torch.full((len(images),), NO_LABEL, dtype=torch.long)
    return TransferSet("other_dataset", images, labels, data, has_labels=False,
                       record={"transfer_images_converted": about["converted"]})
