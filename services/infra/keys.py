"""The Redis key schema (documented in the README): the only place key strings are built.

Lua scripts never build keys: they receive every key they touch in KEYS, so this module stays
the single source of the schema and a script's keys can be routed by a cluster client.

On Redis Cluster (`buckets` > 0) the speed layer's per-user state lives in hash-tag buckets:
user u belongs to bucket CRC32(u) mod `buckets`, and every key one atomic step touches (the
histories of the bucket's users, its offsets fence, dirty and pending sets, dead-letter lists)
carries the tag `{bucket}`, so the step runs in one slot. Listeners, versions, meta and
status keys have no tag: single-key reads and writes route by the whole key. Vectors carry the
bucket tag too (of the user id, or of the track id), so a batch's vectors move in one MGET or
MSET per bucket.
"""

from __future__ import annotations

import zlib
from collections.abc import Sequence
from dataclasses import dataclass


def bucket_of(user_id: str, buckets: int) -> int:
    """CRC32 (IEEE, as zlib, Java and Go compute it) of the UTF-8 id, modulo the bucket count."""
    return zlib.crc32(user_id.encode()) % buckets


@dataclass(frozen=True)
class BucketKeys:
    """The keys of one bucket's atomic step (Redis Cluster): all share the tag `{bucket}`."""

    prefix: str
    bucket: int

    @property
    def tag(self) -> str:
        return "{" + str(self.bucket) + "}"

    def offsets(self, group: str) -> str:
        return f"{self.prefix}offsets:{self.tag}:{group}"

    @property
    def pending_seq(self) -> str:
        return f"{self.prefix}foldin:{self.tag}:seq"

    @property
    def dirty_users(self) -> str:
        return f"{self.prefix}dirty:{self.tag}:users"

    @property
    def pending_users(self) -> str:
        return f"{self.prefix}foldin:{self.tag}:pending"

    @property
    def new_tracks(self) -> str:
        """Never written (new tracks and listeners are kept outside the fenced step on a
        cluster); present so the step's script has the same KEYS layout everywhere."""
        return f"{self.prefix}tracks:{self.tag}:new"

    def pending_dlq(self, partition: int) -> str:
        return f"{self.prefix}foldin:{self.tag}:dlq:{partition}"

    @property
    def forgotten(self) -> str:
        return f"{self.prefix}forgotten:{self.tag}"

    def history(self, user_id: str) -> str:
        return self.history_prefix + user_id

    @property
    def history_prefix(self) -> str:
        """A history key less its user id: bulk reads build many keys from it."""
        return f"{self.prefix}plays:{self.tag}:user:"

    def listeners(self, track_id: str) -> str:
        return f"{self.prefix}listeners:{self.tag}:track:{track_id}"


