"""Related artists and radio, built on the track vectors and the catalogue's artist ids.

An artist's vector is the listener-weighted mean of its tracks' unit-length factors, scaled to
unit length: each track points in the direction of its listeners' taste, and an artist sits
where its listened tracks sit (a track nobody played weighs as little as the least played).
Two artists are related by the cosine of their vectors.

Radio is a playlist from a seed (a track or an artist), optionally blended with a listener's
vector: tracks in order of cosine to the blend, no artist twice within `window` tracks (the
best track whose artist is not among the last `window` picks comes next).
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Iterable

import numpy as np

from core.recommend import normalize_rows

MIN_WEIGHT = 1e-3


class ArtistSpace:
    """Unit vectors of every artist with at least one track in the index."""

    def __init__(
        self,
        artist_tracks: dict[str, list[str]],
        vectors: Callable[[list[str]], np.ndarray],
        weight: Callable[[str], float],
    ) -> None:
        self.ids: list[str] = []
        rows = []
        for artist, tracks in artist_tracks.items():
            V = vectors(tracks)
            known = np.flatnonzero(np.isfinite(V).all(axis=1) & (V != 0).any(axis=1))
            if not len(known):
                continue
            w = np.array([max(weight(tracks[i]), MIN_WEIGHT) for i in known], dtype=np.float32)
            rows.append((normalize_rows(V[known]) * w[:, None]).sum(axis=0))
            self.ids.append(artist)
        dim = rows[0].shape[0] if rows else 0
        self.matrix = normalize_rows(np.asarray(rows, dtype=np.float32).reshape(len(rows), dim))
        self.row = {a: i for i, a in enumerate(self.ids)}

    def vector(self, artist_id: str) -> np.ndarray | None:
        i = self.row.get(artist_id)
        return None if i is None else self.matrix[i]

    def similar(self, artist_id: str, n: int) -> list[tuple[str, float]]:
        """The n artists nearest `artist_id` by cosine, itself left out (exact: artists are few)."""
        i = self.row[artist_id]
        scores = self.matrix @ self.matrix[i]
        scores[i] = -np.inf
        m = min(n, len(self.ids) - 1)
        if m <= 0:
            return []
        top = np.argpartition(-scores, m - 1)[:m]
        top = top[np.argsort(-scores[top], kind="stable")]
        return [(self.ids[j], float(scores[j])) for j in top]

    def __len__(self) -> int:
        return len(self.ids)


def blend(seed: np.ndarray, listener: np.ndarray | None, listener_weight: float) -> np.ndarray:
    """The radio's query: the seed's direction, pulled towards the listener's by `listener_weight`."""
    q = normalize_rows(np.atleast_2d(seed))[0]
    if listener is not None and listener.any() and listener_weight > 0:
        q = q + listener_weight * normalize_rows(np.atleast_2d(listener))[0]
    return normalize_rows(q[None])[0]


def playlist(
    ranked: Iterable[tuple[str, float]], n: int, window: int, artist_of: Callable[[str], str | None]
) -> list[tuple[str, float]]:
    """The first n of `ranked` (best first) re-ordered so that no artist repeats within `window`
    consecutive tracks: each position takes the best remaining track whose artist is not among
    the previous `window` - 1 picks. Tracks with no artist never conflict."""
    out: list[tuple[str, float]] = []
    recent: deque[str] = deque(maxlen=max(window - 1, 0))
    waiting: list[tuple[str, float]] = []  # passed over for their artist, best first
    source = iter(ranked)
    exhausted = False
    while len(out) < n:
        choice = next((j for j, (t, _) in enumerate(waiting) if artist_of(t) not in recent), None)
        if choice is None:
            if exhausted:
                break
            item = next(source, None)
            if item is None:
                exhausted = True
                continue
            artist = artist_of(item[0])
            if artist is not None and artist in recent:
                waiting.append(item)
                continue
            picked = item
        else:
            picked = waiting.pop(choice)
        out.append(picked)
        artist = artist_of(picked[0])
        if recent.maxlen:
            recent.append(artist if artist is not None else f"\0{picked[0]}")
    return out
