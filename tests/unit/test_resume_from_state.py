"""Where the fold-in worker starts and rewinds: from the offsets stored with the state.

The consumer here is a small stand-in recording seeks and answering watermarks (the integration
tests run the same code on the real broker and Redis: test_foldin_resilience).
"""

from __future__ import annotations

import json
from typing import Any

import pytest
from confluent_kafka import TopicPartition

from core.errors import StateRewoundError
from core.messages import DeadLetter
from services.infra.lifecycle import Backoff
from services.infra.settings import Settings
from services.speed.pipeline import SpeedLayer
from services.speed.worker import FoldInWorker
from tests.fakes import FakeHistoryStore, FakeModelStore, RecordingSink
from tests.unit.test_speed_layer import Msg, _model, _play

pytestmark = pytest.mark.unit


class Consumer:
    def __init__(self, low: int = 0) -> None:
        self.low, self.assigned, self.seeks, self.commits = low, [], [], []

    def subscribe(self, topics: list[str], on_assign: Any, on_revoke: Any) -> None:
        self.on_assign = on_assign

    def get_watermark_offsets(self, tp: TopicPartition, timeout: float = 0, cached: bool = False) -> tuple[int, int]:
        return self.low, 10**9

    def assign(self, tps: list[TopicPartition]) -> None:
        self.assigned = [(tp.partition, tp.offset) for tp in tps]

    def seek(self, tp: TopicPartition) -> None:
        self.seeks.append((tp.partition, tp.offset))

    def commit(self, offsets: list[TopicPartition], asynchronous: bool) -> None:
        self.commits.append({tp.partition: tp.offset for tp in offsets})

    def position(self, tps: list[TopicPartition]) -> list[TopicPartition]:
        return []

    def assignment(self) -> list[TopicPartition]:
        return []


class Board:
    def __init__(self) -> None:
        self.gaps: list[tuple[int, int, int]] = []

    def report_gap(self, group: str, incarnation: str, partition: int, needed: int, available: int) -> None:
        self.gaps.append((partition, needed, available))


def _worker(store: FakeHistoryStore, consumer: Consumer) -> tuple[FoldInWorker, Board, RecordingSink]:
    models = FakeModelStore()
    models.add(_model("v1")[0])
    sink, board = RecordingSink(), Board()
    store.models = models
    layer = SpeedLayer(Settings(min_ms_played=0), store, models, sink)
    # one thread: these tests step the worker by hand (test_resolver_thread covers the other mode)
    w = FoldInWorker(Settings(resolve_thread=False), layer, consumer, sink, lambda: "inc", board)  # type: ignore[arg-type]
    return w, board, sink


def _msgs(part: int, offsets: range) -> list[Msg]:
    return [Msg(part, o, _play(f"u{o % 7}", f"t{o % 5}")) for o in offsets]


def test_assignment_seeks_to_stored_offsets_or_the_earliest_kept() -> None:
    store = FakeHistoryStore()
    store.offsets[("inc", 0)] = 41
    store.offsets[("other-incarnation", 1)] = 99  # a broker that restarted: not this topic's offsets
    c = Consumer(low=0)
    w, board, _ = _worker(store, c)
    c.on_assign(c, [TopicPartition("plays", 0), TopicPartition("plays", 1)])
    assert c.assigned == [(0, 42), (1, 0)]
    assert w.positions == {0: 41, 1: -1}
    assert board.gaps == []


def test_a_range_kafka_no_longer_holds_is_reported_not_skipped_silently() -> None:
    store = FakeHistoryStore()
    store.offsets[("inc", 0)] = 41
    c = Consumer(low=100)  # retention deleted offsets 0..99
    w, board, _ = _worker(store, c)
    c.on_assign(c, [TopicPartition("plays", 0), TopicPartition("plays", 1)])
    assert c.assigned == [(0, 100), (1, 100)]
    assert board.gaps == [(0, 42, 100), (1, 0, 100)]


