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
from confluent_kafka import Consumer, KafkaException, Message
from kafka.errors import KafkaError

from core.events import InvalidEvent, Limits, parse_play
from services import confluent_io, kafka_io, metrics
from services.config import Settings
from services.confluent_io import UpdatePublisher
from services.folding import fold_new_tracks, refold_users
from services.history_store import HistoryStore, Record, dead_letter_json
from services.keys import Keys
from services.model_store import LoadedModel, current_version, load

log = logging.getLogger(__name__)
GROUP = "encore-foldin"
PENDING_PER_STEP = 5000


class FoldInWorker:
    """One member of the fold-in consumer group."""

    def __init__(
        self,
        settings: Settings,
        r: redis.Redis,
        consumer: Consumer,
        producer: UpdatePublisher,
        group: str = GROUP,
    ) -> None:
        self.s, self.r, self.consumer, self.producer = settings, r, consumer, producer
        self.keys = Keys(settings.key_prefix)
        self.store = HistoryStore(r, self.keys, group, settings.history_cap, settings.track_listeners_cap)
        self.model: LoadedModel | None = None
        self.incarnation = ""
        self.assignment_changed = True
        self.stop_event = threading.Event()
        self._lag_at = 0.0
        consumer.subscribe([settings.plays_topic], on_assign=self._on_assign, on_revoke=self._on_revoke)

    # ---- partition assignment ----------------------------------------------------
    # librdkafka calls these inside consume(), between two batches: a batch is always
    # committed (or abandoned uncommitted) before its partitions can move.
    def _on_assign(self, _c: Consumer, assigned: list[Any]) -> None:
        self.assignment_changed = True
        log.info("assigned partitions %s", sorted(tp.partition for tp in assigned))

    def _on_revoke(self, _c: Consumer, revoked: list[Any]) -> None:
        log.info("partitions revoked: %s", sorted(tp.partition for tp in revoked))

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
    def to_records(self, messages: list[Message]) -> list[Record]:
        limits = Limits(now=time.time(), max_future_s=self.s.max_future_s, max_count=self.s.max_count)
        out = []
        index = self.model.track_index if self.model is not None else {}
        for m in messages:
            part, off = m.partition(), m.offset()
            ev = parse_play(m.value() or b"", limits)
            if isinstance(ev, InvalidEvent):
                source = f"{m.topic()}/{part}/{off}"
                out.append(Record(part, off, "d", extra=dead_letter_json(ev.raw, ev.reason, source)))
                continue
            w = ev.weight(self.s.min_ms_played)
            if w <= 0:
                out.append(Record(part, off, "n"))
                continue
            new = "" if ev.track_id in index else "new"
            out.append(Record(part, off, "p", ev.user_id, ev.track_id, w, ev.ts, new))
        return out

    def process(self, messages: list[Message]) -> None:
        """Apply, fold, flush, settle, then commit; raises on Redis/broker errors (caller retries).

        Dead letters and re-solved users leave their Redis queues only after the producer has
        flushed, and the Kafka offsets are committed last: a crash anywhere repeats work that
        is idempotent (re-solving, re-announcing) and never loses or double-counts a play.
        """
        self.refresh_model()
        self._check_incarnation()
        records = self.to_records(messages)
        applied = self.store.apply(self.incarnation, records)
        metrics.EVENTS_APPLIED.inc(applied)
        metrics.EVENTS_SKIPPED.inc(len(records) - applied)
        dead = self.send_dead_letters()
        folded, upto = self.fold_pending()
        if self.model is not None:
            self._fold_tracks(sorted({r.track for r in records if r.kind == "p" and r.extra == "new"}))
        self.producer.flush()
        if dead or folded:
            pipe = self.r.pipeline(transaction=False)
            if dead:
                pipe.ltrim(self.keys.pending_dlq, dead, -1)
            if folded:
                self.store.mark_done(upto, pipe)
            pipe.execute()
        metrics.DEAD_LETTERS.inc(dead)
        metrics.USERS_FOLDED.inc(folded)
        self.commit(messages)

    def send_dead_letters(self) -> int:
        """Produce the dead letters queued by `apply`; returns how many (trimmed after flush)."""
        entries = self.r.lrange(self.keys.pending_dlq, 0, -1)
        for raw in entries:
            d = json.loads(raw)
            self.producer.send(
                self.s.dlq_topic,
                value=d["raw"].encode("latin-1"),
                headers=[("error", d["error"].encode()), ("source", d["source"].encode())],
            )
        return len(entries)

    def fold_pending(self) -> tuple[int, float]:
        """Re-solve and announce pending users; returns (count, pending score they cover)."""
        if self.model is None:
            return 0, 0.0
        users, upto = self.store.pending(PENDING_PER_STEP)
        if users:
            refold_users(self.r, self.keys, self.store, self.model, users, self.producer, self.s.updates_topic)
        return len(users), upto

    def commit(self, messages: list[Message]) -> None:
        last: dict[int, int] = {}
        for m in messages:
            last[m.partition()] = max(last.get(m.partition(), -1), m.offset())
        confluent_io.commit(self.consumer, self.s.plays_topic, last)

    def update_lag(self) -> None:
        """Messages behind the end of the assigned partitions, at most once a second."""
        if time.monotonic() - self._lag_at < 1.0:
            return
        self._lag_at = time.monotonic()
        lag = 0
        for tp in self.consumer.position(self.consumer.assignment()):
            _low, high = self.consumer.get_watermark_offsets(tp, cached=True)  # updated by every fetch
            lag += max(0, high - tp.offset) if tp.offset >= 0 else high
        metrics.LAG.set(lag)

    # ---- loop ----------------------------------------------------------------------
    def run(self, on_batch: Callable[[int], None] | None = None) -> None:
        backoff = 0.5
        while not self.stop_event.is_set():
            raw = self.consumer.consume(num_messages=self.s.batch_max_events, timeout=self.s.batch_max_ms / 1000)
            messages = confluent_io.data_messages(raw)
            metrics.EVENTS_IN.inc(len(messages))
            while not self.stop_event.is_set():
                t0 = time.perf_counter()
                try:
                    if messages or self.model is None or self.store.pending(1)[0]:
                        self.process(messages)
                    self.update_lag()
                    backoff = 0.5
                    metrics.BATCH_SECONDS.observe(time.perf_counter() - t0)
                    break
                except (redis.RedisError, KafkaError, KafkaException, OSError) as exc:
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
        """Ask the loop to stop after the current batch."""
        self.stop_event.set()

    def shutdown(self) -> None:
        """Leave the group and flush the producer (after `run` has returned)."""
        self.consumer.close()
        self.producer.close()


def build(settings: Settings, group: str = GROUP) -> FoldInWorker:
    """Composition root of one worker."""
    kafka_io.ensure_topics(settings)
    r = redis.Redis.from_url(settings.redis_url, socket_timeout=10, socket_connect_timeout=5, health_check_interval=10)
    consumer = confluent_io.consumer(settings.kafka_bootstrap, group)
    return FoldInWorker(settings, r, consumer, UpdatePublisher(settings.kafka_bootstrap), group)
