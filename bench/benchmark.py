"""Throughput and latency of cifar3 per inference engine, in-process and served, beside two peer servers.

    .venv/bin/python -m bench.benchmark --checkpoint checkpoints/cifar3.pt            # reports/benchmark.md
    .venv/bin/python -m bench.benchmark --checkpoint checkpoints/cifar3.pt --avx2     # reports/benchmark-avx2.md
    .venv/bin/python -m bench.benchmark --checkpoint CKPT --quick --out-dir /tmp/r   # a smoke run in seconds

One run, one machine, one checkpoint; the phases never overlap, so they do not compete for the cores.

1. In-process: every engine of cifar3/engine.py (torch float32, torch bfloat16, ONNX Runtime float32) at 1
   and all threads, batch 1 to 64: images/s and batch-1 latency, each in a fresh process. Also the
   side-by-side layouts (one single-threaded process per core). The fastest of all is the machine's limit.
2. Served: archives the checkpoint (scripts/archive.sh: export + verification), starts a real TorchServe on
   free loopback ports with the repository's config.properties and model-config.yaml, and drives it with
   closed-loop clients (bench/loadgen.py) at concurrency 1, 4, 16, 64: images/s, p50/p90/p99, errors, cores.
3. Test-time flip, what it costs: the same weights calibrated for the other setting (training.calibrate:
   one view if the checkpoint averages each image with its mirror image, else both), the served engine at
   one thread in-process and TorchServe at concurrency 1 and 16, beside the checkpoint's own figures.
4. Peers, same checkpoint, same load generator: LitServe with dynamic batching and the engine our handler
   runs (bench/peers/litserve_server.py), and the prototype's design, FastAPI + uvicorn with eager
   float32 torch and one image per request (bench/peers/prototype_fastapi.py), on free loopback ports,
   stopped afterwards.

``--avx2`` emulates an ordinary AVX2 CPU for PyTorch (ATEN_CPU_CAPABILITY=avx2 ONEDNN_MAX_CPU_ISA=AVX2 in
every process the run starts: the in-process children, TorchServe's workers, the peers); ONNX Runtime picks
its kernels from the CPU itself and has no such switch. The report records which capability torch ran.
Writes ``OUT/<name>.json`` and ``OUT/<name>.md`` (name: benchmark, or benchmark-avx2).
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import csv
import json
import multiprocessing
import os
import platform
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path

import psutil
import requests
import yaml

from bench.loadgen import run_load
from cifar3.hardware import AVX2_ENV, cpu_flags, cpu_name, describe_cpu
from cifar3_client.server import Server, free_ports, start_server

ROOT = Path(__file__).resolve().parent.parent
# (engine, dtype) pairs measured in-process: what cifar3/engine.py can run on a CPU.
ENGINE_VARIANTS = (
    ("torch", "float32"),
    ("torch", "bfloat16"),
    ("onnxruntime", "float32"),
    ("onnxruntime-int8", "int8"),
)
BATCHES = (1, 8, 16, 32, 64)
# The targets, each a ratio of two figures from the same run.
TARGETS = {
    "p50_c1_vs_batch1": 2.0,
    "c16_vs_inprocess16": 0.8,
    "p99_c16_ms": 150.0,
    "vs_litserve": 1.5,
    "vs_prototype": 4.0,
    # Test-time flip runs two forward passes' compute per image in one batch: served, it may cost at most that.
    "flip_c16_vs_one_view": 0.5,
}


# -- requests ---------------------------------------------------------------------------------------


def load_image_bytes(folder: Path | None, count: int) -> list[bytes]:
    """JPEGs from an image folder's class sub-folders when one is given and has them, else synthetic PNGs."""
    files = sorted(folder.glob("*/*.jpg")) if folder else []
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


# -- in-process (each measurement in a fresh spawned process, so env and thread settings are its own) ----


def _time(fn, repeats: int) -> list[float]:
    fn()  # warm-up
    samples = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        samples.append(time.perf_counter() - start)
    return samples


