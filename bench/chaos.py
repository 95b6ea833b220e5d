"""Chaos soak: every fault, more than once, while plays stream and the API answers.

    python -m bench.chaos                      # 1M plays, every fault twice
    python -m bench.chaos --plays 10000000     # the long run
    python -m bench.chaos --small              # CI: tens of thousands of plays, every fault once

Embedded broker and Redis, two `encore foldin`, one `encore train` retraining every few seconds,
`encore serve` with two workers under an open-loop HTTP load. A schedule injects: SIGKILL of a
fold-in worker, of the trainer mid-retrain and mid-checkpoint, of a serve worker, of Redis
(restarted on its append-only file), a restore of Redis from an older snapshot, and a restart of
the memory-only broker (planned: producer paused and fold-in drained first, since that broker
keeps no log; a new incarnation follows). At the end every user's history is compared with what
the broker acknowledged, the dead-letter topic with the malformed events sent. Writes
bench/results/chaos.json (chaos_small.json with --small).
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import redis

from bench import faults
from bench.chaos_report import ready, serving_summary, serving_version
from bench.chaos_stream import PlayStream, compare, dead_letter_check, dumps, probe, read_topic
from bench.common import write
from bench.loadgen import run_load
from services.cli import process_defaults
from services.cli.root import Root
from services.cli.status import gather
from services.infra.checked_files import temp_path
from services.infra.data_dir import DataDir
from services.infra.embedded import EmbeddedServers, free_port, spawn, stop_processes
from services.infra.settings import Settings

FAULTS = (
    "foldin",
    "train_mid_retrain",
    "serve_worker",
    "redis_kill",
    "redis_restore",
    "train_mid_checkpoint",
    "broker",
)


class Soak:
    """The servers, the child processes and the fault actions."""

    def __init__(self, args: argparse.Namespace, workdir: Path) -> None:
        self.args, self.workdir = args, workdir
        self.servers = EmbeddedServers.start(workdir=str(workdir / "redis"))
        self.port = free_port()
        self.s = Settings(
            kafka_bootstrap=self.servers.kafka_bootstrap,
            redis_url=self.servers.redis_url,
            data_dir=str(workdir / "data"),
            factors=32,
            iterations=6,
            retrain_interval_s=args.retrain_s,
            history_cap=100_000,
            api_port=self.port,
            api_workers=2,
            publish_guard=0.0,
        )
        self.env = {**os.environ, **{k: v for k, v, _ in self.s.describe()}, "ENCORE_REDIS_URL": self.s.redis_url}
        self.procs: dict[str, Any] = {}
        self.r = redis.Redis.from_url(self.s.redis_url, socket_timeout=5)
        self.root = Root(self.s)
        self.snapshot: faults.Snapshot | None = None
        self.injected_at = 0.0  # when the current fault actually struck (recovery counts from here)
        self.dlq: list[tuple[bytes, str]] = []

    def start(self, name: str, *args: str) -> None:
        cmd = [sys.executable, "-m", "services.cli", *args]
        self.procs[name] = spawn(cmd, self.workdir / f"{name}.log", self.env)

    def wait(self, cond: Any, limit: float = 120.0, every: float = 0.05) -> bool:
        deadline = time.monotonic() + limit
        while time.monotonic() < deadline:
            try:
                if cond():
                    return True
            except Exception:
                pass
            time.sleep(every)
        return False

    def strike(self) -> None:
        self.injected_at = time.time()

    def foldin_lag(self) -> int:
        return int(gather(self.root)["groups"]["encore-foldin"]["lag"])

    # ---- faults: each returns a note on what it did ----------------------------------
    def foldin(self, k: int) -> str:
        name = f"foldin{k % 2}"
        self.strike()
        faults.sigkill(self.procs[name])
        self.start(name, "foldin")
        return f"SIGKILL {name}, restarted"

    def _trainer_kill_when(self, cond: Any, what: str, every: float = 0.01) -> str:
        caught = self.wait(cond, limit=3 * self.args.retrain_s, every=every)
        self.strike()
        faults.sigkill(self.procs["train"])
        self.start("train", "train")
        return f"SIGKILL trainer {'mid-' + what if caught else '(moment not caught: ' + what + ')'}, restarted"

    def train_mid_retrain(self, k: int) -> str:
        board = self.root.board()

        def retraining() -> bool:
            t = board.trainer()
            return float(t.get("retrain_started_at", 0)) > float(t.get("last_retrain_at", 0))

        return self._trainer_kill_when(retraining, "retrain")

    def train_mid_checkpoint(self, k: int) -> str:
        tmp = temp_path(DataDir.of(self.s.data_dir).checkpoint)
        return self._trainer_kill_when(tmp.exists, "checkpoint", every=0.0005)

    def serve_worker(self, k: int) -> str:
        kids = faults.children_of(self.procs["serve"].pid)
        cmd = {p: Path(f"/proc/{p}/cmdline").read_text(errors="replace") for p in kids}
        workers = [p for p in kids if "resource_tracker" not in cmd[p]]
        pid = workers[k % len(workers)]
        self.strike()
        os.kill(pid, 9)
        return f"SIGKILL serve worker {pid} of {len(workers)} (the serve parent forks another)"

    def redis_kill(self, k: int) -> str:
        self.strike()
        faults.restart_redis_hard(self.servers, down_s=1.0)
        return "SIGKILL Redis, restarted on its append-only file after 1 s"

    def take_snapshot(self) -> None:
        self.snapshot = faults.snapshot(self.r, self.s.key_prefix)

    def redis_restore(self, k: int) -> str:
        if self.snapshot is None:
            return "no snapshot"
        faults.restore(self.r, self.s.key_prefix, self.snapshot)
        self.strike()
        n, self.snapshot = len(self.snapshot), None
        return f"Redis restored from an older snapshot ({n} keys)"

    def broker(self, k: int, stream: PlayStream) -> str:
        stream.pause()
        drained = self.wait(lambda: self.foldin_lag() == 0, limit=60)
        time.sleep(2.0)  # the trainer polls every second
        self.dlq += read_topic(self.s.kafka_bootstrap, self.s.dlq_topic)
        self.strike()
        faults.restart_broker(self.servers)
        self.root.clients.ensure_topics()
        self.snapshot = None  # a snapshot of the old incarnation would point at a log that is gone
        stream.resume()
        return f"broker restarted empty (new incarnation); drained first: {drained}"

    def stop(self) -> None:
        stop_processes(list(self.procs.values()), timeout=30)
        self.root.close()
        self.servers.stop()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--plays", type=int, default=1_000_000)
    p.add_argument("--rate", type=float, default=2500.0, help="plays per second")
    p.add_argument("--users", type=int, default=20_000)
    p.add_argument("--tracks", type=int, default=5_000)
    p.add_argument("--http-rate", type=float, default=100.0)
    p.add_argument("--repeats", type=int, default=2, help="times each fault is injected")
    p.add_argument("--retrain-s", type=float, default=30.0)
    p.add_argument("--small", action="store_true", help="CI size: 40k plays, each fault once")
    p.add_argument("--out", type=Path, default=None, help="folder of the JSON result (default bench/results)")
    args = p.parse_args()
    if args.small:
        args.plays, args.rate, args.users, args.tracks = 40_000, 800.0, 3_000, 1_000
        args.repeats, args.retrain_s, args.http_rate = 1, 8.0, 50.0
    process_defaults()
    workdir = Path(tempfile.mkdtemp(prefix="encore-chaos-"))
    soak = Soak(args, workdir)
    try:
        result = run(soak, args)
    finally:
        soak.stop()
    print(dumps(result))
    write("chaos_small" if args.small else "chaos", result, args.out)


def run(soak: Soak, args: argparse.Namespace) -> dict[str, Any]:
    s = soak.s
    soak.root.clients.ensure_topics()
    stream = PlayStream(s.kafka_bootstrap, s.plays_topic, args.plays, args.rate, args.users, args.tracks, 997)
    soak.start("train", "train")
    for k in range(2):
        soak.start(f"foldin{k}", "foldin")
    stream.start()
    assert soak.wait(lambda: soak.root.models().current_version() is not None, 300), "no first model"
    # /similar asks for tracks of the version current before serve starts: every serve worker
    # loads that one or a later one (later versions only add tracks). A track of a version
    # published a moment ago is rightly a 404 on a worker that has not switched yet, and probes
    # of /ready cannot tell the workers apart, so they cannot prove every worker switched.
    version = soak.root.models().current_version() or ""
    soak.start("serve", "serve")
    assert soak.wait(lambda: ready(soak.port), 300), "serve never ready"
    assert soak.wait(lambda: serving_version(soak.port, version, 8), 120), "serve never loaded " + version
    loaded = soak.root.models().load(version)
    tracks = loaded.track_ids if loaded else ["t1"]
    duration = args.plays / args.rate
    rng = np.random.default_rng(3)

    def make(i: int) -> tuple[str, tuple[str, str, bytes]]:
        if i % 10 < 7:
            return "personal", ("GET", f"/recommendations/u{rng.integers(args.users)}?n=10", b"")
        return "similar", ("GET", f"/similar/{tracks[rng.integers(len(tracks))]}?n=10", b"")

    load: dict[str, Any] = {}
    t_load = time.time() + 0.2  # the generator's first request is due 0.2 s after it starts
    loader = threading.Thread(
        target=lambda: load.update(r=run_load("127.0.0.1", soak.port, args.http_rate, duration + 30, make)),
        daemon=True,
    )
    loader.start()
    schedule = [f for _ in range(args.repeats) for f in FAULTS]
    t0 = time.monotonic()
    events: list[dict[str, Any]] = []
    snapshots: list[float] = []  # when each snapshot used by a later restore was taken
    gap = duration * 0.8 / (len(schedule) + 1)
    for n, fault in enumerate(schedule):
        if fault == "redis_restore":  # snapshot taken some time before the restore (older state)
            soak.wait(lambda n=n: time.monotonic() - t0 >= gap * (n + 0.4), duration)
            soak.take_snapshot()
            snapshots.append(round(time.time() - t_load, 1))
        soak.wait(lambda n=n: time.monotonic() - t0 >= gap * (n + 1), duration)
        note = soak.broker(n, stream) if fault == "broker" else getattr(soak, fault)(n)
        at = soak.injected_at
        recovered = probe(s.kafka_bootstrap, s.plays_topic, soak.r, soak.root.keys, at, stream)
        events.append({"fault": fault, "at_s": round(at - t_load, 1), "note": note, "freshness_recovered_s": recovered})
        print(f"[{at - t_load:7.1f}s] {fault}: {note}; fresh again after {recovered}s", flush=True)
    stream.done.wait()
    caught_up = soak.wait(lambda: soak.foldin_lag() == 0, limit=300)
    time.sleep(3.0)
    check = compare(soak.r, soak.root.keys, stream.expected, stream.ledger, t_load)
    soak.dlq += read_topic(s.kafka_bootstrap, s.dlq_topic)
    loader.join(timeout=duration + 120)
    res = load.get("r")
    return {
        "config": {k: v for k, v in vars(args).items() if k != "out"},
        "plays_acknowledged": stream.acked,
        "plays_resent_after_failed_delivery": stream.resent,
        "faults": events,
        "snapshots_taken_at_s": snapshots,
        "caught_up": caught_up,
        "histories": check,
        "dead_letters": dead_letter_check(stream.bad_sent, soak.dlq),
        "serving": serving_summary(res, events, t_load) if res else None,
    }


if __name__ == "__main__":
    main()
