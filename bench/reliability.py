"""Reliability and security of the cifar3 TorchServe under faults and load, measured.

    .venv/bin/python bench/reliability.py                          # model_store/cifar3.mar, 5-minute soak
    .venv/bin/python bench/reliability.py --soak-seconds 60        # shorter soak
    .venv/bin/python bench/reliability.py --mar /path/to/model_store
    .venv/bin/python bench/reliability.py --checkpoint checkpoints/cifar3.pt   # archive it first (archive.sh)

Every check runs against real TorchServe servers that this script starts itself on free loopback
ports (its own run folders under --work-dir; servers started elsewhere are never touched) and
stops again. It prints a table and writes it to reports/reliability.md and reports/reliability.json.

Checks (each a function returning ``{"check", "expected", "measured", "passed"}`` result rows, the
same functions tests/test_reliability.py asserts on):

* faults: SIGKILL a worker under load; scale 1 -> 4 -> 1 workers under load; a request slower
  than the response timeout; a corrupt and a truncated .mar at start-up; stop/start cycles
  (no snapshot restored, no processes left behind);
* load: saturation rate (closed loop, concurrency 16), then an open-loop soak at 80 % of it:
  errors, p50/p90/p99 against low load, worker memory growth; beside them, how steadily the idle
  machine runs plain code (bench/cpuprobe.py);
* security: listening sockets on loopback only, token checks, key file mode, model
  registration refused, allowed_urls admits no remote URL, oversized uploads refused.

All traffic goes to 127.0.0.1; every load loop is bounded in requests and in time.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import ipaddress
import json
import os
import platform
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import zipfile
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import psutil
import requests
from PIL import Image

from bench import cpuprobe
from bench.loadgen import percentile, run_load
from scripts.serve import Server, ServerError, read_properties, start_server, write_server_config

ROOT = Path(__file__).resolve().parent.parent

PYTHON = sys.executable
DEFAULT_STORE = ROOT / "model_store"
DEFAULT_REPORT = ROOT / "reports" / "reliability.md"
MODEL = "cifar3"
OCTET = {"Content-Type": "application/octet-stream"}
# The marker a request carries to make the test-only slow handler sleep (see build_slow_mar).
DEBUG_SLEEP_HEADER = "X-Cifar3-Debug-Sleep"
REQUEST_TIMEOUT = 60.0  # seconds a client waits for one answer

Result = dict  # {"check", "expected", "measured", "passed", ...details}


def result(check: str, expected: str, measured: str, passed: bool, **details) -> Result:
    return {"check": check, "expected": expected, "measured": measured, "passed": bool(passed), **details}


# ---------------------------------------------------------------------------------------------
# servers of our own


def sample_png(seed: int = 7, size: int = 32) -> bytes:
    """A CIFAR-sized PNG: a ship-coloured noise image (the payload of every load check)."""
    rng = np.random.default_rng(seed)
    pixels = np.clip(np.array((40, 200, 60), np.float32) + rng.normal(0, 40, (size, size, 3)), 0, 255)
    buffer = io.BytesIO()
    Image.fromarray(pixels.astype(np.uint8)).save(buffer, format="PNG")
    return buffer.getvalue()


def management(server: Server, method: str, path: str, timeout: float = 120.0, **kwargs) -> requests.Response:
    return requests.request(
        method, f"{server.management_url}{path}", headers=server.headers("management"), timeout=timeout, **kwargs
    )


def describe_model(server: Server) -> dict:
    response = management(server, "GET", f"/models/{server.model}", timeout=10)
    response.raise_for_status()
    return response.json()[0]


def workers(server: Server) -> list[dict]:
    return describe_model(server).get("workers", [])


def ping(server: Server) -> int:
    """HTTP status of /ping (TorchServe 0.12 wants the inference token there too); 0: no answer."""
    try:
        return requests.get(f"{server.inference_url}/ping", headers=server.headers("inference"), timeout=5).status_code
    except requests.RequestException:
        return 0


def wait_for(predicate: Callable[[], bool], timeout: float, interval: float = 0.2) -> float | None:
    """Seconds until predicate() was true, or None after timeout."""
    started = time.monotonic()
    while time.monotonic() - started < timeout:
        try:
            if predicate():
                return time.monotonic() - started
        except (requests.RequestException, ServerError, ValueError, KeyError, IndexError):
            pass
        time.sleep(interval)
    return None


def process_tree(pid: int | None) -> list[psutil.Process]:
    if not pid:
        return []
    try:
        root = psutil.Process(pid)
        return [root, *root.children(recursive=True)]
    except psutil.Error:
        return []


def alive(pids: Iterable[int]) -> list[int]:
    """The pids still running (zombies, already dead but not yet reaped, do not count)."""
    out = []
    for pid in pids:
        try:
            if psutil.Process(pid).status() != psutil.STATUS_ZOMBIE:
                out.append(pid)
        except psutil.Error:
            pass
    return out


def worker_rss(server: Server) -> int:
    """Bytes of resident memory of the model's worker processes (and anything they started)."""
    total = 0
    for worker in workers(server):
        for proc in process_tree(worker.get("pid")):
            with contextlib.suppress(psutil.Error):
                total += proc.memory_info().rss
    return total


# ---------------------------------------------------------------------------------------------
# load


@dataclass
class Call:
    start: float  # time.monotonic() the request was sent
    end: float
    status: int  # HTTP status; 0 when no HTTP answer came (connection reset, timeout)
    error: str = ""
    attempts: int = 1  # > 1: the client retried (see Load's retries)
    first_error: str = ""  # what the first attempt got, when it was retried

    @property
    def ok(self) -> bool:
        return self.status == 200

    @property
    def latency(self) -> float:
        return self.end - self.start


