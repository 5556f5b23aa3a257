"""Datasets: registry entries load whole datasets into memory (or a folder loader for `imagefolder`)."""
from kdrun.data.registry import DATASETS, ImageData, register_dataset
from kdrun.data.imagefolder import FolderData, FolderLoader
from kdrun.data.loader import TensorLoader, make_loaders
from kdrun.data import cifar, digits, imagefolder, linear_teacher, mnist  # noqa: F401  (registers datasets)


def load_dataset(cfg) -> ImageData | FolderData:
    """Load the dataset named by the `dataset` config node (refuses unknown names and missing files)."""
    return DATASETS.get(cfg.name)(cfg)


__all__ = ["DATASETS", "FolderData", "FolderLoader", "ImageData", "TensorLoader", "load_dataset", "make_loaders",
           "register_dataset"]
