"""bench/cpuprobe.py: the machine-steadiness probe the reliability soak reports beside its latency.

The analysis is checked on hand-made counts; the counting process is checked for real by stopping it
(SIGSTOP) for a known time, which must show up as one slow episode of about that length.
"""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import time

import pytest
from conftest import PYTHON, ROOT, run_cli

from bench import cpuprobe


def test_windows_below_half_of_full_speed_are_slow():
    counts = [100] * 18 + [40, 60]  # full speed: the 90th-percentile count, 100
    assert cpuprobe.slow_windows(counts) == [False] * 18 + [True, False]
    assert cpuprobe.slow_windows([]) == []


def test_consecutive_slow_windows_make_one_episode():
    slow = [False, True, True, True, False, False, True]
    assert cpuprobe.episodes(slow, window_s=0.01) == [(0.01, 0.03), (0.06, 0.01)]
    assert cpuprobe.episodes([False] * 5) == []


def test_summary_counts_slow_windows_per_cpu_and_together():
    full, dip = [100] * 20, [100] * 10 + [5, 5, 5] + [100] * 7
    summary = cpuprobe.summarize({0: dip, 1: [100] * 11 + [5] + [100] * 8}, window_s=0.01)
    assert summary["seconds"] == 0.2
    assert summary["slow_fraction"] == 4 / 40
    assert summary["longest_ms"] == 30
    assert summary["episodes"] == {"0": [(0.1, 0.03)], "1": [(0.11, 0.01)]}
    assert summary["together"] == round(1 / 3, 2)  # window 11 is slow on both; 10 and 12 on CPU 0 only
    steady = cpuprobe.summarize({0: full, 1: full})
    assert steady["slow_fraction"] == 0 and steady["together"] is None and steady["longest_ms"] == 0
    assert "below 50% speed in 0.0% of 10-ms windows" in cpuprobe.describe(steady)


def stopped_counter(stop_at: float, stop_s: float, seconds: float = 2.0) -> tuple[list[int], float, float]:
    """A real counting process, stopped (SIGSTOP) ``stop_at`` s into its count for at least ``stop_s`` s:
    (its counts, and when the stop surely began and ended, in seconds from the start of its count).

    The times are this process's own readings around the signals, not the planned ones: on a busy machine the
    counter may start late and this process may wake late, so only the measured interval is certain."""
    start_at = time.monotonic() + 1.0
    command = cpuprobe.counter_command(min(os.sched_getaffinity(0)), seconds, start_at)
    proc = subprocess.Popen(command, cwd=ROOT, stdout=subprocess.PIPE, text=True)
    time.sleep(max(0.0, start_at + stop_at - time.monotonic()))
    proc.send_signal(signal.SIGSTOP)
    stopped = time.monotonic()  # kill() has returned: the counter runs no more user code from here on
    time.sleep(stop_s)
    resumed = time.monotonic()  # read before SIGCONT: the counter is still stopped at this instant
    proc.send_signal(signal.SIGCONT)
    counts = json.loads(proc.communicate(timeout=60)[0])
    return counts, stopped - start_at, resumed - start_at


def test_a_stopped_counter_shows_one_episode_as_long_as_the_stop():
    """A counter stopped for 0.3 s from 0.8 s on: nothing is counted in the windows within the stop, the probe
    sees them as one slow episode, and the counter counted before and after it."""
    window = cpuprobe.WINDOW_S
    for _ in range(3):  # a machine too busy to start the counter before the stop, or to stop it in time: again
        counts, stopped, resumed = stopped_counter(0.8, 0.3)
        first, last = math.ceil(stopped / window) + 1, math.floor(resumed / window) - 1  # windows inside the stop
        if any(counts[: first - 1]) and last < len(counts) - 10:
            break
    else:
        pytest.fail(f"the counter never ran before its stop, or the stop ended too late: stop {stopped:.2f}-"
                    f"{resumed:.2f} s, counts {counts}")  # fmt: skip
    assert len(counts) == 200 and last - first >= 25  # 2 s of 10-ms windows; the stop spans at least 0.27 s
    assert counts[first : last + 1] == [0] * (last + 1 - first)  # stopped: nothing counted, the clock moved on
    assert any(counts[last + 2 :]), "the counter never counted again after SIGCONT"
    runs = cpuprobe.episodes(cpuprobe.slow_windows(counts))
    # one episode covers the stop (the host's own slow episodes may lengthen it, never split it)
    assert any(begin <= first * window and begin + length >= (last + 1) * window for begin, length in runs), runs


def test_cli_prints_one_line_and_refuses_a_bad_length():
    done = run_cli(PYTHON, "-m", "bench.cpuprobe", "--seconds", "0.5", timeout=60)
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("plain code ran below 50% speed in ") and "0.5 s idle probe" in done.stdout
    bad = run_cli(PYTHON, "-m", "bench.cpuprobe", "--seconds", "0", timeout=60)
    assert bad.returncode == 2 and "--seconds must be positive" in bad.stderr


def test_a_counter_that_cannot_run_is_reported_with_its_reason():
    with pytest.raises(RuntimeError, match=r"CPU 4095 exited with 1: OSError"):
        cpuprobe.probe(0.2, cpus=[4095])  # no such CPU: sched_setaffinity refuses it
