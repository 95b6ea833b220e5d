"""The speed layer's decisions on in-memory fakes of its ports: exactly-once application,
dead letters, re-solves, catch-up after a new model, cold start, and retries after a fault."""

from __future__ import annotations

import gc
import json
import weakref
from dataclasses import dataclass

import numpy as np
import pytest
import scipy.sparse as sp

from core.als import ImplicitALS
from core.messages import decode_vector
from core.synthetic import SyntheticMusic
from services.infra.model_store import LoadedModel
from services.infra.settings import Settings
from services.speed.pipeline import CATCH_UP_MARGIN_S, SpeedLayer
from tests.fakes import FakeHistoryStore, FakeModelStore, RecordingSink

pytestmark = pytest.mark.unit


@dataclass
class Msg:
    """A consumed message as the speed layer reads it (confluent-kafka's Message has the same)."""

    _partition: int
    _offset: int
    _value: bytes | None

    def topic(self) -> str:
        return "plays"

    def partition(self) -> int:
        return self._partition

    def offset(self) -> int:
        return self._offset

    def value(self) -> bytes | None:
        return self._value


def _play(user: str, track: str, **kw: object) -> bytes:
    return json.dumps({"user_id": user, "track_id": track, "ts": 1000.0, **kw}).encode()


def _model(version: str, checkpoint_time: float = 0.0, seed: int = 0) -> tuple[LoadedModel, SyntheticMusic]:
    data = SyntheticMusic(n_users=120, n_tracks=60, seed=seed)
    m = ImplicitALS(factors=8, iterations=4, random_state=seed).fit(data.matrix())
    U = m.user_factors_.astype(np.float64)
    loaded = LoadedModel(version, m, list(data.track_ids), U.T @ U, {"checkpoint_time": repr(checkpoint_time)})
    return loaded, data


@pytest.fixture
def layer() -> SpeedLayer:
    models = FakeModelStore()
    models.add(_model("v1")[0])
    s = Settings(cold_start_min_listeners=2, min_ms_played=30_000)
    store = FakeHistoryStore()
    store.models = models
    return SpeedLayer(s, store, models, RecordingSink())


def test_plays_become_histories_and_exact_vectors_once(layer: SpeedLayer) -> None:
    batch = [Msg(0, o, _play("a", f"t{o % 3}")) for o in range(6)] + [Msg(1, 0, _play("b", "t5", count=4))]
    out = layer.handle(batch, "inc")
    assert (out.applied, out.users_resolved) == (7, 2)
    hs, sink = layer.histories, layer.sink
    assert hs.histories == {"a": {"t0": 2.0, "t1": 2.0, "t2": 2.0}, "b": {"t5": 4.0}}
    # The vector written is the model's exact fold-in of the stored history.
    model = layer.model
    row = sp.csr_matrix(
        ([2.0, 2.0, 2.0], ([0, 0, 0], [model.track_index[t] for t in ("t0", "t1", "t2")])), shape=(1, 60)
    )
    expect = model.model.fold_in(row, model.model.item_factors_)[0]
    got = decode_vector(layer.models.users[("v1", "a")])
    np.testing.assert_allclose(got, expect, rtol=1e-4, atol=1e-5)
    assert {(u.entity_id, u.model_version) for u in sink.flushed_updates()} == {("a", "v1"), ("b", "v1")}
    # The same messages again (a replay after a crash): nothing counts twice.
    again = layer.handle(batch, "inc")
    assert again.applied == 0 and hs.histories["a"]["t0"] == 2.0
    assert hs.pending(10)[0] == []


def test_bad_messages_are_dead_letters_exactly_once_even_across_a_failed_flush(layer: SpeedLayer) -> None:
    batch = [
        Msg(0, 0, b"{not json"),
        Msg(0, 1, _play("a", "t1", ms_played=1000)),  # a skip: no weight
        Msg(0, 2, _play("a", "t2", private=True)),  # never stored
        Msg(0, 3, None),
        Msg(0, 4, _play("a", "t3")),
    ]
    layer.sink.fail_next_flush = True
    with pytest.raises(ConnectionError):
        layer.handle(batch, "inc")  # applied durably, but nothing was produced
    assert len(layer.histories.dead_letters([0])[0]) == 2 and layer.sink.flushed == []
    out = layer.handle(batch, "inc")  # the worker retries the same batch
    assert out.applied == 0  # fenced: the first attempt's apply stands
    letters = layer.sink.letters()
    assert [d.source for d in letters] == ["plays/0/0", "plays/0/3"]
    assert "malformed JSON" in letters[0].error and letters[0].raw == b"{not json"
    assert layer.histories.histories == {"a": {"t3": 1.0}}
    assert [u.entity_id for u in layer.sink.flushed_updates()] == ["a"]  # the re-solve was redone after the fault
    assert layer.histories.dead_letters([0]) == {} and layer.histories.pending(10)[0] == []


