"""`encore foldin`: one member of the fold-in consumer group, the speed layer's Kafka loop.

Consume a micro-batch, let `SpeedLayer.handle` make it durable, then commit the offsets it
covers. A transient fault retries the same batch with nothing committed; anything else stops
the worker loudly (its uncommitted batch is re-read by the next owner and fenced there).
"""

from __future__ import annotations

import functools
import logging
import threading
import time
from collections.abc import Callable
from typing import Any

from confluent_kafka import Consumer

from services.infra import metrics, rdkafka
from services.infra.lifecycle import Backoff, retry_step
from services.infra.rdkafka import KafkaUpdateSink
from services.infra.settings import Settings
from services.speed.pipeline import SpeedLayer
from services.speed.records import last_offsets

log = logging.getLogger(__name__)
GROUP = "encore-foldin"


class FoldInWorker:
    """Component: `run` consumes until `stop`; `close` leaves the group and flushes."""

    def __init__(
        self,
        settings: Settings,
        layer: SpeedLayer,
        consumer: Consumer,
        sink: KafkaUpdateSink,
        incarnation: Callable[[], str],
    ) -> None:
        self.s, self.layer, self.consumer, self.sink = settings, layer, consumer, sink
        self._incarnation_of_topic = incarnation
        self.incarnation = ""
        self.assignment_changed = True
        self.stop_event = threading.Event()
        self._lag_at = 0.0
        consumer.subscribe([settings.plays_topic], on_assign=self._on_assign, on_revoke=self._on_revoke)

    # librdkafka calls these inside consume(), between two batches: a batch is always
    # committed (or abandoned uncommitted) before its partitions can move.
    def _on_assign(self, _c: Consumer, assigned: list[Any]) -> None:
        self.assignment_changed = True
        log.info("assigned partitions %s", sorted(tp.partition for tp in assigned))

    def _on_revoke(self, _c: Consumer, revoked: list[Any]) -> None:
        log.info("partitions revoked: %s", sorted(tp.partition for tp in revoked))

    def _check_incarnation(self) -> None:
        """The topic's `cluster_id/topic_id`, re-read after every assignment: a broker that
        restarted empty or a re-created topic starts a fresh offset fence."""
        if self.assignment_changed or not self.incarnation:
            self.incarnation = self._incarnation_of_topic()
            self.assignment_changed = False
            log.info("plays topic incarnation %s", self.incarnation)

    def step(self, messages: list[Any]) -> None:
        """Make one batch durable, then commit it (raises; `run` retries)."""
        self._check_incarnation()
        out = self.layer.handle(messages, self.incarnation)
        metrics.EVENTS_APPLIED.inc(out.applied)
        metrics.EVENTS_SKIPPED.inc(out.records - out.applied)
        metrics.DEAD_LETTERS.inc(out.dead_letters)
        metrics.USERS_FOLDED.inc(out.users_resolved)
        metrics.TRACKS_FOLDED.inc(out.tracks_resolved)
        rdkafka.commit(self.consumer, self.s.plays_topic, last_offsets(messages))

    def update_lag(self) -> None:
        """Messages behind the end of the assigned partitions, at most once a second."""
        if time.monotonic() - self._lag_at < 1.0:
            return
        self._lag_at = time.monotonic()
        lag = 0
        for tp in self.consumer.position(self.consumer.assignment()):
            _low, high = self.consumer.get_watermark_offsets(tp, cached=True)  # updated by every fetch
            lag += max(0, high - tp.offset) if tp.offset >= 0 else high
        metrics.LAG.set(lag)

    def _one(self, messages: list[Any]) -> None:
        if messages or self.layer.has_work():
            self.step(messages)
        self.update_lag()

    def run(self, on_batch: Callable[[int], None] | None = None) -> None:
        backoff = Backoff()
        while not self.stop_event.is_set():
            raw = self.consumer.consume(num_messages=self.s.batch_max_events, timeout=self.s.batch_max_ms / 1000)
            messages = rdkafka.data_messages(raw)
            metrics.EVENTS_IN.inc(len(messages))
            t0 = time.perf_counter()
            one = functools.partial(self._one, messages)
            if retry_step(one, self.stop_event, f"batch of {len(messages)}", backoff, metrics.RETRIES.inc):
                metrics.BATCH_SECONDS.observe(time.perf_counter() - t0)
            if on_batch and messages:
                on_batch(len(messages))

    def stop(self) -> None:
        """Ask the loop to end after the current batch (signal-handler safe)."""
        self.stop_event.set()

    def close(self) -> None:
        """Leave the group and flush the producer (after `run` has returned)."""
        self.consumer.close()
        self.sink.close()
