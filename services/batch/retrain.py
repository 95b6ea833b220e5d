"""One retrain: the checkpointed matrix → fit → evaluate → guard → artifact → publish.

Catch-up of plays that arrived after the checkpoint is the speed layer's job (it re-solves
changed users when it first sees the new version), and deleting superseded versions is the
janitor's; this module only makes a new version and flips to it.
"""

from __future__ import annotations

import json
import logging
import time

import numpy as np

from core.errors import ModelRejectedError, NoPlaysError
from core.recommend import popularity
from services.batch.checkpoint import PlayMatrix
from services.batch.engines import Engine
from services.batch.model_search import ModelSearch
from services.infra.checked_files import write_npz
from services.infra.data_dir import DataDir
from services.infra.model_store import RedisModelStore, new_version
from services.infra.settings import Settings

log = logging.getLogger(__name__)
ERASURE_MARGIN_S = 60.0


class StageClock:
    """Seconds per named stage, recorded into the model's meta."""

    def __init__(self) -> None:
        self.stages: dict[str, float] = {}
        self._t = time.perf_counter()

    def __call__(self, name: str) -> None:
        now = time.perf_counter()
        self.stages[name] = round(now - self._t, 3)
        self._t = now


class Retrainer:
    def __init__(self, settings: Settings, engine: Engine, models: RedisModelStore) -> None:
        self.s, self.engine, self.models = settings, engine, models
        self.data = DataDir.of(settings.data_dir)
        self.search = ModelSearch(settings, engine)

    def last_winner(self) -> dict[str, object] | None:
        """The current version's hyperparameters: where the next search starts."""
        current = self.models.current_version()
        raw = self.models.meta(current).get(b"hyperparameters") if current else None
        return json.loads(raw) if raw else None

    def train_and_publish(self, state: PlayMatrix, candidate: bool = False) -> str:
        """Train on the last checkpoint of `state`; returns the published version (made current,
        or the candidate with `candidate`).

        Raises NoPlaysError with nothing to train on and ModelRejectedError when the guard
        refuses the model (the current version stays)."""
        stage = StageClock()
        plays = state.training_matrix(state.checkpoint_time)
        if plays.nnz == 0:
            raise NoPlaysError("no plays to train on yet")
        stage("prepare")
        track_ids = state.track_ids

        def artists(rows: list[int]) -> dict[int, str]:
            found = self.models.track_artists([track_ids[r] for r in rows])
            return {r: found[track_ids[r]] for r in rows if track_ids[r] in found}

        chosen = self.search.run(plays, self.last_winner(), artists, stage)
        model, metrics = chosen.model, chosen.metrics
        train_s = sum(v for k, v in stage.stages.items() if k in ("tune", "fit", "refit"))
        if "precision@10" in metrics:
            self._guard(metrics["precision@10"])
        # Users erased while this model was made: their erase record may not have reached the
        # checkpoint; they get no row (the speed layer solves them afresh if they play again).
        since = state.checkpoint_time - ERASURE_MARGIN_S
        user_ids = state.user_ids
        erased = self.models.erased_since(since)
        if erased & set(user_ids):
            keep = np.array([u not in erased for u in user_ids])
            model.user_factors_ = model.user_factors_[keep]
            user_ids = [u for u, k in zip(user_ids, keep, strict=True) if k]
            log.info("left out %d users erased since the checkpoint", len(state.user_ids) - len(user_ids))
        version = new_version()
        artifact = self.data.artifact(version)
        write_npz(
            artifact,
            {
                "user_factors": model.user_factors_,
                "item_factors": model.item_factors_,
                "params": np.array(json.dumps(model.get_params())),
                "user_ids": np.array(user_ids, dtype=str),
                "track_ids": np.array(state.track_ids, dtype=str),
            },
        )
        stage("artifact")
        order, shares = popularity(plays, plays.shape[1])
        by_row = np.zeros(plays.shape[1], dtype="<f4")  # every track's share, in factor-row order
        by_row[order] = shares
        top, shares = order[:1000], shares[:1000]
        meta = {
            "engine": self.engine.name,
            "artifact": str(artifact.resolve()),
            "checkpoint_time": repr(state.checkpoint_time),
            "n_plays": plays.nnz,
            "train_seconds": round(train_s, 3),
            "offsets": json.dumps(state.offsets),
            "metrics": json.dumps(metrics),
            "hyperparameters": json.dumps(chosen.params),
            **({"tuning": json.dumps(chosen.tuning)} if chosen.tuning is not None else {}),
            "popular": json.dumps([state.track_ids[i] for i in top]),
            "popular_scores": json.dumps([round(float(x), 6) for x in shares]),
            "popularity": by_row.tobytes(),
            **{k: repr(v) for k, v in metrics.items()},
        }
        stage("meta")
        self.models.publish(version, model, user_ids, state.track_ids, meta, candidate=candidate)
        late = self.models.erased_since(since) & set(user_ids)
        self.models.delete_user_vectors(version, late)  # erased while the vectors were written
        stage("publish")
        self.models.set_meta(version, "stage_seconds", json.dumps(stage.stages))
        log.info(
            "published %s: precision@10 %.4f ndcg@10 %.4f; hyperparameters %s; seconds per stage %s",
            version,
            metrics.get("precision@10", float("nan")),
            metrics.get("ndcg@10", float("nan")),
            chosen.params,
            stage.stages,
        )
        return version

    def _guard(self, precision: float) -> None:
        current = self.models.current_version()
        if current is None:
            return
        old = self.models.meta(current).get(b"precision@10")
        if old is not None and precision < self.s.publish_guard * float(old):
            raise ModelRejectedError(
                f"new model's holdout precision@10 {precision:.4f} is below "
                f"{self.s.publish_guard} × current {float(old):.4f}; not published"
            )
