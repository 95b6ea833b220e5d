"""API keys on the HTTP API, against a real Redis: who may read, who may administer, rotation."""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis
from fastapi.testclient import TestClient

from core.synthetic import SyntheticMusic
from services.cli.root import Root
from services.infra.settings import Settings
from tests.integration.helpers import publish_synthetic_model

pytestmark = pytest.mark.integration
READ, ADMIN = "read-key-0123456789", "admin-key-9876543210"


def _client(settings: Settings) -> Iterator[TestClient]:
    root = Root(settings)
    app, follower = root.serving_app(follow=False)
    follower.refresh()
    with TestClient(app) as client:
        yield client
    root.close()


@pytest.fixture
def versions(settings: Settings, redis_client: redis.Redis) -> list[str]:
    """Two published versions, the second current."""
    data = SyntheticMusic(n_users=200, n_tracks=150, seed=4)
    first = publish_synthetic_model(settings, redis_client, data)
    time.sleep(0.01)
    return [first, publish_synthetic_model(settings, redis_client, data)]


@pytest.fixture
def keyed(settings: Settings, versions: list[str]) -> Iterator[TestClient]:
    yield from _client(settings.with_(api_keys=f"{READ}, other-read-key", admin_api_keys=ADMIN))


def _bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def test_reads_need_a_known_key_sent_either_way(keyed: TestClient) -> None:
    for path in ("/recommendations/u1", "/similar/t1", "/metrics"):
        missing = keyed.get(path)
        assert missing.status_code == 401 and missing.headers["www-authenticate"].startswith("Bearer")
        assert keyed.get(path, headers=_bearer("read-key-012345678X")).status_code == 401
        assert keyed.get(path, headers={"Authorization": f"Basic {READ}"}).status_code == 401
        assert keyed.get(path, headers=_bearer(READ)).status_code == 200
        assert keyed.get(path, headers={"X-API-Key": "other-read-key"}).status_code == 200
        assert keyed.get(path, headers=_bearer(ADMIN)).status_code == 200  # an admin key may read
    body = {"plays": [{"track_id": "t1"}], "n": 3}
    assert keyed.post("/recommendations", json=body).status_code == 401
    assert keyed.post("/recommendations", json=body, headers=_bearer(READ)).status_code == 200
    for path in ("/health", "/ready", "/openapi.json"):  # probes and client generators stay open
        assert keyed.get(path).status_code == 200


def test_activate_a_kept_version_needs_the_admin_key(keyed: TestClient, versions: list[str]) -> None:
    first, second = versions
    path = f"/admin/models/{first}/activate"
    assert keyed.post(path).status_code == 401
    assert keyed.post(path, headers=_bearer(READ)).status_code == 403
    assert keyed.get("/ready").json()["model_version"] == second
    r = keyed.post(path, headers=_bearer(ADMIN))
    assert r.status_code == 200 and r.json() == {"current": first, "previous": second}
    assert keyed.post("/admin/models/no-such-version/activate", headers=_bearer(ADMIN)).status_code == 404
    assert keyed.post(f"/admin/models/{second}/activate", headers=_bearer(ADMIN)).json()["current"] == second


def test_keys_in_files_rotate_without_a_restart(settings: Settings, versions: list[str], tmp_path: Path) -> None:
    read_file, admin_file = tmp_path / "read.keys", tmp_path / "admin.keys"
    read_file.write_text("# one key a line\nold-key\n")
    admin_file.write_text("")
    client = _client(settings.with_(api_keys_file=str(read_file), admin_api_keys_file=str(admin_file)))
    c = next(client)
    assert c.get("/similar/t1", headers=_bearer("old-key")).status_code == 200
    read_file.write_text("old-key\nnew-key\n")
    os.utime(read_file, (time.time() + 5, time.time() + 5))  # a new mtime even within one clock tick
    assert c.get("/similar/t1", headers=_bearer("new-key")).status_code == 200
    read_file.write_text("new-key\n")
    os.utime(read_file, (time.time() + 10, time.time() + 10))
    assert c.get("/similar/t1", headers=_bearer("old-key")).status_code == 401
    assert c.get("/similar/t1", headers=_bearer("new-key")).status_code == 200
    # Read keys but no admin key: the admin endpoints are off, not open.
    assert c.post(f"/admin/models/{versions[0]}/activate", headers=_bearer("new-key")).status_code == 403
    assert c.post(f"/admin/models/{versions[0]}/activate").status_code == 401
    next(client, None)


def test_no_keys_configured_leaves_the_api_open(settings: Settings, versions: list[str]) -> None:
    for c in _client(settings):
        assert c.get("/similar/t1").status_code == 200
        assert c.post(f"/admin/models/{versions[0]}/activate").json()["current"] == versions[0]
