"""Throughput and latency of cifar3: in-process limit vs. served over HTTP, in one run, one model.

    .venv/bin/python bench/benchmark.py --checkpoint checkpoints/cifar3.pt

1. In-process (this process, same torch threads as a worker): forward-only images/s at several
   batch sizes (the machine's limit for this model) and batch-1 latency, forward-only and with
   decode + preprocessing (what one request costs the handler).
   Also the batched rates at the workers' own torch thread count (model-config.yaml).
2. Served: archives the checkpoint, starts a real TorchServe on free loopback ports with the
   repository's config.properties and model-config.yaml, and drives it with closed-loop clients at
   concurrency 1, 4 and 16 (bench/loadgen.py, one thread): images/s, p50/p90/p99 latency, errors,
   and how many cores the frontend, the workers and the load generator kept busy.

Writes reports/benchmark.json and reports/benchmark.md (the README quotes them). The in-process
and served phases never overlap, so they do not compete for the cores.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import multiprocessing
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path

import psutil
import requests
import torch
import yaml

from bench.loadgen import run_load
from cifar3.checkpoint import load_checkpoint
from cifar3.inference import as_model_input, dtype_name, inference_dtype, prepare_for_inference
from cifar3.preprocessing import decode_image, eval_transform
from scripts.serve import Server, start_server

ROOT = Path(__file__).resolve().parent.parent

DEFAULT_IMAGES = ROOT.parent / "shared" / "data" / "cifar3" / "train"
TARGETS = {"served_vs_inprocess_c16": 0.85, "p99_c16_ms": 250.0, "p50_c1_vs_batch1": 1.3}


def load_image_bytes(folder: Path, count: int) -> list[bytes]:
    """Real JPEGs when the CIFAR-3 folder is there, else synthetic PNGs."""
    files = sorted(folder.glob("*/*.jpg"))
    if files:
        return [f.read_bytes() for f in files[:: max(1, len(files) // count)][:count]]
    import io

    from PIL import Image

    images = []
    for i in range(count):
        buffer = io.BytesIO()
        Image.effect_noise((32, 32), 40 + i % 50).convert("RGB").save(buffer, "PNG")
        images.append(buffer.getvalue())
    return images


def untrained_checkpoint(variant: str, folder: Path) -> Path:
    from cifar3.checkpoint import ModelMeta, save_checkpoint
    from cifar3.classes import DEFAULT_CLASSES
    from cifar3.model import build_model
    from cifar3.preprocessing import CIFAR10_MEAN, CIFAR10_STD, IMAGE_SIZE

    path = folder / f"untrained-{variant}.pt"
    meta = ModelMeta(variant, list(DEFAULT_CLASSES), IMAGE_SIZE, list(CIFAR10_MEAN), list(CIFAR10_STD))
    save_checkpoint(path, build_model(variant, len(DEFAULT_CLASSES)).eval(), meta)
    return path


def time_it(fn, repeats: int) -> list[float]:
    fn()  # warm-up
    samples = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        samples.append(time.perf_counter() - start)
    return samples


def served_model(checkpoint: Path, dtype: str):
    """(model, meta) prepared exactly as the handler prepares it with model-config's ``dtype``."""
    model, meta = load_checkpoint(checkpoint)
    return prepare_for_inference(model, inference_dtype(dtype, torch.device("cpu"))), meta


