"""Would an int8 model be worth serving? ONNX Runtime static quantization, measured against float32.

    .venv/bin/python -m bench.int8 --checkpoint checkpoints/cifar3.pt --report reports/int8

Exports the checkpoint to ONNX and quantizes it exactly as scripts/archive.sh does (training.export: ONNX
Runtime's static quantization, QDQ, 7-bit int8 weights per channel, uint8 activations), calibrated here on
training images that are not in the validation split, then scores float32 and int8 on the checkpoint's own
validation split (accuracy, agreement with float32, largest probability difference) and times both at
batch 1, 8 and 64 with one and all threads, one engine at a time. Writes REPORT.json and REPORT.md.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import torch

from bench.reporting import write_report
from cifar3.checkpoint import load_checkpoint
from cifar3.engine import OnnxRuntimeEngine, predict_probs
from cifar3.hardware import describe_machine
from cifar3.preprocessing import normalize
from training.data import DEFAULT_DATA_ROOT, limit_per_class, load_split, stratified_split
from training.export import export_checkpoint, quantize_int8

BATCHES = (1, 8, 64)


def rate(engine: OnnxRuntimeEngine, images: torch.Tensor, batch: int, seconds: float) -> dict:
    """Images/s at ``batch`` (median over repeats of ``seconds`` / 5) and the batch's median latency."""
    inputs = images[:batch]
    engine(inputs)  # warm-up
    times = []
    deadline = time.perf_counter() + seconds
    while time.perf_counter() < deadline or len(times) < 5:
        start = time.perf_counter()
        engine(inputs)
        times.append(time.perf_counter() - start)
    median = float(np.median(times))
    return {"batch": batch, "images_per_s": round(batch / median, 1), "latency_ms": round(median * 1e3, 3)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.int8", description=__doc__.split("\n\n")[0])
    parser.add_argument("--checkpoint", type=Path, default=Path("checkpoints/cifar3.pt"))
    parser.add_argument("--data-root", type=Path, default=DEFAULT_DATA_ROOT)
    parser.add_argument("--calibration", type=int, default=512, help="training images to calibrate on")
    parser.add_argument("--seconds", type=float, default=2.0, help="timing per engine, batch and threads")
    parser.add_argument("--report", type=Path, default=Path("reports/int8"))
    args = parser.parse_args(argv)

    model, meta = load_checkpoint(args.checkpoint)
    config = meta.train_config
    data = limit_per_class(load_split(config["data"], meta.classes, "train", args.data_root), config["limit"],
                           config["seed"])  # fmt: skip
    train, val = stratified_split(data, config["val_fraction"], config["seed"])
    pick = torch.randperm(len(train), generator=torch.Generator().manual_seed(0))[: args.calibration]
    calibration = normalize(train.images[pick], meta.mean, meta.std)
    cores = os.cpu_count() or 1
    rows, scores = [], {}
    with tempfile.TemporaryDirectory(prefix="cifar3-int8-") as tmp:
        float_onnx = export_checkpoint(args.checkpoint, Path(tmp) / "model.onnx")
        started = time.perf_counter()
        int8_onnx = quantize_int8(float_onnx, Path(tmp) / "model.int8.onnx", calibration)
        quantize_s = time.perf_counter() - started
        sizes = {"float32": float_onnx.stat().st_size, "int8": int8_onnx.stat().st_size}
        probs = {}
        for name, path in (("float32", float_onnx), ("int8", int8_onnx)):
            engine = OnnxRuntimeEngine(path, threads=cores, int8=name == "int8", test_flip=meta.test_flip)
            probs[name] = predict_probs(engine, meta, val.images)
            scores[name] = float((probs[name].argmax(1) == val.labels).float().mean())
            batch = normalize(val.images[:64], meta.mean, meta.std)
            for threads in sorted({1, cores}):
                engine = OnnxRuntimeEngine(path, threads=threads, int8=name == "int8", test_flip=meta.test_flip)
                rows += [{"engine": name, "threads": threads, **rate(engine, batch, b, args.seconds)} for b in BATCHES]
    agreement = float((probs["int8"].argmax(1) == probs["float32"].argmax(1)).float().mean())
    report = {
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "machine": describe_machine(torch.device("cpu")),
        "checkpoint": str(args.checkpoint),
        "validation_images": len(val),
        "calibration_images": len(calibration),
        "quantize_s": round(quantize_s, 1),
        "accuracy": {k: round(v, 5) for k, v in scores.items()},
        "accuracy_drop_points": round(100 * (scores["float32"] - scores["int8"]), 2),
        "agreement_with_float32": round(agreement, 5),
        "max_probability_difference": round(float((probs["int8"] - probs["float32"]).abs().max()), 4),
        "file_bytes": sizes,
        "speed": rows,
    }
    write_report(args.report, report, markdown(report))
    return 0


def markdown(report: dict) -> str:
    speed = {(r["engine"], r["threads"], r["batch"]): r for r in report["speed"]}
    threads = sorted({r["threads"] for r in report["speed"]})
    lines = [
        "# int8 (ONNX Runtime static quantization) against float32",
        "",
        f"{report['machine']}, {report['date'][:10]}; checkpoint `{report['checkpoint']}`; written by "
        f"`python -m bench.int8`. Quantization: QDQ, 7-bit int8 weights per channel, uint8 activations calibrated on "
        f"{report['calibration_images']} training images ({report['quantize_s']} s). Scored on the checkpoint's "
        f"validation split ({report['validation_images']} images).",
        "",
        "| | float32 | int8 |",
        "|---|---:|---:|",
        f"| validation accuracy | {report['accuracy']['float32']:.2%} | {report['accuracy']['int8']:.2%} |",
        f"| predictions equal to float32's | | {report['agreement_with_float32']:.2%} |",
        f"| largest probability difference | | {report['max_probability_difference']} |",
        "| model file | {:.1f} MB | {:.1f} MB |".format(*(report["file_bytes"][k] / 1e6 for k in ("float32", "int8"))),
    ]
    for t in threads:
        for b in BATCHES:
            f, q = speed[("float32", t, b)], speed[("int8", t, b)]
            lines.append(
                f"| images/s, batch {b}, {t} thread{'s' if t > 1 else ''} | {f['images_per_s']:.0f} | "
                f"{q['images_per_s']:.0f} ({q['images_per_s'] / f['images_per_s']:.2f}x) |"
            )
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
