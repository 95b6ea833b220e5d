"""`encore up` as a new user runs it: embedded servers, demo stream, model, fold-in, API."""

from __future__ import annotations

import json
import os
import queue
import re
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from services.produce import PlayPublisher

pytestmark = pytest.mark.e2e


def _get(url: str) -> tuple[int, dict]:
    try:
        with urllib.request.urlopen(url, timeout=5) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read() or b"{}")


def _children(pid: int) -> set[int]:
    out = subprocess.run(["ps", "-e", "-o", "pid=,ppid="], capture_output=True, text=True).stdout
    tree, found = {}, set()
    for line in out.split("\n"):
        if line.strip():
            p, pp = map(int, line.split())
            tree.setdefault(pp, []).append(p)
    stack = [pid]
    while stack:
        for c in tree.get(stack.pop(), []):
            found.add(c)
            stack.append(c)
    return found


def _read_until(proc: subprocess.Popen, marker: str, seconds: float, logs: Path) -> list[str]:
    """`proc`'s output lines up to the one holding `marker`; on timeout or exit, an assertion
    with the output and the tail of every service log (a reader thread: a silent process must
    not block the test forever)."""
    out: queue.Queue[str] = queue.Queue()
    threading.Thread(target=lambda: [out.put(line) for line in proc.stdout], daemon=True).start()  # type: ignore[union-attr]
    lines: list[str] = []
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        try:
            lines.append(out.get(timeout=1.0))
        except queue.Empty:
            if proc.poll() is not None:
                break
            continue
        if marker in lines[-1]:
            return lines
    tails = "".join(f"\n--- {f.name}\n" + f.read_text()[-2000:] for f in sorted(logs.glob("*.log")))
    raise AssertionError(f"no {marker!r} after {seconds:.0f}s (exit {proc.poll()}):\n" + "".join(lines) + tails)


