"""Images for calibration and top-1 evaluation: local folders or a ``datasets`` image data set.

Sources (one string, as ``--calib`` / ``--data`` take it):

* an ImageNet-style folder of class subfolders: label = index of the subfolder in sorted order
  (torchvision ``ImageFolder`` semantics);
* a flat folder of images. Files named ``n<wnid>_*`` (the ImageNet sample set) are labelled by the
  wnid's ImageNet class index when every wnid is an ImageNet synset (timm's ``ImageNetInfo``;
  for the full 1,000-image sample this equals the sorted file index), otherwise by the wnid's
  index among the folder's sorted wnids; other flat folders have no labels (fine for
  calibration, an error for evaluation);
* ``imagenet-sample``: the shared offline sample set (``$CDQ_DATA_DIR/images/imagenet-sample``);
* ``hf:NAME[:split]``: a Hugging Face ``datasets`` image data set (its Image column, and its
  ClassLabel column as labels). Offline this fails at once with one line.

Every image goes through the model's own timm transform (``create_transform`` of its data config):
the eval transform, or with ``augment`` timm's training augmentation (COMQ calibrates on
augmented training images). Sampling and augmentation are reproducible from ``seed``.
"""

from __future__ import annotations

import hashlib
import random
import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ..offline import data_dir, hub_offline
from .text import DataSourceError

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff")
SAMPLE_SET = "imagenet-sample"
HF_PREFIX = "hf:"
_WNID = re.compile(r"(n\d{8})_")


@dataclass
class ImageSet:
    """An indexable set of images with optional integer labels."""

    source: str
    layout: str  # "class-folders", "flat-wnid", "flat", "hf"
    items: list[Any]  # file paths, or row indices of ``dataset``
    labels: list[int] | None
    dataset: Any = field(default=None, repr=False)
    image_key: str | None = None

    def __len__(self) -> int:
        return len(self.items)

    def image(self, index: int) -> Any:
        """The ``index``-th image as an RGB ``PIL.Image``."""
        from PIL import Image, UnidentifiedImageError

        item = self.items[index]
        if self.dataset is not None:
            picture = self.dataset[item][self.image_key]
            return picture.convert("RGB")
        try:
            with Image.open(item) as picture:
                return picture.convert("RGB")
        except (OSError, UnidentifiedImageError) as exc:
            raise DataSourceError(f"cannot read image {item}: {exc}") from None

    def subset(self, indices: Sequence[int]) -> ImageSet:
        labels = [self.labels[i] for i in indices] if self.labels is not None else None
        return ImageSet(
            self.source, self.layout, [self.items[i] for i in indices], labels, self.dataset, self.image_key
        )

    def fingerprint(self) -> str:
        """sha256 over the item names (file names relative to the source, or row indices) and labels."""
        digest = hashlib.sha256()
        root = Path(self.source).expanduser() if self.dataset is None else None
        for k, item in enumerate(self.items):
            name = str(Path(item).relative_to(root)) if root is not None and root.is_dir() else str(item)
            label = self.labels[k] if self.labels is not None else ""
            digest.update(f"{name}\t{label}\n".encode())
        return digest.hexdigest()


def open_images(source: str, *, split: str = "validation") -> ImageSet:
    """The images of ``source`` (see the module docstring); ``split`` is for ``hf:`` sources."""
    if source.startswith(HF_PREFIX):
        return _hf(source, split)
    if source == SAMPLE_SET:
        root = data_dir()
        folder = root / "images" / SAMPLE_SET if root is not None else None
        if folder is None or not folder.is_dir():
            raise DataSourceError(f"the shared {SAMPLE_SET} folder is missing (set CDQ_DATA_DIR)")
        return _folder(folder, source)
    path = Path(source).expanduser()
    if not path.exists():
        raise DataSourceError(f"no such image folder: {source}")
    if not path.is_dir():
        raise DataSourceError(f"{source} is a file; expected a folder of images (or class subfolders)")
    return _folder(path, source)


def sample_indices(total: int, nsamples: int, seed: int, *, repeat: bool = False) -> list[int]:
    """``nsamples`` distinct indices drawn with ``random.Random(seed)`` (all of them if fewer);
    with ``repeat`` (augmented calibration) further passes draw new permutations."""
    rng = random.Random(seed)
    if nsamples <= total or not repeat:
        return rng.sample(range(total), min(nsamples, total))
    out: list[int] = []
    while len(out) < nsamples:
        out.extend(rng.sample(range(total), total))
    return out[:nsamples]


