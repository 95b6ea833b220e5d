"""Training engines behind one interface: the local numba core and Apache Spark MLlib."""

from __future__ import annotations

import logging
import shutil
import tempfile
from typing import Any, Protocol

import numpy as np
import scipy.sparse as sp

from core.als import ImplicitALS
from core.errors import ConfigError
from services.infra.data_dir import DataDir
from services.infra.settings import Settings

log = logging.getLogger(__name__)


class Engine(Protocol):
    name: str
    warm_starts: bool  # can continue from given factors (a refit after evaluation)

    def fit(
        self,
        plays: sp.csr_matrix,
        params: dict[str, Any] | None = None,
        init: ImplicitALS | None = None,
        iterations: int | None = None,
    ) -> ImplicitALS:
        """`init`: the model to continue from (engines with `warm_starts`); its factors are
        consumed: the local engine updates them in place rather than copying them."""
        ...


def default_params(settings: Settings) -> dict[str, Any]:
    """The searched hyperparameters as the settings give them (the untuned model)."""
    return {
        "factors": settings.factors,
        "regularization": settings.regularization,
        "alpha": settings.alpha,
        "confidence": settings.confidence,
        "epsilon": settings.epsilon,
    }


def model_for(settings: Settings, params: dict[str, Any] | None = None) -> ImplicitALS:
    """An unfitted model: the settings, with `params` (a tuning trial or winner) over them."""
    chosen = {**default_params(settings), **(params or {})}
    return ImplicitALS(
        factors=int(chosen["factors"]),
        regularization=float(chosen["regularization"]),
        alpha=float(chosen["alpha"]),
        iterations=settings.iterations,
        confidence=chosen["confidence"],
        epsilon=float(chosen["epsilon"]),
        solver=settings.solver,  # type: ignore[arg-type]
        random_state=0,
    )


class LocalEngine:
    """Encore's own ImplicitALS on this machine's cores."""

    name = "local"
    warm_starts = True

    def __init__(self, settings: Settings) -> None:
        self.settings = settings

    def fit(
        self,
        plays: sp.csr_matrix,
        params: dict[str, Any] | None = None,
        init: ImplicitALS | None = None,
        iterations: int | None = None,
    ) -> ImplicitALS:
        model = model_for(self.settings, params)
        if iterations is not None:
            model.iterations = iterations
        total = model.iterations

        def progress(it: int, seconds: float) -> None:
            log.debug("ALS iteration %d/%d: %.2fs", it + 1, total, seconds)

        start = None if init is None else (init.user_factors_, init.item_factors_)
        return model.fit(plays, callback=progress, init=start, consume_init=True)


class SparkEngine:
    """`pyspark.ml.recommendation.ALS` (implicitPrefs) over the play matrix written as Parquet.

    Spark's confidence is 1 + α·r; Encore feeds r = log(1 + plays/ε) under `confidence=log`,
    so both engines optimise the same objective up to Spark's per-rating regularization scaling.
    """

    name = "spark"
    warm_starts = False  # MLlib's ALS has no initial factors: a refit is a full fit

    def __init__(self, settings: Settings) -> None:
        self.settings = settings

    def fit(
        self,
        plays: sp.csr_matrix,
        params: dict[str, Any] | None = None,
        init: ImplicitALS | None = None,
        iterations: int | None = None,
    ) -> ImplicitALS:
        model = model_for(self.settings, params)
        if iterations is not None:
            model.iterations = iterations
        parent = DataDir.of(self.settings.data_dir).spark_tmp
        parent.mkdir(parents=True, exist_ok=True)
        workdir = tempfile.mkdtemp(prefix="run-", dir=parent)
        try:
            path = f"{workdir}/plays.parquet"
            self._write_parquet(plays, path, model)
            X, Y = self._train(path, plays.shape, model)
        finally:
            shutil.rmtree(workdir, ignore_errors=True)  # the hand-over is only needed during the run
        model.user_factors_, model.item_factors_ = X, Y
        return model

    def _write_parquet(self, plays: sp.csr_matrix, path: str, model: ImplicitALS) -> None:
        import pyarrow as pa
        import pyarrow.parquet as pq

        coo = plays.tocoo()
        rating = np.log1p(coo.data / model.epsilon) if model.confidence == "log" else coo.data
        table = pa.table(
            {"user": coo.row.astype(np.int32), "item": coo.col.astype(np.int32), "rating": rating.astype(np.float32)}
        )
        pq.write_table(table, path)

    def _train(self, path: str, shape: tuple[int, int], model: ImplicitALS) -> tuple[np.ndarray, np.ndarray]:
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
                rank=model.factors,
                maxIter=model.iterations,
                regParam=model.regularization,
                alpha=model.alpha,
                implicitPrefs=True,
                userCol="user",
                itemCol="item",
                ratingCol="rating",
                seed=0,
                nonnegative=False,
                coldStartStrategy="drop",
            )
            fitted = als.fit(spark.read.parquet(path))
            k = model.factors
            return _collect(fitted.userFactors, shape[0], k), _collect(fitted.itemFactors, shape[1], k)
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
