"""What components report for `encore status`, kept in Redis beside the state it describes.

Replay gaps (offsets a consumer needs that Kafka no longer holds), the trainer's last checkpoint
and retrain, and the model version each serving worker has loaded. Writes are best effort for
the replicas' heartbeat and strict for gaps: a gap is plays lost for good and must reach a person.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import time
from typing import Any

import redis

from services.infra import metrics
from services.infra.keys import Keys

log = logging.getLogger(__name__)
REPLICA_STALE_S = 60.0


class StatusBoard:
    """Reads and writes the `status:*` hashes of one key prefix."""

    def __init__(self, r: redis.Redis, keys: Keys) -> None:
        self.r, self.keys = r, keys

    # ---- replay gaps ---------------------------------------------------------------
    def report_gap(self, group: str, incarnation: str, partition: int, needed: int, available: int) -> None:
        """Offsets [needed, available) of a partition are gone from Kafka but the state needs them."""
        log.error(
            "REPLAY GAP: %s needs %s partition %d from offset %d, but Kafka holds it only from %d: "
            "%d messages cannot be replayed (retention passed); the state misses them for good",
            group,
            incarnation,
            partition,
            needed,
            available,
            available - needed,
        )
        metrics.REPLAY_GAPS.labels(group).inc()
        field = f"{group}|{incarnation}|{partition}"
        self.r.hset(
            self.keys.status_gaps,
            field,
            json.dumps({"needed": needed, "available": available, "lost": available - needed, "at": time.time()}),
        )

    def gaps(self) -> dict[str, dict[str, Any]]:
        return {k.decode(): json.loads(v) for k, v in self.r.hgetall(self.keys.status_gaps).items()}

    def clear_gaps(self) -> None:
        """An operator acknowledges the gaps (after rebuilding or accepting the loss)."""
        self.r.delete(self.keys.status_gaps)

    # ---- trainer -------------------------------------------------------------------
    def trainer_event(self, **fields: Any) -> None:
        self.r.hset(self.keys.status_trainer, mapping={k: json.dumps(v) for k, v in fields.items()})

    def trainer(self) -> dict[str, Any]:
        return {k.decode(): json.loads(v) for k, v in self.r.hgetall(self.keys.status_trainer).items()}

    # ---- serving replicas ----------------------------------------------------------
    def replica_heartbeat(self, version: str | None) -> None:
        """Best effort: a replica that cannot reach Redis is reported by its /ready instead."""
        rid = f"{socket.gethostname()}:{os.getpid()}"
        try:
            self.r.hset(self.keys.status_replicas, rid, json.dumps({"version": version, "at": time.time()}))
        except redis.RedisError as exc:
            log.debug("replica heartbeat not written: %s", exc)

    def replicas(self) -> dict[str, dict[str, Any]]:
        """Replicas heard from within REPLICA_STALE_S; older entries are removed."""
        now, out, stale = time.time(), {}, []
        for k, v in self.r.hgetall(self.keys.status_replicas).items():
            entry = json.loads(v)
            if now - float(entry.get("at", 0)) > REPLICA_STALE_S:
                stale.append(k)
            else:
                out[k.decode()] = entry
        if stale:
            self.r.hdel(self.keys.status_replicas, *stale)
        return out
