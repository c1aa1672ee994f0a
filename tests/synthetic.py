"""Small synthetic data sets the tests make for themselves (never the real CIFAR images).

Each class gets its own dominant colour plus noise, so a model trained for one epoch on a few
hundred images already tells them apart: enough to see real predictions end to end.
"""

from __future__ import annotations

import io
import pickle
import struct
import zlib
from pathlib import Path

import numpy as np
from PIL import Image

from cifar3.classes import CIFAR10_CLASSES

COLOURS = {"airplane": (40, 90, 220), "automobile": (220, 40, 40), "ship": (40, 200, 60)}
# Images that are none of the classes: colours no class has (CIFAR-10's other classes default to grey below).
UNKNOWN_COLOURS = {"grey": (128, 128, 128), "yellow": (210, 200, 40)}


def class_images(name: str, count: int, seed: int = 0, size: int = 32) -> np.ndarray:
    """uint8 count x size x size x 3 images of the class's colour with noise."""
    rng = np.random.default_rng(zlib.crc32(f"{name}:{seed}".encode()))
    base = np.array(COLOURS.get(name, UNKNOWN_COLOURS.get(name, (128, 128, 128))), dtype=np.float32)
    noise = rng.normal(0, 40, size=(count, size, size, 3))
    return np.clip(base + noise, 0, 255).astype(np.uint8)


def write_image_folder(root: Path, per_class: int = 40, classes=tuple(COLOURS), fmt: str = "png") -> Path:
    for name in classes:
        folder = root / name
        folder.mkdir(parents=True, exist_ok=True)
        for i, pixels in enumerate(class_images(name, per_class)):
            Image.fromarray(pixels).save(folder / f"{i:04d}.{fmt}")
    return root


def write_unknown_folder(root: Path, per_source: int = 40) -> Path:
    """Unknown images in nested sub-folders (any layout is allowed): root/<source>/more/NNNN.png."""
    for name in UNKNOWN_COLOURS:
        folder = root / name / "more"
        folder.mkdir(parents=True, exist_ok=True)
        for i, pixels in enumerate(class_images(name, per_source, seed=7)):
            Image.fromarray(pixels).save(folder / f"{i:04d}.png")
    return root


def write_cifar_batches(root: Path, per_class_train: int = 30, per_class_test: int = 10) -> Path:
    """A cifar-10-batches-py folder with all ten CIFAR-10 classes, in CIFAR's exact pickle layout."""
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / "batches.meta", "wb") as f:
        pickle.dump({"label_names": list(CIFAR10_CLASSES), "num_cases_per_batch": 0, "num_vis": 3072}, f)

    def batch(per_class: int, seed: int) -> dict:
        images, labels = [], []
        for label, name in enumerate(CIFAR10_CLASSES):
            pixels = class_images(name, per_class, seed)
            images.append(pixels.transpose(0, 3, 1, 2).reshape(per_class, -1))
            labels += [label] * per_class
        return {"data": np.concatenate(images), "labels": labels, "batch_label": "synthetic"}

    for i in (1, 2):
        with open(folder / f"data_batch_{i}", "wb") as f:
            pickle.dump(batch(per_class_train // 2, seed=i), f)
    with open(folder / "test_batch", "wb") as f:
        pickle.dump(batch(per_class_test, seed=99), f)
    return folder


def encode(image: Image.Image, fmt: str = "PNG", **options) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **options)
    return buffer.getvalue()


def sample_image(name: str = "ship", size: int = 32, seed: int = 7) -> Image.Image:
    return Image.fromarray(class_images(name, 1, seed, size)[0])


def png_with_declared_size(width: int, height: int) -> bytes:
    """A PNG whose header claims width x height: a decompression bomb that costs nothing to make."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")
