"""The Spark engine gives the same quality as the local engine on the same data."""

from __future__ import annotations

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
