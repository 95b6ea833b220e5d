"""The Redis key schema (documented in the README): the only place key strings are built.

Lua scripts never build keys: they receive every key they touch in KEYS, so this module stays
the single source of the schema and a script's keys can be routed by a cluster client.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Keys:
    """Key builder for one prefix (default `encore:`)."""

    prefix: str = "encore:"

    @property
    def current(self) -> str:
        return f"{self.prefix}model:current"

    @property
    def versions(self) -> str:
        """Sorted set of published versions, scored by publish time."""
        return f"{self.prefix}model:versions"

    def meta(self, version: str) -> str:
        return f"{self.prefix}model:{version}:meta"

    def user(self, version: str, user_id: str) -> str:
        return f"{self.prefix}model:{version}:user:{user_id}"

    def track(self, version: str, track_id: str) -> str:
        return f"{self.prefix}model:{version}:track:{track_id}"

    def track_ids(self, version: str) -> str:
        """Newline-joined track ids of a version, in factor-row order (fast bulk load)."""
        return f"{self.prefix}model:{version}:track_ids"

    def version_pattern(self, version: str) -> str:
        return f"{self.prefix}model:{version}:*"

    def history(self, user_id: str) -> str:
        """Hash track_id → accumulated play weight."""
        return f"{self.prefix}plays:user:{user_id}"

    def listeners(self, track_id: str) -> str:
        """Sorted set user_id → last play ts (recent listeners, capped)."""
        return f"{self.prefix}listeners:track:{track_id}"

    def offsets(self, group: str) -> str:
        """Hash `incarnation|partition` → last applied offset."""
        return f"{self.prefix}offsets:{group}"

    @property
    def dirty_users(self) -> str:
        """Sorted set user_id → Redis server time of the last history change (catch-up)."""
        return f"{self.prefix}dirty:users"

    @property
    def new_tracks(self) -> str:
        """Set of track ids seen in plays but unknown to the current model."""
        return f"{self.prefix}tracks:new"

    @property
    def pending_users(self) -> str:
        """Sorted set user → sequence number: history changed, vector not yet re-solved."""
        return f"{self.prefix}foldin:pending"

    @property
    def pending_seq(self) -> str:
        """Counter that scores the pending set (a newer change always scores higher)."""
        return f"{self.prefix}foldin:seq"

    def pending_dlq(self, partition: int) -> str:
        """List of a plays partition's dead letters, recorded atomically with its offsets and not
        yet produced; only the partition's owner drains it (no two workers send one letter)."""
        return f"{self.prefix}foldin:dlq:{partition}"

    @property
    def status_gaps(self) -> str:
        """Hash `group|incarnation|partition` → JSON of a replay gap (offsets Kafka no longer holds)."""
        return f"{self.prefix}status:gaps"

    @property
    def status_trainer(self) -> str:
        """Hash of the trainer's last checkpoint and retrain (written by the trainer)."""
        return f"{self.prefix}status:trainer"

    @property
    def status_replicas(self) -> str:
        """Hash replica id → JSON {version, at}: the model each serving worker has loaded."""
        return f"{self.prefix}status:replicas"
