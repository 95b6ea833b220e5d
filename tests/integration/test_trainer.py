"""The batch layer: plays in → versioned model in Redis; swaps, catch-up, guard."""

from __future__ import annotations

import json
import threading
import uuid

import numpy as np
import pytest
import redis

from core.errors import ModelRejectedError
from core.messages import decode_vector
from core.recommend import top_n
from core.synthetic import SyntheticMusic
from core.version_meta import QUERY_SAMPLE
from services.cli.produce import produce, synthetic_stream
from services.cli.root import Root
from services.infra.clients import Clients
from services.infra.settings import Settings
from services.produce import PlayPublisher
from services.speed.records import PlayRecord
from tests.integration.helpers import WorkerThread, encore, keys_for, wait_for

pytestmark = pytest.mark.integration


def _feed(settings: Settings, n_users: int = 400, n_tracks: int = 200, seed: int = 11) -> SyntheticMusic:
    pub = PlayPublisher.connect(settings.kafka_bootstrap, settings.plays_topic)
    produce(pub, synthetic_stream(n_users, n_tracks, seed, None, live=False))
    pub.close()
    return SyntheticMusic(n_users=n_users, n_tracks=n_tracks, seed=seed)


@pytest.mark.both_topologies
def test_train_once_publishes_a_model_that_knows_tastes(settings: Settings, redis_client: redis.Redis) -> None:
    root = Root(settings)
    root.clients.ensure_topics()
    data = _feed(settings)
    t = root.trainer()
    models = root.models()
    version = t.run_once()
    keys = keys_for(settings)
    assert models.current_version() == version
    meta = {k.decode(): v for k, v in redis_client.hgetall(keys.meta(version)).items()}
    assert float(meta["precision@10"]) > 0.05 and int(meta["n_plays"]) == data.matrix().nnz
    # The popular fallback's scores: the share of users who played each track, most first.
    listeners = (data.matrix() > 0).sum(axis=0).A1 / data.matrix().shape[0]
    top, shares = json.loads(meta["popular"]), json.loads(meta["popular_scores"])
    assert len(top) == len(shares) > 0 and shares == sorted(shares, reverse=True)
    assert shares[0] == pytest.approx(listeners.max(), abs=1e-6)
    assert shares[5] == pytest.approx(listeners[int(top[5][1:])], abs=1e-6)
    stages = json.loads(meta["stage_seconds"])  # where a retrain's time goes, for operators and bench/retrain
    assert {"holdout", "fit", "evaluate", "refit", "publish"} <= set(stages) and all(v >= 0 for v in stages.values())
    assert stages["fit"] + stages["refit"] == pytest.approx(float(meta["train_seconds"]), abs=2e-3)
    # Tuning off (as in this test's settings): the settings' hyperparameters, no search recorded.
    assert json.loads(meta["hyperparameters"])["factors"] == settings.factors and "tuning" not in meta
    # Beyond accuracy, measured on the evaluation's own lists.
    assert 0 < float(meta["coverage@10"]) <= 1 and float(meta["novelty@10"]) > 0
    assert 0 < float(meta["diversity@10"]) <= 1 and float(meta["popularity_lift@10"]) > 0
    # The sample of user vectors serving tunes its index on: real, non-zero user vectors of this version.
    sample = models.load(version).query_sample
    assert (
        256 <= sample.shape[0] <= min(QUERY_SAMPLE, 400)
        and sample.shape[1] == settings.factors
        and np.all(np.any(sample != 0, axis=1))
    )
    assert any(np.allclose(sample[0], decode_vector(redis_client.get(keys.user(version, f"u{u}")))) for u in range(400))
    # The model's top tracks for a user come mostly from that user's favourite genres.
    loaded = models.load(version)
    hits = []
    for u in range(0, 400, 10):
        uid = f"u{u}"
        vec = decode_vector(redis_client.get(keys.user(version, uid)))
        idx, _ = top_n(vec[None], loaded.model.item_factors_, 10)
        genres = data.track_genre[[int(loaded.track_ids[i][1:]) for i in idx[0]]]
        hits.append(np.isin(genres, data.user_genres[u]).mean())
    share_random = np.mean([len(g) / data.n_genres for g in data.user_genres])
    assert np.mean(hits) > 2 * share_random

    # Restart from the checkpoint: exactly the same play matrix, nothing re-read twice.
    before = t.ingest.state.matrix().copy()
    t.close()
    t2 = root.trainer()
    assert t2.ingest.to_end() == 0
    assert (t2.ingest.state.matrix() != before).nnz == 0

    # A second retrain flips the version while a reader loops: no failed or mixed read.
    errors: list[str] = []
    stop = threading.Event()

    def reader() -> None:
        rr = Clients(settings).redis()  # a cluster client on the cluster leg
        try:
            while not stop.is_set():
                v = rr.get(keys.current).decode()
                if rr.get(keys.user(v, "u1")) is None or rr.get(keys.track(v, "t1")) is None:
                    errors.append(v)
        except redis.RedisError as exc:  # a reader that cannot read is a failure too
            errors.append(repr(exc))
        finally:
            rr.close()

    th = threading.Thread(target=reader)
    th.start()
    v2 = t2.train_and_publish()
    stop.set()
    th.join()
    assert v2 != version and errors == []
    assert models.current_version() == v2

    # Guard: a model far worse than the current one is refused.
    t2.retrainer.s = t2.retrainer.s.with_(publish_guard=1e6)
    with pytest.raises(ModelRejectedError):
        t2.train_and_publish()
    assert models.current_version() == v2
    t2.close()
    root.close()