def test_state_that_went_backwards_is_rewound_and_replayed_exactly() -> None:
    store = FakeHistoryStore()
    c = Consumer()
    w, _, _ = _worker(store, c)
    c.on_assign(c, [TopicPartition("plays", 0), TopicPartition("plays", 1)])
    w.step(_msgs(0, range(0, 20)) + _msgs(1, range(0, 5)))
    exact = json.dumps(store.histories, sort_keys=True)
    snapshot = {k: dict(v) for k, v in store.histories.items()}, dict(store.offsets)
    w.step(_msgs(0, range(20, 40)))
    store.histories, store.offsets = snapshot[0], snapshot[1]  # Redis restored: 20..39 are lost
    w.step(_msgs(0, range(40, 50)) + _msgs(1, range(5, 10)))  # partition 0 is refused and rewound
    assert c.seeks == [(0, 20)]
    assert store.offsets[("inc", 1)] == 9 and store.offsets[("inc", 0)] == 19
    w.step(_msgs(0, range(20, 50)))  # the replay from Kafka
    store2 = FakeHistoryStore()
    w2, _, _ = _worker(store2, Consumer())
    w2.step(_msgs(0, range(0, 50)) + _msgs(1, range(0, 10)))
    assert store.histories == store2.histories
    assert json.dumps(store.histories, sort_keys=True) != exact


def test_an_idle_worker_notices_the_rollback_without_new_plays() -> None:
    store = FakeHistoryStore()
    c = Consumer()
    w, _, _ = _worker(store, c)
    c.on_assign(c, [TopicPartition("plays", 0)])
    w.step(_msgs(0, range(0, 10)))
    store.offsets[("inc", 0)] = 3
    w.verify_positions()
    assert c.seeks == [(0, 4)]


def _reference(batches: list[list[Msg]]) -> dict[str, dict[str, float]]:
    """The histories of these plays applied straight to a store (no consumer in between)."""
    store = FakeHistoryStore()
    w, _, _ = _worker(store, Consumer())
    for b in batches:
        w.layer.handle(b, "inc")
    return store.histories


def test_a_batch_that_skips_offsets_is_cut_at_the_gap_and_fetched_again() -> None:
    """The fence alone cannot see a batch starting above stored + 1 (the chaos soak once lost
    one partition's slice of a micro-batch that way): the worker cuts it and re-fetches."""
    store = FakeHistoryStore()
    c = Consumer()
    w, _, _ = _worker(store, c)
    c.on_assign(c, [TopicPartition("plays", 0), TopicPartition("plays", 1)])
    w.step(_msgs(0, range(0, 10)) + _msgs(1, range(0, 5)))
    w.step(_msgs(0, range(10, 15)) + _msgs(0, range(30, 40)) + _msgs(1, range(5, 10)))  # 15..29 skipped
    assert c.seeks == [(0, 15)]
    assert store.offsets[("inc", 0)] == 14 and store.offsets[("inc", 1)] == 9
    w.step(_msgs(0, range(15, 40)))  # the fresh fetch
    assert store.histories == _reference([_msgs(0, range(0, 40)) + _msgs(1, range(0, 10))])


def test_a_gap_that_the_log_really_has_is_accepted_on_the_second_look() -> None:
    """Transaction markers and compaction leave offsets no message has: after one fresh fetch
    that starts at the same offset again, the worker goes on."""
    store = FakeHistoryStore()
    c = Consumer()
    w, _, _ = _worker(store, c)
    c.on_assign(c, [TopicPartition("plays", 0)])
    w.step(_msgs(0, range(0, 10)))
    w.step(_msgs(0, range(11, 20)))  # offset 10 is a commit marker
    assert c.seeks == [(0, 10)] and store.offsets[("inc", 0)] == 9
    w.step(_msgs(0, range(11, 20)))
    assert c.seeks == [(0, 10)] and store.offsets[("inc", 0)] == 19
    assert store.histories == _reference([_msgs(0, range(0, 10)) + _msgs(0, range(11, 20))])


