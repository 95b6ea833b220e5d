"""The trainer's durable play matrix: accumulate plays, checkpoint atomically with offsets.

Optional time decay (`half_life_s` > 0): a play of weight w at time ts counts
w · 2^(−(now − ts)/half_life) when a model is trained at `now`. Weights are stored relative to
an anchor time, w · 2^((ts − anchor)/half_life), so adding a play never rewrites the others;
`training_matrix(now)` scales everything to `now`, and the anchor moves forward (rescaling the
stored weights once) before the exponent could leave float32's range.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import scipy.sparse as sp

from core.errors import CheckpointMismatchError
from services.infra.checked_files import read_npz, write_npz

REBUILD_HINT = "run `encore train --rebuild` to rebuild it from what the plays topic still holds"
MAX_HALF_LIVES = 60.0  # 2^60 stays far inside float32's range (2^127)


@dataclass
class PlayMatrix:
    """Users × tracks accumulated play weights with string id maps and applied offsets."""

    user_ids: list[str] = field(default_factory=list)
    track_ids: list[str] = field(default_factory=list)
    offsets: dict[str, int] = field(default_factory=dict)  # "incarnation|partition" → offset
    checkpoint_time: float = 0.0
    half_life_s: float = 0.0  # 0 = no time decay
    anchor: float = math.nan  # set by the first decayed play
    _base: sp.csr_matrix | None = None
    _rows: list[int] = field(default_factory=list)
    _cols: list[int] = field(default_factory=list)
    _vals: list[float] = field(default_factory=list)
    _to_erase: set[str] = field(default_factory=set)  # users whose row goes at the next compaction

    def __post_init__(self) -> None:
        self._uidx = {u: i for i, u in enumerate(self.user_ids)}
        self._tidx = {t: i for i, t in enumerate(self.track_ids)}

    def applied(self, incarnation: str, partition: int) -> int:
        return self.offsets.get(f"{incarnation}|{partition}", -1)

    def add(
        self, incarnation: str, partition: int, offset: int, user: str, track: str, weight: float, ts: float = 0.0
    ) -> bool:
        """Add one play unless its offset is already covered; returns whether it was new."""
        key = f"{incarnation}|{partition}"
        if offset <= self.offsets.get(key, -1):
            return False
        self.offsets[key] = offset
        if weight <= 0:
            return True
        if user in self._to_erase:  # a play after the erasure: the old row goes first
            self.matrix()
        if self.half_life_s > 0:
            if math.isnan(self.anchor):
                self.anchor = ts
            if (ts - self.anchor) / self.half_life_s > MAX_HALF_LIVES:
                self._reanchor(ts)
            weight *= 2.0 ** ((ts - self.anchor) / self.half_life_s)
        u = self._uidx.setdefault(user, len(self.user_ids))
        if u == len(self.user_ids):
            self.user_ids.append(user)
        t = self._tidx.setdefault(track, len(self.track_ids))
        if t == len(self.track_ids):
            self.track_ids.append(track)
        self._rows.append(u)
        self._cols.append(t)
        self._vals.append(weight)
        return True

    def erase(self, incarnation: str, partition: int, offset: int, user: str) -> bool:
        """Apply an erase record: the user's row leaves the matrix and the id maps (at the next
        compaction, all erased users at once), so neither the checkpoint nor a model trained on
        it holds them. Returns whether the record was new."""
        key = f"{incarnation}|{partition}"
        if offset <= self.offsets.get(key, -1):
            return False
        self.offsets[key] = offset
        if user in self._uidx:
            self._to_erase.add(user)
        return True

    def _drop_erased(self, m: sp.csr_matrix) -> sp.csr_matrix:
        if not self._to_erase:
            return m
        keep = np.array([u not in self._to_erase for u in self.user_ids], dtype=bool)
        self.user_ids = [u for u, k in zip(self.user_ids, keep, strict=True) if k]
        self._uidx = {u: i for i, u in enumerate(self.user_ids)}
        self._to_erase = set()
        return m[keep]

    @property
    def pending(self) -> int:
        return len(self._vals)

    def matrix(self) -> sp.csr_matrix:
        """The full matrix (compacts the appended plays into the base)."""
        shape = (len(self.user_ids), len(self.track_ids))
        base = self._base if self._base is not None else sp.csr_matrix(shape, dtype=np.float32)
        if base.shape != shape:
            base.resize(shape)  # new users/tracks append rows/columns
        if self._vals:
            add = sp.csr_matrix((np.array(self._vals, dtype=np.float32), (self._rows, self._cols)), shape=shape)
            base = (base + add).tocsr()
            self._rows, self._cols, self._vals = [], [], []
        base.sum_duplicates()
        base.sort_indices()
        self._base = self._drop_erased(base.astype(np.float32, copy=False))
        return self._base

    def _reanchor(self, t: float) -> None:
        """Move the anchor to `t`, rescaling the stored weights (compacts pending plays)."""
        m = self.matrix()
        m.data *= np.float32(2.0 ** ((self.anchor - t) / self.half_life_s))
        self.anchor = t

    def training_matrix(self, now: float) -> sp.csr_matrix:
        """The matrix as a model trained at `now` sees it: decayed to `now` when decay is on."""
        m = self.matrix()
        if self.half_life_s <= 0 or math.isnan(self.anchor):
            return m
        out = m.copy()
        out.data *= np.float32(2.0 ** ((self.anchor - now) / self.half_life_s))
        return out

    def check_half_life(self, half_life_s: float) -> None:
        """Adopt the configured half-life; a checkpoint built with another one cannot be reused."""
        if self.user_ids and half_life_s != self.half_life_s:
            raise CheckpointMismatchError(
                f"the checkpoint was built with a decay half-life of {self.half_life_s} s, the settings say "
                f"{half_life_s} s; keep the setting or delete the checkpoint to rebuild it from the topic"
            )
        self.half_life_s = half_life_s

    def save(self, path: str | Path, checkpoint_time: float) -> None:
        """Atomic and checksummed (`checked_files`): a crash leaves the previous checkpoint."""
        m = self.matrix()
        self.checkpoint_time = checkpoint_time
        write_npz(
            Path(path),
            {
                "indptr": m.indptr,
                "indices": m.indices,
                "data": m.data,
                "shape": np.array(m.shape),
                "user_ids": np.array(self.user_ids, dtype=str),
                "track_ids": np.array(self.track_ids, dtype=str),
                "offsets": np.array(json.dumps(self.offsets)),
                "checkpoint_time": np.array(checkpoint_time),
                "decay": np.array([self.half_life_s, self.anchor]),
            },
        )

    @classmethod
    def load(cls, path: str | Path) -> PlayMatrix:
        """The last complete checkpoint, or an empty matrix when there is none."""
        path = Path(path)
        if not path.exists():
            return cls()
        z = read_npz(path, "checkpoint", REBUILD_HINT)
        shape = tuple(int(x) for x in z["shape"])
        m = sp.csr_matrix((z["data"], z["indices"], z["indptr"]), shape=shape)
        pm = cls(
            user_ids=[str(u) for u in z["user_ids"]],
            track_ids=[str(t) for t in z["track_ids"]],
            offsets=json.loads(str(z["offsets"])),
            checkpoint_time=float(z["checkpoint_time"]),
        )
        pm.half_life_s, pm.anchor = (float(x) for x in z["decay"])
        pm._base = m
        return pm
