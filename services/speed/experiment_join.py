"""Online metrics per experiment arm: impressions joined with the plays that follow them.

Runs beside the fold-in worker (`encore foldin`) in its own group (`encore-experiments`),
reading `impressions` and `plays` together. A play of a track that a personal answer showed
the same user, within `ENCORE_JOIN_WINDOW_S` after it, counts for that answer's arm; per arm
Redis keeps impressions, *converted* impressions (followed by at least one such play) and such
plays (`experiment_apply.lua`).

Order: an impression must be applied before the plays that follow it, though the two topics are
read independently. Plays wait in a buffer until every assigned impressions partition has been
read past their record time (or is read to its end), then go in record-time order.

Exactly once: one script call applies a poll's records together with, per partition, the last
offset applied (the fence); a record at or below its fence is skipped. On assignment the
consumer seeks to the fence, so a crash at any point replays only what the fence does not
cover, and a Redis that lost this state (no fence) replays both topics from their start.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import Counter
from collections.abc import Callable

import orjson
import redis
from confluent_kafka import OFFSET_INVALID, Consumer, Message, TopicPartition

from core.events import Limits, PlayEvent, parse_play
from services.infra import rdkafka
from services.infra.assignment_watch import AssignmentWatch
from services.infra.experiment_metrics import export_arm_gauges
from services.infra.keys import Keys
from services.infra.lifecycle import Backoff, retry_step
from services.infra.lua import source

log = logging.getLogger(__name__)
GROUP = "encore-experiments"
RECORDS_PER_POLL = 5000
EXPORT_EVERY_S = 5.0


Held = tuple[float, Message]  # a plays record read but not yet applied, with its record time (s)


def user_of(raw: bytes | None) -> str | None:
    """The `user_id` of a plays record's value, or None if it has none (it cannot join)."""
    try:
        d = orjson.loads(raw or b"")
    except orjson.JSONDecodeError:
        return None
    u = d.get("user_id") if isinstance(d, dict) else None
    return u if isinstance(u, str) else None


def user_of_record(m: Message) -> bytes | None:
    """Whose play a record may be, UTF-8: its key (the schema's key = user id), else its value's
    `user_id`. Cheaper than `parse_play`, which only a play of a user with impressions needs
    (and which has the last word: a record keyed by another user does not join)."""
    key = m.key()
    if key:
        return key  # type: ignore[no-any-return]
    user = user_of(m.value())
    return user.encode() if user is not None else None


