"""Per-stage timing of a served batch, for the handler's metrics.

In the core rather than beside the handler class because TorchServe loads a custom handler module only if
it defines exactly one class.
"""

from __future__ import annotations

import contextlib
import time


class StageTimer:
    """Milliseconds spent per stage of one batch (decode, forward, postprocess), reported as TorchServe timers:
    with model_metrics_auto_detect they appear on the metrics API beside HandlerTime, so a slow batch shows
    where its time went."""

    def __init__(self):
        self.ms: dict[str, float] = {}

    @contextlib.contextmanager
    def __call__(self, stage: str):
        started = time.perf_counter()
        try:
            yield
        finally:
            self.ms[stage] = self.ms.get(stage, 0.0) + (time.perf_counter() - started) * 1000

    def report(self, metrics) -> None:
        for stage, ms in self.ms.items():
            metrics.add_time(stage, round(ms, 3), None, "ms")
