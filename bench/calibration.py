"""Calibration out of sample: the temperature alone against the temperature and the top-label confidence map.

    .venv/bin/python -m bench.calibration --checkpoints A.pt B.pt ... --report reports/training/robust/calibration

A checkpoint's calibration was fitted on its whole validation split, so its own ECE there flatters it. Here
each checkpoint's validation split (the images it was selected on, cifar3's ``validation_split``) is halved
at random and each half is calibrated on the other (cross-fitting), exactly as ``training.train`` calibrates:
``fit_temperature``, then ``fit_confidence_map`` on the temperature-scaled probabilities. Per checkpoint and
pooled over all of them: accuracy, ECE (15 equal-width bins) and NLL of both, and the ECE that perfectly
calibrated probabilities would still show on as many images (labels drawn from the probabilities themselves:
sampling noise, the floor no calibration can go below).
"""

from __future__ import annotations

import argparse
import sys
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import torch

from bench.reporting import write_report
from cifar3.checkpoint import load_checkpoint
from cifar3.hardware import describe_machine
from cifar3.inference import fit_confidence_map, fit_temperature, predict_logits
from cifar3.unknown import class_logits, split_scores
from training.data import DEFAULT_DATA_ROOT
from training.evaluate import expected_calibration_error, reliability_bins, validation_split

METHODS = {"temperature": "temperature", "map": "temperature + confidence map"}
BINS = 15
NOISE_DRAWS = 50


