"""Batch export: users per second of `encore export`'s path vs an exact scan, in one run.

    python -m bench.export [--users 500000] [--tracks 200000] [--history 20] [--n 50]

A model of random ALS-like vectors (`bench.serving.track_vectors`) is published to an embedded
Redis with a history of `--history` tracks per user; then `services.batch.export.Exporter`
writes every user's top n to JSON lines (MGET, a pipeline of histories and one batched HNSW
query on all cores per chunk of users, the catalogue filter, the writer), timed end to end.
The peer, in the same run: exact top n by `core.recommend.top_n` (numba, all cores, played
tracks masked) over a sample of users, with the same vectors; recall@n of the export against it
on that sample. Writes bench/results/export.json.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import scipy.sparse as sp

from bench.common import write
from bench.serving import track_vectors
from core.als import ImplicitALS
from core.catalogue import Catalogue
from core.filters import NO_FILTER
from core.recommend import top_n
from services.batch.export import Exporter, Served
from services.cli import process_defaults
from services.cli.root import Root
from services.infra.embedded import EmbeddedServers
from services.infra.model_store import new_version
from services.infra.settings import Settings
from services.serving.snapshots import SnapshotBuilder


def main() -> None:
    process_defaults()
    ap = argparse.ArgumentParser()
    ap.add_argument("--users", type=int, default=500_000)
    ap.add_argument("--tracks", type=int, default=200_000)
    ap.add_argument("--history", type=int, default=20)
    ap.add_argument("--n", type=int, default=50)
    ap.add_argument("--sample", type=int, default=20_000, help="users the exact peer scores")
    args = ap.parse_args()
    rng = np.random.default_rng(0)
    model = ImplicitALS(factors=64)
    model.item_factors_ = track_vectors(args.tracks)
    model.user_factors_ = track_vectors(args.users, seed=99)
    users = [f"u{i}" for i in range(args.users)]
    tracks = [f"t{i}" for i in range(args.tracks)]
    played = rng.integers(0, args.tracks, size=(args.users, args.history))
    with EmbeddedServers.start(kafka=False) as servers, tempfile.TemporaryDirectory() as tmp:
        s = Settings(redis_url=servers.redis_url, key_prefix="bench:", data_dir=tmp, factors=64)
        root = Root(s)
        models = root.models()
        version = new_version()
        t0 = time.perf_counter()
        models.publish(version, model, users, tracks, {"checkpoint_time": time.time()})
        pipe = root.redis.pipeline(transaction=False)
        for i, u in enumerate(users):
            pipe.hset(root.keys.history(u), mapping=dict.fromkeys((tracks[j] for j in played[i]), 1.0))
            if i % 10_000 == 9_999:
                pipe.execute()
        pipe.execute()
        setup_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        snap = SnapshotBuilder(s, models).build(version)
        index_s = time.perf_counter() - t0
        exporter = Exporter(root.redis, root.keys, models, Served(version, snap.ip, snap.popular), Catalogue())
        out = Path(tmp) / "recs.jsonl"
        t0 = time.perf_counter()
        everyone = list(exporter.all_users())
        stats = exporter.run(everyone, args.n, NO_FILTER, out)
        export_s = time.perf_counter() - t0
        sample = rng.choice(args.users, size=min(args.sample, args.users), replace=False)
        got = {}
        with out.open() as f:
            wanted = {users[i] for i in sample}
            for line in f:
                row = json.loads(line)
                if row["user_id"] in wanted:
                    got[row["user_id"]] = {it["track_id"] for it in row["items"]}
        mask = sp.csr_matrix(
            (
                np.ones(len(sample) * args.history),
                (np.repeat(np.arange(len(sample)), args.history), played[sample].ravel()),
            ),
            shape=(len(sample), args.tracks),
        )
        top_n(model.user_factors_[sample[:64]], model.item_factors_, args.n, mask[:64])  # compile
        t0 = time.perf_counter()
        idx, _ = top_n(model.user_factors_[sample], model.item_factors_, args.n, mask)
        exact_s = time.perf_counter() - t0
        hits = sum(len(got[users[u]] & {tracks[j] for j in row}) for u, row in zip(sample, idx, strict=True))
        root.close()
    res: dict[str, Any] = {
        "users": args.users,
        "tracks": args.tracks,
        "n": args.n,
        "history_per_user": args.history,
        "ef": snap.ip.ef,
        "setup_s": setup_s,
        "index_build_s": index_s,
        "export_s": export_s,
        "export_users_per_s": stats.users / export_s,
        "exact_users_per_s": len(sample) / exact_s,
        "export_vs_exact_throughput": (stats.users / export_s) / (len(sample) / exact_s),
        f"recall@{args.n}_vs_exact": hits / (args.n * len(sample)),
        "exact_sample_users": len(sample),
    }
    print(res)
    write("export", res)


if __name__ == "__main__":
    main()
