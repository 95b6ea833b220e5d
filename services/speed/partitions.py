"""Where each partition the fold-in worker owns stands, and the moves that keep it exact.

Redis is a cache of the Kafka log: on every assignment each partition is sought to the offset
stored with the state in Redis (+1), or to the earliest offset Kafka holds when Redis has none
for this topic incarnation; the group's committed offset is only a hint for monitoring. If a
batch finds the stored offset below what this worker applied (Redis restored, failed over or
flushed), the partition is rewound to the stored offset and the lost range replayed. A range
Kafka no longer holds is reported loudly (log, metric, `encore status`), never skipped silently.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from typing import Any

from confluent_kafka import Consumer, TopicPartition

from services.infra import metrics, rdkafka
from services.infra.lifecycle import Backoff
from services.infra.rdkafka import KafkaUpdateSink
from services.infra.status_board import StatusBoard
from services.speed.continuity import OffsetContinuity
from services.speed.ports import HistoryStore

log = logging.getLogger(__name__)


class PartitionTracker:
    """Per assigned partition: the offset the state holds (as last seen), the offset the next
    message must have, and the dead letters already produced; the topic's incarnation."""

    def __init__(
        self,
        topic: str,
        consumer: Consumer,
        histories: HistoryStore,
        sink: KafkaUpdateSink,
        incarnation: Callable[[], str],
        board: StatusBoard,
        group: str,
        produced_letters: Callable[[str], dict[int, int]],
        stop: threading.Event,
    ) -> None:
        self.topic, self.consumer, self.histories, self.sink = topic, consumer, histories, sink
        self.board, self.group, self.stop_event = board, group, stop
        self._incarnation_of_topic = incarnation
        self._produced_letters = produced_letters
        self.incarnation = ""
        self.positions: dict[int, int] = {}  # partition → offset the state holds (as last seen)
        self.continuity = OffsetContinuity()  # partition → offset the next message must have
        self.letters_done: dict[int, int] = {}  # partition → last source offset already in the DLQ

    # librdkafka calls these inside consume(), between two batches: a batch is always
    # committed (or abandoned uncommitted) before its partitions can move.
    def on_assign(self, c: Consumer, assigned: list[TopicPartition]) -> None:
        """Start every partition where the state in Redis ends (retrying while Redis is away:
        fetching from anywhere else could skip or re-read plays the state never saw)."""
        backoff = Backoff()
        while True:
            try:
                self.incarnation = self._incarnation_of_topic()
                stored = self.histories.applied_offsets(self.incarnation)
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

    def on_revoke(self, _c: Consumer, revoked: list[TopicPartition]) -> None:
        self.commit_positions({tp.partition for tp in revoked}, asynchronous=True)
        for tp in revoked:
            self.positions.pop(tp.partition, None)
            self.continuity.forget(tp.partition)
        log.info("partitions revoked: %s", sorted(tp.partition for tp in revoked))

    def commit_positions(self, partitions: set[int], asynchronous: bool = False) -> None:
        """Bring the hint up to the state for `partitions` (the next owner's lag and `encore
        status` read it); a failure is only logged: nothing depends on it."""
        done = {p: o for p, o in self.positions.items() if p in partitions and o >= 0}
        try:
            rdkafka.commit(self.consumer, self.topic, done, asynchronous)
        except Exception as exc:  # noqa: BLE001 - a hint: the state's offsets are what counts
            log.warning("could not commit offsets %s (a hint only): %s", done, exc)

    def _start_offset(self, partition: int, stored: int) -> int:
        """stored + 1, or the earliest offset Kafka holds; a hole in between is reported."""
        tp = TopicPartition(self.topic, partition)
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

    def rewind(self, stored: dict[int, int]) -> None:
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

    def went_back(self, messages: list[Any]) -> bool:
        """A message at or below what the state holds, without a rewind of ours: the consumer
        was reset (offset out of range), as when the broker restarted empty."""
        return any(m.offset() <= self.positions.get(m.partition(), -1) for m in messages)

    def follow_incarnation(self) -> bool:
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
        stored = self.histories.applied_offsets(inc)
        for tp in self.consumer.assignment():
            self._seek(tp.partition, self._start_offset(tp.partition, stored.get(tp.partition, -1)))
        return True

    def _seek(self, partition: int, offset: int) -> None:
        self.consumer.seek(TopicPartition(self.topic, partition, offset))
        self.continuity.expect(partition, offset)

    def follows_on(self, messages: list[Any]) -> list[Any]:
        """The batch without what lies past a gap in a partition's offsets; those partitions
        are fetched again from the offset expected (see `continuity`)."""
        kept, refetch = self.continuity.cut(messages)
        for part, off in refetch.items():
            log.warning("partition %d: the consumer skipped ahead of offset %d; fetching again from there", part, off)
            metrics.OFFSET_GAPS.inc()
            # not `_seek`: that would reset the gap's second look, which the re-fetch needs
            self.consumer.seek(TopicPartition(self.topic, part, off))
        return kept

    def advance(self, last: dict[int, int], messages: list[Any]) -> None:
        """A batch ending at `last` (partition → offset) is durable in the state."""
        for part, off in last.items():
            self.positions[part] = max(self.positions.get(part, -1), off)
        self.continuity.advance(messages)

    def verify(self) -> None:
        """On idle polls: stored offsets below what this worker applied mean Redis lost writes
        while no play arrived; rewind now rather than at the next play."""
        if not self.positions or not self.incarnation:
            return
        stored = self.histories.applied_offsets(self.incarnation)
        behind = {p: stored.get(p, -1) for p, o in self.positions.items() if stored.get(p, -1) < o}
        if behind:
            self.rewind(behind)
