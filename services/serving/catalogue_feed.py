"""A serving replica's copy of the track catalogue, kept current from the compacted `tracks` topic.

Each replica reads the whole topic from its beginning at start (compaction keeps one record per
track) and then follows it, so an entry, or a takedown, reaches every replica's answers within
one poll of the update follower (a fraction of a second). Invalid records are skipped here;
the catalogue sync in `encore foldin` is the one component that dead-letters them.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

from confluent_kafka import Consumer

from core.catalogue import Catalogue, TrackInfo
from core.messages import MessageError
from services.infra import rdkafka

log = logging.getLogger(__name__)
RECORDS_PER_POLL = 10_000


class CatalogueFeed:
    """Applies `tracks` records to `catalogue`; `poll` is called by the update follower's thread."""

    def __init__(self, catalogue: Catalogue, open_reader: Callable[[], Consumer]) -> None:
        self.catalogue, self.open_reader = catalogue, open_reader
        self._reader: Consumer | None = None
        self.applied = self.skipped = 0

    def poll(self, timeout: float = 0.0) -> int:
        """Apply what the topic holds now (waiting up to `timeout` for the first record)."""
        if self._reader is None:
            self._reader = self.open_reader()
        applied = 0
        while True:
            batch = rdkafka.data_messages(self._reader.consume(num_messages=RECORDS_PER_POLL, timeout=timeout))
            for m in batch:
                try:
                    track, info = TrackInfo.decode(m.key(), m.value())
                except MessageError as exc:
                    self.skipped += 1
                    log.debug("catalogue: skipped an invalid record: %s", exc)
                    continue
                self.catalogue.apply(track, info)
                applied += 1
            if len(batch) < RECORDS_PER_POLL:
                break
            timeout = 0.0
        self.applied += applied
        return applied

    def catch_up(self, timeout: float = 30.0) -> int:
        """Apply the whole topic as it stands now (a batch job's view of the catalogue)."""
        if self._reader is None:
            self._reader = self.open_reader()
        ends = {}
        for tp in self._reader.assignment():
            low, high = self._reader.get_watermark_offsets(tp, timeout=10)
            if high > low:  # an empty partition is read already
                ends[tp.partition] = high
        deadline = time.monotonic() + timeout
        applied = 0
        while time.monotonic() < deadline:
            positions = {tp.partition: tp.offset for tp in self._reader.position(self._reader.assignment())}
            if all(positions.get(p, 0) >= end for p, end in ends.items()):
                break
            applied += self.poll(timeout=0.5)
        return applied

    def close(self) -> None:
        if self._reader is not None:
            self._reader.close()
            self._reader = None
