"""Deterministic synthetic play data shaped like a music service.

Zipf-like track popularity inside genres, users with latent tastes (a few favourite genres),
repeat plays of favourites, skips (short `ms_played`), timestamps, and users and tracks that
appear over time. Tests, demos and benchmarks all use it.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field

import numpy as np
import scipy.sparse as sp

SKIP_MS = 30_000


@dataclass(frozen=True)
class PlayLog:
    """One row per single play, sorted by time."""

    user: np.ndarray
    track: np.ndarray
    ts: np.ndarray
    ms_played: np.ndarray


@dataclass
class SyntheticMusic:
    """A generator of plays; the same parameters and seed always give the same data."""

    n_users: int = 2000
    n_tracks: int = 1000
    mean_plays: float = 30.0
    n_genres: int = 20
    zipf: float = 1.1
    skip_rate: float = 0.15
    taste_focus: float = 0.85
    new_fraction: float = 0.2
    start_ts: float = 1_700_000_000.0
    duration_s: float = 30 * 86_400.0
    seed: int = 0
    _log: PlayLog | None = field(default=None, init=False, repr=False)

    def __post_init__(self) -> None:
        rng = np.random.default_rng(self.seed)
        self.track_genre = rng.integers(0, self.n_genres, self.n_tracks)
        ranks = rng.permutation(self.n_tracks) + 1.0
        self.track_popularity = ranks ** (-self.zipf)
        n_fav = rng.integers(1, 4, self.n_users)
        self.user_genres = [rng.choice(self.n_genres, k, replace=False) for k in n_fav]
        self.user_ids = np.array([f"u{i}" for i in range(self.n_users)])
        self.track_ids = np.array([f"t{i}" for i in range(self.n_tracks)])
        # Users and tracks past the (1 - new_fraction) mark appear gradually over time.
        self.user_join = self._appearance(self.n_users, rng)
        self.track_release = self._appearance(self.n_tracks, rng)

    def _appearance(self, n: int, rng: np.random.Generator) -> np.ndarray:
        old = int(n * (1 - self.new_fraction))
        t = np.zeros(n)
        t[old:] = np.sort(rng.uniform(0, self.duration_s * 0.8, n - old))
        return t

    def log(self) -> PlayLog:
        """All single plays, vectorized; cached."""
        if self._log is None:
            self._log = self._generate()
        return self._log

    def _generate(self) -> PlayLog:
        rng = np.random.default_rng(self.seed + 1)
        per_user = np.maximum(1, rng.poisson(self.mean_plays, self.n_users))
        user = np.repeat(np.arange(self.n_users), per_user)
        total = user.size
        # Genre: one of the user's favourites with prob taste_focus, else any genre.
        fav_count = np.array([len(g) for g in self.user_genres])
        pick = (rng.random(total) * fav_count[user]).astype(np.int64)
        flat = np.concatenate(self.user_genres)
        offsets = np.concatenate([[0], np.cumsum(fav_count)[:-1]])
        genre = flat[offsets[user] + pick]
        wander = rng.random(total) > self.taste_focus
        genre[wander] = rng.integers(0, self.n_genres, int(wander.sum()))
        track = np.empty(total, dtype=np.int64)
        for g in range(self.n_genres):
            members = np.flatnonzero(self.track_genre == g)
            rows = np.flatnonzero(genre == g)
            if members.size == 0:
                members = np.arange(self.n_tracks)
            p = self.track_popularity[members]
            track[rows] = members[rng.choice(members.size, rows.size, p=p / p.sum())]
        # Repeat plays: a share of plays go again to a track the user already played.
        repeat = rng.random(total) < 0.3
        first = np.concatenate([[0], np.cumsum(per_user)[:-1]])
        track[repeat] = track[first[user[repeat]]]
        lo = np.maximum(self.user_join[user], self.track_release[track])
        ts = self.start_ts + lo + rng.random(total) * (self.duration_s - lo)
        skip = rng.random(total) < self.skip_rate
        ms = np.where(skip, rng.integers(1_000, SKIP_MS, total), rng.integers(SKIP_MS, 400_000, total))
        order = np.argsort(ts, kind="stable")
        return PlayLog(
            user[order].astype(np.int32), track[order].astype(np.int32), ts[order], ms[order].astype(np.int64)
        )

    def matrix(self, before_ts: float | None = None) -> sp.csr_matrix:
        """Users × tracks raw play counts (skips excluded), optionally only plays before a time."""
        lg = self.log()
        keep = lg.ms_played >= SKIP_MS
        if before_ts is not None:
            keep &= lg.ts < before_ts
        m = sp.csr_matrix(
            (np.ones(int(keep.sum()), dtype=np.float32), (lg.user[keep], lg.track[keep])),
            shape=(self.n_users, self.n_tracks),
        )
        m.sum_duplicates()
        return m

    def events(self, limit: int | None = None) -> Iterator[dict[str, object]]:
        """Play events in time order, in the `plays` topic schema."""
        lg = self.log()
        n = lg.user.size if limit is None else min(limit, lg.user.size)
        for j in range(n):
            yield {
                "v": 1,
                "user_id": str(self.user_ids[lg.user[j]]),
                "track_id": str(self.track_ids[lg.track[j]]),
                "ts": round(float(lg.ts[j]), 3),
                "ms_played": int(lg.ms_played[j]),
                "count": 1,
                "event_id": f"e{self.seed}-{j}",
            }
