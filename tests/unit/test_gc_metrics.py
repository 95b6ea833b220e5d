"""Collector pauses reach the metrics without the collector callback ever taking a metric's lock.

In multiprocess mode prometheus_client allocates while it holds its (non-reentrant) lock, so a
collection can start inside it; a callback that observed a histogram there hung the thread
forever (seen in a serve worker under load). The child below collects on nearly every
allocation while creating many labelled series: with the old callback it never finished.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

CHILD = textwrap.dedent(
    """
    import gc, threading, time
    from prometheus_client import CollectorRegistry, Counter, multiprocess
    from services.infra import metrics

    metrics.watch_gc()
    series = Counter("encore_test_series_total", "one series per label", ["k"])
    gc.set_threshold(1)
    for i in range(3000):
        series.labels(str(i)).inc()
    gc.set_threshold(700)
    deadline = time.monotonic() + 30
    registry = CollectorRegistry()
    multiprocess.MultiProcessCollector(registry)
    count = 0.0
    while count == 0 and time.monotonic() < deadline:  # the flusher thread's work, not ours
        time.sleep(0.1)
        count = sum(
            s.value for m in registry.collect() if m.name == "encore_gc_pause_seconds"
            for s in m.samples if s.name.endswith("_count")
        )
    threads = [t.name for t in threading.enumerate()]
    print(int(count), "gc-pause-metrics" in threads)
    """
)


def test_pauses_are_counted_and_a_collection_inside_prometheus_does_not_hang(tmp_path: Path) -> None:
    env = {"PROMETHEUS_MULTIPROC_DIR": str(tmp_path), "PYTHONPATH": str(Path(__file__).parents[2])}
    done = subprocess.run([sys.executable, "-c", CHILD], env=env, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    count, flusher = done.stdout.split()
    assert int(count) > 100 and flusher == "True"  # thousands of collections, all observed
