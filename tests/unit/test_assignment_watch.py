"""AssignmentWatch: a member without partitions is reported once per spell, and its recovery."""

from __future__ import annotations

import logging

import pytest

from services.infra.assignment_watch import AssignmentWatch

pytestmark = pytest.mark.unit


class _Consumer:
    def __init__(self) -> None:
        self.parts: list[int] = []
        self.asked = 0

    def assignment(self) -> list[int]:
        self.asked += 1
        return self.parts


def test_one_warning_per_spell_without_partitions_and_a_line_when_they_come(caplog: pytest.LogCaptureFixture) -> None:
    now = [0.0]
    watch = AssignmentWatch("fold-in worker (group g)", patience_s=60.0, clock=lambda: now[0])
    consumer = _Consumer()
    caplog.set_level(logging.INFO, logger="services.infra.assignment_watch")

    def at(t: float) -> list[str]:
        now[0] = t
        watch.check(consumer)
        return [r.getMessage() for r in caplog.records]

    assert at(59.0) == []  # a rebalance takes a while: not yet
    assert at(59.5) == [] and consumer.asked == 1  # asked at most once a second
    first = at(61.0)
    assert len(first) == 1 and "fold-in worker (group g): no partitions assigned for 61 s" in first[0]
    assert at(200.0) == first  # once per spell
    consumer.parts = [0]
    recovered = at(201.0)
    assert len(recovered) == 2 and "partitions assigned, after 201 s without any" in recovered[1]
    consumer.parts = []
    assert at(202.0) == recovered and at(260.5) == recovered  # a new spell from the last sight: 201
    assert len(at(261.5)) == 3


def test_a_member_with_partitions_is_never_reported(caplog: pytest.LogCaptureFixture) -> None:
    now = [0.0]
    watch = AssignmentWatch("catalogue sync", patience_s=5.0, clock=lambda: now[0])
    consumer = _Consumer()
    consumer.parts = [1]
    for t in range(0, 100, 2):
        now[0] = float(t)
        watch.check(consumer)
    assert caplog.records == []
