"""Reliability and security of the cifar3 TorchServe under faults and load, measured.

    .venv/bin/python -m bench.reliability                          # model_store/cifar3.mar, 5-minute soak
    .venv/bin/python -m bench.reliability --soak-seconds 60        # shorter soak
    .venv/bin/python -m bench.reliability --mar /path/to/model_store
    .venv/bin/python -m bench.reliability --checkpoint checkpoints/cifar3.pt   # archive it first (archive.sh)

Every check runs against real TorchServe servers that this script starts itself on free loopback
ports (its own run folders under --work-dir; servers started elsewhere are never touched) and
stops again. It prints a table and writes it to reports/reliability.md and reports/reliability.json.

Checks (each a function returning ``{"check", "expected", "measured", "passed"}`` result rows, the
same functions tests/test_reliability.py asserts on):

* faults: SIGKILL a worker under load; scale 1 -> 4 -> 1 workers under load; a request slower
  than the response timeout; a corrupt and a truncated .mar at start-up; stop/start cycles
  (no snapshot restored, no processes left behind);
* scaling: 1 -> 3 -> 1 and 2 -> 4 -> 2 workers under load, repeated (--scaling-runs runs of
  --scaling-seconds each), raw HTTP clients and the project's retrying client side by side: failures
  by kind and the slowest answer; then the drain time under load and TorchServe's stop time (what the
  Deployment's preStop and terminationGracePeriodSeconds are sized from);
* load: saturation rate (closed loop, concurrency 16), then an open-loop soak at 80 % of it:
  errors, p50/p90/p99 against low load, worker memory growth; beside them, how steadily the idle
  machine runs plain code (bench/cpuprobe.py);
* security: listening sockets on loopback only, token checks, key file mode, model
  registration refused, allowed_urls admits no remote URL, oversized uploads refused.

All traffic goes to 127.0.0.1; every load loop is bounded in requests and in time.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from bench.reliability.common import DEFAULT_REPORT, DEFAULT_STORE, MODEL, PYTHON, ROOT, Result, result, sample_png
from bench.reliability.faults import (
    build_slow_mar,
    check_corrupt_mar,
    check_kill_worker,
    check_scale,
    check_slow_request,
    check_stop_start,
)
from bench.reliability.report import markdown, print_table
from bench.reliability.scaling import check_pod_drain, check_scaling
from bench.reliability.security import security_checks
from bench.reliability.soak import check_soak
from cifar3.hardware import describe_cpu
from cifar3_client.server import ServerError, start_server


def resolve_store(args, work: Path) -> tuple[Path, str]:
    """(model store holding cifar3.mar, description of the model)."""
    if args.checkpoint:
        store = work / "model_store"
        done = subprocess.run(
            ["bash", str(ROOT / "scripts" / "archive.sh"), str(args.checkpoint)],
            env={**os.environ, "MODEL_STORE": str(store)},
            capture_output=True,
            text=True,
            timeout=600,
            cwd=ROOT,
            check=False,
        )
        if done.returncode != 0:
            raise ServerError(f"scripts/archive.sh failed: {(done.stdout + done.stderr)[-1000:]}")
        return store, f"{args.checkpoint} (archived)"
    mar = Path(args.mar)
    if mar.is_file():
        store = work / "model_store"
        store.mkdir(parents=True, exist_ok=True)
        shutil.copy(mar, store / f"{MODEL}.mar")
        return store, str(mar)
    if not (mar / f"{MODEL}.mar").is_file():
        raise ServerError(f"{mar / (MODEL + '.mar')} not found: build it with scripts/archive.sh or pass --checkpoint")
    return mar.resolve(), str(mar / f"{MODEL}.mar")


def run_all(args) -> tuple[list[Result], dict]:
    work = Path(args.work_dir or tempfile.mkdtemp(prefix="cifar3-reliability-")).resolve()
    work.mkdir(parents=True, exist_ok=True)
    store, model = resolve_store(args, work)
    mar = store / f"{MODEL}.mar"
    payload = sample_png()
    rows: list[Result] = []
    meta = {
        "date": time.strftime("%Y-%m-%d %H:%M %Z"),
        "model": model,
        "soak_seconds": args.soak_seconds,
        "scaling": f"{args.scaling_runs} runs of {args.scaling_seconds:.0f} s per pattern",
        "machine": f"{describe_cpu()}, load average {', '.join(f'{x:.1f}' for x in os.getloadavg())} at start",
        "torchserve": subprocess.run(
            [str(Path(PYTHON).parent / "torchserve"), "--version"], capture_output=True, text=True, check=False
        )
        .stdout.strip()
        .rsplit(" ", 1)[-1]
        or "?",
        "work_dir": str(work),
        "only": args.only or [],
        "note": args.note,
    }

    def step(name: str, fn: Callable[[], list[Result]]) -> None:
        if args.only and not any(o in name for o in args.only):
            return
        print(f"== {name}", flush=True)
        started = time.monotonic()
        try:
            new = fn()
        except Exception as exc:  # a check that cannot run is a failed check, and the others still run
            new = [result(name, "runs", f"{exc.__class__.__name__}: {str(exc)[:300]}", False)]
        for r in new:
            r.setdefault("seconds", round(time.monotonic() - started, 1))
        print_table(new)
        rows.extend(new)

    server = start_server(work / "main", store)
    try:
        step("security", lambda: security_checks(server, payload))
        step("soak", lambda: check_soak(server, payload, seconds=args.soak_seconds))
        step("kill worker", lambda: check_kill_worker(server, payload))
        step("scale (synchronous)", lambda: check_scale(server, payload, synchronous=True))
        step("scale (asynchronous)", lambda: check_scale(server, payload, synchronous=False))
        for low, high in ((1, 3), (2, 4)):
            step(
                f"scaling {low}-{high}-{low}",
                lambda low=low, high=high: check_scaling(
                    server, payload, low, high, runs=args.scaling_runs, seconds=args.scaling_seconds
                ),
            )
        step("stop/start", lambda: check_stop_start(server, payload, cycles=args.cycles))
        step("pod drain", lambda: check_pod_drain(server, payload))  # stops the server
    finally:
        server.stop()

    def slow() -> list[Result]:
        slow_server = start_server(work / "slow", build_slow_mar(mar, work / "slow-store").parent)
        try:
            return check_slow_request(slow_server, payload)
        finally:
            slow_server.stop()

    step("slow request", slow)
    for kind in ("truncated", "garbage", "bad-checkpoint"):
        step(f"corrupt mar {kind}", lambda kind=kind: check_corrupt_mar(work / f"corrupt-{kind}", mar, kind))
    if not args.keep_work_dir and not args.work_dir:
        shutil.rmtree(work, ignore_errors=True)
    return rows, meta


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.reliability", description=__doc__.split("\n\n")[0])
    source = parser.add_mutually_exclusive_group()
    source.add_argument("--mar", default=str(DEFAULT_STORE), help="model store folder holding cifar3.mar (or a .mar)")
    source.add_argument("--checkpoint", type=Path, help="archive this checkpoint with scripts/archive.sh and use it")
    parser.add_argument("--soak-seconds", type=float, default=300.0, help="length of the soak (default 300)")
    parser.add_argument("--cycles", type=int, default=3, help="stop/start cycles (default 3)")
    parser.add_argument("--scaling-runs", type=int, default=10, help="runs per scaling pattern (default 10)")
    parser.add_argument("--scaling-seconds", type=float, default=20.0, help="seconds per scaling run (default 20)")
    parser.add_argument("--out", type=Path, default=DEFAULT_REPORT, help="Markdown report (JSON beside it)")
    parser.add_argument("--work-dir", type=Path, help="folder for the servers' configs, stores and logs (kept)")
    parser.add_argument("--keep-work-dir", action="store_true", help="keep the temporary work folder")
    parser.add_argument("--only", nargs="*", help="run only the checks whose step name contains one of these")
    parser.add_argument("--note", default="", help="what the report should say about the model (e.g. how trained)")
    args = parser.parse_args(argv)
    try:
        rows, meta = run_all(args)
    except ServerError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(markdown(rows, meta))
    args.out.with_suffix(".json").write_text(json.dumps({"meta": meta, "results": rows}, indent=2, default=str))
    print(
        f"\n{sum(r['passed'] for r in rows)} of {len(rows)} checks passed; wrote {args.out} and "
        f"{args.out.with_suffix('.json')}"
    )
    return 0 if all(r["passed"] for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
