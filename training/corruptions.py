"""Corrupted copies of a validation split, as image folders: how the model fares on ordinary photo variation.

    python -m training.corruptions --checkpoint checkpoints/cifar3.pt --out /tmp/cifar3-c
    python -m training.corruptions --checkpoint checkpoints/cifar3.pt --out /tmp/cifar3-c \\
        --evaluate checkpoints/cifar3.pt OTHER.pt --report reports/training/corruptions

Writes ``OUT/<corruption>/<class>/NNNNN.png`` (lossless) for every corruption below
and ``OUT/clean`` (the split itself, losslessly), from the validation split the checkpoint was selected on
(rebuilt from the data, fraction and seed its training recorded), or with ``--data`` from the validation
split of that source (``--val-fraction``, ``--seed``). Each folder is an ordinary image folder:
``python -m training.evaluate --checkpoint C --data OUT/blur`` evaluates one. ``--evaluate`` does that for
every folder and checkpoint and writes ``REPORT.md`` and ``REPORT.json`` (accuracy per corruption, the mean
over corruptions and its ratio to clean accuracy).

One fixed, moderate severity per corruption (in the spirit of CIFAR-10-C's middle severity), noise drawn
from ``--seed``: the same command writes the same pixels.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path

import torch
from torchvision.transforms.v2 import functional as F

from cifar3.checkpoint import CheckpointError, load_checkpoint
from cifar3.engine import load_engine

from .data import DEFAULT_DATA_ROOT, DataError, Dataset, load_split, resolve_classes, stratified_split
from .evaluate import evaluate, validation_split
from .export import export_checkpoint
from .reporting import report_file, write_report

UPSCALED_SIZE = 256  # pixels: a phone photo's worth of pixels for a 32x32 object, downscaled again on input


def _float(image: torch.Tensor) -> torch.Tensor:
    return image.float() / 255.0


def _uint8(image: torch.Tensor) -> torch.Tensor:
    return (image * 255.0).round().clamp(0, 255).to(torch.uint8)


def gaussian_noise(image: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Sensor noise: + N(0, 0.08) on the 0..1 scale, per pixel and channel."""
    x = _float(image)
    return _uint8(x + 0.08 * torch.randn(x.shape, generator=gen))