@torch.inference_mode()
def in_process(
    checkpoint: Path, dtype: str, images: list[bytes], threads: int, worker_threads: int, seconds: float
) -> dict:
    model, meta = served_model(checkpoint, dtype)

    def batch_of(n: int) -> torch.Tensor:
        pil = [decode_image(images[i % len(images)]) for i in range(n)]
        return as_model_input(eval_transform(pil, meta.image_size, meta.mean, meta.std), model)

    def rates_by_batch(batch_sizes: tuple[int, ...]) -> dict[int, float]:
        rates = {}
        for batch_size in batch_sizes:
            batch = batch_of(batch_size)
            repeats = max(5, int(seconds / max(1e-3, statistics.median(time_it(lambda b=batch: model(b), 3)))))
            samples = time_it(lambda b=batch: model(b), min(repeats, 400))
            rates[batch_size] = batch_size / statistics.median(samples)
        return rates

    one = batch_of(1)
    torch.set_num_threads(worker_threads)
    per_worker = rates_by_batch((1, 8))
    forward_ms = {worker_threads: statistics.median(time_it(lambda: model(one), 200)) * 1000}
    torch.set_num_threads(threads)
    rates = rates_by_batch((1, 8, 16, 32, 64))
    forward_ms[threads] = statistics.median(time_it(lambda: model(one), 200)) * 1000
    fastest = min(forward_ms, key=forward_ms.get)  # bfloat16 on AMX: one thread can beat two
    torch.set_num_threads(fastest)
    full_ms = statistics.median(time_it(lambda: model(batch_of(1)), 200)) * 1000
    torch.set_num_threads(threads)
    best = max(rates, key=rates.get)
    return {
        "threads": threads,
        "dtype": dtype_name(next(model.parameters()).dtype),  # what "auto" resolved to here
        "variant": meta.variant,
        "images_per_s_by_batch": {str(k): round(v, 1) for k, v in rates.items()},
        "best_batch": best,
        "batched_images_per_s": round(rates[best], 1),
        "batch1_forward_p50_ms": round(forward_ms[fastest], 2),  # the faster thread count's
        "batch1_threads": fastest,
        "batch1_with_preprocessing_p50_ms": round(full_ms, 2),
        "worker_threads": worker_threads,
        "images_per_s_by_batch_worker_threads": {str(k): round(v, 1) for k, v in per_worker.items()},
    }


def _forward_loop(checkpoint: Path, dtype: str, threads: int, batch_size: int, seconds: float, barrier, results):
    """One process: forward passes at ``batch_size`` for ``seconds`` once every process is ready."""
    torch.set_num_threads(threads)
    model, meta = served_model(checkpoint, dtype)
    batch = as_model_input(torch.randn(batch_size, 3, meta.image_size, meta.image_size), model)
    with torch.inference_mode():
        for _ in range(3):
            model(batch)
        barrier.wait()
        started, images = time.perf_counter(), 0
        while time.perf_counter() - started < seconds:
            model(batch)
            images += batch_size
    results.put(images / (time.perf_counter() - started))


def side_by_side(checkpoint: Path, dtype: str, processes: int, threads: int, batch_size: int, seconds: float) -> dict:
    """The served layout's compute-only rate: ``processes`` forward loops at once, no server.

    About what the workers could do if the frontend, the IPC and preprocessing cost nothing and every
    batch were full: how much of the in-process limit this worker layout can reach at best."""
    context = multiprocessing.get_context("spawn")
    barrier, results = context.Barrier(processes), context.Queue()
    args = (checkpoint, dtype, threads, batch_size, seconds, barrier, results)
    jobs = [context.Process(target=_forward_loop, args=args) for _ in range(processes)]
    for job in jobs:
        job.start()
    rates = [results.get(timeout=300) for _ in jobs]
    for job in jobs:
        job.join()
    return {"processes": processes, "threads": threads, "batch": batch_size, "images_per_s": round(sum(rates), 1)}


def process_cpu(processes: list[psutil.Process]) -> dict[int, float]:
    """CPU seconds (user + system) each live process has used so far."""
    used = {}
    for process in processes:
        with contextlib.suppress(psutil.Error):
            times = process.cpu_times()
            used[process.pid] = times.user + times.system
    return used