@pytest.mark.both_topologies
def test_speed_layer_catches_up_users_who_played_after_the_checkpoint(
    settings: Settings, redis_client: redis.Redis
) -> None:
    """Catch-up has one owner, the speed layer: when it first sees a new version it re-solves
    users whose history changed after that version's checkpoint."""
    root = Root(settings)
    root.clients.ensure_topics()
    keys = keys_for(settings)
    _feed(settings, 200, 100, seed=5)
    t = root.trainer()
    t.ingest.to_end()
    t.ingest.checkpoint()
    # A play lands in the speed layer after the checkpoint was cut, before the flip.
    root.history_store().apply("inc", [PlayRecord(0, 0, "late-user", "t3", 2.0, 1.0)])
    version = t.train_and_publish()
    assert redis_client.get(keys.user(version, "late-user")) is None  # the trainer did not fold it
    worker = WorkerThread(settings, f"g-{uuid.uuid4().hex[:6]}")
    try:
        assert wait_for(lambda: redis_client.get(keys.user(version, "late-user")) is not None, timeout=60)
    finally:
        worker.stop()
        t.close()
        root.close()


def test_corrupt_checkpoint_is_refused_and_rebuilt(settings: Settings, redis_client: redis.Redis) -> None:
    root = Root(settings)
    root.clients.ensure_topics()
    data = _feed(settings)
    t = root.trainer()
    version = t.run_once()
    t.close()
    ckpt = root.data.checkpoint
    ckpt.write_bytes(ckpt.read_bytes()[:-4096])  # a torn write (say, a full disk without fsync)
    code, out, err = encore(settings, "train", "--once")
    assert code == 2 and ("fails its checksum" in err or "cannot be read" in err), err
    assert "encore train --rebuild" in err and "Traceback" not in err
    code, out, err = encore(settings, "train", "--once", "--rebuild")
    assert code == 0, err[-2000:]
    rebuilt = json.loads(out.strip().splitlines()[-1])["published"]
    assert rebuilt != version
    meta = {k.decode(): v for k, v in redis_client.hgetall(keys_for(settings).meta(rebuilt)).items()}
    assert int(meta["n_plays"]) == data.matrix().nnz  # every play of the topic is back
    assert list(ckpt.parent.glob("checkpoint.npz.set-aside-*")), "the damaged file is kept for a post-mortem"
    # A tampered model artifact is never loaded: the track vectors come from Redis instead.
    artifact = root.data.artifact(rebuilt)
    good = root.models().load(rebuilt).model.item_factors_.copy()
    artifact.write_bytes(artifact.read_bytes()[:100])
    again = root.models().load(rebuilt).model.item_factors_
    assert np.allclose(again, good, atol=1e-6)
    root.close()


def test_retrain_searches_hyperparameters_from_the_last_winner(settings: Settings) -> None:
    """ENCORE_TUNE: trials on the holdout, the winner published and recorded; a later search
    (here after a restart) starts from it; between searches the winner is reused as it is."""
    s = settings.with_(tune=True, tune_trials=5, tune_every=2, tune_factors="8,16,24", tune_budget_s=600.0)
    root = Root(s)
    root.clients.ensure_topics()
    _feed(s)
    models = root.models()
    trainer = root.trainer()
    first = trainer.run_once()
    meta = models.text_meta(first)
    tuning = json.loads(meta["tuning"])
    assert len(tuning["trials"]) == 5 and tuning["winner"] == max(tuning["trials"], key=lambda t: t["score"])["params"]
    # The published holdout precision is the winner's trial score: the same model, the same holdout.
    assert float(meta["precision@10"]) == pytest.approx(tuning["score"])
    winner = json.loads(meta["hyperparameters"])
    assert {k: winner[k] for k in tuning["winner"]} == tuning["winner"]
    assert models.load(first).model.factors == winner["factors"] in (8, 16, 24)
    second = trainer.run_once()  # the 2nd retrain of this process: no search
    assert "tuning" not in models.text_meta(second)
    assert json.loads(models.text_meta(second)["hyperparameters"]) == winner
    trainer.close()
    restarted = root.trainer()  # a new trainer process would start here: it searches at once
    third = restarted.run_once()
    trials = json.loads(models.text_meta(third)["tuning"])["trials"]
    assert trials[0]["params"] == {k: winner[k] for k in trials[0]["params"]}  # searched from the winner first
    restarted.close()
    root.close()
