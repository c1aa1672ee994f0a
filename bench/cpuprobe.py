"""How steadily this machine runs plain code: the speed dips a latency measurement inherits.

    .venv/bin/python -m bench.cpuprobe --seconds 10

One process per CPU (pinned to it) counts the turns of a trivial Python loop in each 10 ms window,
all windows aligned on one clock. A window below half the CPU's full speed (its 90th-percentile
count) is slow; consecutive slow windows make one episode. On an idle, dedicated machine there are
next to none. On the 2-core development VM plain code ran at 5-15 % of its speed for 30-100 ms
every 0.3-2 s, on both CPUs at once, with no gap in the guest's clock and no steal time reported:
the host shares the cores. Every request in such an episode is slowed 5-15x whatever the server does,
which is why bench.reliability reports this probe beside the soak's latency.

Run it on an idle machine: a busy one shows its own load as slow windows.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
WINDOW_S = 0.01  # one count per 10 ms
SLOW_BELOW = 0.5  # a window slower than this fraction of full speed is slow


def count_turns(seconds: float, start_at: float, window_s: float = WINDOW_S) -> list[int]:
    """Turns of a trivial loop in each ``window_s`` window from ``start_at`` (time.monotonic) on."""
    clock = time.monotonic
    time.sleep(max(0.0, start_at - clock()))
    windows = round(seconds / window_s)
    counts = [0] * windows
    while (index := int((clock() - start_at) / window_s)) < windows:
        counts[index] += 1
    return counts


def slow_windows(counts: list[int], slow_below: float = SLOW_BELOW) -> list[bool]:
    """Which windows ran below ``slow_below`` of full speed (the 90th-percentile count)."""
    if not counts:
        return []
    full = sorted(counts)[int(0.9 * (len(counts) - 1))]
    return [count < slow_below * full for count in counts]


def episodes(slow: list[bool], window_s: float = WINDOW_S) -> list[tuple[float, float]]:
    """(start s, length s) of each run of consecutive slow windows."""
    runs, begin = [], None
    for index, is_slow in enumerate([*slow, False]):
        if is_slow and begin is None:
            begin = index
        elif not is_slow and begin is not None:
            runs.append((round(begin * window_s, 3), round((index - begin) * window_s, 3)))
            begin = None
    return runs


def summarize(per_cpu: dict[int, list[int]], window_s: float = WINDOW_S) -> dict:
    """The slow windows and episodes of each CPU, and how often the CPUs were slow together."""
    slow = {cpu: slow_windows(counts) for cpu, counts in per_cpu.items()}
    windows = min((len(s) for s in slow.values()), default=0)
    any_slow = sum(any(s[i] for s in slow.values()) for i in range(windows))
    all_slow = sum(all(s[i] for s in slow.values()) for i in range(windows))
    runs = {cpu: episodes(s, window_s) for cpu, s in slow.items()}
    seconds = windows * window_s
    return {
        "seconds": round(seconds, 2),
        "cpus": sorted(per_cpu),
        "slow_fraction": round(sum(sum(s) for s in slow.values()) / max(1, sum(len(s) for s in slow.values())), 4),
        "episodes_per_s": round(sum(len(r) for r in runs.values()) / len(runs) / seconds, 2) if seconds else 0.0,
        "longest_ms": round(1000 * max((length for r in runs.values() for _, length in r), default=0.0)),
        "together": round(all_slow / any_slow, 2) if any_slow else None,  # share of slow windows slow on every CPU
        "episodes": {str(cpu): r for cpu, r in runs.items()},
    }


def describe(summary: dict) -> str:
    """One line for a report."""
    text = (
        f"plain code ran below {SLOW_BELOW:.0%} speed in {summary['slow_fraction']:.1%} of "
        f"{WINDOW_S * 1000:.0f}-ms windows ({summary['episodes_per_s']:g} episodes/s per CPU, longest "
        f"{summary['longest_ms']} ms"
    )
    if summary["together"] is not None and len(summary["cpus"]) > 1:
        text += f", {summary['together']:.0%} of them on all {len(summary['cpus'])} CPUs at once"
    return text + f"; {summary['seconds']:g} s idle probe)"


def counter_command(cpu: int, seconds: float, start_at: float) -> list[str]:
    """The command of one CPU's counting process (prints its counts as JSON); run it from the repository root."""
    return [sys.executable, "-m", "bench.cpuprobe", "--count", f"--cpu={cpu}", f"--seconds={seconds}",
            f"--start-at={start_at!r}"]  # fmt: skip


def probe(seconds: float = 10.0, cpus: list[int] | None = None) -> dict:
    """Count on every CPU at once (one pinned process each) for ``seconds`` and summarize."""
    cpus = sorted(cpus if cpus is not None else os.sched_getaffinity(0))
    start_at = time.monotonic() + 0.5  # every process starts counting on the same 10 ms boundary
    procs = {
        cpu: subprocess.Popen(
            counter_command(cpu, seconds, start_at), cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
        )
        for cpu in cpus
    }
    per_cpu = {}
    try:
        for cpu, proc in procs.items():
            out, err = proc.communicate(timeout=seconds + 60)
            if proc.returncode != 0:
                last = err.strip().splitlines()[-1] if err.strip() else "no message"
                raise RuntimeError(f"cpu probe on CPU {cpu} exited with {proc.returncode}: {last}")
            per_cpu[cpu] = json.loads(out)
    finally:  # none left counting after an error
        for proc in procs.values():
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    return summarize(per_cpu)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.cpuprobe", description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=10.0, help="how long to count (default 10)")
    parser.add_argument("--json", action="store_true", help="print the whole summary as JSON")
    parser.add_argument("--count", action="store_true", help=argparse.SUPPRESS)  # one CPU's counting process
    parser.add_argument("--cpu", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--start-at", type=float, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.seconds <= 0:
        parser.error("--seconds must be positive")
    if args.count:
        os.sched_setaffinity(0, {args.cpu})
        print(json.dumps(count_turns(args.seconds, args.start_at)))
        return 0
    summary = probe(args.seconds)
    print(json.dumps(summary, indent=2) if args.json else describe(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
