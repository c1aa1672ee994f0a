"""Evaluate a checkpoint: accuracy, per-class report, confusion matrix, calibration error.

    python -m training.evaluate --checkpoint checkpoints/cifar3.pt --data cifar10 --report-dir reports/eval

``cifar10`` and a cifar-10-batches-py folder are evaluated on their official test split; an image
folder is evaluated whole. Writes ``DIR/metrics.json`` and ``DIR/confusion_matrix.png`` (and, with
``--predictions``, one CSV row of calibrated probabilities per image). The last stdout line is one
JSON object with at least ``accuracy`` and ``n``, for other tools to parse. The forward pass runs as the
served handler runs it (``--dtype auto``: bfloat16 on hardware that computes it natively), so the
figures are the served model's: ``--engine`` (default auto) and ``--dtype`` pick the engine exactly as the handler's
``handler.engine`` and ``handler.dtype`` do (cifar3/engine.py), and metrics.json records which ran.
"""

from __future__ import annotations

import argparse
import csv
import json
import sys
from datetime import date
from pathlib import Path

import numpy as np
import torch
from sklearn.metrics import accuracy_score, classification_report, confusion_matrix

from cifar3.checkpoint import CheckpointError, ModelMeta
from cifar3.engine import ENGINES, Engine, load_engine, predict_scores
from cifar3.hardware import describe_machine
from cifar3.inference import DTYPES
from cifar3.unknown import decision

from .data import DEFAULT_DATA_ROOT, DataError, Dataset, limit_per_class, load_split, stratified_split
from .export import export_checkpoint
from .unknowns import load_unknowns, rejection_figures, unknown_split


def reliability_bins(probs: np.ndarray, labels: np.ndarray, bins: int = 15) -> list[dict]:
    """Equal-width bins of the top confidence, the non-empty ones: their edges, images, accuracy and mean
    confidence."""
    confidence, right = probs.max(1), probs.argmax(1) == labels
    edges = np.linspace(0.0, 1.0, bins + 1)
    rows = []
    for low, high in zip(edges[:-1], edges[1:], strict=True):
        in_bin = (confidence > low) & (confidence <= high)
        if in_bin.any():
            rows.append({"low": float(low), "high": float(high), "images": int(in_bin.sum()),
                         "accuracy": float(right[in_bin].mean()),
                         "confidence": float(confidence[in_bin].mean())})  # fmt: skip
    return rows


def expected_calibration_error(probs: np.ndarray, labels: np.ndarray, bins: int = 15) -> float:
    """ECE with equal-width confidence bins: sum over bins of |accuracy - confidence| x bin weight."""
    return float(sum(r["images"] * abs(r["accuracy"] - r["confidence"]) for r in reliability_bins(probs, labels, bins))
                 / len(labels))  # fmt: skip


