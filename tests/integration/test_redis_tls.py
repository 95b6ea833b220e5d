"""Encore against a real redis-server that speaks only TLS (mutual), as an ACL user limited to
its key prefix and without @dangerous or @admin commands: the README's `ACL SETUSER` line."""

from __future__ import annotations

import os
import shutil
import tempfile
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis
from fastapi.testclient import TestClient

from core.synthetic import SyntheticMusic
from services.cli.root import Root
from services.infra.clients import Clients
from services.infra.embedded import free_port, spawn, stop_processes, wait_port
from services.infra.embedded_secure import tls_redis_command
from services.infra.settings import ConfigError, Settings
from services.infra.throwaway_ca import Certificates, make_certificates
from services.produce import PlayPublisher
from services.serving.client import EncoreClient
from tests.integration.helpers import WorkerThread, histories_match, publish_synthetic_model, wait_for

pytestmark = pytest.mark.integration
PASSWORD = "s3cret-encore-pw"


def acl_line(prefix: str) -> list[str]:
    """What the README tells operators to run (the user name and prefix are theirs)."""
    return ["ACL", "SETUSER", "encore", "on", f">{PASSWORD}", f"~{prefix}*", "+@all", "-@dangerous", "-@admin"]


@pytest.fixture(scope="module")
def tls_redis() -> Iterator[tuple[int, Certificates]]:
    if shutil.which("openssl") is None:
        pytest.skip("openssl needed to make certificates")
    folder = Path(tempfile.mkdtemp(prefix="encore-tls-"))
    certs = make_certificates(folder / "certs")
    port = free_port()
    cmd = tls_redis_command(port, folder, certs, client_certs=True)  # mutual TLS
    proc = spawn(cmd, str(folder / "redis.log"))
    try:
        wait_port(port, proc, "redis-server (TLS)")
        yield port, certs
    finally:
        stop_processes([proc])
        shutil.rmtree(folder, ignore_errors=True)


def _admin(port: int, certs: Certificates) -> redis.Redis:
    return redis.Redis(
        host="127.0.0.1",
        port=port,
        ssl=True,
        ssl_ca_certs=str(certs.ca),
        ssl_certfile=str(certs.cert("client")),
        ssl_keyfile=str(certs.key("client")),
    )


@pytest.fixture
def secure(settings: Settings, tls_redis: tuple[int, Certificates], tmp_path: Path) -> Settings:
    port, certs = tls_redis
    _admin(port, certs).execute_command(*acl_line(settings.key_prefix))
    password_file = tmp_path / "redis.password"
    password_file.write_text(PASSWORD + "\n")
    os.chmod(password_file, 0o600)
    return settings.with_(
        redis_url=f"rediss://127.0.0.1:{port}/0",
        redis_username="encore",
        redis_password_file=str(password_file),
        redis_ca_file=str(certs.ca),
        redis_cert_file=str(certs.cert("client")),
        redis_key_file=str(certs.key("client")),
    )


def test_foldin_serving_and_lookup_over_tls_as_a_limited_acl_user(secure: Settings) -> None:
    s = secure
    r = Clients(s).redis()
    with pytest.raises(redis.exceptions.NoPermissionError):
        r.set("outside-the-prefix", 1)  # the ACL is really in force
    with pytest.raises(redis.exceptions.NoPermissionError):
        r.info()  # and @dangerous commands are refused: Encore must not need them
    data = SyntheticMusic(n_users=150, n_tracks=120, seed=8)
    version = publish_synthetic_model(s, r, data)
    root = Root(s)
    root.clients.ensure_topics()
    worker = WorkerThread(s, "encore-foldin")
    try:
        pub = PlayPublisher.connect(s.kafka_bootstrap, s.plays_topic)
        expected: Counter[str] = Counter()
        for i in range(300):
            pub.publish(f"u{i % 20}", f"t{i % 37}", ms_played=200_000)
            expected[f"u{i % 20}|t{i % 37}"] += 1
        pub.publish("brand-new", "t1", ms_played=200_000)
        pub.flush()
        store = root.history_store()

        assert wait_for(lambda: histories_match(store, expected), timeout=60)
        client = EncoreClient(s.redis_url, s.key_prefix, settings=s)
        assert wait_for(lambda: client.user_vector("brand-new", version) is not None, timeout=30)
        client.close()
        app, follower = root.serving_app(follow=False)
        follower.refresh()
        with TestClient(app) as http:
            body = http.get("/recommendations/brand-new?n=5").json()
            assert body["source"] == "personal" and len(body["items"]) == 5
            assert http.get("/ready").json()["ready"] is True
        # No secret lands in Redis: not in model meta, status, or any other key Encore wrote.
        leaks = []
        for key in r.scan_iter(match=f"{s.key_prefix}*", count=1000):
            kind = r.type(key)
            values = r.hgetall(key).values() if kind == b"hash" else [r.get(key)] if kind == b"string" else []
            leaks += [key for v in values if v and PASSWORD.encode() in v]
        assert leaks == []
    finally:
        worker.stop()
        root.close()
        r.close()


def test_wrong_credentials_and_missing_tls_files_fail_clearly(secure: Settings, tmp_path: Path) -> None:
    with pytest.raises(redis.exceptions.ConnectionError):  # AuthenticationError is one
        Clients(secure.with_(redis_password_file="", redis_password="wrong", redis_cluster="false")).redis().ping()
    with pytest.raises(redis.exceptions.ConnectionError, match="(?i)certificate|ssl"):
        Clients(secure.with_(redis_ca_file="", redis_cluster="false")).redis().ping()  # not the server's CA
    with pytest.raises(redis.exceptions.ConnectionError):
        plain = secure.redis_url.replace("rediss://", "redis://")
        Clients(
            secure.with_(redis_url=plain, redis_ca_file="", redis_cert_file="", redis_cluster="false")
        ).redis().ping()
    with pytest.raises(ConfigError, match="does not exist"):
        Clients(secure.with_(redis_ca_file=str(tmp_path / "nope.crt"))).redis()
    with pytest.raises(ConfigError, match="PASSWORD_FILE"):
        Clients(secure.with_(redis_password_file=str(tmp_path / "none"))).redis()