class Load:
    """``concurrency`` client threads sending the payload to /predictions back to back until stopped
    (at most ``max_seconds``), each call recorded: the background traffic of the fault checks, which
    need per-call timing, errors and retries. The soak's load is bench/loadgen.py's."""

    def __init__(
        self,
        server: Server,
        payload: bytes,
        *,
        concurrency: int = 4,
        max_seconds: float = 60.0,
        timeout: float = REQUEST_TIMEOUT,
        retries: int = 0,
    ):
        self.server, self.payload, self.concurrency = server, payload, concurrency
        self.max_seconds, self.timeout, self.retries = max_seconds, timeout, retries
        self.url = f"{server.inference_url}/predictions/{server.model}"
        self.headers = {**server.headers("inference"), **OCTET}
        self.calls: list[Call] = []
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._local = threading.local()
        self._threads: list[threading.Thread] = []
        self.started = 0.0

    def _session(self) -> requests.Session:
        if not hasattr(self._local, "session"):
            self._local.session = requests.Session()
        return self._local.session

    def _attempt(self) -> tuple[int, str]:
        try:
            response = self._session().post(self.url, data=self.payload, headers=self.headers, timeout=self.timeout)
            return response.status_code, "" if response.ok else response.text[:200]
        except requests.RequestException as exc:
            self._local.__dict__.pop("session", None)  # a fresh connection next time
            return 0, f"{exc.__class__.__name__}: {str(exc)[:150]}"

    def _send(self) -> None:
        """One request; with ``retries``, sent again after a 5xx or no answer (a prediction is idempotent)."""
        sent = time.monotonic()
        status, error = self._attempt()
        attempts, first_error = 1, ""
        while attempts <= self.retries and (status == 0 or status >= 500):  # also after stop(): bounded
            first_error = first_error or f"HTTP {status}: {error}"
            time.sleep(0.1 * attempts)
            status, error = self._attempt()
            attempts += 1
        with self._lock:
            self.calls.append(Call(sent, time.monotonic(), status, error, attempts, first_error))

    def _client(self) -> None:
        while not self._stop.is_set() and time.monotonic() < self.deadline:
            self._send()

    def start(self) -> Load:
        self.started = time.monotonic()
        self.deadline = self.started + self.max_seconds
        self._threads = [threading.Thread(target=self._client, daemon=True) for _ in range(self.concurrency)]
        for thread in self._threads:
            thread.start()
        return self

    def stop(self) -> list[Call]:
        self._stop.set()
        for thread in self._threads:
            thread.join((self.retries + 1) * (self.timeout + 1) + 5)
        return self.calls

    def __enter__(self) -> Load:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


def summarize(calls: list[Call]) -> dict:
    ok = [c for c in calls if c.ok]
    latencies = [c.latency * 1000 for c in ok]
    seconds = (max(c.end for c in calls) - min(c.start for c in calls)) if calls else 0.0
    statuses: dict[str, int] = {}
    for c in calls:
        if not c.ok:
            statuses[str(c.status)] = statuses.get(str(c.status), 0) + 1
    return {
        "requests": len(calls),
        "ok": len(ok),
        "errors": len(calls) - len(ok),
        "error_statuses": statuses,
        "seconds": round(seconds, 2),
        "rps": round(len(ok) / seconds, 2) if seconds else 0.0,
        "p50_ms": round(percentile(latencies, 50), 1),
        "p90_ms": round(percentile(latencies, 90), 1),
        "p99_ms": round(percentile(latencies, 99), 1),
        "first_errors": sorted({c.error for c in calls if not c.ok})[:3],
    }


def fmt_errors(summary: dict) -> str:
    if not summary["errors"]:
        return "0 errors"
    codes = ", ".join(f"{n}x HTTP {s}" if s != "0" else f"{n}x no answer" for s, n in summary["error_statuses"].items())
    return f"{summary['errors']} errors ({codes})"


# ---------------------------------------------------------------------------------------------
# faults


# Seconds after a SIGKILL within which TorchServe may still route a request to the dead worker.
DEATH_NOTICED_S = 1.0


def check_kill_worker(
    server: Server,
    payload: bytes,
    *,
    concurrency: int = 4,
    recover_within: float = 10.0,
    before: float = 3.0,
    after: float = 4.0,
) -> list[Result]:
    """SIGKILL one worker while clients send load: only requests in flight on it fail, a new worker
    is READY within ``recover_within`` seconds, /ping stays healthy, every later request succeeds."""
    before_kill = workers(server)
    victim = next(w for w in before_kill if w.get("status") == "READY")
    victim_pid = int(victim["pid"])
    old_pids = {int(w.get("pid") or 0) for w in before_kill}
    pings: list[int] = []
    with Load(server, payload, concurrency=concurrency, max_seconds=before + recover_within + after + 60) as load:
        time.sleep(before)
        killed_at = time.monotonic()
        os.kill(victim_pid, signal.SIGKILL)

        def replaced() -> bool:  # a READY worker that was not there before the kill (not a surviving one)
            pings.append(ping(server))
            return any(
                w.get("status") == "READY" and int(w.get("pid") or 0) not in (0, *old_pids) for w in workers(server)
            )

        recovery = wait_for(replaced, recover_within + 20, interval=0.25)
        recovered_at = time.monotonic()
        time.sleep(after)
        for _ in range(3):
            pings.append(ping(server))
    calls = load.calls
    failed = [c for c in calls if not c.ok]
    in_flight = [c for c in calls if c.start <= killed_at < c.end]
    failed_in_flight = [c for c in failed if c.start <= killed_at < c.end]
    # TorchServe learns of the death when the worker's socket closes, a moment after the kill; a request it
    # routed to that worker in the meantime fails as those in flight do (HTTP 507). Seen once in CI.
    routed_to_dead = [c for c in failed if killed_at < c.start <= killed_at + DEATH_NOTICED_S and c.status == 507]
    after_recovery = [c for c in calls if c.start >= recovered_at]
    failed_later = [c for c in after_recovery if not c.ok]
    summary = summarize(calls)
    rows = [
        result(
            "kill worker: failed requests",
            f"only requests on the killed worker fail (in flight, or routed to it within {DEATH_NOTICED_S:g} s "
            "of the kill, before TorchServe noticed: HTTP 507)",
            f"{len(failed)} of {len(calls)} failed; {len(in_flight)} were in flight at the kill"
            + (f", {len(routed_to_dead)} sent just after it went to the dead worker" if routed_to_dead else "")
            + f" ({fmt_errors(summary)})",
            len(failed) == len(failed_in_flight) + len(routed_to_dead),
            load=summary,
            in_flight=len(in_flight),
        ),
        result(
            "kill worker: recovery",
            f"new worker READY within {recover_within:.0f} s",
            f"READY after {recovery:.1f} s" if recovery is not None else "no new READY worker",
            recovery is not None and recovery <= recover_within,
            recovery_s=recovery,
        ),
        result(
            "kill worker: /ping during recovery",
            "always 200 (Healthy)",
            f"{sum(p == 200 for p in pings)} of {len(pings)} pings 200"
            + (f" (others: {sorted(set(p for p in pings if p != 200))})" if any(p != 200 for p in pings) else ""),
            bool(pings) and all(p == 200 for p in pings),
        ),
        result(
            "kill worker: requests after recovery",
            "all succeed",
            f"{len(after_recovery) - len(failed_later)} of {len(after_recovery)} ok",
            bool(after_recovery) and not failed_later,
        ),
    ]
    return rows


