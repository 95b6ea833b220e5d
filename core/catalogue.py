"""The track catalogue: what a music service knows about a track beyond its vector.

Records of the compacted `tracks` topic (key = track id) carry UTF-8 JSON
`{"v": 1, "track_id", "artist_id", "title", "tags", "explicit", "regions", "available"}`; a
null value removes the entry. `TrackInfo.decode` is the one place that format is read and
checked, `encode` the one place it is built. A track with no entry is recommendable as before
catalogues existed: available everywhere, not explicit, no artist, no tags.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from dataclasses import dataclass, field, replace

import orjson

from core.messages import MessageError

SCHEMA_VERSION = 1
MAX_ID_LENGTH = 256
MAX_TAGS = 64


@dataclass(frozen=True)
class TrackInfo:
    """One catalogue entry (`regions` None: available in every region)."""

    track_id: str
    artist_id: str | None = None
    title: str = ""
    tags: frozenset[str] = field(default_factory=frozenset)
    explicit: bool = False
    regions: frozenset[str] | None = None
    available: bool = True

    def with_available(self, available: bool) -> TrackInfo:
        return replace(self, available=available)

    def to_dict(self) -> dict[str, object]:
        return {
            "v": SCHEMA_VERSION,
            "track_id": self.track_id,
            "artist_id": self.artist_id,
            "title": self.title,
            "tags": sorted(self.tags),
            "explicit": self.explicit,
            "regions": None if self.regions is None else sorted(self.regions),
            "available": self.available,
        }

    def encode(self) -> bytes:
        return orjson.dumps(self.to_dict())

    @classmethod
    def from_dict(cls, d: object, key: str | None = None) -> TrackInfo:
        """Check one entry against the schema; raises MessageError saying what is wrong."""
        if not isinstance(d, dict):
            raise MessageError("catalogue entry is not a JSON object")
        if d.get("v", SCHEMA_VERSION) != SCHEMA_VERSION:
            raise MessageError(f"catalogue entry: unsupported schema version {d.get('v')!r}")
        track_id = d.get("track_id")
        if not isinstance(track_id, str) or not 0 < len(track_id) <= MAX_ID_LENGTH:
            raise MessageError(f"catalogue entry: track_id must be a string of 1..{MAX_ID_LENGTH} characters")
        if key is not None and key != track_id:
            raise MessageError(f"catalogue entry: key {key!r} differs from track_id {track_id!r}")
        artist = d.get("artist_id")
        if artist is not None and (not isinstance(artist, str) or not 0 < len(artist) <= MAX_ID_LENGTH):
            raise MessageError("catalogue entry: artist_id must be null or a non-empty string")
        title = d.get("title") or ""
        if not isinstance(title, str):
            raise MessageError("catalogue entry: title must be a string")
        tags = d.get("tags") or []
        if not isinstance(tags, list) or len(tags) > MAX_TAGS or not all(isinstance(t, str) and t for t in tags):
            raise MessageError(f"catalogue entry: tags must be a list of at most {MAX_TAGS} non-empty strings")
        regions = d.get("regions")
        if regions is not None and (
            not isinstance(regions, list) or not all(isinstance(r, str) and len(r) == 2 for r in regions)
        ):
            raise MessageError("catalogue entry: regions must be null or a list of two-letter region codes")
        flags = {}
        for name, default in (("explicit", False), ("available", True)):
            value = d.get(name, default)
            if not isinstance(value, bool):
                raise MessageError(f"catalogue entry: {name} must be true or false")
            flags[name] = value
        return cls(
            track_id,
            artist,
            title,
            frozenset(t.lower() for t in tags),
            flags["explicit"],
            None if regions is None else frozenset(r.upper() for r in regions),
            flags["available"],
        )

    @classmethod
    def decode(cls, key: bytes | None, value: bytes | None) -> tuple[str, TrackInfo | None]:
        """(track id, entry) of a topic record; entry None for a removal (null value)."""
        track = key.decode("utf-8", "replace") if key else None
        if value is None:
            if not track:
                raise MessageError("catalogue removal (null value) without a key")
            return track, None
        try:
            d = orjson.loads(value)
        except orjson.JSONDecodeError as exc:
            raise MessageError(f"catalogue entry is not JSON: {exc}") from None
        info = cls.from_dict(d, track)
        return info.track_id, info


class Catalogue:
    """The entries a replica knows, with each artist's tracks (for related artists and radio).

    Writers (the update follower, an admin request) take a lock; readers do not: each write
    replaces a whole entry, so a reader sees either the old or the new one, and an artist's
    tracks are read as a copy.
    """

    def __init__(self) -> None:
        self.entries: dict[str, TrackInfo] = {}
        self.by_artist: dict[str, set[str]] = {}
        self.changes = 0
        self._lock = threading.Lock()

    def put(self, info: TrackInfo) -> None:
        with self._lock:
            self._remove(info.track_id)
            self.entries[info.track_id] = info
            if info.artist_id is not None:
                self.by_artist.setdefault(info.artist_id, set()).add(info.track_id)
            self.changes += 1

    def remove(self, track_id: str) -> None:
        with self._lock:
            self._remove(track_id)
            self.changes += 1

    def tracks_of(self, artist_id: str) -> list[str]:
        with self._lock:
            return sorted(self.by_artist.get(artist_id, ()))

    def artists(self) -> dict[str, list[str]]:
        """Every artist's tracks (a copy)."""
        with self._lock:
            return {a: sorted(ts) for a, ts in self.by_artist.items()}

    def _remove(self, track_id: str) -> None:
        old = self.entries.pop(track_id, None)
        if old is not None and old.artist_id is not None:
            tracks = self.by_artist.get(old.artist_id)
            if tracks is not None:
                tracks.discard(track_id)
                if not tracks:
                    del self.by_artist[old.artist_id]

    def apply(self, track_id: str, info: TrackInfo | None) -> None:
        if info is None:
            self.remove(track_id)
        else:
            self.put(info)

    def get(self, track_id: str) -> TrackInfo | None:
        return self.entries.get(track_id)

    def available(self, track_id: str) -> bool:
        info = self.entries.get(track_id)
        return info is None or info.available

    def artist_of(self, track_id: str) -> str | None:
        info = self.entries.get(track_id)
        return None if info is None else info.artist_id

    def __len__(self) -> int:
        return len(self.entries)

    def __iter__(self) -> Iterator[TrackInfo]:
        return iter(list(self.entries.values()))
