"""Redis round-trip of vectors and the embedded servers' lifecycle."""

from __future__ import annotations

import os

import numpy as np
import pytest
import redis

from core.messages import decode_vector, encode_vector
from services.infra.embedded import EmbeddedServers
from services.infra.keys import Keys

pytestmark = pytest.mark.integration


def test_vector_round_trip(redis_client: redis.Redis, settings) -> None:
    keys = Keys(settings.key_prefix)
    rng = np.random.default_rng(0)
    vecs = rng.standard_normal((100, 16)).astype(np.float32)
    pipe = redis_client.pipeline()
    for i, v in enumerate(vecs):
        pipe.set(keys.user("v1", f"u{i}"), encode_vector(v))
    pipe.execute()
    raw = redis_client.mget([keys.user("v1", f"u{i}") for i in range(100)])
    back = np.stack([decode_vector(b) for b in raw])
    np.testing.assert_array_equal(back, vecs)
    assert len(raw[0]) == 16 * 4


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split()[2] != "Z"
    except FileNotFoundError:
        return False


def test_embedded_stop_leaves_no_process() -> None:
    servers = EmbeddedServers.start()
    pids = servers.pids
    assert len(pids) == 2 and all(_alive(p) for p in pids)
    r = redis.Redis.from_url(servers.redis_url)
    assert r.ping()
    r.close()
    servers.stop()
    assert not any(_alive(p) for p in pids)
    assert not os.path.exists(servers.workdir)
