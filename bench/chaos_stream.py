"""The chaos soak's input side and its oracle: plays at a fixed rate, acknowledged one by one.

A play counts as produced only once the broker acknowledged it (librdkafka delivery report);
an unacknowledged one is sent again, so the oracle never holds a play the log does not. Every
`bad_every`-th message is malformed with a unique id: each must reach the dead-letter topic.
Probes (one play of a fresh user) time how long after a fault a new play is folded in again.
"""

from __future__ import annotations

import json
import threading
import time
import uuid
from collections import defaultdict
from typing import Any

import numpy as np
import redis
from confluent_kafka import Consumer, Producer

from bench.chaos_ledger import Ledger
from core.events import PlayEvent
from services.infra import rdkafka
from services.infra.keys import Keys
from services.infra.model_store import RedisModelStore

MIN_MS = 30_000


class PlayStream:
    """Producer thread: `rate` plays/s until `total` are acknowledged; `pause` for a planned
    broker restart. `expected[user][track]` is the weight every acknowledged play adds."""

    def __init__(self, bootstrap: str, topic: str, total: int, rate: float, users: int, tracks: int, bad_every: int):
        self.bootstrap, self.topic, self.total, self.rate = bootstrap, topic, total, rate
        self.users, self.tracks, self.bad_every = users, tracks, bad_every
        self.expected: dict[str, dict[str, float]] = defaultdict(lambda: defaultdict(float))
        self.bad_sent: set[str] = set()
        self.acked = 0
        self.resent = 0
        self.running = threading.Event()
        self.running.set()
        self.done = threading.Event()
        self.rng = np.random.default_rng(7)
        self.ledger = Ledger(total)
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.producer = Producer(
            {"bootstrap.servers": bootstrap, "acks": "all", "linger.ms": 5, "message.timeout.ms": 10_000}
        )

    def start(self) -> None:
        self.thread.start()

    def _message(self, i: int) -> tuple[bytes, bytes, tuple[str, str, float] | None, str | None, int]:
        if i % self.bad_every == self.bad_every - 1:
            bad = f"chaos-bad-{i}"
            return b"x", f'{{"bad": "{bad}"'.encode(), None, bad, i  # not JSON: a dead letter
        u = int(self.rng.integers(self.users))
        genre = u % 20
        per = max(1, self.tracks // 20)
        t = (
            genre * per + int(self.rng.zipf(1.5) % per)
            if self.rng.random() < 0.8
            else int(self.rng.integers(self.tracks))
        )
        ms = int(self.rng.integers(5_000, 300_000))
        ev = PlayEvent(f"u{u}", f"t{t}", time.time(), ms, 1, False, None)
        w = ev.weight(MIN_MS)
        return ev.user_id.encode(), ev.to_json(), (ev.user_id, ev.track_id, w), None, i

    def _send_all(self, batch: list[tuple[bytes, bytes, tuple[str, str, float] | None, str | None, int]]) -> None:
        """Send until every message of the batch is acknowledged (failed ones again)."""
        producer = self.producer
        while batch:
            failed: set[int] = set()
            for j, (key, value, _, _, i) in enumerate(batch):

                def report(err: object, msg: Any, j: int = j, i: int = i, failed: set[int] = failed) -> None:
                    if err is not None:
                        failed.add(j)
                    else:
                        self.ledger.acked(i, msg.partition(), msg.offset())

                producer.produce(self.topic, value=value, key=key, on_delivery=report)
            left = producer.flush(15.0)
            if left:
                failed = set(range(len(batch)))  # unknown fate is not counted; resent
            for j, (_, _, play, bad, i) in enumerate(batch):
                if j in failed:
                    continue
                if play is not None:
                    self.expected[play[0]][play[1]] += play[2]
                    self.ledger.play(i, play[0], play[1])
                if bad is not None:
                    self.bad_sent.add(bad)
                self.acked += 1
            batch = [batch[j] for j in sorted(failed)]
            if batch:
                self.resent += len(batch)
                time.sleep(0.5)

    def _run(self) -> None:
        i, start, tick = 0, time.monotonic(), 0.05
        sent_at_start = 0
        while i < self.total:
            self.running.wait()
            due = int((time.monotonic() - start) * self.rate) + sent_at_start
            if due <= i:
                time.sleep(tick)
                continue
            n = min(due, self.total) - i
            self._send_all([self._message(i + k) for k in range(n)])
            i += n
            if not self.running.is_set():  # paused: rate restarts from now, no catch-up burst
                start, sent_at_start = time.monotonic(), i
        self.done.set()

    def pause(self) -> None:
        self.running.clear()

    def resume(self) -> None:
        self.running.set()


def probe(
    bootstrap: str, topic: str, r: redis.Redis, keys: Keys, since: float, stream: PlayStream, limit_s: float = 120.0
) -> float | None:
    """Seconds from `since` until a play sent after it is folded into a readable vector."""
    models = RedisModelStore(r, keys)
    producer = Producer({"bootstrap.servers": bootstrap, "acks": "all", "message.timeout.ms": 5_000})
    sent: list[str] = []
    while time.time() - since < limit_s:
        user = f"probe-{uuid.uuid4().hex[:10]}"
        ok: list[bool] = []
        ev = PlayEvent(user, "t1", time.time(), 200_000, 1, False, None)

        def report(err: object, _msg: object, ok: list[bool] = ok) -> None:
            ok.append(err is None)

        producer.produce(topic, value=ev.to_json(), key=user.encode(), on_delivery=report)
        producer.flush(5.0)
        if ok and ok[0]:
            stream.expected[user]["t1"] += 1.0
            sent.append(user)
        deadline = time.time() + 0.5
        while time.time() < deadline:
            try:
                v = models.current_version()
                if v and any(r.exists(keys.user(v, u)) for u in sent):
                    return time.time() - since
            except redis.RedisError:
                pass
            time.sleep(0.02)
    return None


def read_topic(bootstrap: str, topic: str) -> list[tuple[bytes, str]]:
    """Every (value, source header) the topic holds now (a group-less reader, start to end)."""
    c: Consumer = rdkafka.reader(bootstrap, topic)
    out: list[tuple[bytes, str]] = []
    try:
        idle = 0
        while idle < 3:
            msgs = rdkafka.data_messages(c.consume(num_messages=10_000, timeout=1.0))
            idle = 0 if msgs else idle + 1
            out += [(m.value() or b"", dict(m.headers() or []).get("source", b"").decode()) for m in msgs]
    finally:
        c.close()
    return out


def compare(
    r: redis.Redis,
    keys: Keys,
    expected: dict[str, dict[str, float]],
    ledger: Ledger | None = None,
    t0: float | None = None,
) -> dict[str, Any]:
    """Plays lost (expected, not stored) and counted twice (stored beyond expected), by weight;
    with a ledger, a sample of the wrong (user, track) pairs and where their plays landed."""
    lost = doubled = 0.0
    users_off = 0
    wrong: list[tuple[str, str, float]] = []
    names = list(expected)
    for s in range(0, len(names), 1000):
        pipe = r.pipeline(transaction=False)
        for u in names[s : s + 1000]:
            pipe.hgetall(keys.history(u))
        for u, raw in zip(names[s : s + 1000], pipe.execute(), strict=True):
            stored = {k.decode(): float(v) for k, v in raw.items()}
            want = {t: w for t, w in expected[u].items() if w > 0}
            off = False
            for t in set(want) | set(stored):
                d = stored.get(t, 0.0) - want.get(t, 0.0)
                if abs(d) > 1e-6:
                    wrong.append((u, t, d))
                if d > 1e-6:
                    doubled += d
                    off = True
                elif d < -1e-6:
                    lost -= d
                    off = True
            users_off += off
    out: dict[str, Any] = {
        "lost_plays": lost,
        "doubled_plays": doubled,
        "users_checked": len(names),
        "users_wrong": users_off,
    }
    if ledger is not None and wrong:
        out["wrong_sample"] = [
            {"user": u, "track": t, "stored_minus_expected": d, "plays": ledger.where(u, t, t0)}
            for u, t, d in wrong[:40]
        ]
    return out


def dead_letter_check(bad_sent: set[str], dlq: list[tuple[bytes, str]]) -> dict[str, object]:
    seen: dict[str, list[str]] = defaultdict(list)
    for v, source in dlq:
        text = v.decode("utf-8", "replace")
        if text.startswith('{"bad": "'):
            seen[text[9:].rstrip('"')].append(source)
    return {
        "malformed_sent": len(bad_sent),
        "missing": len(bad_sent - set(seen)),
        "duplicates": sum(len(s) - 1 for s in seen.values() if len(s) > 1),
        "duplicate_sample": [s for s in seen.values() if len(s) > 1][:5],
    }


def dumps(x: object) -> str:
    return json.dumps(x, indent=2, default=float)