def _measure_engine(spec: dict) -> dict:
    """Runs in a child: one engine at one thread count, every batch size."""
    import torch

    from cifar3.engine import load_engine
    from cifar3.preprocessing import decode_image, eval_transform

    engine, meta = load_engine(
        spec["checkpoint"], spec["engine"], dtype=spec["dtype"], threads=spec["threads"], onnx_path=spec["onnx"]
    )
    images = spec["images"]

    def batch_of(n: int) -> torch.Tensor:
        return eval_transform(
            [decode_image(images[i % len(images)]) for i in range(n)], meta.image_size, meta.mean, meta.std
        )

    rates = {}
    for size in spec["batches"]:
        batch = batch_of(size)
        once = min(_time(lambda b=batch: engine(b), 2))
        samples = _time(lambda b=batch: engine(b), max(3, min(300, int(spec["seconds"] / max(once, 1e-4)))))
        rates[str(size)] = round(size / statistics.median(samples), 1)
    one = batch_of(1)
    repeats = max(5, min(300, int(spec["seconds"] / max(min(_time(lambda: engine(one), 2)), 1e-4))))
    forward = statistics.median(_time(lambda: engine(one), repeats)) * 1000
    with_pre = statistics.median(_time(lambda: engine(batch_of(1)), repeats)) * 1000
    return {
        **engine.describe(),
        "capability": torch.backends.cpu.get_cpu_capability(),
        "images_per_s_by_batch": rates,
        "batch1_forward_p50_ms": round(forward, 2),
        "batch1_with_preprocessing_p50_ms": round(with_pre, 2),
    }


def _forward_loop(spec: dict, barrier, results) -> None:
    """Runs in a child: forward passes at one batch size for ``seconds`` once every sibling is ready."""
    import torch

    from cifar3.engine import load_engine

    engine, meta = load_engine(
        spec["checkpoint"], spec["engine"], dtype=spec["dtype"], threads=1, onnx_path=spec["onnx"]
    )
    batch = torch.randn(spec["batch"], 3, meta.image_size, meta.image_size)
    for _ in range(3):
        engine(batch)
    barrier.wait()
    started, done = time.perf_counter(), 0
    while time.perf_counter() - started < spec["seconds"]:
        engine(batch)
        done += spec["batch"]
    results.put(done / (time.perf_counter() - started))


def _measure_engines(specs: list[dict]) -> list[dict]:
    """Runs in one child (the run's environment, e.g. --avx2, set before torch is imported there)."""
    runs = []
    for spec in specs:
        runs.append(_measure_engine(spec))
        print(json.dumps(runs[-1]), flush=True)
    return runs


def side_by_side(spec: dict, processes: int, batch: int) -> float:
    """images/s of ``processes`` single-threaded processes at ``batch`` each, all at once, no server."""
    context = multiprocessing.get_context("spawn")
    barrier, results = context.Barrier(processes), context.Queue()
    jobs = [
        context.Process(target=_forward_loop, args=({**spec, "batch": batch}, barrier, results))
        for _ in range(processes)
    ]
    for job in jobs:
        job.start()
    rates = [results.get(timeout=600) for _ in jobs]
    for job in jobs:
        job.join()
    return round(sum(rates), 1)


def onnx_file(onnx: Path, engine: str) -> Path:
    """The exported model ``engine`` runs: ``onnx`` (the float32 export) or its int8 quantization beside it."""
    from cifar3.engine import ONNX_FILE, ONNX_FILES

    return onnx.with_name(ONNX_FILES.get(engine, ONNX_FILE))


