"""Fault injection shared by the chaos soak and the fault tests: real processes, real data.

A Redis "snapshot" here is every key under a prefix with its value (DUMP) and time to live;
restoring it replaces those keys, exactly what an operator's restore of an older backup does to
the keys Encore owns. Process faults are real signals to real child processes.
"""

from __future__ import annotations

import os
import signal
import subprocess
import time

import redis

from services.infra.embedded import EmbeddedServers

Snapshot = list[tuple[bytes, int, bytes]]


# Both run as one script: a point-in-time copy and an all-or-nothing restore, as a backup is.
_SNAPSHOT = """
local out = {}
for _, k in ipairs(redis.call('KEYS', ARGV[1])) do
  out[#out + 1] = k
  out[#out + 1] = math.max(redis.call('PTTL', k), 0)
  out[#out + 1] = redis.call('DUMP', k)
end
return out
"""
_RESTORE = """
local keys = redis.call('KEYS', ARGV[1])
for s = 1, #keys, 1000 do
  redis.call('DEL', unpack(keys, s, math.min(s + 999, #keys)))
end
for i = 2, #ARGV, 3 do
  redis.call('RESTORE', ARGV[i], ARGV[i + 1], ARGV[i + 2], 'REPLACE')
end
return #keys
"""


def snapshot(r: redis.Redis, prefix: str) -> Snapshot:
    """Every key under `prefix` at one instant: (key, ttl in ms or 0, DUMP payload)."""
    flat = r.eval(_SNAPSHOT, 0, f"{prefix}*")
    return [(flat[i], int(flat[i + 1]), flat[i + 2]) for i in range(0, len(flat), 3)]


def restore(r: redis.Redis, prefix: str, snap: Snapshot) -> None:
    """Replace every key under `prefix` by the snapshot's, atomically (keys created since go)."""
    argv: list[object] = [f"{prefix}*"]
    for key, ttl, payload in snap:
        argv += [key, ttl, payload]
    r.eval(_RESTORE, 0, *argv)  # type: ignore[arg-type]


def sigkill(proc: subprocess.Popen[bytes]) -> None:
    """kill -9: no handler, no flush, no goodbye."""
    if proc.poll() is None:
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()


def children_of(pid: int) -> list[int]:
    """Direct children of `pid` (e.g. the worker processes of `encore serve`)."""
    out = subprocess.run(["ps", "-o", "pid=", "--ppid", str(pid)], capture_output=True, text=True).stdout
    return [int(x) for x in out.split()]


def kill_server(servers: EmbeddedServers, name: str) -> int:
    """SIGKILL the embedded `name` ("redis" or "tansu") and return the port it listened on."""
    proc = next(p for p in servers.procs if name in str(p.args))
    sigkill(proc)
    servers.procs.remove(proc)
    url = servers.redis_url if name == "redis" else servers.kafka_bootstrap
    return int(url.rsplit(":", 1)[1].split("/")[0])


def restart_redis_hard(servers: EmbeddedServers, down_s: float = 1.0) -> None:
    """kill -9 Redis, then start it on the same port and folder: it replays its append-only
    file, which may miss the last second of writes (appendfsync everysec)."""
    port = kill_server(servers, "redis")
    time.sleep(down_s)
    servers.start_redis(port)


def restart_broker(servers: EmbeddedServers) -> None:
    """kill -9 the memory-only broker and start a new, empty one on the same port (a new
    incarnation: new cluster id, offsets from zero)."""
    port = kill_server(servers, "tansu")
    servers.start_kafka(port)
