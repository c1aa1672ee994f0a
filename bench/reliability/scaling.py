"""Scaling under load, repeated: what a scale-down costs raw HTTP clients and the project's client, and how
long a pod takes to drain (the Deployment's preStop and terminationGracePeriodSeconds come from it).

Each run starts at ``low`` workers, starts two groups of client threads at once (raw: the project's client
with NO_RETRY, one attempt, a request lost by TorchServe shows as a timeout; retrying: the project's client as
the UI uses it, RetryPolicy()), and scales ``low -> high -> low`` again and again until the run's time is up:
up with synchronous=false, then waiting until the new workers are READY (a synchronous scale-up holds one of
TorchServe's netty threads and stalls the clients on it, see check_scale), down with synchronous=true.
"""

from __future__ import annotations

import collections
import time

from bench.reliability.common import Result, result, wait_for, workers
from bench.reliability.load import Call, Load
from cifar3_client.client import DEFAULT_TIMEOUT, NO_RETRY, RetryPolicy
from cifar3_client.server import Server

RAW_TIMEOUT = 10.0  # seconds a raw client waits: longer than any answer of a working server, shorter than a run
SLOWEST_LIMIT_S = 5.0  # the target for the retrying client's slowest answer


def failure_kind(call: Call) -> str:
    """How a call failed, for counting: ``HTTP 500 "Worker died."``, ``timeout``, ``unreachable``."""
    if call.status:
        return f'HTTP {call.status} "{call.error[:60]}"'
    return call.kind or "no answer"


def ready_count(server: Server) -> int:
    return sum(w.get("status") == "READY" for w in workers(server))


def scale_to(server: Server, count: int, *, synchronous: bool, timeout: float = 120.0) -> float | None:
    """Scale to ``count`` workers (down: max_worker too) and wait until exactly that many are READY; seconds
    it took, or None when they were not READY in ``timeout``."""
    started = time.monotonic()
    server.client().scale(count, max(count, 4) if count > len(workers(server)) else count, synchronous=synchronous)
    done = wait_for(lambda: len(workers(server)) == count and ready_count(server) == count, timeout, interval=0.1)
    return None if done is None else time.monotonic() - started


def scaling_run(
    server: Server,
    payload: bytes,
    low: int,
    high: int,
    *,
    seconds: float = 20.0,
    clients: int = 4,
    settle: float = 1.0,
) -> dict:
    """One run: both client groups under load while the workers go ``low -> high -> low`` as often as fits in
    ``seconds``. Returns the calls of each group and the scale-downs' (start, end) times."""
    if scale_to(server, low, synchronous=True) is None:
        raise RuntimeError(f"could not scale to {low} READY workers before the run")
    raw = Load(server, payload, concurrency=clients, max_seconds=seconds + 60, timeout=RAW_TIMEOUT, retry=NO_RETRY)
    retrying = Load(
        server, payload, concurrency=clients, max_seconds=seconds + 60, timeout=DEFAULT_TIMEOUT, retry=RetryPolicy()
    )
    downs: list[tuple[float, float]] = []
    ups: list[float] = []
    with raw, retrying:
        end = time.monotonic() + seconds
        time.sleep(settle)
        while time.monotonic() < end - settle:
            up = scale_to(server, high, synchronous=False)
            if up is None:
                raise RuntimeError(f"{high} workers were not READY within 120 s")
            ups.append(up)
            time.sleep(settle)
            started = time.monotonic()
            if scale_to(server, low, synchronous=True) is None:
                raise RuntimeError(f"scaling down to {low} workers did not finish within 120 s")
            downs.append((started, time.monotonic()))
            time.sleep(settle)
    return {"raw": raw.calls, "retrying": retrying.calls, "downs": downs, "ups": ups}


def summarize_group(calls: list[Call]) -> dict:
    failed = [c for c in calls if not c.ok]
    return {
        "requests": len(calls),
        "failed": len(failed),
        "failures": dict(collections.Counter(failure_kind(c) for c in failed)),
        "retried": sum(c.attempts > 1 for c in calls),
        "retried_after": dict(collections.Counter(c.first_error[:60] for c in calls if c.attempts > 1)),
        "slowest_s": round(max((c.latency for c in calls), default=0.0), 2),
    }


def fmt_failures(summary: dict) -> str:
    if not summary["failed"]:
        return "0 failed"
    kinds = ", ".join(f"{n}x {kind}" for kind, n in sorted(summary["failures"].items(), key=lambda kv: -kv[1]))
    return f"{summary['failed']} failed ({kinds})"