def in_process(checkpoint: Path, onnx: Path, images: list[bytes], threads: int, seconds: float, quick: bool) -> dict:
    cores = os.cpu_count() or 1
    batches = (1, 8) if quick else BATCHES
    specs = [
        {
            "checkpoint": str(checkpoint),
            "onnx": str(onnx_file(onnx, engine)),
            "engine": engine,
            "dtype": dtype,
            "threads": count,
            "images": images,
            "seconds": seconds,
            "batches": batches,
        }
        for engine, dtype in ENGINE_VARIANTS
        for count in sorted({1, threads})
    ]
    with multiprocessing.get_context("spawn").Pool(1) as pool:
        runs = pool.apply(_measure_engines, (specs,))
    if cores > 1 and not quick:  # one single-threaded process per core: the served layout's compute, no server
        for run in runs:
            if run["threads"] != 1:
                continue
            spec = {
                "checkpoint": str(checkpoint),
                "onnx": str(onnx_file(onnx, run["engine"])),
                "engine": run["engine"],
                "dtype": run["dtype"],
                "seconds": max(1.0, 2 * seconds),
            }
            sides = {str(b): side_by_side(spec, cores, b) for b in sorted({16 // cores, max(batches)})}
            run["side_by_side"] = {"processes": cores, "images_per_s_by_batch_each": sides}
            print(json.dumps({"side_by_side": run}), flush=True)
    return {"runs": runs, "limits": limits(runs, cores)}


def limits(runs: list[dict], cores: int) -> dict:
    """The machine's limit (the best rate of any engine, threads, batch or layout), the best rate with at
    most 16 images in flight, and the fastest batch-1 forward, each with where it came from."""
    rates, at_16 = {}, {}
    for run in runs:
        label = f"{run['engine']} {run['dtype']}, {run['threads']} thread(s)"
        for batch, rate in run["images_per_s_by_batch"].items():
            rates[f"{label}, batch {batch}"] = rate
            if int(batch) <= 16:
                at_16[f"{label}, batch {batch}"] = rate
        for batch, rate in (run.get("side_by_side") or {}).get("images_per_s_by_batch_each", {}).items():
            key = f"{run['engine']} {run['dtype']}, {cores} processes x 1 thread, batch {batch} each"
            rates[key] = rate
            if int(batch) * cores <= 16:
                at_16[key] = rate
    fastest = min(runs, key=lambda r: r["batch1_forward_p50_ms"])

    def best(table: dict) -> dict:
        key = max(table, key=table.get)
        return {"images_per_s": table[key], "from": key}

    return {
        "machine": best(rates),
        "with_16_in_flight": best(at_16),
        "batch1": {
            "ms": fastest["batch1_forward_p50_ms"],
            "from": f"{fastest['engine']} {fastest['dtype']}, {fastest['threads']} thread(s)",
        },
    }


# -- parity: every engine against PyTorch float32 on the checkpoint's validation split ----------------


def parity(checkpoint: Path, onnx: Path, threads: int) -> dict:
    """``training.evaluate --validation --predictions`` per engine (the CLI users run): accuracy, how many
    predictions agree with PyTorch float32, and the largest probability difference from it."""
    runs = {}
    with tempfile.TemporaryDirectory(prefix="cifar3-parity-") as tmp:
        for engine, dtype in ENGINE_VARIANTS:
            report = Path(tmp) / f"{engine}-{dtype}"
            subprocess.run(
                [
                    sys.executable,
                    "-m",
                    "training.evaluate",
                    "--checkpoint",
                    str(checkpoint),
                    "--validation",
                    "--engine",
                    engine,
                    "--dtype",
                    dtype,
                    "--threads",
                    str(threads),
                    "--predictions",
                    "--report-dir",
                    str(report),
                    *(["--onnx", str(onnx_file(onnx, engine))] if engine != "torch" else []),
                ],
                check=True,
                cwd=ROOT,
                stdout=subprocess.DEVNULL,
            )
            metrics = json.loads((report / "metrics.json").read_text())
            with open(report / "predictions.csv", newline="") as f:  # by column name: it has more than probabilities
                rows = [(row["pred_class"], [float(row[c]) for c in metrics["classes"]]) for row in csv.DictReader(f)]
            runs[f"{engine} {dtype}"] = {"accuracy": metrics["accuracy"], "n": metrics["n"], "rows": rows}
    reference = runs["torch float32"]["rows"]
    out = {}
    for name, run in runs.items():
        agree = sum(a[0] == b[0] for a, b in zip(run["rows"], reference, strict=True))
        diff = max(
            abs(x - y) for a, b in zip(run["rows"], reference, strict=True) for x, y in zip(a[1], b[1], strict=True)
        )
        out[name] = {
            "accuracy": run["accuracy"],
            "n": run["n"],
            "agree_with_float32": agree,
            "agreement": round(agree / run["n"], 5),
            "max_probability_difference": float(f"{diff:.2g}"),
        }
    return out


# -- served -----------------------------------------------------------------------------------------


def process_cpu(processes: list[psutil.Process]) -> dict[int, float]:
    used = {}
    for process in processes:
        with contextlib.suppress(psutil.Error):
            times = process.cpu_times()
            used[process.pid] = times.user + times.system
    return used


def load(url: str, headers: dict, bodies: list[bytes], concurrency: int, seconds: float, pid: int | None) -> dict:
    """Closed loop at ``concurrency`` (bench/loadgen.py), and how many cores the server and client kept busy."""
    run_load(url, bodies, headers, concurrency=concurrency, seconds=min(2.0, seconds))  # warm-up
    server = [psutil.Process(pid), *psutil.Process(pid).children(recursive=True)] if pid else []
    before, client_before = process_cpu(server), time.process_time()
    result = run_load(url, bodies, headers, concurrency=concurrency, seconds=seconds)
    after, client = process_cpu(server), time.process_time() - client_before
    summary = result.summary()
    busy = sum(after[p] - before[p] for p in after if p in before)
    return {
        "concurrency": concurrency,
        **{k: summary[k] for k in ("requests", "errors", "p50_ms", "p90_ms", "p99_ms")},
        "error_kinds": summary["error_statuses"],
        "images_per_s": summary["rps"],
        "cpu_cores": {"server": round(busy / result.seconds, 2), "client": round(client / result.seconds, 2)},
    }


def serve_torchserve(checkpoint: Path, model_config: Path, images: list[bytes], levels, seconds: float) -> dict:
    with tempfile.TemporaryDirectory(prefix="cifar3-bench-") as tmp:
        store = Path(tmp) / "model_store"
        subprocess.run(
            ["bash", str(ROOT / "scripts" / "archive.sh"), str(checkpoint)],
            check=True,
            env={**os.environ, "MODEL_STORE": str(store), "MODEL_CONFIG": str(model_config)},
            stdout=subprocess.DEVNULL,
        )
        server = start_server(Path(tmp), store, timeout=300)
        try:
            management = requests.get(
                f"{server.management_url}/models/{server.model}",
                params={"customized": "true"},
                headers=server.headers("management"),
                timeout=60,
            ).json()[0]
            custom = management.get("customizedMetadata") or {}
            custom = json.loads(custom) if isinstance(custom, str) else custom
            settings = {k: management.get(k) for k in ("batchSize", "maxBatchDelay", "minWorkers", "maxWorkers")}
            settings |= {k: custom.get(k) for k in ("engine", "dtype", "threads", "test_flip", "engine_requested")}
            url = f"{server.inference_url}/predictions/{server.model}"
            headers = server.headers() | {"Content-Type": "application/octet-stream"}
            served = []
            for concurrency in levels:
                served.append(load(url, headers, images, concurrency, seconds, server.pid()))
                print(json.dumps({"torchserve": served[-1]}), flush=True)
            floor = round_trip(server, min(seconds, 5.0))
        finally:
            server.stop()
    return {"settings": settings, "levels": served, "round_trip": floor}


def flip_cost(
    checkpoint: Path, model_config: Path, images: list[bytes], served: dict, onnx: Path, seconds: float,
    in_process_seconds: float, quick: bool,
) -> dict:  # fmt: skip
    """Test-time flip against one view, same weights: the checkpoint and a copy calibrated for the other setting
    (training.calibrate), each in-process (the served engine, one thread) and served at c=1 and 16."""
    from cifar3.checkpoint import load_checkpoint

    flip = load_checkpoint(checkpoint)[1].test_flip
    with tempfile.TemporaryDirectory(prefix="cifar3-bench-flip-") as tmp:
        other = Path(tmp) / "other.pt"
        switched = subprocess.run(
            [sys.executable, "-m", "training.calibrate", "--checkpoint", str(checkpoint), "--out", str(other),
             "--no-test-flip" if flip else "--test-flip"], check=False, cwd=ROOT, capture_output=True,
            text=True,
        )  # fmt: skip
        if switched.returncode:
            raise RuntimeError(f"training.calibrate could not switch test-time flip: {switched.stderr.strip()}")
        calibrated = json.loads(switched.stdout.strip().splitlines()[-1])
        engine, dtype = served["settings"]["engine"], served["settings"]["dtype"]
        batches = (1, 8) if quick else (1, 8, 16)
        spec = {"onnx": str(onnx_file(onnx, engine)), "engine": engine, "dtype": dtype, "threads": 1,
                "images": images, "seconds": in_process_seconds, "batches": batches}  # fmt: skip
        with multiprocessing.get_context("spawn").Pool(1) as pool:
            runs = pool.apply(_measure_engines, ([{**spec, "checkpoint": str(c)} for c in (checkpoint, other)],))
        levels = [c for c in (1, 16) if not quick] or [1, 4]
        other_served = serve_torchserve(other, model_config, images, levels, seconds)
    own_served = {r["concurrency"]: r for r in served["levels"]}
    rows = {
        "checkpoint": {"in_process": runs[0], "served": [own_served[c] for c in levels if c in own_served],
                       "val_accuracy": calibrated["before"]["val_accuracy"]},
        "other": {"in_process": runs[1], "served": other_served["levels"],
                  "val_accuracy": calibrated["after"]["val_accuracy"]},
    }  # fmt: skip
    with_flip, one_view = (rows["checkpoint"], rows["other"]) if flip else (rows["other"], rows["checkpoint"])
    return {"checkpoint_test_flip": flip, "validation": calibrated["validation"], "test_flip": with_flip,
            "one_view": one_view}  # fmt: skip


def round_trip(server: Server, seconds: float) -> dict:
    """TorchServe's own cost of one request without model work: the describe call goes frontend -> worker ->
    our handler -> back, like a prediction minus decode, preprocessing and the forward pass. At c=1 its
    latency; at c=16 its rate, the most requests per second this server could answer with a free model."""
    url = f"{server.management_url}/models/{server.model}?customized=true"
    headers = server.headers("management")
    run_load(url, [b""], headers, concurrency=1, seconds=1.0, method="GET")  # warm-up
    summary = run_load(url, [b""], headers, concurrency=1, seconds=seconds, method="GET").summary()
    busy = run_load(url, [b""], headers, concurrency=16, seconds=seconds, method="GET").summary()
    return {**{k: summary[k] for k in ("requests", "errors", "p50_ms", "p90_ms", "p99_ms")},
            "c16_requests_per_s": busy["rps"], "c16_errors": busy["errors"]}  # fmt: skip


def stop_process_tree(process: subprocess.Popen) -> None:
    """SIGTERM to the peer and everything it started (its own session), SIGKILL what is left after 10 s."""
    family = [process.pid] + [p.pid for p in psutil.Process(process.pid).children(recursive=True)]
    for pid in family:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGTERM)
    _, alive = psutil.wait_procs([psutil.Process(p) for p in family if psutil.pid_exists(p)], timeout=10)
    for survivor in alive:
        with contextlib.suppress(psutil.Error):
            survivor.kill()
    process.wait(timeout=10)


def serve_peer(name: str, command: list[str], bodies: list[bytes], headers: dict, levels, seconds: float) -> dict:
    """Start a peer on a free loopback port, wait for /health, drive it like TorchServe, stop it."""
    (port,) = free_ports(1)
    log = tempfile.NamedTemporaryFile(prefix=f"cifar3-{name}-", suffix=".log", delete=False)  # noqa: SIM115
    process = subprocess.Popen(
        [*command, "--port", str(port)],
        cwd=ROOT,
        stdout=log,
        stderr=subprocess.STDOUT,
        stdin=subprocess.DEVNULL,
        start_new_session=True,
    )
    try:
        deadline = time.monotonic() + 300
        while True:
            with contextlib.suppress(requests.RequestException):
                if requests.get(f"http://127.0.0.1:{port}/health", timeout=5).ok:
                    break
            if process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"{name} did not start; its log: {log.name}")
            time.sleep(0.5)
        levels_out = []
        for concurrency in levels:
            levels_out.append(
                load(f"http://127.0.0.1:{port}/predict", headers, bodies, concurrency, seconds, process.pid)
            )
            print(json.dumps({name: levels_out[-1]}), flush=True)
    finally:
        stop_process_tree(process)
    Path(log.name).unlink(missing_ok=True)
    return {"command": " ".join(command[2:]), "levels": levels_out}


# -- report -----------------------------------------------------------------------------------------


def machine() -> dict:
    import onnxruntime
    import torch

    return {
        "description": describe_cpu(),  # the machine line every CPU report writes (cifar3.hardware)
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "cpu": cpu_name(),
        "cores": os.cpu_count(),
        "isa": cpu_flags(),
        "torch": str(torch.__version__),
        "onnxruntime": onnxruntime.__version__,
        "python": platform.python_version(),
    }


def checks(report: dict) -> list[dict]:
    limits_, ts = report["in_process"]["limits"], {r["concurrency"]: r for r in report["served"]["levels"]}
    peers = {name: {r["concurrency"]: r for r in peer["levels"]} for name, peer in report["peers"].items()}
    out = []

    def add(check, target, measured, met, basis):
        out.append({"check": check, "target": target, "measured": measured, "met": bool(met), "basis": basis})

    if 1 in ts:
        ratio = round(ts[1]["p50_ms"] / limits_["batch1"]["ms"], 2)
        add(
            "served c=1 p50 / fastest in-process batch-1 forward",
            f"<= {TARGETS['p50_c1_vs_batch1']}",
            ratio,
            ratio <= TARGETS["p50_c1_vs_batch1"],
            f"{ts[1]['p50_ms']} ms / {limits_['batch1']['ms']} ms ({limits_['batch1']['from']}); TorchServe's "
            f"round trip without model work alone: {report['served']['round_trip']['p50_ms']} ms",
        )
    if 16 in ts:
        c16 = ts[16]
        best16 = limits_["with_16_in_flight"]
        ratio = round(c16["images_per_s"] / best16["images_per_s"], 3)
        add(
            "served c=16 / best in-process rate with <= 16 images in flight",
            f">= {TARGETS['c16_vs_inprocess16']}",
            ratio,
            ratio >= TARGETS["c16_vs_inprocess16"],
            f"{c16['images_per_s']} / {best16['images_per_s']} img/s ({best16['from']}); TorchServe without "
            f"model work at c=16: {report['served']['round_trip'].get('c16_requests_per_s')} requests/s",
        )
        add("errors at c=16", "0", c16["errors"], c16["errors"] == 0, "")
        add(
            "p99 at c=16 (ms)",
            f"<= {TARGETS['p99_c16_ms']:.0f}",
            c16["p99_ms"],
            c16["p99_ms"] <= TARGETS["p99_c16_ms"],
            "",
        )
        for name, key in (("litserve", "vs_litserve"), ("prototype", "vs_prototype")):
            if 16 in peers.get(name, {}):
                peer = peers[name][16]["images_per_s"]
                ratio = round(c16["images_per_s"] / peer, 2) if peer else float("inf")
                add(
                    f"served c=16 / {name} c=16",
                    f">= {TARGETS[key]}",
                    ratio,
                    ratio >= TARGETS[key],
                    f"{c16['images_per_s']} / {peer} img/s",
                )
    cost = report.get("flip_cost")
    if cost:
        at = {name: {r["concurrency"]: r for r in cost[name]["served"]} for name in ("test_flip", "one_view")}
        if 16 in at["test_flip"] and 16 in at["one_view"]:
            flip, one = at["test_flip"][16]["images_per_s"], at["one_view"][16]["images_per_s"]
            ratio = round(flip / one, 2)
            add(
                "served c=16 with test-time flip / one view",
                f">= {TARGETS['flip_c16_vs_one_view']}",
                ratio,
                ratio >= TARGETS["flip_c16_vs_one_view"],
                f"{flip} / {one} img/s; validation accuracy {cost['test_flip']['val_accuracy']:.2%} / "
                f"{cost['one_view']['val_accuracy']:.2%}",
            )
    return out


def markdown(report: dict) -> str:
    m, ip, served = report["machine"], report["in_process"], report["served"]
    lim = ip["limits"]
    caps = sorted({r["capability"] for r in ip["runs"] if r["engine"] == "torch"})
    mode = (
        "PyTorch restricted to AVX2 (" + " ".join(f"{k}={v}" for k, v in AVX2_ENV.items()) + ")"
        if report["avx2"]
        else "native"
    )
    batches = list(ip["runs"][0]["images_per_s_by_batch"])
    lines = [
        f"# cifar3 benchmark: {mode} ({report['date']})",
        "",
        f"Machine: {m.get('description') or m['cpu']}; torch {m['torch']} "
        f"(CPU capability used: {', '.join(caps)}), onnxruntime {m['onnxruntime']}. Model: {report['variant']} "
        f"from `{report['checkpoint']}`. Command: `{report['command']}`.",
        "",
        "## In-process: every engine (images/s; batch-1 p50 forward and with decode + preprocessing)",
        "",
        "| engine | dtype | threads | "
        + " | ".join(f"batch {b}" for b in batches)
        + " | batch 1 ms | with preprocessing ms |",
        "|---|---|---:|" + "---:|" * len(batches) + "---:|---:|",
        *[
            f"| {r['engine']} | {r['dtype']} | {r['threads']} | "
            + " | ".join(str(r["images_per_s_by_batch"][b]) for b in batches)
            + f" | {r['batch1_forward_p50_ms']} | {r['batch1_with_preprocessing_p50_ms']} |"
            for r in ip["runs"]
        ],
        "",
        *[
            f"- {r['engine']} {r['dtype']}, {s['processes']} single-threaded processes side by side: "
            + ", ".join(f"batch {b} each: {v} img/s" for b, v in s["images_per_s_by_batch_each"].items())
            for r in ip["runs"]
            if (s := r.get("side_by_side"))
        ],
        "",
        f"**The machine's limit: {lim['machine']['images_per_s']} images/s** ({lim['machine']['from']}). "
        f"Best with at most 16 images in flight: {lim['with_16_in_flight']['images_per_s']} images/s "
        f"({lim['with_16_in_flight']['from']}). Fastest batch-1 forward: {lim['batch1']['ms']} ms "
        f"({lim['batch1']['from']}).",
        "",
        "## Served (closed-loop clients on the same machine, bench/loadgen.py)",
        "",
        f"TorchServe: {served['settings']}. Round trip without model work (describe call): "
        f"p50 {served['round_trip']['p50_ms']} ms at c=1; {served['round_trip']['c16_requests_per_s']} "
        "requests/s at c=16.",
        "",
        "| server | concurrency | images/s | p50 ms | p90 ms | p99 ms | errors | cores: server / client |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for name, levels in (
        ("TorchServe (cifar3)", served["levels"]),
        *((peer_label(n), p["levels"]) for n, p in report["peers"].items()),
    ):
        lines += [
            f"| {name} | {r['concurrency']} | {r['images_per_s']} | {r['p50_ms']} | {r['p90_ms']} | {r['p99_ms']} "
            f"| {r['errors']} | {r['cpu_cores']['server']} / {r['cpu_cores']['client']} |"
            for r in levels
        ]
    lines += ["", *[f"- {peer_label(n)}: `python -m {p['command']}`" for n, p in report["peers"].items()], ""]
    lines += flip_markdown(report.get("flip_cost"))
    lines += [
        "## Targets (ratios of figures from this run)",
        "",
        "| check | target | measured | met | from |",
        "|---|---|---|---|---|",
    ]
    lines += [
        f"| {c['check']} | {c['target']} | {c['measured']} | {'yes' if c['met'] else '**no**'} | {c['basis']} |"
        for c in report["checks"]
    ]
    lines += [
        "",
        "## Parity with PyTorch float32 (the checkpoint's validation split, `training.evaluate --validation`)",
        "",
        "| engine | accuracy | predictions equal to float32's | max probability difference |",
        "|---|---:|---:|---:|",
    ]
    lines += [
        f"| {name} | {p['accuracy']:.4f} | {p['agree_with_float32']} of {p['n']} ({p['agreement']:.2%}) "
        f"| {p['max_probability_difference']:g} |"
        for name, p in report["parity"].items()
    ]
    load = report["load_average_at_start"]
    lines += [
        "",
        "Machine load (1-minute load average) as each phase began: "
        + ", ".join(f"{phase} {value}" for phase, value in load.items())
        + f". Above {m['cores']} (the cores), other processes competed for the cores during the run, and"
        " ratios between phases measured under different loads do not hold.",
        "",
        f"GPU: not measured ({m['gpu']} present; this benchmark runs on the CPU)."
        if m.get("gpu")
        else "GPU: not measured (no GPU on this machine).",
        "",
    ]
    return "\n".join(lines)


def flip_markdown(cost: dict | None) -> list[str]:
    """The test-time flip section: the same weights answering with both views averaged and with one."""
    if not cost:
        return []
    flip, one = cost["test_flip"], cost["one_view"]
    engine = f"{flip['in_process']['engine']} {flip['in_process']['dtype']}"
    lines = [
        "## Test-time flip: what it costs",
        "",
        f"The checkpoint {'answers' if cost['checkpoint_test_flip'] else 'does not answer'} with test-time flip "
        "(the logits of each image and its mirror image averaged: one forward pass at twice the batch); the other "
        "column is the same weights calibrated for the other setting by `python -m training.calibrate`. "
        f"Validation accuracy ({cost['validation']}): {flip['val_accuracy']:.2%} with test-time flip, "
        f"{one['val_accuracy']:.2%} with one view.",
        "",
        "| measure | with test-time flip | one view | ratio |",
        "|---|---:|---:|---:|",
    ]

    def row(label: str, a: float, b: float) -> str:
        return f"| {label} | {a} | {b} | {a / b:.2f} |" if b else f"| {label} | {a} | {b} | |"

    forward = "batch1_forward_p50_ms"
    lines.append(row(f"in-process {engine}, 1 thread: batch-1 forward p50 ms", flip["in_process"][forward],
                     one["in_process"][forward]))  # fmt: skip
    for batch, rate in flip["in_process"]["images_per_s_by_batch"].items():
        lines.append(row(f"in-process {engine}, 1 thread: images/s at batch {batch}", rate,
                         one["in_process"]["images_per_s_by_batch"][batch]))  # fmt: skip
    others = {r["concurrency"]: r for r in one["served"]}
    for level in flip["served"]:
        other = others.get(level["concurrency"])
        if other:
            c = level["concurrency"]
            lines.append(row(f"TorchServe c={c}: images/s", level["images_per_s"], other["images_per_s"]))
            lines.append(row(f"TorchServe c={c}: p50 ms", level["p50_ms"], other["p50_ms"]))
            lines.append(row(f"TorchServe c={c}: p99 ms", level["p99_ms"], other["p99_ms"]))
    return [*lines, ""]


def peer_label(name: str) -> str:
    return {"litserve": "LitServe 0.2.19 (peer)", "prototype": "prototype design: FastAPI, eager (peer)"}.get(
        name, name
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.benchmark", description=__doc__.split("\n\n")[0])
    parser.add_argument("--checkpoint", type=Path, default=ROOT / "checkpoints" / "cifar3.pt")
    parser.add_argument("--images", type=Path, help="image folder to sample requests from (JPEGs in its class "
                        "sub-folders; default: synthetic PNGs) and to verify the ONNX export on")  # fmt: skip
    parser.add_argument("--seconds", type=float, default=20.0, help="duration of each served load level")
    parser.add_argument("--concurrency", default="1,4,16,64")
    parser.add_argument("--peer-concurrency", default="1,16", help="load levels for the peers")
    parser.add_argument("--in-process-seconds", type=float, default=2.0, help="timing per engine and batch size")
    parser.add_argument("--threads", type=int, default=os.cpu_count(), help="'all threads' in-process")
    parser.add_argument("--avx2", action="store_true", help="emulate an AVX2 CPU for PyTorch (every process)")
    parser.add_argument(
        "--quick",
        action="store_true",
        help="a smoke run in seconds: tiny timings, batches 1 and 8, "
        "concurrency 1 and 4, peers at 4; figures meaningless",
    )
    parser.add_argument("--no-peers", action="store_true", help="skip the LitServe and FastAPI peers")
    parser.add_argument("--out-dir", type=Path, default=ROOT / "reports")
    parser.add_argument(
        "--model-config",
        type=Path,
        default=ROOT / "handler" / "model-config.yaml",
        help="model-config.yaml to archive with (to compare worker and batching settings)",
    )
    args = parser.parse_args(argv)
    if args.quick:
        args.seconds, args.in_process_seconds, args.concurrency, args.peer_concurrency = 1.0, 0.05, "1,4", "4"
    if not args.checkpoint.is_file():
        print(
            f"error: checkpoint not found: {args.checkpoint}; train one with python -m training.train", file=sys.stderr
        )
        return 2
    if args.avx2:  # before any child starts: torch reads these when it is imported
        os.environ.update(AVX2_ENV)
    levels = [int(c) for c in args.concurrency.split(",")]
    peer_levels = [int(c) for c in args.peer_concurrency.split(",")]
    images = load_image_bytes(args.images, 256)
    config = yaml.safe_load(args.model_config.read_text()) or {}
    options = config.get("handler") or {}
    workers, threads = int(config.get("minWorkers", 1)), int(options.get("threads") or 1)

    with tempfile.TemporaryDirectory(prefix="cifar3-bench-onnx-") as tmp:
        onnx = Path(tmp) / "model.onnx"
        # Verified on --images when given, else on the data the checkpoint was trained on (training.export).
        verify_on = ["--images", str(args.images)] if args.images and args.images.is_dir() else []
        subprocess.run(
            [sys.executable, "-m", "training.export", str(args.checkpoint), str(onnx), *verify_on,
             "--int8", str(onnx_file(onnx, "onnxruntime-int8"))], check=True, cwd=ROOT,
        )  # fmt: skip
        print(f"in-process: {args.checkpoint} ...", flush=True)
        load_average = {"in-process": os.getloadavg()[0]}
        inproc = in_process(args.checkpoint, onnx, images, args.threads, args.in_process_seconds, args.quick)
        print("parity on the validation split ...", flush=True)
        load_average["parity"] = os.getloadavg()[0]
        agreement = parity(args.checkpoint, onnx, 1)
        load_average["served"] = os.getloadavg()[0]
        print(json.dumps(agreement), flush=True)
        served = serve_torchserve(args.checkpoint, args.model_config, images, levels, args.seconds)
        load_average["test-time flip"] = os.getloadavg()[0]
        print("test-time flip against one view ...", flush=True)
        flip = flip_cost(args.checkpoint, args.model_config, images, served, onnx, args.seconds,
                         args.in_process_seconds, args.quick)  # fmt: skip
        peers = {}
        if not args.no_peers:
            load_average["peers"] = os.getloadavg()[0]
            as_json = [json.dumps({"data": base64.b64encode(b).decode()}).encode() for b in images]
            python = [sys.executable, "-m"]
            peers["litserve"] = serve_peer(
                "litserve",
                [
                    *python,
                    "bench.peers.litserve_server",
                    "--checkpoint",
                    str(args.checkpoint),
                    "--engine",
                    str(served["settings"]["engine"]),
                    "--onnx",
                    str(onnx_file(onnx, str(served["settings"]["engine"]))),
                    "--workers",
                    str(workers),
                    "--threads",
                    str(threads),
                    "--batch-size",
                    str(config.get("batchSize", 8)),
                    "--batch-timeout-ms",
                    str(config.get("maxBatchDelay", 1)),
                ],
                as_json,
                {"Content-Type": "application/json"},
                peer_levels,
                args.seconds,
            )
            peers["prototype"] = serve_peer(
                "prototype",
                [*python, "bench.peers.prototype_fastapi", "--checkpoint", str(args.checkpoint)],
                images,
                {"Content-Type": "application/octet-stream"},
                peer_levels,
                args.seconds,
            )

    from cifar3.checkpoint import load_checkpoint

    report = {
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "machine": machine(),
        "avx2": args.avx2,
        "command": " ".join(["python -m bench.benchmark", *(argv if argv is not None else sys.argv[1:])]),
        "checkpoint": str(args.checkpoint),
        "variant": load_checkpoint(args.checkpoint)[1].variant,
        "in_process": inproc,
        "parity": agreement,
        "load_average_at_start": {phase: round(value, 2) for phase, value in load_average.items()},
        "served": served,
        "flip_cost": flip,
        "peers": peers,
    }
    report["checks"] = checks(report)
    name = "benchmark-avx2" if args.avx2 else "benchmark"
    args.out_dir.mkdir(parents=True, exist_ok=True)
    (args.out_dir / f"{name}.json").write_text(json.dumps(report, indent=2) + "\n")
    (args.out_dir / f"{name}.md").write_text(markdown(report))
    print(markdown(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
