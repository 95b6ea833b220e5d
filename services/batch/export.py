"""`encore export`: every user's top n from the current version, to JSON lines or Parquet.

Users are the version's stored vectors (SCAN), or a given list. Each chunk of users is one
MGET of vectors, one pipeline of histories, and then, up to EXACT_MAX_TRACKS tracks, one exact
masked matrix product on all cores (exact lists at about 0.7x the graph's speed), beyond it
one batched HNSW query on all cores (hnswlib `num_threads=-1`) deep enough for n plus the
longest history of the chunk; the same catalogue
filter as the API then picks each user's n (unavailable tracks never pass), and the rare user
whose filter leaves too few gets the API's widening search. A narrow filter is answered as the
API answers it, by an exact scan of the tracks it passes (`core.filter_plans`). A user with no
vector gets the popular fallback, filtered the same way.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import orjson
import redis
import scipy.sparse as sp

from core.catalogue import Catalogue
from core.filter_plans import FilterPlans, planned_search
from core.filters import Ranked, TrackFilter, pick, search
from core.hnsw import HNSWIndex
from core.messages import decode_vector
from core.recommend import top_n
from services.infra.keys import Keys
from services.infra.model_store import RedisModelStore

log = logging.getLogger(__name__)
CHUNK = 2048
# Up to this many tracks a batch is scored exactly: at 200k tracks (bench.export) the exact path
# wrote 1,411 users/s with recall 1, the graph path 2,076 users/s with recall@50 0.84 (an earlier
# run); a batch job can afford 0.7x the speed for exact lists. The cost grows with the tracks.
EXACT_MAX_TRACKS = 300_000


@dataclass(frozen=True)
class Served:
    """What export needs of a version: its id, its inner-product graph and popular fallback."""

    version: str
    ip: HNSWIndex
    popular: list[tuple[str, float]]


@dataclass
class ExportStats:
    users: int = 0
    personal: int = 0
    popular: int = 0
    seconds: float = 0.0


class Writer:
    """Rows to `.jsonl` (one user a line) or `.parquet` (one row per item: user_id, rank,
    track_id, score, source, model_version)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.kind = path.suffix.lower()
        if self.kind not in (".jsonl", ".parquet"):
            raise ValueError(f"{path}: the output must end in .jsonl or .parquet")
        self._tmp = path.with_name(path.name + ".tmp")
        self._pq: Any = None
        self._f = open(self._tmp, "wb") if self.kind == ".jsonl" else None  # noqa: SIM115 - closed in close()

    def write(self, version: str, rows: list[tuple[str, str, Ranked]]) -> None:
        if self._f is not None:
            for user, source, items in rows:
                body: dict[str, object] = {"user_id": user, "model_version": version, "source": source}
                body["items"] = [{"track_id": t, "score": s} for t, s in items]
                self._f.write(orjson.dumps(body) + b"\n")
            return
        import pyarrow as pa
        import pyarrow.parquet as pq

        cols: dict[str, list[Any]] = {k: [] for k in ("user_id", "rank", "track_id", "score", "source")}
        for user, source, items in rows:
            for rank, (t, s) in enumerate(items, 1):
                for k, v in zip(cols, (user, rank, t, s, source), strict=True):
                    cols[k].append(v)
        table = pa.table({**cols, "model_version": [version] * len(cols["user_id"])})
        if self._pq is None:
            self._pq = pq.ParquetWriter(self._tmp, table.schema)
        self._pq.write_table(table)

    def abort(self) -> None:
        """Drop the partial output (the previous file at `path`, if any, stays)."""
        if self._f is not None:
            self._f.close()
        elif self._pq is not None:
            self._pq.close()
        self._tmp.unlink(missing_ok=True)

    def close(self) -> None:
        """Finish the file and move it into place (a crash leaves no half-written output)."""
        if self._f is not None:
            self._f.close()
        elif self._pq is not None:
            self._pq.close()
        else:  # no rows: still a valid, empty file
            import pyarrow as pa
            import pyarrow.parquet as pq

            pq.write_table(pa.table({"user_id": pa.array([], pa.string())}), self._tmp)
        self._tmp.replace(self.path)


