"""Datasets: registry entries load whole datasets into memory (or a folder loader for `imagefolder`)."""
from kdrun.data.registry import DATASETS, ImageData, register_dataset
from kdrun.data.loader import TensorLoader, make_loaders
from kdrun.data import digits  # noqa: F401  (registers datasets)


def load_dataset(cfg) -> ImageData:
    """Load the dataset named by the `dataset` config node (refuses unknown names and missing files)."""
    return DATASETS.get(cfg.name)(cfg)


__all__ = ["DATASETS", "ImageData", "TensorLoader", "load_dataset", "make_loaders", "register_dataset"]
