"""In-memory fakes of the speed layer's ports, for fast unit tests of its decisions.

They follow the same contract as the Redis adapters (the history-store contract tests run
against both); they never stand in for a server in an integration test.
"""

from __future__ import annotations

import itertools
import time
from collections.abc import Collection, Mapping

import numpy as np

from core.errors import StateRewoundError
from core.messages import DeadLetter, Entity, FactorUpdate, encode_vector
from services.infra.model_store import LoadedModel
from services.speed.records import DeadRecord, PlayRecord, Record


class FakeHistoryStore:
    """HistoryStore with the fencing, aggregation and cap semantics of apply_batch.lua."""

    def __init__(self, history_cap: int = 500, listeners_cap: int = 1000) -> None:
        self.history_cap, self.listeners_cap = history_cap, listeners_cap
        self.histories: dict[str, dict[str, float]] = {}
        self.listeners: dict[str, dict[str, float]] = {}
        self.offsets: dict[tuple[str, int], int] = {}
        self.dirty: dict[str, float] = {}
        self.pending_users: dict[str, int] = {}
        self.new: set[str] = set()
        self.dlq: dict[int, list[DeadLetter]] = {}
        self._seq = itertools.count(1)
        self.clock = time.time
        self.applies = 0  # atomic steps that wrote something
        self.forgotten: dict[str, tuple[str, int, int]] = {}  # user → erase record not yet passed
        self.models: FakeModelStore | None = None  # whose vectors an erasure deletes

    def apply(self, incarnation: str, records: list[Record], expected: Mapping[int, int] | None = None) -> int:
        for _ in range(5):
            if not records:
                return 0
            first: dict[int, int] = {}
            for r in records:
                first[r.partition] = min(first.get(r.partition, r.offset), r.offset)
            behind = {
                p: self.offsets.get((incarnation, p), -1)
                for p in first
                if self.offsets.get((incarnation, p), -1) < (expected or {}).get(p, -1)
            }
            if behind:
                raise StateRewoundError(behind)
            stale = {
                p: self.offsets[(incarnation, p)]
                for p, lo in first.items()
                if self.offsets.get((incarnation, p), -1) >= lo
            }
            if not stale:
                self._write(incarnation, records)
                return len(records)
            records = [r for r in records if r.offset > stale.get(r.partition, -1)]
        raise RuntimeError("offsets kept moving")

    def _blocked(self, incarnation: str, records: list[Record]) -> set[str]:
        reach = {p: max(r.offset for r in records if r.partition == p) for p in {r.partition for r in records}}
        return {
            u
            for u, (inc, p, o) in self.forgotten.items()
            if inc == incarnation and max(self.offsets.get((inc, p), -1), reach.get(p, -1)) < o
        }

    def _write(self, incarnation: str, records: list[Record]) -> None:
        self.applies += 1
        seq, now = next(self._seq), self.clock()
        blocked = self._blocked(incarnation, records)
        for r in records:
            if isinstance(r, PlayRecord) and r.user in blocked:
                pass
            elif isinstance(r, PlayRecord):
                h = self.histories.setdefault(r.user, {})
                h[r.track] = h.get(r.track, 0.0) + r.weight
                if r.new_track:
                    ls = self.listeners.setdefault(r.track, {})
                    ls[r.user] = max(ls.get(r.user, r.ts), r.ts)
                    self.new.add(r.track)
                self.dirty[r.user] = now
                self.pending_users[r.user] = seq
            elif isinstance(r, DeadRecord):
                self.dlq.setdefault(r.partition, []).append(r.letter)
            key = (incarnation, r.partition)
            self.offsets[key] = max(self.offsets.get(key, -1), r.offset)
        for user in {r.user for r in records if isinstance(r, PlayRecord)} - blocked:
            h = self.histories[user]
            if len(h) > self.history_cap + self.history_cap // 10:
                keep = sorted(h.items(), key=lambda kv: -kv[1])[: self.history_cap]
                self.histories[user] = dict(keep)
        for track, ls in self.listeners.items():
            if len(ls) > self.listeners_cap:
                self.listeners[track] = dict(sorted(ls.items(), key=lambda kv: kv[1])[-self.listeners_cap :])

    def applied_offsets(self, incarnation: str) -> dict[int, int]:
        return {p: o for (inc, p), o in self.offsets.items() if inc == incarnation}

    def raw_histories(self, users: list[str]) -> list[list[bytes]]:
        out = []
        for u in users:
            flat: list[bytes] = []
            for t, w in self.histories.get(u, {}).items():
                flat += [t.encode(), repr(w).encode()]
            out.append(flat)
        return out

    def pending(self, limit: int) -> tuple[list[str], float]:
        rows = sorted(self.pending_users.items(), key=lambda kv: (kv[1], kv[0]))
        if not rows:
            return [], 0.0
        upto = rows[:limit][-1][1]
        return [u for u, s in rows if s <= upto], float(upto)

    def queue_users(self, users: list[str]) -> None:
        if users:
            seq = next(self._seq)
            for u in users:
                self.pending_users[u] = seq

    def dead_letters(self, partitions: Collection[int]) -> dict[int, list[DeadLetter]]:
        return {p: list(self.dlq[p]) for p in sorted(partitions) if self.dlq.get(p)}

    def settle(self, dead_letters: Mapping[int, int], done_upto: float | None) -> None:
        for p, n in dead_letters.items():
            del self.dlq.setdefault(p, [])[:n]
        if done_upto is not None:
            self.pending_users = {u: s for u, s in self.pending_users.items() if s > done_upto}

    def changed_since(self, t: float) -> list[str]:
        return [u for u, at in self.dirty.items() if at >= t]

    def new_tracks(self) -> list[str]:
        return sorted(self.new)

    def forget_new_tracks(self, tracks: list[str]) -> None:
        self.new -= set(tracks)

    def listener_weights(self, track: str) -> tuple[list[str], list[float]]:
        users = sorted(self.listeners.get(track, {}), key=lambda u: self.listeners[track][u])
        return users, [self.histories.get(u, {}).get(track, 0.0) for u in users]

    def put_vectors(self, version: str, users: list[str], vectors: np.ndarray) -> set[str]:
        assert self.models is not None, "set .models to the FakeModelStore the vectors go to"
        left_out = {u for u in users if u not in self.pending_users}
        for u, v in zip(users, vectors, strict=True):
            if u not in left_out:
                self.models.users[(version, u)] = encode_vector(v)
        return left_out

    def erase(
        self, incarnation: str, partition: int, offset: int, user: str, versions: Collection[str], hold: bool
    ) -> bool:
        if self.offsets.get((incarnation, partition), -1) >= offset:
            self.forgotten.pop(user, None)
            return False
        self.histories.pop(user, None)
        self.pending_users.pop(user, None)
        self.dirty.pop(user, None)
        for ls in self.listeners.values():
            ls.pop(user, None)
        if self.models is not None:
            for v in versions:
                self.models.users.pop((v, user), None)
        if hold:
            self.forgotten[user] = (incarnation, partition, offset)
        else:
            self.forgotten.pop(user, None)
        return True


