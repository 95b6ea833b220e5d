"""`encore export` on real servers: every user's top n, the API's answers, filters, both formats."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import redis
from fastapi.testclient import TestClient

from core.catalogue import TrackInfo
from core.synthetic import SyntheticMusic
from services.cli.root import Root
from services.infra.settings import Settings
from tests.integration.helpers import encore, keys_for, publish_synthetic_model, wait_for

pytestmark = [pytest.mark.integration, pytest.mark.both_topologies]


def test_export_writes_what_the_api_answers(settings: Settings, redis_client: redis.Redis, tmp_path: Path) -> None:
    data = SyntheticMusic(n_users=300, n_tracks=200, seed=9)
    version = publish_synthetic_model(settings, redis_client, data)
    keys = keys_for(settings)
    played = {f"u{i}": {f"t{(i * 7 + j) % 200}" for j in range(5)} for i in range(0, 300, 3)}
    for user, tracks in played.items():
        redis_client.hset(keys.history(user), mapping=dict.fromkeys(tracks, 1.0))
    root = Root(settings)
    publish = root.track_publisher()
    for i in range(0, 200, 4):  # every 4th track explicit
        publish(f"t{i}", TrackInfo(f"t{i}", f"a{i % 10}", explicit=True))
    publish("t1", TrackInfo("t1", "a1", available=False))  # taken down

    out = tmp_path / "recs.jsonl"
    code, stdout, err = encore(settings, "export", "--n", "10", "--out", str(out), "--no-explicit", "--no-progress")
    assert code == 0, err[-2000:]
    summary = json.loads(stdout.strip().splitlines()[-1])
    assert summary["users"] == 300 and summary["personal"] == 300 and summary["model_version"] == version
    rows = {r["user_id"]: r for r in map(json.loads, out.read_text().splitlines())}
    assert set(rows) == {f"u{i}" for i in range(300)}
    for user, row in rows.items():
        ids = [i["track_id"] for i in row["items"]]
        assert len(ids) == 10 and "t1" not in ids and all(int(t[1:]) % 4 for t in ids)
        assert not played.get(user, set()) & set(ids)

    # The same answers as the API (same index, same filter).
    app, follower = root.serving_app(follow=False)
    follower.refresh()
    assert wait_for(lambda: (follower.step() or True) and not follower.catalogue.available("t1"), timeout=30)
    with TestClient(app) as client:
        for user in ("u0", "u1", "u150", "u299"):
            api = client.get(f"/recommendations/{user}?n=10&explicit=false").json()
            assert [i["track_id"] for i in api["items"]] == [i["track_id"] for i in rows[user]["items"]]

    # A list of users (one unknown: the popular fallback) to Parquet, with an artist cap.
    users = tmp_path / "users.txt"
    users.write_text("u3\nnobody\n")
    pq_out = tmp_path / "recs.parquet"
    code, stdout, err = encore(
        settings, "export", "--n", "5", "--out", str(pq_out), "--users", str(users), "--max-per-artist", "1"
    )
    assert code == 0, err[-2000:]
    table = pq.read_table(pq_out).to_pylist()
    by_user: dict[str, list[dict]] = {}
    for r in table:
        by_user.setdefault(r["user_id"], []).append(r)
    assert sorted(by_user) == ["nobody", "u3"]
    assert [r["rank"] for r in by_user["u3"]] == [1, 2, 3, 4, 5] and by_user["nobody"][0]["source"] == "popular"
    # Only the catalogued tracks (every 4th) have an artist: at most one of each.
    u3_artists = [int(r["track_id"][1:]) % 10 for r in by_user["u3"] if int(r["track_id"][1:]) % 4 == 0]
    assert len(u3_artists) == len(set(u3_artists))

    for bad, why in (
        (["--out", str(tmp_path / "x.csv")], ".jsonl or .parquet"),
        (["--out", "/no/such/x.jsonl"], "no folder"),
    ):
        code, _, err = encore(settings, "export", *bad)
        assert code == 2 and why in err and "Traceback" not in err
    root.close()
