"""Data sources for --data, all loaded into memory as uint8 tensors (N x 3 x 32 x 32).

- ``cifar10``: torchvision's CIFAR10, downloaded and cached under ``data/``.
- a local ``cifar-10-batches-py`` folder (or its parent): read directly, no download.
- an image folder with one sub-folder per class holding JPEG/PNG files; the sub-folder names are the class
  names, any names (``resolve_classes``: all of them, sorted, unless --classes selects and orders them).

CIFAR-3 is tiny (15,000 images = 46 MB as uint8), so holding it as one tensor lets augmentation run
batched on the training device instead of per image in DataLoader workers.
"""

from __future__ import annotations

import pickle
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from sklearn.model_selection import train_test_split
from torchvision.datasets import CIFAR10
from tqdm import tqdm

from cifar3.classes import CIFAR10_CLASSES, DEFAULT_CLASSES, parse_classes
from cifar3.preprocessing import IMAGE_SIZE, IMAGE_SUFFIXES, pil_to_uint8, read_image_file

# The cifar10 download cache: the current directory's data/ (the repository root's, where the commands run). Not the
# module's location: installed (cifar3_training), that is site-packages.
DEFAULT_DATA_ROOT = Path("data")
CIFAR_DIR = "cifar-10-batches-py"


class DataError(RuntimeError):
    """The data source cannot be used; the message says what is wrong and what to do."""


@dataclass
class Dataset:
    images: torch.Tensor  # uint8, N x 3 x H x W
    labels: torch.Tensor  # int64, N; index into the class list
    source: str
    paths: list[str] | None = None  # per image, for image folders
    sources: list[str] | None = None  # unknown images (training/unknowns.py): label i is sources[i], not a class

    def __len__(self) -> int:
        return len(self.labels)


def is_cifar_source(source: str) -> bool:
    """'cifar10', a cifar-10-batches-py folder or its parent (anything else is an image folder)."""
    if source == "cifar10":
        return True
    path = Path(source).expanduser()
    return any((folder / "batches.meta").is_file() for folder in (path, path / CIFAR_DIR))


def resolve_classes(source: str, text: str | None = None, unknown_data: str | None = None) -> list[str]:
    """The classes to train on, in label order: ``text`` (--classes, comma-separated) or, without it, a CIFAR
    source's DEFAULT_CLASSES and an image folder's sub-folders sorted by name. Only a CIFAR source's names are
    checked against CIFAR-10's; an image folder's are checked when it is read. A sub-folder that is the
    ``unknown_data`` folder holds images that are none of the classes: it is never one of them."""
    if is_cifar_source(source):
        return parse_classes(text or ",".join(DEFAULT_CLASSES), CIFAR10_CLASSES)
    root = _data_folder(source)
    unknown = Path(unknown_data).expanduser().resolve() if unknown_data else None
    if unknown == root.resolve():
        raise DataError(f"--unknown-data is the --data folder itself ({root}); pass a folder of images that are "
                        "none of the classes, outside the class folders")  # fmt: skip
    excluded = unknown.name if unknown is not None and unknown.parent == root.resolve() else None
    if text is not None:
        names = parse_classes(text)
        if excluded in names:
            raise DataError(f"--classes names {excluded}, the --unknown-data folder: its images are none of the "
                            "classes, so it cannot be one")  # fmt: skip
        return names
    names = sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith(".") and p.name != excluded)
    if len(names) < 2:
        raise DataError(
            f"{root} needs one sub-folder per class, at least two (found: {', '.join(names) or 'none'}). "
            "Put each class's images in a folder named after the class: songbird/, lorry/, ..."
        )
    return names


def _data_folder(source: str) -> Path:
    path = Path(source).expanduser()
    if not path.exists():
        raise DataError(
            f"data path not found: {path}. Pass 'cifar10', a cifar-10-batches-py folder or an image folder."
        )
    if not path.is_dir():
        raise DataError(f"data path is not a folder: {path}")
    return path


def load_split(source: str, classes: list[str], split: str, data_root: Path = DEFAULT_DATA_ROOT) -> Dataset:
    """split is 'train' or 'test'. An image folder has no split: it is returned whole."""
    if source == "cifar10":
        return _load_cifar_batches(_download_cifar10(data_root), classes, split)
    path = _data_folder(source)
    for candidate in (path, path / CIFAR_DIR):
        if (candidate / "batches.meta").is_file():
            return _load_cifar_batches(candidate, classes, split)
    return _load_image_folder(path, classes)


def _download_cifar10(data_root: Path) -> Path:
    try:
        CIFAR10(root=str(data_root), train=True, download=True)
    except Exception as exc:  # URLError, timeouts, HTTP errors: all mean "no download here"
        raise DataError(
            f"could not download CIFAR-10 into {data_root} ({exc.__class__.__name__}: {exc}). "
            "Offline? Pass --data PATH with a local cifar-10-batches-py folder or an image folder "
            "with one sub-folder per class."
        ) from None
    return data_root / CIFAR_DIR


