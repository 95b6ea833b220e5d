"""`encore up` as a new user runs it: embedded servers, demo stream, model, fold-in, API."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request

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
    lines: list[str] = []
    deadline = time.monotonic() + 240
    url = kafka = redis_url = None
    while time.monotonic() < deadline and proc.poll() is None:
        line = proc.stdout.readline()  # type: ignore[union-attr]
        lines.append(line)
        if m := re.search(r"encore up: Kafka (\S+), Redis (\S+)", line):
            kafka, redis_url = m.group(1).rstrip(","), m.group(2)
        if m := re.search(r"API ready at (http://\S+)", line):
            url = m.group(1)
        if "Ctrl-C stops everything" in line:
            break
    assert url and kafka and redis_url, "".join(lines)
    return proc, url, kafka, redis_url, lines


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
        assert _get(f"{url}/similar/fresh-release?n=5")[0] == 200
        version = _get(f"{url}/ready")[1]["model_version"]
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
        assert _get(f"{url}/ready")[1]["model_version"] == version
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
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline and proc.poll() is None:
            lines.append(proc.stdout.readline())  # type: ignore[union-attr]
            if "Ctrl-C stops everything" in lines[-1]:
                break
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
