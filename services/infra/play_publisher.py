"""PlayPublisher: the small producer API other services import to publish plays."""

from __future__ import annotations

import time

from kafka import KafkaProducer

from core.events import PlayEvent
from services.infra import kafka_admin
from services.infra.kafka_security import kafka_python_config
from services.infra.settings import Settings


class PlayPublisher:
    """Publishes play events keyed by user id, so one user's plays stay ordered."""

    def __init__(self, producer: KafkaProducer, topic: str) -> None:
        self.producer, self.topic = producer, topic

    @classmethod
    def connect(cls, bootstrap: str, topic: str = "plays", settings: Settings | None = None) -> PlayPublisher:
        """`settings` (e.g. `Settings.from_env()`) brings ENCORE_KAFKA_* TLS and SASL."""
        security = kafka_python_config(settings) if settings is not None else {}
        return cls(kafka_admin.producer(bootstrap, **security), topic)

    def publish(
        self,
        user_id: str,
        track_id: str,
        ts: float | None = None,
        ms_played: int | None = None,
        count: int = 1,
        private: bool = False,
        event_id: str | None = None,
    ) -> None:
        ev = PlayEvent(user_id, track_id, time.time() if ts is None else ts, ms_played, count, private, event_id)
        self.producer.send(self.topic, key=user_id.encode(), value=ev.to_json())

    def publish_raw(self, key: bytes | None, value: bytes) -> None:
        self.producer.send(self.topic, key=key, value=value)

    def flush(self) -> None:
        self.producer.flush()

    def close(self) -> None:
        self.producer.flush()
        self.producer.close()
