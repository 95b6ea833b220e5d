"""The one failure policy: transient faults are retried with back-off, anything else stops loudly."""

from __future__ import annotations

import gc
import threading
from collections.abc import Iterator

import pytest
import redis

from core.errors import FatalError
from services.infra.lifecycle import Backoff, collect_less_often, is_transient, retry_step

pytestmark = pytest.mark.unit


@pytest.mark.parametrize(
    "exc, transient",
    [
        (redis.ConnectionError("refused"), True),
        (redis.TimeoutError("timed out"), True),
        (redis.ResponseError("OOM command not allowed when used memory > 'maxmemory'"), True),
        (redis.ResponseError("LOADING Redis is loading the dataset in memory"), True),
        # what redis-py really raises for an OOM or READONLY reply (the code is stripped)
        (redis.exceptions.OutOfMemoryError("command not allowed when used memory > 'maxmemory'."), True),
        (redis.exceptions.ReadOnlyError("You can't write against a read only replica."), True),
        (redis.ResponseError("Script attempted to access a non local key in a cluster node"), False),
        # Redis Cluster in a failover or reshard (redis-py strips MOVED/CLUSTERDOWN from the text)
        (redis.exceptions.MovedError("3999 127.0.0.1:7001"), True),
        (redis.exceptions.ClusterDownError("The cluster is down"), True),
        (redis.exceptions.SlotNotCoveredError("Slot 3999 is not covered by the cluster."), True),
        (redis.exceptions.RedisClusterException("Redis Cluster cannot be connected."), True),
        (redis.exceptions.ClusterCrossSlotError(), False),
        (redis.ResponseError("WRONGTYPE Operation against a key holding the wrong kind of value"), False),
        (ConnectionRefusedError(), True),
        (ValueError("bad data"), False),
    ],
)
def test_transient_or_not(exc: Exception, transient: bool) -> None:
    assert is_transient(exc) is transient


def test_retry_step_retries_transient_then_succeeds_and_resets_backoff() -> None:
    calls, retries = [], []

    def step() -> None:
        calls.append(1)
        if len(calls) < 3:
            raise redis.ConnectionError("down")

    backoff = Backoff(first=0.001, cap=0.004)
    assert retry_step(step, threading.Event(), "step", backoff, lambda: retries.append(1))
    assert len(calls) == 3 and len(retries) == 2 and backoff.delay == 0.001


def test_retry_step_stops_loudly_on_what_retrying_cannot_fix() -> None:
    def step() -> None:
        raise redis.ResponseError("ERR Error running script: user_script:1: bad")

    with pytest.raises(FatalError, match="bad"):
        retry_step(step, threading.Event(), "step", Backoff(first=0.001))


def test_retry_step_gives_up_when_asked_to_stop() -> None:
    stop = threading.Event()

    def step() -> None:
        stop.set()
        raise redis.ConnectionError("down")

    assert retry_step(step, stop, "step", Backoff(first=0.001)) is False


@pytest.fixture
def young_collections() -> Iterator[list[int]]:
    """Counts young-generation collections while the test runs; restores the thresholds."""
    before = gc.get_threshold()
    seen: list[int] = []

    def count(phase: str, info: dict[str, int]) -> None:
        if phase == "start" and info["generation"] == 0:
            seen.append(1)

    gc.callbacks.append(count)
    try:
        yield seen
    finally:
        gc.callbacks.remove(count)
        gc.set_threshold(*before)


def _allocate_and_keep(n: int) -> list[list[int]]:
    return [[i] for i in range(n)]


def test_a_high_rate_process_collects_less_often(young_collections: list[int]) -> None:
    """The fold-in worker's allocation rate made the default collector a tenth of its time."""
    gc.set_threshold(700, 10, 10)
    _allocate_and_keep(20_000)
    at_default = len(young_collections)
    young_collections.clear()
    collect_less_often()
    _allocate_and_keep(20_000)
    assert at_default >= 20
    assert len(young_collections) <= 1
