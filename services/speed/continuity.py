"""Offsets must follow on: a consumed batch that skips offsets of a partition is cut at the gap.

The state's fence (apply_batch.lua) refuses a batch that starts at or below the stored offset,
but it cannot see a batch that starts *above* stored + 1: the plays in between would be skipped
for good while the stored offset moves past them. A consumer can deliver such a batch (a client
library bug around seeks and fetch back-pressure, a stale fetch after a rewind). So the worker
keeps, per partition, the offset the next message must have; at a gap it keeps the messages
before it, drops the rest of that partition and fetches again from the expected offset. A gap
that is still there after the fresh fetch is real (offsets of transaction markers or compacted
records, a retention cut) and is accepted, with a log line.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

from services.speed.records import Message

log = logging.getLogger(__name__)


class OffsetContinuity:
    """Per partition: the next offset expected, and a gap waiting for its second look."""

    def __init__(self) -> None:
        self.next: dict[int, int] = {}
        self._second_look: dict[int, tuple[int, int]] = {}  # partition → (expected, seen)

    def expect(self, partition: int, offset: int) -> None:
        """The consumer was sought (assignment, rewind, new incarnation): start over there."""
        self.next[partition] = offset
        self._second_look.pop(partition, None)

    def forget(self, partition: int) -> None:
        self.next.pop(partition, None)
        self._second_look.pop(partition, None)

    def cut(self, messages: Sequence[Message]) -> tuple[list[Message], dict[int, int]]:
        """The messages that follow on, and {partition: offset to fetch again from} for each
        partition cut at a gap. Messages at or below the expected offset are kept (a replay
        the fence skips, or a consumer reset the worker handles)."""
        running = dict(self.next)
        refetch: dict[int, int] = {}
        kept: list[Message] = []
        for m in messages:
            p, o = m.partition() or 0, m.offset() or 0
            if p in refetch:
                continue
            want = running.get(p)
            if want is not None and o > want:
                if self._second_look.get(p) != (want, o):
                    self._second_look[p] = (want, o)
                    refetch[p] = want
                    continue
                log.info("partition %d: offsets %d..%d are not in the log (seen twice); going on", p, want, o - 1)
            self._second_look.pop(p, None)
            running[p] = max(o + 1, want if want is not None else 0)
            kept.append(m)
        return kept, refetch

    def advance(self, messages: Sequence[Message]) -> None:
        """After a batch was made durable: the next offset of each of its partitions."""
        for m in messages:
            p, o = m.partition() or 0, m.offset() or 0
            if o + 1 > self.next.get(p, -1):
                self.next[p] = o + 1