def test_a_letter_is_not_sent_twice_when_redis_fails_after_it_was_read(layer: SpeedLayer) -> None:
    """A real producer delivers what it was handed even when the attempt fails afterwards: the
    letters must reach the sink only after the batch's last Redis step (the chaos soak's duplicate
    letters came from a Redis kill during the re-solve)."""
    pending, calls = layer.histories.pending, []

    def flaky(limit: int) -> tuple[list[str], float]:
        calls.append(limit)
        if len(calls) == 1:
            raise ConnectionError("Redis went away")
        return pending(limit)

    layer.histories.pending = flaky  # type: ignore[method-assign]
    batch = [Msg(0, 0, b"{not json"), Msg(0, 1, _play("a", "t1")), Msg(0, 2, b"[]")]
    with pytest.raises(ConnectionError):
        layer.handle(batch, "inc")
    layer.handle(batch, "inc")  # the retry; the sink's buffer (the producer's queue) was kept
    assert [d.source for d in layer.sink.letters()] == ["plays/0/0", "plays/0/2"]
    assert layer.histories.dead_letters([0]) == {}


def test_a_new_model_re_solves_users_changed_since_its_checkpoint(layer: SpeedLayer) -> None:
    hs, models = layer.histories, layer.models
    hs.clock = lambda: 100.0
    layer.handle([Msg(0, 0, _play("early", "t1"))], "inc")
    hs.clock = lambda: 500.0
    layer.handle([Msg(0, 1, _play("late", "t2"))], "inc")
    v2, _ = _model("v2", checkpoint_time=400.0 + CATCH_UP_MARGIN_S, seed=1)
    models.add(v2)
    layer.sink.flushed.clear()
    layer.handle([], "inc")  # an idle step notices the version and catches up
    assert layer.model is v2
    assert {(u.entity_id, u.model_version) for u in layer.sink.flushed_updates()} == {("late", "v2")}
    assert ("v2", "late") in models.users and ("v2", "early") not in models.users


def test_cold_start_track_gets_a_vector_from_its_listeners(layer: SpeedLayer) -> None:
    first = layer.handle([Msg(0, 0, _play("a", "brand-new")), Msg(0, 1, _play("a", "t1"))], "inc")
    assert first.tracks_resolved == 0  # one listener: not yet
    assert layer.histories.new_tracks() == ["brand-new"]
    second = layer.handle([Msg(0, 2, _play("b", "brand-new")), Msg(0, 3, _play("b", "t2"))], "inc")
    assert second.tracks_resolved == 1
    assert ("v1", "brand-new") in layer.models.tracks
    assert any(u.entity == "track" and u.entity_id == "brand-new" for u in layer.sink.flushed_updates())


def test_letters_already_in_the_topic_are_settled_not_sent_again(layer: SpeedLayer) -> None:
    """After Redis lost state, the replay records dead letters again; those the dead-letter topic
    already has (at or below the worker's high-water mark) are dropped, the rest are sent."""
    batch = [Msg(0, 0, b"{not json"), Msg(0, 1, _play("a", "t1")), Msg(0, 2, b"[]"), Msg(1, 0, b"{")]
    out = layer.handle(batch, "inc", letters_done={0: 0})
    assert [d.source for d in layer.sink.letters()] == ["plays/0/2", "plays/1/0"]
    assert out.dead_letters == 2
    assert layer.histories.dead_letters([0, 1]) == {}  # all settled


class _Cyclic:
    """Garbage only a collection can free (it refers to itself)."""

    def __init__(self) -> None:
        self.me = self


def test_a_loaded_model_is_frozen_out_of_the_collectors_sight_and_what_it_replaced_freed(
    layer: SpeedLayer,
) -> None:
    """Full collections would walk the model's long-lived lists and maps while every thread waits
    (about 110 ms at 200k tracks): loading a version freezes what is alive; the next load first
    unfreezes, so cyclic garbage frozen with the old version is still freed."""
    gc.unfreeze()
    try:
        leftover = _Cyclic()
        gone = weakref.ref(leftover)
        assert layer.refresh_model()
        assert gc.get_freeze_count() > 0
        del leftover  # garbage now, but frozen: ordinary collections no longer see it
        gc.collect()
        assert gone() is not None
        models = layer.models
        assert isinstance(models, FakeModelStore)
        models.add(_model("v2", seed=1)[0])
        assert layer.refresh_model()
        assert gone() is None
        assert gc.get_freeze_count() > 0
    finally:
        gc.unfreeze()
