"""`encore foldin`: the speed layer. Plays → histories → fresh user/track vectors, exactly once.

Per micro-batch: parse; apply histories and offsets in one Lua step (replays are skipped);
hand dead letters to the DLQ; re-solve pending users against the frozen track factors;
flush the producer; only then commit the Kafka offsets.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Callable
from typing import Any

import redis
from kafka import ConsumerRebalanceListener, KafkaConsumer, KafkaProducer, TopicPartition
from kafka.errors import KafkaError
from kafka.structs import OffsetAndMetadata

from core.events import InvalidEvent, Limits, parse_play
from services import kafka_io, metrics
from services.config import Settings
from services.folding import fold_new_tracks, refold_users
from services.history_store import HistoryStore, Record, dead_letter_json
from services.keys import Keys
from services.model_store import LoadedModel, current_version, load

log = logging.getLogger(__name__)
GROUP = "encore-foldin"
PENDING_PER_STEP = 5000


class _Rebalance(ConsumerRebalanceListener):
    def __init__(self, worker: FoldInWorker) -> None:
        self.worker = worker

    def on_partitions_revoked(self, revoked: Any) -> None:
        log.info("partitions revoked: %s", sorted(tp.partition for tp in revoked))

    def on_partitions_assigned(self, assigned: Any) -> None:
        self.worker.on_assigned(list(assigned))


class FoldInWorker:
    """One member of the fold-in consumer group."""

    def __init__(
        self,
        settings: Settings,
        r: redis.Redis,
        consumer: KafkaConsumer,
        producer: KafkaProducer,
        group: str = GROUP,
    ) -> None:
        self.s, self.r, self.consumer, self.producer = settings, r, consumer, producer
        self.keys = Keys(settings.key_prefix)
        self.store = HistoryStore(r, self.keys, group, settings.history_cap, settings.track_listeners_cap)
        self.model: LoadedModel | None = None
        self.incarnation = ""
        self.assignment_changed = True
        self.stop_event = threading.Event()
        consumer.subscribe([settings.plays_topic], listener=_Rebalance(self))

    # ---- partition assignment ----------------------------------------------------
    # kafka-python runs rebalance callbacks on its IO thread, where blocking calls are not
    # allowed: the callback only flags the change and the loop does the work.
    def on_assigned(self, assigned: list[TopicPartition]) -> None:
        self.assignment_changed = True
        log.info("assigned partitions %s", sorted(tp.partition for tp in assigned))

    def _check_incarnation(self) -> None:
        if self.assignment_changed or not self.incarnation:
            self.incarnation = kafka_io.topic_incarnation(self.s.kafka_bootstrap, self.s.plays_topic)
            self.assignment_changed = False
            log.info("plays topic incarnation %s", self.incarnation)

    # ---- model -------------------------------------------------------------------
    def refresh_model(self) -> None:
        version = current_version(self.r, self.keys)
        if version is None or (self.model and self.model.version == version):
            return
        first = self.model is None
        self.model = load(self.r, self.keys, version)
        log.info("fold-in now against model %s (%d tracks)", version, len(self.model.track_ids))
        if not first:
            since = float(self.model.meta.get("checkpoint_time", "0")) - 5.0
            users = [u.decode() for u in self.r.zrangebyscore(self.keys.dirty_users, since, "+inf")]
            self.store.queue_users(users)
        new = [t.decode() for t in self.r.smembers(self.keys.new_tracks)]
        known = [t for t in new if t in self.model.track_index]
        if known:
            self.r.srem(self.keys.new_tracks, *known)
        self._fold_tracks([t for t in new if t not in self.model.track_index])

    def _fold_tracks(self, tracks: list[str]) -> None:
        if self.model and tracks:
            done = fold_new_tracks(
                self.r,
                self.keys,
                self.model,
                tracks,
                self.s.cold_start_min_listeners,
                self.producer,
                self.s.updates_topic,
            )
            metrics.TRACKS_FOLDED.inc(len(done))

    # ---- one micro-batch -----------------------------------------------------------
    def to_records(self, messages: list[Any]) -> list[Record]:
        limits = Limits(now=time.time(), max_future_s=self.s.max_future_s, max_count=self.s.max_count)
        out = []
        for m in messages:
            ev = parse_play(m.value, limits)
            if isinstance(ev, InvalidEvent):
                source = f"{m.topic}/{m.partition}/{m.offset}"
                out.append(Record(m.partition, m.offset, "d", extra=dead_letter_json(ev.raw, ev.reason, source)))
                continue
            w = ev.weight(self.s.min_ms_played)
            if w <= 0:
                out.append(Record(m.partition, m.offset, "n"))
                continue
            new = "new" if self.model is None or ev.track_id not in self.model.track_index else ""
            out.append(Record(m.partition, m.offset, "p", ev.user_id, ev.track_id, w, ev.ts, new))
        return out

    def process(self, messages: list[Any]) -> None:
        """Apply, fold, flush, then commit; raises on Redis/broker errors (caller retries)."""
        self.refresh_model()
        self._check_incarnation()
        records = self.to_records(messages)
        applied = self.store.apply(self.incarnation, records)
        metrics.EVENTS_APPLIED.inc(applied)
        metrics.EVENTS_SKIPPED.inc(len(records) - applied)
        self.flush_dead_letters()
        self.fold_pending()
        if self.model is not None:
            self._fold_tracks(sorted({r.track for r in records if r.kind == "p" and r.extra == "new"}))
        self.producer.flush()
        self.commit(messages)

    def flush_dead_letters(self) -> None:
        entries = self.r.lrange(self.keys.pending_dlq, 0, -1)
        for raw in entries:
            d = json.loads(raw)
            self.producer.send(
                self.s.dlq_topic,
                value=d["raw"].encode("latin-1"),
                headers=[("error", d["error"].encode()), ("source", d["source"].encode())],
            )
        if entries:
            self.producer.flush()
            self.r.ltrim(self.keys.pending_dlq, len(entries), -1)
            metrics.DEAD_LETTERS.inc(len(entries))

    def fold_pending(self) -> None:
        if self.model is None:
            return
        pending = self.store.pending(PENDING_PER_STEP)
        if pending:
            refold_users(
                self.r,
                self.keys,
                self.store,
                self.model,
                [u for u, _ in pending],
                self.producer,
                self.s.updates_topic,
            )
            self.producer.flush()
            self.store.mark_done(pending)
            metrics.USERS_FOLDED.inc(len(pending))

    def commit(self, messages: list[Any]) -> None:
        last: dict[TopicPartition, int] = {}
        for m in messages:
            tp = TopicPartition(m.topic, m.partition)
            last[tp] = max(last.get(tp, -1), m.offset)
        if last:
            self.consumer.commit({tp: OffsetAndMetadata(o + 1, "", -1) for tp, o in last.items()})

    # ---- loop ----------------------------------------------------------------------
    def run(self, on_batch: Callable[[int], None] | None = None) -> None:
        backoff = 0.5
        while not self.stop_event.is_set():
            batch = self.consumer.poll(timeout_ms=self.s.batch_max_ms, max_records=self.s.batch_max_events)
            messages = [m for recs in batch.values() for m in recs]
            metrics.EVENTS_IN.inc(len(messages))
            while not self.stop_event.is_set():
                t0 = time.perf_counter()
                try:
                    if messages or self.model is None or self.store.pending(1):
                        self.process(messages)
                    backoff = 0.5
                    metrics.BATCH_SECONDS.observe(time.perf_counter() - t0)
                    break
                except (redis.RedisError, KafkaError, OSError) as exc:
                    metrics.RETRIES.inc()
                    log.warning(
                        "batch of %d failed (%s: %s); retrying in %.1fs, nothing committed",
                        len(messages),
                        type(exc).__name__,
                        exc,
                        backoff,
                    )
                    self.stop_event.wait(backoff)
                    backoff = min(backoff * 2, 10.0)
            if on_batch and messages:
                on_batch(len(messages))

    def close(self) -> None:
        self.stop_event.set()


def build(settings: Settings, group: str = GROUP) -> FoldInWorker:
    """Composition root of one worker."""
    kafka_io.ensure_topics(settings)
    r = redis.Redis.from_url(settings.redis_url, socket_timeout=10, socket_connect_timeout=5, health_check_interval=10)
    consumer = kafka_io.consumer(
        settings.kafka_bootstrap, group, max_poll_records=settings.batch_max_events, fetch_max_bytes=64 * 2**20
    )
    # Vector updates are idempotent (the latest wins): batch them harder than plays.
    producer = kafka_io.producer(
        settings.kafka_bootstrap, linger_ms=20, batch_size=1 << 20, max_in_flight_requests_per_connection=5
    )
    return FoldInWorker(settings, r, consumer, producer, group)
