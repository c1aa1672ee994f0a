"""Images that are none of the classes: loading them, the synthetic ones training adds, how well they are told apart.

    python -m training.unknowns OUT [--count 200] [--crops-from DIR]

writes a folder of unknown images for ``python -m training.evaluate --unknown-data OUT``, one sub-folder per kind:
``shapes``, ``scribbles``, ``gradients``, ``patterns`` and ``crops``. Training draws its synthetic unknowns from
other kinds (``synthetic_unknowns``: noise, smooth noise, flat colours, shuffled tiles, letters and digits,
enlarged pieces of the unknown images), so the first four measure how the rejection carries over to images unlike
anything it was trained on; ``crops`` (8x8 pieces enlarged four times) is close to the last trained kind.

Unknown data for training (``training.train --unknown-data``) is an image folder of any layout: every image
under it, each labelled with the top-level sub-folder it is in (its *source*, for per-source figures). With a
CIFAR source (``--data cifar10`` or a ``cifar-10-batches-py`` folder) the other CIFAR-10 classes are the
default unknown data.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont
from sklearn.metrics import roc_auc_score
from tqdm import tqdm

from cifar3.classes import CIFAR10_CLASSES
from cifar3.preprocessing import IMAGE_SIZE, IMAGE_SUFFIXES, pil_to_uint8, read_image_file

from .data import (
    DataError,
    Dataset,
    is_cifar_source,
    limit_per_class,
    load_split,
    stratified_split,
)


def load_unknowns(source: str, data_root: Path, split: str = "train", classes: list[str] | None = None) -> Dataset:
    """Unknown images with their source index as label and ``Dataset.sources`` naming each source.

    ``source``: an image folder (any layout), or a CIFAR source whose classes other than ``classes`` are taken.
    """
    if is_cifar_source(source):
        others = [name for name in CIFAR10_CLASSES if name not in (classes or [])]
        data = load_split(source, others, split, data_root)
        data.sources = others
        return data
    root = Path(source).expanduser()
    if not root.is_dir():
        raise DataError(f"--unknown-data: not a folder: {root}. Pass an image folder of images that are none of "
                        "the classes (any sub-folders)")  # fmt: skip
    files = sorted(p for p in root.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise DataError(f"--unknown-data: no images ({', '.join(IMAGE_SUFFIXES)}) under {root}")
    sources = sorted({_source(root, path) for path in files})
    images, labels, bad = [], [], []
    for path in tqdm(files, desc=f"reading {root.name}", unit="img", disable=None, leave=False):
        try:
            images.append(pil_to_uint8(read_image_file(path)))  # decoded as the handler decodes uploads
            labels.append(sources.index(_source(root, path)))
        except (OSError, ValueError):  # ImageDecodeError is a ValueError
            bad.append(path)
    if bad:
        raise DataError(f"--unknown-data: {len(bad)} unreadable image(s) under {root}, e.g. {bad[0]}. Remove them.")
    data = Dataset(torch.stack(images), torch.tensor(labels), str(root), [str(p) for p in files])
    data.sources = sources
    return data


def unknown_split(
    source: str, classes: list[str], data_root: Path, limit: int | None, val_fraction: float, seed: int
) -> tuple[Dataset, Dataset]:
    """(train, validation) of the unknown images, carved like the known split: per source, the same fraction and
    seed. Training uses both; ``training.evaluate --validation`` rebuilds the validation part from a checkpoint."""
    data = limit_per_class(load_unknowns(source, data_root, "train", classes), limit, seed)
    return stratified_split(data, val_fraction, seed)  # both keep data.sources


def _source(root: Path, path: Path) -> str:
    parts = path.relative_to(root).parts
    return parts[0] if len(parts) > 1 else "."


# Synthetic unknowns mixed into training: images with none of the classes' structure. Kept apart from the kinds
# ``write_check_set`` makes (except ``crops``, which cuts from other images at another scale), so that those
# measure generalisation rather than memory.
SYNTHETIC_KINDS = ("noise", "smooth-noise", "flat", "shuffled-tiles", "glyphs", "zoomed-crops")


def synthetic_unknowns(
    count: int, known: torch.Tensor, gen: torch.Generator, unknown: torch.Tensor | None = None
) -> torch.Tensor:
    """``count`` uint8 N x 3 x 32 x 32 images, an equal share of each SYNTHETIC_KINDS, drawn from ``gen``.

    ``known`` (uint8, the training images of the classes) supplies the tiles of ``shuffled-tiles``: 8x8 tiles
    of one image in random order keep its colours and textures but not the shape of any object. ``glyphs`` are
    letters and digits in random colours, sizes and places. ``zoomed-crops`` are 8-16-pixel pieces of the
    ``unknown`` images (when given; else more shuffled tiles) enlarged to the full size."""
    size, kinds = IMAGE_SIZE, len(SYNTHETIC_KINDS)
    per_kind = [count // kinds + (1 if i < count % kinds else 0) for i in range(kinds)]
    n_noise, n_smooth, n_flat, n_tiles, n_glyphs, n_crops = per_kind
    if unknown is None or not len(unknown):
        n_tiles, n_crops = n_tiles + n_crops, 0
    parts = [torch.randint(0, 256, (n_noise, 3, size, size), generator=gen, dtype=torch.uint8).float() / 255]
    sides = torch.randint(2, 9, (n_smooth,), generator=gen).tolist()
    parts += [torch.nn.functional.interpolate(torch.rand(1, 3, side, side, generator=gen), size=size, mode="bicubic")
              for side in sides]  # fmt: skip
    colour = torch.rand(n_flat, 3, 1, 1, generator=gen)
    parts.append(colour + 0.03 * torch.rand(n_flat, 1, 1, 1, generator=gen) * torch.randn(n_flat, 3, size, size,
                                                                                          generator=gen))  # fmt: skip
    picks = known[torch.randint(0, len(known), (n_tiles,), generator=gen)].float() / 255.0
    tiles = picks.unfold(2, 8, 8).unfold(3, 8, 8).reshape(n_tiles, 3, 16, 8, 8)
    order = torch.argsort(torch.rand(n_tiles, 16, generator=gen), dim=1)
    tiles = tiles[torch.arange(n_tiles).view(n_tiles, 1), :, order].permute(0, 2, 1, 3, 4)  # shuffled tiles
    parts.append(tiles.reshape(n_tiles, 3, 4, 4, 8, 8).permute(0, 1, 2, 4, 3, 5).reshape(n_tiles, 3, size, size))
    rng = np.random.default_rng(int(torch.randint(0, 2**31, (1,), generator=gen)))
    parts += [pil_to_uint8(glyph_image(rng)).float().unsqueeze(0) / 255 for _ in range(n_glyphs)]
    for _ in range(n_crops):
        image = unknown[int(rng.integers(0, len(unknown)))].float().unsqueeze(0) / 255
        side = int(rng.integers(8, 17))
        y, x = (int(v) for v in rng.integers(0, size - side + 1, 2))
        crop = image[:, :, y : y + side, x : x + side]
        parts.append(torch.nn.functional.interpolate(crop, size=size, mode="bicubic", align_corners=False))
    images = torch.cat([p.reshape(-1, 3, size, size) for p in parts]) if count else torch.empty(0, 3, size, size)
    return (images.clamp(0, 1) * 255).round().to(torch.uint8)


GLYPHS = "0123456789ABCDEFGHJKLMNPQRSTUVWXYZabdefghkmnqrt"


def glyph_image(rng: np.random.Generator, side: int = 64) -> Image.Image:
    """One to three letters or digits at a random size, weight and place: half of them light on dark or dark on
    light in grey (as a scanned or handwritten character), half in random colours."""
    if rng.random() < 0.5:
        dark, light = int(rng.integers(0, 70)), int(rng.integers(185, 256))
        paper, ink = ((dark,) * 3, (light,) * 3) if rng.random() < 0.5 else ((light,) * 3, (dark,) * 3)
    else:
        paper = tuple(int(v) for v in rng.integers(0, 256, 3))
        ink = tuple(int(255 - v) if rng.random() < 0.7 else int(w) for v, w in zip(paper, rng.integers(0, 256, 3)))
    image = Image.new("RGB", (side, side), paper)
    text = "".join(GLYPHS[i] for i in rng.integers(0, len(GLYPHS), rng.integers(1, 4)))
    font = ImageFont.load_default(size=int(rng.integers(20, 56)))
    ImageDraw.Draw(image).text((int(rng.integers(-4, 24)), int(rng.integers(-8, 20))), text, fill=ink, font=font,
                               stroke_width=int(rng.integers(0, 3)), stroke_fill=ink)  # fmt: skip
    return image


def rejection_figures(known_scores: torch.Tensor, unknown_scores: torch.Tensor | None, threshold: float | None) -> dict:
    """Known share accepted and, with unknown images, their share rejected and the AUROC (unknown = positive)."""
    figures = {}
    if threshold is not None:
        figures["known_accepted"] = round(float((known_scores <= threshold).float().mean()), 5)
    if unknown_scores is not None and len(unknown_scores):
        if threshold is not None:
            figures["unknown_rejected"] = round(float((unknown_scores > threshold).float().mean()), 5)
        truth = np.r_[np.zeros(len(known_scores)), np.ones(len(unknown_scores))]
        figures["auroc"] = round(float(roc_auc_score(truth, torch.cat([known_scores, unknown_scores]).numpy())), 5)
    return figures


# Held-out kinds for measurement only (never trained on).
CHECK_KINDS = ("shapes", "scribbles", "gradients", "patterns", "crops")


def check_image(kind: str, rng: np.random.Generator, crops_from: list[Path] | None = None) -> Image.Image:
    """One 64x64 (crops: 32x32 upscaled from 8x8) image of ``kind``, drawn from ``rng``."""
    side = 64
    colour = lambda: tuple(int(v) for v in rng.integers(0, 256, 3))  # noqa: E731
    if kind == "shapes":
        image = Image.new("RGB", (side, side), colour())
        draw = ImageDraw.Draw(image)
        for _ in range(rng.integers(1, 4)):
            x0, y0 = rng.integers(0, side - 16, 2)
            x1, y1 = x0 + rng.integers(12, side - x0 + 1), y0 + rng.integers(12, side - y0 + 1)
            shape = rng.integers(0, 3)
            if shape == 0:
                draw.ellipse((x0, y0, x1, y1), fill=colour())
            elif shape == 1:
                draw.rectangle((x0, y0, x1, y1), fill=colour())
            else:
                draw.polygon([tuple(int(v) for v in rng.integers(0, side, 2)) for _ in range(3)], fill=colour())
        return image
    if kind == "scribbles":  # pen strokes, as handwriting or a doodle
        ink, paper = colour(), colour()
        image = Image.new("RGB", (side, side), paper)
        draw = ImageDraw.Draw(image)
        for _ in range(rng.integers(1, 4)):
            points = [tuple(int(v) for v in rng.integers(4, side - 4, 2)) for _ in range(rng.integers(3, 7))]
            draw.line(points, fill=ink, width=int(rng.integers(2, 7)), joint="curve")
        return image
    if kind == "gradients":
        a, b = np.array(colour(), float), np.array(colour(), float)
        angle = rng.uniform(0, np.pi)
        ys, xs = np.mgrid[0:side, 0:side] / (side - 1)
        t = np.clip(xs * np.cos(angle) + ys * np.sin(angle), 0, 1)[..., None]
        return Image.fromarray(((1 - t) * a + t * b).astype(np.uint8))
    if kind == "patterns":
        period = int(rng.integers(4, 17))
        ys, xs = np.mgrid[0:side, 0:side]
        mask = ((xs // period + ys // period) % 2 == 0) if rng.random() < 0.5 else (xs // period) % 2 == 0
        pixels = np.where(mask[..., None], np.array(colour()), np.array(colour())).astype(np.uint8)
        return Image.fromarray(pixels)
    if kind == "crops":
        picture = read_image_file(crops_from[int(rng.integers(0, len(crops_from)))]).resize((32, 32))
        x, y = (int(v) for v in rng.integers(0, 32 - 8, 2))
        return picture.crop((x, y, x + 8, y + 8)).resize((32, 32), Image.Resampling.BICUBIC)
    raise ValueError(f"unknown kind {kind!r}; choose one of {', '.join(CHECK_KINDS)}")


def write_check_set(out: Path, count: int, seed: int = 0, crops_from: Path | None = None) -> dict[str, int]:
    """``count`` PNG images of every CHECK_KINDS kind under ``out/<kind>/``; ``crops`` only with ``crops_from``."""
    rng = np.random.default_rng(seed)
    sources = sorted(p for p in crops_from.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES) if crops_from else None
    written = {}
    for kind in CHECK_KINDS:
        if kind == "crops" and not sources:
            continue
        folder = out / kind
        folder.mkdir(parents=True, exist_ok=True)
        for i in range(count):
            check_image(kind, rng, sources).save(folder / f"{i:05d}.png")
        written[kind] = count
    return written


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m training.unknowns", description=__doc__.split("\n\n")[0])
    p.add_argument("out", type=Path, help="folder to write (one sub-folder per kind)")
    p.add_argument("--count", type=int, default=200, help="images per kind")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--crops-from", type=Path, help="image folder whose images the 'crops' kind cuts 8x8 pieces from "
                   "(use images that are none of the classes and were not trained on)")  # fmt: skip
    args = p.parse_args(argv)
    written = write_check_set(args.out, args.count, args.seed, args.crops_from)
    print(f"{args.out}: " + ", ".join(f"{n} {kind}" for kind, n in written.items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
