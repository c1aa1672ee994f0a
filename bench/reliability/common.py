"""Shared pieces of the reliability checks: result rows, the payload, waiting, processes, the server's
state through the project's HTTP client."""

from __future__ import annotations

import contextlib
import io
import sys
import time
from collections.abc import Callable, Iterable
from pathlib import Path

import numpy as np
import psutil
import requests
from PIL import Image

from cifar3_client.server import Server, ServerError

ROOT = Path(__file__).resolve().parents[2]

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


def sample_png(seed: int = 7, size: int = 32) -> bytes:
    """A CIFAR-sized PNG: a ship-coloured noise image (the payload of every load check)."""
    rng = np.random.default_rng(seed)
    pixels = np.clip(np.array((40, 200, 60), np.float32) + rng.normal(0, 40, (size, size, 3)), 0, 255)
    buffer = io.BytesIO()
    Image.fromarray(pixels.astype(np.uint8)).save(buffer, format="PNG")
    return buffer.getvalue()


def describe_model(server: Server) -> dict:
    return server.client().describe(timeout=10)


def workers(server: Server) -> list[dict]:
    return server.client().workers()


def ping(server: Server) -> int:
    """HTTP status of /ping; 0: no answer."""
    return server.client().ping_status()


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