@dataclass(frozen=True)
class Keys:
    """Key builder for one prefix (default `encore:`); `buckets` > 0 on Redis Cluster."""

    prefix: str = "encore:"
    buckets: int = 0

    def __post_init__(self) -> None:
        if self.buckets and ("{" in self.prefix or "}" in self.prefix):
            raise ValueError(f"key prefix {self.prefix!r}: no braces on Redis Cluster (they are hash tags)")

    def bucket(self, b: int) -> BucketKeys:
        return BucketKeys(self.prefix, b)

    def bucket_of_user(self, user_id: str) -> int:
        return bucket_of(user_id, self.buckets)

    def dlq_bucket(self, partition: int) -> int:
        """The bucket whose step records a partition's dead letters."""
        return partition % self.buckets

    @property
    def bucket_count(self) -> str:
        """The bucket count the state was written with (Redis Cluster; fixed once written)."""
        return f"{self.prefix}cluster:buckets"

    @property
    def current(self) -> str:
        return f"{self.prefix}model:current"

    @property
    def candidate(self) -> str:
        """The version published as a candidate (served to experiment arms, not current)."""
        return f"{self.prefix}model:candidate"

    @property
    def versions(self) -> str:
        """Sorted set of published versions, scored by publish time."""
        return f"{self.prefix}model:versions"

    def meta(self, version: str) -> str:
        return f"{self.prefix}model:{version}:meta"

    def _vectors(self, version: str, entity: str) -> str:
        """Where `entity` ("user" or "track") vectors of `version` start: the one spelling of it."""
        return f"{self.prefix}model:{version}:{entity}:"

    def user(self, version: str, user_id: str) -> str:
        """A user's vector; on a cluster tagged with the user's bucket (as the history), so a
        batch's vectors are one MGET/MSET per bucket rather than one command per user."""
        if self.buckets:
            return self.users_in_bucket(version, self.bucket_of_user(user_id)) + user_id
        return self._vectors(version, "user") + user_id

    def users_in_bucket(self, version: str, bucket: int) -> str:
        """A user vector's key less its user id, in `bucket` (cluster): bulk writes build many
        keys from it without hashing each id again."""
        return f"{self._vectors(version, 'user')}{{{bucket}}}:"

    def user_pattern(self, version: str) -> str:
        """SCAN pattern of every user vector of `version`."""
        return self._vectors(version, "user") + "*"

    def user_of(self, version: str, key: bytes) -> str:
        """The user id of a key matched by `user_pattern` (its bucket tag, on a cluster, removed)."""
        rest = key.decode()[len(self._vectors(version, "user")) :]
        return rest.split("}:", 1)[1] if self.buckets and rest.startswith("{") else rest

    def track(self, version: str, track_id: str) -> str:
        """A track's vector; on a cluster tagged with the track id's bucket (same CRC32 rule)."""
        if self.buckets:
            return f"{self._vectors(version, 'track')}{{{bucket_of(track_id, self.buckets)}}}:{track_id}"
        return self._vectors(version, "track") + track_id

    def vector_keys(self, version: str, entity: str, ids: Sequence[str]) -> list[str]:
        """The keys of many `user` or `track` vectors at once, equal to `user`/`track` of each id
        (publish: on a cluster each bucket's key prefix is built once, not once per id)."""
        base = self._vectors(version, entity)
        if not self.buckets:
            return [base + i for i in ids]
        tagged = [f"{base}{{{b}}}:" for b in range(self.buckets)]
        crc, n = zlib.crc32, self.buckets
        return [tagged[crc(i.encode()) % n] + i for i in ids]

    def track_ids(self, version: str) -> str:
        """Newline-joined track ids of a version, in factor-row order (fast bulk load)."""
        return f"{self.prefix}model:{version}:track_ids"

    def version_pattern(self, version: str) -> str:
        return f"{self.prefix}model:{version}:*"

    def history(self, user_id: str) -> str:
        """Hash track_id → accumulated play weight (on a cluster: in the user's bucket)."""
        if self.buckets:
            return self.bucket(self.bucket_of_user(user_id)).history(user_id)
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
    def forgotten(self) -> str:
        """Hash user → `incarnation|partition|offset` of an erase record not yet reached by the
        speed layer: until its fence passes that offset, the user's plays are not applied."""
        if self.buckets:
            raise ValueError("on Redis Cluster the forgotten hash is per bucket: bucket(b).forgotten")
        return f"{self.prefix}forgotten"

    @property
    def erasures(self) -> str:
        """Sorted set user → Redis server time of their last erasure (the trainer leaves them out
        of a model trained on plays read before it)."""
        return f"{self.prefix}erasures"

    @property
    def pending_seq(self) -> str:
        """Counter that scores the pending set (a newer change always scores higher)."""
        return f"{self.prefix}foldin:seq"

    def pending_dlq(self, partition: int) -> str:
        """List of a plays partition's dead letters, recorded atomically with its offsets and not
        yet produced; only the partition's owner drains it (no two workers send one letter)."""
        return f"{self.prefix}foldin:dlq:{partition}"

    def catalogue(self, track_id: str) -> str:
        """A track's catalogue entry: the `tracks` topic's JSON value, as last applied."""
        return f"{self.prefix}catalogue:track:{track_id}"

    # ---- experiments: every key carries the tag {exp}, so one script applies a batch ----
    @property
    def experiment_fence(self) -> str:
        """Hash `topic|incarnation|partition` → last impression or play offset applied to the
        experiment metrics (the join resumes there: exactly once)."""
        return f"{self.prefix}{{exp}}:fence"

    @property
    def experiment_metrics(self) -> str:
        """Hash `experiment|arm|impressions|converted|plays` → count (online metrics per arm)."""
        return f"{self.prefix}{{exp}}:metrics"

    def impressions_of(self, user_id: str) -> str:
        """Hash of a user's recent impressions: `t:{track}` → `request|experiment|arm|ts`, and
        `r:{request}` once a play followed that impression; expires after twice the window."""
        return f"{self.prefix}{{exp}}:imp:{user_id}"

    def series(self, minute: int) -> str:
        """Hash of one minute's speed-layer figures (plays, dead letters, lag, freshness
        histogram) for the dashboard; expires after two hours."""
        return f"{self.prefix}status:series:{minute}"

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