def check_scaling(
    server: Server,
    payload: bytes,
    low: int,
    high: int,
    *,
    runs: int = 10,
    seconds: float = 20.0,
    clients: int = 4,
) -> list[Result]:
    """``runs`` runs of scaling_run(): for each client group the failures by kind, per run and in all, and the
    slowest answer. Raw clients: the target is no failure (TorchServe 0.12 cannot reach it, docs/reliability.md),
    the row passes when every failure is one TorchServe's scale-down explains (worker-gone answers, no answer).
    The project's client: no failure and no answer slower than SLOWEST_LIMIT_S."""
    per_run = [scaling_run(server, payload, low, high, seconds=seconds, clients=clients) for _ in range(runs)]
    pattern = f"{low} -> {high} -> {low}"
    downs = sum(len(r["downs"]) for r in per_run)
    ups = [u for r in per_run for u in r["ups"]]
    raw = summarize_group([c for r in per_run for c in r["raw"]])
    retrying = summarize_group([c for r in per_run for c in r["retrying"]])
    raw_runs_failing = sum(any(not c.ok for c in r["raw"]) for r in per_run)
    raw_per_run = [sum(not c.ok for c in r["raw"]) for r in per_run]
    explained = all(
        kind.startswith(('HTTP 500 "Worker died.', 'HTTP 507 "Worker died.', 'HTTP 503 "')) or kind == "timeout"
        for kind in raw["failures"]
    )
    setup = (
        f"{runs} runs of {seconds:.0f} s, {downs} scale-downs (scale-up to READY {min(ups):.1f}-{max(ups):.1f} s), "
        f"{clients} clients per group"
    )
    return [
        result(
            f"scaling {pattern} x{runs} under load: raw HTTP (one attempt, {RAW_TIMEOUT:.0f} s timeout)",
            "0 failed requests (target); else only TorchServe's worker-gone answers and lost jobs (no answer)",
            f"{setup}; {fmt_failures(raw)} of {raw['requests']} in {raw_runs_failing} of {runs} runs "
            f"(per run: {raw_per_run}); slowest answer {raw['slowest_s']:.2f} s",
            explained,
            pattern=pattern,
            runs=runs,
            scale_downs=downs,
            scale_up_s=[round(u, 2) for u in ups],
            summary=raw,
            failed_per_run=raw_per_run,
        ),
        result(
            f"scaling {pattern} x{runs} under load: the project's client (RetryPolicy)",
            f"0 failed requests; no answer slower than {SLOWEST_LIMIT_S:.0f} s",
            f"{fmt_failures(retrying)} of {retrying['requests']}; {retrying['retried']} needed a retry"
            + (f" (after: {retrying['retried_after']})" if retrying["retried"] else "")
            + f"; slowest answer {retrying['slowest_s']:.2f} s",
            not retrying["failed"] and retrying["slowest_s"] <= SLOWEST_LIMIT_S,
            pattern=pattern,
            runs=runs,
            summary=retrying,
        ),
    ]


def check_drain(server: Server, payload: bytes, *, clients: int = 16, seconds: float = 4.0, repeats: int = 3) -> dict:
    """Closed-loop load at ``clients`` (the benchmark's saturation concurrency), then no new requests: seconds
    from the last request sent to its answer, the slowest of ``repeats``. What a pod needs after traffic stops
    reaching it before TorchServe may be stopped."""
    drains = []
    for _ in range(repeats):
        load = Load(server, payload, concurrency=clients, max_seconds=seconds + 60, retry=NO_RETRY)
        with load:
            time.sleep(seconds)
            stopped = time.monotonic()  # leaving the block stops the clients: no request is sent after this
        drains.append(max(c.end for c in load.calls) - stopped)
    return {"drain_s": round(max(drains), 3), "drains_s": [round(d, 3) for d in drains], "clients": clients}


def check_pod_drain(server: Server, payload: bytes) -> list[Result]:
    """The drain time under load and the time TorchServe takes to stop (SIGTERM until Java and its workers are
    gone); stops ``server``."""
    drain = check_drain(server, payload)
    started = time.monotonic()
    server.stop()
    stop_s = round(time.monotonic() - started, 2)
    return [
        result(
            "pod drain: answers in flight when traffic stops",
            "measured: sizes the Deployment's preStop and terminationGracePeriodSeconds",
            f"last answer {drain['drain_s'] * 1000:.0f} ms after the last request (slowest of "
            f"{len(drain['drains_s'])}, {drain['clients']} clients); TorchServe stopped {stop_s:.1f} s after SIGTERM",
            True,
            stop_s=stop_s,
            **drain,
        )
    ]
