"""ExperimentJoin.close while librdkafka delivers a late assignment: close must not fail.

Seen in CI: the group's assignment arrived as `close` ran; the join's on-assign callback asked
for committed offsets on a handle being destroyed, and the error escaped `close`."""

from __future__ import annotations

from typing import Any

import pytest
from confluent_kafka import KafkaError, KafkaException, TopicPartition

from services.infra.keys import Keys
from services.speed.experiment_join import ExperimentJoin

pytestmark = pytest.mark.unit


class _Redis:
    def register_script(self, _source: str) -> object:
        return object()

    def hmget(self, _key: str, fields: list[str]) -> list[None]:
        return [None] * len(fields)


class _ClosingConsumer:
    """Delivers an assignment from inside `close`, as librdkafka may during its last rebalance."""

    def __init__(self) -> None:
        self.on_assign: Any = None
        self.assigned: list[TopicPartition] | None = None

    def subscribe(self, _topics: list[str], on_assign: Any, on_revoke: Any) -> None:
        self.on_assign = on_assign

    def committed(self, _partitions: list[TopicPartition], timeout: float) -> list[TopicPartition]:
        raise KafkaException(KafkaError(KafkaError._DESTROY))

    def assign(self, partitions: list[TopicPartition]) -> None:
        self.assigned = partitions

    def close(self) -> None:
        self.on_assign(self, [TopicPartition("impressions", 0)])


def test_a_late_assignment_during_close_is_ignored() -> None:
    consumer = _ClosingConsumer()
    join = ExperimentJoin(_Redis(), Keys(), consumer, "impressions", "plays", {}, 60.0, 30_000)  # type: ignore[arg-type]
    join.close()  # raised KafkaException before
    assert consumer.assigned is None