def cross_fitted(logits: torch.Tensor, labels: torch.Tensor, seed: int) -> dict[str, np.ndarray]:
    """Each method's out-of-sample probabilities: every image calibrated by a fit on the other half."""
    order = torch.randperm(len(labels), generator=torch.Generator().manual_seed(seed))
    halves = (order[: len(order) // 2], order[len(order) // 2 :])
    out = {name: torch.zeros(len(labels), logits.shape[1]) for name in METHODS}
    for fit, held in (halves, halves[::-1]):
        temperature = fit_temperature(logits[fit], labels[fit])
        confidence_map = fit_confidence_map(split_scores(logits[fit], logits.shape[1], temperature, {})[0],
                                            labels[fit])  # fmt: skip
        out["temperature"][held] = split_scores(logits[held], logits.shape[1], temperature, {})[0]
        out["map"][held] = split_scores(logits[held], logits.shape[1], temperature, {}, confidence_map)[0]
    return {name: probs.numpy() for name, probs in out.items()}


def figures(probs: np.ndarray, labels: np.ndarray, rng: np.random.Generator) -> dict:
    """Accuracy, ECE, NLL, and the ECE of perfectly calibrated probabilities on as many images."""
    drawn = [(rng.random((len(probs), 1)) > probs.cumsum(1)).sum(1).clip(max=probs.shape[1] - 1)
             for _ in range(NOISE_DRAWS)]  # fmt: skip
    return {
        "images": len(labels),
        "accuracy": round(float((probs.argmax(1) == labels).mean()), 5),
        "ece": round(expected_calibration_error(probs, labels, BINS), 5),
        "nll": round(float(-np.log(np.clip(probs[np.arange(len(labels)), labels], 1e-12, None)).mean()), 5),
        "noise_ece": round(float(np.mean([expected_calibration_error(probs, d, BINS) for d in drawn])), 5),
    }


def reliability(probs: np.ndarray, labels: np.ndarray) -> list[dict]:
    """Per confidence bin: images, accuracy, mean confidence (rounded for the report)."""
    return [{"bin": f"{r['low']:.2f}-{r['high']:.2f}", "images": r["images"], "accuracy": round(r["accuracy"], 4),
             "confidence": round(r["confidence"], 4)} for r in reliability_bins(probs, labels, BINS)]  # fmt: skip


def markdown(report: dict) -> str:
    pct = lambda x: f"{100 * x:.2f}%"  # noqa: E731
    lines = [
        "# Calibration out of sample",
        "",
        f"Machine: {report['machine']}, {report['date']}. Each checkpoint's validation split halved at random "
        "(seed 0), each half calibrated on the other, as `training.train` calibrates (a temperature, then the "
        "top-label confidence map on the temperature-scaled probabilities). ECE: 15 equal-width bins. "
        f"Noise floor: the ECE of perfectly calibrated probabilities on as many images (labels drawn from the "
        f"probabilities, mean of {NOISE_DRAWS} draws). Command and all figures: `calibration.json`.",
        "",
        "| checkpoint | training | images | accuracy | ECE, temperature | ECE, + map | noise floor | NLL, "
        "temperature | NLL, + map |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for row in [*report["checkpoints"], report["pooled"]]:
        t, m = row["temperature"], row["map"]
        lines.append(f"| {row['name']} | {row['training']} | {t['images']:,} | {pct(t['accuracy'])} | "
                     f"{pct(t['ece'])} | {pct(m['ece'])} | {pct(m['noise_ece'])} | {t['nll']:.3f} | "
                     f"{m['nll']:.3f} |")  # fmt: skip
    lines += ["", "Pooled, per confidence bin:", "",
              "| confidence | images, temperature | accuracy | mean confidence | images, + map | accuracy | "
              "mean confidence |", "|---|---:|---:|---:|---:|---:|---:|"]  # fmt: skip
    bins = {name: {r["bin"]: r for r in report["reliability"][name]} for name in METHODS}
    empty = {"images": 0, "accuracy": float("nan"), "confidence": float("nan")}
    for edge in sorted(set(bins["temperature"]) | set(bins["map"])):
        t, m = bins["temperature"].get(edge, empty), bins["map"].get(edge, empty)
        lines.append(f"| {edge} | {t['images']:,} | {pct(t['accuracy'])} | {pct(t['confidence'])} | "
                     f"{m['images']:,} | {pct(m['accuracy'])} | {pct(m['confidence'])} |")  # fmt: skip
    return "\n".join(lines).replace("nan%", "-") + "\n"


def describe_training(config: dict) -> str:
    """What set the checkpoint's training apart: unknown images or not, peak learning rate, seed."""
    unknowns = "with unknown images" if config.get("unknown_data") else "known images only"
    return f"{config.get('preset', '?')} preset, {unknowns}, peak lr {config.get('lr')}, seed {config.get('seed')}"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.calibration", description=__doc__.split("\n\n")[0])
    p.add_argument("--checkpoints", type=Path, nargs="+", required=True)
    p.add_argument("--data-root", type=Path, default=DEFAULT_DATA_ROOT)
    p.add_argument("--report", type=Path, required=True, help="write REPORT.json and REPORT.md")
    args = p.parse_args(argv)
    rng = np.random.default_rng(0)
    rows, pooled, pooled_labels = [], {name: [] for name in METHODS}, []
    for path in args.checkpoints:
        model, meta = load_checkpoint(path)
        data = validation_split(meta, args.data_root)
        logits = predict_logits(model, data.images, meta.mean, meta.std, test_flip=meta.test_flip)  # as answered
        logits = class_logits(logits, len(meta.classes))
        probs = cross_fitted(logits, data.labels, seed=0)
        labels = data.labels.numpy()
        rows.append({"name": path.stem, "checkpoint": str(path), "training": describe_training(meta.train_config),
                     **{name: figures(probs[name], labels, rng) for name in METHODS}})  # fmt: skip
        for name in METHODS:
            pooled[name].append(probs[name])
        pooled_labels.append(labels)
        print(rows[-1], flush=True)
    labels = np.concatenate(pooled_labels)
    everything = {name: np.concatenate(parts) for name, parts in pooled.items()}
    report = {
        "command": "python -m bench.calibration " + " ".join(sys.argv[1:] if argv is None else argv),
        "machine": describe_machine(torch.device("cpu")),
        "date": f"{datetime.now(UTC):%Y-%m-%d}",
        "checkpoints": rows,
        "pooled": {
            "name": "all, pooled",
            "training": f"{len(rows)} checkpoints",
            **{name: figures(probs, labels, rng) for name, probs in everything.items()},
        },  # fmt: skip
        "reliability": {name: reliability(probs, labels) for name, probs in everything.items()},
    }
    write_report(args.report, report, markdown(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
