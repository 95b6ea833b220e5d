"""The serving hot path's pipelined Redis client against a real redis-server: the same replies
as redis-py, each concurrent caller its own answer, errors raised as redis-py's, and a dead or
silent server a clear failure followed by recovery (no answer ever goes to the wrong caller)."""

from __future__ import annotations

import asyncio
import shutil
import socket
import subprocess
from pathlib import Path

import numpy as np
import pytest
import redis
from redis.exceptions import ConnectionError, ResponseError, TimeoutError

from services.infra.embedded import free_port, spawn, stop_processes, wait_port
from services.infra.lean_redis import LeanRedis
from services.infra.settings import Settings

pytestmark = pytest.mark.integration


def test_replies_match_redis_py_and_concurrent_callers_get_their_own(
    settings: Settings, redis_client: redis.Redis
) -> None:
    p = settings.key_prefix
    r = redis_client
    for i in range(200):
        r.set(f"{p}v{i}", np.full(4, i, np.float32).tobytes())
        r.hset(f"{p}h{i}", mapping={f"t{j}": float(j) for j in range(i % 7 + 1)})
    r.set(f"{p}binary", b"\x00\r\n$*\xff")

    async def run() -> None:
        lean = LeanRedis(settings.redis_url, timeout_s=2.0)
        try:
            one = await lean.execute(("GET", f"{p}binary"), ("GET", f"{p}missing"), ("HKEYS", f"{p}missing"))
            assert one == [b"\x00\r\n$*\xff", None, []]
            calls = [
                lean.execute(("GET", f"{p}v{i}"), ("HKEYS" if i % 2 else "HGETALL", f"{p}h{i}")) for i in range(200)
            ]
            answers = await asyncio.gather(*calls)  # all written before the first answer is read
            for i, (raw, fields) in enumerate(answers):
                assert raw == r.get(f"{p}v{i}")
                want = r.hkeys(f"{p}h{i}") if i % 2 else [x for kv in r.hgetall(f"{p}h{i}").items() for x in kv]
                assert sorted(fields) == sorted(want)
            with pytest.raises(ResponseError, match="WRONGTYPE"):
                await lean.execute(("GET", f"{p}v1"), ("HKEYS", f"{p}v1"))
            assert (await lean.execute(("GET", f"{p}v2")))[0] == r.get(f"{p}v2")  # still usable after it
        finally:
            lean.close()

    asyncio.run(run())
    again = LeanRedis(settings.redis_url, timeout_s=2.0)
    for _ in range(2):  # one client, two event loops in turn (a test client's): each gets its own connection
        assert asyncio.run(asyncio.wait_for(again.execute(("GET", f"{p}v3")), 5)) == [r.get(f"{p}v3")]


@pytest.mark.skipif(shutil.which("redis-server") is None, reason="needs redis-server")
def test_a_killed_server_fails_clearly_and_a_restarted_one_is_used_again(tmp_path: Path) -> None:
    port = free_port()
    cmd = ["redis-server", "--port", str(port), "--save", "", "--appendonly", "no", "--dir", str(tmp_path)]

    def start() -> subprocess.Popen[bytes]:
        proc = spawn(cmd, str(tmp_path / "redis.log"))
        wait_port(port, proc, "redis-server")
        return proc

    proc = start()

    async def run() -> None:
        nonlocal proc
        lean = LeanRedis(f"redis://127.0.0.1:{port}/0", timeout_s=1.0)
        try:
            await lean.execute(("SET", "k", "before"))
            stop_processes([proc])
            with pytest.raises(ConnectionError):
                await lean.execute(("GET", "k"))
            proc = start()
            assert await lean.execute(("SET", "k", "after"), ("GET", "k")) == [b"OK", b"after"]
        finally:
            lean.close()

    try:
        asyncio.run(run())
    finally:
        stop_processes([proc])


def test_a_server_that_never_answers_is_a_timeout_for_every_waiting_caller() -> None:
    silent = socket.create_server(("127.0.0.1", 0))  # accepts (the kernel does), never answers
    port = silent.getsockname()[1]

    async def run() -> None:
        lean = LeanRedis(f"redis://127.0.0.1:{port}/0", timeout_s=0.3)
        try:
            results = await asyncio.gather(*(lean.execute(("GET", f"k{i}")) for i in range(5)), return_exceptions=True)
            assert all(isinstance(e, TimeoutError) for e in results), results
        finally:
            lean.close()

    try:
        asyncio.run(run())
    finally:
        silent.close()


def test_a_wrong_password_is_an_authentication_error(settings: Settings) -> None:
    async def run() -> None:
        lean = LeanRedis(settings.redis_url, timeout_s=2.0, username="nobody", password="wrong")
        with pytest.raises(ConnectionError, match="(?i)WRONGPASS|invalid"):  # AuthenticationError is one
            await lean.execute(("PING",))

    asyncio.run(run())