class _FlakyAfterRewind(FakeHistoryStore):
    """Redis that answers the rewind and then drops the connection once (it is restarting)."""

    def __init__(self) -> None:
        super().__init__()
        self.rewound = self.failed = False

    def apply(self, incarnation: str, records: list[Any], expected: Any = None) -> int:
        try:
            return super().apply(incarnation, records, expected)
        except StateRewoundError:
            self.rewound = True
            raise
        finally:
            if self.rewound and not self.failed and records:
                self.failed = True
                raise ConnectionError("connection reset")


def test_a_retry_after_a_rewind_never_applies_the_stale_copy_of_a_rewound_partition() -> None:
    store = _FlakyAfterRewind()
    c = Consumer()
    w, _, _ = _worker(store, c)
    c.on_assign(c, [TopicPartition("plays", 0), TopicPartition("plays", 1)])
    w.step(_msgs(0, range(0, 20)) + _msgs(1, range(0, 5)))
    snapshot = {k: dict(v) for k, v in store.histories.items()}, dict(store.offsets)
    w.step(_msgs(0, range(20, 40)))
    store.histories, store.offsets = snapshot  # Redis restored: 20..39 are lost
    assert w.process(_msgs(0, range(40, 50)) + _msgs(1, range(5, 10)), Backoff(first=0.01))
    assert store.failed and store.offsets[("inc", 0)] == 19  # not 49: 20..39 were not skipped
    w.step(_msgs(0, range(20, 50)))  # the replay from Kafka
    assert store.histories == _reference([_msgs(0, range(0, 50)) + _msgs(1, range(0, 10))])


def test_a_dead_letter_sent_is_not_sent_again_when_redis_rolls_back_before_the_worker_notices() -> None:
    """Redis restored to a moment between recording a letter and settling it brings the letter
    back; a step that meets it before any play of its partition (re-solves only) must not send
    it twice (the chaos soak saw one such duplicate)."""
    store = FakeHistoryStore()
    c = Consumer()
    w, _, sink = _worker(store, c)
    c.on_assign(c, [TopicPartition("plays", 0)])
    w.step([*_msgs(0, range(0, 3)), Msg(0, 3, b"{not json")])
    letters = [d for d in sink.flushed if isinstance(d, DeadLetter)]
    assert [d.offset for d in letters] == [3] and not store.dlq.get(0)
    store.dlq[0] = list(letters)  # the restored copy still holds it, not yet settled
    store.queue_users(["u1"])  # pending re-solves: the worker steps without new plays
    assert w.process([], Backoff(first=0.01))
    assert [d.offset for d in sink.flushed if isinstance(d, DeadLetter)] == [3]
    assert not store.dlq.get(0)  # dropped from the queue all the same


class _SettleFailsOnce(FakeHistoryStore):
    """Redis that goes away after the letters were produced and before they are settled."""

    def __init__(self) -> None:
        super().__init__()
        self.failed = False

    def settle(self, dead_letters: Any, done_upto: Any) -> None:
        if any(dead_letters.values()) and not self.failed:
            self.failed = True
            raise ConnectionError("connection reset")
        super().settle(dead_letters, done_upto)


def test_a_retry_after_the_letters_were_flushed_does_not_send_them_again() -> None:
    store = _SettleFailsOnce()
    c = Consumer()
    w, _, sink = _worker(store, c)
    c.on_assign(c, [TopicPartition("plays", 0)])
    assert w.process([*_msgs(0, range(0, 3)), Msg(0, 3, b"{not json")], Backoff(first=0.01))
    assert store.failed
    assert [d.offset for d in sink.flushed if isinstance(d, DeadLetter)] == [3]
    assert not store.dlq.get(0)