def scale(
    server: Server, min_workers: int, max_workers: int | None = None, synchronous: bool = True, timeout: float = 300.0
) -> tuple[int, float]:
    """PUT min_worker/max_worker; (HTTP status, seconds the call took).

    TorchServe starts workers up to min_worker but stops them only down to max_worker: scaling
    down takes max_worker too (default: max(min_workers, the model-config's maxWorkers of 4)).
    synchronous=true answers when the workers are READY, but holds one of the server's netty
    threads meanwhile (TorchServe 0.12 waits on a future inside the request handler)."""
    started = time.monotonic()
    response = management(
        server,
        "PUT",
        f"/models/{server.model}",
        params={
            "min_worker": min_workers,
            "max_worker": max_workers or max(min_workers, 4),
            "synchronous": str(synchronous).lower(),
        },
        timeout=timeout,
    )
    return response.status_code, time.monotonic() - started


# A synchronous scale-up answers once the new workers are READY: 9-16 s for 2 more workers under load
# on 2 cores in our runs. Longer means workers start too slowly, not just TorchServe's blocking PUT.
SYNC_SCALE_UP_LIMIT_S = 20.0


def check_scale(
    server: Server,
    payload: bytes,
    *,
    up: int = 4,
    synchronous: bool = True,
    clients: int = 6,
    retry_clients: int = 6,
    retry_timeout: float = 15.0,
    settle: float = 3.0,
) -> list[Result]:
    """Scale 1 -> ``up`` -> 1 workers through the management API while clients send load.

    Two groups of clients run at once: plain ones (one attempt, 60 s timeout) and ones that retry a
    5xx or a missing answer (``retry_timeout``) up to 3 times: the mitigation on the client side."""

    def ready_count() -> int:
        return sum(w.get("status") == "READY" for w in workers(server))

    mode = f"synchronous={str(synchronous).lower()}"
    start_workers = len(workers(server))
    batch_size = int(describe_model(server).get("batchSize") or 1)
    plain = Load(server, payload, concurrency=clients, max_seconds=900)
    retrying = Load(server, payload, concurrency=retry_clients, max_seconds=900, timeout=retry_timeout, retries=3)
    with plain, retrying:
        time.sleep(settle)
        t_up = time.monotonic()
        up_status, up_seconds = scale(server, up, synchronous=synchronous)
        up_ready = wait_for(lambda: ready_count() >= up, 180)
        t_up_done = time.monotonic()
        time.sleep(settle)
        count_up = len(workers(server))
        down_status, down_seconds = scale(server, 1, 1, synchronous=synchronous)
        down_done = wait_for(lambda: len(workers(server)) == 1, 120)
        t_down_done = time.monotonic()
        time.sleep(settle)
        count_down = len(workers(server))
    scale(server, start_workers)  # back to where it started (max_worker: the model-config's 4)

    def window(calls: list[Call], begin: float, end: float) -> list[Call]:
        return [c for c in calls if c.end >= begin and c.start <= end]

    up_calls = window(plain.calls + retrying.calls, t_up, t_up_done)
    up_failed = [c for c in up_calls if not c.ok]
    up_retried = sum(c.attempts > 1 for c in up_calls)
    longest = max((c.latency for c in up_calls), default=0.0)
    # Scale-down: requests sent after the scale-up finished (so a stall of the scale-up cannot be
    # counted here) until the workers were gone: those in flight or queued when workers stopped.
    plain_down = [c for c in plain.calls if t_up_done <= c.start <= t_down_done]
    retry_down = [c for c in retrying.calls if t_up_done <= c.start <= t_down_done]
    later = [c for c in plain.calls + retrying.calls if c.start > t_down_done]
    retried = sum(c.attempts > 1 for c in retry_down)
    plain_failed = [c for c in plain_down if not c.ok]
    # TorchServe 0.12 ends a job that a stopping worker has just taken with HTTP 500 "Worker died."
    # (it has no draining). The issue asks for such losses to be counted and mitigated on our side:
    # they pass when they are the only failures, no more than the stopping workers' batches can hold,
    # and the retrying clients (the next row) lose nothing.
    dropped = [c for c in plain_failed if c.status == 500 and "Worker died" in c.error]
    drop_bound = (up - 1) * batch_size
    return [
        result(
            f"scale {start_workers} -> {up} workers under load ({mode})",
            f"0 failed requests; {up} workers READY",
            f"HTTP {up_status} after {up_seconds:.1f} s; {count_up} workers"
            + (f", all READY after {up_ready + up_seconds:.1f} s" if up_ready is not None else ", not all READY")
            + f"; {len(up_failed)} of {len(up_calls)} requests failed"
            + (f" ({up_retried} succeeded on a retry after no answer in {retry_timeout:.0f} s)" if up_retried else ""),
            up_status in (200, 202) and up_ready is not None and not up_failed,
            load=summarize(up_calls),
        ),
        # TorchServe 0.12 answers a synchronous PUT on the netty thread that took it, only once the new
        # workers are up: requests on the connections that thread serves wait as long. The bound for
        # synchronous=true is therefore the PUT itself (README: scale with synchronous=false under load).
        result(
            f"scale up ({mode}): longest client wait",
            f"no longer than the synchronous PUT (+1 s: TorchServe holds its netty thread), which ends within "
            f"{SYNC_SCALE_UP_LIMIT_S:.0f} s"
            if synchronous
            else "< 10 s (no client stalls while workers start)",
            f"{longest:.1f} s" + (f"; the PUT took {up_seconds:.1f} s" if synchronous else ""),
            longest <= up_seconds + 1 and up_seconds <= SYNC_SCALE_UP_LIMIT_S if synchronous else longest < 10,
        ),
        result(
            f"scale {up} -> 1 workers under load ({mode}), plain clients",
            '0 failed requests (target); else only TorchServe\'s HTTP 500 "Worker died." for jobs the '
            f"stopping workers had taken (at most {up - 1} x batch {batch_size}), counted, and mitigated by retries",
            f"HTTP {down_status} after {down_seconds:.1f} s; {count_down} worker left; "
            f"{fmt_errors(summarize(plain_down)) if plain_down else '0 errors'} in {len(plain_down)} requests"
            + (f' ({len(dropped)} dropped by TorchServe: "Worker died.")' if dropped else "")
            + f"; later: {sum(not c.ok for c in later)} of {len(later)} failed",
            down_status in (200, 202)
            and down_done is not None
            and count_down == 1
            and len(dropped) == len(plain_failed) <= drop_bound
            and all(c.ok for c in later),
            load=summarize(plain_down),
            failures=[f"HTTP {c.status}: {c.error}" for c in plain_down if not c.ok],
            failure_statuses=[c.status for c in plain_down if not c.ok],
        ),
        result(
            f"scale {up} -> 1 workers ({mode}), clients retrying",
            f"0 failed requests (retry 5xx/no answer, {retry_timeout:.0f} s timeout)",
            f"{sum(not c.ok for c in retry_down)} of {len(retry_down)} failed; {retried} needed a retry"
            + (f" (first: {sorted({c.first_error[:60] for c in retry_down if c.first_error})})" if retried else ""),
            all(c.ok for c in retry_down),
            load=summarize(retry_down),
        ),
    ]


