"""Hyperparameter search for implicit ALS on a holdout, within a time budget (Optuna's TPE).

Optuna is used rather than a hand-written search: its TPE sampler models which regions of the
space scored well, handles the mixed space (categorical confidence and factors, log-scale
reals) and lets a search resume from a known good point with `enqueue_trial`. This module
knows nothing of engines or servers: the caller passes `fit` (params → fitted model) and
`score` (model → the holdout metric to maximise).
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import optuna

from core.als import ImplicitALS

log = logging.getLogger(__name__)
SEARCHED = ("factors", "regularization", "alpha", "epsilon", "confidence")


@dataclass(frozen=True)
class Space:
    """Where the search looks; reals are searched on a log scale."""

    factors: Sequence[int] = (32, 48, 64, 96, 128)
    regularization: tuple[float, float] = (1e-3, 10.0)
    alpha: tuple[float, float] = (0.1, 100.0)
    epsilon: tuple[float, float] = (0.01, 100.0)
    confidence: Sequence[str] = ("log", "linear")

    def suggest(self, trial: optuna.Trial) -> dict[str, Any]:
        conf = trial.suggest_categorical("confidence", list(self.confidence))
        params: dict[str, Any] = {
            "factors": trial.suggest_categorical("factors", list(self.factors)),
            "regularization": trial.suggest_float("regularization", *self.regularization, log=True),
            "alpha": trial.suggest_float("alpha", *self.alpha, log=True),
            "confidence": conf,
        }
        # ε only matters to the log confidence; linear trials do not spend the sampler's
        # attention on it (Optuna handles such conditional parameters).
        if conf == "log":
            params["epsilon"] = trial.suggest_float("epsilon", *self.epsilon, log=True)
        return params

    def clip(self, params: dict[str, Any]) -> dict[str, Any]:
        """A starting point moved inside the space (a winner from a wider space, or defaults)."""
        out = {k: params[k] for k in SEARCHED if k in params}
        if "factors" in out and out["factors"] not in self.factors:
            out["factors"] = min(self.factors, key=lambda f: abs(f - int(out["factors"])))
        for name in ("regularization", "alpha", "epsilon"):
            lo, hi = getattr(self, name)
            if name in out:
                out[name] = min(max(float(out[name]), lo), hi)
        if out.get("confidence") not in self.confidence:
            out["confidence"] = self.confidence[0]
        if out["confidence"] != "log":
            out.pop("epsilon", None)
        return out


@dataclass
class TuneResult:
    """Every trial (params, score, seconds) and the best; `model` is the best trial's fit."""

    trials: list[dict[str, Any]] = field(default_factory=list)
    best_params: dict[str, Any] = field(default_factory=dict)
    best_score: float = -math.inf
    model: ImplicitALS | None = None
    seconds: float = 0.0

    def record(self) -> dict[str, Any]:
        """What goes into the model's meta (JSON-ready)."""
        return {
            "winner": self.best_params,
            "score": self.best_score,
            "seconds": round(self.seconds, 3),
            "trials": self.trials,
        }


def tune(
    fit: Callable[[dict[str, Any]], ImplicitALS],
    score: Callable[[ImplicitALS], float],
    start: Sequence[dict[str, Any]],
    budget_s: float,
    max_trials: int,
    space: Space | None = None,
    seed: int = 0,
) -> TuneResult:
    """Run trials until `budget_s` or `max_trials`; the points in `start` are tried first.

    A trial that starts within the budget is finished (a fit cannot be cut short usefully),
    so the search may overrun by one trial; at least one trial always runs.
    """
    space = space or Space()
    result = TuneResult()
    began = time.perf_counter()
    optuna.logging.set_verbosity(optuna.logging.WARNING)  # the trials are logged here, once each
    sampler = optuna.samplers.TPESampler(seed=seed, n_startup_trials=min(5, max_trials))
    study = optuna.create_study(direction="maximize", sampler=sampler)
    seen: list[dict[str, Any]] = []
    for point in start:
        p = space.clip(point)
        if p not in seen:
            seen.append(p)
            study.enqueue_trial(p, skip_if_exists=True)

    def objective(trial: optuna.Trial) -> float:
        params = space.suggest(trial)
        t0 = time.perf_counter()
        try:
            model = fit(params)
            value = float(score(model))
        except (ValueError, ArithmeticError) as exc:  # a diverged fit is a bad trial, not a failed search
            log.info("trial %d failed: %s", trial.number, exc)
            result.trials.append({"params": params, "score": None, "error": str(exc)})
            raise optuna.TrialPruned() from exc
        result.trials.append({"params": params, "score": value, "seconds": round(time.perf_counter() - t0, 3)})
        if value > result.best_score:
            result.best_score, result.best_params, result.model = value, params, model
        log.info("trial %d: %s → %.4f (%.1fs)", trial.number, params, value, time.perf_counter() - t0)
        return value

    def enough(study_: optuna.Study, _trial: optuna.trial.FrozenTrial) -> None:
        if time.perf_counter() - began >= budget_s or len(study_.trials) >= max_trials:
            study_.stop()

    study.optimize(objective, n_trials=max(1, max_trials), callbacks=[enough])
    result.seconds = time.perf_counter() - began
    return result
