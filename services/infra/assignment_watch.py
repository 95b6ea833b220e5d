"""A log line when a consumer-group member holds no partitions for a while.

A member without partitions does no work and says nothing, so the cause is invisible in the
logs. On Apache Kafka it means the group has more members than the topics have partitions (this
member idles by design, as a standby). On the embedded broker it can mean the group is stuck:
tansu 0.6 can keep naming a departed member as leader, whose assignment never comes (README,
*A consumer group the embedded broker can leave stuck*). Either way an operator should hear of it.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Any

log = logging.getLogger(__name__)
PATIENCE_S = 60.0  # a rebalance on a healthy group takes seconds; this is far past it


class AssignmentWatch:
    """Call `check(consumer)` from the poll loop: warns once per spell without partitions that
    lasts `patience_s`, and says when partitions arrive after such a warning."""

    def __init__(self, who: str, patience_s: float = PATIENCE_S, clock: Callable[[], float] = time.monotonic) -> None:
        self.who, self.patience_s, self.clock = who, patience_s, clock
        self.since = clock()  # the start of the current spell without partitions
        self.last_check = float("-inf")
        self.warned = False

    def check(self, consumer: Any) -> None:
        """At most once a second: asking librdkafka for the assignment takes a lock."""
        now = self.clock()
        if now - self.last_check < 1.0:
            return
        self.last_check = now
        if consumer.assignment():
            if self.warned:
                log.info("%s: partitions assigned, after %.0f s without any", self.who, now - self.since)
            self.since, self.warned = now, False
        elif not self.warned and now - self.since >= self.patience_s:
            self.warned = True
            log.warning(
                "%s: no partitions assigned for %.0f s. On Kafka: its consumer group has more members "
                "than partitions, and this one stands by. On the embedded broker: the group may be stuck on "
                "a departed leader (README); restart the embedded broker or use another group.",
                self.who,
                now - self.since,
            )