SLOW_HANDLER = '''"""Test-only handler: cifar3's handler, plus a sleep for requests that carry {header}.

Packed only into the .mar that bench/reliability.py builds to test the response timeout; the sleep
length comes from model-config.yaml (handler: debug_sleep_s), absent in production.
"""

import time

from cifar3_handler import Cifar3Handler


class SlowCifar3Handler(Cifar3Handler):
    def handle(self, data, context):
        options = (getattr(self, "model_yaml_config", None) or {{}}).get("handler", {{}}) or {{}}
        delay = float(options.get("debug_sleep_s", 0) or 0)
        if delay and any(context.get_request_header(i, "{header}") for i in range(len(data))):
            time.sleep(delay)
        return super().handle(data, context)
'''


def build_slow_mar(source_mar: Path, store: Path, response_timeout: int = 2, sleep_s: float = 6.0) -> Path:
    """A copy of the real cifar3.mar for the timeout check: responseTimeout ``response_timeout`` s and
    a handler that sleeps ``sleep_s`` for requests with the debug header (never in production).

    If handler/cifar3_handler.py itself supports a gated ``debug_sleep_s`` option, the real handler
    is kept and only model-config.yaml changes."""
    store.mkdir(parents=True, exist_ok=True)
    target = store / f"{MODEL}.mar"
    with zipfile.ZipFile(source_mar) as src:
        manifest = json.loads(src.read("MAR-INF/MANIFEST.json"))
        config_name = manifest["model"].get("configFile", "model-config.yaml")
        config = src.read(config_name).decode() if config_name in src.namelist() else ""
        handler_name = manifest["model"]["handler"]
        real_supports = b"debug_sleep_s" in src.read(handler_name)
        config = "\n".join(
            line for line in config.splitlines() if not line.startswith(("responseTimeout:", "minWorkers:"))
        )
        if "handler:" not in config:
            config += "\nhandler:\n"
        config = config.replace("handler:\n", f"handler:\n  debug_sleep_s: {sleep_s}\n", 1)
        config += f"\nresponseTimeout: {response_timeout}\nminWorkers: 1\n"
        if not real_supports:
            manifest["model"]["handler"] = "slow_handler.py"
        with zipfile.ZipFile(target, "w", zipfile.ZIP_STORED) as dst:
            for item in src.infolist():
                if item.filename == "MAR-INF/MANIFEST.json":
                    dst.writestr(item.filename, json.dumps(manifest, indent=2))
                elif item.filename == config_name:
                    dst.writestr(item.filename, config)
                else:
                    dst.writestr(item.filename, src.read(item.filename))
            if not real_supports:
                dst.writestr("slow_handler.py", SLOW_HANDLER.format(header=DEBUG_SLEEP_HEADER))
            if config_name not in src.namelist():
                dst.writestr(config_name, config)
    return target


