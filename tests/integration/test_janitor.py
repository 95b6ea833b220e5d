"""The version janitor removes superseded versions from Redis and their files from disk."""

from __future__ import annotations

import time

import pytest
import redis

from core.synthetic import SyntheticMusic
from services.batch.janitor import VersionJanitor
from services.infra.data_dir import DataDir
from services.infra.keys import Keys
from services.infra.model_store import RedisModelStore
from services.infra.settings import Settings
from tests.integration.helpers import publish_synthetic_model

pytestmark = pytest.mark.integration


def test_superseded_versions_leave_redis_and_disk_after_the_grace_period(
    settings: Settings, redis_client: redis.Redis, tmp_path
) -> None:
    keys = Keys(settings.key_prefix)
    models = RedisModelStore(redis_client, keys)
    data = DataDir.of(tmp_path)
    versions = []
    for seed in (1, 2, 3):
        v = publish_synthetic_model(settings, redis_client, SyntheticMusic(n_users=50, n_tracks=40, seed=seed))
        versions.append(v)
        for path in (data.artifact(v), data.index_snapshot(v, "ip"), data.index_snapshot(v, "cosine")):
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(b"x")
        time.sleep(0.01)
    orphan = data.artifact("19990101T000000-000000")  # a crash between writing and publishing
    orphan.write_bytes(b"x")
    janitor = VersionJanitor(models, data, grace_s=3600.0)
    assert janitor.sweep() == []  # within the grace period: every version kept, only the orphan goes
    assert not orphan.exists() and all(data.artifact(v).exists() for v in versions)
    gone = janitor.sweep(now=time.time() + 7200)
    assert gone == versions[:2] and models.current_version() == versions[2]
    assert [v for v, _ in models.versions()] == [versions[2]]
    for v in versions[:2]:
        assert not data.artifact(v).exists() and data.index_files(v) == []
        assert list(redis_client.scan_iter(match=keys.version_pattern(v))) == []
    assert data.artifact(versions[2]).exists() and len(data.index_files(versions[2])) == 2