class ExperimentJoin:
    """Component: `run` until `stop`; `step` applies one poll (tests drive it by hand)."""

    def __init__(
        self,
        r: redis.Redis,
        keys: Keys,
        consumer: Consumer,
        impressions_topic: str,
        plays_topic: str,
        incarnations: dict[str, str],
        window_s: float,
        min_ms_played: int,
    ) -> None:
        self.r, self.keys, self.consumer = r, keys, consumer
        self.impressions_topic, self.plays_topic, self.incarnations = impressions_topic, plays_topic, incarnations
        self.window_s, self.min_ms_played = window_s, min_ms_played
        self.script = r.register_script(source("experiment_apply"))
        self._existing = r.register_script(source("existing_keys"))
        self._impressions_prefix = keys.impressions_of("").encode()
        self.stop_event = threading.Event()
        self.held: list[Held] = []
        self._pending: list[Message] | None = None  # read, not yet applied
        self._exported_at = 0.0
        self.started_at: dict[int, int | None] = {}  # impressions partition → offset read from
        self.seen_ts: dict[int, float] = {}  # impressions partition → record time of the last one read
        self.counts = {"impressions": 0, "plays": 0, "joined": 0, "replayed": 0}
        consumer.subscribe([impressions_topic, plays_topic], on_assign=self._on_assign, on_revoke=self._on_revoke)
        self.unassigned = AssignmentWatch("experiment join")
        self._closing = False

    def fence_field(self, topic: str, partition: int) -> str:
        return f"{topic}|{self.incarnations.get(topic, '')}|{partition}"

    def _on_assign(self, consumer: Consumer, partitions: list[TopicPartition]) -> None:
        """Start each partition just past its fence (where the metrics stand), if it has one.
        Not while closing: librdkafka can deliver a late assignment inside `close`, where asking
        for committed offsets fails (handle destroyed) and the error escapes `close` (seen in CI)."""
        if self._closing:
            return
        fields = [self.fence_field(p.topic, p.partition) for p in partitions]
        fences = self.r.hmget(self.keys.experiment_fence, fields)
        committed = {(c.topic, c.partition): c.offset for c in consumer.committed(partitions, timeout=10.0)}
        self.started_at = {}
        for p, fence in zip(partitions, fences, strict=True):
            if fence is not None:
                p.offset = int(fence) + 1
            if p.topic == self.impressions_topic:  # None: from the partition's start (no fence, no commit)
                start = p.offset if fence is not None else committed.get((p.topic, p.partition), OFFSET_INVALID)
                self.started_at[p.partition] = start if start >= 0 else None  # type: ignore[assignment]
        self.held, self._pending, self.seen_ts = [], None, {}
        consumer.assign(partitions)

    def _on_revoke(self, consumer: Consumer, partitions: list[TopicPartition]) -> None:
        self.held, self._pending = [], None  # not applied: the next owner reads them again from the fence

    def _watermark(self, latest: float) -> float:
        """Record time up to which every assigned impressions partition has been read, as far as
        it matters for plays up to record time `latest`. A partition read past `latest` is fine
        as it is; otherwise the broker is asked for its end (not the fetch-cached one, which lags
        behind a plays fetch that already returned): a partition read to that end holds no unread
        impression older than the plays already read."""
        mark = float("inf")
        for tp in self.consumer.assignment():
            if tp.topic != self.impressions_topic:
                continue
            seen = self.seen_ts.get(tp.partition, float("-inf"))
            if seen >= latest:
                continue
            low, high = self.consumer.get_watermark_offsets(tp, timeout=10.0, cached=False)
            position = self.consumer.position([tp])[0].offset
            if position == OFFSET_INVALID:  # nothing consumed since the assignment: where it started
                start = self.started_at.get(tp.partition, OFFSET_INVALID)
                position = low if start is None else start
            if position == OFFSET_INVALID or position < high:
                mark = min(mark, seen)
        return mark

    def _release(self, held: list[Held]) -> tuple[list[Held], list[Held]]:
        """(ready, still held): per plays partition, the longest prefix of held records that every
        impression before them has been read for."""
        if not held:
            return [], []
        mark = self._watermark(max(at for at, _ in held))
        if all(at <= mark for at, _ in held):  # the usual case: no impression partition lags
            return held, []
        ready: list[Held] = []
        keep: list[Held] = []
        blocked: set[int] = set()
        for h in held:  # held in read order: per partition, offset order
            p = h[1].partition()
            if p not in blocked and h[0] <= mark:
                ready.append(h)
            else:
                blocked.add(p)
                keep.append(h)
        return ready, keep

    def step(self, timeout: float = 0.5) -> int:
        """Read one poll, apply what may be applied; returns the records applied."""
        ops: list[dict[str, object]] = []
        users: dict[str, int] = {}

        def user_key(user_id: str) -> int:
            if user_id not in users:
                users[user_id] = len(users) + 3  # KEYS index (1-based; 1 and 2 are fence and metrics)
            return users[user_id]

        if self._pending is None:  # after a fault the same records are built into the same ops
            self._pending = rdkafka.data_messages(self.consumer.consume(num_messages=RECORDS_PER_POLL, timeout=timeout))
        held = list(self.held)
        shown: set[str] = set()  # users with an impression in this poll
        for m in self._pending:
            if m.topic() == self.impressions_topic:
                field = self.fence_field(m.topic(), m.partition())
                self.seen_ts[m.partition()] = m.timestamp()[1] / 1000.0
                try:
                    imp = orjson.loads(m.value() or b"")
                    op = {"i": 1, "rid": str(imp["request_id"]), "arm": str(imp["arm"]), "ts": float(imp["ts"])}
                    op.update({"exp": imp.get("experiment") or "", "items": [str(t) for t in imp["items"]]})
                    op.update({"f": field, "o": m.offset(), "k": user_key(str(imp["user_id"]))})
                    shown.add(str(imp["user_id"]))
                except (orjson.JSONDecodeError, KeyError, TypeError, ValueError) as exc:
                    log.warning("experiments: skipped a malformed impression at %s: %s", field, exc)
                    op = {"f": field, "o": m.offset(), "k": user_key(""), "track": "", "ts": 0.0}  # moves the fence
                ops.append(op)
            else:
                held.append((m.timestamp()[1] / 1000.0, m))
        ready, keep = self._release(held)
        ops += self._play_ops(ready, shown, user_key)  # after every impression of this poll
        if not ops:
            self.held, self._pending = keep, None
            return 0
        keys = [self.keys.experiment_fence, self.keys.experiment_metrics, *(self.keys.impressions_of(u) for u in users)]
        n_imp, n_play, joined, skipped = self.script(keys=keys, args=[orjson.dumps(ops), self.window_s])
        self.held, self._pending = keep, None
        self.counts["impressions"] += n_imp
        self.counts["plays"] += n_play
        self.counts["joined"] += joined
        self.counts["replayed"] += skipped
        self._commit(ops)
        self._export()
        return n_imp + n_play + skipped

    def _with_impressions(self, users: list[bytes]) -> set[bytes]:
        """Those of `users` (UTF-8) that have an impressions hash (any recent impression)."""
        if not users:
            return set()
        found = self._existing(keys=[self._impressions_prefix + u for u in users])
        return {users[int(i) - 1] for i in found}

    def _play_ops(self, ready: list[Held], shown: set[str], user_key: Callable[[str], int]) -> list[dict[str, object]]:
        """Ops for released plays, per partition in offset order. Only a play of a user with an
        impression (in Redis, or in this poll) can join: it gets its own op; every other record
        only moves the fence, so runs of them collapse into the next op's `n` (or one op at the
        run's last offset), which keeps the script's work to the plays that matter."""
        msgs = [m for _, m in ready]
        uids = [user_of_record(m) for m in msgs]
        shown_b = {u.encode() for u in shown}
        asked = sorted({u for u in uids if u is not None} - shown_b)
        candidates = self._with_impressions(asked) | shown_b
        limits = Limits(now=time.time() + 86_400 * 365)
        ops: list[dict[str, object]] = []
        since: dict[int, int] = {}  # partition → records since its last op
        if not candidates:  # the usual poll: nothing joins, each partition's records are one op
            since = dict(Counter(m.partition() for m in msgs))
        else:
            for m, uid in zip(msgs, uids, strict=True):
                part = m.partition()
                ev = parse_play(m.value(), limits) if uid in candidates else None
                if isinstance(ev, PlayEvent) and ev.weight(self.min_ms_played) > 0:
                    f = self.fence_field(self.plays_topic, part)
                    k, n = user_key(ev.user_id), since.get(part, 0) + 1
                    ops.append({"f": f, "o": m.offset(), "k": k, "track": ev.track_id, "ts": ev.ts, "n": n})
                    since[part] = 0
                else:
                    since[part] = since.get(part, 0) + 1
        last = {m.partition(): m.offset() for m in msgs}  # read order: per partition, the last one wins
        for part, n in since.items():
            if n:
                f = self.fence_field(self.plays_topic, part)
                ops.append({"f": f, "o": last[part], "k": user_key(""), "track": "", "ts": 0.0, "n": n})
        return ops

    def _export(self) -> None:
        """Per-arm gauges for Prometheus, from the counts in Redis (every few seconds)."""
        if time.monotonic() - self._exported_at < EXPORT_EVERY_S:
            return
        self._exported_at = time.monotonic()
        export_arm_gauges(self.r, self.keys)

    def _commit(self, ops: list[dict[str, object]]) -> None:
        """Commit for lag reporting only (the fence is what resumes): up to the first held play."""
        lowest_held: dict[tuple[str, int], int] = {}
        for _, m in self.held:
            k = (m.topic(), m.partition())
            lowest_held[k] = min(lowest_held.get(k, m.offset()), m.offset())
        done: dict[tuple[str, int], int] = {}
        for op in ops:
            topic, _inc, part = str(op["f"]).split("|")
            k = (topic, int(part))
            done[k] = max(done.get(k, -1), int(str(op["o"])))
        offsets = [TopicPartition(t, p, min(o + 1, lowest_held.get((t, p), o + 1))) for (t, p), o in done.items()]
        if offsets:
            self.consumer.commit(offsets=offsets, asynchronous=True)

    def run(self) -> None:
        backoff = Backoff(first=1.0)
        while not self.stop_event.is_set():
            retry_step(self._poll, self.stop_event, "experiment join", backoff)

    def _poll(self) -> None:
        self.step()
        self.unassigned.check(self.consumer)

    def stop(self) -> None:
        self.stop_event.set()

    def close(self) -> None:
        self._closing = True
        self.consumer.close()
