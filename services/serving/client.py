"""Lookup client: other Python services read vectors and top-N straight from Redis.

from services.client import EncoreClient
client = EncoreClient("redis://127.0.0.1:6379/0")
client.user_vector("u-123")          # float32 array or None
client.top_n("u-123", n=10)          # [(track_id, score), ...], played tracks excluded

Each call reads the current version once and uses it throughout, so one answer never mixes
two versions (old versions stay readable for ENCORE_VERSION_GRACE_S after a flip).
"""

from __future__ import annotations

import numpy as np
import scipy.sparse as sp

from core.messages import decode_vector
from core.recommend import top_n
from services.infra.clients import Clients
from services.infra.model_store import LoadedModel, RedisModelStore
from services.infra.settings import Settings


class EncoreClient:
    """Reads the current model version, vectors and exact top-N without an HTTP hop."""

    def __init__(
        self, redis_url: str, key_prefix: str = "encore:", timeout_s: float = 10.0, settings: Settings | None = None
    ) -> None:
        """`settings` (e.g. `Settings.from_env()`) brings TLS files and credentials; the other
        arguments then override its URL, prefix and timeout."""
        base = settings or Settings()
        clients = Clients(base.with_(redis_url=redis_url, key_prefix=key_prefix, redis_timeout_s=timeout_s))
        self.r = clients.redis()
        self.keys = clients.keys
        self.models = RedisModelStore(self.r, self.keys)
        self._model: LoadedModel | None = None

    def current_version(self) -> str | None:
        return self.models.current_version()

    def _vector(self, key: str) -> np.ndarray | None:
        raw = self.r.get(key)
        return None if raw is None else decode_vector(raw)

    def user_vector(self, user_id: str, version: str | None = None) -> np.ndarray | None:
        version = version or self.current_version()
        return None if version is None else self._vector(self.keys.user(version, user_id))

    def track_vector(self, track_id: str, version: str | None = None) -> np.ndarray | None:
        version = version or self.current_version()
        return None if version is None else self._vector(self.keys.track(version, track_id))

    def history(self, user_id: str) -> dict[str, float]:
        return {k.decode(): float(v) for k, v in self.r.hgetall(self.keys.history(user_id)).items()}

    def recent_listeners(self, track_id: str) -> list[str]:
        return [u.decode() for u in self.r.zrange(self.keys.listeners(track_id), 0, -1)]

    def top_n(self, user_id: str, n: int = 10) -> list[tuple[str, float]]:
        """Exact top-n by inner product over the current version's tracks, played ones excluded."""
        version = self.current_version()
        if version is None:
            return []
        if self._model is None or self._model.version != version:
            self._model = self.models.load(version)
        vec = self.user_vector(user_id, version)
        if vec is None:
            return []
        played = [self._model.track_index[t] for t in self.history(user_id) if t in self._model.track_index]
        F = self._model.model.item_factors_
        exclude = None
        if played:
            exclude = sp.csr_matrix((np.ones(len(played)), ([0] * len(played), played)), shape=(1, F.shape[0]))
        idx, scores = top_n(vec[None], F, n, exclude=exclude)
        return [(self._model.track_ids[i], float(s)) for i, s in zip(idx[0], scores[0], strict=True) if i >= 0]

    def close(self) -> None:
        self.r.close()