def check_slow_request(server: Server, payload: bytes, recover_within: float = 60.0) -> list[Result]:
    """``server`` serves build_slow_mar()'s archive: a request slower than the response timeout gets
    an error, the worker is replaced, the next request succeeds."""
    described = describe_model(server)
    timeout_s = described.get("responseTimeout")
    old_pid = int(next(w for w in described["workers"] if w.get("status") == "READY")["pid"])
    headers = {**server.headers("inference"), **OCTET}
    url = f"{server.inference_url}/predictions/{server.model}"
    normal = requests.post(url, data=payload, headers=headers, timeout=REQUEST_TIMEOUT)
    started = time.monotonic()
    try:
        slow = requests.post(url, data=payload, headers={**headers, DEBUG_SLEEP_HEADER: "1"}, timeout=REQUEST_TIMEOUT)
        slow_status, slow_body = slow.status_code, slow.text[:200]
    except requests.RequestException as exc:
        slow_status, slow_body = 0, exc.__class__.__name__
    slow_seconds = time.monotonic() - started

    def replaced() -> bool:
        return any(w.get("status") == "READY" and int(w.get("pid") or 0) not in (0, old_pid) for w in workers(server))

    recovery = wait_for(replaced, recover_within, interval=0.25)
    after = [requests.post(url, data=payload, headers=headers, timeout=REQUEST_TIMEOUT) for _ in range(3)]
    return [
        result(
            "slow request (> responseTimeout)",
            "client gets an error; worker replaced; next request ok",
            f"responseTimeout {timeout_s} s; before: HTTP {normal.status_code}; slow request: HTTP {slow_status} "
            f"after {slow_seconds:.1f} s; new worker READY "
            + (f"after {recovery:.1f} s" if recovery is not None else "never")
            + f"; next requests: {', '.join(str(r.status_code) for r in after)}",
            normal.ok and slow_status not in (200, 0) and recovery is not None and all(r.ok for r in after),
            slow_status=slow_status,
            slow_body=slow_body,
        ),
    ]


def corrupt_store(source_mar: Path, store: Path, kind: str) -> Path:
    """A model store whose cifar3.mar is ``truncated`` (the first 1 MB of the real one) or ``garbage``
    (random bytes) or ``bad-checkpoint`` (a valid archive whose serialized model is random bytes)."""
    store.mkdir(parents=True, exist_ok=True)
    target = store / f"{MODEL}.mar"
    if kind == "truncated":
        with open(source_mar, "rb") as src:
            target.write_bytes(src.read(1_000_000))
    elif kind == "garbage":
        target.write_bytes(np.random.default_rng(0).bytes(100_000))
    elif kind == "bad-checkpoint":
        with zipfile.ZipFile(source_mar) as src, zipfile.ZipFile(target, "w", zipfile.ZIP_STORED) as dst:
            serialized = json.loads(src.read("MAR-INF/MANIFEST.json"))["model"]["serializedFile"]
            for item in src.infolist():
                data = np.random.default_rng(0).bytes(10_000) if item.filename == serialized else src.read(item)
                dst.writestr(item.filename, data)
    else:
        raise ValueError(f"unknown corruption {kind!r}")
    return target


def check_corrupt_mar(
    folder: Path,
    source_mar: Path,
    kind: str,
    *,
    fail_within: float = 60.0,
) -> list[Result]:
    """Start a server on a corrupt .mar: Server.start raises a clear ServerError quickly (not after
    its full timeout), ``serve.py status`` exits non-zero and says why, /ping alone stays healthy."""
    store = folder / "store"
    corrupt_store(source_mar, store, kind)
    server = Server(write_server_config(folder, store), folder / "run")
    timeout = 240.0
    started = time.monotonic()
    error = ""
    try:
        server.start(timeout=timeout)
    except ServerError as exc:
        error = str(exc)
    seconds = time.monotonic() - started
    try:
        status = subprocess.run(
            [
                PYTHON,
                str(ROOT / "scripts" / "serve.py"),
                "--config",
                str(server.config),
                "--run-dir",
                str(server.run_dir),
                "status",
            ],
            capture_output=True,
            text=True,
            timeout=60,
            cwd=ROOT,
            check=False,
        )
        ping_status = ping(server)
    finally:
        stopped = stop_and_check(server)
    status_text = (status.stdout + status.stderr).strip()
    says_why = any(word in status_text.lower() for word in ("failed", "not loaded", "died", "error"))
    return [
        result(
            f"corrupt .mar ({kind}): start",
            f"ServerError within {fail_within:.0f} s (start timeout {timeout:.0f} s)",
            f"ServerError after {seconds:.1f} s: {error[:160]}" if error else f"no error after {seconds:.1f} s",
            bool(error) and seconds <= fail_within,
            error=error,
        ),
        result(
            f"corrupt .mar ({kind}): serve.py status",
            "exit code != 0 and the reason",
            f"exit {status.returncode}: {status_text[:200]}; /ping alone: HTTP {ping_status}",
            status.returncode != 0 and says_why,
            ping=ping_status,
        ),
        *([stopped] if not stopped["passed"] else []),
    ]


def stop_and_check(server: Server, grace: float = 15.0) -> Result:
    """Stop the server (Server.stop); then neither Java nor any worker process it had may be left
    running, and Java must have stopped its workers itself (Server.stop kills leftovers, and says so)."""
    pids = sorted({p.pid for p in process_tree(server.pid())} | {p.pid for p in find_processes(server.run_dir)})
    server.stop()
    wait_for(lambda: not alive(pids), grace)
    left = sorted(set(alive(pids)) | {p.pid for p in find_processes(server.run_dir)})
    killed = list(getattr(server, "killed_on_stop", []))
    return result(
        "stop: processes left",
        "none (Java stops its workers)",
        f"{len(left)} of {len(pids)} still running" + (f"; serve.py had to kill workers {killed}" if killed else ""),
        not left and not killed,
        left=left + killed,
    )


def find_processes(run_dir: Path) -> list[psutil.Process]:
    """Java or worker processes that belong to the server in run_dir (by config path or socket path)."""
    run_dir = Path(run_dir).resolve()
    marks = (str(run_dir / "tmp" / ".ts.sock"), str(run_dir.parent / "config.properties"))
    found = []
    for proc in psutil.process_iter(["pid", "cmdline", "status"]):
        try:
            cmdline = " ".join(proc.info["cmdline"] or [])
            if proc.info["status"] != psutil.STATUS_ZOMBIE and any(m in cmdline for m in marks):
                found.append(proc)
        except psutil.Error:
            pass
    return found