class Exporter:
    def __init__(
        self,
        r: redis.Redis,
        keys: Keys,
        models: RedisModelStore,
        served: Served,
        catalogue: Catalogue,
    ) -> None:
        self.r, self.keys, self.models, self.snap, self.catalogue = r, keys, models, served, catalogue
        self.plans = FilterPlans()
        self._all: tuple[list[str], dict[str, int], np.ndarray] | None = None

    def all_users(self) -> Iterator[str]:
        version = self.snap.version
        for key in self.r.scan_iter(match=self.keys.user_pattern(version), count=10_000):
            yield self.keys.user_of(version, key)

    def chunk(self, users: list[str], n: int, flt: TrackFilter) -> list[tuple[str, str, Ranked]]:
        """(user, source, items) of each user of the chunk."""
        raw = self.models.user_vectors(self.snap.version, users)
        pipe = self.r.pipeline(transaction=False)
        for u in users:
            pipe.hkeys(self.keys.history(u))
        played = [{t.decode() for t in h} for h in pipe.execute()]
        index = self.snap.ip
        narrow = self.plans.subset(index, flt, self.catalogue) is not None
        with_vec = [i for i, b in enumerate(raw) if b is not None and any(b)]
        has_vec = set(with_vec) if len(index) else set()
        out: list[tuple[str, str, Ranked]] = [
            (u, "popular", [] if i in has_vec else pick(self.snap.popular, n, flt.excluding(played[i]), self.catalogue))
            for i, u in enumerate(users)
        ]
        if not has_vec:
            return out
        vecs = np.stack([decode_vector(raw[i]) for i in with_vec])  # type: ignore[arg-type]
        if narrow:  # an exact scan of the filter's tracks, as the API answers it
            for row, i in enumerate(with_vec):
                items = planned_search(index, vecs[row], n, flt.excluding(played[i]), self.catalogue, self.plans)
                out[i] = (users[i], "personal", items)
            return out
        if len(index) <= EXACT_MAX_TRACKS:
            self._exact(users, with_vec, vecs, played, n, flt, out)
            return out
        depth = n + len(flt.exclude) + max(len(played[i]) for i in with_vec)
        k = min(len(index), max(depth, index.ef if flt.selective else depth))
        labels, dist = index.knn(vecs, k, threads=-1)
        ids = index.slots.ids
        for row, i in enumerate(with_vec):
            user_flt = flt.excluding(played[i])
            ranked = ((str(ids[lab]), 1.0 - float(d)) for lab, d in zip(labels[row].tolist(), dist[row], strict=True))
            items = pick(ranked, n, user_flt, self.catalogue)
            if len(items) < n and k < len(index):
                items = search(index, vecs[row], n, user_flt, self.catalogue, index.ef)
            out[i] = (users[i], "personal", items)
        return out

    def _exact(
        self,
        users: list[str],
        with_vec: list[int],
        vecs: np.ndarray,
        played: list[set[str]],
        n: int,
        flt: TrackFilter,
        out: list[tuple[str, str, Ranked]],
    ) -> None:
        """Exact top n of the chunk: one masked matrix product and selection on all cores
        (`core.recommend.top_n`), played tracks masked, the filter applied to each ranked row."""
        if self._all is None:  # every served track's vector, once
            ids = list(self.snap.ip.slots.label)
            self._all = (ids, {t: j for j, t in enumerate(ids)}, self.snap.ip.stored(ids))
        ids, col, F = self._all
        rows: list[int] = []
        cols: list[int] = []
        for r, i in enumerate(with_vec):
            hit = [col[t] for t in played[i] if t in col]
            rows += [r] * len(hit)
            cols += hit
        mask = sp.csr_matrix((np.ones(len(rows), np.float32), (rows, cols)), shape=(len(with_vec), len(ids)))
        depth = min(len(ids), n + len(flt.exclude) + (len(ids) // 10 if flt.selective else 16))
        top, scores = top_n(vecs, F, depth, mask)
        for r, i in enumerate(with_vec):
            user_flt = flt.excluding(played[i])
            ranked = ((ids[j], float(v)) for j, v in zip(top[r].tolist(), scores[r], strict=True) if j >= 0)
            items = pick(ranked, n, user_flt, self.catalogue)
            if len(items) < n and depth < len(ids):  # too few passed this deep: the whole ranking
                items = planned_search(self.snap.ip, vecs[r], n, user_flt, self.catalogue, self.plans)
            out[i] = (users[i], "personal", items)

    def run(self, users: Iterable[str], n: int, flt: TrackFilter, out: Path, progress: Any = None) -> ExportStats:
        """Write every user's top n to `out`; `progress` (a tqdm bar) is advanced per chunk."""
        stats, t0 = ExportStats(), time.perf_counter()
        writer = Writer(out)
        try:
            batch: list[str] = []
            for u in users:
                batch.append(u)
                if len(batch) == CHUNK:
                    self._write(writer, batch, n, flt, stats, progress)
                    batch = []
            if batch:
                self._write(writer, batch, n, flt, stats, progress)
        except BaseException:
            writer.abort()
            raise
        writer.close()
        stats.seconds = time.perf_counter() - t0
        return stats

    def _write(self, writer: Writer, users: list[str], n: int, flt: TrackFilter, stats: ExportStats, bar: Any) -> None:
        rows = self.chunk(users, n, flt)
        writer.write(self.snap.version, rows)
        stats.users += len(rows)
        stats.personal += sum(1 for _, source, _ in rows if source == "personal")
        stats.popular = stats.users - stats.personal
        if bar is not None:
            bar.update(len(rows))
