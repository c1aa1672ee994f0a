"""Client load for the checks: threaded clients with per-call records (faults), and the one-thread load
generator's closed/open loop (soak)."""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass

from bench.loadgen import percentile, run_load
from bench.reliability.common import OCTET, REQUEST_TIMEOUT
from cifar3_client.client import NO_RETRY, Cifar3Client, ClientError, RetryPolicy, error_text, new_session
from cifar3_client.server import Server


@dataclass
class Call:
    start: float  # time.monotonic() the request was sent
    end: float
    status: int  # HTTP status; 0 when no HTTP answer came (connection reset, timeout)
    error: str = ""  # TorchServe's or the handler's message, or the client's (ClientError) when no answer came
    attempts: int = 1  # > 1: the client retried (see Load's retry)
    first_error: str = ""  # what the first attempt got, when it was retried
    kind: str = ""  # no answer: the ClientError's kind (timeout, unreachable)

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
        retry: RetryPolicy = NO_RETRY,
    ):
        self.server, self.payload, self.concurrency = server, payload, concurrency
        self.max_seconds, self.timeout, self.retry = max_seconds, timeout, retry
        self.calls: list[Call] = []
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._local = threading.local()
        self._threads: list[threading.Thread] = []
        self.started = 0.0

    def _client_of_thread(self) -> Cifar3Client:
        """The project's client, one per thread, sending requests again as ``retry`` says (NO_RETRY: one
        attempt, the raw HTTP behaviour; ``timeout`` bounds each call, retries included)."""
        if not hasattr(self._local, "client"):
            session = new_session(pool_size=1)
            self._local.client = Cifar3Client(self.server.client().config, session=session, retry=self.retry)
        return self._local.client

    def _send(self) -> None:
        sent = time.monotonic()
        kind = ""
        try:
            answer = self._client_of_thread().post("predictions", self.payload, timeout=self.timeout)
            status, error = answer.status_code, "" if answer.ok else error_text(answer)[:200]
        except ClientError as exc:
            self._local.__dict__.pop("client", None)  # a fresh connection next time
            answer, status, error, kind = exc, 0, exc.message[:200], exc.kind
        failed = getattr(answer, "failed_attempts", ())
        with self._lock:
            self.calls.append(
                Call(sent, time.monotonic(), status, error, len(failed) + 1, failed[0] if failed else "", kind)
            )

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
            thread.join(self.timeout + 5)
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


def soak_load(server: Server, payload: bytes, seconds: float, *, rate: float | None = None, **kwargs) -> dict:
    """bench/loadgen.py's one-thread load (closed loop, or open loop at ``rate``), summarized."""
    url = f"{server.inference_url}/predictions/{server.model}"
    headers = {**server.headers("inference"), **OCTET}
    return run_load(url, [payload], headers, seconds=seconds, rate=rate, **kwargs).summary()


def measure_saturation(server: Server, payload: bytes, seconds: float = 15.0, concurrency: int = 16) -> dict:
    """Closed loop at ``concurrency``: the request rate the server sustains (after a short warm-up)."""
    soak_load(server, payload, min(3.0, seconds / 3), concurrency=concurrency)
    return soak_load(server, payload, seconds, concurrency=concurrency)