def check_stop_start(server: Server, payload: bytes, cycles: int = 3, timeout: float = 240.0) -> list[Result]:
    """Stop/start the (running) server ``cycles`` times: each start serves the model with its configured
    workers (a scale to one more before the first stop must not come back: no snapshot restored),
    no config/snapshot folder appears, no Java or worker process survives a stop."""
    problems: list[str] = []
    leftovers: list[int] = []
    start_seconds: list[float] = []
    worker_counts: list[int] = []
    configured = describe_model(server)["minWorkers"]
    status, _ = scale(server, configured + 1)
    if status != 200:
        problems.append(f"scale to {configured + 1} answered HTTP {status}")
    for cycle in range(cycles):
        stopped = stop_and_check(server)
        leftovers += stopped["left"]
        started = time.monotonic()
        server.start(timeout=timeout)
        start_seconds.append(time.monotonic() - started)
        worker_counts.append(len(workers(server)))
        cmdline = " ".join(psutil.Process(server.pid()).cmdline())
        if "-ncs" not in cmdline.split():
            problems.append(f"cycle {cycle + 1}: Java started without -ncs")
        response = requests.post(
            f"{server.inference_url}/predictions/{server.model}",
            data=payload,
            headers={**server.headers(), **OCTET},
            timeout=REQUEST_TIMEOUT,
        )
        if not response.ok:
            problems.append(f"cycle {cycle + 1}: prediction HTTP {response.status_code}")
    snapshot_dirs = [str(p) for p in (server.log_dir / "config", server.run_dir / "config") if p.exists()]
    return [
        result(
            f"stop/start x{cycles}: state",
            f"no snapshot restored ({configured} workers after a scale to {configured + 1}; no config/ dir)",
            f"workers after each start: {worker_counts}; snapshot dirs: {snapshot_dirs or 'none'}; "
            f"start took {', '.join(f'{s:.0f}' for s in start_seconds)} s"
            + (f"; {'; '.join(problems)}" if problems else ""),
            all(n == configured for n in worker_counts) and not snapshot_dirs and not problems,
            start_seconds=start_seconds,
        ),
        result(
            f"stop/start x{cycles}: processes",
            "no Java or worker process left after any stop",
            f"{len(leftovers)} left: {leftovers}" if leftovers else "none left",
            not leftovers,
        ),
    ]


# ---------------------------------------------------------------------------------------------
# load


def soak_load(server: Server, payload: bytes, seconds: float, *, rate: float | None = None, **kwargs) -> dict:
    """bench/loadgen.py's one-thread load (closed loop, or open loop at ``rate``), summarized."""
    url = f"{server.inference_url}/predictions/{server.model}"
    headers = {**server.headers("inference"), **OCTET}
    return run_load(url, [payload], headers, seconds=seconds, rate=rate, **kwargs).summary()


def measure_saturation(server: Server, payload: bytes, seconds: float = 15.0, concurrency: int = 16) -> dict:
    """Closed loop at ``concurrency``: the request rate the server sustains (after a short warm-up)."""
    soak_load(server, payload, min(3.0, seconds / 3), concurrency=concurrency)
    return soak_load(server, payload, seconds, concurrency=concurrency)


def check_soak(
    server: Server,
    payload: bytes,
    *,
    seconds: float = 300.0,
    saturation_seconds: float = 15.0,
    low_seconds: float = 60.0,
    fraction: float = 0.8,
    low_fraction: float = 0.1,
    sweep: tuple[float, ...] = (0.4, 0.6),
    sweep_seconds: float = 20.0,
    memory_limit_mb: float = 50.0,
    probe_seconds: float = 10.0,
) -> list[Result]:
    """Saturation first (closed loop, 16 clients), then low load (open loop at ``low_fraction`` of it)
    for the reference p99, then the soak: open loop at ``fraction`` of saturation for ``seconds``.
    Pass: 0 errors, soak p99 <= 2x low-load p99, worker RSS growth < ``memory_limit_mb``. The p99 at
    the ``sweep`` fractions of saturation is reported beside it: where between low load and the soak
    the latency grows. Before any load, bench/cpuprobe.py measures how steadily the idle machine
    runs plain code: on a VM whose host shares the cores, every request in a slow episode is slowed
    whatever the server does, and at 80 % load the backlog of one episode takes ~4x its length to
    drain. The latency row reports it beside the p99s; it does not change the criterion.

    The load comes from bench/loadgen.py's single thread (not the threaded ``requests`` clients of
    the fault checks): at hundreds of requests per second those cost the server a good part of a core
    and added their own GIL waits to the latencies being compared."""
    try:  # a diagnostic: if it cannot run, the soak still does
        steadiness = cpuprobe.probe(probe_seconds)
        machine = cpuprobe.describe(steadiness)
    except (OSError, RuntimeError, ValueError, subprocess.SubprocessError) as exc:
        steadiness, machine = None, f"probe failed ({exc.__class__.__name__}: {exc})"
    saturation = measure_saturation(server, payload, saturation_seconds)
    low_rate = round(max(1.0, low_fraction * saturation["rps"]), 1)
    low = soak_load(server, payload, low_seconds, rate=low_rate, concurrency=8)
    swept = {f: soak_load(server, payload, sweep_seconds, rate=round(max(1.0, f * saturation["rps"]), 1),
                          concurrency=64) for f in sweep}  # fmt: skip
    rate = round(max(1.0, fraction * saturation["rps"]), 1)
    rss_start = worker_rss(server)
    soak = soak_load(server, payload, seconds, rate=rate, concurrency=64)
    rss_end = worker_rss(server)
    growth_mb = (rss_end - rss_start) / 2**20
    return [
        result(
            "load: saturation (closed loop, 16 clients)",
            "measured: sets the soak rate",
            f"{saturation['rps']:.1f} req/s; p50 {saturation['p50_ms']:.0f} ms, p99 {saturation['p99_ms']:.0f} ms; "
            f"{fmt_errors(saturation)}",
            saturation["errors"] == 0 and saturation["ok"] > 0,
            load=saturation,
        ),
        result(
            f"load: soak {seconds:.0f} s, open loop at {fraction:.0%} of saturation",
            "0 errors",
            f"{rate:.1f} req/s offered, {soak['rps']:.1f} answered; {soak['requests']} requests, {fmt_errors(soak)}",
            soak["errors"] == 0 and soak["requests"] > 0,
            load=soak,
            rate=rate,
        ),
        result(
            "load: soak latency",
            f"p99 <= 2x low-load p99 ({low['p99_ms']:.0f} ms at {low_rate:g} req/s)",
            f"p50 {soak['p50_ms']:.0f} / p90 {soak['p90_ms']:.0f} / p99 {soak['p99_ms']:.0f} ms "
            f"(low load: p50 {low['p50_ms']:.0f} / p90 {low['p90_ms']:.0f} / p99 {low['p99_ms']:.0f} ms"
            + "".join(f"; p99 at {f:.0%}: {s['p99_ms']:.0f} ms" for f, s in swept.items())
            + f"); machine: {machine}",
            soak["p99_ms"] <= 2 * low["p99_ms"] and low["errors"] == 0,
            low=low,
            sweep={f"{f:.0%}": s for f, s in swept.items()},
            machine=steadiness,
        ),
        result(
            "load: worker memory growth",
            f"< {memory_limit_mb:.0f} MB RSS over the soak",
            f"{rss_start / 2**20:.0f} -> {rss_end / 2**20:.0f} MB ({growth_mb:+.1f} MB)",
            growth_mb < memory_limit_mb,
            rss_start=rss_start,
            rss_end=rss_end,
        ),
    ]


