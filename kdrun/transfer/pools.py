"""Images without labels from another source: a registered dataset's training split, or any folder of
image files, made to the dataset's shape (refused unless `transfer.resize=true` when they differ)."""
from __future__ import annotations

from pathlib import Path

import torch
from omegaconf import OmegaConf

from kdrun.data.registry import DATASETS, ImageData, one_line
from kdrun.errors import ConfigError
from kdrun.paths import conf_dir
from kdrun.transfer.base import fit_images

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff")


def load_pool(key: str, source: str, shape: tuple[int, int, int], resize: bool, root: str | None = None,
              download: bool = False) -> tuple[torch.Tensor, dict]:
    """uint8 images N x C x H x W from `source`, a dataset name or an image folder path, at `shape`; and
    what the record says of them (where from, how many, how they were converted)."""
    source = str(source)
    what = f"{key}={source}"
    if source in DATASETS.names():
        groups = [dataset_images(key, source, root, download)]
    elif _looks_like_path(source):
        groups = folder_images(key, source)
    else:
        raise ConfigError(f"{key}={source} is not allowed: a dataset name ({', '.join(DATASETS.names())}) or the "
                          "path of a folder of image files")
    fitted, notes = [], set()
    for group in groups:  # a folder's images may come in several sizes: each size is converted on its own
        images, note = fit_images(group, shape, what, resize)
        fitted.append(images)
        notes.add(note)
    images = torch.cat(fitted)
    notes.discard(None)
    return images, {"source": source, "images": len(images), "converted": "; ".join(sorted(notes)) or None}


def _looks_like_path(source: str) -> bool:
    return "/" in source or source.startswith((".", "~")) or Path(source).expanduser().exists()


def dataset_images(key: str, name: str, root: str | None, download: bool) -> torch.Tensor:
    """The training images of a registered dataset, read with its shipped config (and `transfer.root`,
    `transfer.download` if given); its loader's refusal names the transfer keys, not the dataset's."""
    node = OmegaConf.load(conf_dir() / "dataset" / f"{name}.yaml")
    if root is not None:
        node.root = root
    if download and "download" in node:
        node.download = True
    try:
        data = DATASETS.get(name)(node)
    except ConfigError as err:
        message = str(err).replace("dataset.root", "transfer.root").replace("dataset.download", "transfer.download")
        raise ConfigError(f"{key}={name}: {message}") from None
    if not isinstance(data, ImageData) or data.train_images.dtype != torch.uint8:
        raise ConfigError(f"dataset {name} cannot serve as a pool of images: it is not an in-memory image set")
    return data.train_images


def folder_images(key: str, source: str) -> list[torch.Tensor]:
    """Every image file below the folder (any layout), grouped by size: uint8 N x C x H x W per group."""
    import numpy as np
    from PIL import Image, UnidentifiedImageError

    folder = Path(source).expanduser()
    if not folder.is_dir():
        raise ConfigError(f"{key}={source} is not allowed: no such folder (a dataset name or a folder of images)")
    files = sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
    if not files:
        raise ConfigError(f"{key}={source} holds no image files ({', '.join(IMAGE_SUFFIXES)})")
    by_shape: dict[tuple, list[torch.Tensor]] = {}
    for path in files:
        try:
            with Image.open(path) as opened:  # grey stays grey, anything else becomes RGB (alpha dropped)
                image = opened.convert("L" if opened.mode in ("1", "L", "LA", "I", "I;16", "F") else "RGB")
        except (OSError, UnidentifiedImageError, ValueError) as err:
            raise ConfigError(f"{key}={source}: {path} is not a readable image ({one_line(err)})") from None
        array = np.asarray(image, dtype=np.uint8)
        tensor = torch.from_numpy(array.copy()).unsqueeze(0) if array.ndim == 2 else torch.from_numpy(
            array.copy()).permute(2, 0, 1)
        by_shape.setdefault(tuple(tensor.shape), []).append(tensor)
    return [torch.stack(group) for group in by_shape.values()]
