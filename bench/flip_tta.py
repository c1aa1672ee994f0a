"""What flip test-time augmentation would add: checkpoints' validation accuracy on the images, on their mirror
images, and with the two logits averaged.

    .venv/bin/python -m bench.flip_tta CKPT [CKPT ...] --report reports/training/robust/flip-tta

Each checkpoint is scored on the validation split it was selected on (``training.evaluate --validation``'s
images), in float32, whatever it answers with: a checkpoint with ``ModelMeta.test_flip`` (the cpu preset's)
answers the averaged logits ("flip TTA" here), one without answers the images' own.
"""

from __future__ import annotations

import argparse
import json
import sys
from datetime import UTC, datetime
from pathlib import Path

import torch

from cifar3.checkpoint import ModelMeta, load_checkpoint
from cifar3.hardware import describe_machine
from cifar3.inference import predict_logits
from training.data import DEFAULT_DATA_ROOT, Dataset
from training.evaluate import validation_split
from training.reporting import write_report


def flip_accuracies(model: torch.nn.Module, meta: ModelMeta, data: Dataset) -> dict[str, float]:
    """Accuracy on ``data``'s images, on their left-right mirror images, and with both logits averaged."""
    classes = len(meta.classes)
    plain = predict_logits(model, data.images, meta.mean, meta.std)[:, :classes]
    mirrored = predict_logits(model, data.images.flip(-1), meta.mean, meta.std)[:, :classes]
    scored = {"images": plain, "mirror images": mirrored, "flip TTA": (plain + mirrored) / 2}
    return {name: (logits.argmax(1) == data.labels).float().mean().item() for name, logits in scored.items()}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.flip_tta", description=__doc__.split("\n\n")[0])
    p.add_argument("checkpoints", type=Path, nargs="+")
    p.add_argument("--data-root", type=Path, default=DEFAULT_DATA_ROOT)
    p.add_argument("--report", type=Path, help="write REPORT.json")
    args = p.parse_args(argv)
    rows = []
    for path in args.checkpoints:
        model, meta = load_checkpoint(path)
        data = validation_split(meta, args.data_root)
        rows.append({"checkpoint": str(path), "validation": data.source, "n": len(data),
                     "accuracy": flip_accuracies(model, meta, data)})  # fmt: skip
        print(json.dumps(rows[-1]), flush=True)
    gains = [row["accuracy"]["flip TTA"] - row["accuracy"]["images"] for row in rows]
    report = {"machine": describe_machine(torch.device("cpu")), "date": f"{datetime.now(UTC):%Y-%m-%d}",
              "mean_gain": sum(gains) / len(gains), "rows": rows}  # fmt: skip
    if args.report:
        write_report(args.report, report)
    print(json.dumps({"mean_gain": report["mean_gain"]}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
