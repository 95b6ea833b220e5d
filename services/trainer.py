"""`encore train`: the batch layer. Durable play matrix → periodic full ALS → versioned publish."""

from __future__ import annotations

import json
import logging
import threading
import time
from pathlib import Path

import numpy as np
import redis
from kafka import KafkaConsumer, TopicPartition
from kafka.structs import OffsetAndMetadata

from core.evaluation import holdout_split, ranking_metrics
from core.events import Limits, PlayEvent, parse_play
from core.recommend import popular_items
from services import kafka_io, model_store
from services.checkpoint import PlayMatrix
from services.config import Settings
from services.confluent_io import UpdatePublisher
from services.engines import Engine, engine
from services.foldin import GROUP as FOLDIN_GROUP
from services.folding import fold_new_tracks, refold_users
from services.history_store import HistoryStore
from services.keys import Keys

log = logging.getLogger(__name__)
GROUP = "encore-trainer"
CATCH_UP_MARGIN_S = 60.0


class GuardRejected(RuntimeError):
    """A new model's holdout precision fell far below the current model's."""


class Trainer:
    """Single trainer instance: owns the checkpoint at `{data_dir}/checkpoint.npz`."""

    def __init__(
        self,
        settings: Settings,
        r: redis.Redis,
        consumer: KafkaConsumer,
        producer: UpdatePublisher,
        eng: Engine,
    ) -> None:
        self.s, self.r, self.consumer, self.producer, self.engine = settings, r, consumer, producer, eng
        self.keys = Keys(settings.key_prefix)
        self.path = Path(settings.data_dir) / "checkpoint.npz"
        self.state = PlayMatrix.load(self.path)
        self.state.check_half_life(settings.decay_half_life_days * 86_400.0)
        self.stop_event = threading.Event()
        self.plays_since_train = 0
        self._assign()

    def _assign(self) -> None:
        self.incarnation = kafka_io.topic_incarnation(self.s.kafka_bootstrap, self.s.plays_topic)
        parts = self.consumer.partitions_for_topic(self.s.plays_topic) or set()
        self.tps = [TopicPartition(self.s.plays_topic, p) for p in sorted(parts)]
        self.consumer.assign(self.tps)
        for tp in self.tps:
            done = self.state.applied(self.incarnation, tp.partition)
            if done >= 0:
                self.consumer.seek(tp, done + 1)
            else:
                self.consumer.seek_to_beginning(tp)

    # ---- ingest ------------------------------------------------------------------
    def ingest(self, seconds: float) -> int:
        """Poll plays for up to `seconds`; returns the number of new plays added."""
        added, deadline = 0, time.monotonic() + seconds
        limits = Limits(now=time.time(), max_future_s=self.s.max_future_s, max_count=self.s.max_count)
        while time.monotonic() < deadline and not self.stop_event.is_set():
            batch = self.consumer.poll(timeout_ms=200, max_records=5000)
            if not batch:
                if seconds <= 0:
                    break
                continue
            for recs in batch.values():
                for m in recs:
                    ev = parse_play(m.value, limits)
                    # Invalid events still advance the offset, with no weight (the fold-in worker
                    # dead-letters them).
                    user, track, w, ts = ("", "", 0.0, 0.0)
                    if isinstance(ev, PlayEvent):
                        user, track, w, ts = ev.user_id, ev.track_id, ev.weight(self.s.min_ms_played), ev.ts
                    if self.state.add(self.incarnation, m.partition, m.offset, user, track, w, ts) and w > 0:
                        added += 1
        self.plays_since_train += added
        return added

    def ingest_to_end(self) -> int:
        """Read `plays` up to the end offsets seen now."""
        end = self.consumer.end_offsets(self.tps)
        added = 0
        while not self.stop_event.is_set():
            if all(self.consumer.position(tp) >= end[tp] for tp in self.tps):
                break
            added += self.ingest(1.0)
        return added

    def checkpoint(self) -> None:
        """Checkpoint durably, then commit the offsets it covers."""
        sec, usec = self.r.time()
        self.state.save(self.path, sec + usec / 1e6)
        offsets = {
            tp: OffsetAndMetadata(self.state.applied(self.incarnation, tp.partition) + 1, "", -1)
            for tp in self.tps
            if self.state.applied(self.incarnation, tp.partition) >= 0
        }
        if offsets:
            self.consumer.commit(offsets)
        log.info(
            "checkpoint: %d users × %d tracks, %d plays",
            len(self.state.user_ids),
            len(self.state.track_ids),
            self.state.matrix().nnz,
        )

    # ---- train + publish -----------------------------------------------------------
    def train_and_publish(self) -> str:
        """Train on the last checkpoint, evaluate, guard, publish, catch up; returns the version."""
        stages: dict[str, float] = {}
        clock = [time.perf_counter()]

        def stage(name: str) -> None:
            now = time.perf_counter()
            stages[name] = round(now - clock[0], 3)
            clock[0] = now

        plays = self.state.training_matrix(self.state.checkpoint_time)
        if plays.nnz == 0:
            raise ValueError("no plays to train on yet")
        train, test = holdout_split(plays, fraction=self.s.holdout_fraction, seed=0)
        stage("prepare")
        model = self.engine.fit(train)
        stage("fit")
        train_s = stages["fit"]
        metrics = ranking_metrics(model.user_factors_, model.item_factors_, train, test, k=10, max_users=2000).as_dict(
            10
        )
        self._guard(metrics["precision@10"])
        stage("evaluate")
        # Published users reflect every play, held-out ones included: warm-started from the
        # trained vectors, a few CG steps suffice (an exact solve of every user costs more than
        # a training iteration).
        model.user_factors_ = model.fold_in(plays, model.item_factors_, start=model.user_factors_)
        stage("fold_in_users")
        version = model_store.new_version()
        artifact = Path(self.s.data_dir) / "models" / f"{version}.npz"
        artifact.parent.mkdir(parents=True, exist_ok=True)
        model.save(
            artifact,
            user_ids=np.array(self.state.user_ids, dtype=str),
            track_ids=np.array(self.state.track_ids, dtype=str),
        )
        stage("artifact")
        meta = {
            "engine": self.engine.name,
            "artifact": str(artifact.resolve()),
            "checkpoint_time": repr(self.state.checkpoint_time),
            "n_plays": plays.nnz,
            "train_seconds": round(train_s, 3),
            "offsets": json.dumps(self.state.offsets),
            "metrics": json.dumps(metrics),
            "popular": json.dumps([self.state.track_ids[i] for i in popular_items(plays, 1000)]),
            **{k: repr(v) for k, v in metrics.items()},
        }
        stage("meta")
        model_store.publish(self.r, self.keys, version, model, self.state.user_ids, self.state.track_ids, meta)
        stage("publish")
        self.catch_up(version)
        self.expire_old_versions()
        stage("catch_up")
        self.r.hset(self.keys.meta(version), "stage_seconds", json.dumps(stages))
        log.info(
            "published %s: precision@10 %.4f ndcg@10 %.4f; seconds per stage %s",
            version,
            metrics["precision@10"],
            metrics["ndcg@10"],
            stages,
        )
        self.plays_since_train = 0
        return version

    def _guard(self, precision: float) -> None:
        current = model_store.current_version(self.r, self.keys)
        if current is None:
            return
        old = self.r.hget(self.keys.meta(current), "precision@10")
        if old is not None and precision < self.s.publish_guard * float(old):
            raise GuardRejected(
                f"new model's holdout precision@10 {precision:.4f} is below "
                f"{self.s.publish_guard} × current {float(old):.4f}; not published"
            )

    def catch_up(self, version: str) -> int:
        """Re-fold users whose histories changed after the checkpoint; fold new tracks."""
        loaded = model_store.load(self.r, self.keys, version)
        since = self.state.checkpoint_time - CATCH_UP_MARGIN_S
        users = [u.decode() for u in self.r.zrangebyscore(self.keys.dirty_users, since, "+inf")]
        store = HistoryStore(self.r, self.keys, FOLDIN_GROUP, self.s.history_cap, self.s.track_listeners_cap)
        for s in range(0, len(users), 5000):
            refold_users(self.r, self.keys, store, loaded, users[s : s + 5000], self.producer, self.s.updates_topic)
        tracks = [t.decode() for t in self.r.smembers(self.keys.new_tracks)]
        fold_new_tracks(
            self.r,
            self.keys,
            loaded,
            tracks,
            self.s.cold_start_min_listeners,
            self.producer,
            self.s.updates_topic,
        )
        self.producer.flush()
        log.info("catch-up: re-folded %d users changed since the checkpoint", len(users))
        return len(users)

    def expire_old_versions(self) -> list[str]:
        """Delete versions superseded more than `version_grace_s` ago (never the current one)."""
        rows = self.r.zrange(self.keys.versions, 0, -1, withscores=True)
        current = model_store.current_version(self.r, self.keys)
        gone = []
        for (v, _), (_, superseded_at) in zip(rows, rows[1:], strict=False):
            name = v.decode()
            if name != current and time.time() - superseded_at > self.s.version_grace_s:
                model_store.delete_version(self.r, self.keys, name)
                gone.append(name)
        return gone

    # ---- loops ---------------------------------------------------------------------
    def run_once(self) -> str:
        self.ingest_to_end()
        self.checkpoint()
        return self.train_and_publish()

    def run(self) -> None:
        last_train = 0.0 if model_store.current_version(self.r, self.keys) is None else time.time()
        last_ckpt = time.time()
        while not self.stop_event.is_set():
            self.ingest(1.0)
            now = time.time()
            due = now - last_train >= self.s.retrain_interval_s or (
                self.s.retrain_min_new_plays and self.plays_since_train >= self.s.retrain_min_new_plays
            )
            if now - last_ckpt >= 30 or (due and self.state.pending):
                self.checkpoint()
                last_ckpt = now
            if due and self.state.matrix().nnz:
                try:
                    self.train_and_publish()
                except GuardRejected as exc:
                    log.error("%s", exc)
                last_train = time.time()

    def close(self) -> None:
        self.stop_event.set()


def build(settings: Settings, engine_name: str = "local") -> Trainer:
    kafka_io.ensure_topics(settings)
    r = redis.Redis.from_url(settings.redis_url, socket_timeout=30)
    consumer = kafka_io.consumer(settings.kafka_bootstrap, GROUP)
    producer = UpdatePublisher(settings.kafka_bootstrap)
    return Trainer(settings, r, consumer, producer, engine(engine_name, settings))
