"""Shared helpers of the integration tests: a trained model published, workers in threads."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable
from typing import Any

import numpy as np
import redis

from core.als import ImplicitALS
from core.recommend import popularity
from core.synthetic import SyntheticMusic
from services.cli.root import Root
from services.infra import kafka_admin
from services.infra.clients import Clients
from services.infra.keys import Keys
from services.infra.model_store import RedisModelStore, new_version
from services.infra.settings import Settings
from services.speed.worker import FoldInWorker


def keys_for(settings: Settings) -> Keys:
    """The key schema the services use for these settings (bucketed on a Redis Cluster)."""
    return Clients(settings).keys


def applied_count(settings: Settings, group: str = "encore-foldin") -> int:
    """Messages of the plays topic the state covers (on a cluster: up to the lowest fence)."""
    root = Root(settings)
    try:
        incarnation = root.clients.topic_incarnation(settings.plays_topic)
        return sum(o + 1 for o in root.history_store(group).applied_offsets(incarnation).values())
    finally:
        root.close()


def publish_synthetic_model(settings: Settings, r: redis.Redis, data: SyntheticMusic) -> str:
    plays = data.matrix()
    model = ImplicitALS(factors=settings.factors, iterations=6, random_state=0).fit(plays)
    version = new_version()
    order, shares = popularity(plays, plays.shape[1])
    by_row = np.zeros(plays.shape[1], dtype="<f4")
    by_row[order] = shares
    meta = {"checkpoint_time": time.time(), "popularity": by_row.tobytes()}
    RedisModelStore(r, keys_for(settings)).publish(version, model, list(data.user_ids), list(data.track_ids), meta)
    return version


class WorkerThread:
    """A fold-in worker, built by the composition root, running in a thread of the test process."""

    def __init__(self, settings: Settings, group: str) -> None:
        self.root = Root(settings)
        self.worker: FoldInWorker = self.root.foldin_worker(group)
        self.thread = threading.Thread(target=self.worker.run, daemon=True)
        self.thread.start()

    def stop(self) -> None:
        self.worker.stop()
        self.thread.join(timeout=30)
        self.worker.close()
        self.root.close()


def histories_match(store: Any, expected: Counter[str]) -> bool:
    """Whether the stored histories of `expected`'s users hold exactly its counts
    (keys "user|track" → plays)."""
    users = sorted({k.split("|", 1)[0] for k in expected})
    got: Counter[str] = Counter()
    for u, flat in zip(users, store.raw_histories(users), strict=True):
        for k in range(0, len(flat), 2):
            got[f"{u}|{flat[k].decode()}"] = int(float(flat[k + 1]))
    return got == expected


def wait_for(cond: Callable[[], bool], timeout: float = 60.0, every: float = 0.1) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if cond():
            return True
        time.sleep(every)
    return False


def encore(settings: Settings, *args: str, timeout: float = 300) -> tuple[int, str, str]:
    """Run the `encore` command line with `settings` as its environment: (exit code, stdout, stderr)."""
    env = {**os.environ, **{k: v for k, v, _ in settings.describe()}}
    env["ENCORE_REDIS_URL"] = settings.redis_url  # describe() masks credentials
    proc = subprocess.run(
        [sys.executable, "-m", "services.cli", *args], env=env, capture_output=True, text=True, timeout=timeout
    )
    return proc.returncode, proc.stdout, proc.stderr


def consume_all(settings: Settings, topic: str, want: int, timeout: float = 30) -> list:
    """Every record of `topic` from its beginning, once at least `want` arrived (or `timeout`)."""
    from kafka import TopicPartition

    c = kafka_admin.consumer(settings.kafka_bootstrap, None)
    tps = [TopicPartition(topic, p) for p in c.partitions_for_topic(topic) or []]
    c.assign(tps)
    c.seek_to_beginning(*tps)
    out: list = []
    deadline = time.monotonic() + timeout
    while len(out) < want and time.monotonic() < deadline:
        for recs in c.poll(timeout_ms=200).values():
            out.extend(recs)
    time.sleep(0.5)
    for recs in c.poll(timeout_ms=500).values():
        out.extend(recs)
    c.close()
    return out
