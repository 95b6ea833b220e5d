"""`encore foldin`: one member of the fold-in consumer group, the speed layer's Kafka loop.

Consume a micro-batch, let `SpeedLayer.ingest` make it durable (its users queued for a re-solve
in the same atomic step), then commit the offsets it covers; a second thread re-solves the
queued users meanwhile (`resolver`; `ENCORE_RESOLVE_THREAD=false`: both on one thread,
`handle`). Where each partition starts, and how it is rewound when Redis lost state, is
`partitions`. A transient fault retries the same batch with nothing committed; anything else
stops the worker loudly (its uncommitted batch is re-read by the next owner and fenced there).
"""

from __future__ import annotations

import logging
import sys
import threading
import time
from collections.abc import Callable
from typing import Any

import numpy as np
from confluent_kafka import Consumer

from core.errors import FatalError, StateRewoundError
from services.infra import metrics, rdkafka
from services.infra.assignment_watch import AssignmentWatch
from services.infra.lifecycle import Backoff, retry_step
from services.infra.rdkafka import KafkaUpdateSink
from services.infra.series import SeriesRecorder
from services.infra.settings import Settings
from services.infra.stage_timer import add_stage, stage
from services.infra.status_board import StatusBoard
from services.speed.partitions import PartitionTracker
from services.speed.pipeline import SpeedLayer
from services.speed.records import last_offsets
from services.speed.resolver import ResolverThread

log = logging.getLogger(__name__)
GROUP = "encore-foldin"
SWITCH_INTERVAL_S = 0.0005


