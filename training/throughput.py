"""Training throughput of the CPU recipe's options, in images per CPU-second of one thread.

    python -m training.throughput --report reports/training/throughput
    ATEN_CPU_CAPABILITY=avx2 ONEDNN_MAX_CPU_ISA=AVX2 python -m training.throughput --report ...

Times full training steps (forward, backward, SGD update) of one batch on one thread and divides by the
process's CPU time, not the wall clock: on a machine other people are using, CPU time still says what the
step costs. The options take turns in interleaved rounds and each reports its median round, so a drift in
the machine's speed moves all of them alike and the ratios between options hold. Each run appends its rows
(tagged with torch's CPU capability and the batch, so an emulated AVX2 run and a native one sit side by side)
to ``REPORT.json`` and rewrites ``REPORT.md``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from datetime import UTC, datetime
from pathlib import Path

import torch
from torch import nn

from cifar3.hardware import describe_machine
from cifar3.inference import native_bfloat16
from cifar3.model import VARIANTS, build_model

from .reporting import report_file, write_report
from .train import training_layout

TRAINING = "training"  # the layout training uses (training.train.training_layout)
NCHW_LAYER4 = "nchw-layer4"  # the same without its small-map convolutions (SmallMapConv2d)
# name -> (memory format, input side in pixels, bf16 autocast)
OPTIONS = {
    "float32, NCHW, 32x32": (torch.contiguous_format, 32, False),
    "float32, channels_last, 32x32": (torch.channels_last, 32, False),
    "float32, channels_last with NCHW layer4, 32x32": (NCHW_LAYER4, 32, False),
    "float32, the same with small-map products, 32x32": (TRAINING, 32, False),
    "float32, NCHW, 24x24": (torch.contiguous_format, 24, False),
    "float32, channels_last, 24x24": (torch.channels_last, 24, False),
    "float32, channels_last with NCHW layer4, 24x24": (NCHW_LAYER4, 24, False),
    "float32, the same with small-map products, 24x24": (TRAINING, 24, False),
    "float32, channels_last with NCHW layer4, 16x16": (NCHW_LAYER4, 16, False),
    "float32, the same with small-map products, 16x16": (TRAINING, 16, False),
    "bf16 autocast, channels_last, 32x32": (torch.channels_last, 32, True),
    "bf16 autocast, channels_last, 24x24": (torch.channels_last, 24, True),
}


def training_step(variant: str, fmt, size: int, bf16: bool, batch: int):
    """A function that runs one full training step of a fresh model in the given layout."""
    torch.manual_seed(0)
    model = build_model(variant, 3).train()
    if fmt in (TRAINING, NCHW_LAYER4):
        model, fmt = training_layout(model, bf16, small_maps=fmt == TRAINING), torch.channels_last
    else:
        model.to(memory_format=fmt)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, nesterov=True)
    inputs = torch.randn(batch, 3, size, size).contiguous(memory_format=fmt)
    targets = torch.randint(0, 3, (batch,))

    def step() -> None:
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            loss = nn.functional.cross_entropy(model(inputs).float(), targets)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    step()  # warm-up: allocations, oneDNN primitives
    return step


def images_per_cpu_second(steps: dict, batch: int, seconds: float, rounds: int) -> dict[str, float]:
    """Images per CPU-second of each option's step, timed in ``rounds`` interleaved rounds of
    ``seconds / rounds`` each and reduced to the median round: a machine whose speed drifts (other tenants,
    clocks) then moves every option alike, so the ratios between options hold."""
    rates: dict[str, list[float]] = {name: [] for name in steps}
    for _ in range(rounds):
        for name, step in steps.items():
            start, done = time.process_time(), 0
            while time.process_time() - start < seconds / rounds:
                step()
                done += 1
            rates[name].append(done * batch / (time.process_time() - start))
    return {name: statistics.median(r) for name, r in rates.items()}


def render(rows: list[dict]) -> str:
    lines = [
        "# Training throughput of the CPU recipe's options",
        "",
        "Images per CPU-second of one thread: full training steps (forward, backward, SGD update) at the batch given, "
        "timed by `python -m training.throughput` on the process's CPU time (valid on a shared machine). "
        "`AVX2` rows ran under `ATEN_CPU_CAPABILITY=avx2 ONEDNN_MAX_CPU_ISA=AVX2`, an ordinary CPU's kernels.",
        "",
        "| variant | CPU kernels | batch | option | images / CPU-s | vs float32 NCHW 32x32 | machine | date |",
        "|---|---|---:|---|---:|---:|---|---|",
    ]
    for row in rows:
        lines.append(
            f"| {row['variant']} | {row['capability']} | {row.get('batch', 128)} | {row['option']} "
            f"| {row['images_per_cpu_s']:.0f} "
            f"| {row['relative']:.2f}x | {row['machine']} | {row['date']} |"
        )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m training.throughput", description=__doc__.split("\n\n")[0])
    p.add_argument("--variant", choices=list(VARIANTS), default="resnet18_fast")
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--seconds", type=float, default=10.0, help="CPU-seconds timed per option, over all rounds")
    p.add_argument("--rounds", type=int, default=5, help="interleaved rounds; each option's median round counts")
    p.add_argument("--report", type=Path, help="append to REPORT.json and rewrite REPORT.md")
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    capability = torch.backends.cpu.get_cpu_capability()
    bf16_native = native_bfloat16(torch.device("cpu"))
    machine, date = describe_machine(torch.device("cpu")), f"{datetime.now(UTC):%Y-%m-%d}"
    steps = {
        option: training_step(args.variant, fmt, size, bf16, args.batch_size)
        for option, (fmt, size, bf16) in OPTIONS.items()
        if bf16_native or not bf16  # emulated bfloat16 is slower than float32: the recipe never uses it there
    }
    rows: list[dict] = []
    for option, rate in images_per_cpu_second(steps, args.batch_size, args.seconds, args.rounds).items():
        rows.append({"variant": args.variant, "capability": capability, "batch": args.batch_size, "option": option,
                     "images_per_cpu_s": round(rate, 1), "machine": machine, "date": date})  # fmt: skip
        print(f"{capability} {option}: {rate:.0f} images per CPU-second", flush=True)
    for row in rows:
        row["relative"] = round(row["images_per_cpu_s"] / rows[0]["images_per_cpu_s"], 3)
    if args.report:
        path = report_file(args.report, ".json")
        kept = json.loads(path.read_text())["rows"] if path.is_file() else []
        ours = (args.variant, capability, args.batch_size)
        kept = [r for r in kept if (r["variant"], r["capability"], r.get("batch", 128)) != ours] + rows
        write_report(args.report, {"rows": kept}, render(kept))
    print(json.dumps(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
