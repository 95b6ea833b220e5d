"""What `encore serve` uses while the serving bench loads it: CPU, memory, GC pauses and its own
latency histogram, read from /proc and from its /metrics."""

from __future__ import annotations

import contextlib
import os


def _cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of a process so far."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def family(pid: int) -> list[int]:
    """`encore serve` and its worker processes."""
    kids = []
    with contextlib.suppress(OSError):
        kids = [int(c) for c in open(f"/proc/{pid}/task/{pid}/children").read().split()]
    return [pid, *kids]


def serve_cpu(pid: int) -> float:
    """CPU seconds of `encore serve` and its worker processes."""
    return sum(_cpu_seconds(p) for p in family(pid))


def rss_mb(pid: int) -> list[float]:
    """Resident memory of each process of `encore serve`, in MB."""
    out = []
    for p in family(pid):
        with contextlib.suppress(OSError), open(f"/proc/{p}/status") as f:
            out += [int(line.split()[1]) / 1024 for line in f if line.startswith("VmRSS:")]
    return out


def pss_mb(pid: int) -> list[float]:
    """Proportional set size of each process of `encore serve`, in MB: a page shared by k
    processes counts 1/k in each, so the sum is what the replica holds (RSS would count pages
    the workers share with their parent once per process)."""
    out = []
    for p in family(pid):
        with contextlib.suppress(OSError), open(f"/proc/{p}/smaps_rollup") as f:
            out += [int(line.split()[1]) / 1024 for line in f if line.startswith("Pss:")]
    return out


def gc_pauses(metrics: str) -> dict[str, dict[str, float]]:
    """Per generation, from a process's /metrics (`encore_gc_pause_seconds`): the collector's
    pauses, their total ms, and how many lasted over 10 and over 50 ms (every thread waits)."""
    out: dict[str, dict[str, float]] = {}
    within: dict[tuple[str, str], float] = {}  # (generation, le) → pauses at most that long
    for line in metrics.splitlines():
        if not line.startswith("encore_gc_pause_seconds_"):
            continue
        gen = line.split('generation="', 1)[1].split('"', 1)[0]
        value = float(line.rsplit(" ", 1)[1])
        if line.startswith("encore_gc_pause_seconds_count{"):
            out.setdefault(gen, {})["pauses"] = value
        elif line.startswith("encore_gc_pause_seconds_sum{"):
            out.setdefault(gen, {})["total_ms"] = value * 1000
        elif 'le="0.01"' in line or 'le="0.05"' in line:
            within[(gen, line.split('le="', 1)[1].split('"', 1)[0])] = value
    for gen, row in out.items():
        row["over_10ms"] = row.get("pauses", 0.0) - within.get((gen, "0.01"), 0.0)
        row["over_50ms"] = row.get("pauses", 0.0) - within.get((gen, "0.05"), 0.0)
    return out


def server_buckets(after: str, before: str) -> dict[str, float]:
    """Share of requests the server itself (ASGI middleware, from /metrics) took longer than
    5, 10 and 20 ms during the load: what the server adds versus what waits outside it."""

    def counts(text: str) -> dict[str, float]:
        out: dict[str, float] = {}
        for line in text.splitlines():
            if line.startswith("encore_http_seconds_bucket{") and "/ready" not in line and "/metrics" not in line:
                le = line.split('le="', 1)[1].split('"', 1)[0]
                out[le] = out.get(le, 0.0) + float(line.rsplit(" ", 1)[1])
        return out

    a, b = counts(after), counts(before)
    d = {le: a[le] - b.get(le, 0.0) for le in a}
    total = d.get("+Inf", 0.0) or 1.0
    return {f"{ms}ms": 1 - d.get(le, 0.0) / total for ms, le in (("5", "0.005"), ("10", "0.01"), ("20", "0.02"))}
