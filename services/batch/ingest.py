"""The trainer's ingest: `plays` → the durable play matrix, checkpointed with its offsets.

The consumer is assigned every partition and seeks to the offsets stored in the checkpoint (not
the group's committed ones), so the matrix is rebuilt exactly after any crash; the group offset
is committed only after a checkpoint is on disk, for monitoring.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from pathlib import Path

from kafka import KafkaConsumer, TopicPartition
from kafka.structs import OffsetAndMetadata

from core.events import EraseEvent, Limits, PlayEvent, parse_play
from services.batch.checkpoint import PlayMatrix
from services.infra.settings import Settings

log = logging.getLogger(__name__)
POLL_MAX_RECORDS = 5000


class Ingest:
    """Owns the checkpoint file and the consumer that feeds it."""

    def __init__(
        self,
        settings: Settings,
        consumer: KafkaConsumer,
        path: Path,
        incarnation: str,
        server_time: Callable[[], float],
        stop: threading.Event,
        on_gap: Callable[[str, int, int, int], None] | None = None,
        incarnation_of: Callable[[], str] | None = None,
    ) -> None:
        self.s, self.consumer, self.path, self.incarnation = settings, consumer, path, incarnation
        self.server_time, self.stop_event = server_time, stop
        self.on_gap, self.incarnation_of = on_gap, incarnation_of
        self.state = PlayMatrix.load(path)
        self.state.check_half_life(settings.decay_half_life_days * 86_400.0)
        self.plays_since_train = 0
        parts = consumer.partitions_for_topic(settings.plays_topic) or set()
        self.tps = [TopicPartition(settings.plays_topic, p) for p in sorted(parts)]
        consumer.assign(self.tps)
        self._seek_to_state()

    def _seek_to_state(self) -> None:
        """Every partition from the checkpoint's offsets of this incarnation (+1), or the earliest."""
        earliest = self.consumer.beginning_offsets(self.tps) if self.tps else {}
        for tp in self.tps:
            needed = self.state.applied(self.incarnation, tp.partition) + 1
            if needed < earliest[tp] and self.on_gap is not None:
                self.on_gap(
                    self.incarnation, tp.partition, needed, earliest[tp]
                )  # retention passed: reported, never hidden
            self.consumer.seek(tp, max(needed, earliest[tp]))

    def _follow_incarnation(self) -> bool:
        """Called when records come at or below the checkpoint's offsets (the consumer was reset):
        if the broker restarted empty, read the new incarnation from its start; returns True then."""
        if self.incarnation_of is None:
            return False
        inc = self.incarnation_of()
        if inc == self.incarnation:
            return False
        log.warning(
            "plays topic incarnation changed %s -> %s: reading the new one from its start", self.incarnation, inc
        )
        self.incarnation = inc
        parts = self.consumer.partitions_for_topic(self.s.plays_topic) or set()
        self.tps = [TopicPartition(self.s.plays_topic, p) for p in sorted(parts)]
        self.consumer.assign(self.tps)
        self._seek_to_state()
        return True

    def poll(self, seconds: float) -> int:
        """Add plays for up to `seconds`; returns how many new plays carried weight."""
        added, deadline = 0, time.monotonic() + seconds
        limits = Limits(now=time.time(), max_future_s=self.s.max_future_s, max_count=self.s.max_count)
        while time.monotonic() < deadline and not self.stop_event.is_set():
            batch = self.consumer.poll(timeout_ms=200, max_records=POLL_MAX_RECORDS)
            if not batch:
                if seconds <= 0:
                    break
                continue
            if any(m.offset <= self.state.applied(self.incarnation, m.partition) for r in batch.values() for m in r):
                if self._follow_incarnation():
                    continue
            for recs in batch.values():
                for m in recs:
                    ev = parse_play(m.value, limits)
                    if isinstance(ev, EraseEvent):
                        if self.state.erase(self.incarnation, m.partition, m.offset, ev.user_id):
                            log.info("erased user %r from the play matrix", ev.user_id)
                        continue
                    # Invalid events still advance the offset, with no weight (the fold-in worker
                    # dead-letters them).
                    user, track, w, ts = ("", "", 0.0, 0.0)
                    if isinstance(ev, PlayEvent):
                        user, track, w, ts = ev.user_id, ev.track_id, ev.weight(self.s.min_ms_played), ev.ts
                    if self.state.add(self.incarnation, m.partition, m.offset, user, track, w, ts) and w > 0:
                        added += 1
        self.plays_since_train += added
        return added

    def to_end(self) -> int:
        """Read `plays` up to the end offsets seen now."""
        end = self.consumer.end_offsets(self.tps)
        added = 0
        while not self.stop_event.is_set():
            if all(self.consumer.position(tp) >= end[tp] for tp in self.tps):
                break
            added += self.poll(1.0)
        return added

    def checkpoint(self) -> None:
        """Checkpoint durably (stamped with the Redis server's time, the clock of the speed
        layer's change log), then commit the offsets it covers."""
        self.state.save(self.path, self.server_time())
        offsets = {
            tp: OffsetAndMetadata(self.state.applied(self.incarnation, tp.partition) + 1, "", -1)
            for tp in self.tps
            if self.state.applied(self.incarnation, tp.partition) >= 0
        }
        if offsets:
            self.consumer.commit(offsets)
        log.info(
            "checkpoint: %d users × %d tracks, %d plays",
            len(self.state.user_ids),
            len(self.state.track_ids),
            self.state.matrix().nnz,
        )
