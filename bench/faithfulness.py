"""Do the heat maps point at what the model uses? Every explanation method on the checkpoint's validation split.

    .venv/bin/python -m bench.faithfulness [--checkpoint checkpoints/cifar3.pt] [--report-dir reports]
        [--methods occlusion,grad-cam-layer2] [--figures docs/img] [--latency 30] [--squares] [--limit N]

For each validation image (the exact split the checkpoint was selected on) and each method, with p = the
predicted class's calibrated probability from the serving engine (``auto``, as handler/model-config.yaml):

- **Deletion test**: the 20% of pixels the method's heat map for the predicted class ranks highest set to
  the data set's mean colour (0 after normalisation); the drop p - p_top, against two random baselines: a
  scattered random 20% of the pixels, and a random 20% of the 4 x 4 blocks (RANDOM_DRAWS seeded draws each).
  Ratio = drop_top / the larger baseline drop.
- **Deletion and insertion curves**: the predicted class's probability with the top-ranked CURVE_FRACTIONS of
  the pixels removed (deletion: lower area is better) or with only them kept on the mean-colour image
  (insertion: higher is better); the area under each curve over the fraction, trapezoid rule.
- ``--squares``: a ``resnet18_pool`` trained by the real CLI on colour noise with one coloured 8 x 8 square
  deciding the class (square_images); the share of held-out images whose map peaks on the square.
- ``--latency N``: archives the checkpoint, starts TorchServe on free loopback ports (handler/model-config.yaml)
  and sends N sequential explanations per method and N predictions (c=1), 32 x 32 validation PNGs.

Writes ``REPORT_DIR/faithfulness.md`` and ``.json``; ``--figures DIR`` writes overlays of correctly and
wrongly classified validation images by the default method (heatmap-correct.png, heatmap-wrong.png).
"""

from __future__ import annotations

import argparse
import io
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw

from cifar3.checkpoint import load_checkpoint
from cifar3.classes import DEFAULT_CLASSES
from cifar3.engine import load_engine
from cifar3.explain import DEFAULT_METHOD, METHODS, build_explainer
from cifar3.hardware import describe_machine
from cifar3.inference import answer_logits
from cifar3.preprocessing import eval_transform, normalize
from cifar3_client.client import overlay_heatmap
from training.evaluate import validation_split
from training.export import export_checkpoint

ROOT = Path(__file__).resolve().parent.parent
FRACTION = 0.2  # share of the pixels removed in the deletion test
BLOCK = 4  # pixels per side of the random-block baseline's blocks
RANDOM_DRAWS = 5  # random masks per image and baseline; their drops are averaged
CURVE_FRACTIONS = (0.0, 0.05, 0.1, 0.2, 0.3, 0.5, 0.7, 1.0)  # points of the deletion and insertion curves
BATCH = 250  # images per explainer call
EXAMPLES = 6  # images per figure
COLUMNS = 3  # image-overlay pairs per row of a figure
SQUARE = 8  # pixels per side of the object that decides a square image's class
SQUARE_COLOURS = dict(zip(DEFAULT_CLASSES, ((230, 40, 40), (40, 220, 40), (40, 40, 230)), strict=True))


def machine() -> str:
    return describe_machine(torch.device("cuda" if torch.cuda.is_available() else "cpu"))


