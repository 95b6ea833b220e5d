"""The speed layer's decisions for one micro-batch, over its ports (no Kafka or Redis here).

Two steps. `ingest`: apply histories with their offsets in one atomic step (a replay is
skipped), which also queues the batch's users for a re-solve in the store; hand the dead letters
recorded in the apply to the sink (last: a letter handed over is delivered even if a later step
fails and the batch is retried); flush; only then drop them from the durable queue. The caller
commits Kafka offsets after `ingest` returns: what they cover is durable, queued work included.
`resolve_pending`: re-solve queued users and cold-start new tracks, announce them, flush, and
only then drop them from the queue. The two may run on two threads (the worker's default), so a
batch's Lua apply in Redis overlaps the previous batch's solve in Python. A crash anywhere
repeats only idempotent work (re-solving, re-announcing) and never loses or double-counts a play.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Collection, Mapping, MutableMapping
from dataclasses import dataclass

from core.events import Limits
from core.messages import DeadLetter
from services.infra.lifecycle import freeze_long_lived
from services.infra.model_store import LoadedModel
from services.infra.settings import Settings
from services.infra.stage_timer import stage
from services.speed.ports import HistoryStore, ModelStore, UpdateSink
from services.speed.records import EraseRecord, Message, PlayRecord, Record, to_records, without_erased_plays
from services.speed.resolve import resolve_new_tracks, resolve_users

log = logging.getLogger(__name__)
# Users per re-solve step. Under a backlog every step is full and the loop waits for one step
# per batch of up to ENCORE_BATCH_MAX_EVENTS plays: a step of several batches' size re-solves a
# user who played in several of them once, and pays each call's fixed costs once. 20,000 against
# 5,000, with batches of 5,000 (bench.freshness, throughput, alternated): one Redis
# 39,077-45,235 against 33,490-40,259 plays/s (3 triples), Redis Cluster 30,770 / 31,240
# against 24,782 / 28,126; p99 at 5,000 plays/s unchanged (95-105 against 106-162 ms: light
# load never fills a step).
PENDING_PER_STEP = 20_000
# Catch-up after a new model re-solves users whose history changed since this long before the
# trainer's checkpoint: the trainer reads `plays` on its own and may lag the speed layer.
CATCH_UP_MARGIN_S = 60.0


@dataclass(frozen=True)
class Outcome:
    """What one step did (for metrics and tests)."""

    records: int = 0
    applied: int = 0
    dead_letters: int = 0
    users_resolved: int = 0
    tracks_resolved: int = 0


class SpeedLayer:
    """Histories → fresh user and track vectors against the current model's frozen factors.

    The single owner of catch-up: when it first sees a model version it queues every user whose
    history changed after that version's checkpoint (less a margin), so a new version never
    serves staler vectors than the one before it.
    """

    def __init__(self, settings: Settings, histories: HistoryStore, models: ModelStore, sink: UpdateSink) -> None:
        self.s, self.histories, self.models, self.sink = settings, histories, models, sink
        self.model: LoadedModel | None = None
        # held by a re-solve step and by erasures: a vector solved from a history read before
        # an erasure must not be written after it
        self.erasing = threading.RLock()
        self._new_lock, self._model_lock = threading.Lock(), threading.Lock()
        self._new_tracks: set[str] = set()  # new tracks applied, for the next re-solve step's cold start
        self.last_full = False  # the last re-solve step took a full `limit`: more are queued

    def refresh_model(self) -> bool:
        """Load the current version if it changed; returns whether it did."""
        with self._model_lock:
            return self._refresh_model()

    def _refresh_model(self) -> bool:
        version = self.models.current_version()
        if version is None or (self.model is not None and self.model.version == version):
            return False
        self.model = self.models.load(version)
        if len(self.model.track_ids):
            self.model.model.warm_fold_in(self.model.model.item_factors_, self.model.item_gram)
        freeze_long_lived()
        log.info("fold-in now against model %s (%d tracks)", version, len(self.model.track_ids))
        since = float(self.model.meta.get("checkpoint_time", "0")) - CATCH_UP_MARGIN_S
        changed = self.histories.changed_since(since)
        self.histories.queue_users(changed)
        log.info("catch-up: %d users changed since the model's checkpoint queued for a re-solve", len(changed))
        new = self.histories.new_tracks()
        self.histories.forget_new_tracks([t for t in new if t in self.model.track_index])
        self._cold_start([t for t in new if t not in self.model.track_index])
        return True

    def _cold_start(self, tracks: list[str]) -> int:
        if self.model is None or not tracks:
            return 0
        return len(
            resolve_new_tracks(
                self.histories, self.models, self.model, tracks, self.s.cold_start_min_listeners, self.sink
            )
        )

    def _erase(self, incarnation: str, records: list[Record]) -> list[Record]:
        """Erase records first, in order, then the batch without the erased users' earlier plays.
        Each erasure is fenced by its own offset, so a replayed batch repeats only what its
        fence has not passed, and plays after an erase record start a new history."""
        erasures = [r for r in records if isinstance(r, EraseRecord)]
        if not erasures:
            return records
        with self.erasing:
            versions = self.models.kept_versions()
            for e in erasures:
                if self.histories.erase(incarnation, e.partition, e.offset, e.user, versions, hold=False):
                    log.info("erased user %r (erase record %d/%d)", e.user, e.partition, e.offset)
        return without_erased_plays(records)

    def _send_letters(
        self, dead: Mapping[int, list[DeadLetter]], done: Mapping[int, int]
    ) -> tuple[int, dict[int, int]]:
        """Hand the letters past `done[partition]` to the sink: (count, last offset per partition)."""
        sent, last = 0, dict[int, int]()
        for part, letters in dead.items():
            for d in letters:
                if d.offset > done.get(part, -1):
                    self.sink.dead_letter(d)
                    sent += 1
                    last[part] = d.offset
        return sent, last

    def has_work(self) -> bool:
        """Pending re-solves, or no model loaded yet (checked on idle polls)."""
        return self.model is None or bool(self.histories.pending(1)[0])

    def handle(
        self,
        messages: list[Message],
        incarnation: str,
        expected: Mapping[int, int] | None = None,
        owned: Collection[int] = (),
        letters_done: MutableMapping[int, int] | None = None,
    ) -> Outcome:
        """One micro-batch made durable and its users re-solved, on the calling thread: `ingest`
        then `resolve_pending` (see both; the worker may run the second on a thread of its own)."""
        got = self.ingest(messages, incarnation, expected, owned, letters_done)
        users, tracks = self.resolve_pending(refresh=False)  # `ingest` just looked
        return Outcome(got.records, got.applied, got.dead_letters, users, tracks)

    def ingest(
        self,
        messages: list[Message],
        incarnation: str,
        expected: Mapping[int, int] | None = None,
        owned: Collection[int] = (),
        letters_done: MutableMapping[int, int] | None = None,
    ) -> Outcome:
        """Apply one micro-batch and hand its dead letters over; raises on storage or broker errors
        (the caller retries it whole), and StateRewoundError, before anything is written, when
        the store's offsets fell below `expected` (the caller replays those partitions from the
        stored offsets). Its users are queued for `resolve_pending` in the same atomic step.
        `owned`: the partitions this worker is assigned, whose queued dead letters it sends,
        except those at or below `letters_done[partition]` (already in the dead-letter topic: a
        replay after Redis lost state records them again). `letters_done` is raised as soon as
        the sink's flush returns, before the letters are settled: if settling fails (Redis went
        away), the retry must not send them twice."""
        self.refresh_model()
        s = self.s
        limits = Limits(now=time.time(), max_future_s=s.max_future_s, max_count=s.max_count)
        model = self.model
        known = model.track_index if model is not None else {}
        with stage("decode"):
            records = to_records(messages, limits, s.min_ms_played, known)
        records = self._erase(incarnation, records)
        with stage("apply"):
            applied = self.histories.apply(incarnation, records, expected)
        with self._new_lock:
            self._new_tracks.update(r.track for r in records if isinstance(r, PlayRecord) and r.new_track)
        with stage("dead_letters"):
            dead = self.histories.dead_letters(set(owned) | {r.partition for r in records})
        # Letters go to the sink after the last Redis step before their settling: a letter
        # handed to the producer is delivered even if this attempt fails later, and the retry,
        # not knowing that, would send it again.
        done = letters_done if letters_done is not None else {}
        sent, last_letter = self._send_letters(dead, done)
        if sent:
            with stage("produce"):
                self.sink.flush(updates=False)  # the re-solve thread flushes its own
        for part, off in last_letter.items():
            done[part] = max(done.get(part, -1), off)
        with stage("settle"):
            self.histories.settle({p: len(v) for p, v in dead.items()}, None)
        return Outcome(len(records), applied, sent)

    def resolve_pending(self, limit: int = PENDING_PER_STEP, refresh: bool = True) -> tuple[int, int]:
        """Re-solve up to `limit` queued users and the new tracks seen since the last call, announce
        them, and only then drop them from the durable queue: (users, tracks) re-solved. Safe to
        run on its own thread beside `ingest`: the queue is in the store, a crash repeats only
        idempotent work, and an erasure waits for a step in flight (no vector is written back
        for a user erased while it was being solved)."""
        with self.erasing:
            if refresh:  # a step on its own thread looks for a new version itself
                self.refresh_model()
            model = self.model
            with self._new_lock:
                new, self._new_tracks = sorted(self._new_tracks), set()
            if model is None:
                return 0, 0
            try:
                with stage("pending"):
                    users, upto = self.histories.pending(limit)
                resolve_users(self.histories, self.models, model, users, self.sink)
                with stage("cold_start"):
                    tracks = self._cold_start(new)
                with stage("produce"):
                    self.sink.flush(letters=False)
            except BaseException:
                with self._new_lock:  # tried again at the next step
                    self._new_tracks.update(new)
                raise
            if users:
                with stage("settle"):
                    self.histories.settle({}, upto)
            self.last_full = len(users) >= limit
            return len(users), tracks
