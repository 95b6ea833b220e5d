"""The dashboard in a real headless Chromium: it loads without console messages and every
chart has data, drawn from a real stream (fold-in worker, trainer, serving, experiment join)."""

from __future__ import annotations

import base64
import os
import re
import shutil
import socket
import subprocess
import threading
import time
from pathlib import Path

import pytest
import redis
import uvicorn
from fastapi.testclient import TestClient

from services.cli.produce import produce, synthetic_stream
from services.cli.root import Root
from services.infra.settings import Settings
from services.produce import PlayPublisher
from tests.integration.helpers import WorkerThread, wait_for

pytestmark = pytest.mark.integration
CHARTS = ("freshness", "throughput", "lag", "dead", "holdout", "index", "arms")


def chromium() -> str:
    path = shutil.which("chromium") or shutil.which("chromium-browser")
    if path is None:
        if os.environ.get("CI"):
            pytest.fail("chromium is not installed (scripts/setup.sh installs it)")
        pytest.skip("no chromium on PATH")
    return path


def browse(url: str, tmp: Path, *extra: str) -> tuple[str, str]:
    """(DOM after the page's scripts ran, Chromium's log) of a headless load of `url`."""
    cmd = [
        chromium(),
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        f"--user-data-dir={tmp / 'profile'}",
        "--enable-logging=stderr",
        "--v=0",
        "--virtual-time-budget=3000",
        *extra,
        url,
    ]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    return done.stdout, done.stderr


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_dashboard_in_headless_chromium(settings: Settings, redis_client: redis.Redis, tmp_path: Path) -> None:
    s = settings.with_(experiment="dash:current=50,candidate=50", api_keys="reader-key")
    root = Root(s)
    root.clients.ensure_topics()
    pub = PlayPublisher.connect(s.kafka_bootstrap, s.plays_topic)
    produce(pub, synthetic_stream(300, 200, 3, None, live=False))
    pub.publish("u1", "t1", ts=time.time(), count=-5)  # a dead letter
    pub.flush()
    trainer = root.trainer()
    trainer.run_once()
    trainer.run_once()  # two versions: metrics over time
    trainer.close()
    candidate_trainer = root.trainer(candidate=True)
    candidate_trainer.run_once()
    candidate_trainer.close()
    worker = WorkerThread(s, "encore-foldin-dash")  # writes the per-minute figures
    pub.publish("u2", "t3", ts=time.time())
    pub.flush()
    assert wait_for(lambda: any(redis_client.scan_iter(f"{s.key_prefix}status:series:*")), timeout=60)
    app, follower = root.serving_app(follow=False)
    follower.refresh()
    follower.arms.refresh(follower.snapshot)
    auth = {"X-API-Key": "reader-key"}
    with TestClient(app) as client:
        shown = {}
        for i in range(40):
            body = client.get(f"/recommendations/u{i}?n=5", headers=auth).json()
            shown[f"u{i}"] = body["items"][0]["track_id"]
        for u, t in list(shown.items())[:20]:
            pub.publish(u, t, ts=time.time())
        pub.flush()
        join = root.experiment_join()
        assert wait_for(lambda: join.step(timeout=0.2) >= 0 and join.counts["joined"] >= 20, timeout=60)
        join.close()
        # Behind the read key: a browser gets the Basic prompt and may answer it with the key.
        denied = client.get("/dashboard")
        assert denied.status_code == 401 and denied.headers["www-authenticate"].startswith("Basic")
        basic = "Basic " + base64.b64encode(b"ops:reader-key").decode()
        assert client.get("/dashboard", headers={"Authorization": basic}).status_code == 200
        assert (
            client.get(
                "/dashboard", headers={"Authorization": "Basic " + base64.b64encode(b"x:no").decode()}
            ).status_code
            == 401
        )
    worker.stop()
    pub.close()

    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    try:
        assert wait_for(lambda: server.started, timeout=30)
        # Chromium answers the Basic challenge with the URL's credentials.
        dom, log = browse(f"http://reader:reader-key@127.0.0.1:{port}/dashboard", tmp_path, "--dump-dom")
        assert "CONSOLE" not in log, [line for line in log.splitlines() if "CONSOLE" in line]
        for chart in CHARTS:
            m = re.search(rf'<svg class="chart" id="{chart}"[^>]*data-points="(\d+)"', dom)
            assert m and int(m.group(1)) > 0, (chart, dom[:3000])
        assert "dash/candidate" in dom and "dash/current" in dom
        assert re.search(r"<td>ip</td><td>\d+</td>", dom) and "ef per band" in dom  # one band: small index
        shot = os.environ.get("ENCORE_TEST_DASHBOARD_SCREENSHOT")
        if shot:  # how docs/dashboard.png is made
            browse(
                f"http://reader:reader-key@127.0.0.1:{port}/dashboard",
                tmp_path,
                f"--screenshot={shot}",
                "--window-size=1400,1250",
                "--hide-scrollbars",
            )
    finally:
        server.should_exit = True
        thread.join(timeout=10)
    root.close()
