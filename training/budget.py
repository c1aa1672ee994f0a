"""What a time budget buys on an ordinary 2-core AVX2 machine: the cpu preset at several budgets, emulated.

    python -m training.budget --data PATH/TO/cifar3/train --minutes 5 10 15 \
        --report reports/training/budget/budget

An ordinary 2-core AVX2 machine (no AVX-512) trains resnet18_fast at ``--reference`` images per second of
wall time (107 with channels_last at batch 128, measured on such a machine). This machine runs one training
thread under ``ATEN_CPU_CAPABILITY=avx2 ONEDNN_MAX_CPU_ISA=AVX2`` (torch's AVX2 kernels) and counts the budget
in that process's CPU time, so that other work on the machine does not change the result. A probe first
times the same training step (channels_last, 32x32, batch 128) the same way; an N-minute budget is then
given as (N x 60 - 30) x reference / probe CPU-seconds: 30 s are left for interpreter start-up, and the
scale makes one emulated thread do what the ordinary machine does in the same wall time. Runs go ``--jobs``
at a time (one thread each). Each writes ``checkpoints/budget-avx2-<N>min.pt``; REPORT.json gets every run's
command, summary and per-epoch log, REPORT.md the table.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime
from pathlib import Path

from cifar3.hardware import AVX2_ENV

from .reporting import beside, write_report

START_UP_S = 30.0
# training.* from the repository root, cifar3_training.* installed (pyproject.toml).
PROBE = (
    f"import json, sys, torch; from {__package__}.throughput import images_per_cpu_second as r, training_step as s; "
    "torch.set_num_threads(1); step = s('resnet18_fast', torch.channels_last, 32, False, 128); "
    "print(json.dumps({'rate': r({'probe': step}, 128, float(sys.argv[1]), 1)['probe'], "
    "'capability': torch.backends.cpu.get_cpu_capability()}))"
)


def emulated(command: list[str]) -> subprocess.CompletedProcess:
    return subprocess.run(command, env={**os.environ, **AVX2_ENV}, capture_output=True, text=True, check=False)


def probe(seconds: float) -> dict:
    done = emulated([sys.executable, "-c", PROBE, str(seconds)])
    if done.returncode:
        raise RuntimeError(f"the throughput probe failed: {done.stderr.strip()[-500:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def run(minutes: float, cpu_budget_s: float, args: argparse.Namespace) -> dict:
    out = args.checkpoints / f"{args.name}-{minutes:g}min.pt"
    command = [sys.executable, "-m", f"{__package__}.train", "--data", args.data, "--out", str(out), "--threads", "1",
               "--budget-clock", "cpu", "--time-budget", f"{cpu_budget_s:.1f}", "--seed", str(args.seed),
               *shlex.split(args.train_args)]  # fmt: skip
    load_before = os.getloadavg()[0]
    done = emulated(command)
    if done.returncode:
        raise RuntimeError(f"{' '.join(command)} failed:\n{done.stderr.strip()[-2000:]}")
    summary = json.loads(beside(out, ".summary.json").read_text())
    records = [json.loads(line) for line in beside(out, ".log.jsonl").read_text().splitlines() if line]
    return {
        "minutes": minutes,
        "cpu_budget_s": round(cpu_budget_s, 1),
        "command": " ".join(["ATEN_CPU_CAPABILITY=avx2 ONEDNN_MAX_CPU_ISA=AVX2", "python", *command[1:]]),
        "load_average_1min": [round(load_before, 2), round(os.getloadavg()[0], 2)],
        "summary": summary,
        "log_records": records,
    }


def markdown(report: dict) -> str:
    lines = [
        "# What a budget buys on a 2-core AVX2 machine (cpu preset)",
        "",
        f"Machine: {report['machine']}, {report['date']}. `python -m training.budget` (one training thread "
        f"under `ATEN_CPU_CAPABILITY=avx2 ONEDNN_MAX_CPU_ISA=AVX2`, budget counted in its CPU time). The probe "
        f"ran {report['probe']['rate']:.0f} images per CPU-second (torch capability {report['probe']['capability']}"
        f"); an ordinary 2-core AVX2 machine trains {report['reference']:g} per second of wall time, so an "
        f"N-minute budget is (N x 60 - {START_UP_S:.0f}) x {report['scale']:.3f} CPU-seconds.",
        "",
        "| wall budget | CPU-time budget | steps | epochs (last partial) | images trained | validation accuracy "
        "| temperature | CPU time used | load average (1 min) |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for r in report["runs"]:
        s = r["summary"]
        images = f"{s['steps'] * s['batch_size']:,}"
        lines.append(
            f"| {r['minutes']:g} min | {r['cpu_budget_s']:.0f} s | {s['steps']} | {s['epochs']} | {images} "
            f"| {s['val_accuracy']:.2%} | {s['temperature']:.3f} | {s['cpu_time_s']:.0f} s "
            f"| {r['load_average_1min'][0]:.1f}-{r['load_average_1min'][1]:.1f} |"
        )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m training.budget", description=__doc__.split("\n\n")[0])
    p.add_argument("--data", required=True, help="what training.train --data takes: cifar10, a cifar-10-batches-py "
                   "folder or an image folder")  # fmt: skip
    p.add_argument("--minutes", type=float, nargs="+", default=[5, 10, 15])
    p.add_argument("--reference", type=float, default=107.0, help="images/s of the ordinary machine")
    p.add_argument("--jobs", type=int, default=2, help="runs at a time, one thread each")
    p.add_argument("--probe-seconds", type=float, default=20.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--train-args", default="", help="more training.train options, e.g. '--unknown-data DIR'")
    p.add_argument("--name", default="budget-avx2", help="checkpoints are CHECKPOINTS/NAME-<N>min.pt")
    p.add_argument("--scale", type=float, help="CPU-seconds per wall second of the ordinary machine; default: probe")
    p.add_argument("--checkpoints", type=Path, default=Path("checkpoints"))
    p.add_argument("--report", type=Path, default=Path("reports/training/budget/budget"))
    args = p.parse_args(argv)
    measured = probe(args.probe_seconds) if args.scale is None else {"rate": args.reference / args.scale,
                                                                       "capability": "given by --scale"}  # fmt: skip
    scale = args.reference / measured["rate"]
    print(f"probe: {measured['rate']:.1f} images per CPU-second ({measured['capability']}); scale {scale:.3f}",
          flush=True)  # fmt: skip
    budgets = [(m, (m * 60 - START_UP_S) * scale) for m in sorted(args.minutes, reverse=True)]
    with ThreadPoolExecutor(args.jobs) as pool:
        runs = list(pool.map(lambda b: run(*b, args), budgets))
    import torch

    from cifar3.hardware import describe_machine

    report = {
        "date": f"{datetime.now(UTC):%Y-%m-%d}",
        "machine": describe_machine(torch.device("cpu")),
        "probe": measured,
        "reference": args.reference,
        "scale": round(scale, 4),
        "runs": sorted(runs, key=lambda r: r["minutes"]),
    }
    write_report(args.report, report, markdown(report))
    print(markdown(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