class FakeModelStore:
    """ModelStore holding loaded versions and their vectors as bytes, like Redis does."""

    def __init__(self) -> None:
        self.loaded: dict[str, LoadedModel] = {}
        self.current: str | None = None
        self.users: dict[tuple[str, str], bytes] = {}
        self.tracks: dict[tuple[str, str], bytes] = {}

    def add(self, loaded: LoadedModel, user_vectors: dict[str, np.ndarray] | None = None) -> None:
        self.loaded[loaded.version] = loaded
        for u, v in (user_vectors or {}).items():
            self.users[(loaded.version, u)] = encode_vector(v)
        self.current = loaded.version

    def current_version(self) -> str | None:
        return self.current

    def load(self, version: str) -> LoadedModel:
        return self.loaded[version]

    def kept_versions(self) -> list[str]:
        return list(self.loaded)

    def user_vectors(self, version: str, users: list[str]) -> list[bytes | None]:
        return [self.users.get((version, u)) for u in users]

    def put_track_vector(self, version: str, track: str, vector: np.ndarray) -> None:
        self.tracks[(version, track)] = encode_vector(vector)


class RecordingSink:
    """UpdateSink that keeps what was flushed; `fail_next_flush` simulates a broker fault."""

    def __init__(self) -> None:
        self.buffer: list[FactorUpdate | DeadLetter] = []
        self.flushed: list[FactorUpdate | DeadLetter] = []
        self.fail_next_flush = False

    def update(self, u: FactorUpdate) -> None:
        self.buffer.append(u)

    def updates(self, entity: Entity, model_version: str, ids: list[str], vectors: np.ndarray) -> None:
        for key, value in FactorUpdate.encode_many(entity, model_version, ids, vectors):
            self.buffer.append(FactorUpdate.decode(key, value))

    def dead_letter(self, d: DeadLetter) -> None:
        self.buffer.append(d)

    def flush(self, updates: bool = True, letters: bool = True) -> None:
        if self.fail_next_flush:
            self.fail_next_flush = False
            self.buffer.clear()
            raise ConnectionError("broker unavailable")
        self.flushed += self.buffer
        self.buffer.clear()

    def flushed_updates(self) -> list[FactorUpdate]:
        return [m for m in self.flushed if isinstance(m, FactorUpdate)]

    def letters(self) -> list[DeadLetter]:
        return [m for m in self.flushed if isinstance(m, DeadLetter)]
