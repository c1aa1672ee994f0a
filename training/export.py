"""Export a checkpoint's model to ONNX (dynamic batch axis) and verify it against PyTorch float32.

    python -m training.export checkpoints/cifar3.pt model.onnx [--images DIR] [--int8 model.int8.onnx]

The state dict stays the source of truth: scripts/archive.sh runs this on every archive, and the
exported graph goes into the .mar beside the checkpoint only if ONNX Runtime's probabilities on a
batch of real images (``--images``, else the folder the checkpoint was trained on) are within
``TOLERANCE`` of the PyTorch float32 model's, at batch 1 and at the whole batch. Otherwise it exits 2
with a message and writes nothing. Needs onnx and onnxscript (torch's dynamo exporter); serving does not: the
engine that runs the export (cifar3/engine.py) is the core's, the export is training's.

``--int8`` also writes the export quantized by ONNX Runtime's static quantization (QDQ; weights int8 per
channel in 7 bits, so that CPUs without VNNI compute exactly what CPUs with it do; activations uint8,
calibrated on up to ``--calibration`` of the images), if its predictions agree with float32's on at least
``INT8_AGREEMENT`` of the images; otherwise a warning, and no int8 model.
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
from cifar3.engine import ONNX_INPUT, ONNX_OUTPUT, OnnxRuntimeEngine, predict_probs, predict_scores
from cifar3.inference import predict_logits
from cifar3.preprocessing import ImageDecodeError, decode_image, normalize, pil_to_uint8

TOLERANCE = 1e-4  # largest difference in any calibrated probability, or unknown score relative to its size (>= 1)
INT8_AGREEMENT = 0.98  # least share of the images on which the int8 model must predict what float32 does
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


def quantize_int8(onnx_path: str | Path, out: str | Path, calibration: torch.Tensor) -> Path:
    """Static int8 quantization of the exported model, calibrated on ``calibration`` (normalized N x 3 x H x W):
    QDQ format, int8 per-channel weights in a reduced (7-bit) range, uint8 activations; returns ``out``."""
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    batches = iter(torch.split(calibration.float().contiguous(), 32))

    class Batches(CalibrationDataReader):
        def get_next(self):
            batch = next(batches, None)
            return None if batch is None else {ONNX_INPUT: batch.numpy()}

    out = Path(out)
    prepared = out.with_name(f".{out.name}.pre.onnx")
    try:
        with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
            warnings.simplefilter("ignore")
            quant_pre_process(str(onnx_path), str(prepared))  # shape inference and graph clean-up first
            quantize_static(str(prepared), str(out), Batches(), quant_format=QuantFormat.QDQ, per_channel=True,
                            reduce_range=True, activation_type=QuantType.QUInt8,
                            weight_type=QuantType.QInt8)  # fmt: skip
    finally:
        prepared.unlink(missing_ok=True)
    return out


def int8_agreement(onnx_path: str | Path, int8_path: str | Path, images: torch.Tensor, meta) -> float:
    """Share of ``images`` (uint8) on which the int8 model predicts the float32 export's class (each answering
    as served: with the checkpoint's test-time flip)."""
    threads = torch.get_num_threads()
    float32 = OnnxRuntimeEngine(onnx_path, threads, test_flip=meta.test_flip)
    int8 = OnnxRuntimeEngine(int8_path, threads, int8=True, test_flip=meta.test_flip)
    return float((predict_probs(float32, meta, images).argmax(1) == predict_probs(int8, meta, images).argmax(1))
                 .float().mean())  # fmt: skip


