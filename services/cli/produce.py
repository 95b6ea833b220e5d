"""`encore produce`: plays from JSON lines / CSV files or the synthetic generator, at a rate."""

from __future__ import annotations

import csv
import json
import logging
import time
from collections.abc import Iterable, Iterator
from pathlib import Path

from services.infra.play_publisher import PlayPublisher

log = logging.getLogger(__name__)


def _json_lines(f: Iterable[bytes], key_field: str) -> Iterator[tuple[bytes, bytes]]:
    """(key, line) of each non-empty line, the key from `key_field` (b"" when the line has none
    or is not JSON: the line is passed on as it is, and its consumer dead-letters it)."""
    for line in f:
        line = line.rstrip(b"\r\n")
        if not line:
            continue
        try:
            key = str(json.loads(line).get(key_field, "")).encode()
        except (ValueError, AttributeError):
            key = b""
        yield key, line


def read_plays_file(path: str | Path) -> Iterator[tuple[bytes | None, bytes]]:
    """(key, value) pairs from JSON lines or CSV `user_id,track_id,ts[,ms_played,count]`.

    Lines are passed on as they are (bad ones reach the DLQ with a reason), except CSV rows,
    which are converted to the JSON schema first.
    """
    p = Path(path)
    with p.open("rb") as f:
        if p.suffix.lower() == ".csv":
            reader = csv.reader(line.decode("utf-8", "replace") for line in f)
            for row in reader:
                if not row or row[0] == "user_id":
                    continue
                d: dict[str, object] = {"user_id": row[0], "track_id": row[1] if len(row) > 1 else ""}
                for i, name in ((2, "ts"), (3, "ms_played"), (4, "count")):
                    if len(row) > i and row[i] != "":
                        try:
                            d[name] = float(row[i]) if name == "ts" else int(row[i])
                        except ValueError:
                            d[name] = row[i]
                yield row[0].encode(), json.dumps(d).encode()
        else:
            for key, line in _json_lines(f, "user_id"):
                yield key or None, line


TRACK_COLUMNS = ("track_id", "artist_id", "title", "tags", "explicit", "regions", "available")
_BOOLS = {"true": True, "1": True, "yes": True, "false": False, "0": False, "no": False}


def read_tracks_file(path: str | Path) -> Iterator[tuple[bytes | None, bytes]]:
    """(key, value) catalogue records from JSON lines (the topic's schema, passed on as they are)
    or a CSV with a header naming some of TRACK_COLUMNS (`tags` and `regions` separated by `|`,
    an empty `regions` for everywhere). Invalid entries reach the catalogue's DLQ with a reason."""
    p = Path(path)
    with p.open("rb") as f:
        if p.suffix.lower() == ".csv":
            rows = csv.DictReader(line.decode("utf-8", "replace") for line in f)
            for row in rows:
                d: dict[str, object] = {"v": 1, **{k: v for k, v in row.items() if k in TRACK_COLUMNS}}
                for name in ("tags", "regions"):
                    if name in d:
                        raw = str(d[name] or "")
                        d[name] = [x.strip() for x in raw.split("|") if x.strip()] or (
                            None if name == "regions" else []
                        )
                for name in ("explicit", "available"):
                    if name in d:
                        d[name] = _BOOLS.get(str(d[name]).strip().lower(), d[name])
                if d.get("artist_id") == "":
                    d["artist_id"] = None
                yield str(d.get("track_id") or "").encode(), json.dumps(d).encode()
        else:
            yield from _json_lines(f, "track_id")  # b"" for no id: a compacted topic takes no null key


def synthetic_stream(
    n_users: int, n_tracks: int, seed: int, limit: int | None, live: bool
) -> Iterator[tuple[bytes | None, bytes]]:
    """Synthetic plays; `live` shifts timestamps to now so they look like fresh plays."""
    from core.synthetic import SyntheticMusic

    data = SyntheticMusic(n_users=n_users, n_tracks=n_tracks, seed=seed)
    for ev in data.events(limit):
        if live:
            ev["ts"] = round(time.time(), 3)
        yield str(ev["user_id"]).encode(), json.dumps(ev).encode()


def produce(
    publisher: PlayPublisher,
    source: Iterable[tuple[bytes | None, bytes]],
    rate: float = 0.0,
    report_every: float = 5.0,
    stop: object = None,
) -> int:
    """Send `source` at `rate` events/s (0 = as fast as possible); returns the count sent."""
    n, t0, last = 0, time.monotonic(), time.monotonic()
    for key, value in source:
        if stop is not None and getattr(stop, "is_set")():  # noqa: B009
            break
        publisher.publish_raw(key, value)
        n += 1
        if rate > 0:
            ahead = n / rate - (time.monotonic() - t0)
            if ahead > 0:
                time.sleep(ahead)
        now = time.monotonic()
        if now - last >= report_every:
            log.info("produced %d plays, %.0f/s", n, n / (now - t0))
            last = now
    publisher.flush()
    elapsed = time.monotonic() - t0
    log.info("produced %d plays in %.1fs (%.0f/s)", n, elapsed, n / max(elapsed, 1e-9))
    return n
