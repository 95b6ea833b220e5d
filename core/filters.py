"""Catalogue filters on recommendations, and the filtered top-n search over any track index.

A filter is applied to a ranked candidate list, best first, so the artist cap keeps each
artist's best tracks. The graph search over-fetches and widens: a graph search costs the same
up to its breadth ef (hnswlib searches max(ef, k) wide whatever k is asked), so the first round
asks for `breadth` candidates; if fewer than n pass, it asks again for more (at least twice as
many, more when few passed), until n pass or the whole index has been read. The answer
therefore holds n items whenever n tracks pass. Its recall is that of the graph at the depth
where the n-th passing track sits, good for broad filters only: narrow ones are answered by an
exact scan of the tracks they pass (`core.filter_plans`).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from itertools import islice

import numpy as np

from core.catalogue import Catalogue, TrackInfo
from core.index import TrackIndex

Ranked = list[tuple[str, float]]
Choose = Callable[[Iterable[tuple[str, float]], int], Ranked]  # makes n from passing candidates, best first


@dataclass(frozen=True)
class TrackFilter:
    """What a caller leaves out. `explicit` False drops explicit tracks; `region` keeps tracks
    available there; `tags` keeps tracks with any of them; `max_per_artist` caps each artist."""

    exclude: frozenset[str] = field(default_factory=frozenset)
    explicit: bool = True
    region: str | None = None
    tags: frozenset[str] = field(default_factory=frozenset)
    max_per_artist: int | None = None

    @property
    def selective(self) -> bool:
        """Whether catalogue attributes decide (beyond the exclusion list and availability)."""
        return not self.explicit or self.region is not None or bool(self.tags) or self.max_per_artist is not None

    def excluding(self, more: Iterable[str]) -> TrackFilter:
        extra = frozenset(more)
        if not extra:
            return self
        return TrackFilter(self.exclude | extra, self.explicit, self.region, self.tags, self.max_per_artist)

    def admits(self, info: TrackInfo | None) -> bool:
        """The catalogue part of the filter. No entry: available everywhere, not explicit, no tags."""
        if info is None:
            return not self.tags
        if not info.available or (info.explicit and not self.explicit):
            return False
        if self.region is not None and info.regions is not None and self.region not in info.regions:
            return False
        return not self.tags or not self.tags.isdisjoint(info.tags)


NO_FILTER = TrackFilter()


def passing(ranked: Iterable[tuple[str, float]], flt: TrackFilter, catalogue: Catalogue) -> Iterator[tuple[str, float]]:
    """The entries of `ranked` that pass `flt`, lazily and in order (unavailable tracks never pass)."""
    per_artist: dict[str, int] = {}
    entries, exclude, cap = catalogue.entries, flt.exclude, flt.max_per_artist
    for track, score in ranked:
        if track in exclude:
            continue
        info = entries.get(track)
        if info is None:
            if flt.tags:
                continue
        elif not flt.admits(info):
            continue
        elif cap is not None and info.artist_id is not None:
            seen = per_artist.get(info.artist_id, 0)
            if seen >= cap:
                continue
            per_artist[info.artist_id] = seen + 1
        yield track, score


def pick(ranked: Iterable[tuple[str, float]], n: int, flt: TrackFilter, catalogue: Catalogue) -> Ranked:
    """The first n of `ranked` that pass `flt`."""
    return list(islice(passing(ranked, flt, catalogue), max(n, 0)))


def search(
    index: TrackIndex,
    vector: np.ndarray,
    n: int,
    flt: TrackFilter,
    catalogue: Catalogue,
    breadth: int,
    choose: Choose | None = None,
) -> Ranked:
    """Top n of `index` for `vector` that pass `flt`, widening the candidate list as needed.
    `choose` (default: the first n) makes the n from the passing candidates, best first."""
    live = len(index)
    if live == 0 or n <= 0:
        return []
    wanted = n + len(flt.exclude)
    k = min(live, max(wanted, breadth) if flt.selective or choose else wanted)
    while True:
        ranked = passing(index.ranked(vector, k), flt, catalogue)
        got = choose(ranked, n) if choose else list(islice(ranked, n))
        if len(got) >= n or k >= live:
            return got
        growth = 8.0 if not got else max(2.0, 1.5 * n / len(got))
        k = min(live, int(k * growth) + 1)
