"""Choose, evaluate and fit the model a retrain publishes.

1. Hold out a share of the tracks of a *sample* of users (`ENCORE_EVAL_USERS`); everyone
   else trains on all their plays.
2. With `ENCORE_TUNE` on (and at every `ENCORE_TUNE_EVERY`th retrain), search the
   hyperparameters on that holdout (core.tuning, Optuna), starting from the last winner and the
   settings; otherwise fit the last winner (or the settings) once.
3. Measure the chosen model on the holdout: accuracy and beyond-accuracy measures.
4. Refit on all plays, so the published track factors lose nothing to the holdout: warm from the
   evaluated factors for `ENCORE_REFIT_ITERATIONS` (local engine), or a full fit (Spark, which
   cannot start from given factors).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import scipy.sparse as sp

from core.als import ImplicitALS
from core.evaluation import ranking_metrics, sample_holdout
from core.list_metrics import beyond_accuracy
from core.tuning import SEARCHED, Space, tune
from services.batch.engines import Engine, default_params
from services.infra.settings import Settings, tune_factors

log = logging.getLogger(__name__)
SPARK_MAX_TRIALS = 3
K = 10


@dataclass
class Chosen:
    """The model to publish (fit on all plays) and what is known of it."""

    model: ImplicitALS
    params: dict[str, Any]
    metrics: dict[str, float] = field(default_factory=dict)
    tuning: dict[str, Any] | None = None


class ModelSearch:
    def __init__(self, settings: Settings, engine: Engine) -> None:
        self.s, self.engine = settings, engine
        self.retrains = 0  # in this process: the first retrain after a start searches

    def searches_now(self) -> bool:
        return self.s.tune and self.retrains % self.s.tune_every == 0

    def run(
        self,
        plays: sp.csr_matrix,
        last_winner: dict[str, Any] | None,
        artists: Callable[[list[int]], dict[int, str]] | None = None,
        stage: Callable[[str], None] = lambda _name: None,
    ) -> Chosen:
        """`artists` maps track rows to artist ids (for artist diversity); `stage` times steps."""
        s = self.s
        start = {**default_params(s), **(last_winner or {})}
        evaluated = self._evaluate(plays, start, artists, stage)
        if evaluated is None:
            return Chosen(self.engine.fit(plays, start), start)
        model, params, metrics, tuning = evaluated  # the holdout split is gone by now (memory)
        if self.engine.warm_starts and s.refit_iterations > 0:
            final = self.engine.fit(plays, params, init=model, iterations=s.refit_iterations)
        elif self.engine.warm_starts:  # refit off: publish the evaluated tracks, users folded in on all plays
            final = model
            final.user_factors_ = final.fold_in(plays, final.item_factors_, start=final.user_factors_)
        else:
            final = self.engine.fit(plays, params)
        stage("refit")
        return Chosen(final, {k: params[k] for k in SEARCHED if k in params}, metrics, tuning)

    def _evaluate(
        self,
        plays: sp.csr_matrix,
        start: dict[str, Any],
        artists: Callable[[list[int]], dict[int, str]] | None,
        stage: Callable[[str], None],
    ) -> tuple[ImplicitALS, dict[str, Any], dict[str, float], dict[str, Any] | None] | None:
        """Steps 1–3 on a holdout split: (model, params, metrics, tuning record), or None when no
        user has enough plays to hold any out."""
        s, searching = self.s, self.searches_now()
        self.retrains += 1
        train, test = sample_holdout(plays, s.eval_users, s.holdout_fraction, seed=0)
        stage("holdout")
        if test.nnz == 0:  # too few plays per user to hold any out: nothing to measure or tune on
            log.warning("no user has %d+ tracks: the model is not evaluated", 3)
            return None

        def score(model: ImplicitALS) -> float:
            return ranking_metrics(model.user_factors_, model.item_factors_, train, test, k=K, max_users=None).precision

        tuning: dict[str, Any] | None = None
        if searching:
            trials = min(s.tune_trials, SPARK_MAX_TRIALS) if not self.engine.warm_starts else s.tune_trials
            space = Space(factors=tune_factors(s.tune_factors))
            starts = [start, default_params(s)]
            result = tune(lambda p: self.engine.fit(train, p), score, starts, s.tune_budget_s, trials, space)
            tuning = result.record()
            stage("tune")
            if result.model is None:
                log.warning("every tuning trial failed; fitting the last winner")
                evaluated, params = self.engine.fit(train, start), start
            else:
                evaluated, params = result.model, {**start, **result.best_params}
                log.info("tuning: %d trials in %.1fs, winner %s", len(result.trials), result.seconds, params)
        else:
            evaluated, params = self.engine.fit(train, start), start
            stage("fit")
        found = ranking_metrics(evaluated.user_factors_, evaluated.item_factors_, train, test, k=K, max_users=None)
        metrics = found.as_dict(K)
        rows = [int(t) for t in np.unique(found.top[found.top >= 0])]
        metrics.update(beyond_accuracy(found.top, train, test, artists(rows) if artists else None))
        stage("evaluate")
        return evaluated, params, metrics, tuning
