"""Impressions: what a personal answer showed, to the `impressions` topic (key = user id).

The speed layer joins later plays against them (services/speed/experiment_join.py). Sending
never waits for the broker: librdkafka batches in the background, and a failed delivery is
counted and logged, not retried into the request's latency.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

import orjson

from services.infra.rdkafka import UpdatePublisher

log = logging.getLogger(__name__)
SCHEMA_VERSION = 1


class ImpressionLog:
    def __init__(self, topic: str, experiment: str | None, make: Callable[[], UpdatePublisher]) -> None:
        self.topic, self.experiment, self._make = topic, experiment, make
        self._producer: UpdatePublisher | None = None
        self.sent = 0

    def record(self, request_id: str, user_id: str, arm: str, version: str, items: list[str]) -> None:
        if self._producer is None:
            self._producer = self._make()
        value = orjson.dumps(
            {
                "v": SCHEMA_VERSION,
                "request_id": request_id,
                "user_id": user_id,
                "experiment": self.experiment,
                "arm": arm,
                "model_version": version,
                "items": items,
                "ts": time.time(),
            }
        )
        self._producer.send(self.topic, value=value, key=user_id.encode())
        self._producer.producer.poll(0)  # serve delivery reports without waiting
        self.sent += 1
        if self._producer.errors:
            errors = [e for topic in list(self._producer.errors) for e in self._producer.errors.pop(topic, [])]
            log.warning("impressions: %d not delivered, e.g. %s", len(errors), errors[0])

    def close(self) -> None:
        if self._producer is not None:
            self._producer.close()