def _up(tmp_path, **extra: str) -> tuple[subprocess.Popen, str, str, str, list[str]]:
    """Start `encore up` in `tmp_path` (its data folder is ./data) and read until it is running."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("ENCORE_")}
    env["ENCORE_API_PORT"] = "0"
    env.update(extra)
    proc = subprocess.Popen(
        [sys.executable, "-m", "services.cli", "up", "--users", "1500", "--tracks", "800", "--rate", "100"],
        env=env,
        cwd=tmp_path,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        lines = _read_until(proc, "Ctrl-C stops everything", 240, tmp_path / "data" / "logs")
    except AssertionError:
        _stop(proc)
        raise
    text = "".join(lines)
    up = re.search(r"encore up: Kafka (\S+), Redis (\S+)", text)
    ready = re.search(r"API ready at (http://\S+)", text)
    assert up and ready, text
    return proc, ready.group(1), up.group(1).rstrip(","), up.group(2), lines


def _stop(proc: subprocess.Popen) -> None:
    proc.send_signal(signal.SIGINT)
    try:
        proc.wait(timeout=90)
    finally:
        if proc.poll() is None:
            proc.kill()


def test_encore_up_end_to_end(tmp_path) -> None:
    proc, url, kafka, redis_url, lines = _up(tmp_path)
    try:
        descendants = _children(proc.pid)
        assert len(descendants) >= 5  # broker, redis, foldin, serve, train, produce
        # A brand-new user's plays, through Kafka, become personal recommendations.
        status, body = _get(f"{url}/recommendations/newcomer")
        assert status == 200 and body.get("source") == "popular", (status, body)
        pub = PlayPublisher.connect(kafka, "plays")
        for t in ("t1", "t2", "t3", "t5", "t8"):
            pub.publish("newcomer", t, ms_played=200_000)
        pub.flush()
        t0 = time.monotonic()
        while time.monotonic() - t0 < 15:
            status, body = _get(f"{url}/recommendations/newcomer?n=10")
            if body.get("source") == "personal":
                break
            time.sleep(0.1)
        print(f"newcomer personal after {time.monotonic() - t0:.2f}s")
        assert body["source"] == "personal"
        assert not {"t1", "t2", "t3", "t5", "t8"} & {i["track_id"] for i in body["items"]}
        # A brand-new track with enough listeners shows up in /similar of what they play. The
        # seed is a track the model knows (the newcomer's first pick): t1, say, has one play in
        # the demo backlog and may be left out of the first model.
        anchor = body["items"][0]["track_id"]
        status, similar = _get(f"{url}/similar/{anchor}?n=5")
        assert status == 200, (status, similar)
        cluster = [anchor] + [i["track_id"] for i in similar["items"][:3]]
        for k in range(6):
            for t in cluster + ["fresh-release"]:
                pub.publish(f"fan{k}", t, ms_played=200_000, count=3)
        pub.flush()
        found = False
        t0 = time.monotonic()
        while time.monotonic() - t0 < 20 and not found:
            status, body = _get(f"{url}/similar/{anchor}?n=50")
            found = "fresh-release" in {i["track_id"] for i in body.get("items", [])}
            time.sleep(0.2)
        assert found
        # Each serve worker applies `factor-updates` on its own poll, so the next request may reach
        # a worker a poll behind the one that answered: every worker has it within seconds.
        t0, statuses = time.monotonic(), []
        while time.monotonic() - t0 < 5 and statuses[-4:] != [200] * 4:
            statuses.append(_get(f"{url}/similar/fresh-release?n=5")[0])
            time.sleep(0.05)
        print(f"fresh-release's own /similar, request by request: {statuses}")
        assert statuses[-4:] == [200] * 4, statuses
        ready = _get(f"{url}/ready")
        assert ready[0] == 200, ready
        version = ready[1]["model_version"]
    finally:
        _stop(proc)
    time.sleep(0.5)
    alive = [p for p in descendants if os.path.exists(f"/proc/{p}")]
    assert alive == [], alive
    assert (tmp_path / "data" / "checkpoint.npz").exists() and list((tmp_path / "data" / "redis").iterdir())

    # Started again in the same folder: the previous model is served before any training, and
    # every history is kept (the embedded Redis replays its append-only file).
    t0 = time.monotonic()
    proc, url, kafka, redis_url, lines = _up(tmp_path)
    try:
        ready_s = time.monotonic() - t0
        print(f"restart: API ready with the previous model after {ready_s:.1f}s")
        assert any("resuming: model" in line for line in lines), "".join(lines)
        ready = _get(f"{url}/ready")  # every worker's: `up` said ready only once all of them were
        assert ready[1].get("model_version") == version, ready
        body = _get(f"{url}/recommendations/newcomer?n=10")[1]
        assert body["source"] == "personal"
        import redis

        history = redis.Redis.from_url(redis_url).hgetall("encore:plays:user:newcomer")
        assert {k.decode() for k in history} == {"t1", "t2", "t3", "t5", "t8"}
    finally:
        _stop(proc)


def test_encore_up_on_an_external_redis_cluster(tmp_path, redis_cluster_url: str) -> None:
    """`encore up` with ENCORE_REDIS_URL naming a node of a Redis Cluster (Kafka embedded):
    detected as a cluster, trained, served; a newcomer's plays become personal recommendations,
    and the newcomer's history is where the README says (the user's bucket)."""
    import redis

    from services.infra.keys import Keys

    prefix = f"up{os.getpid()}:"
    proc, url, kafka, redis_url, lines = _up(tmp_path, ENCORE_REDIS_URL=redis_cluster_url, ENCORE_KEY_PREFIX=prefix)
    try:
        assert redis_url == redis_cluster_url
        pub = PlayPublisher.connect(kafka, "plays")
        for t in ("t1", "t2", "t3"):
            pub.publish("newcomer", t, ms_played=200_000)
        pub.flush()
        t0 = time.monotonic()
        body: dict = {}
        while time.monotonic() - t0 < 20 and body.get("source") != "personal":
            body = _get(f"{url}/recommendations/newcomer?n=10")[1]
            time.sleep(0.2)
        assert body.get("source") == "personal", body
        rc = redis.RedisCluster.from_url(redis_cluster_url)
        buckets = int(rc.get(f"{prefix}cluster:buckets"))
        history = rc.hgetall(Keys(prefix, buckets).history("newcomer"))
        assert {k.decode() for k in history} == {"t1", "t2", "t3"}
        rc.close()
    finally:
        _stop(proc)
    assert proc.returncode == 0, "".join(lines)


def test_encore_up_secure(tmp_path) -> None:
    """`encore up --secure`: TLS on every hop with a throw-away CA, Redis as a limited ACL user,
    API keys made at start; the printed curl line works, a request without the key does not,
    and the Redis password is never printed."""
    import ssl

    env = {k: v for k, v in os.environ.items() if not k.startswith("ENCORE_")}
    env["ENCORE_API_PORT"] = "0"
    cmd = [sys.executable, "-m", "services.cli", "up", "--secure", "--users", "800", "--tracks", "400", "--rate", "50"]
    proc = subprocess.Popen(cmd, env=env, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lines: list[str] = []
    try:
        lines = _read_until(proc, "Ctrl-C stops everything", 240, tmp_path / "data" / "logs")
        out = "".join(lines)
        m = re.search(r"curl --cacert (\S+) -H 'Authorization: Bearer (\S+)' (https://\S+)", out)
        assert m, out
        ca, key, url = m.groups()
        assert re.search(r"Redis rediss://127\.0\.0\.1:\d+/0", out), out
        context = ssl.create_default_context(cafile=ca)
        ok = urllib.request.Request(url, headers={"Authorization": f"Bearer {key}"})
        with urllib.request.urlopen(ok, timeout=10, context=context) as r:
            assert r.status == 200 and json.loads(r.read())["items"]
        try:
            urllib.request.urlopen(url, timeout=10, context=context)
            raise AssertionError("answered without a key")
        except urllib.error.HTTPError as e:
            assert e.code == 401
        password = (tmp_path / "data" / "secure" / "redis.password").read_text().strip()
        assert password and password not in out
    finally:
        _stop(proc)
    assert proc.returncode == 0, "".join(lines)