def folder_images(folder: Path, count: int, image_size: int) -> torch.Tensor | None:
    """Up to ``count`` images spread over the folder's files (sorted, every k-th), as uint8 N x 3 x H x W."""
    files = sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES) if folder.is_dir() else []
    images = []
    for path in files[:: max(1, len(files) // count)][:count]:
        with contextlib.suppress(ImageDecodeError):
            images.append(pil_to_uint8(decode_image(path.read_bytes()), image_size))
    return torch.stack(images) if images else None


def max_difference(checkpoint: str | Path, onnx_path: str | Path, images: torch.Tensor) -> float:
    """Largest difference between ONNX Runtime and PyTorch over every image, in any calibrated probability and
    in the unknown score: the whole batch at once, and image by image (the second run proves the batch axis is
    dynamic and that batching changes nothing)."""
    model, meta = load_checkpoint(checkpoint)  # the network as trained, BatchNorm unfolded: the source of truth
    expected_probs, expected_scores = meta.scores(
        predict_logits(model, images, meta.mean, meta.std, test_flip=meta.test_flip)  # as served
    )
    # The energy score is on the logits' scale (tens for a confident model), where float32's rounding is
    # relative: it counts relative to its size, probabilities (0..1) as they are.
    scale = expected_scores.abs().clamp_min(1.0)
    onnx = OnnxRuntimeEngine(onnx_path, threads=torch.get_num_threads(), test_flip=meta.test_flip)
    differences = []
    for batch_size in (256, 1):
        probs, scores = predict_scores(onnx, meta, images, batch_size=batch_size)
        differences += [
            float((probs - expected_probs).abs().max()),
            float(((scores - expected_scores) / scale).abs().max()),
        ]
    return max(differences)


@contextlib.contextmanager
def staged(path: Path):
    """A temporary file beside ``path``, for a model that is written only once verified: the caller moves
    it into place with os.replace; whatever is left of it is removed on the way out."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        yield tmp
    finally:
        tmp.unlink(missing_ok=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m training.export", description=__doc__.split("\n\n")[0])
    parser.add_argument("checkpoint", type=Path)
    parser.add_argument("out", type=Path, help="the .onnx file to write")
    parser.add_argument("--images", type=Path, help="folder of real images to verify on (default: the training data)")
    parser.add_argument("--count", type=int, default=64, help="images to verify on")
    parser.add_argument("--int8", type=Path, metavar="OUT", help="also write the int8 quantization here")
    parser.add_argument("--calibration", type=int, default=256, help="images to calibrate the int8 model on")
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
    with staged(args.out) as tmp:
        export_checkpoint(args.checkpoint, tmp)
        difference = max_difference(args.checkpoint, tmp, images)
        if difference > TOLERANCE:
            print(f"error: the ONNX export of {args.checkpoint} differs from PyTorch float32 by {difference:.2e} "
                  f"in a probability (limit {TOLERANCE:g}) on {len(images)} images from {folder}; not written. "
                  "Serve this checkpoint with engine torch (handler.engine in model-config.yaml)",
                  file=sys.stderr)  # fmt: skip
            return 2
        os.replace(tmp, args.out)
    print(f"onnx: {args.out} verified on {len(images)} images from {folder}: max probability difference "
          f"{difference:.1e} (limit {TOLERANCE:g})")  # fmt: skip
    return write_int8(args, meta, folder, images) if args.int8 else 0


def write_int8(args: argparse.Namespace, meta, folder: Path, images: torch.Tensor) -> int:
    """The --int8 model: quantized, checked against the float32 export on the verification images, written."""
    calibration = folder_images(folder, args.calibration, meta.image_size)
    with staged(args.int8) as tmp:
        quantize_int8(args.out, tmp, normalize(calibration, meta.mean, meta.std))
        agreement = int8_agreement(args.out, tmp, images, meta)
        if agreement < INT8_AGREEMENT:  # the float32 export stands; only the opt-in int8 engine is missing
            print(f"warning: the int8 model of {args.checkpoint} predicts what float32 does on only {agreement:.1%} "
                  f"of {len(images)} images from {folder} (at least {INT8_AGREEMENT:.0%} needed); not written, so "
                  "engine onnxruntime-int8 would run torch", file=sys.stderr)  # fmt: skip
            return 0
        os.replace(tmp, args.int8)
    print(f"int8: {args.int8} calibrated on {len(calibration)} images; predicts what float32 does on "
          f"{agreement:.1%} of {len(images)} images")  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
