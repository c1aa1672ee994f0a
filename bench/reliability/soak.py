"""The soak: saturation, an open-loop load at a fraction of it, latency against low load, memory growth."""

from __future__ import annotations

import subprocess

from bench import cpuprobe
from bench.reliability.common import Result, result, worker_rss
from bench.reliability.load import fmt_errors, measure_saturation, soak_load
from cifar3_client.server import Server


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
