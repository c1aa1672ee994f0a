"""Post-hoc unknown scores of a checkpoint trained without unknown images, compared on its validation split.

    .venv/bin/python -m bench.posthoc_scores --checkpoint CKPT --unknown-data PATH/TO/OTHER \
        --report reports/training/unknown/posthoc

Max-softmax, max-logit and energy (all on the temperature-scaled logits, negated so that higher means less like
the classes), each with the threshold that accepts 95% of the known validation images: the share of the unknown
validation images (carved from ``--unknown-data`` with the checkpoint's fraction and seed) it rejects, and the
AUROC. The best of them is the score ``cifar3.unknown.POSTHOC_SCORE`` names.
"""

from __future__ import annotations

import argparse
import json
import sys
from datetime import UTC, datetime
from pathlib import Path

import torch

from cifar3.checkpoint import load_checkpoint
from cifar3.hardware import describe_machine
from cifar3.inference import predict_logits
from cifar3.unknown import fit_threshold
from training.data import DEFAULT_DATA_ROOT
from training.evaluate import validation_split
from training.reporting import write_report
from training.unknowns import rejection_figures, unknown_split

SCORES = {
    "max-softmax": lambda z: -torch.softmax(z, 1).max(1).values,
    "max-logit": lambda z: -z.max(1).values,
    "energy": lambda z: -torch.logsumexp(z, 1),
}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.posthoc_scores", description=__doc__.split("\n\n")[0])
    p.add_argument("--checkpoint", type=Path, required=True)
    p.add_argument("--unknown-data", required=True, help="images that are none of the classes (image folder)")
    p.add_argument("--data-root", type=Path, default=DEFAULT_DATA_ROOT)
    p.add_argument("--report", type=Path, help="write REPORT.json")
    args = p.parse_args(argv)
    model, meta = load_checkpoint(args.checkpoint)
    config = meta.train_config
    known = validation_split(meta, args.data_root)
    _, unknown = unknown_split(args.unknown_data, meta.classes, args.data_root, config["limit"],
                               config["val_fraction"], config["seed"])  # fmt: skip
    logits = {name: predict_logits(model, data.images, meta.mean, meta.std, test_flip=meta.test_flip)
                    [:, : len(meta.classes)] / meta.temperature  # the logits the checkpoint answers with
              for name, data in (("known", known), ("unknown", unknown))}  # fmt: skip
    results = {}
    for name, score in SCORES.items():
        k, u = score(logits["known"]), score(logits["unknown"])
        results[name] = rejection_figures(k, u, fit_threshold(k))
    report = {"checkpoint": str(args.checkpoint), "known": known.source, "unknown_images": len(unknown),
              "machine": describe_machine(torch.device("cpu")), "date": f"{datetime.now(UTC):%Y-%m-%d}",
              "scores": results}  # fmt: skip
    print(json.dumps(report, indent=2))
    if args.report:
        write_report(args.report, report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
