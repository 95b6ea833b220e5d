"""One lifecycle and one failure policy for every long-running component.

A component (fold-in worker, trainer, serving follower) has `run()` (the loop, in the calling
thread), `stop()` (ask the loop to end after its current step; safe from signal handlers and
other threads) and `close()` (release clients once `run` has returned). A step that fails on a
transient fault is retried after a growing back-off with nothing committed; a fault retrying
cannot fix stops the component loudly (FatalError) so a supervisor sees it.
"""

from __future__ import annotations

import gc
import logging
import threading
from collections.abc import Callable
from typing import Protocol

import redis
from confluent_kafka import KafkaException
from kafka.errors import KafkaError

from core.errors import FatalError
from services.infra import metrics

log = logging.getLogger(__name__)

# Redis replies that heal by themselves: failover in progress, a loading replica, memory freed.
_HEALING_REPLIES = ("OOM", "LOADING", "READONLY", "BUSY", "MASTERDOWN", "TRYAGAIN", "CLUSTERDOWN", "MOVED", "ASK")


class Component(Protocol):
    def run(self) -> None: ...
    def stop(self) -> None: ...
    def close(self) -> None: ...


def is_transient(exc: BaseException) -> bool:
    """True for faults that retrying can fix: lost connections, timeouts, a busy or failing-over
    server, an unreachable broker. Script errors, wrong types and bad data are not."""
    e = redis.exceptions
    if isinstance(exc, e.OutOfMemoryError | e.ReadOnlyError | e.BusyLoadingError):
        return True  # redis-py strips the reply's code from these
    if isinstance(exc, e.ClusterError | e.AskError | e.TryAgainError):
        return True  # CLUSTERDOWN, MASTERDOWN, MOVED, ASK, TRYAGAIN: a failover or reshard in progress
    if isinstance(exc, e.RedisClusterException) and not isinstance(exc, e.ClusterCrossSlotError):
        return True  # no reachable node, a slot not covered yet: the cluster is still electing
    if isinstance(exc, redis.ResponseError):
        return str(exc).startswith(_HEALING_REPLIES)
    return isinstance(exc, redis.RedisError | KafkaError | KafkaException | OSError | TimeoutError)


class Backoff:
    """Exponential back-off between retries: 0.5 s doubling to 10 s, reset by a success."""

    def __init__(self, first: float = 0.5, cap: float = 10.0) -> None:
        self.first, self.cap, self.delay = first, cap, first

    def reset(self) -> None:
        self.delay = self.first

    def wait(self, stop: threading.Event) -> None:
        stop.wait(self.delay)
        self.delay = min(self.delay * 2, self.cap)


def retry_step(
    step: Callable[[], None],
    stop: threading.Event,
    what: str,
    backoff: Backoff,
    on_retry: Callable[[], None] | None = None,
) -> bool:
    """Run `step` until it succeeds or `stop` is set; returns whether it succeeded.

    Transient faults are logged and retried after `backoff`; anything else is raised as
    FatalError (the component stops; its offsets stay uncommitted, so nothing is lost).
    """
    while not stop.is_set():
        try:
            step()
            backoff.reset()
            return True
        except Exception as exc:
            if not is_transient(exc):
                log.error("%s failed and retrying cannot fix it: %s: %s", what, type(exc).__name__, exc)
                raise FatalError(f"{what}: {type(exc).__name__}: {exc}") from exc
            if on_retry is not None:
                on_retry()
            if _is_oom(exc):
                metrics.REDIS_OOM.inc()
                log.error(
                    "%s: Redis is at its maxmemory and refuses writes; nothing was written. Raise maxmemory, "
                    "free memory or add shards (see README: capacity); retrying in %.1fs",
                    what,
                    backoff.delay,
                )
                backoff.wait(stop)
                continue
            log.warning(
                "%s failed (%s: %s); retrying in %.1fs, nothing committed", what, type(exc).__name__, exc, backoff.delay
            )
            backoff.wait(stop)
    return False


def _is_oom(exc: BaseException) -> bool:
    return isinstance(exc, redis.exceptions.OutOfMemoryError) or (
        isinstance(exc, redis.ResponseError) and str(exc).startswith("OOM")
    )


# A young collection after 50,000 net container allocations instead of CPython's 700, and the
# older ones rarer too: the fold-in worker makes about 160,000 container objects a second
# (decoded records, Redis replies), almost all freed by reference counting, yet at the default
# thresholds its collector ran about 2,550 times in a 10 s throughput run, 0.9-1.2 s in all with
# every thread waiting; at these, 0.08-0.11 s (`bench.freshness`, four alternated pairs).
FEWER_COLLECTIONS = (50_000, 20, 100)


def collect_less_often() -> None:
    """For a process that allocates at a high rate and keeps little: cyclic garbage is still
    collected, only after more allocations (its bound on memory, a few MB, is what it costs)."""
    gc.set_threshold(*FEWER_COLLECTIONS)


def freeze_long_lived() -> None:
    """After a new model version is loaded: its id lists and maps (and the imports before them)
    live until the next one, so they are frozen out of the collector's sight, or every full
    collection walks them while all threads wait (measured at about 110 ms in the fold-in
    worker at 200k tracks: the p99 tail of its freshness). Unfreezing first lets this one
    collection free the replaced version, cycles included."""
    gc.unfreeze()
    gc.collect()
    gc.freeze()
