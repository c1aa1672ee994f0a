"""Low-overhead HTTP load for the benchmark and the soak: one thread, keep-alive sockets, requests built once.

    from bench.loadgen import run_load
    result = run_load(url, bodies, headers, concurrency=16, seconds=20)            # closed loop
    result = run_load(url, bodies, headers, concurrency=32, seconds=60, rate=250)  # open loop
    result.summary()  # {"requests", "ok", "errors", "error_statuses", "rps", "p50_ms", "p90_ms", "p99_ms"}

The load generator shares the cores with the server it measures, so each request must cost it as
little CPU as possible and must never wait for a lock: a selector loop over plain keep-alive
connections sends pre-built HTTP/1.1 requests and reads only each answer's status line and
Content-Length. Threaded ``requests`` clients cost about 1 ms of CPU per call and queue for the GIL,
which inflated both the CPU the server lost and the latencies we recorded.

Closed loop: ``concurrency`` connections, each sends its next request as soon as its answer is in.
Open loop: requests fall due every ``1 / rate`` seconds whatever the server does; a due request goes
out on the first idle connection (at most ``concurrency`` in flight) and its latency counts from when
it was due, so a server that falls behind shows it (no coordinated omission).
"""

from __future__ import annotations

import collections
import math
import selectors
import socket
import time
from dataclasses import dataclass
from urllib.parse import urlsplit

import numpy as np

NO_ANSWER = 0  # Sample.status when the connection failed or timed out before an HTTP answer
RECONNECT_DELAY = 0.1  # seconds a failed connection rests, so a dead server is not hammered


@dataclass
class Sample:
    due: float  # time.perf_counter() the request was due (open loop) or sent (closed loop)
    end: float
    status: int  # HTTP status, or NO_ANSWER

    @property
    def latency_ms(self) -> float:
        return (self.end - self.due) * 1000


def percentile(values: list[float], q: float) -> float:
    """Nearest-rank percentile (q in 0..100; numpy's "inverted_cdf" method); nan when empty."""
    if not values:
        return math.nan
    return float(np.percentile(values, q, method="inverted_cdf"))


@dataclass
class LoadResult:
    samples: list[Sample]
    seconds: float  # from the first request to the last answer

    def summary(self) -> dict:
        latencies = [s.latency_ms for s in self.samples if s.status == 200]
        statuses = collections.Counter(str(s.status) for s in self.samples if s.status != 200)
        return {
            "requests": len(self.samples),
            "ok": len(latencies),
            "errors": len(self.samples) - len(latencies),
            "error_statuses": dict(statuses),
            "seconds": round(self.seconds, 2),
            "rps": round(len(latencies) / self.seconds, 1) if self.seconds else 0.0,
            "p50_ms": round(percentile(latencies, 50), 1),
            "p90_ms": round(percentile(latencies, 90), 1),
            "p99_ms": round(percentile(latencies, 99), 1),
        }


@dataclass
class _Connection:
    address: tuple[str, int]
    timeout: float
    sock: socket.socket | None = None
    buffer: bytes = b""
    due: float | None = None  # the request in flight, if any
    sent: float = 0.0
    retry_at: float = 0.0  # after a failure, no new request on this connection before this time

    def open(self) -> None:
        self.sock = socket.create_connection(self.address, timeout=self.timeout)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def close(self) -> None:
        if self.sock is not None:
            self.sock.close()
        self.sock, self.buffer, self.due = None, b"", None

    def answer(self) -> tuple[int, bool] | None:
        """(HTTP status, server closes the connection) once a whole answer is buffered, else None."""
        head_end = self.buffer.find(b"\r\n\r\n")
        if head_end < 0:
            return None
        head = self.buffer[:head_end].decode("latin-1").split("\r\n")
        fields = {}
        for line in head[1:]:
            name, _, value = line.partition(":")
            fields[name.strip().lower()] = value.strip().lower()
        length = int(fields.get("content-length", 0))
        if len(self.buffer) < head_end + 4 + length:
            return None
        self.buffer = self.buffer[head_end + 4 + length :]
        return int(head[0].split()[1]), fields.get("connection") == "close"


