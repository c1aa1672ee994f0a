"""Served throughput and latency of worker and batching layouts, one after another on the same machine.

    .venv/bin/python -m bench.layouts --report reports/layouts \
        workers=2,threads=1,batch=8,delay=1 workers=1,threads=2,batch=16,delay=1 ...
    .venv/bin/python -m bench.layouts --avx2 --report reports/layouts-avx2 ...

Each layout is the repository's handler/model-config.yaml with minWorkers, handler.threads, batchSize and
maxBatchDelay replaced (and ``engine=...`` if given); the checkpoint (``--checkpoint``, or ``checkpoint=PATH`` in
the layout, to compare models served the same way) is archived with it and served by a
real TorchServe on free loopback ports, driven by bench/loadgen.py exactly as bench/benchmark.py does.
``--avx2`` emulates an ordinary AVX2 CPU for PyTorch, as in the benchmark. Writes REPORT.json and REPORT.md.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from datetime import UTC, datetime
from pathlib import Path

import yaml

from bench.benchmark import ROOT, load_image_bytes, machine, serve_torchserve
from bench.reporting import write_report
from cifar3.hardware import AVX2_ENV

KEYS = {"workers": ("minWorkers",), "threads": ("handler", "threads"), "batch": ("batchSize",),
        "delay": ("maxBatchDelay",), "engine": ("handler", "engine")}  # fmt: skip


def layout_config(spec: str, base: dict) -> dict:
    """``workers=2,threads=1,batch=8,delay=1[,engine=onnxruntime]`` applied to the base model-config (a
    ``checkpoint=PATH`` item is the checkpoint's, not the config's: see ``layout_checkpoint``)."""
    config = json.loads(json.dumps(base))  # a deep copy
    for item in spec.split(","):
        key, _, value = item.partition("=")
        if key == "checkpoint":
            continue
        if key not in KEYS or not value:
            raise ValueError(f"bad layout item {item!r}: use {', '.join(f'{k}=VALUE' for k in KEYS)}")
        *parents, leaf = KEYS[key]
        node = config
        for parent in parents:
            node = node.setdefault(parent, {})
        node[leaf] = value if key == "engine" else int(value)
    config["maxWorkers"] = max(int(config.get("maxWorkers", 1)), int(config["minWorkers"]))
    return config


def layout_checkpoint(spec: str, default: Path) -> Path:
    """The layout's ``checkpoint=PATH``, else ``default``."""
    items = dict(item.partition("=")[::2] for item in spec.split(","))
    return Path(items["checkpoint"]) if items.get("checkpoint") else default


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.layouts", description=__doc__.split("\n\n")[0])
    parser.add_argument("layouts", nargs="+", help="workers=W,threads=T,batch=B,delay=MS[,engine=E][,checkpoint=PATH]")
    parser.add_argument("--checkpoint", type=Path, default=ROOT / "checkpoints" / "cifar3.pt")
    parser.add_argument("--images", type=Path, help="image folder to sample requests from (default: synthetic PNGs)")
    parser.add_argument("--concurrency", default="1,16,64")
    parser.add_argument("--seconds", type=float, default=15.0, help="duration of each load level")
    parser.add_argument("--avx2", action="store_true", help="emulate an AVX2 CPU for PyTorch (every process)")
    parser.add_argument("--report", type=Path, default=ROOT / "reports" / "layouts")
    args = parser.parse_args(argv)
    if args.avx2:
        os.environ.update(AVX2_ENV)
    base = yaml.safe_load((ROOT / "handler" / "model-config.yaml").read_text())
    try:
        configs = [(spec, layout_config(spec, base)) for spec in args.layouts]
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    levels = [int(c) for c in args.concurrency.split(",")]
    images = load_image_bytes(args.images, 256)
    results = []
    with tempfile.TemporaryDirectory(prefix="cifar3-layouts-") as tmp:
        for i, (spec, config) in enumerate(configs):
            path = Path(tmp) / f"model-config-{i}.yaml"
            path.write_text(yaml.safe_dump(config))
            print(f"layout {spec} ...", flush=True)
            checkpoint = layout_checkpoint(spec, args.checkpoint)
            results.append({"layout": spec, **serve_torchserve(checkpoint, path, images, levels, args.seconds)})
    report = {
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "machine": machine(),
        "avx2": args.avx2,
        "command": " ".join(["python -m bench.layouts", *(argv if argv is not None else sys.argv[1:])]),
        "checkpoint": str(args.checkpoint),
        "seconds_per_level": args.seconds,
        "layouts": results,
    }
    write_report(args.report, report, markdown(report))
    return 0


def markdown(report: dict) -> str:
    levels = [level["concurrency"] for level in report["layouts"][0]["levels"]]
    head = " | ".join(f"c={c} img/s | c={c} p50 / p99 ms" for c in levels)
    kernels = "PyTorch restricted to AVX2 kernels" if report["avx2"] else "the CPU's own kernels"
    lines = [
        f"# Served layouts{' (AVX2 emulated)' if report['avx2'] else ''}",
        "",
        f"{report['machine'].get('description') or report['machine']['cpu']}, {kernels}, {report['date'][:10]}; "
        f"`{report['command']}`; "
        f"{report['seconds_per_level']:g} s per load level, closed-loop clients, 0 errors unless stated.",
        "",
        f"| layout | engine | {head} |",
        "|---|---|" + "---:|---:|" * len(levels),
    ]
    for result in report["layouts"]:
        cells = []
        for level in result["levels"]:
            errors = f", {level['errors']} errors" if level.get("errors") else ""
            cells += [f"{level['images_per_s']:.0f}{errors}", f"{level['p50_ms']:.1f} / {level['p99_ms']:.1f}"]
        settings = result["settings"]
        lines.append(f"| `{result['layout']}` | {settings['engine']} {settings['dtype']} | {' | '.join(cells)} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