def shot_noise(image: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Photon noise in low light: Poisson counts with 100 photons at full intensity."""
    return _uint8(torch.poisson(_float(image) * 100, generator=gen) / 100)


def blur(image: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Out of focus: Gaussian blur, sigma 1 pixel."""
    return F.gaussian_blur(image, kernel_size=[5, 5], sigma=[1.0, 1.0])


def low_contrast(image: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Haze or a flat exposure: contrast reduced to 40% around the mean grey."""
    return F.adjust_contrast(image, 0.4)


def brightness(image: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Overexposed: every pixel x1.5, clipped."""
    return F.adjust_brightness(image, 1.5)


def grayscale(image: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """A black-and-white photo, stored as RGB."""
    return F.rgb_to_grayscale(image, num_output_channels=3)


def pixelate(image: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Pixelated: averaged down to 16x16, blown up again with nearest-neighbour."""
    small = torch.nn.functional.avg_pool2d(_float(image).unsqueeze(0), 2)  # each 2x2 block -> its mean
    return _uint8(small.repeat_interleave(2, -1).repeat_interleave(2, -2)[0])


def upscaled(image: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """A large copy (256x256, bicubic): the model then sees it through the same downscaling as an upload."""
    return F.resize(image, [UPSCALED_SIZE, UPSCALED_SIZE], interpolation=F.InterpolationMode.BICUBIC, antialias=True)


def jpeg(image: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Heavy compression: encoded as JPEG at quality 20 and decoded again."""
    return F.jpeg(image, quality=20)


def motion_blur(image: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """A camera moved sideways: each pixel averaged with its 2 neighbours on either side along the row."""
    x = _float(image).unsqueeze(1)  # 3 x 1 x H x W: one channel at a time
    kernel = torch.full((1, 1, 1, 5), 1 / 5)
    return _uint8(torch.nn.functional.conv2d(torch.nn.functional.pad(x, (2, 2, 0, 0), mode="replicate"), kernel)[:, 0])


def fog(image: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Fog: a smooth, uneven white veil (a 4 x 4 random field, enlarged) laid over the image at up to 60%."""
    veil = torch.nn.functional.interpolate(torch.rand(1, 1, 4, 4, generator=gen), size=image.shape[-2:],
                                           mode="bicubic", align_corners=False)[0].clamp(0, 1) * 0.6  # fmt: skip
    return _uint8(_float(image) * (1 - veil) + veil)


# name -> corruption of one uint8 3 x H x W image
CORRUPTIONS: dict[str, Callable[[torch.Tensor, torch.Generator], torch.Tensor]] = {
    "gaussian_noise": gaussian_noise,
    "shot_noise": shot_noise,
    "blur": blur,
    "low_contrast": low_contrast,
    "brightness": brightness,
    "jpeg": jpeg,
    "grayscale": grayscale,
    "pixelate": pixelate,
    "upscaled": upscaled,
    # Not among the photo defects training can add (training/train.py PHOTO_DEFECTS): how robustness carries over.
    "motion_blur": motion_blur,
    "fog": fog,
}


def write_corrupted_folders(data: Dataset, classes: list[str], out: Path, seed: int = 0) -> list[str]:
    """``out/clean`` and ``out/<corruption>`` for every corruption, one sub-folder per class: the folder names."""
    names = ["clean", *CORRUPTIONS]
    for name in names:
        gen = torch.Generator().manual_seed(seed)
        for c in classes:
            (out / name / c).mkdir(parents=True, exist_ok=True)
        for i, (image, label) in enumerate(zip(data.images, data.labels.tolist(), strict=True)):
            corrupted = image if name == "clean" else CORRUPTIONS[name](image, gen)
            F.to_pil_image(corrupted).save(out / name / classes[label] / f"{i:05d}.png")  # lossless
    return names


def evaluate_folders(checkpoint: Path, out: Path, names: list[str]) -> dict:
    """Accuracy of ``checkpoint`` on each folder, as ``training.evaluate --data out/<name>`` computes it (the
    engine the handler would pick here), the share of each folder its stored threshold calls unknown
    (``rejected``; absent for a checkpoint without a threshold), and which engine that was."""
    engine, meta = load_engine(checkpoint, exporter=export_checkpoint)
    accuracy, rejected = {}, {}
    for name in names:
        data = load_split(str(out / name), meta.classes, "test")
        metrics = evaluate(engine, meta, data.images, data.labels)[0]
        accuracy[name] = metrics["accuracy"]
        if "known_accepted" in metrics["unknown"]:
            rejected[name] = round(1 - metrics["unknown"]["known_accepted"], 5)
    return accuracy | {"rejected": rejected, "engine": engine.describe()}


def summarise(accuracy: dict[str, float]) -> dict:
    """Mean accuracy over the corruptions, its ratio to clean accuracy, and the worst corruption."""
    mean = sum(accuracy[name] for name in CORRUPTIONS) / len(CORRUPTIONS)
    worst = min(CORRUPTIONS, key=lambda name: accuracy[name])
    return {"mean_corrupted": round(mean, 5), "ratio_to_clean": round(mean / accuracy["clean"], 4),
            "worst": worst, "worst_accuracy": accuracy[worst]}  # fmt: skip


def render_report(results: dict[str, dict], source: str, n: int, machine: str) -> str:
    """Markdown: one row per corruption, one column per checkpoint."""
    labels = list(results)
    lines = [
        "# Accuracy on corrupted copies of the validation split",
        "",
        f"Validation split: {source}, {n} images. Written by `python -m training.corruptions` "
        f"({datetime.now(UTC):%Y-%m-%d}, {machine}). One severity per corruption: see "
        "`training/corruptions.py`.",
        "",
        "| corruption | " + " | ".join(f"`{label}`" for label in labels) + " |",
        "|---|" + "---:|" * len(labels),
    ]
    for name in ["clean", *CORRUPTIONS]:
        lines.append(f"| {name} | " + " | ".join(f"{results[label][name]:.2%}" for label in labels) + " |")
    lines.append("| **mean over corruptions** | " + " | ".join(
        f"**{results[label]['mean_corrupted']:.2%}**" for label in labels) + " |")  # fmt: skip
    lines.append("| mean / clean | " + " | ".join(f"{results[label]['ratio_to_clean']:.3f}" for label in labels) + " |")
    lines.append("| worst | " + " | ".join(f"{results[label]['worst']} {results[label]['worst_accuracy']:.2%}"
                                          for label in labels) + " |")  # fmt: skip
    rejecting = [label for label in labels if results[label].get("rejected")]
    if rejecting:
        lines += ["", "Share of the known images each checkpoint's stored threshold calls unknown:", "",
                  "| corruption | " + " | ".join(f"`{label}`" for label in rejecting) + " |",
                  "|---|" + "---:|" * len(rejecting)]  # fmt: skip
        for name in ["clean", *CORRUPTIONS]:
            lines.append(f"| {name} | " + " | ".join(f"{results[label]['rejected'][name]:.2%}" for label in rejecting)
                         + " |")  # fmt: skip
    return "\n".join(lines) + "\n"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m training.corruptions", description=__doc__.split("\n\n")[0])
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--checkpoint", type=Path, help="use the validation split this checkpoint was selected on")
    source.add_argument("--data", help="use the validation split of this source (see --val-fraction, --seed)")
    p.add_argument("--out", type=Path, required=True, help="folder to write the image folders into")
    p.add_argument("--classes", help="with --data: comma-separated class names (default: as training.train chooses)")
    p.add_argument("--val-fraction", type=float, default=0.1, help="with --data: the stratified validation split")
    p.add_argument("--seed", type=int, default=0, help="the split's seed (with --data) and the noise's")
    p.add_argument("--data-root", type=Path, default=DEFAULT_DATA_ROOT, help="download cache for cifar10")
    p.add_argument("--evaluate", type=Path, nargs="+", metavar="CHECKPOINT", help="evaluate these on every folder")
    p.add_argument("--report", type=Path, help="with --evaluate: write REPORT.md and REPORT.json")
    p.add_argument("--reuse", action="store_true", help="evaluate the folders an earlier run wrote to OUT")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if args.checkpoint:
            _, meta = load_checkpoint(args.checkpoint)
            classes, data = meta.classes, validation_split(meta, args.data_root)
        else:
            classes = resolve_classes(args.data, args.classes)
            _, data = stratified_split(load_split(args.data, classes, "train", args.data_root),
                                       args.val_fraction, args.seed)  # fmt: skip
        if args.reuse:
            names = ["clean", *CORRUPTIONS]
            missing = [name for name in names if not (args.out / name).is_dir()]
            if missing:
                raise DataError(f"--reuse: {args.out} has no folder {', '.join(missing)}; run without --reuse")
        else:
            names = write_corrupted_folders(data, classes, args.out, args.seed)
            print(f"wrote {len(names)} folders of {len(data)} images each to {args.out}: {', '.join(names)}")
        if not args.evaluate:
            return 0
        results = {}
        for checkpoint in args.evaluate:
            accuracy = evaluate_folders(checkpoint, args.out, names)
            results[str(checkpoint)] = accuracy | summarise(accuracy)
            print(f"{checkpoint}: " + ", ".join(f"{k} {v:.4f}" for k, v in results[str(checkpoint)].items()
                                                if isinstance(v, float)))  # fmt: skip
    except (CheckpointError, DataError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if args.report:
        from cifar3.hardware import describe_machine

        machine = describe_machine(torch.device("cpu"))
        payload = {"data": data.source, "n": len(data), "machine": machine,
                   "date": f"{datetime.now(UTC):%Y-%m-%d}", "results": results}  # fmt: skip
        write_report(args.report, payload, render_report(results, data.source, len(data), machine))
        print(f"report: {report_file(args.report, '.md')}")
    print(json.dumps(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
