"""`encore foldin`: one member of the fold-in consumer group, the speed layer's Kafka loop.

Redis is a cache of the Kafka log: on every assignment each partition is sought to the offset
stored with the state in Redis (+1), or to the earliest offset Kafka holds when Redis has none
for this topic incarnation; the group's committed offset is only a hint for monitoring. If a
batch finds the stored offset below what this worker applied (Redis restored, failed over or
flushed), the partition is rewound to the stored offset and the lost range replayed. A range
Kafka no longer holds is reported loudly (log, metric, `encore status`), never skipped silently.

Consume a micro-batch, let `SpeedLayer.ingest` make it durable (its users queued for a re-solve
in the same atomic step), then commit the offsets it covers; a second thread re-solves the
queued users meanwhile (`resolver`; `ENCORE_RESOLVE_THREAD=false`: both on one thread,
`handle`). A transient fault retries the same batch with nothing committed; anything else stops
the worker loudly (its uncommitted batch is re-read by the next owner and fenced there).
"""

from __future__ import annotations

import logging
import sys
import threading
import time
from collections.abc import Callable
from typing import Any

from confluent_kafka import Consumer, TopicPartition

from core.errors import FatalError, StateRewoundError
from services.infra import metrics, rdkafka
from services.infra.lifecycle import Backoff, retry_step
from services.infra.rdkafka import KafkaUpdateSink
from services.infra.series import SeriesRecorder
from services.infra.settings import Settings
from services.infra.stage_timer import add_stage, stage
from services.infra.status_board import StatusBoard
from services.speed.continuity import OffsetContinuity
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
        self.board, self.group = board, group
        self._incarnation_of_topic = incarnation
        self.incarnation = ""
        self.positions: dict[int, int] = {}  # partition → offset the state holds (as last seen)
        self.continuity = OffsetContinuity()  # partition → offset the next message must have
        self._batch: list[Any] = []  # what is left of the consumed batch (retries see only that)
        self._produced_letters = produced_letters
        self.letters_done: dict[int, int] = {}  # partition → last source offset already in the DLQ
        self.stop_event = threading.Event()
        self.resolver = (
            ResolverThread(layer, self.stop_event, lambda _exc: self.stop_event.set())
            if settings.resolve_thread
            else None
        )
        self._lag_at = self._verified_at = 0.0
        consumer.subscribe([settings.plays_topic], on_assign=self._on_assign, on_revoke=self._on_revoke)

    # librdkafka calls these inside consume(), between two batches: a batch is always
    # committed (or abandoned uncommitted) before its partitions can move.
    def _on_assign(self, c: Consumer, assigned: list[TopicPartition]) -> None:
        """Start every partition where the state in Redis ends (retrying while Redis is away:
        fetching from anywhere else could skip or re-read plays the state never saw)."""
        backoff = Backoff()
        while True:
            try:
                self.incarnation = self._incarnation_of_topic()
                stored = self.layer.histories.applied_offsets(self.incarnation)
                for tp in assigned:
                    tp.offset = self._start_offset(tp.partition, stored.get(tp.partition, -1))
                    self.continuity.expect(tp.partition, tp.offset)
                self._use_incarnation(self.incarnation)
                break
            except Exception as exc:
                if self.stop_event.is_set():
                    raise
                log.warning("assignment: cannot read the stored offsets yet (%s); retrying", exc)
                metrics.RETRIES.inc()
                backoff.wait(self.stop_event)
        c.assign(assigned)
        log.info(
            "assigned partitions %s of incarnation %s, resuming from the state's offsets %s",
            sorted(tp.partition for tp in assigned),
            self.incarnation,
            {tp.partition: tp.offset for tp in assigned},
        )

    def _on_revoke(self, _c: Consumer, revoked: list[TopicPartition]) -> None:
        self._commit_positions({tp.partition for tp in revoked}, asynchronous=True)
        for tp in revoked:
            self.positions.pop(tp.partition, None)
            self.continuity.forget(tp.partition)
        log.info("partitions revoked: %s", sorted(tp.partition for tp in revoked))

    def _commit_positions(self, partitions: set[int], asynchronous: bool = False) -> None:
        """Bring the hint up to the state for `partitions` (the next owner's lag and `encore
        status` read it); a failure is only logged: nothing depends on it."""
        done = {p: o for p, o in self.positions.items() if p in partitions and o >= 0}
        try:
            rdkafka.commit(self.consumer, self.s.plays_topic, done, asynchronous)
        except Exception as exc:  # noqa: BLE001 - a hint: the state's offsets are what counts
            log.warning("could not commit offsets %s (a hint only): %s", done, exc)

    def _start_offset(self, partition: int, stored: int) -> int:
        """stored + 1, or the earliest offset Kafka holds; a hole in between is reported."""
        tp = TopicPartition(self.s.plays_topic, partition)
        low, _high = self.consumer.get_watermark_offsets(tp, timeout=10)
        self.positions[partition] = stored
        if stored + 1 < low:
            self.board.report_gap(self.group, self.incarnation, partition, stored + 1, low)
        return max(stored + 1, low)

    def _use_incarnation(self, incarnation: str) -> None:
        """Dead letters carry the incarnation; read which ones the topic already has (a state
        restored from an older copy records them again)."""
        self.sink.incarnation = incarnation
        self.letters_done = self._produced_letters(incarnation)

    def _rewind(self, stored: dict[int, int]) -> None:
        """Redis lost writes this worker had applied: replay those partitions from its offsets."""
        metrics.STATE_REWINDS.inc(len(stored))
        self._use_incarnation(self.incarnation)
        for part, off in stored.items():
            applied = self.positions.get(part, -1)
            start = self._start_offset(part, off)
            log.warning(
                "Redis lost applied plays on partition %d (stored offset %d, this worker applied up to %d): "
                "replaying from %d",
                part,
                off,
                applied,
                start,
            )
            self._seek(part, start)

    def _went_back(self, messages: list[Any]) -> bool:
        """A message at or below what the state holds, without a rewind of ours: the consumer
        was reset (offset out of range), as when the broker restarted empty."""
        return any(m.offset() <= self.positions.get(m.partition(), -1) for m in messages)

    def _follow_incarnation(self) -> bool:
        """Re-read the topic's incarnation; if it changed, restart every partition from the new
        incarnation's stored offsets (none: the earliest) and return True (drop the batch)."""
        inc = self._incarnation_of_topic()
        if inc == self.incarnation:
            return False
        log.warning(
            "plays topic incarnation changed %s -> %s (broker restarted empty or topic re-created)",
            self.incarnation,
            inc,
        )
        self.incarnation = inc
        self._use_incarnation(inc)
        stored = self.layer.histories.applied_offsets(inc)
        for tp in self.consumer.assignment():
            self._seek(tp.partition, self._start_offset(tp.partition, stored.get(tp.partition, -1)))
        return True

    def _seek(self, partition: int, offset: int) -> None:
        self.consumer.seek(TopicPartition(self.s.plays_topic, partition, offset))
        self.continuity.expect(partition, offset)

    def _follows_on(self, messages: list[Any]) -> list[Any]:
        """The batch without what lies past a gap in a partition's offsets; those partitions
        are fetched again from the offset expected (see `continuity`)."""
        kept, refetch = self.continuity.cut(messages)
        for part, off in refetch.items():
            log.warning("partition %d: the consumer skipped ahead of offset %d; fetching again from there", part, off)
            metrics.OFFSET_GAPS.inc()
            # not `_seek`: that would reset the gap's second look, which the re-fetch needs
            self.consumer.seek(TopicPartition(self.s.plays_topic, part, off))
        return kept

    def step(self, messages: list[Any]) -> None:
        """Make one batch durable, then commit it (raises; `process` retries what is left)."""
        messages = self._follows_on(messages)
        if messages and self._went_back(messages) and self._follow_incarnation():
            messages = []
        self._batch = messages
        while True:
            batch_parts = {m.partition() for m in messages}
            expected = {p: o for p, o in self.positions.items() if p in batch_parts}
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
                out = run(messages, self.incarnation, expected, self.positions.keys(), self.letters_done)
                if thread is not None:
                    thread.poke()
                break
            except StateRewoundError as exc:
                self._rewind(exc.offsets)
                messages = self._batch = [m for m in messages if m.partition() not in exc.offsets]
        metrics.EVENTS_APPLIED.inc(out.applied)
        metrics.EVENTS_SKIPPED.inc(out.records - out.applied)
        metrics.DEAD_LETTERS.inc(out.dead_letters)
        metrics.USERS_FOLDED.inc(out.users_resolved)
        metrics.TRACKS_FOLDED.inc(out.tracks_resolved)
        last = last_offsets(messages)
        for part, off in last.items():
            self.positions[part] = max(self.positions.get(part, -1), off)
        self.continuity.advance(messages)
        with stage("commit"):
            # The committed offset is a hint (assignments start from the state's offsets), so
            # the batch does not wait a broker round trip for it; revoke and close wait.
            rdkafka.commit(self.consumer, self.s.plays_topic, last, asynchronous=True)
        if self.series is not None and messages:
            now = time.time()
            stamps = (m.timestamp() for m in messages)
            self.series.observe(now, (now - ms / 1000.0 for kind, ms in stamps if kind), out.dead_letters)

    def verify_positions(self) -> None:
        """On idle polls: stored offsets below what this worker applied mean Redis lost writes
        while no play arrived; rewind now rather than at the next play."""
        if not self.positions or not self.incarnation:
            return
        stored = self.layer.histories.applied_offsets(self.incarnation)
        behind = {p: stored.get(p, -1) for p, o in self.positions.items() if stored.get(p, -1) < o}
        if behind:
            self._rewind(behind)

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
        self._commit_positions(set(self.positions))
        self.consumer.close()
        self.sink.close()
        if self.series is not None:
            self.series.maybe_flush(force=True)