# ---------------------------------------------------------------------------------------------
# security


def is_loopback(address: str) -> bool:
    try:
        ip = ipaddress.ip_address(address)
    except ValueError:
        return False
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped:
        ip = ip.ipv4_mapped
    return ip.is_loopback


def check_loopback(server: Server) -> list[Result]:
    """Every TCP socket that Java or a worker listens on is bound to a loopback address."""
    listening = []
    for proc in process_tree(server.pid()):
        with contextlib.suppress(psutil.Error):
            listening += [c for c in proc.net_connections(kind="inet") if c.status == psutil.CONN_LISTEN]
    addresses = sorted({f"{c.laddr.ip}:{c.laddr.port}" for c in listening})
    exposed = [a for a in addresses if not is_loopback(a.rsplit(":", 1)[0])]
    ports = {c.laddr.port for c in listening}
    expected_ports = {
        int(url.rsplit(":", 1)[1]) for url in (server.inference_url, server.management_url, server.metrics_url)
    }
    return [
        result(
            "listening sockets on loopback only",
            "inference, management, metrics (and gRPC) on 127.0.0.1",
            f"{len(addresses)} listening: {', '.join(a.replace('::ffff:', '') for a in addresses)}",
            bool(addresses) and not exposed and expected_ports <= ports,
            exposed=exposed,
        ),
    ]


def check_tokens(server: Server, payload: bytes) -> list[Result]:
    """Inference and management calls without a token, with a wrong one, or with the other API's key
    are refused (TorchServe 0.12: HTTP 400 InvalidKeyException); the right key works."""
    infer = f"{server.inference_url}/predictions/{server.model}"
    manage = f"{server.management_url}/models/{server.model}"
    ping_url = f"{server.inference_url}/ping"
    good_i, good_m = server.headers("inference"), server.headers("management")
    wrong = {"Authorization": "Bearer wrong-token"}
    cases = [
        ("predict, no token", "POST", infer, {}),
        ("predict, wrong token", "POST", infer, wrong),
        ("predict, management key", "POST", infer, good_m),
        ("ping, no token", "GET", ping_url, {}),
        ("describe, no token", "GET", manage, {}),
        ("describe, wrong token", "GET", manage, wrong),
        ("describe, inference key", "GET", manage, good_i),
        ("scale, no token", "PUT", manage + "?min_worker=1", {}),
        ("scale, wrong token", "PUT", manage + "?min_worker=1", wrong),
    ]
    refused, accepted = [], []
    for name, method, url, headers in cases:
        response = requests.request(
            method, url, data=payload if method == "POST" else None, headers={**headers, **OCTET}, timeout=30
        )
        (refused if response.status_code == 400 and "InvalidKeyException" in response.text else accepted).append(
            f"{name}: HTTP {response.status_code}"
        )
    good = [
        requests.post(infer, data=payload, headers={**good_i, **OCTET}, timeout=30).status_code,
        requests.get(manage, headers=good_m, timeout=30).status_code,
    ]
    return [
        result(
            "token: missing/wrong/other API's key",
            "refused (400 InvalidKeyException); right keys: 200",
            f"{len(refused)} of {len(cases)} refused; right keys: HTTP {good}"
            + (f"; NOT refused: {'; '.join(accepted)}" if accepted else ""),
            not accepted and good == [200, 200],
            cases=refused + accepted,
        ),
    ]


def check_key_file(server: Server) -> list[Result]:
    mode = server.key_file.stat().st_mode & 0o777
    return [
        result(
            "key_file.json permissions",
            "mode 600 (owner only)",
            f"mode {mode:o} ({server.key_file.name})",
            mode == 0o600,
        ),
    ]


def check_model_api(server: Server) -> list[Result]:
    """Registering (local or remote URL) and unregistering models through the management API is refused.

    The remote URL goes only to our loopback server, which refuses it before fetching anything."""
    attempts = {
        "POST /models?url=cifar3.mar": ("POST", "/models", {"url": f"{MODEL}.mar", "model_name": "again"}),
        "POST /models?url=http://example.com/x.mar": ("POST", "/models", {"url": "http://example.com/x.mar"}),
        "DELETE /models/cifar3": ("DELETE", f"/models/{MODEL}", {}),
    }
    answers = {
        name: management(server, method, path, params=params, timeout=30).status_code
        for name, (method, path, params) in attempts.items()
    }
    still_there = describe_model(server)["modelName"] == MODEL
    return [
        result(
            "model API: register/unregister",
            "refused (405, enable_model_api=false)",
            "; ".join(f"{name}: HTTP {code}" for name, code in answers.items()),
            all(code == 405 for code in answers.values()) and still_there,
        ),
    ]