def load(server: Server, images: list[bytes], concurrency: int, seconds: float) -> dict:
    """Closed loop at ``concurrency`` (bench/loadgen.py), and where the machine's CPU went meanwhile."""
    url = f"{server.inference_url}/predictions/{server.model}"
    headers = server.headers() | {"Content-Type": "application/octet-stream"}
    run_load(url, images, headers, concurrency=concurrency, seconds=2.0)  # warm-up: workers and the JIT
    frontend = psutil.Process(server.pid())
    workers = frontend.children(recursive=True)
    before, client_before = process_cpu([frontend, *workers]), time.process_time()
    result = run_load(url, images, headers, concurrency=concurrency, seconds=seconds)
    after, client = process_cpu([frontend, *workers]), time.process_time() - client_before
    summary = result.summary()

    def cores(pids: list[int]) -> float:
        return round(sum(after[p] - before[p] for p in pids if p in after and p in before) / result.seconds, 2)

    return {
        "concurrency": concurrency,
        "requests": summary["requests"],
        "errors": summary["errors"],
        "error_kinds": summary["error_statuses"],
        "images_per_s": summary["rps"],
        "p50_ms": summary["p50_ms"],
        "p90_ms": summary["p90_ms"],
        "p99_ms": summary["p99_ms"],
        # cores busy on average: the Java frontend, all workers together, this load generator
        "cpu_cores": {
            "frontend": cores([frontend.pid]),
            "workers": cores([w.pid for w in workers]),
            "client": round(client / result.seconds, 2),
        },
    }


def worker_round_trip(server: Server, seconds: float) -> dict:
    """TorchServe's own cost of one request, no model work: ``GET /models/cifar3?customized=true`` at c=1
    goes frontend -> worker -> our handler's describe_handle -> back, like a prediction minus decode,
    preprocessing and the forward pass. No handler can answer a prediction faster than this."""
    url = f"{server.management_url}/models/{server.model}?customized=true"
    headers = server.headers("management")
    run_load(url, [b""], headers, concurrency=1, seconds=1.0, method="GET")  # warm-up
    summary = run_load(url, [b""], headers, concurrency=1, seconds=seconds, method="GET").summary()
    return {k: summary[k] for k in ("requests", "errors", "p50_ms", "p90_ms", "p99_ms")}


def machine() -> dict:
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor())  # fmt: skip
    return {"cpu": cpu, "cores": os.cpu_count(), "torch": str(torch.__version__), "python": platform.python_version()}