def build_requests(url: str, bodies: list[bytes], headers: dict[str, str], method: str = "POST") -> list[bytes]:
    parts = urlsplit(url)
    target = f"{parts.path}?{parts.query}" if parts.query else parts.path
    lines = "".join(f"{name}: {value}\r\n" for name, value in headers.items())
    host = f"Host: {parts.hostname}:{parts.port}\r\n"
    return [f"{method} {target} HTTP/1.1\r\n{host}Content-Length: {len(b)}\r\n{lines}\r\n".encode() + b for b in bodies]


def run_load(
    url: str,
    bodies: list[bytes],
    headers: dict[str, str],
    *,
    concurrency: int,
    seconds: float,
    rate: float | None = None,
    timeout: float = 30.0,
    method: str = "POST",
) -> LoadResult:
    """Send ``bodies`` (in turn) to ``url`` for ``seconds``; closed loop, or open loop at ``rate`` per second."""
    if not bodies or concurrency < 1 or seconds <= 0 or (rate is not None and rate <= 0):
        raise ValueError("run_load needs bodies, concurrency >= 1, seconds > 0 and rate > 0 (or None)")
    parts = urlsplit(url)
    requests = build_requests(url, bodies, headers, method)
    connections = [_Connection((parts.hostname, parts.port), timeout) for _ in range(concurrency)]
    selector = selectors.DefaultSelector()
    samples: list[Sample] = []
    pending: collections.deque[float] = collections.deque()  # open loop: due times not yet sent
    issued = 0

    def send(conn: _Connection, due: float) -> None:
        nonlocal issued
        conn.due, conn.sent = due, time.perf_counter()
        try:
            if conn.sock is None:
                conn.open()
                selector.register(conn.sock, selectors.EVENT_READ, conn)
            conn.sock.sendall(requests[issued % len(requests)])
        except OSError:
            fail(conn)
        issued += 1

    def fail(conn: _Connection) -> None:
        now = time.perf_counter()
        if conn.due is not None:
            samples.append(Sample(conn.due, now, NO_ANSWER))
        if conn.sock is not None:
            selector.unregister(conn.sock)
        conn.close()
        conn.retry_at = now + RECONNECT_DELAY

    started = time.perf_counter()
    stop_at = started + seconds
    next_due = started
    while True:
        now = time.perf_counter()
        if rate is None:  # closed loop: every idle connection sends (again) until the time is up
            for conn in connections:
                if conn.due is None and now < stop_at and now >= conn.retry_at:
                    send(conn, now)
        else:
            while next_due <= now and next_due < stop_at:
                pending.append(next_due)
                next_due = started + (issued + len(pending)) / rate
            for conn in connections:
                if pending and conn.due is None and now >= conn.retry_at:
                    send(conn, pending.popleft())
        if now >= stop_at and not pending and all(c.due is None for c in connections):
            break
        wait = 0.05 if rate is None or next_due >= stop_at else min(0.05, max(0.0, next_due - now))
        for key, _ in selector.select(wait):
            conn: _Connection = key.data
            try:
                chunk = conn.sock.recv(65536)
            except OSError:
                chunk = b""
            if not chunk:  # the server closed the connection
                fail(conn)
                continue
            conn.buffer += chunk
            answer = conn.answer()
            if answer is not None:
                samples.append(Sample(conn.due, time.perf_counter(), answer[0]))
                conn.due = None
                if answer[1]:  # e.g. after an error: the next request goes on a new connection
                    selector.unregister(conn.sock)
                    conn.close()
        now = time.perf_counter()
        for conn in connections:
            if conn.due is not None and now - conn.sent > timeout:
                fail(conn)
    selector.close()
    for conn in connections:
        conn.close()
    ended = max((s.end for s in samples), default=time.perf_counter())
    return LoadResult(samples, ended - started)