def plot_confusion(matrix: np.ndarray, classes: list[str], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from sklearn.metrics import ConfusionMatrixDisplay

    fig, ax = plt.subplots(figsize=(1.6 * len(classes) + 2, 1.4 * len(classes) + 1.5))
    ConfusionMatrixDisplay(matrix, display_labels=classes).plot(ax=ax, cmap="Blues", colorbar=False, values_format="d")
    ax.set(title=title, xlabel="predicted class", ylabel="true class")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def evaluate(
    engine: Engine, meta: ModelMeta, images: torch.Tensor, labels: torch.Tensor, unknown: Dataset | None = None
) -> tuple[dict, np.ndarray, np.ndarray]:
    """(metrics, calibrated probabilities N x C, unknown scores N) for uint8 images with labels in meta.classes
    order; with ``unknown`` images (labels: their source), also how well the stored threshold tells them apart."""
    probs, scores = predict_scores(engine, meta, images)
    probs = probs.numpy()
    y_true, y_pred = labels.numpy(), probs.argmax(1)
    label_ids = list(range(len(meta.classes)))
    report = classification_report(
        y_true, y_pred, labels=label_ids, target_names=meta.classes, output_dict=True, zero_division=0
    )
    metrics = {
        "accuracy": round(float(accuracy_score(y_true, y_pred)), 5),
        "n": int(len(y_true)),
        "ece": round(expected_calibration_error(probs, y_true), 5),
        "classes": meta.classes,
        "per_class": {
            name: {
                k: round(float(report[name][k]), 5) if k != "support" else int(report[name][k])
                for k in ("precision", "recall", "f1-score", "support")
            }
            for name in meta.classes
        },
        "confusion_matrix": confusion_matrix(y_true, y_pred, labels=label_ids).tolist(),
        "temperature": meta.temperature,
        "confidence_map": meta.confidence_map,
        "variant": meta.variant,
        "unknown": unknown_metrics(engine, meta, scores, unknown),
    }
    return metrics, probs, scores.numpy()


def unknown_metrics(engine: Engine, meta: ModelMeta, known_scores: torch.Tensor, unknown: Dataset | None) -> dict:
    """The stored decision's figures: known images accepted; with unknown images, the share rejected and the AUROC,
    over all of them and per source (the top-level folder, or the CIFAR class)."""
    rule = decision(meta.unknown)
    figures = {"score": rule.score, "threshold": rule.threshold, "method": meta.unknown.get("method", "post-hoc")}
    figures |= rejection_figures(known_scores, None, rule.threshold)
    if unknown is None:
        return figures
    scores = predict_scores(engine, meta, unknown.images)[1]
    figures |= {"data": unknown.source, "n": len(scores), **rejection_figures(known_scores, scores, rule.threshold)}
    figures["per_source"] = {
        name: {"n": int((unknown.labels == i).sum()),
               **rejection_figures(known_scores, scores[unknown.labels == i], rule.threshold)}
        for i, name in enumerate(unknown.sources or ["."])
    }  # fmt: skip
    return figures


def validation_split(meta: ModelMeta, data_root: Path) -> Dataset:
    """The exact validation images the checkpoint was selected on (same data, limit, fraction, seed)."""
    config = meta.train_config
    data = limit_per_class(
        load_split(config["data"], meta.classes, "train", data_root), config["limit"], config["seed"]
    )
    _, val = stratified_split(data, config["val_fraction"], config["seed"])
    val.source = f"{config['data']} (validation split: {config['val_fraction']:.0%}, seed {config['seed']})"
    return val


def unknown_data(args: argparse.Namespace, meta: ModelMeta) -> Dataset | None:
    """--unknown-data's images (a CIFAR source: its other classes' test split), or with --validation the
    unknown validation split the checkpoint's threshold was fitted beside, or None."""
    if args.unknown_data:
        return load_unknowns(args.unknown_data, args.data_root, "test", meta.classes)
    return unknown_validation_split(meta, args.data_root) if args.validation else None


def unknown_validation_split(meta: ModelMeta, data_root: Path) -> Dataset | None:
    """The unknown validation split the checkpoint's threshold was fitted beside, or None if it was trained
    without unknown images."""
    config = meta.train_config
    if not config.get("unknown_data"):
        return None
    _, val = unknown_split(config["unknown_data"], meta.classes, data_root, config["limit"],
                           config["val_fraction"], config["seed"])  # fmt: skip
    val.source = f"{config['unknown_data']} (validation split: {config['val_fraction']:.0%}, seed {config['seed']})"
    return val


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m training.evaluate", description=__doc__.split("\n\n")[0])
    p.add_argument("--checkpoint", type=Path, required=True)
    p.add_argument("--data", default="cifar10", help="'cifar10', a cifar-10-batches-py folder, or an image folder")
    p.add_argument(
        "--validation",
        action="store_true",
        help="evaluate the checkpoint's own validation split instead: rebuilt from the data, seed and "
        "fraction its training recorded (--data is then ignored)",
    )
    p.add_argument("--unknown-data", help="images that are none of the classes: an image folder (per-source figures "
                   "by top-level sub-folder) or a CIFAR source (its other classes' test images); adds the AUROC and "
                   "the share rejected at the checkpoint's threshold to metrics.json (default with --validation: "
                   "the checkpoint's own unknown validation split, if it was trained with unknown images)")  # fmt: skip
    p.add_argument("--data-root", type=Path, default=DEFAULT_DATA_ROOT, help="download cache for --data cifar10")
    p.add_argument("--report-dir", type=Path, default=Path("reports/eval"))
    p.add_argument(
        "--predictions", action="store_true", help="also write DIR/predictions.csv (per-image probabilities)"
    )
    p.add_argument("--device", choices=["cpu", "cuda"], default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", choices=["auto", *DTYPES, "int8"], default="auto",
                   help="numeric type of the forward pass; auto = bfloat16 where the hardware computes it "
                        "natively, else float32, exactly as the served handler does; int8 only with engine "
                        "onnxruntime-int8 (default: auto)")  # fmt: skip
    p.add_argument("--engine", choices=ENGINES, default="auto",
                   help="what runs the forward pass: torch, onnxruntime (the checkpoint exported to ONNX now, as "
                        "scripts/archive.sh does), onnxruntime-int8 (an archive's int8 model, --onnx), or auto = "
                        "the fastest for this hardware, as the handler decides (default: auto)")  # fmt: skip
    p.add_argument("--threads", type=int, help="intra-op threads (default: torch's; the server uses handler.threads)")
    p.add_argument("--onnx", type=Path, help="the exported model an ONNX Runtime engine runs (e.g. an archive's "
                   "model.onnx or model.int8.onnx; default for onnxruntime: export the checkpoint now)")  # fmt: skip
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        engine, meta = load_engine(args.checkpoint, args.engine, device=args.device, dtype=args.dtype,
                                   threads=args.threads, onnx_path=args.onnx, exporter=export_checkpoint)  # fmt: skip
        data = (
            validation_split(meta, args.data_root)
            if args.validation
            else load_split(args.data, meta.classes, "test", args.data_root)
        )
        unknown = unknown_data(args, meta)
    except (CheckpointError, DataError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    metrics, probs, scores = evaluate(engine, meta, data.images, data.labels, unknown)
    metrics["data"] = data.source
    metrics |= engine.describe()  # engine, dtype, threads, device: what produced these figures
    metrics |= {"machine": describe_machine(engine.device), "date": date.today().isoformat()}
    args.report_dir.mkdir(parents=True, exist_ok=True)
    y_pred = probs.argmax(1)
    print(f"{data.source}: {metrics['n']} images, {metrics['engine']} {metrics['dtype']}, "
          f"accuracy {metrics['accuracy']:.4f}, ECE {metrics['ece']:.4f}\n")  # fmt: skip
    print(
        classification_report(
            data.labels.numpy(),
            y_pred,
            labels=list(range(len(meta.classes))),
            target_names=meta.classes,
            digits=4,
            zero_division=0,
        )
    )
    (args.report_dir / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
    plot_confusion(
        np.array(metrics["confusion_matrix"]),
        meta.classes,
        args.report_dir / "confusion_matrix.png",
        f"cifar3 {meta.variant}: accuracy {metrics['accuracy']:.2%} (n={metrics['n']})",
    )
    if args.predictions:
        with open(args.report_dir / "predictions.csv", "w", newline="") as f:
            writer = csv.writer(f)
            writer.writerow(["path", "label", "pred_class", *meta.classes, "unknown_score", "unknown"])
            rule = decision(meta.unknown)
            for i, row in enumerate(probs):
                path = data.paths[i] if data.paths else ""
                writer.writerow([path, meta.classes[data.labels[i]], meta.classes[row.argmax()], *map(float, row),
                                 float(scores[i]), rule.is_unknown(float(scores[i]))])  # fmt: skip
    rejection = metrics["unknown"]
    if "auroc" in rejection:
        print(f"unknown images ({rejection['data']}): {rejection['score']} score, threshold {rejection['threshold']}")
        for name, figures in {"all": rejection, **rejection["per_source"]}.items():
            rejected = f"rejected {figures['unknown_rejected']:.2%}, " if "unknown_rejected" in figures else ""
            print(f"  {name:>14}: {figures['n']:6d} images, {rejected}AUROC {figures['auroc']:.4f}")
    summary = {k: metrics[k] for k in ("accuracy", "n", "ece")} | {"report_dir": str(args.report_dir)}
    summary |= {k: rejection[k] for k in ("known_accepted", "unknown_rejected", "auroc") if k in rejection}
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
