"""`encore up`: the main job in one command, each service a real child process.

Everything it keeps lives under ENCORE_DATA_DIR (default `./data`): the embedded Redis's
append-only file (`redis/`), the trainer checkpoint, model artifacts and index snapshots, and
the logs. Started again in the same folder it serves the previous model at once (no training
first) and keeps every history. Ctrl-C drains: the demo producer stops, fold-in applies what
the broker holds, then the trainer checkpoints what it read, then the servers stop.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import ssl
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

from core.errors import ConfigError
from services.infra.clients import Clients
from services.infra.embedded import EmbeddedServers, free_port, spawn
from services.infra.settings import Settings, masked_url

DRAIN_S = 10.0  # at most this long for fold-in to apply what the broker holds at Ctrl-C


def _get(url: str, ca: Path | None = None, key: str = "") -> dict[str, object] | None:
    """GET → JSON, or None; over HTTPS verified against `ca`, with an API key when given."""
    context = ssl.create_default_context(cafile=str(ca)) if ca else None
    request = urllib.request.Request(url, headers={"Authorization": f"Bearer {key}"} if key else {})
    try:
        with urllib.request.urlopen(request, timeout=2, context=context) as resp:
            return json.loads(resp.read())  # type: ignore[no-any-return]
    except (OSError, ValueError):
        return None


class Children:
    """Child `encore` processes sharing one environment; stopped together."""

    def __init__(self, env: dict[str, str], log_dir: Path) -> None:
        self.env, self.log_dir = env, log_dir
        self.procs: dict[str, subprocess.Popen[bytes]] = {}
        log_dir.mkdir(parents=True, exist_ok=True)

    def start(self, name: str, *args: str) -> subprocess.Popen[bytes]:
        proc = spawn([sys.executable, "-m", "services.cli", *args], self.log_dir / f"{name}.log", self.env)
        self.procs[name] = proc
        return proc

    def stop(self, *names: str) -> None:
        """SIGTERM (each drains) then wait; `names` first in that order, all when none given."""
        procs = [self.procs[n] for n in names if n in self.procs] if names else list(self.procs.values())
        for proc in procs:
            if proc.poll() is None:
                proc.terminate()
        for proc in procs:
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def _drain(s: Settings, kids: Children) -> None:
    """Stop producing, let fold-in apply what the broker holds (it keeps no log), then stop the
    rest in order: fold-in and the trainer each finish and checkpoint before they exit."""
    kids.stop("produce", "backlog")
    from services.cli.root import Root
    from services.cli.status import gather

    root = Root(s)
    deadline = time.monotonic() + DRAIN_S
    try:
        while time.monotonic() < deadline and gather(root)["groups"]["encore-foldin"]["lag"] > 0:
            time.sleep(0.2)
    except Exception as exc:  # the servers are going away anyway; stop what is left
        print(f"encore up: drain check failed ({exc})", file=sys.stderr)
    finally:
        root.close()
    time.sleep(1.0)  # the trainer polls every second: let it read the same plays
    kids.stop("foldin", "train", "serve")


def run_up(s: Settings, args: argparse.Namespace) -> int:
    embedded = None
    env = dict(os.environ)
    data = Path(s.data_dir).resolve()
    s = s.with_(data_dir=str(data))
    secure = None
    if args.secure:
        if s.kafka_bootstrap or s.redis_url:
            raise ConfigError(
                "encore up --secure starts its own servers: unset ENCORE_KAFKA_BOOTSTRAP and ENCORE_REDIS_URL"
            )
        from services.infra.embedded_secure import start_secure

        secure = start_secure(data, s.key_prefix)
        embedded = secure.servers
        env.update(secure.env)
        s = Settings.from_env(env).with_(data_dir=str(data))
    elif not s.kafka_bootstrap or not s.redis_url:
        embedded = EmbeddedServers.start(
            kafka=not s.kafka_bootstrap, redis=not s.redis_url, workdir=str(data / "redis")
        )
        s = s.with_(
            kafka_bootstrap=s.kafka_bootstrap or embedded.kafka_bootstrap,
            redis_url=s.redis_url or embedded.redis_url,
        )
    # Port 0, or the default port already taken, means: pick a free one.
    port = s.api_port if s.api_port and ("ENCORE_API_PORT" in env or _port_free(s.api_port)) else free_port()
    env.update(
        {
            "ENCORE_KAFKA_BOOTSTRAP": s.kafka_bootstrap,
            "ENCORE_REDIS_URL": s.redis_url,
            "ENCORE_DATA_DIR": s.data_dir,
            "ENCORE_API_PORT": str(port),
        }
    )
    env.setdefault("ENCORE_RETRAIN_INTERVAL_S", "120")
    env.setdefault("ENCORE_TUNE_BUDGET_S", "20")  # the demo retrains every 2 minutes: a short search
    Clients(s).ensure_topics()
    kids = Children(env, data / "logs")
    resumed = _current_model(s)
    stop = threading.Event()

    signal.signal(signal.SIGINT, lambda *_: stop.set())
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    try:
        print(
            f"encore up: Kafka {s.kafka_bootstrap}, Redis {masked_url(s.redis_url)}"
            f"{' (embedded)' if embedded else ''}; data in {data}; logs in {kids.log_dir}",
            flush=True,
        )
        if resumed:
            print(f"encore up: resuming: model {resumed} and the stored histories are served at once", flush=True)
        backlog = args.users * 10
        demo = ["--synthetic", "--users", str(args.users), "--tracks", str(args.tracks)]
        kids.start("foldin", "foldin")
        kids.start("serve", "serve", "--port", str(port))
        if not resumed:  # a restart keeps its plays: the demo backlog is produced once per folder
            kids.start("backlog", "produce", *demo, "--limit", str(backlog)).wait()
        kids.start("train", "train")
        kids.start("produce", "produce", *demo, "--seed", "1", "--live", "--rate", str(args.rate))
        url = f"{'https' if secure else 'http'}://{s.api_host}:{port}"
        ca, key = (secure.ca, secure.read_key) if secure else (None, "")
        print(f"encore up: streaming demo plays at {args.rate:.0f}/s; waiting for the first model …", flush=True)
        while not stop.is_set() and not (_get(f"{url}/ready", ca) or {}).get("ready"):
            if any(p.poll() not in (None, 0) for p in kids.procs.values()):
                print("encore up: a service exited; see the logs", file=sys.stderr)
                return 1
            stop.wait(1.0)
        if not stop.is_set():
            print(f"encore up: API ready at {url} (OpenAPI at {url}/docs)", flush=True)
            for user in ("u1", "u2", "u3"):
                rec = _get(f"{url}/recommendations/{user}?n=5", ca, key) or {}
                items = [i["track_id"] for i in rec.get("items", [])]  # type: ignore[attr-defined]
                print(f"  {user}: {rec.get('source')} {items}", flush=True)
            if secure:
                print(
                    f"encore up: secure: TLS on every hop (throw-away CA {secure.ca}), Redis ACL user 'encore', "
                    f"API keys in {data / 'secure'}\n"
                    f"  curl --cacert {secure.ca} -H 'Authorization: Bearer {secure.read_key}' "
                    f"{url}/recommendations/u1\n"
                    f"  admin key (POST /admin/...): {secure.admin_key}",
                    flush=True,
                )
            print("encore up: running; Ctrl-C stops everything", flush=True)
        deadline = time.monotonic() + args.duration if args.duration else None
        while not stop.is_set() and (deadline is None or time.monotonic() < deadline):
            stop.wait(1.0)
        return 0
    finally:
        _drain(s, kids)
        kids.stop()
        if embedded:
            embedded.stop()
        print("encore up: stopped", flush=True)


def _current_model(s: Settings) -> str | None:
    from services.cli.root import Root

    root = Root(s)
    try:
        return root.models().current_version()
    finally:
        root.close()


def _port_free(port: int) -> bool:

    with socket.socket() as sock:
        try:
            sock.bind(("127.0.0.1", port))
            return True
        except OSError:
            return False
