"""The speed layer's ports: what it needs of storage and of the outgoing topics.

The Redis and Kafka adapters implement them in production (`history_store.RedisHistoryStore`,
`services.infra.model_store.RedisModelStore`, `services.infra.rdkafka.KafkaUpdateSink`); the
unit tests run the same speed-layer code on in-memory fakes (`tests/fakes.py`).
"""

from __future__ import annotations

from collections.abc import Collection, Mapping
from typing import Any, Protocol

import numpy as np

from core.messages import DeadLetter, Entity, FactorUpdate
from services.infra.model_store import LoadedModel
from services.speed.records import Record


class HistoryStore(Protocol):
    """Play histories, applied exactly once per (incarnation, partition, offset), and the
    durable work queues the speed layer drains after each batch."""

    def apply(self, incarnation: str, records: list[Record], expected: Mapping[int, int] | None = None) -> int:
        """Apply the records not yet applied for their partition, atomically with the new
        offsets; returns how many were new. `expected` maps a partition to the offset the
        caller last applied or read: a stored offset below it means the store lost writes,
        and StateRewoundError(stored offsets) is raised with nothing written."""
        ...

    def applied_offsets(self, incarnation: str) -> dict[int, int]: ...

    def raw_histories(self, users: list[str]) -> list[list[bytes]]:
        """Flat [track, weight, track, weight, ...] per user, in the given order."""
        ...

    def pending(self, limit: int) -> tuple[list[str], Any]:
        """Users awaiting a re-solve, oldest first, and how far they reach in the queue (a
        score; per bucket on Redis Cluster), for `settle`."""
        ...

    def queue_users(self, users: list[str]) -> None: ...

    def put_vectors(self, version: str, users: list[str], vectors: np.ndarray) -> set[str]:
        """Store re-solved vectors, each only if its user is still queued for a re-solve, and
        return the users left out. An erasure takes the user off the queue in its own atomic
        step, so a vector solved from a history read before the erasure, by any worker, is
        not written back."""
        ...

    def dead_letters(self, partitions: Collection[int]) -> dict[int, list[DeadLetter]]:
        """Dead letters recorded by `apply` for these partitions, not yet produced, oldest first
        (only a partition's owner asks, so no two workers send the same letter)."""
        ...

    def settle(self, dead_letters: Mapping[int, int], done_upto: Any) -> None:
        """After a flush: drop the first `dead_letters[p]` dead letters of each partition and the
        pending users up to `done_upto` as `pending` returned it (None: none), in one round trip."""
        ...

    def changed_since(self, t: float) -> list[str]:
        """Users whose history changed at or after server time `t` (catch-up after a new model)."""
        ...

    def new_tracks(self) -> list[str]: ...

    def forget_new_tracks(self, tracks: list[str]) -> None: ...

    def listener_weights(self, track: str) -> tuple[list[str], list[float]]:
        """Recent listeners of `track` and the weight each has on it."""
        ...

    def erase(
        self, incarnation: str, partition: int, offset: int, user: str, versions: Collection[str], hold: bool
    ) -> bool:
        """Forget `user` (history, queued work, vectors in `versions`, listener entries) unless the
        fence passed their erase record at (partition, offset); `hold` blocks their plays until
        it does. Returns whether anything was erased."""
        ...


class ModelStore(Protocol):
    """Model versions and their vectors."""

    def current_version(self) -> str | None: ...

    def load(self, version: str) -> LoadedModel: ...

    def kept_versions(self) -> list[str]:
        """Every version still in the store (the current one and those in their grace period)."""
        ...

    def user_vectors(self, version: str, users: list[str]) -> list[bytes | None]: ...

    def put_track_vector(self, version: str, track: str, vector: np.ndarray) -> None: ...


class UpdateSink(Protocol):
    """Outgoing records; nothing is durable until `flush` returns."""

    def update(self, u: FactorUpdate) -> None: ...

    def updates(self, entity: Entity, model_version: str, ids: list[str], vectors: np.ndarray) -> None:
        """Many updates of one version at once (same records as one `update` each)."""
        ...

    def dead_letter(self, d: DeadLetter) -> None: ...

    def flush(self, updates: bool = True, letters: bool = True) -> None:
        """Block until every record sent so far is acknowledged; raise if one is not, or if a
        vector update (`updates`) or a dead letter (`letters`) failed since their last flush."""
        ...
