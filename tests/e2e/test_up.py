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


def test_encore_up_end_to_end(tmp_path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("ENCORE_")}
    env["ENCORE_API_PORT"] = "0"
    proc = subprocess.Popen(
        [sys.executable, "-m", "services.cli", "up", "--users", "1500", "--tracks", "800", "--rate", "100"],
        env=env,
        cwd=tmp_path,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    lines: list[str] = []
    try:
        deadline = time.monotonic() + 240
        url = kafka = None
        while time.monotonic() < deadline and proc.poll() is None:
            line = proc.stdout.readline()  # type: ignore[union-attr]
            lines.append(line)
            if m := re.search(r"encore up: Kafka (\S+), Redis", line):
                kafka = m.group(1).rstrip(",")
            if m := re.search(r"API ready at (http://\S+)", line):
                url = m.group(1)
            if "Ctrl-C stops everything" in line:
                break
        assert url and kafka, "".join(lines)
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
        # A brand-new track with enough listeners shows up in /similar of what they play.
        seed = _get(f"{url}/similar/t1?n=5")[1]["items"]
        cluster = ["t1"] + [i["track_id"] for i in seed[:3]]
        for k in range(6):
            for t in cluster + ["fresh-release"]:
                pub.publish(f"fan{k}", t, ms_played=200_000, count=3)
        pub.flush()
        found = False
        t0 = time.monotonic()
        while time.monotonic() - t0 < 20 and not found:
            status, body = _get(f"{url}/similar/t1?n=50")
            found = "fresh-release" in {i["track_id"] for i in body.get("items", [])}
            time.sleep(0.2)
        assert found
        assert _get(f"{url}/similar/fresh-release?n=5")[0] == 200
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(timeout=60)
        finally:
            if proc.poll() is None:
                proc.kill()
    time.sleep(0.5)
    alive = [p for p in descendants if os.path.exists(f"/proc/{p}")]
    assert alive == [], alive
