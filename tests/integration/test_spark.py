"""The Spark engine gives the same quality as the local engine on the same data."""

from __future__ import annotations

import json
import shutil

import pytest

from core.evaluation import holdout_split, ranking_metrics
from core.synthetic import SyntheticMusic
from services.batch.engines import LocalEngine, SparkEngine
from services.infra.settings import Settings

pytestmark = [pytest.mark.integration, pytest.mark.spark]


@pytest.mark.skipif(shutil.which("java") is None, reason="Spark needs Java 17 on PATH")
def test_spark_quality_matches_local(tmp_path) -> None:
    pytest.importorskip("pyspark")
    settings = Settings(factors=32, iterations=10, data_dir=str(tmp_path), spark_master="local[2]")
    data = SyntheticMusic(n_users=3000, n_tracks=1500, seed=9)
    train, test = holdout_split(data.matrix(), seed=0)
    local = LocalEngine(settings).fit(train)
    spark = SparkEngine(settings).fit(train)
    p_local = ranking_metrics(local.user_factors_, local.item_factors_, train, test).precision
    p_spark = ranking_metrics(spark.user_factors_, spark.item_factors_, train, test).precision
    print(f"precision@10 local {p_local:.4f} spark {p_spark:.4f}")
    assert p_spark >= 0.95 * p_local


@pytest.mark.skipif(shutil.which("java") is None, reason="Spark needs Java 17 on PATH")
def test_spark_trainer_publishes_on_a_redis_cluster(settings: Settings, redis_cluster_url: str) -> None:
    """`encore train --engine spark` on a Redis Cluster: plays from Kafka, fitted by Spark, every
    vector written to its slot and the version flipped; the lookup client reads them back. The
    search takes part with at most 3 Spark trials."""
    pytest.importorskip("pyspark")
    from services.cli.produce import produce, synthetic_stream
    from services.cli.root import Root
    from services.client import EncoreClient
    from services.produce import PlayPublisher

    s = settings.with_(
        redis_url=redis_cluster_url,
        spark_master="local[2]",
        tune=True,
        tune_budget_s=600.0,
        tune_factors=str(settings.factors),
    )
    pub = PlayPublisher.connect(s.kafka_bootstrap, s.plays_topic)
    produce(pub, synthetic_stream(300, 150, 5, None, live=False))
    pub.close()
    root = Root(s)
    try:
        root.clients.ensure_topics()
        trainer = root.trainer("spark")
        version = trainer.run_once()
        trainer.close()
        models = root.models()
        assert models.current_version() == version
        meta = {k.decode(): v.decode(errors="replace") for k, v in models.meta(version).items()}
        assert meta["engine"] == "spark" and int(meta["n_users"]) == 300
        trials = json.loads(meta["tuning"])["trials"]
        assert len(trials) == 3 and all(t["score"] is not None for t in trials)
        assert json.loads(meta["hyperparameters"]) == {
            **json.loads(meta["hyperparameters"]),
            **json.loads(meta["tuning"])["winner"],
        }
        loaded = models.load(version)
        client = EncoreClient(s.redis_url, s.key_prefix)
        assert client.current_version() == version
        vectors = [client.user_vector(f"u{u}") for u in range(300)]
        assert all(v is not None and v.shape == (s.factors,) for v in vectors)
        track = client.track_vector(loaded.track_ids[0])
        assert track is not None and track.tolist() == loaded.model.item_factors_[0].tolist()
        client.close()
    finally:
        root.close()
