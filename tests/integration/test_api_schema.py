"""The OpenAPI schema tells the truth: schemathesis generates requests from it against the app
over a real Redis with a trained model, and checks every answer against the schema (status codes,
bodies, content types) and for server errors. A bounded number of examples per route."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
import redis
import schemathesis
from hypothesis import HealthCheck
from hypothesis import settings as hyp_settings

from core.synthetic import SyntheticMusic
from services.cli.root import Root
from services.infra.settings import Settings
from tests.integration.helpers import publish_synthetic_model

pytestmark = pytest.mark.integration


@pytest.fixture
def api_schema(settings: Settings, redis_client: redis.Redis) -> Iterator[Any]:
    publish_synthetic_model(settings, redis_client, SyntheticMusic(n_users=200, n_tracks=150, seed=5))
    root = Root(settings)
    app, follower = root.serving_app(follow=False)
    follower.refresh()
    yield schemathesis.openapi.from_asgi("/openapi.json", app)
    root.close()


schema = schemathesis.pytest.from_fixture("api_schema")


@schema.parametrize()
@hyp_settings(max_examples=40, deadline=None, suppress_health_check=list(HealthCheck))
def test_every_route_answers_as_documented(case: Any) -> None:
    case.call_and_validate()


def test_bodies_over_the_cap_and_bad_parameters_get_one_error_model(settings: Settings, redis_client) -> None:
    from fastapi.testclient import TestClient

    publish_synthetic_model(settings, redis_client, SyntheticMusic(n_users=100, n_tracks=80, seed=5))
    root = Root(settings)
    app, follower = root.serving_app(follow=False)
    follower.refresh()
    with TestClient(app) as client:
        big = b'{"plays": [' + b",".join([b'{"track_id": "t1"}'] * 60_000) + b"]}"
        r = client.post("/recommendations", content=big, headers={"content-type": "application/json"})
        assert r.status_code == 413 and set(r.json()) == {"detail"}
        chunks = iter([big[i : i + 65536] for i in range(0, len(big), 65536)])  # no Content-Length
        r = client.post("/recommendations", content=chunks, headers={"content-type": "application/json"})
        assert r.status_code == 413
        r = client.get(f"/similar/t1?n={settings.max_n + 1}")
        assert r.status_code == 422 and isinstance(r.json()["detail"], str) and "n" in r.json()["detail"]
        assert client.post("/recommendations", json={"plays": [], "n": 5}).status_code == 200
    root.close()
