"""Do the Grad-CAM heat maps point at what the model uses? A deletion test on the checkpoint's validation split.

    .venv/bin/python -m bench.faithfulness [--checkpoint checkpoints/cifar3.pt] [--report-dir reports]
        [--figures docs/img] [--latency 30] [--limit N]

For each validation image (the exact split the checkpoint was selected on) and each residual stage:
p = the predicted class's calibrated probability (float32 model); p_top = the same with the 20% of pixels
the heat map for that class ranks highest replaced by the data set's mean colour (0 after normalisation);
p_random = the same with a random 20% replaced (the mean of RANDOM_DRAWS seeded draws). A faithful map
gives a larger mean drop p - p_top than p - p_random; the report states both drops and their ratio.

``--latency N`` archives the checkpoint, starts TorchServe on free loopback ports and sends N sequential
explanations and N predictions (c=1) of validation images. ``--figures DIR`` writes overlays of correctly
and wrongly classified validation images (gradcam-correct.png, gradcam-wrong.png). Writes
``REPORT_DIR/faithfulness.md`` and ``.json``.
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

import torch
from PIL import Image, ImageDraw

from cifar3.checkpoint import load_checkpoint
from cifar3.explain import GradCam, default_layer
from cifar3.hardware import describe_cpu
from cifar3.preprocessing import normalize
from training.evaluate import validation_split
from ui.client import overlay_heatmap

ROOT = Path(__file__).resolve().parent.parent
FRACTION = 0.2  # share of the pixels removed
RANDOM_DRAWS = 5  # random masks per image; their drops are averaged
BATCH = 250
EXAMPLES = 6  # images per figure
COLUMNS = 3  # image-overlay pairs per row of a figure
STAGES_COMPARED = ("layer2", "layer3", "layer4")


def machine() -> str:
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
    return f"{describe_cpu()}; {gpu}"


def remove(batch: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Normalized batch with the masked pixels (N x H x W, True = remove) set to the mean colour (0)."""
    return batch.masked_fill(mask.unsqueeze(1), 0.0)


def top_mask(maps: torch.Tensor, fraction: float) -> torch.Tensor:
    """True at the ``fraction`` of each map's pixels with the highest values."""
    flat = maps.flatten(1)
    keep = round(flat.shape[1] * fraction)
    mask = torch.zeros_like(flat, dtype=torch.bool)
    mask.scatter_(1, flat.topk(keep, dim=1).indices, True)
    return mask.view_as(maps)


def random_mask(shape: tuple[int, int, int], fraction: float, gen: torch.Generator) -> torch.Tensor:
    n, h, w = shape
    order = torch.rand(n, h * w, generator=gen).argsort(dim=1)
    return (order < round(h * w * fraction)).view(n, h, w)


@torch.no_grad()
def class_probs(model, batch: torch.Tensor, meta) -> torch.Tensor:
    return torch.cat([meta.scores(model(part))[0] for part in batch.split(BATCH)])


def deletion(model, meta, images: torch.Tensor, layers: list[str], seed: int = 0) -> dict:
    """{layer: {drop_top, drop_random, ratio, zero_maps}} over uint8 images, plus the predictions."""
    batch = normalize(images, meta.mean, meta.std)
    probs = class_probs(model, batch, meta)
    predicted = probs.argmax(1)
    p = probs.gather(1, predicted[:, None])[:, 0]
    gen = torch.Generator().manual_seed(seed)
    p_random = torch.stack(
        [
            class_probs(
                model, remove(batch, random_mask(batch.shape[:1] + batch.shape[2:], FRACTION, gen)), meta
            ).gather(1, predicted[:, None])[:, 0]
            for _ in range(RANDOM_DRAWS)
        ]
    ).mean(0)
    results = {}
    for layer in layers:
        cam = GradCam(model, meta.image_size, layer)
        maps = torch.cat(
            [cam.heatmaps(b, t.tolist()) for b, t in zip(batch.split(BATCH), predicted.split(BATCH), strict=True)]
        )
        p_top = class_probs(model, remove(batch, top_mask(maps, FRACTION)), meta).gather(1, predicted[:, None])[:, 0]
        drop_top, drop_random = float((p - p_top).mean()), float((p - p_random).mean())
        results[layer] = {
            "grid": cam.grid,
            "drop_top": round(drop_top, 4),
            "drop_random": round(drop_random, 4),
            "ratio": round(drop_top / drop_random, 2) if drop_random > 0 else None,
            "top_beats_random_share": round(float((p_top < p_random).float().mean()), 4),
            "zero_maps": int((maps.flatten(1).amax(1) == 0).sum()),
        }
    return {"layers": results, "predicted": predicted, "probs": probs}


def latency(checkpoint: Path, images: list[bytes], requests_each: int) -> dict:
    """Sequential (c=1) explanations and predictions against a real TorchServe serving ``checkpoint``."""
    from scripts.serve import start_server

    with tempfile.TemporaryDirectory(prefix="faithfulness-") as tmp:
        store = Path(tmp) / "model_store"
        subprocess.run(["bash", str(ROOT / "scripts" / "archive.sh"), str(checkpoint)], check=True, cwd=ROOT,
                       env={**os.environ, "MODEL_STORE": str(store)}, stdout=subprocess.DEVNULL)  # fmt: skip
        server = start_server(Path(tmp) / "server", store)
        try:
            client = server.client()
            load_average = round(os.getloadavg()[0], 1)
            timings: dict[str, list[float]] = {"explain": [], "predict": []}
            first = []
            for i in range(requests_each + 4):  # the first explanation of each worker loads its explainer
                data = images[i % len(images)]
                started = time.perf_counter()
                client.explain(data)
                elapsed = (time.perf_counter() - started) * 1000
                (first if i < 4 else timings["explain"]).append(elapsed)
                started = time.perf_counter()
                client.predict(data)
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
    summary["explain"]["first_requests_ms"] = [round(v) for v in first]
    summary["load_average"] = load_average
    return summary


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