def make_transform(config: dict[str, Any], *, augment: bool = False) -> Any:
    """timm's eval transform of ``config`` (a data config), or its training augmentation."""
    from timm.data import create_transform

    size = tuple(config["input_size"])
    keys = (
        ("interpolation", "mean", "std")
        if augment
        else ("interpolation", "mean", "std", "crop_pct", "crop_mode")
    )
    kwargs = {
        key: tuple(config[key]) if isinstance(config[key], list) else config[key]
        for key in keys
        if key in config
    }
    return create_transform(input_size=size, is_training=augment, **kwargs)


def calibration_images(
    images: ImageSet, config: dict[str, Any], *, nsamples: int, seed: int, augment: bool = False
) -> tuple[torch.Tensor, list[int]]:
    """(N, C, H, W) calibration tensor and the image indices used, reproducible from ``seed``."""
    indices = sample_indices(len(images), nsamples, seed, repeat=augment)
    transform = make_transform(config, augment=augment)
    state = random.getstate()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        random.seed(seed)
        try:
            tensors = [transform(images.image(i)) for i in indices]
        finally:
            random.setstate(state)
    return torch.stack(tensors), indices


def labelled_batches(
    images: ImageSet, config: dict[str, Any], *, batch_size: int = 32
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """(images, labels) batches in order through the eval transform; needs labels."""
    if images.labels is None:
        raise DataSourceError(
            f"{images.source}: cannot tell the images' classes (use class subfolders or n<wnid>_ file names)"
        )
    transform = make_transform(config)
    for start in range(0, len(images), batch_size):
        stop = min(start + batch_size, len(images))
        batch = torch.stack([transform(images.image(i)) for i in range(start, stop)])
        yield batch, torch.tensor(images.labels[start:stop], dtype=torch.long)


def _folder(path: Path, source: str) -> ImageSet:
    classes = sorted(p for p in path.iterdir() if p.is_dir() and not p.name.startswith("."))
    if classes:
        items, labels = [], []
        for label, folder in enumerate(classes):
            files = sorted(f for f in folder.rglob("*") if _is_image(f))
            items.extend(files)
            labels.extend([label] * len(files))
        if not items:
            raise DataSourceError(f"image folder {source} holds no images ({', '.join(IMAGE_SUFFIXES)})")
        return ImageSet(source, "class-folders", items, labels)
    files = sorted(f for f in path.iterdir() if _is_image(f))
    if not files:
        raise DataSourceError(f"image folder {source} holds no images ({', '.join(IMAGE_SUFFIXES)})")
    wnids = [_WNID.match(f.name) for f in files]
    if all(wnids):
        return ImageSet(source, "flat-wnid", files, _wnid_labels([m.group(1) for m in wnids]))
    return ImageSet(source, "flat", files, None)


def _wnid_labels(wnids: list[str]) -> list[int]:
    """ImageNet class indices of ``wnids`` if all are ImageNet synsets, else sorted-wnid indices."""
    try:
        from timm.data import ImageNetInfo

        index = {wnid: k for k, wnid in enumerate(ImageNetInfo().label_names())}
    except (ImportError, OSError, ValueError):
        index = {}
    if index and all(w in index for w in wnids):
        return [index[w] for w in wnids]
    order = {wnid: k for k, wnid in enumerate(sorted(set(wnids)))}
    return [order[w] for w in wnids]


def _is_image(path: Path) -> bool:
    return path.is_file() and path.suffix.lower() in IMAGE_SUFFIXES and not path.name.startswith(".")


def _hf(source: str, split: str) -> ImageSet:
    name, _, chosen = source[len(HF_PREFIX) :].partition(":")
    split = chosen or split
    if not name:
        raise DataSourceError(f"expected hf:NAME[:split], got {source!r}")
    fail = (
        f"cannot load image data set '{name}' ({split}) from the Hugging Face hub; pass a local image folder"
    )
    if hub_offline():
        raise DataSourceError(f"{fail} (offline)")
    try:
        from datasets import load_dataset

        ds = load_dataset(name, split=split)
    except (OSError, RuntimeError, ValueError) as exc:
        reason = str(exc).strip().splitlines()[0][:160] if str(exc).strip() else type(exc).__name__
        raise DataSourceError(f"{fail} ({reason})") from exc
    features = ds.features
    image_key = next((k for k, f in features.items() if type(f).__name__ == "Image"), None)
    if image_key is None:
        raise DataSourceError(f"data set '{name}' has no image column")
    label_key = next((k for k, f in features.items() if type(f).__name__ == "ClassLabel"), None)
    labels = [int(v) for v in ds[label_key]] if label_key is not None else None
    return ImageSet(source, "hf", list(range(len(ds))), labels, ds, image_key)
