"""Switch test-time flip on or off for a trained checkpoint, and calibrate it again for what it then answers.

    python -m training.calibrate --checkpoint checkpoints/cifar3.pt --no-test-flip   # half the serving compute
    python -m training.calibrate --checkpoint checkpoints/cifar3.pt --test-flip --out checkpoints/flip.pt

Test-time flip (``ModelMeta.test_flip``) answers with the logits of each image and of its mirror image
averaged: more accurate, for twice the forward compute per image (docs/training.md, reports/benchmark.md).
The temperature, confidence map and unknown-image threshold belong to the logits they were fitted on, so a
switch refits them all, exactly as training does at its end (training.train's ``calibrate``), on the
checkpoint's own validation split (and unknown validation split, if it was trained with unknown images),
rebuilt from the data, fraction and seed its training recorded (``--data`` / ``--unknown-data`` where those
images now live elsewhere). The weights are untouched. A checkpoint written before unknown images were
handled (no ``unknown`` record) keeps answering without a threshold. Writes the checkpoint to ``--out``
(default: in place, atomically); prints one JSON line of before and after.
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
from pathlib import Path

from cifar3.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from cifar3.unknown import OTHER_CLASS

from .data import DEFAULT_DATA_ROOT, DataError
from .evaluate import unknown_validation_split, validation_split
from .train import calibrate


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m training.calibrate", description=__doc__.split("\n\n")[0])
    p.add_argument("--checkpoint", type=Path, required=True)
    p.add_argument("--test-flip", action=argparse.BooleanOptionalAction, default=None,
                   help="answer with each image's and its mirror image's logits averaged (default: as the "
                        "checkpoint does now)")  # fmt: skip
    p.add_argument("--out", type=Path, help="where to write the calibrated checkpoint (default: --checkpoint)")
    p.add_argument("--data", help="the training data, where its recorded path no longer finds it (same images)")
    p.add_argument("--unknown-data", help="the unknown training data, likewise")
    p.add_argument("--data-root", type=Path, default=DEFAULT_DATA_ROOT, help="download cache for a cifar10 --data")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        model, meta = load_checkpoint(args.checkpoint)
        recorded = copy.deepcopy(meta)  # where the splits come from: the record, or where the images are now
        recorded.train_config |= {k: v for k, v in (("data", args.data), ("unknown_data", args.unknown_data)) if v}
        val_set = validation_split(recorded, args.data_root)
        unknown_val = unknown_validation_split(recorded, args.data_root)
    except (CheckpointError, DataError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyError as exc:
        print(f"error: {args.checkpoint}: its training record has no {exc}, so its validation split cannot be "
              "rebuilt", file=sys.stderr)  # fmt: skip
        return 2
    before = {"test_flip": meta.test_flip, "val_accuracy": meta.val_accuracy, "temperature": meta.temperature}
    if args.test_flip is not None:
        meta.test_flip = meta.train_config["test_flip"] = args.test_flip
    had_threshold = bool(meta.unknown)
    unknown_loss = meta.train_config.get("unknown_loss", OTHER_CLASS)
    calibrate(model, meta, val_set, unknown_val, unknown_loss, recorded.train_config.get("unknown_data"))
    if not had_threshold:  # as it answered before: post-hoc scores, never "unknown"
        meta.unknown = {}
    out = args.out or args.checkpoint
    try:
        save_checkpoint(out, model, meta)
    except OSError as exc:
        print(f"error: cannot write {out}: {exc}", file=sys.stderr)
        return 2
    after = {"test_flip": meta.test_flip, "val_accuracy": meta.val_accuracy, "temperature": meta.temperature}
    print(json.dumps({"checkpoint": str(out), "validation": val_set.source, "before": before, "after": after}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