def markdown(report: dict) -> str:
    ip, checks, floor = report["in_process"], report["checks"], report["worker_round_trip"]
    side = ip["side_by_side"]
    lines = [
        f"# cifar3 benchmark ({report['date']})",
        "",
        f"Machine: {report['machine']['cpu']}, {report['machine']['cores']} cores; torch {report['machine']['torch']}. "
        f"Model: {ip['variant']} from `{report['checkpoint']}`, {ip['dtype']}; in-process with "
        f"{ip['threads']} torch threads.",
        "",
        "## In-process (the machine's limit for this model)",
        "",
        f"One process, {ip['threads']} torch threads:",
        "",
        "| batch | images/s |",
        "|---:|---:|",
        *[f"| {b} | {r} |" for b, r in ip["images_per_s_by_batch"].items()],
        "",
        f"Batch-1 latency p50 (faster of 1 and {ip['threads']} threads: {ip['batch1_threads']}): "
        f"{ip['batch1_forward_p50_ms']} ms forward only, {ip['batch1_with_preprocessing_p50_ms']} ms with decode + "
        "preprocessing.",
        "",
        f"With {ip['worker_threads']} torch thread(s), as each served worker runs: "
        + ", ".join(f"batch {b}: {r} images/s" for b, r in ip["images_per_s_by_batch_worker_threads"].items())
        + ".",
        "",
        f"The served layout, compute only: {side['processes']} process(es) x {side['threads']} thread(s) at batch "
        f"{side['batch']}, side by side with no server: {side['images_per_s']} images/s.",
        "",
        f"**The machine's limit: {ip['limit']['images_per_s']} images/s** ({ip['limit']['from']}; the best of "
        + ", ".join(f"{k}: {v}" for k, v in ip["limit"]["candidates"].items())
        + ").",
        "",
        "## Served by TorchServe over HTTP (closed-loop clients, same machine)",
        "",
        "Cores: how many of the machine's cores each part kept busy on average (frontend = TorchServe's Java",
        "process, workers = all Python workers together, client = the load generator).",
        "",
        "| concurrency | images/s | p50 ms | p90 ms | p99 ms | errors | cores: frontend / workers / client |",
        "|---:|---:|---:|---:|---:|---:|---:|",
        *[
            f"| {r['concurrency']} | {r['images_per_s']} | {r['p50_ms']} | {r['p90_ms']} | {r['p99_ms']} "
            f"| {r['errors']} | {' / '.join(str(r['cpu_cores'][k]) for k in ('frontend', 'workers', 'client'))} |"
            for r in report["served"]
        ],  # fmt: skip
        "",
        f"TorchServe's round trip without model work (`GET /models/<model>?customized=true` at c=1, through a "
        f"worker and our handler's describe): p50 {floor['p50_ms']} ms, p90 {floor['p90_ms']} ms, "
        f"p99 {floor['p99_ms']} ms.",
        "",
        "## Targets",
        "",
        "Bound: the best any server could measure on this machine, from this run's numbers. At c=16 no batch",
        "holds more than 16 images, so the served rate cannot pass the best in-process rate with 16 images in",
        "flight; at c=1 a prediction costs at least the batch-1 forward, its preprocessing, TorchServe's round",
        "trip and the batch delay (a lone request waits maxBatchDelay for company).",
        "",
        "| check | target | measured | met | bound |",
        "|---|---|---|---|---|",
        *[
            f"| {c['check']} | {c['target']} | {c['measured']} | {'yes' if c['met'] else '**no**'} "
            f"| {c.get('bound', '')} |"
            for c in checks
        ],  # fmt: skip
        "",
        f"Server settings: {report['server_settings']}.",
        "",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="bench/benchmark.py", description=__doc__.split("\n\n")[0])
    parser.add_argument("--checkpoint", type=Path, default=ROOT / "checkpoints" / "cifar3.pt")
    parser.add_argument("--images", type=Path, default=DEFAULT_IMAGES, help="image folder to sample requests from")
    parser.add_argument("--seconds", type=float, default=20.0, help="duration of each served load level")
    parser.add_argument("--concurrency", default="1,4,16")
    parser.add_argument("--in-process-seconds", type=float, default=3.0, help="timing per in-process batch size")
    parser.add_argument("--threads", type=int, default=os.cpu_count(), help="torch threads in-process")
    parser.add_argument("--out-dir", type=Path, default=ROOT / "reports")
    parser.add_argument(
        "--model-config",
        type=Path,
        default=ROOT / "handler" / "model-config.yaml",
        help="model-config.yaml to archive with (to compare batching/worker settings)",
    )
    parser.add_argument("--variant", help="benchmark an untrained model of this variant instead of --checkpoint")
    args = parser.parse_args(argv)
    if args.variant:  # speed does not depend on the weights: a random model of the variant will do
        args.checkpoint = untrained_checkpoint(args.variant, Path(tempfile.mkdtemp(prefix="cifar3-untrained-")))
    if not args.checkpoint.is_file():
        print(
            f"error: checkpoint not found: {args.checkpoint}; train one with python -m training.train", file=sys.stderr
        )
        return 2
    images = load_image_bytes(args.images, 256)
    model_config = yaml.safe_load(args.model_config.read_text()) or {}
    options = model_config.get("handler") or {}
    worker_threads, dtype = int(options.get("torch_threads") or args.threads), str(options.get("dtype", "auto"))
    print(f"in-process: {args.checkpoint} on {len(images)} images ...", flush=True)
    inproc = in_process(args.checkpoint, dtype, images, args.threads, worker_threads, args.in_process_seconds)
    workers, batch_size = int(model_config.get("minWorkers", 1)), int(model_config.get("batchSize", 1))
    loop_seconds, cores = max(1.0, 2 * args.in_process_seconds), os.cpu_count() or 1
    side = inproc["side_by_side"] = side_by_side(
        args.checkpoint, dtype, workers, worker_threads, batch_size, loop_seconds
    )
    # The machine's limit is the best of every way to spend its cores: one process with all of them, one
    # single-threaded process per core, or the served layout itself.
    limits = {
        f"1 process x {args.threads} threads, batch {inproc['best_batch']}": inproc["batched_images_per_s"],
        f"served layout: {workers} x {worker_threads} thread(s), batch {batch_size}": side["images_per_s"],
    }
    if cores > 1:
        per_core = side_by_side(args.checkpoint, dtype, cores, 1, 64, loop_seconds)["images_per_s"]
        limits[f"{cores} processes x 1 thread, batch 64"] = per_core
    limit_from = max(limits, key=limits.get)
    inproc["limit"] = {"images_per_s": limits[limit_from], "from": limit_from, "candidates": limits}
    # With 16 requests in flight no batch holds more than 16 images: the best any server could do at c=16.
    at_16 = [inproc["images_per_s_by_batch"]["16"]] + ([side["images_per_s"]] if workers * batch_size <= 16 else [])
    inproc["limit_with_16_in_flight"] = max(at_16)
    print(json.dumps(inproc), flush=True)

    with tempfile.TemporaryDirectory(prefix="cifar3-bench-") as tmp:
        store = Path(tmp) / "model_store"
        subprocess.run(["bash", str(ROOT / "scripts" / "archive.sh"), str(args.checkpoint)], check=True,
                       env={**os.environ, "MODEL_STORE": str(store), "MODEL_CONFIG": str(args.model_config)},
                       stdout=subprocess.DEVNULL)  # fmt: skip
        server = start_server(Path(tmp), store, timeout=300)
        try:
            described = requests.get(f"{server.management_url}/models/{server.model}",
                                     headers=server.headers("management"), timeout=30).json()[0]  # fmt: skip
            settings = {k: described.get(k) for k in ("batchSize", "maxBatchDelay", "minWorkers", "maxWorkers")}
            settings["torch_threads"] = worker_threads
            floor = worker_round_trip(server, min(args.seconds, 10.0))
            print(json.dumps({"worker_round_trip": floor}), flush=True)
            served = []
            for concurrency in (int(c) for c in args.concurrency.split(",")):
                served.append(load(server, images, concurrency, args.seconds))
                print(json.dumps(served[-1]), flush=True)
        finally:
            server.stop()

    by_c = {r["concurrency"]: r for r in served}
    checks = []
    # "bound": the best any server could measure here. With 16 requests in flight no batch holds more than
    # 16 images; at c=1 a prediction costs at least the forward, preprocessing, the round trip, the batch delay.
    limit = inproc["limit"]["images_per_s"]
    if 16 in by_c:
        ratio = by_c[16]["images_per_s"] / limit
        bound = min(1.0, inproc["limit_with_16_in_flight"] / limit)
        checks += [
            {"check": "served c=16 / in-process limit", "target": f">= {TARGETS['served_vs_inprocess_c16']}",
             "measured": round(ratio, 3), "met": ratio >= TARGETS["served_vs_inprocess_c16"],
             "bound": round(bound, 3), "bound_is": "best in-process rate with 16 images in flight / limit"},
            {"check": "errors at c=16", "target": "0", "measured": by_c[16]["errors"], "met": by_c[16]["errors"] == 0},
            {"check": "p99 at c=16 (ms)", "target": f"<= {TARGETS['p99_c16_ms']:.0f}",
             "measured": by_c[16]["p99_ms"], "met": by_c[16]["p99_ms"] <= TARGETS["p99_c16_ms"]},
        ]  # fmt: skip
    if 1 in by_c:
        forward = inproc["batch1_forward_p50_ms"]
        ratio, target = by_c[1]["p50_ms"] / forward, TARGETS["p50_c1_vs_batch1"]
        # With dynamic batching on, a lone request also waits maxBatchDelay for company before it runs.
        bound = (inproc["batch1_with_preprocessing_p50_ms"] + floor["p50_ms"] + settings["maxBatchDelay"]) / forward
        checks.append({"check": "p50 at c=1 / in-process batch-1 forward p50", "target": f"<= {target}",
                       "measured": round(ratio, 3), "met": ratio <= target, "bound": round(bound, 3),
                       "bound_is": "(forward + preprocessing + round trip + maxBatchDelay) / forward"})  # fmt: skip
    report = {
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "machine": machine(),
        "checkpoint": str(args.checkpoint),
        "in_process": inproc,
        "served": served,
        "server_settings": settings,
        "worker_round_trip": floor,
        "checks": checks,
    }
    args.out_dir.mkdir(parents=True, exist_ok=True)
    (args.out_dir / "benchmark.json").write_text(json.dumps(report, indent=2) + "\n")
    (args.out_dir / "benchmark.md").write_text(markdown(report))
    print(markdown(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
