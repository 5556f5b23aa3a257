"""`transfer=labelled` (the default): the dataset's labelled training split, exactly as the runner always
used it; `transfer.labelled_fraction=f` keeps a stratified fraction of it for teacher and student alike."""
from __future__ import annotations

from kdrun.data.registry import ImageData
from kdrun.transfer.base import TransferSet, fraction, require_in_memory, stratified_split, with_train_split
from kdrun.transfer.registry import register_transfer


def labelled_split(cfg, data, option: str):
    """The dataset restricted to `transfer.labelled_fraction` of its training split (stratified, seeded by
    `transfer.split_seed`; the teacher's cache key says which: `teachers.teacher_train_subset`), and the
    rest's indices."""
    keep = fraction(cfg, "labelled_fraction", 1.0)
    if keep == 1.0:
        return data, None
    require_in_memory(cfg, data, f"{option} with transfer.labelled_fraction")
    seed = int(cfg.transfer.get("split_seed", 0))
    kept, rest = stratified_split(data.train_labels, keep, seed)
    return with_train_split(data, kept), rest


@register_transfer("labelled", "the dataset's labelled training split (or a stratified labelled_fraction of it)")
def build(cfg, data) -> TransferSet:
    teacher_data, _ = labelled_split(cfg, data, "labelled")
    if not isinstance(data, ImageData):
        return TransferSet("labelled", None, None, data)
    return TransferSet("labelled", teacher_data.train_images, teacher_data.train_labels, teacher_data)
