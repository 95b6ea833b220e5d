"""Where a fold-in batch's time goes: seconds per stage, summed in a Prometheus counter.

The speed layer's throughput is the sum of a few stages (decode, the Lua apply, reading
histories, solving, writing vectors, producing, committing). Timing them in the running process
(not in a separate profiler) lets an operator and `bench.freshness` see which one bounds it; a
stage costs two `perf_counter` calls per batch.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager

from services.infra.metrics import STAGE_SECONDS

STAGES = (
    "poll",
    "decode",
    "apply",
    "dead_letters",
    "pending",
    "vectors_read",
    "histories_read",
    "solve",
    "vectors_write",
    "produce",
    "settle",
    "cold_start",
    "commit",
)
_children = {s: STAGE_SECONDS.labels(s) for s in STAGES}


@contextmanager
def stage(name: str) -> Iterator[None]:
    """Add the block's wall time to `name`'s total (also when it raises: a retried batch's time
    was spent all the same)."""
    t0 = time.perf_counter()
    try:
        yield
    finally:
        _children[name].inc(time.perf_counter() - t0)


def add_stage(name: str, seconds: float) -> None:
    """Add `seconds` to `name`'s total (for time measured by the caller)."""
    _children[name].inc(seconds)
