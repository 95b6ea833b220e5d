"""Forgetting a user (right to erasure): `DELETE /admin/users/{id}` and `encore forget user ID`.

1. An erase record (`{"v": 1, "erase": true, "user_id": ...}`, key = the user id) is produced to
   `plays` and acknowledged. It is the durable order: it sits after every play of the user
   produced before it, so every reader of the topic in order (the speed layer, the trainer's
   checkpoint, a replay after a crash or a Redis restore) drops those plays and keeps later ones.
2. At once, without waiting for the speed layer: the history, queued work, vectors in every kept
   version and listener entries are deleted, and the user is held (plays read before the
   speed layer reaches the record are not applied), in one script fenced by the record's offset.
3. The erasure time goes into `erasures`, so a retrain running meanwhile leaves the user out.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from kafka import KafkaProducer

from core.events import EraseEvent
from services.infra.model_store import RedisModelStore
from services.speed.ports import HistoryStore

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Erased:
    user_id: str
    erase_record: str  # topic/partition/offset
    erased_now: bool  # False: the speed layer had already passed the record (nothing left to delete)

    def to_dict(self) -> dict[str, Any]:
        return {"user_id": self.user_id, "erase_record": self.erase_record, "erased_now": self.erased_now}


class Eraser:
    def __init__(
        self,
        producer: KafkaProducer,
        topic: str,
        histories: HistoryStore,
        models: RedisModelStore,
        incarnation: Callable[[], str],
        server_time: Callable[[], float],
    ) -> None:
        self.producer, self.topic, self.histories, self.models = producer, topic, histories, models
        self.incarnation, self.server_time = incarnation, server_time

    def forget(self, user_id: str) -> Erased:
        sent = self.producer.send(self.topic, key=user_id.encode(), value=EraseEvent(user_id).to_json())
        meta = sent.get(timeout=15)  # durable before anything is deleted
        versions = self.models.kept_versions()
        now = self.histories.erase(self.incarnation(), meta.partition, meta.offset, user_id, versions, hold=True)
        self.models.record_erasure(user_id, self.server_time())
        where = f"{self.topic}/{meta.partition}/{meta.offset}"
        log.info("user %r forgotten (erase record %s)", user_id, where)
        return Erased(user_id, where, now)
