"""`encore serve` with several worker processes on one port, against real Redis and broker."""

from __future__ import annotations

import http.client
import json
import os
import re
import signal
import subprocess
import sys
import time
from dataclasses import fields
from pathlib import Path

import pytest
import redis

from core.synthetic import SyntheticMusic
from services.infra.embedded import free_port, spawn
from services.infra.keys import Keys
from services.infra.settings import Settings
from tests.integration.helpers import publish_synthetic_model, wait_for

pytestmark = pytest.mark.integration


def _serve(settings: Settings, tmp_path: Path, **env: str) -> tuple[subprocess.Popen[bytes], int, Path]:
    """`encore serve` as a child process on a free port, configured from `settings` plus `env`
    (ENCORE_* overrides); returns the process, its port and its log file."""
    full = {**os.environ, **{f"ENCORE_{f.name.upper()}": str(getattr(settings, f.name)) for f in fields(settings)}}
    full.update(env)
    port = free_port()
    log_path = tmp_path / "serve.log"
    proc = spawn([sys.executable, "-m", "services.cli", "serve", "--port", str(port)], log_path, full)
    return proc, port, log_path


def _get(port: int, path: str) -> tuple[int, bytes]:
    """One request on a fresh connection, so the kernel may hand it to any worker."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        conn.request("GET", path)
        resp = conn.getresponse()
        return resp.status, resp.read()
    finally:
        conn.close()


def _requests_counted(metrics: str, route: str) -> float:
    pattern = rf'^encore_http_requests_total\{{route="{re.escape(route)}",status="200"\}} (\S+)$'
    return sum(float(m.group(1)) for m in re.finditer(pattern, metrics, re.M))


def _workers(pid: int) -> list[int]:
    with open(f"/proc/{pid}/task/{pid}/children") as f:
        return [int(w) for w in f.read().split()]


def _shared_dirty_mb(pid: int) -> float:
    """Anonymous memory this process shares with others (a forked worker: its parent's pages)."""
    with open(f"/proc/{pid}/smaps_rollup") as f:
        return sum(int(line.split()[1]) for line in f if line.startswith("Shared_Dirty:")) / 1024


def _versions(port: int, times: int = 12) -> set[str]:
    """The versions /ready reports over `times` fresh connections (spread over the workers)."""
    out = set()
    for _ in range(times):
        status, body = _get(port, "/ready")
        out.add(json.loads(body).get("model_version", "") if status == 200 else "")
    return out


def test_two_workers_share_one_snapshot_roll_versions_and_count_together(
    settings: Settings, redis_client: redis.Redis, tmp_path
) -> None:
    """The parent loads the version once and forks the workers from it (they share its pages);
    a new version rolls the workers over; a killed worker is replaced; metrics sum over workers."""
    data = SyntheticMusic(n_users=300, n_tracks=400, seed=11)
    first = publish_synthetic_model(settings, redis_client, data)
    redis_client.hset(Keys(settings.key_prefix).history("u7"), mapping={"t1": 2.0})
    proc, port, log_path = _serve(settings, tmp_path, ENCORE_API_WORKERS="2")
    try:

        def on(version: str) -> bool:
            try:
                return _versions(port) == {version}
            except OSError:
                return False

        assert wait_for(lambda: on(first), timeout=120, every=0.5), log_path.read_text()
        answers = set()
        for _ in range(40):
            status, body = _get(port, "/recommendations/u7?n=10")
            assert status == 200
            items = json.loads(body)["items"]
            assert "t1" not in {i["track_id"] for i in items}
            answers.add(tuple(i["track_id"] for i in items))
        assert len(answers) == 1  # both workers answer from the same snapshot
        metrics = _get(port, "/metrics")[1].decode()
        # Prometheus multiprocess mode: the scrape sums both workers, whichever one answers it.
        assert _requests_counted(metrics, "/recommendations/{user_id}") == 40
        workers = _workers(proc.pid)
        assert len(workers) == 2
        # the interpreter, the libraries and the snapshot were loaded before the fork: shared
        assert all(_shared_dirty_mb(w) > 20 for w in workers), [_shared_dirty_mb(w) for w in workers]

        second = publish_synthetic_model(settings, redis_client, SyntheticMusic(n_users=300, n_tracks=450, seed=12))
        assert wait_for(lambda: on(second), timeout=120, every=0.5), log_path.read_text()
        # the old generation lingers a second on the connections it accepted, then exits
        assert wait_for(lambda: not any(os.path.exists(f"/proc/{w}") for w in workers), timeout=40)
        rolled = _workers(proc.pid)
        assert len(rolled) == 2 and not set(rolled) & set(workers)  # a new generation, forked from the new snapshot

        os.kill(rolled[0], signal.SIGKILL)
        assert wait_for(lambda: len(_workers(proc.pid)) == 2 and rolled[0] not in _workers(proc.pid), timeout=30)
        assert wait_for(lambda: on(second), timeout=60, every=0.5), log_path.read_text()
        last = _workers(proc.pid)
    finally:
        proc.terminate()
        proc.wait(timeout=60)
    log = log_path.read_text()
    assert proc.returncode == 0, log
    for version in (first, second):
        for space in ("ip", "cosine"):  # each graph built once, by the parent, for every worker
            assert len(re.findall(rf"index {version}/{space}: built", log)) == 1, log
            assert not re.findall(rf"index {version}/{space}: loaded from snapshot", log), log
    assert "exited (status" in log  # the killed worker was noticed and replaced
    assert wait_for(lambda: not any(os.path.exists(f"/proc/{w}") for w in last), timeout=20)  # none left behind


def test_a_retired_worker_answers_the_connection_it_accepted(
    settings: Settings, redis_client: redis.Redis, tmp_path
) -> None:
    """SIGTERM (a version roll retires the old generation this way): a connection the worker had
    already accepted still gets its request answered; uvicorn alone closed it unanswered at its
    next tick. Connections opened afterwards are answered by the replacement workers."""
    publish_synthetic_model(settings, redis_client, SyntheticMusic(n_users=100, n_tracks=80, seed=5))
    proc, port, log_path = _serve(settings, tmp_path, ENCORE_API_WORKERS="2")

    def up() -> bool:
        try:
            return len(_workers(proc.pid)) == 2 and _get(port, "/health")[0] == 200
        except OSError:
            return False

    try:
        assert wait_for(up, timeout=120), log_path.read_text()
        before = set(_workers(proc.pid))
        held = [http.client.HTTPConnection("127.0.0.1", port, timeout=30) for _ in range(8)]
        for conn in held:
            conn.connect()
        time.sleep(0.2)  # accepted by the workers, no request yet
        for pid in before:
            os.kill(pid, signal.SIGTERM)
        time.sleep(0.4)  # past uvicorn's tick (0.1 s), within the linger (1 s)
        for conn in held:
            conn.request("GET", "/health")
            resp = conn.getresponse()
            assert resp.status == 200
            resp.read()
            conn.close()
        assert wait_for(lambda: len(set(_workers(proc.pid)) - before) == 2, timeout=60), log_path.read_text()
        assert _get(port, "/health")[0] == 200
    finally:
        proc.terminate()
        proc.wait(timeout=60)


def test_workers_stop_when_the_serve_parent_is_killed(settings: Settings, redis_client: redis.Redis, tmp_path) -> None:
    """SIGKILL of the parent leaves no worker holding the port (they get SIGTERM from the kernel)."""
    publish_synthetic_model(settings, redis_client, SyntheticMusic(n_users=100, n_tracks=80, seed=3))
    proc, port, log_path = _serve(settings, tmp_path, ENCORE_API_WORKERS="2")

    def up() -> bool:
        try:
            return len(_workers(proc.pid)) == 2 and _get(port, "/health")[0] == 200
        except OSError:
            return False

    try:
        assert wait_for(up, timeout=120), log_path.read_text()
        workers = _workers(proc.pid)
    finally:
        proc.kill()
        proc.wait(timeout=30)
    assert len(workers) == 2, log_path.read_text()
    assert wait_for(lambda: not any(os.path.exists(f"/proc/{w}") for w in workers), timeout=30), log_path.read_text()


def test_serve_over_https_with_api_keys(settings: Settings, redis_client: redis.Redis, tmp_path) -> None:
    """`encore serve` with ENCORE_API_TLS_CERT/KEY and a read key, as a real process: HTTPS with
    a certificate that verifies against its CA, the key required, plain HTTP not answered."""
    import ssl

    from services.infra.throwaway_ca import make_certificates

    certs = make_certificates(tmp_path / "certs")
    publish_synthetic_model(settings, redis_client, SyntheticMusic(n_users=100, n_tracks=80, seed=2))
    proc, port, log_path = _serve(
        settings,
        tmp_path,
        ENCORE_API_WORKERS="1",
        ENCORE_API_TLS_CERT=str(certs.cert("server")),
        ENCORE_API_TLS_KEY=str(certs.key("server")),
        ENCORE_API_KEYS="k-read-1",
    )
    context = ssl.create_default_context(cafile=str(certs.ca))

    def get(path: str, key: str | None = None) -> tuple[int, bytes]:
        conn = http.client.HTTPSConnection("127.0.0.1", port, timeout=10, context=context)
        try:
            conn.request("GET", path, headers={"Authorization": f"Bearer {key}"} if key else {})
            resp = conn.getresponse()
            return resp.status, resp.read()
        finally:
            conn.close()

    def ready() -> bool:
        try:
            return get("/ready")[0] == 200
        except OSError:
            return False

    try:
        assert wait_for(ready, timeout=120, every=0.5), log_path.read_text()
        assert get("/similar/t1?n=3")[0] == 401
        status, body = get("/similar/t1?n=3", key="k-read-1")
        assert status == 200 and len(json.loads(body)["items"]) == 3
        with pytest.raises((OSError, http.client.HTTPException)):
            _get(port, "/health")  # plain HTTP on the TLS port gets no answer
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def test_one_worker_serves_in_the_command_process(settings: Settings, redis_client: redis.Redis, tmp_path) -> None:
    """ENCORE_API_WORKERS=1: no fork, uvicorn in the command's own process, the same answers."""
    version = publish_synthetic_model(settings, redis_client, SyntheticMusic(n_users=100, n_tracks=80, seed=6))
    redis_client.hset(Keys(settings.key_prefix).history("u3"), mapping={"t2": 2.0})
    proc, port, log_path = _serve(settings, tmp_path, ENCORE_API_WORKERS="1")
    try:

        def ready() -> bool:
            try:
                return _versions(port, times=1) == {version}
            except OSError:
                return False

        assert wait_for(ready, timeout=120, every=0.5), log_path.read_text()
        status, body = _get(port, "/recommendations/u3?n=5")
        assert status == 200
        items = json.loads(body)["items"]
        assert len(items) == 5 and "t2" not in {i["track_id"] for i in items}
        assert _workers(proc.pid) == []  # answered by the command's own process
    finally:
        proc.terminate()
        proc.wait(timeout=60)