def _unpickle(path: Path) -> dict:
    try:
        with open(path, "rb") as f:
            return pickle.load(f, encoding="latin1")
    except FileNotFoundError:
        raise DataError(f"missing CIFAR batch file: {path}") from None
    except Exception as exc:
        raise DataError(f"unreadable CIFAR batch file {path}: {exc}") from None


def _load_cifar_batches(folder: Path, classes: list[str], split: str) -> Dataset:
    label_names = _unpickle(folder / "batches.meta")["label_names"]
    missing = [c for c in classes if c not in label_names]
    if missing:
        raise DataError(f"{folder} has no class {', '.join(missing)}; it has {', '.join(label_names)}")
    files = sorted(folder.glob("data_batch_*")) if split == "train" else [folder / "test_batch"]
    if not files:
        raise DataError(f"no data_batch_* files in {folder}")
    # CIFAR index -> our label, looked up by name (never hand-typed indices).
    remap = np.full(len(label_names), -1, dtype=np.int64)
    for ours, name in enumerate(classes):
        remap[label_names.index(name)] = ours
    images, labels = [], []
    for file in files:
        batch = _unpickle(file)
        targets = remap[np.asarray(batch["labels"])]
        keep = targets >= 0
        images.append(np.asarray(batch["data"], dtype=np.uint8).reshape(-1, 3, 32, 32)[keep])
        labels.append(targets[keep])
    data = torch.from_numpy(np.concatenate(images))
    if data.shape[-1] != IMAGE_SIZE:
        data = torch.nn.functional.interpolate(data.float(), size=IMAGE_SIZE, mode="bicubic").clamp(0, 255).byte()
    return Dataset(data, torch.from_numpy(np.concatenate(labels)), f"{folder} ({split})")


def _load_image_folder(root: Path, classes: list[str]) -> Dataset:
    missing = [c for c in classes if not (root / c).is_dir()]
    if missing:
        present = sorted(p.name for p in root.iterdir() if p.is_dir())
        raise DataError(
            f"{root} has no folder for class {', '.join(missing)} (found: {', '.join(present) or 'none'}). "
            "An image folder needs one sub-folder per class name."
        )
    files = [
        (path, label)
        for label, name in enumerate(classes)
        for path in sorted((root / name).iterdir())
        if path.suffix.lower() in IMAGE_SUFFIXES
    ]
    if not files:
        raise DataError(f"no images ({', '.join(IMAGE_SUFFIXES)}) in the class folders of {root}")
    empty = [c for i, c in enumerate(classes) if not any(label == i for _, label in files)]
    if empty:
        raise DataError(f"no images for class {', '.join(empty)} in {root}")
    images, labels, bad = [], [], []
    for path, label in tqdm(files, desc=f"reading {root.name}", unit="img", disable=None, leave=False):
        try:
            images.append(pil_to_uint8(read_image_file(path)))  # decoded as the handler decodes uploads
            labels.append(label)
        except (OSError, ValueError):  # ImageDecodeError is a ValueError
            bad.append(path)
    if bad:
        shown = ", ".join(str(p.relative_to(root)) for p in bad[:5])
        more = f" and {len(bad) - 5} more" if len(bad) > 5 else ""
        raise DataError(f"{len(bad)} unreadable image(s) in {root}: {shown}{more}. Remove or replace them.")
    return Dataset(torch.stack(images), torch.tensor(labels), str(root), [str(p) for p, _ in files])


def limit_per_class(data: Dataset, limit: int | None, seed: int) -> Dataset:
    """Keep at most `limit` images of each class, chosen at random with `seed` (quick runs)."""
    if not limit:
        return data
    gen = torch.Generator().manual_seed(seed)
    order = torch.randperm(len(data), generator=gen)
    keep = torch.cat([order[data.labels[order] == c][:limit] for c in data.labels.unique()])
    return _subset(data, keep.sort().values)


def _subset(data: Dataset, idx: torch.Tensor) -> Dataset:
    paths = [data.paths[i] for i in idx.tolist()] if data.paths else None
    return Dataset(data.images[idx], data.labels[idx], data.source, paths, data.sources)


def stratified_split(data: Dataset, val_fraction: float, seed: int) -> tuple[Dataset, Dataset]:
    """(train, validation), stratified by class, reproducible from seed."""
    train_idx, val_idx = train_test_split(
        np.arange(len(data)), test_size=val_fraction, stratify=data.labels.numpy(), random_state=seed
    )
    return _subset(data, torch.from_numpy(np.sort(train_idx))), _subset(data, torch.from_numpy(np.sort(val_idx)))