def remove(batch: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Normalized batch with the masked pixels (N x H x W, True = remove) set to the mean colour (0)."""
    return batch.masked_fill(mask.unsqueeze(1), 0.0)


def rank_mask(maps: torch.Tensor, fraction: float) -> torch.Tensor:
    """True at the ``fraction`` of each map's pixels ranked highest (ties broken by position, as topk does)."""
    flat = maps.flatten(1)
    mask = torch.zeros_like(flat, dtype=torch.bool)
    keep = round(flat.shape[1] * fraction)
    if keep:
        mask.scatter_(1, flat.topk(keep, dim=1).indices, True)
    return mask.view_as(maps)


def scattered_mask(shape: tuple[int, int, int], fraction: float, gen: torch.Generator) -> torch.Tensor:
    n, h, w = shape
    return rank_mask(torch.rand(n, h, w, generator=gen), fraction)


def block_mask(shape: tuple[int, int, int], fraction: float, gen: torch.Generator) -> torch.Tensor:
    """A random ``fraction`` of the BLOCK x BLOCK blocks (13 of 64 at 32 x 32: 20.3% of the pixels)."""
    n, h, w = shape
    blocks = rank_mask(torch.rand(n, h // BLOCK, w // BLOCK, generator=gen), fraction)
    return blocks.repeat_interleave(BLOCK, 1).repeat_interleave(BLOCK, 2)


def class_probs(engine, meta, batch: torch.Tensor) -> torch.Tensor:
    """Calibrated class probabilities (never a softmax over the other-class output) from the serving engine."""
    return torch.cat([meta.scores(engine(part))[0] for part in batch.split(BATCH)])


def target_probs(engine, meta, batch: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """The calibrated probability of each image's target class."""
    return class_probs(engine, meta, batch).gather(1, targets[:, None])[:, 0]


def area(values: list[float]) -> float:
    return float(np.trapezoid(values, CURVE_FRACTIONS))


def faithfulness(engine, meta, maps: torch.Tensor, batch, predicted, p, baselines: dict) -> dict:
    """One method's figures from its maps (N x H x W) for the predicted classes."""
    deletion, insertion = [], []
    for fraction in CURVE_FRACTIONS:
        if fraction in (0.0, 1.0):  # nothing or everything removed: the same for every map
            nothing, everything = float(p.mean()), baselines["p_mean_image"]
            deletion.append(nothing if fraction == 0.0 else everything)
            insertion.append(everything if fraction == 0.0 else nothing)
            continue
        mask = rank_mask(maps, fraction)
        p_deleted = target_probs(engine, meta, remove(batch, mask), predicted)
        if fraction == FRACTION:
            drop_top = float((p - p_deleted).mean())
        deletion.append(float(p_deleted.mean()))
        insertion.append(float(target_probs(engine, meta, remove(batch, ~mask), predicted).mean()))
    stronger = max(baselines["drop_scattered"], baselines["drop_blocks"])
    return {
        "drop_top": round(drop_top, 4),
        "ratio": round(drop_top / stronger, 2) if stronger > 0 else None,
        "ratio_scattered": round(drop_top / baselines["drop_scattered"], 2),
        "ratio_blocks": round(drop_top / baselines["drop_blocks"], 2),
        "deletion_auc": round(area(deletion), 4),
        "insertion_auc": round(area(insertion), 4),
        "deletion_curve": [round(v, 4) for v in deletion],
        "insertion_curve": [round(v, 4) for v in insertion],
        "zero_maps": int((maps.flatten(1).amax(1) == 0).sum()),
    }


def explain_all(explainer, batch: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    parts = zip(batch.split(BATCH), targets.split(BATCH), strict=True)
    return torch.cat([explainer.heatmaps(part, chosen.tolist()) for part, chosen in parts])


def measure(model, meta, engine, images: torch.Tensor, methods: list[str], seed: int = 0) -> dict:
    """{"baselines", "methods": {method: figures}, "predicted", "probs", "maps"} over uint8 images."""
    batch = normalize(images, meta.mean, meta.std)
    probs = class_probs(engine, meta, batch)
    predicted = probs.argmax(1)
    p = probs.gather(1, predicted[:, None])[:, 0]
    gen, shape = torch.Generator().manual_seed(seed), batch.shape[:1] + batch.shape[2:]
    baselines = {}
    for name, draw in (("drop_scattered", scattered_mask), ("drop_blocks", block_mask)):
        drops = [p - target_probs(engine, meta, remove(batch, draw(shape, FRACTION, gen)), predicted)
                 for _ in range(RANDOM_DRAWS)]  # fmt: skip
        baselines[name] = round(float(torch.stack(drops).mean()), 4)
    baselines["p_mean_image"] = float(target_probs(engine, meta, torch.zeros_like(batch), predicted).mean())
    results, all_maps = {}, {}
    for method in methods:
        started = time.perf_counter()
        all_maps[method] = explain_all(build_explainer(model, meta, method, engine), batch, predicted)
        results[method] = faithfulness(engine, meta, all_maps[method], batch, predicted, p, baselines)
        results[method]["seconds"] = round(time.perf_counter() - started, 1)
        print(method, {k: v for k, v in results[method].items() if not k.endswith("curve")}, file=sys.stderr)
    return {"baselines": baselines, "methods": results, "predicted": predicted, "probs": probs, "maps": all_maps}


# ---------------------------------------------------------------- the synthetic-object test


def square_images(count: int, seed: int) -> list[tuple[str, Image.Image, tuple[int, int]]]:
    """(class, image, (top, left) of its square) for count images per class: colour noise plus one square."""
    rng = np.random.default_rng(seed)
    out = []
    for name, colour in SQUARE_COLOURS.items():
        for _ in range(count):
            pixels = rng.integers(0, 256, (32, 32, 3)).astype(np.uint8)
            top, left = (int(v) for v in rng.integers(0, 32 - SQUARE + 1, 2))
            pixels[top : top + SQUARE, left : left + SQUARE] = colour
            out.append((name, Image.fromarray(pixels), (top, left)))
    return out


def train_squares(folder: Path, python: str = sys.executable) -> Path:
    """The CPU preset's variant trained by the real CLI on 450 square images (4 epochs; ~30 s on 2 cores)."""
    for i, (name, image, _) in enumerate(square_images(150, seed=0)):
        (folder / name).mkdir(parents=True, exist_ok=True)
        image.save(folder / name / f"{i:04d}.png")
    out = folder / "squares.pt"
    subprocess.run([python, "-m", "training.train", "--data", str(folder), "--out", str(out), "--preset", "cpu",
                    "--epochs", "4", "--batch-size", "32", "--lr", "0.05", "--device", "cpu",
                    "--no-unknown-data", "--photo", "0"], check=True, cwd=ROOT, capture_output=True)  # fmt: skip
    return out


def square_hits(model, meta, method: str, samples, engine=None) -> int:
    """How many of ``samples`` (square_images) get a map for their predicted class that peaks on the square."""
    batch = eval_transform([image for _, image, _ in samples], meta.image_size, meta.mean, meta.std)
    with torch.no_grad():  # the class the checkpoint answers (with its test-time flip, if it has one)
        predicted = answer_logits(model, batch, meta.test_flip)[:, : len(meta.classes)].argmax(1)
    maps = build_explainer(model, meta, method, engine).heatmaps(batch, predicted.tolist())
    hits = 0
    for heatmap, (_, _, (top, left)) in zip(maps, samples, strict=True):
        row, col = divmod(int(heatmap.argmax()), heatmap.shape[-1])
        hits += top <= row < top + SQUARE and left <= col < left + SQUARE
    return hits


def squares(methods: list[str], per_class: int = 40) -> dict:
    with tempfile.TemporaryDirectory(prefix="squares-") as tmp:
        model, meta = load_checkpoint(train_squares(Path(tmp)))
    samples = square_images(per_class, seed=1)  # images the model never saw
    return {"images": len(samples), "hits": {m: square_hits(model, meta, m, samples) for m in methods}}


# ---------------------------------------------------------------- latency through TorchServe


def latency(checkpoint: Path, images: list[bytes], requests_each: int, methods: list[str]) -> dict:
    """Sequential (c=1) explanations by each method and predictions against a real TorchServe."""
    from cifar3_client.server import start_server

    with tempfile.TemporaryDirectory(prefix="faithfulness-") as tmp:
        store = Path(tmp) / "model_store"
        subprocess.run(["bash", str(ROOT / "scripts" / "archive.sh"), str(checkpoint)], check=True, cwd=ROOT,
                       env={**os.environ, "MODEL_STORE": str(store)}, stdout=subprocess.DEVNULL)  # fmt: skip
        server = start_server(Path(tmp) / "server", store)
        try:
            client = server.client()
            load_average = round(os.getloadavg()[0], 1)
            timings: dict[str, list[float]] = {m: [] for m in methods} | {"predict": []}
            first: dict[str, list[float]] = {m: [] for m in methods}
            for method in methods:
                for i in range(requests_each + 4):  # the first explanation of each worker builds its explainer
                    data = images[i % len(images)]
                    started = time.perf_counter()
                    client.explain(data, method=method)
                    (first[method] if i < 4 else timings[method]).append((time.perf_counter() - started) * 1000)
            for i in range(requests_each):
                started = time.perf_counter()
                client.predict(images[i % len(images)])
                timings["predict"].append((time.perf_counter() - started) * 1000)
        finally:
            server.stop()
    summary = {
        kind: {
            "requests": len(values),
            "p50_ms": round(statistics.median(values), 1),
            "p90_ms": round(statistics.quantiles(values, n=10)[-1], 1),
        }
        for kind, values in timings.items()
    }
    for method in methods:
        summary[method]["first_requests_ms"] = [round(v) for v in first[method]]
    summary["load_average"] = load_average
    return summary


# ---------------------------------------------------------------- figures and report


def png_bytes(image: torch.Tensor) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(image.permute(1, 2, 0).numpy()).save(buffer, format="PNG")
    return buffer.getvalue()


def figure(images: torch.Tensor, maps: torch.Tensor, captions: list[str], path: Path, size: int = 96) -> None:
    """A grid of COLUMNS pairs per row: the image as the model saw it, its overlay, and the caption below."""
    pair, rows = 2 * size + 4, -(-len(captions) // COLUMNS)
    sheet = Image.new("RGB", (COLUMNS * (pair + 12), rows * (size + 18)), "white")
    draw = ImageDraw.Draw(sheet)
    for i, caption in enumerate(captions):
        image = Image.fromarray(images[i].permute(1, 2, 0).numpy())
        left, top = (i % COLUMNS) * (pair + 12), (i // COLUMNS) * (size + 18)
        sheet.paste(image.resize((size, size), Image.Resampling.NEAREST), (left, top))
        sheet.paste(overlay_heatmap(image, maps[i].tolist(), size=size), (left + size + 4, top))
        draw.text((left + 2, top + size + 3), caption, fill="black")
    path.parent.mkdir(parents=True, exist_ok=True)
    sheet.quantize(256, dither=Image.Dither.NONE).save(path, optimize=True)  # a third of RGB's bytes, same look


def figures(meta, images, labels, predicted, probs, maps, folder: Path) -> dict[str, str]:
    written = {}
    for name, pick in (("correct", predicted == labels), ("wrong", predicted != labels)):
        per_class = [(pick & (labels == c)).nonzero()[:, 0] for c in range(len(meta.classes))]
        chosen = [c[i] for i in range(EXAMPLES) for c in per_class if i < len(c)][:EXAMPLES]  # classes alike
        if not chosen:
            continue
        idx = torch.stack(chosen)
        captions = [
            f"{meta.classes[int(labels[i])]} -> {meta.classes[int(predicted[i])]} {float(probs[i].max()):.0%}"
            for i in idx
        ]
        path = folder / f"heatmap-{name}.png"
        figure(images[idx], maps[idx], captions, path)
        written[name] = str(path.relative_to(ROOT) if path.is_relative_to(ROOT) else path)
    return written


def first_requests(lat: dict, methods) -> list[str]:
    return [f"{m} {', '.join(f'{v} ms' for v in lat[m]['first_requests_ms'])}" for m in methods if m in lat]


def markdown(report: dict) -> str:
    base = report["baselines"]
    lines = [
        f"# Explanation faithfulness ({report['date']})",
        "",
        f"Measured {report['date'][:16].replace('T', ' ')} UTC on {report['machine']}; torch {report['torch']}, "
        f"captum {report['captum']}.",
        f"Checkpoint: `{report['checkpoint']}` ({report['variant']}, epoch {report['epoch']}, "
        f"{report['val_accuracy']:.2%} right); {report['images']} validation images ({report['data']}).",
        f"Command: `{report['command']}`",
        "",
        f"Deletion test: the {FRACTION:.0%} of pixels a method's heat map for the predicted class ranks highest set "
        "to the data set's mean colour; the drop of the predicted class's calibrated probability, averaged over "
        f"the images. Baselines (mean of {RANDOM_DRAWS} draws): a scattered random {FRACTION:.0%} of the pixels, "
        f"drop {base['drop_scattered']:.4f}; a random {FRACTION:.0%} of the {BLOCK}x{BLOCK} blocks, drop "
        f"{base['drop_blocks']:.4f}. Ratio: the top-{FRACTION:.0%} drop over the larger of the two. Deletion / "
        "insertion AUC: the area under the predicted class's mean probability with the top-ranked "
        f"{', '.join(f'{f:g}' for f in CURVE_FRACTIONS)} of the pixels removed (lower is better) or the only ones "
        "kept on the mean-colour image (higher is better).",
        "",
    ]
    lat = report.get("latency") or {}
    hits = (report.get("squares") or {}).get("hits", {})
    header = "| method | drop, top 20% | vs scattered | vs blocks | ratio | deletion AUC | insertion AUC |"
    rule = "|---|---:|---:|---:|---:|---:|---:|"
    if hits:
        header, rule = header + " peak on the square |", rule + "---:|"
    if lat:
        header, rule = header + " c=1 p50 | c=1 p90 |", rule + "---:|---:|"
    lines += [header, rule]
    for method, row in report["methods"].items():
        name = f"**{method}** (default)" if method == report["default_method"] else method
        cells = [name, f"{row['drop_top']:.4f}", f"{row['ratio_scattered']}x", f"{row['ratio_blocks']}x",
                 f"{row['ratio']}x", f"{row['deletion_auc']:.4f}", f"{row['insertion_auc']:.4f}"]  # fmt: skip
        if hits:
            cells.append(f"{hits[method]}/{report['squares']['images']}" if method in hits else "")
        if lat:
            cells += [f"{lat[method]['p50_ms']} ms", f"{lat[method]['p90_ms']} ms"] if method in lat else ["", ""]
        lines.append("| " + " | ".join(cells) + " |")
    if hits:
        lines += [
            "",
            "Peak on the square: a `resnet18_pool` trained by the real CLI (4 epochs) on 450 images of colour noise "
            f"whose class is decided only by one {SQUARE}x{SQUARE} coloured square; of "
            f"{report['squares']['images']} held-out images, those whose map for the predicted class peaks on the "
            "square.",
        ]
    if lat:
        lines += [
            "",
            f"Latency through TorchServe ({lat.get('date', report['date'])[:16].replace('T', ' ')} UTC, "
            f"handler/model-config.yaml, c=1, {lat['predict']['requests']} sequential "
            "requests per method, 32x32 validation PNGs, the project's client; 1-minute load average "
            f"{lat['load_average']} when the requests began): `POST /predictions/cifar3` p50 "
            f"{lat['predict']['p50_ms']} ms, p90 {lat['predict']['p90_ms']} ms. The first explanations by a method "
            "after start-up (each worker builds that method's explainer then): "
            + "; ".join(first_requests(lat, report["methods"]))
            + ".",
        ]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.faithfulness", description=__doc__.split("\n\n")[0])
    parser.add_argument("--checkpoint", type=Path, default=ROOT / "checkpoints" / "cifar3.pt")
    parser.add_argument("--report-dir", type=Path, default=ROOT / "reports")
    parser.add_argument("--methods", default=",".join(METHODS), help="comma-separated (default: every method)")
    parser.add_argument("--figures", type=Path, help="write heatmap-correct.png and heatmap-wrong.png here")
    parser.add_argument("--latency", type=int, default=0, metavar="N", help="N sequential requests per method")
    parser.add_argument("--squares", action="store_true", help="train the square model and measure peak hits")
    parser.add_argument("--limit", type=int, help="use the first N validation images only (quick runs)")
    parser.add_argument(
        "--latency-only", action="store_true", help="keep REPORT_DIR/faithfulness.json's figures, measure latency again"
    )
    parser.add_argument("--data-root", type=Path, default=ROOT / "data")
    args = parser.parse_args(argv)
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    if unknown := [m for m in methods if m not in METHODS]:
        parser.error(f"unknown method(s) {', '.join(unknown)}: choose from {', '.join(METHODS)}")

    import captum

    model, meta = load_checkpoint(args.checkpoint)
    # The serving engine as handler/model-config.yaml configures it runs the perturbation methods' copies.
    engine, _ = load_engine(args.checkpoint, "auto", threads=1, exporter=export_checkpoint)
    val = validation_split(meta, args.data_root)
    images, labels = val.images[: args.limit], val.labels[: args.limit]
    if args.latency_only:  # the figures do not depend on the machine's load; latency does
        report = json.loads((args.report_dir / "faithfulness.json").read_text())
        if (ROOT / report["checkpoint"]).resolve() != args.checkpoint.resolve():
            parser.error(f"the report measured {report['checkpoint']}, not {args.checkpoint}")
        methods = list(report["methods"])
        report["latency"] = latency(args.checkpoint, [png_bytes(i) for i in images[:50]], args.latency or 30, methods)
        report["latency"]["date"] = datetime.now(UTC).isoformat(timespec="seconds")
        report["command"] += f"; python -m bench.faithfulness {' '.join(argv if argv is not None else sys.argv[1:])}"
        (args.report_dir / "faithfulness.json").write_text(json.dumps(report, indent=2) + "\n")
        (args.report_dir / "faithfulness.md").write_text(markdown(report))
        print(json.dumps(report["latency"]))
        return 0
    started = time.perf_counter()
    result = measure(model, meta, engine, images, methods)
    report = {
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "machine": machine(),
        "torch": torch.__version__,
        "captum": captum.__version__,
        "checkpoint": str(
            args.checkpoint.relative_to(ROOT) if args.checkpoint.is_relative_to(ROOT) else args.checkpoint
        ),
        "variant": meta.variant,
        "epoch": meta.epoch,
        "val_accuracy": float((result["predicted"] == labels).float().mean()),
        "images": len(labels),
        "data": val.source,
        "command": "python -m bench.faithfulness " + " ".join(argv if argv is not None else sys.argv[1:]),
        "fraction": FRACTION,
        "random_draws": RANDOM_DRAWS,
        "curve_fractions": list(CURVE_FRACTIONS),
        "default_method": DEFAULT_METHOD,
        "baselines": result["baselines"],
        "methods": result["methods"],
        "seconds": round(time.perf_counter() - started, 1),
    }
    if args.figures and DEFAULT_METHOD in result["maps"]:
        report["figures"] = figures(meta, images, labels, result["predicted"], result["probs"],
                                    result["maps"][DEFAULT_METHOD], args.figures)  # fmt: skip
    if args.squares:
        report["squares"] = squares(methods)
    if args.latency:
        report["latency"] = latency(args.checkpoint, [png_bytes(i) for i in images[:50]], args.latency, methods)
    args.report_dir.mkdir(parents=True, exist_ok=True)
    (args.report_dir / "faithfulness.json").write_text(json.dumps(report, indent=2) + "\n")
    (args.report_dir / "faithfulness.md").write_text(markdown(report))
    print(json.dumps({k: report[k] for k in ("images", "default_method", "baselines", "methods")}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
