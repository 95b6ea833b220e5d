"""The speed layer's decisions for one micro-batch, over its ports (no Kafka or Redis here).

Order, and why: apply histories with their offsets in one atomic step (a replay is skipped);
re-solve pending users and cold-start tracks; hand the dead letters recorded in the apply to the
sink (last: a letter handed over is delivered even if a later step fails and the batch is
retried); flush the sink; only then drop the settled work from the durable queues. The caller
commits Kafka offsets after `handle` returns. A crash anywhere repeats only idempotent work
(re-solving, re-announcing) and never loses or double-counts a play.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Collection, Mapping, MutableMapping
from dataclasses import dataclass
from typing import Any

from core.events import Limits
from core.messages import DeadLetter
from services.infra.model_store import LoadedModel
from services.infra.settings import Settings
from services.infra.stage_timer import stage
from services.speed.ports import HistoryStore, ModelStore, UpdateSink
from services.speed.records import EraseRecord, Message, PlayRecord, Record, to_records, without_erased_plays
from services.speed.resolve import resolve_new_tracks, resolve_users

log = logging.getLogger(__name__)
PENDING_PER_STEP = 5000
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

    def refresh_model(self) -> bool:
        """Load the current version if it changed; returns whether it did."""
        version = self.models.current_version()
        if version is None or (self.model is not None and self.model.version == version):
            return False
        self.model = self.models.load(version)
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
        """One micro-batch; raises on storage or broker errors (the caller retries it whole),
        and StateRewoundError, before anything is written, when the store's offsets fell below
        `expected` (the caller replays those partitions from the stored offsets). `owned`: the
        partitions this worker is assigned, whose queued dead letters it sends, except those at or
        below `letters_done[partition]` (already in the dead-letter topic: a replay after Redis
        lost state records them again). `letters_done` is raised as soon as the sink's flush
        returns, before the letters are settled: if settling fails (Redis went away), the retry
        must not send them twice."""
        self.refresh_model()
        s = self.s
        limits = Limits(now=time.time(), max_future_s=s.max_future_s, max_count=s.max_count)
        known = self.model.track_index if self.model is not None else {}
        with stage("decode"):
            records = to_records(messages, limits, s.min_ms_played, known)
        records = self._erase(incarnation, records)
        with stage("apply"):
            applied = self.histories.apply(incarnation, records, expected)
        with stage("dead_letters"):
            dead = self.histories.dead_letters(set(owned) | {r.partition for r in records})
        users: list[str] = []
        upto: Any = None
        tracks = 0
        if self.model is not None:
            with stage("pending"):
                users, upto = self.histories.pending(PENDING_PER_STEP)
            resolve_users(self.histories, self.models, self.model, users, self.sink)
            with stage("cold_start"):
                new = sorted({r.track for r in records if isinstance(r, PlayRecord) and r.new_track})
                tracks = self._cold_start(new)
        # Letters go to the sink after the last Redis step of the batch: a letter handed to the
        # producer is delivered even if this attempt fails later, and the retry, not knowing
        # that, would send it again.
        done = letters_done if letters_done is not None else {}
        sent, last_letter = self._send_letters(dead, done)
        with stage("produce"):
            self.sink.flush()
        for part, off in last_letter.items():
            done[part] = max(done.get(part, -1), off)
        with stage("settle"):
            self.histories.settle({p: len(v) for p, v in dead.items()}, upto if users else None)
        return Outcome(len(records), applied, sent, len(users), tracks)
