"""Fault injection shared by the chaos soak and the fault tests: real processes, real data.

A Redis "snapshot" here is every key under a prefix with its value (DUMP) and time to live;
restoring it replaces those keys, exactly what an operator's restore of an older backup does to
the keys Encore owns. Process faults are real signals to real child processes.
"""

from __future__ import annotations

import os
import signal
import subprocess

import redis

Snapshot = list[tuple[bytes, int, bytes]]


def snapshot(r: redis.Redis, prefix: str) -> Snapshot:
    """Every key under `prefix`: (key, ttl in ms or 0, DUMP payload)."""
    out: Snapshot = []
    for key in r.scan_iter(match=f"{prefix}*", count=1000):
        payload = r.dump(key)
        if payload is not None:
            ttl = int(r.pttl(key))
            out.append((key, max(ttl, 0), payload))
    return out


def restore(r: redis.Redis, prefix: str, snap: Snapshot) -> None:
    """Replace every key under `prefix` by the snapshot's (keys created since are deleted)."""
    keys = list(r.scan_iter(match=f"{prefix}*", count=1000))
    pipe = r.pipeline(transaction=True)
    for s in range(0, len(keys), 1000):
        pipe.delete(*keys[s : s + 1000])
    for key, ttl, payload in snap:
        pipe.restore(key, ttl, payload, replace=True)
    pipe.execute()


def sigkill(proc: subprocess.Popen[bytes]) -> None:
    """kill -9: no handler, no flush, no goodbye."""
    if proc.poll() is None:
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
