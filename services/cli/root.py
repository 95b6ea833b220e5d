"""The composition root: every client and long-running component is built here, from Settings.

Commands, the uvicorn worker factory, tests and benches all go through `Root`, so one timeout
and retry policy (`services.infra.clients`) reaches every Redis and Kafka client, and nothing
connects before a command asks for it.
"""

from __future__ import annotations

import functools
import threading
from collections.abc import Callable
from typing import Any, TypeVar, cast

import redis
from fastapi import FastAPI
from kafka import KafkaProducer
from redis.cluster import RedisCluster

from core.catalogue import Catalogue, TrackInfo
from core.experiments import Experiment
from services.batch.engines import engine
from services.batch.ingest import Ingest
from services.batch.janitor import VersionJanitor
from services.batch.retrain import Retrainer
from services.batch.trainer import GROUP as TRAINER_GROUP
from services.batch.trainer import Trainer
from services.infra.checked_files import set_aside
from services.infra.clients import Clients
from services.infra.data_dir import DataDir
from services.infra.keys import Keys
from services.infra.model_store import RedisModelStore
from services.infra.rdkafka import READER_FETCH_WAIT_MS, KafkaUpdateSink, UpdatePublisher
from services.infra.series import SeriesRecorder
from services.infra.settings import Settings
from services.infra.status_board import StatusBoard
from services.serving.api import create_app
from services.serving.catalogue_feed import CatalogueFeed
from services.serving.follower import UpdateFollower
from services.serving.impressions import ImpressionLog
from services.serving.snapshots import SnapshotBuilder
from services.speed.catalogue_sync import GROUP as CATALOGUE_GROUP
from services.speed.catalogue_sync import CatalogueSync
from services.speed.cluster_history_store import ClusterHistoryStore
from services.speed.erasure import Eraser
from services.speed.experiment_join import GROUP as EXPERIMENT_GROUP
from services.speed.experiment_join import ExperimentJoin
from services.speed.history_store import RedisHistoryStore
from services.speed.pipeline import SpeedLayer
from services.speed.worker import GROUP as FOLDIN_GROUP
from services.speed.worker import FoldInWorker

T = TypeVar("T")
STARTUP_PATIENCE_S = 30.0  # a component started beside Redis waits this long for it to answer