def check_allowed_urls(server: Server) -> list[Result]:
    """allowed_urls (regular expressions TorchServe matches model URLs against) admits no remote URL."""
    import re

    value = read_properties(server.config).get("allowed_urls", "")
    patterns = [p.strip() for p in value.split(",") if p.strip()]
    remote = [
        "http://example.com/x.mar",
        "https://example.com/x.mar",
        "s3://bucket/x.mar",
        "ftp://example.com/x.mar",
        "http://127.0.0.1:1/x.mar",
        "HTTP://example.com/file://x.mar",
    ]
    admitted = [url for url in remote if any(re.fullmatch(p, url) for p in patterns)]
    return [
        result(
            "allowed_urls",
            "set, and matches no remote URL",
            f"allowed_urls={value or '(unset: TorchServe default)'}"
            + (f"; admits {admitted}" if admitted else "; admits none of http(s)/s3/ftp"),
            bool(patterns) and not admitted,
        ),
    ]


def check_request_size(server: Server) -> list[Result]:
    limit = int(read_properties(server.config).get("max_request_size", 6553500))
    body = b"\0" * (limit + 1024)
    try:
        status = requests.post(
            f"{server.inference_url}/predictions/{server.model}",
            data=body,
            headers={**server.headers(), **OCTET},
            timeout=60,
        ).status_code
    except requests.ConnectionError:
        status = 0  # the server closed the connection before reading the whole body: refused too
    return [
        result(
            "oversized upload",
            f"refused (413) above max_request_size {limit:,} B",
            f"HTTP {status}" if status else "connection closed by the server",
            status in (413, 0),
        ),
    ]


# A 10-byte body that is valid JSON: a string holding a lone surrogate. json.loads() in TorchServe's
# worker makes it the str "\ud800", which cannot be encoded back to UTF-8 (see tests/test_fuzz.py).
POISON_BODY = b'"\\ud800"'


def check_bad_request_in_batch(server: Server, payload: bytes, rounds: int = 5, neighbours: int = 6) -> list[Result]:
    """A malformed request gets its own 400 and never fails the other requests of its dynamic batch:
    send it together with ``neighbours`` good ones, ``rounds`` times."""
    url = f"{server.inference_url}/predictions/{server.model}"
    good_headers = {**server.headers("inference"), **OCTET}
    bad_headers = {**server.headers("inference"), "Content-Type": "application/json"}
    bad_codes, good_codes = [], []
    with ThreadPoolExecutor(neighbours, thread_name_prefix="batch") as pool:
        for _ in range(rounds):
            futures = [
                pool.submit(requests.post, url, data=payload, headers=good_headers, timeout=60)
                for _ in range(neighbours)
            ]
            bad_codes.append(requests.post(url, data=POISON_BODY, headers=bad_headers, timeout=60).status_code)
            good_codes += [f.result().status_code for f in futures]
    failed = [c for c in good_codes if c != 200]
    return [
        result(
            "malformed request in a batch",
            "it gets 400; the good requests of its batch all get 200",
            f"malformed JSON body {POISON_BODY.decode()}: HTTP {sorted(set(bad_codes))}; "
            f"{len(failed)} of {len(good_codes)} good requests sent with it failed"
            + (f" (HTTP {sorted(set(failed))})" if failed else ""),
            all(c == 400 for c in bad_codes) and not failed,
        ),
    ]


def security_checks(server: Server, payload: bytes) -> list[Result]:
    return [
        *check_loopback(server),
        *check_tokens(server, payload),
        *check_key_file(server),
        *check_model_api(server),
        *check_allowed_urls(server),
        *check_request_size(server),
        *check_bad_request_in_batch(server, payload),
    ]


# ---------------------------------------------------------------------------------------------
# report


def markdown(rows: list[Result], meta: dict) -> str:
    lines = [
        "# cifar3 TorchServe: reliability and security",
        "",
        f"Generated by `bench/reliability.py` on {meta['date']}: {meta['machine']}; model {meta['model']}; "
        f"TorchServe {meta['torchserve']}; soak {meta['soak_seconds']:.0f} s. "
        f"{sum(r['passed'] for r in rows)} of {len(rows)} checks passed. CPU numbers are noisy when the "
        "machine is shared.",
        "",
        "| Check | Expected | Measured | Result |",
        "|---|---|---|---|",
    ]
    for r in rows:
        cells = [r["check"], r["expected"], r["measured"], "pass" if r["passed"] else "**FAIL**"]
        lines.append("| " + " | ".join(str(c).replace("|", "/").replace("\n", " ") for c in cells) + " |")
    return "\n".join(lines) + "\n"


def print_table(rows: list[Result]) -> None:
    width = max(len(r["check"]) for r in rows)
    for r in rows:
        print(f"{'PASS' if r['passed'] else 'FAIL'}  {r['check']:<{width}}  {r['measured']}")


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
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, load average "
        f"{', '.join(f'{x:.1f}' for x in os.getloadavg())} at start",
        "torchserve": subprocess.run(
            [str(Path(PYTHON).parent / "torchserve"), "--version"], capture_output=True, text=True, check=False
        )
        .stdout.strip()
        .rsplit(" ", 1)[-1]
        or "?",
        "work_dir": str(work),
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
        step("stop/start", lambda: check_stop_start(server, payload, cycles=args.cycles))
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
    parser = argparse.ArgumentParser(prog="bench/reliability.py", description=__doc__.split("\n\n")[0])
    source = parser.add_mutually_exclusive_group()
    source.add_argument("--mar", default=str(DEFAULT_STORE), help="model store folder holding cifar3.mar (or a .mar)")
    source.add_argument("--checkpoint", type=Path, help="archive this checkpoint with scripts/archive.sh and use it")
    parser.add_argument("--soak-seconds", type=float, default=300.0, help="length of the soak (default 300)")
    parser.add_argument("--cycles", type=int, default=3, help="stop/start cycles (default 3)")
    parser.add_argument("--out", type=Path, default=DEFAULT_REPORT, help="Markdown report (JSON beside it)")
    parser.add_argument("--work-dir", type=Path, help="folder for the servers' configs, stores and logs (kept)")
    parser.add_argument("--keep-work-dir", action="store_true", help="keep the temporary work folder")
    parser.add_argument("--only", nargs="*", help="run only the checks whose step name contains one of these")
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
