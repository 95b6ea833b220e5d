"""Open-loop HTTP load at a fixed rate from one asyncio event loop (uvloop when installed).

Request i is due at start + i/rate whether or not earlier ones have answered, and its latency
counts from that due time (no coordinated omission: a stalled server is charged for every
request it delays). One event loop sends on a pool of keep-alive connections, opening another
when all are busy. The earlier generator used 16 Python threads with http.client; on a 2-core
machine their GIL hand-offs (5 ms switch interval) showed up in the measured tail.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from dataclasses import dataclass, field

Request = tuple[str, str, bytes]  # (method, path, JSON body or b"")
# Requests still unanswered this long after the last one was sent count as errors ("Unanswered")
# and the run ends, rather than waiting forever on a hung server (one timer, not one per request).
DRAIN_TIMEOUT_S = 30.0


@dataclass
class LoadResult:
    """Latency in seconds per route, failures, and the achieved rate."""

    latencies: dict[str, list[float]] = field(default_factory=dict)
    errors: int = 0
    error_kinds: dict[str, int] = field(default_factory=dict)
    connections: int = 0
    seconds: float = 0.0
    cpu_seconds: float = 0.0  # of this (load-generating) process during the run
    timeline: list[tuple[float, float]] = field(default_factory=list)  # (due, latency) in seconds from start
    statuses: dict[int, int] = field(default_factory=dict)  # answers by HTTP status
    failed_at: list[float] = field(default_factory=list)  # due times (s from start) of non-200 answers
    failures: list[tuple[float, int, str]] = field(default_factory=list)  # (due, status, path), first 200

    def all(self) -> list[float]:
        return [x for xs in self.latencies.values() for x in xs]


async def _exchange(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, host: str, req: Request) -> int:
    method, path, body = req
    head = f"{method} {path} HTTP/1.1\r\nHost: {host}\r\nContent-Length: {len(body)}\r\n"
    if body:
        head += "Content-Type: application/json\r\n"
    writer.write(head.encode() + b"\r\n" + body)
    status_line = await reader.readline()
    if not status_line:  # the server closed an idle keep-alive connection
        raise ConnectionResetError("connection closed before the response")
    status = int(status_line.split()[1])
    length = 0
    while (line := await reader.readline()) not in (b"\r\n", b""):
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            length = int(value)
    await reader.readexactly(length)
    return status


async def _run(
    host: str, port: int, rate: float, total: int, make: Callable[[int], tuple[str, Request]], max_connections: int
) -> LoadResult:
    res = LoadResult()
    idle: list[tuple[asyncio.StreamReader, asyncio.StreamWriter]] = []
    slots = asyncio.Semaphore(max_connections)  # a client's connection pool: beyond it, requests wait
    pending: set[asyncio.Task[None]] = set()
    loop = asyncio.get_running_loop()
    clock = time.perf_counter  # uvloop's loop.time() only ticks in whole milliseconds
    start = clock() + 0.2

    async def one(i: int, due: float) -> None:
        route, req = make(i)
        ok, status = False, 0
        async with slots:
            conn = idle.pop() if idle else None
            try:
                if conn is not None:  # reused: if the server closed it meanwhile, retry once on a new one
                    try:
                        status = await _exchange(conn[0], conn[1], host, req)
                    except ConnectionResetError:
                        conn[1].close()
                        conn = None
                if conn is None:
                    conn = await asyncio.open_connection(host, port)
                    res.connections += 1
                    status = await _exchange(conn[0], conn[1], host, req)
                ok = status == 200
                idle.append(conn)
            except (OSError, ValueError, IndexError, asyncio.IncompleteReadError) as exc:
                res.error_kinds[type(exc).__name__] = res.error_kinds.get(type(exc).__name__, 0) + 1
                if conn is not None:
                    conn[1].close()
        res.latencies.setdefault(route, []).append(clock() - due)
        res.timeline.append((due - start, res.latencies[route][-1]))
        res.errors += 0 if ok else 1
        res.statuses[status] = res.statuses.get(status, 0) + 1
        if not ok:
            res.failed_at.append(due - start)
            if len(res.failures) < 200:
                res.failures.append((round(due - start, 2), status, req[1]))

    cpu0 = time.process_time()
    for i in range(total):
        due = start + i / rate
        delay = due - clock()
        if delay > 0:
            await asyncio.sleep(delay)
        task = loop.create_task(one(i, due))
        pending.add(task)
        task.add_done_callback(pending.discard)
    if pending:
        _, hung = await asyncio.wait(pending, timeout=DRAIN_TIMEOUT_S)
        for task in hung:
            task.cancel()
        if hung:
            res.errors += len(hung)
            res.error_kinds["Unanswered"] = len(hung)
    res.seconds = clock() - start
    res.cpu_seconds = time.process_time() - cpu0
    for _, writer in idle:
        writer.close()
    return res


def run_load(
    host: str,
    port: int,
    rate: float,
    seconds: float,
    make: Callable[[int], tuple[str, Request]],
    max_connections: int = 32,
) -> LoadResult:
    """Send int(rate × seconds) requests over at most `max_connections` keep-alive connections;
    make(i) names request i's route and builds it."""
    try:
        import uvloop

        runner: Callable[..., LoadResult] = uvloop.run
    except ImportError:  # pragma: no cover - uvloop comes with uvicorn[standard]
        runner = asyncio.run
    return runner(_run(host, port, rate, int(rate * seconds), make, max_connections))