class FoldInWorker:
    """Component: `run` consumes until `stop`; `close` leaves the group and flushes."""

    def __init__(
        self,
        settings: Settings,
        layer: SpeedLayer,
        consumer: Consumer,
        sink: KafkaUpdateSink,
        incarnation: Callable[[], str],
        board: StatusBoard,
        group: str = GROUP,
        produced_letters: Callable[[str], dict[int, int]] = lambda _incarnation: {},
        series: SeriesRecorder | None = None,
        small_batches_here: bool = False,
    ) -> None:
        self.series = series  # per-minute figures for the dashboard
        self.small_batches_here = small_batches_here  # see `step`
        self.s, self.layer, self.consumer, self.sink = settings, layer, consumer, sink
        self._batch: list[Any] = []  # what is left of the consumed batch (retries see only that)
        self.stop_event = threading.Event()
        self.at = PartitionTracker(
            settings.plays_topic,
            consumer,
            layer.histories,
            sink,
            incarnation,
            board,
            group,
            produced_letters,
            self.stop_event,
        )
        self.resolver = (
            ResolverThread(layer, self.stop_event, lambda _exc: self.stop_event.set())
            if settings.resolve_thread
            else None
        )
        self._lag_at = self._verified_at = 0.0
        consumer.subscribe([settings.plays_topic], on_assign=self.at.on_assign, on_revoke=self.at.on_revoke)
        self.unassigned = AssignmentWatch(f"fold-in worker (group {group})")

    def step(self, messages: list[Any]) -> None:
        """Make one batch durable, then commit it (raises; `process` retries what is left)."""
        at = self.at
        messages = at.follows_on(messages)
        if messages and at.went_back(messages) and at.follow_incarnation():
            messages = []
        self._batch = messages
        while True:
            batch_parts = {m.partition() for m in messages}
            expected = {p: o for p, o in at.positions.items() if p in batch_parts}
            try:
                # A batch under half the maximum is re-solved here rather than on the thread only
                # where that measured better (`small_batches_here`: on Redis Cluster, p99 at a true
                # 5,000 plays/s 218-255 ms against 241-309; on one Redis it was worse, 120-183
                # against 97-139, as this loop then also waits for each step's producer flush).
                small = self.small_batches_here and len(messages) < self.s.batch_max_events // 2
                thread = None if small else self.resolver
                if thread is not None:
                    thread.wait_if_behind()
                run = self.layer.handle if thread is None else self.layer.ingest
                out = run(messages, at.incarnation, expected, at.positions.keys(), at.letters_done)
                if thread is not None:
                    thread.poke()
                break
            except StateRewoundError as exc:
                at.rewind(exc.offsets)
                messages = self._batch = [m for m in messages if m.partition() not in exc.offsets]
        metrics.EVENTS_APPLIED.inc(out.applied)
        metrics.EVENTS_SKIPPED.inc(out.records - out.applied)
        metrics.DEAD_LETTERS.inc(out.dead_letters)
        metrics.USERS_FOLDED.inc(out.users_resolved)
        metrics.TRACKS_FOLDED.inc(out.tracks_resolved)
        last = last_offsets(messages)
        at.advance(last, messages)
        with stage("commit"):
            # The committed offset is a hint (assignments start from the state's offsets), so
            # the batch does not wait a broker round trip for it; revoke and close wait.
            rdkafka.commit(self.consumer, self.s.plays_topic, last, asynchronous=True)
        if self.series is not None and messages:
            now = time.time()
            stamps = (m.timestamp() for m in messages)
            ms = np.fromiter((ms for kind, ms in stamps if kind), dtype=np.float64)
            self.series.observe(now, now - ms / 1000.0, out.dead_letters)

    def verify_positions(self) -> None:
        """On idle polls: rewind partitions whose stored offsets fell below what was applied."""
        self.at.verify()

    @property
    def positions(self) -> dict[int, int]:
        return self.at.positions

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
        if self.series is not None:
            self.series.lag(time.time(), lag)
            self.series.maybe_flush()

    def _one(self) -> None:
        if self._batch or (self.resolver is None and self.layer.has_work()):
            self.step(self._batch)
        elif time.monotonic() - self._verified_at >= 1.0:
            self._verified_at = time.monotonic()
            self.verify_positions()
        self.update_lag()

    def run(self, on_batch: Callable[[int], None] | None = None) -> None:
        """Consume until `stop`; raises FatalError if the re-solve thread met a fault retrying
        cannot fix (it stops the loop too)."""
        if self.resolver is not None:
            # Two threads share the GIL: a thread whose Redis reply arrived waits for the other to
            # give it up, 5 ms by default. 0.5 ms: 25.0-27.2k plays/s against 23.3-25.9k
            # (bench.freshness, throughput, two alternations).
            sys.setswitchinterval(SWITCH_INTERVAL_S)
            self.resolver.start()
        try:
            self._loop(on_batch)
        finally:
            if self.resolver is not None:
                self.stop_event.set()
                self.resolver.join()
        if self.resolver is not None and self.resolver.error is not None:
            raise FatalError(f"re-solve thread: {self.resolver.error}") from self.resolver.error

    def _loop(self, on_batch: Callable[[int], None] | None) -> None:
        backoff = Backoff()
        while not self.stop_event.is_set():
            t_poll = time.perf_counter()
            raw = self.consumer.consume(num_messages=self.s.batch_max_events, timeout=self.s.batch_max_ms / 1000)
            messages = rdkafka.data_messages(raw)
            if messages:  # an empty poll is idle time, not the cost of a batch
                add_stage("poll", time.perf_counter() - t_poll)
            else:
                self.unassigned.check(self.consumer)
            metrics.EVENTS_IN.inc(len(messages))
            t0 = time.perf_counter()
            if self.process(messages, backoff):
                metrics.BATCH_SECONDS.observe(time.perf_counter() - t0)
            if on_batch and messages:
                on_batch(len(messages))

    def process(self, messages: list[Any], backoff: Backoff | None = None) -> bool:
        """One consumed batch, retried on transient faults until durable. A retry sees only
        what is left of it: partitions rewound or cut at a gap are fetched again, never
        applied from the stale copy (that would skip the range in between)."""
        self._batch = messages
        what = f"batch of {len(messages)}"
        return retry_step(self._one, self.stop_event, what, backoff or Backoff(), metrics.RETRIES.inc)

    def stop(self) -> None:
        """Ask the loop to end after the current batch (signal-handler safe)."""
        self.stop_event.set()

    def close(self) -> None:
        """Leave the group and flush the producer (after `run` has returned)."""
        self.at.commit_positions(set(self.at.positions))
        self.consumer.close()
        self.sink.close()
        if self.series is not None:
            self.series.maybe_flush(force=True)