class Root:
    """Builds Encore's parts for one process; `close` releases the shared Redis client."""

    def __init__(self, settings: Settings, patience_s: float = 0.0) -> None:
        """`patience_s`: how long a long-running component waits at start for Redis to answer
        whether it is a cluster (commands like `status` answer at once instead)."""
        self.settings = settings
        self.clients = Clients(settings, patience_s=patience_s)
        self._redis: redis.Redis | None = None

    @property
    def keys(self) -> Keys:
        return self.clients.keys

    @property
    def redis(self) -> redis.Redis:
        """The process's shared synchronous Redis client (thread-safe connection pool)."""
        if self._redis is None:
            self._redis = self.clients.redis()
        return self._redis

    @property
    def data(self) -> DataDir:
        return DataDir.of(self.settings.data_dir)

    def models(self) -> RedisModelStore:
        return RedisModelStore(self.redis, self.keys)

    def history_store(self, group: str = FOLDIN_GROUP) -> RedisHistoryStore | ClusterHistoryStore:
        """Histories on one Redis, or bucketed by hash tag on a Redis Cluster."""
        s = self.settings
        if self.clients.cluster:
            rc = cast(RedisCluster, self.redis)
            return ClusterHistoryStore(rc, self.keys, group, s.history_cap, s.track_listeners_cap)
        return RedisHistoryStore(self.redis, self.keys, group, s.history_cap, s.track_listeners_cap)

    def board(self) -> StatusBoard:
        return StatusBoard(self.redis, self.keys)

    def server_time(self) -> float:
        sec, usec = self.redis.time()
        return float(sec) + usec / 1e6

    # ---- components ----------------------------------------------------------------
    def foldin_worker(self, group: str = FOLDIN_GROUP) -> FoldInWorker:
        s = self.settings
        self.clients.ensure_topics()
        sink = KafkaUpdateSink(self.clients.update_publisher(), s.updates_topic, s.dlq_topic)
        layer = SpeedLayer(s, self.history_store(group), self.models(), sink)
        consumer = self.clients.group_consumer(group)
        return FoldInWorker(
            s,
            layer,
            consumer,
            sink,
            lambda: self.clients.topic_incarnation(s.plays_topic),
            self.board(),
            group,
            self.clients.dead_letters_produced,
            SeriesRecorder(self.redis, self.keys),
            small_batches_here=self.clients.cluster,
        )

    def catalogue_sync(self) -> CatalogueSync:
        s = self.settings
        self.clients.ensure_topics()
        return CatalogueSync(
            self.redis,
            self.keys,
            self.clients.group_consumer(CATALOGUE_GROUP, READER_FETCH_WAIT_MS),  # a low-rate topic
            self.clients.update_publisher(),
            s.tracks_topic,
            s.tracks_dlq_topic,
        )

    def experiment_join(self, group: str = EXPERIMENT_GROUP) -> ExperimentJoin:
        s = self.settings
        self.clients.ensure_topics()
        topics = (s.impressions_topic, s.plays_topic)
        return ExperimentJoin(
            self.redis,
            self.keys,
            self.clients.group_consumer(group, READER_FETCH_WAIT_MS),  # joins over minutes
            *topics,
            {t: self.clients.topic_incarnation(t) for t in topics},
            s.join_window_s,
            s.min_ms_played,
        )

    def trainer(self, engine_name: str = "local", rebuild: bool = False, candidate: bool = False) -> Trainer:
        """The trainer; `rebuild` first sets the checkpoint aside so the play matrix is rebuilt
        from what the plays topic still holds (a corrupt or lost checkpoint)."""
        s = self.settings
        self.clients.ensure_topics()
        if rebuild:
            set_aside(self.data.checkpoint)
        stop = threading.Event()
        consumer = self.clients.assigned_consumer(TRAINER_GROUP)
        incarnation = self.clients.topic_incarnation(s.plays_topic)
        board = self.board()

        ingest = Ingest(
            s,
            consumer,
            self.data.checkpoint,
            incarnation,
            self.server_time,
            stop,
            functools.partial(board.report_gap, TRAINER_GROUP),
            lambda: self.clients.topic_incarnation(s.plays_topic),
        )
        models = self.models()
        retrainer = Retrainer(s, engine(engine_name, s), models)
        experiment = Experiment.parse(s.experiment)
        pinned = [a for a in experiment.arm_names if a not in ("current", "candidate")] if experiment else []
        janitor = VersionJanitor(models, self.data, s.version_grace_s, pinned)
        return Trainer(s, ingest, retrainer, janitor, models, consumer, stop, board, candidate)

    def follower(self, follow_updates: bool = True) -> UpdateFollower:
        models = self.models()

        def open_reader():  # type: ignore[no-untyped-def]
            self.clients.ensure_topics()
            return self.clients.topic_reader(self.settings.updates_topic)

        def open_catalogue():  # type: ignore[no-untyped-def]
            self.clients.ensure_topics()
            return self.clients.topic_reader(self.settings.tracks_topic)

        return UpdateFollower(
            SnapshotBuilder(self.settings, models),
            models,
            open_reader if follow_updates else None,
            self.board().replica_heartbeat,
            CatalogueFeed(Catalogue(), open_catalogue) if follow_updates else None,
            Experiment.parse(self.settings.experiment),
        )

    def serving_app(self, follow: bool = True) -> tuple[FastAPI, UpdateFollower]:
        """The HTTP app and the follower it reads; `follow=False` leaves the follower to the caller."""
        follower = self.follower()
        app = create_app(
            self.settings,
            follower,
            self.clients.aio_redis,
            follow=follow,
            publish_track=self.track_publisher(),
            forget_user=self.forget_user(),
            impressions=self.impression_log(),
            lean_factory=self.clients.lean_redis,
        )
        return app, follower

    def impression_log(self) -> ImpressionLog | None:
        """Where personal answers are logged (None with ENCORE_LOG_IMPRESSIONS off)."""
        s = self.settings
        if not s.log_impressions:
            return None
        experiment = Experiment.parse(s.experiment)

        def make() -> UpdatePublisher:
            self.clients.ensure_topics()
            # Batches of 100 ms: nothing waits for an impression, and the producer's thread then
            # wakes ten times a second rather than with every request (it shares the cores).
            return self.clients.update_publisher(**{"linger.ms": 100})

        return ImpressionLog(s.impressions_topic, experiment.name if experiment else None, make)

    def eraser(self, group: str = FOLDIN_GROUP) -> Eraser:
        """Erasures fenced by the offsets of fold-in group `group`."""
        s = self.settings
        self.clients.ensure_topics()
        return Eraser(
            self.clients.producer(),
            s.plays_topic,
            self.history_store(group),
            self.models(),
            lambda: self.clients.topic_incarnation(s.plays_topic),
            self.server_time,
        )

    def forget_user(self) -> Callable[[str], dict[str, Any]]:
        """`Eraser.forget`, with the eraser made on first use (serving connects nothing early)."""
        eraser = _once(self.eraser)
        return lambda user_id: eraser().forget(user_id).to_dict()

    def track_publisher(self) -> Callable[[str, TrackInfo], None]:
        """Writes one catalogue entry to the tracks topic and waits for the broker's acknowledgement
        (the producer is made on first use)."""

        def make() -> KafkaProducer:
            self.clients.ensure_topics()
            return self.clients.producer()

        producer = _once(make)

        def publish(track_id: str, info: TrackInfo) -> None:
            producer().send(self.settings.tracks_topic, key=track_id.encode(), value=info.encode()).get(timeout=15)

        return publish

    def close(self) -> None:
        if self._redis is not None:
            self._redis.close()
            self._redis = None


def _once(make: Callable[[], T]) -> Callable[[], T]:
    """`make()` on the first call (one caller at a time), the same object on every later one."""
    made: list[T] = []
    lock = threading.Lock()

    def get() -> T:
        with lock:
            if not made:
                made.append(make())
            return made[0]

    return get
