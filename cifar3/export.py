"""Export a checkpoint's model to ONNX (dynamic batch axis) and verify it against PyTorch float32.

    python -m cifar3.export checkpoints/cifar3.pt model.onnx [--images DIR]

The state dict stays the source of truth: scripts/archive.sh runs this on every archive, and the
exported graph goes into the .mar beside the checkpoint only if ONNX Runtime's probabilities on a
batch of real images (``--images``, else the folder the checkpoint was trained on) are within
``TOLERANCE`` of the PyTorch float32 model's, at batch 1 and at the whole batch. Otherwise it exits 2
with a message and writes nothing. Needs onnx and onnxscript (torch's dynamo exporter); serving does not.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import os
import sys
import warnings
from pathlib import Path

import torch

from cifar3.checkpoint import CheckpointError, load_checkpoint
from cifar3.engine import ONNX_INPUT, ONNX_OUTPUT, OnnxRuntimeEngine, predict_probs
from cifar3.inference import calibrated_probs, predict_logits
from cifar3.preprocessing import ImageDecodeError, decode_image, pil_to_uint8

TOLERANCE = 1e-4  # largest difference in any calibrated probability the export may make
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp")


def export_checkpoint(checkpoint: str | Path, out: str | Path) -> Path:
    """Write the checkpoint's float32 model as ONNX to ``out``, batch axis dynamic; returns ``out``.

    The plain eval-mode network is exported (ONNX Runtime folds BatchNorm itself); the exporter's progress
    lines and warnings are kept off the caller's output."""
    model, meta = load_checkpoint(checkpoint)
    example = torch.zeros(2, 3, meta.image_size, meta.image_size)
    batch = torch.export.Dim("batch", min=1, max=4096)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
        warnings.simplefilter("ignore")
        torch.onnx.export(model, (example,), str(out), input_names=[ONNX_INPUT], output_names=[ONNX_OUTPUT],
                          dynamic_shapes={"x": {0: batch}}, dynamo=True, external_data=False)  # fmt: skip
    return out


def folder_images(folder: Path, count: int, image_size: int) -> torch.Tensor | None:
    """Up to ``count`` images spread over the folder's files (sorted, every k-th), as uint8 N x 3 x H x W."""
    files = sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES) if folder.is_dir() else []
    images = []
    for path in files[:: max(1, len(files) // count)][:count]:
        with contextlib.suppress(ImageDecodeError):
            images.append(pil_to_uint8(decode_image(path.read_bytes()), image_size))
    return torch.stack(images) if images else None


def max_difference(checkpoint: str | Path, onnx_path: str | Path, images: torch.Tensor) -> float:
    """Largest |p_onnx - p_torch| over every image and class: the whole batch at once, and image by image
    (the second run proves the batch axis is dynamic and that batching changes nothing)."""
    model, meta = load_checkpoint(checkpoint)  # the network as trained, BatchNorm unfolded: the source of truth
    expected = calibrated_probs(predict_logits(model, images, meta.mean, meta.std), meta.temperature)
    onnx = OnnxRuntimeEngine(onnx_path, threads=torch.get_num_threads())
    together = predict_probs(onnx, meta, images)
    one_by_one = predict_probs(onnx, meta, images, batch_size=1)
    return max(float((together - expected).abs().max()), float((one_by_one - expected).abs().max()))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m cifar3.export", description=__doc__.split("\n\n")[0])
    parser.add_argument("checkpoint", type=Path)
    parser.add_argument("out", type=Path, help="the .onnx file to write")
    parser.add_argument("--images", type=Path, help="folder of real images to verify on (default: the training data)")
    parser.add_argument("--count", type=int, default=64, help="images to verify on")
    args = parser.parse_args(argv)
    try:
        _, meta = load_checkpoint(args.checkpoint)
    except CheckpointError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    folder = args.images or Path(str(meta.train_config.get("data", "")))
    images = folder_images(folder, args.count, meta.image_size)
    if images is None:
        print(f"error: no images to verify the export on in {folder}: pass --images DIR (a folder of images, "
              "e.g. the training data)", file=sys.stderr)  # fmt: skip
        return 2
    tmp = args.out.with_name(f".{args.out.name}.{os.getpid()}.tmp")
    try:
        export_checkpoint(args.checkpoint, tmp)
        difference = max_difference(args.checkpoint, tmp, images)
        if difference > TOLERANCE:
            print(f"error: the ONNX export of {args.checkpoint} differs from PyTorch float32 by {difference:.2e} "
                  f"in a probability (limit {TOLERANCE:g}) on {len(images)} images from {folder}; not written. "
                  "Serve this checkpoint with engine torch (handler.engine in model-config.yaml)",
                  file=sys.stderr)  # fmt: skip
            return 2
        os.replace(tmp, args.out)
    finally:
        tmp.unlink(missing_ok=True)
    print(f"onnx: {args.out} verified on {len(images)} images from {folder}: max probability difference "
          f"{difference:.1e} (limit {TOLERANCE:g})")  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
