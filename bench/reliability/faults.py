"""Fault checks: a killed worker, scaling under load, a request slower than the response timeout, corrupt
archives at start-up, stop/start cycles."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
import zipfile
from pathlib import Path

import numpy as np
import psutil
import requests

from bench.reliability.common import (
    DEBUG_SLEEP_HEADER,
    MODEL,
    OCTET,
    REQUEST_TIMEOUT,
    ROOT,
    Result,
    alive,
    describe_model,
    ping,
    result,
    wait_for,
    workers,
)
from bench.reliability.load import Call, Load, fmt_errors, summarize
from cifar3_client.client import DEFAULT_TIMEOUT, RetryPolicy
from cifar3_client.server import Server, ServerError, write_server_config

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
    # routed to that worker in the meantime fails as those in flight do (HTTP 507).
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
            failed=len(failed),
            routed_to_dead=len(routed_to_dead),
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
            pings=pings,
        ),
        result(
            "kill worker: requests after recovery",
            "all succeed",
            f"{len(after_recovery) - len(failed_later)} of {len(after_recovery)} ok",
            bool(after_recovery) and not failed_later,
            after=len(after_recovery),
            failed_after=len(failed_later),
        ),
    ]
    return rows


def scale(
    server: Server, min_workers: int, max_workers: int | None = None, synchronous: bool = True, timeout: float = 300.0
) -> tuple[int, float]:
    """The client's scale(): (HTTP status, seconds the call took)."""
    started = time.monotonic()
    response = server.client().scale(min_workers, max_workers, synchronous=synchronous, timeout=timeout)
    return response.status_code, time.monotonic() - started


# A synchronous scale-up answers once the new workers are READY, a few seconds per worker on 2 cores
# (reports/reliability.md); longer means workers start too slowly, not just TorchServe's blocking PUT.
SYNC_SCALE_UP_LIMIT_S = 20.0


def check_scale(
    server: Server,
    payload: bytes,
    *,
    up: int = 4,
    synchronous: bool = True,
    clients: int = 6,
    retry_clients: int = 6,
    settle: float = 3.0,
) -> list[Result]:
    """Scale 1 -> ``up`` -> 1 workers through the management API while clients send load.

    Two groups of clients run at once: plain ones (one attempt, 60 s timeout) and the project's client as
    the UI uses it (RetryPolicy(), CIFAR3_TIMEOUT's default deadline): the mitigation on the client side.
    bench/reliability/scaling.py repeats the scale-down many times."""

    def ready_count() -> int:
        return sum(w.get("status") == "READY" for w in workers(server))

    mode = f"synchronous={str(synchronous).lower()}"
    start_workers = len(workers(server))
    batch_size = int(describe_model(server).get("batchSize") or 1)
    plain = Load(server, payload, concurrency=clients, max_seconds=900)
    retrying = Load(
        server, payload, concurrency=retry_clients, max_seconds=900, timeout=DEFAULT_TIMEOUT, retry=RetryPolicy()
    )
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
    # (it has no draining), so such losses are counted and mitigated on the client side: they pass when
    # they are the only failures, no more than the stopping workers' batches can hold, and the retrying
    # clients (the next row) lose nothing.
    dropped = [c for c in plain_failed if c.status == 500 and "Worker died" in c.error]
    drop_bound = (up - 1) * batch_size
    return [
        result(
            f"scale {start_workers} -> {up} workers under load ({mode})",
            f"0 failed requests; {up} workers READY",
            f"HTTP {up_status} after {up_seconds:.1f} s; {count_up} workers"
            + (f", all READY after {up_ready + up_seconds:.1f} s" if up_ready is not None else ", not all READY")
            + f"; {len(up_failed)} of {len(up_calls)} requests failed"
            + (f" ({up_retried} succeeded on a retry)" if up_retried else ""),
            up_status in (200, 202) and up_ready is not None and not up_failed,
            load=summarize(up_calls),
            workers=count_up,
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
            workers=count_down,
            failed_later=sum(not c.ok for c in later),
        ),
        result(
            f"scale {up} -> 1 workers ({mode}), clients retrying",
            "0 failed requests (the project's client: RetryPolicy)",
            f"{sum(not c.ok for c in retry_down)} of {len(retry_down)} failed; {retried} needed a retry"
            + (f" (first: {sorted({c.first_error[:60] for c in retry_down if c.first_error})})" if retried else ""),
            all(c.ok for c in retry_down),
            load=summarize(retry_down),
        ),
    ]


SLOW_HANDLER = '''"""Test-only handler: cifar3's handler, plus a sleep for requests that carry {header}.

Packed only into the .mar that bench.reliability builds to test the response timeout; the sleep
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
            slow_seconds=slow_seconds,
            response_timeout=timeout_s,
            recovery_s=recovery,
            after_statuses=[r.status_code for r in after],
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
            [*server.command(), "status"],
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
            seconds=seconds,
        ),
        result(
            f"corrupt .mar ({kind}): serve.py status",
            "exit code != 0 and the reason",
            f"exit {status.returncode}: {status_text[:200]}; /ping alone: HTTP {ping_status}",
            status.returncode != 0 and says_why,
            ping=ping_status,
            exit_code=status.returncode,
            output=status_text,
        ),
        *([stopped] if not stopped["passed"] else []),
    ]


def stop_and_check(server: Server, grace: float = 15.0) -> Result:
    """Stop the server (Server.stop); then neither Java nor any worker process it had may be left
    running, and Java must have stopped its workers itself (Server.stop kills leftovers, and says so).
    A worker Java started as it stopped and never connected to is killed by Server.stop and only reported."""
    pids = sorted(p.pid for p in server.processes())
    server.stop()
    wait_for(lambda: not alive(pids), grace)
    left = sorted(set(alive(pids)) | {p.pid for p in server.processes()})
    killed = list(server.killed_on_stop)
    orphaned = list(server.orphaned_on_stop)
    return result(
        "stop: processes left",
        "none (Java stops its workers)",
        f"{len(left)} of {len(pids)} still running"
        + (f"; serve.py had to kill workers {killed}" if killed else "")
        + (f"; serve.py killed {orphaned}, started as Java stopped and never connected" if orphaned else ""),
        not left and not killed,
        left=left + killed,
        orphaned=orphaned,
    )


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
            worker_counts=worker_counts,
            configured=configured,
            snapshot_dirs=snapshot_dirs,
        ),
        result(
            f"stop/start x{cycles}: processes",
            "no Java or worker process left after any stop",
            f"{len(leftovers)} left: {leftovers}" if leftovers else "none left",
            not leftovers,
            left=leftovers,
        ),
    ]
