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
        self._ends: dict[int, int] | None = None  # the topic's end offsets when this feed opened
        self.loaded = False  # True once everything the topic held at start has been applied

    def _open(self) -> Consumer:
        if self._reader is None:
            self._reader = self.open_reader()
            self._ends = {}
            for tp in self._reader.assignment():
                low, high = self._reader.get_watermark_offsets(tp, timeout=10)
                if high > low:  # an empty partition is read already
                    self._ends[tp.partition] = high
        return self._reader

    def _check_loaded(self) -> bool:
        """Whether the records the topic held at start are all applied (a replica must not serve
        a track taken down before it started)."""
        if not self.loaded and self._reader is not None and self._ends is not None:
            at = {tp.partition: tp.offset for tp in self._reader.position(self._reader.assignment())}
            self.loaded = all(at.get(p, -1) >= end for p, end in self._ends.items())
        return self.loaded

    def poll(self, timeout: float = 0.0) -> int:
        """Apply what the topic holds now (waiting up to `timeout` for the first record)."""
        reader = self._open()
        applied = 0
        while True:
            batch = rdkafka.data_messages(reader.consume(num_messages=RECORDS_PER_POLL, timeout=timeout))
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
        self._check_loaded()
        return applied

    def catch_up(self, timeout: float = 30.0) -> int:
        """Apply the whole topic as it stood when the feed opened (a batch job's catalogue)."""
        deadline, applied = time.monotonic() + timeout, self.poll(0.5)
        while not self.loaded and time.monotonic() < deadline:
            applied += self.poll(timeout=0.5)
        return applied

    def close(self) -> None:
        if self._reader is not None:
            self._reader.close()
            self._reader = None
