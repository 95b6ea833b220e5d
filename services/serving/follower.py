"""The serving replica's update follower: the single owner of snapshot swaps and index updates.

One thread does all of it, in order: swap in a new model version once its graphs are ready,
apply `factor-updates` to the current graphs, and swap in a graph rebuilt without deleted
nodes. The rebuild itself runs on a helper thread from a copy taken by this thread; the updates
applied after the copy are replayed here, in their order, right after the swap, so an older
vector can never land after a newer one and no update lands on a discarded snapshot.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable

from confluent_kafka import Consumer

from core.catalogue import Catalogue
from core.errors import FatalError, UnknownVersionError
from core.experiments import Experiment
from core.messages import FactorUpdate, MessageError
from services.infra import rdkafka
from services.infra.lifecycle import Backoff, freeze_long_lived, retry_step
from services.infra.model_store import RedisModelStore
from services.serving.arms import ArmSnapshots
from services.serving.catalogue_feed import CatalogueFeed
from services.serving.ready_board import Seat
from services.serving.rwlock import ReadWriteLock
from services.serving.snapshots import Snapshot, SnapshotBuilder, rebuilt

log = logging.getLogger(__name__)
REBUILD_DELETED_SHARE = 0.2
UPDATES_PER_POLL = 5000
HEARTBEAT_S = 10.0


class UpdateFollower:
    """Component: `run` follows versions and updates until `stop`; queries read `snapshot`."""

    def __init__(
        self,
        builder: SnapshotBuilder,
        models: RedisModelStore,
        open_reader: Callable[[], Consumer] | None,
        heartbeat: Callable[[str | None], None] | None = None,
        catalogue_feed: CatalogueFeed | None = None,
        experiment: Experiment | None = None,
    ) -> None:
        self.builder, self.models, self.open_reader = builder, models, open_reader
        self.arms = ArmSnapshots(experiment, builder, models)  # versions other arms are served
        self.catalogue = catalogue_feed.catalogue if catalogue_feed is not None else Catalogue()
        self.catalogue_feed = catalogue_feed
        self.heartbeat, self._beat_at = heartbeat, 0.0  # tells `encore status` which version is loaded
        self.snapshot: Snapshot | None = None
        self.lock = ReadWriteLock()  # queries read; updates and swaps write
        self.stop_event = threading.Event()
        self.updates_applied = 0
        self.failure: str | None = None  # set when the follower stopped on a fatal fault
        self.seat: Seat | None = None  # a prefork worker's ready slot, which its siblings read
        self._reader: Consumer | None = None
        self._rebuilding: Snapshot | None = None  # the snapshot a rebuild was started from
        # (snapshot it started from, result), posted by rebuild threads; a thread that outlived a
        # version swap posts a result for a snapshot no longer served, which must be dropped
        self._finished: list[tuple[Snapshot, Snapshot]] = []
        self._replay: list[FactorUpdate] = []  # applied since the rebuild's copy
        self.versions_from_parent = False  # a forked worker: the parent swaps versions (prefork)

    def loading(self) -> str | None:
        """Why this worker cannot answer as it should yet (None: it can)."""
        if self.failure:
            return f"update follower stopped: {self.failure}"
        if self.snapshot is None:
            return "no model loaded"
        if self.catalogue_feed is not None and not self.catalogue_feed.loaded:
            return "catalogue still loading"
        return None

    def preload(self, timeout: float) -> None:
        """Read the catalogue before this worker accepts a request: a worker forked during a
        version roll shares the port with the old, ready generation and must not be the one that
        answers "not ready" (or misses a takedown). Bounded; the follower thread goes on after."""
        if self.catalogue_feed is not None:
            try:
                self.catalogue_feed.catch_up(timeout)
            except Exception as exc:  # noqa: BLE001 - the broker away: the follower retries it
                log.warning("serving follower: catalogue not read before serving (%s); reading it on", exc)
        if self.seat is not None:
            self.seat.report(self.loading() is None)

    def siblings_loading(self) -> int:
        """Workers of the same `encore serve` (prefork) not ready yet; 0 for a lone worker."""
        return self.seat.others_waiting() if self.seat is not None else 0

    # ---- swaps ---------------------------------------------------------------------
    def _swap(self, snap: Snapshot) -> None:
        with self.lock.write():
            self.snapshot = snap
        freeze_long_lived()  # while all requests wait, a full collection would walk the model

    def adopt(self, snap: Snapshot) -> None:
        """Serve the snapshot a prefork parent loaded; from now on the parent changes versions
        (it replaces this worker), this follower only applies updates to it."""
        snap.warm()
        self.snapshot, self.versions_from_parent = snap, True

    def refresh(self) -> bool:
        """Swap in the current version once its graphs are built (the old one answers meanwhile);
        until the catalogue is loaded, read it too (a replica must know what is taken down)."""
        if self.catalogue_feed is not None and not self.catalogue_feed.loaded:
            self.catalogue_feed.poll()
        if self.versions_from_parent and self.snapshot is not None:
            return False
        version = self.models.current_version()
        if version is None or (self.snapshot is not None and self.snapshot.version == version):
            return False
        t0 = time.perf_counter()
        try:
            snap = self.builder.build(version)
        except UnknownVersionError as exc:  # expired between the read and the load: next step
            log.warning("serving follower: %s", exc)
            return False
        self._swap(snap)
        self._rebuilding, self._replay = None, []
        self.builder.prune({v for v, _ in self.models.versions()} | {version} | self.arms.versions())
        log.info("serving model %s (%d tracks, ready in %.1fs)", version, len(snap.ip), time.perf_counter() - t0)
        return True

    # ---- updates -------------------------------------------------------------------
    def apply(self, u: FactorUpdate) -> None:
        """Apply one track update to the current graphs (users are not indexed)."""
        snap = self.snapshot
        if snap is None or u.entity != "track":
            return
        if u.vector is not None and u.model_version != snap.version:
            return  # a vector of another version: its factors are not comparable
        with self.lock.write():
            if u.vector is None:
                snap.ip.remove([u.entity_id])
                snap.cosine.remove([u.entity_id])
            else:
                snap.ip.upsert([u.entity_id], u.vector[None])
                snap.cosine.upsert([u.entity_id], u.vector[None])
        self.updates_applied += 1
        if self._rebuilding is not None:
            self._replay.append(u)
        elif snap.ip.deleted > REBUILD_DELETED_SHARE * max(len(snap.ip), 1):
            self._start_rebuild(snap)

    def _start_rebuild(self, snap: Snapshot) -> None:
        """Copy the live vectors here (this thread is the only writer), rebuild on a helper."""
        ids = list(snap.ip.slots.label)
        vecs = snap.ip.stored(ids)
        self._rebuilding, self._replay = snap, []

        def build() -> None:
            fresh = rebuilt(snap, ids, vecs)
            self._finished.append((snap, fresh))  # list.append and list.pop are atomic

        threading.Thread(target=build, daemon=True, name="index-rebuild").start()

    def finish_rebuild(self) -> bool:
        """Swap in a finished rebuild and replay, in order, what arrived since its copy.

        Only the rebuild of the snapshot being served counts: one started before a version swap
        (its thread still running when the swap happened) would put the old version back.
        """
        done = [self._finished.pop(0) for _ in range(len(self._finished))]
        fresh = next((new for origin, new in done if origin is self._rebuilding), None)
        if fresh is None:
            return False
        replay, started_from = self._replay, self._rebuilding
        self._rebuilding, self._replay = None, []
        if started_from is not self.snapshot:
            return False
        with self.lock.write():
            self.snapshot = fresh
        for u in replay:
            self.apply(u)
        log.info("index rebuilt without deleted nodes; %d updates replayed", len(replay))
        return True

    # ---- loop ----------------------------------------------------------------------
    def step(self) -> None:
        self.refresh()
        self.arms.refresh(self.snapshot)
        self.finish_rebuild()
        if self.heartbeat is not None and time.monotonic() - self._beat_at >= HEARTBEAT_S:
            self._beat_at = time.monotonic()
            self.heartbeat(self.snapshot.version if self.snapshot is not None else None)
        if self.catalogue_feed is not None:
            self.catalogue_feed.poll()
        if self.seat is not None:
            self.seat.report(self.loading() is None)
        if self.open_reader is None:
            return
        if self._reader is None:
            self._reader = self.open_reader()
        for m in rdkafka.data_messages(self._reader.consume(num_messages=UPDATES_PER_POLL, timeout=0.2)):
            key = m.key()
            # The topic also carries every user update (tens of thousands a second at full speed);
            # librdkafka decodes them off the GIL and only `track:` keys reach Python code.
            if not key or not key.startswith(b"track:"):
                continue
            try:
                self.apply(FactorUpdate.decode(key, m.value()))
            except MessageError as exc:
                log.warning("serving follower: skipped a malformed update: %s", exc)

    def run(self) -> None:
        backoff = Backoff(first=1.0)
        try:
            while not self.stop_event.is_set():
                retry_step(self.step, self.stop_event, "serving follower", backoff)
        except FatalError as exc:
            self.failure = str(exc)  # /ready reports it; the last good snapshot keeps answering
            if self.seat is not None:
                self.seat.report(False)

    def stop(self) -> None:
        self.stop_event.set()

    def close(self) -> None:
        if self.catalogue_feed is not None:
            self.catalogue_feed.close()
        if self._reader is not None:
            self._reader.close()
            self._reader = None
