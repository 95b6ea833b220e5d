"""The fold-in worker's re-solve thread: it re-solves what the loop applied, an erasure waits for
a step in flight, a fault retrying cannot fix stops the worker, and a loop that outruns it waits."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

import numpy as np
import pytest
from confluent_kafka import TopicPartition

from core.errors import FatalError
from core.events import EraseEvent
from core.messages import FactorUpdate, decode_vector
from services.infra.rdkafka import KafkaUpdateSink, ProduceFailed, UpdatePublisher
from services.infra.settings import Settings
from services.speed.pipeline import PENDING_PER_STEP, SpeedLayer
from services.speed.resolver import ResolverThread
from services.speed.worker import FoldInWorker
from tests.fakes import FakeHistoryStore, FakeModelStore, RecordingSink
from tests.unit.test_resume_from_state import Board, Consumer
from tests.unit.test_speed_layer import Msg, _model, _play

pytestmark = pytest.mark.unit


def _until(cond: Callable[[], bool], timeout: float = 20.0) -> None:
    end = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < end, "the re-solve thread did not get there"
        time.sleep(0.01)


def _layer(
    models: FakeModelStore | None = None, store: FakeHistoryStore | None = None
) -> tuple[SpeedLayer, FakeHistoryStore, FakeModelStore]:
    store = store if store is not None else FakeHistoryStore()
    if models is None:
        models = FakeModelStore()
        models.add(_model("v1")[0])
    store.models = models
    return SpeedLayer(Settings(min_ms_played=0), store, models, RecordingSink()), store, models


BATCH = [Msg(0, i, _play(f"u{i % 5}", f"t{i % 7}")) for i in range(30)]


def test_the_thread_re_solves_what_the_loop_applied_as_the_one_thread_step_does() -> None:
    inline, _, inline_models = _layer()
    inline.handle(BATCH, "inc")
    layer, store, models = _layer()
    c = Consumer()
    w = FoldInWorker(Settings(), layer, c, layer.sink, lambda: "inc", Board())  # type: ignore[arg-type]
    c.on_assign(c, [TopicPartition("plays", 0)])
    assert w.resolver is not None
    w.resolver.start()
    try:
        w.step(BATCH)
        assert store.offsets[("inc", 0)] == 29  # durable before the step returned
        _until(lambda: len(models.users) == 5 and not store.pending_users)
    finally:
        w.stop()
        w.resolver.join()
    assert models.users.keys() == inline_models.users.keys()
    for key, raw in inline_models.users.items():
        np.testing.assert_allclose(decode_vector(models.users[key]), decode_vector(raw), rtol=1e-5, atol=1e-6)
    assert sorted(u.entity_id for u in layer.sink.flushed_updates()) == [f"u{i}" for i in range(5)]  # type: ignore[attr-defined]


@pytest.mark.parametrize("here", [False, True])
def test_a_small_batch_is_re_solved_on_the_thread_or_where_configured_at_once_by_the_loop(here: bool) -> None:
    layer, store, models = _layer()
    c = Consumer()
    w = FoldInWorker(Settings(), layer, c, layer.sink, lambda: "inc", Board(), small_batches_here=here)  # type: ignore[arg-type]
    c.on_assign(c, [TopicPartition("plays", 0)])
    w.step(BATCH)  # 30 plays of at most 5,000; the thread is not started here
    assert store.offsets[("inc", 0)] == 29
    if here:  # Redis Cluster's default
        assert len(models.users) == 5 and not store.pending_users
    else:  # applied and queued, left to the thread
        assert not models.users and len(store.pending_users) == 5


class _SlowWrites(FakeHistoryStore):
    """Holds a vector write until released: a re-solve step in flight."""

    def __init__(self) -> None:
        super().__init__()
        self.writing, self.release = threading.Event(), threading.Event()

    def put_vectors(self, version: str, users: list[str], vectors: np.ndarray) -> set[str]:
        self.writing.set()
        assert self.release.wait(20)
        return super().put_vectors(version, users, vectors)


def test_an_erasure_waits_for_a_re_solve_in_flight_so_no_vector_comes_back() -> None:
    layer, store, models = _layer(store=_SlowWrites())
    assert isinstance(store, _SlowWrites)
    layer.ingest([Msg(0, 0, _play("gone", "t1")), Msg(0, 1, _play("gone", "t2"))], "inc")
    step = threading.Thread(target=layer.resolve_pending)
    step.start()
    assert store.writing.wait(20)  # the history was read and solved; the write is in flight
    erase = threading.Thread(target=layer.ingest, args=([Msg(0, 2, EraseEvent("gone").to_json())], "inc"))
    erase.start()
    time.sleep(0.2)
    assert erase.is_alive()  # waiting for the step
    store.release.set()
    step.join(20)
    erase.join(20)
    assert ("v1", "gone") not in models.users and "gone" not in store.histories


def test_a_re_solve_in_flight_on_another_worker_does_not_bring_an_erased_user_back() -> None:
    """Two workers on one store: B is solving "gone" (history read) when A erases them. A does not
    wait for B (B's lock is B's own); B's write finds the user off the queue and drops the vector
    without storing or announcing it, while the user solved beside them is stored as usual."""
    store = _SlowWrites()
    models = FakeModelStore()
    models.add(_model("v1")[0])
    a, _, _ = _layer(models, store)
    b_sink = RecordingSink()
    b = SpeedLayer(Settings(min_ms_played=0), store, models, b_sink)
    a.ingest([Msg(0, 0, _play("gone", "t1")), Msg(0, 1, _play("kept", "t2"))], "inc")
    step = threading.Thread(target=b.resolve_pending)
    step.start()
    assert store.writing.wait(20)
    a.ingest([Msg(0, 2, EraseEvent("gone").to_json())], "inc")  # A's own lock is free: no wait
    store.release.set()
    step.join(20)
    assert ("v1", "gone") not in models.users and ("v1", "kept") in models.users
    assert [(u.entity, u.entity_id) for u in b_sink.flushed if isinstance(u, FactorUpdate)] == [("user", "kept")]


def test_a_fault_retrying_cannot_fix_stops_the_worker_loudly() -> None:
    class Broken(FakeModelStore):
        def user_vectors(self, version: str, users: list[str]) -> list[bytes | None]:
            raise ValueError("corrupt vector store")

    models = Broken()
    models.add(_model("v1")[0])
    layer, store, _ = _layer(models)
    consumer = Consumer()
    consumer.consume = lambda num_messages, timeout: (time.sleep(timeout), [])[1]  # type: ignore[attr-defined]
    w = FoldInWorker(Settings(), layer, consumer, layer.sink, lambda: "inc", Board())  # type: ignore[arg-type]
    store.queue_users(["u1"])
    with pytest.raises(FatalError, match="corrupt vector store"):
        w.run()  # returns only because the thread stopped it
    assert store.pending_users  # nothing settled


def test_the_loop_waits_for_one_step_per_batch_while_the_thread_is_behind() -> None:
    """Over the thread's public face only: a full step (the queue held more than one step's
    users) makes the loop's next batch but one wait until another step has finished."""
    layer, store, _ = _layer()
    calls, gate = [0], threading.Event()
    solve = layer.resolve_pending

    def gated(limit: int = PENDING_PER_STEP, refresh: bool = True) -> tuple[int, int]:
        calls[0] += 1
        if calls[0] >= 2:  # the first step runs, the second is held
            gate.wait(20)
        return solve(limit, refresh)

    layer.resolve_pending = gated  # type: ignore[method-assign]
    stop = threading.Event()
    r = ResolverThread(layer, stop, lambda _e: None)
    store.queue_users([f"u{i}" for i in range(PENDING_PER_STEP * 2 + 1)])
    r.start()
    r.poke()
    try:
        _until(lambda: calls[0] >= 2)  # one full step done, the next one held
        r.wait_if_behind()  # a step finished since the loop last asked: this batch goes on
        waited = threading.Thread(target=r.wait_if_behind)
        waited.start()
        waited.join(0.3)
        assert waited.is_alive()  # behind, and no step finished since: the next batch waits
        gate.set()
        waited.join(5)
        assert not waited.is_alive()
        _until(lambda: not store.pending_users)
        r.wait_if_behind()  # caught up: no wait at all
    finally:
        gate.set()
        stop.set()
        r.join()


def test_two_threads_flushing_one_producer_each_learn_of_their_own_failures() -> None:
    """The loop flushes dead letters and the thread flushes vector updates on one producer: a
    letter that failed must fail the loop's flush (else it counts as sent and is settled, lost),
    never be taken and cleared by the thread's flush."""

    class Failed:
        def str(self) -> str:
            return "broker gone"

    class Sent:
        def topic(self) -> str:
            return "plays.dlq"

    pub = UpdatePublisher("127.0.0.1:1")  # nothing is produced: only the failure report matters
    sink = KafkaUpdateSink(pub, "factor-updates", "plays.dlq")
    pub._delivered(Failed(), Sent())  # type: ignore[arg-type]
    sink.flush(letters=False)  # the thread's flush: its updates all arrived
    with pytest.raises(ProduceFailed, match="broker gone"):
        sink.flush(updates=False)  # the loop's flush: its letter did not
    sink.flush()  # reported once
    pub.producer.flush(0)
