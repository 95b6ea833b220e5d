"""Training engines behind one interface: the local numba core and Apache Spark MLlib."""

from __future__ import annotations

import logging
import shutil
import tempfile
from typing import Protocol

import numpy as np
import scipy.sparse as sp

from core.als import ImplicitALS
from core.errors import ConfigError
from services.infra.data_dir import DataDir
from services.infra.settings import Settings

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
        parent = DataDir.of(self.settings.data_dir).spark_tmp
        parent.mkdir(parents=True, exist_ok=True)
        workdir = tempfile.mkdtemp(prefix="run-", dir=parent)
        try:
            path = f"{workdir}/plays.parquet"
            self._write_parquet(plays, path)
            X, Y = self._train(path, plays.shape)
        finally:
            shutil.rmtree(workdir, ignore_errors=True)  # the hand-over is only needed during the run
        model = model_for(self.settings)
        model.user_factors_, model.item_factors_ = X, Y
        return model

    def _write_parquet(self, plays: sp.csr_matrix, path: str) -> None:
        import pyarrow as pa
        import pyarrow.parquet as pq

        s = self.settings
        coo = plays.tocoo()
        rating = np.log1p(coo.data / s.epsilon) if s.confidence == "log" else coo.data
        table = pa.table(
            {"user": coo.row.astype(np.int32), "item": coo.col.astype(np.int32), "rating": rating.astype(np.float32)}
        )
        pq.write_table(table, path)

    def _train(self, path: str, shape: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
        from pyspark.ml.recommendation import ALS
        from pyspark.sql import SparkSession

        s = self.settings
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
            fitted = als.fit(spark.read.parquet(path))
            return _collect(fitted.userFactors, shape[0], s.factors), _collect(fitted.itemFactors, shape[1], s.factors)
        finally:
            spark.stop()


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
    raise ConfigError(f"unknown engine {name!r}: use local or spark")
