"""Training engines behind one interface: the local numba core and Apache Spark MLlib."""

from __future__ import annotations

import logging
import os
import tempfile
from typing import Protocol

import numpy as np
import scipy.sparse as sp

from core.als import ImplicitALS
from services.config import Settings

log = logging.getLogger(__name__)


class Engine(Protocol):
    name: str

    def fit(self, plays: sp.csr_matrix) -> ImplicitALS: ...


def model_for(settings: Settings) -> ImplicitALS:
    return ImplicitALS(
        factors=settings.factors,
        regularization=settings.regularization,
        alpha=settings.alpha,
        iterations=settings.iterations,
        confidence=settings.confidence,  # type: ignore[arg-type]
        epsilon=settings.epsilon,
        solver=settings.solver,  # type: ignore[arg-type]
        random_state=0,
    )


class LocalEngine:
    """Encore's own ImplicitALS on this machine's cores."""

    name = "local"

    def __init__(self, settings: Settings) -> None:
        self.settings = settings

    def fit(self, plays: sp.csr_matrix) -> ImplicitALS:
        model = model_for(self.settings)
        total = model.iterations

        def progress(it: int, seconds: float) -> None:
            log.info("ALS iteration %d/%d: %.2fs", it + 1, total, seconds)

        return model.fit(plays, callback=progress)


class SparkEngine:
    """`pyspark.ml.recommendation.ALS` (implicitPrefs) over the play matrix written as Parquet.

    Spark's confidence is 1 + α·r; Encore feeds r = log(1 + plays/ε) under `confidence=log`,
    so both engines optimise the same objective up to Spark's per-rating regularization scaling.
    """

    name = "spark"

    def __init__(self, settings: Settings) -> None:
        self.settings = settings

    def fit(self, plays: sp.csr_matrix) -> ImplicitALS:
        import pyarrow as pa
        import pyarrow.parquet as pq
        from pyspark.ml.recommendation import ALS
        from pyspark.sql import SparkSession

        s = self.settings
        coo = plays.tocoo()
        rating = np.log1p(coo.data / s.epsilon) if s.confidence == "log" else coo.data
        workdir = tempfile.mkdtemp(prefix="encore-spark-", dir=s.data_dir if os.path.isdir(s.data_dir) else None)
        path = os.path.join(workdir, "plays.parquet")
        pq.write_table(
            pa.table(
                {
                    "user": coo.row.astype(np.int32),
                    "item": coo.col.astype(np.int32),
                    "rating": rating.astype(np.float32),
                }
            ),
            path,
        )
        spark = (
            SparkSession.builder.master(s.spark_master)
            .appName("encore-train")
            .config("spark.ui.enabled", "false")
            .config("spark.driver.memory", "4g")
            .config("spark.ui.showConsoleProgress", "false")
            .config("spark.sql.shuffle.partitions", "8")
            .getOrCreate()
        )
        try:
            df = spark.read.parquet(path)
            als = ALS(
                rank=s.factors,
                maxIter=s.iterations,
                regParam=s.regularization,
                alpha=s.alpha,
                implicitPrefs=True,
                userCol="user",
                itemCol="item",
                ratingCol="rating",
                seed=0,
                nonnegative=False,
                coldStartStrategy="drop",
            )
            fitted = als.fit(df)
            X = _collect(fitted.userFactors, plays.shape[0], s.factors)
            Y = _collect(fitted.itemFactors, plays.shape[1], s.factors)
        finally:
            spark.stop()
        model = model_for(s)
        model.user_factors_, model.item_factors_ = X, Y
        return model


def _collect(df: object, n: int, k: int) -> np.ndarray:
    out = np.zeros((n, k), dtype=np.float32)
    for row in df.toLocalIterator():  # type: ignore[attr-defined]
        out[row["id"]] = row["features"]
    return out


def engine(name: str, settings: Settings) -> Engine:
    if name == "local":
        return LocalEngine(settings)
    if name == "spark":
        return SparkEngine(settings)
    raise ValueError(f"unknown engine {name!r}: use local or spark")