def figures(model, meta, images, labels, predicted, probs, folder: Path) -> dict[str, str]:
    cam = GradCam(model, meta.image_size)
    written = {}
    for name, pick in (("correct", predicted == labels), ("wrong", predicted != labels)):
        per_class = [(pick & (labels == c)).nonzero()[:, 0] for c in range(len(meta.classes))]
        chosen = [c[i] for i in range(EXAMPLES) for c in per_class if i < len(c)][:EXAMPLES]  # classes alike
        if not chosen:
            continue
        idx = torch.stack(chosen)
        batch = normalize(images[idx], meta.mean, meta.std)
        maps = cam.heatmaps(batch, predicted[idx].tolist())
        captions = [
            f"{meta.classes[int(labels[i])]} -> {meta.classes[int(predicted[i])]} {float(probs[i].max()):.0%}"
            for i in idx
        ]
        path = folder / f"gradcam-{name}.png"
        figure(images[idx], maps, captions, path)
        written[name] = str(path.relative_to(ROOT) if path.is_relative_to(ROOT) else path)
    return written


def markdown(report: dict) -> str:
    lines = [
        f"# Grad-CAM faithfulness ({report['date']})",
        "",
        f"Measured {report['date'][:16].replace('T', ' ')} UTC on {report['machine']}; torch {report['torch']}, "
        f"captum {report['captum']}.",
        f"Checkpoint: `{report['checkpoint']}` ({report['variant']}, epoch {report['epoch']}, "
        f"{report['val_accuracy']:.2%} right); {report['images']} validation images ({report['data']}).",
        f"Command: `{report['command']}`",
        "",
        f"Deletion test: the {FRACTION:.0%} of pixels the heat map for the predicted class ranks highest, or a random "
        f"{FRACTION:.0%} (mean of {RANDOM_DRAWS} draws), set to the data set's mean colour; the drop of the predicted "
        "class's calibrated probability, averaged over the images. Ratio > 1: the map finds pixels the prediction "
        "depends on better than chance. Top < random: the share of images whose probability dropped more with the "
        "top 20% removed than with the random 20%.",
        "",
        "| layer | grid | served | drop, top 20% | drop, random 20% | ratio | top < random | all-zero maps |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for layer, row in report["layers"].items():
        lines.append(
            f"| {layer} | {row['grid']}x{row['grid']} | {'yes' if layer == report['served_layer'] else ''} | "
            f"{row['drop_top']:.4f} | {row['drop_random']:.4f} | {row['ratio']} | {row['top_beats_random_share']:.1%} "
            f"| {row['zero_maps']} |"
        )
    if report.get("latency"):
        lat = report["latency"]
        lines += [
            "",
            f"Latency through TorchServe (handler/model-config.yaml, c=1, {lat['explain']['requests']} sequential "
            "requests of each kind, 32x32 validation PNGs, the project's client; 1-minute load average "
            f"{lat['load_average']} when the requests began, from other processes on the machine):",
            "",
            "| request | p50 | p90 |",
            "|---|---|---|",
            f"| `POST /explanations/cifar3` | {lat['explain']['p50_ms']} ms | {lat['explain']['p90_ms']} ms |",
            f"| `POST /predictions/cifar3` | {lat['predict']['p50_ms']} ms | {lat['predict']['p90_ms']} ms |",
            "",
            "The first explanations after start-up (each worker loads its float32 explainer then): "
            + ", ".join(f"{v} ms" for v in lat["explain"]["first_requests_ms"])
            + ".",
        ]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.faithfulness", description=__doc__.split("\n\n")[0])
    parser.add_argument("--checkpoint", type=Path, default=ROOT / "checkpoints" / "cifar3.pt")
    parser.add_argument("--report-dir", type=Path, default=ROOT / "reports")
    parser.add_argument("--figures", type=Path, help="write gradcam-correct.png and gradcam-wrong.png here")
    parser.add_argument("--latency", type=int, default=0, metavar="N", help="N sequential requests of each kind")
    parser.add_argument("--limit", type=int, help="use the first N validation images only (quick runs)")
    parser.add_argument("--data-root", type=Path, default=ROOT / "data")
    args = parser.parse_args(argv)

    import captum

    model, meta = load_checkpoint(args.checkpoint)
    val = validation_split(meta, args.data_root)
    images, labels = val.images[: args.limit], val.labels[: args.limit]
    started = time.perf_counter()
    result = deletion(model, meta, images, list(STAGES_COMPARED))
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
        "served_layer": default_layer(model, meta.image_size),
        "layers": result["layers"],
        "seconds": round(time.perf_counter() - started, 1),
    }
    if args.figures:
        report["figures"] = figures(model, meta, images, labels, result["predicted"], result["probs"], args.figures)
    if args.latency:
        report["latency"] = latency(args.checkpoint, [png_bytes(image) for image in images[:50]], args.latency)
    args.report_dir.mkdir(parents=True, exist_ok=True)
    (args.report_dir / "faithfulness.json").write_text(json.dumps(report, indent=2) + "\n")
    (args.report_dir / "faithfulness.md").write_text(markdown(report))
    print(json.dumps({k: report[k] for k in ("images", "served_layer", "layers")}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
