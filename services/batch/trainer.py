"""`encore train`: the batch layer's loop. Ingest → checkpoint → periodic retrain → janitor.

A component like the fold-in worker: `run` loops until `stop`, `close` releases the clients.
Each step is retried on transient faults (nothing is committed before a checkpoint is on disk);
a rejected model is logged and the current version stays. Stopping drains: plays already read
are checkpointed before `run` returns. Checkpoints and retrain outcomes go to the status board
(`encore status`).
"""

from __future__ import annotations

import logging
import threading
import time

from kafka import KafkaConsumer

from core.errors import ModelRejectedError
from services.batch.ingest import Ingest
from services.batch.janitor import VersionJanitor
from services.batch.retrain import Retrainer
from services.infra.lifecycle import Backoff, retry_step
from services.infra.model_store import RedisModelStore
from services.infra.settings import Settings
from services.infra.status_board import StatusBoard

log = logging.getLogger(__name__)
GROUP = "encore-trainer"
CHECKPOINT_EVERY_S = 30.0


class Trainer:
    """The single trainer instance; owns the checkpoint in the data folder."""

    def __init__(
        self,
        settings: Settings,
        ingest: Ingest,
        retrainer: Retrainer,
        janitor: VersionJanitor,
        models: RedisModelStore,
        consumer: KafkaConsumer,
        stop: threading.Event,
        board: StatusBoard | None = None,
        candidate: bool = False,
    ) -> None:
        """`candidate`: publish each new version as the candidate rather than current."""
        self.candidate = candidate
        self.s, self.ingest, self.retrainer, self.janitor = settings, ingest, retrainer, janitor
        self.models, self.consumer, self.stop_event, self.board = models, consumer, stop, board

    def _report(self, **fields: object) -> None:
        if self.board is not None:
            self.board.trainer_event(**fields)

    def checkpoint(self) -> None:
        self.ingest.checkpoint()
        st = self.ingest.state
        self._report(
            checkpoint_at=st.checkpoint_time,
            checkpoint_offsets={k: v for k, v in st.offsets.items() if k.startswith(f"{self.ingest.incarnation}|")},
            checkpoint_plays=int(st.matrix().nnz),
        )

    def train_and_publish(self) -> str:
        """Retrain on the last checkpoint, publish, then sweep superseded versions."""
        started = time.time()
        self._report(retrain_started_at=started)
        try:
            version = self.retrainer.train_and_publish(self.ingest.state, self.candidate)
        except ModelRejectedError as exc:
            self._report(last_retrain_at=started, last_retrain_outcome="rejected", last_retrain_error=str(exc))
            raise
        except Exception as exc:
            self._report(last_retrain_at=started, last_retrain_outcome="failed", last_retrain_error=str(exc))
            raise
        self._report(
            last_retrain_at=started,
            last_retrain_outcome="published",
            last_retrain_error="",
            last_version=version,
            last_retrain_seconds=round(time.time() - started, 3),
        )
        self.ingest.plays_since_train = 0
        self.janitor.sweep()
        return version

    def rebuild(self) -> None:
        """Rebuild the checkpoint from what `plays` still holds (the checkpoint was set aside)."""
        added = self.ingest.to_end()
        self.checkpoint()
        log.info("checkpoint rebuilt from the plays topic: %d plays with weight", added)

    def run_once(self) -> str:
        """Read `plays` to its end, checkpoint, train and publish."""
        self.ingest.to_end()
        self.checkpoint()
        return self.train_and_publish()

    def run(self) -> None:
        s, backoff = self.s, Backoff()
        last_train = 0.0 if self.models.current_version() is None else time.time()
        last_ckpt = time.time()

        def step() -> None:
            nonlocal last_train, last_ckpt
            self.ingest.poll(1.0)
            now = time.time()
            due = now - last_train >= s.retrain_interval_s or (
                s.retrain_min_new_plays and self.ingest.plays_since_train >= s.retrain_min_new_plays
            )
            if now - last_ckpt >= CHECKPOINT_EVERY_S or (due and self.ingest.state.pending):
                self.checkpoint()
                last_ckpt = now
            if due and self.ingest.state.matrix().nnz:
                try:
                    self.train_and_publish()
                except ModelRejectedError as exc:
                    log.error("%s", exc)
                last_train = time.time()

        while not self.stop_event.is_set():
            retry_step(step, self.stop_event, "trainer step", backoff)
        self.drain()

    def drain(self) -> None:
        """On stop: checkpoint the plays read since the last checkpoint (one try; if it fails
        they are read again from the topic at the next start, nothing is lost)."""
        if self.ingest.state.pending:
            try:
                self.checkpoint()
                log.info("stopped: plays read so far are checkpointed")
            except Exception as exc:
                log.warning("stopped without a final checkpoint (%s); the next start re-reads those plays", exc)

    def stop(self) -> None:
        self.stop_event.set()

    def close(self) -> None:
        self.consumer.close()
