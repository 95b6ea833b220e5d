"""The catalogue in Redis: `catalogue:track:{id}` kept equal to the compacted `tracks` topic.

Runs beside the fold-in worker (`encore foldin`), in its own consumer group
(`encore-catalogue`). Each poll writes its valid entries (a SET of the record's JSON, a DEL
for a null value) in one pipeline and sends its invalid ones to the catalogue's dead-letter
topic; offsets are committed only after both are durable. A replay rewrites the same values
in the same order per key, so it changes nothing: the writes are idempotent.
"""

from __future__ import annotations

import logging
import threading

import redis
from confluent_kafka import Consumer, Message, TopicPartition

from core.catalogue import TrackInfo
from core.messages import DeadLetter, MessageError
from services.infra import rdkafka
from services.infra.assignment_watch import AssignmentWatch
from services.infra.keys import Keys
from services.infra.lifecycle import Backoff, retry_step

log = logging.getLogger(__name__)
GROUP = "encore-catalogue"
RECORDS_PER_POLL = 5000


class CatalogueSync:
    """Component: `run` until `stop`; `step` applies one poll (tests drive it by hand)."""

    def __init__(
        self,
        r: redis.Redis,
        keys: Keys,
        consumer: Consumer,
        publisher: rdkafka.UpdatePublisher,
        topic: str,
        dlq_topic: str,
    ) -> None:
        self.r, self.keys, self.consumer, self.publisher = r, keys, consumer, publisher
        self.topic, self.dlq_topic = topic, dlq_topic
        self.stop_event = threading.Event()
        self.applied = self.dead_letters = 0
        self._batch: list[Message] | None = None  # read, not yet durable: a retry applies it again
        consumer.subscribe([topic])
        self.unassigned = AssignmentWatch("catalogue sync")

    def step(self, timeout: float = 0.5) -> int:
        """Apply one poll's records (or, after a fault, the same ones again); returns how many."""
        if self._batch is None:
            self._batch = rdkafka.data_messages(self.consumer.consume(num_messages=RECORDS_PER_POLL, timeout=timeout))
        batch = self._batch
        if not batch:
            self._batch = None
            return 0
        pipe = self.r.pipeline(transaction=False)
        letters: list[DeadLetter] = []
        for m in batch:
            try:
                track, info = TrackInfo.decode(m.key(), m.value())
            except MessageError as exc:
                letters.append(DeadLetter(m.value() or b"", str(exc), f"{m.topic()}/{m.partition()}/{m.offset()}"))
                continue
            if info is None:
                pipe.delete(self.keys.catalogue(track))
            else:
                pipe.set(self.keys.catalogue(track), info.encode())
        pipe.execute()
        for d in letters:
            log.warning("catalogue: dead letter %s: %s", d.source, d.error)
            self.publisher.send(self.dlq_topic, value=d.raw, headers=d.headers())
        self.publisher.flush()  # raises unless every dead letter is acknowledged
        last: dict[int, int] = {}
        for m in batch:
            last[m.partition()] = max(last.get(m.partition(), -1), m.offset())
        self.consumer.commit(
            offsets=[TopicPartition(self.topic, p, o + 1) for p, o in last.items()], asynchronous=False
        )
        self._batch = None
        self.applied += len(batch) - len(letters)
        self.dead_letters += len(letters)
        return len(batch)

    def run(self) -> None:
        backoff = Backoff(first=1.0)
        while not self.stop_event.is_set():
            retry_step(self._poll, self.stop_event, "catalogue sync", backoff)

    def _poll(self) -> None:
        self.step()
        self.unassigned.check(self.consumer)

    def stop(self) -> None:
        self.stop_event.set()

    def close(self) -> None:
        self.consumer.close()
        self.publisher.close()
