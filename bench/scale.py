"""The trainer end to end at 100M plays (5M users × 1M tracks, synthetic), local engine.

    python -m bench.scale [--users 5000000 --tracks 1000000 --plays-per-user 26] [--tune] [--out scale]

Stages, each with its seconds and the process's peak RSS (VmHWM, reset before each stage):
  generate   the play matrix, built in chunks of users (heavy-tailed history lengths, a favourite
             genre per user, Zipf popularity within a genre, track ids in random order so factor
             rows a user touches are spread over memory as in a real catalogue);
  save       the trainer's checkpoint (`PlayMatrix.save`: checksummed npz);
  compact    what every 30 s checkpoint costs at this size: `--pending` plays added one by one
             (as the ingest does) and merged into the 100M-play base;
  train      `Root(settings).trainer()` (checkpoint load) then `train_and_publish()`: holdout,
             fit, evaluation, refit, artifact, publish to Redis, flip; its own seconds per stage
             come from the version's meta, and a sampler attributes RSS to them.
Also Redis's memory after the publish. Tuning is off unless `--tune` (at this size one trial
is a full fit: the default 120 s budget would stop after the first). Writes
bench/results/scale.json.
"""

from __future__ import annotations

import os

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

from services.cli import process_defaults  # noqa: E402

process_defaults()

import argparse  # noqa: E402
import gc  # noqa: E402
import json  # noqa: E402
import tempfile  # noqa: E402
import threading  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any  # noqa: E402

import numpy as np  # noqa: E402
import redis  # noqa: E402
import scipy.sparse as sp  # noqa: E402

from bench.common import status_kb, write  # noqa: E402
from services.batch.checkpoint import PlayMatrix  # noqa: E402
from services.cli.root import Root  # noqa: E402
from services.infra.embedded import EmbeddedServers  # noqa: E402
from services.infra.settings import Settings  # noqa: E402


def _status_mb(field: str) -> float:
    return status_kb(field) / 1024


def reset_peak() -> None:
    """Reset VmHWM (peak RSS) so the next stage's peak is its own (Linux: clear_refs 5)."""
    Path("/proc/self/clear_refs").write_text("5")


def synthetic_matrix(users: int, tracks: int, per_user: float, seed: int = 0, chunk: int = 250_000) -> sp.csr_matrix:
    """users × tracks play counts with about `per_user` distinct tracks per user."""
    rng = np.random.default_rng(seed)
    genres = max(1, tracks // 1000)
    genre_of = rng.integers(0, genres, tracks)
    members = np.argsort(genre_of, kind="stable").astype(np.int64)  # tracks grouped by genre
    sizes = np.bincount(genre_of, minlength=genres)
    starts = np.concatenate([[0], np.cumsum(sizes)[:-1]])
    rank_in_genre = np.arange(tracks) - np.repeat(starts, sizes)
    weight = (rank_in_genre + 1.0) ** -1.1  # Zipf within each genre
    cdf = np.empty(tracks)
    for g in range(genres):  # each genre's block runs over (g, g + 1]
        block = slice(starts[g], starts[g] + sizes[g])
        c = np.cumsum(weight[block])
        cdf[block] = g + c / c[-1]
    global_cdf = np.cumsum(1.0 / (np.arange(tracks) + 1.0) ** 1.1)
    global_order = rng.permutation(tracks)
    global_cdf /= global_cdf[-1]
    mu = np.log(per_user) - 0.32  # lognormal(σ=0.8) history lengths with mean ≈ per_user
    indptr = [np.zeros(1, dtype=np.int64)]
    indices, data = [], []
    for lo in range(0, users, chunk):
        n = min(chunk, users - lo)
        length = np.maximum(1, np.rint(rng.lognormal(mu, 0.8, n))).astype(np.int64)
        row = np.repeat(np.arange(n, dtype=np.int64), length)
        fav = rng.integers(0, genres, n)[row]
        col = members[np.minimum(np.searchsorted(cdf, fav + rng.random(row.size)), tracks - 1)]
        wander = rng.random(row.size) > 0.85
        col[wander] = global_order[np.searchsorted(global_cdf, rng.random(int(wander.sum())))]
        code = np.unique(row * tracks + col)
        r, c = np.divmod(code, tracks)
        indptr.append(indptr[-1][-1] + np.cumsum(np.bincount(r, minlength=n)))
        indices.append(c.astype(np.int32))
        data.append(rng.geometric(0.35, code.size).astype(np.float32))
    return sp.csr_matrix((np.concatenate(data), np.concatenate(indices), np.concatenate(indptr)), shape=(users, tracks))


class RssSampler:
    """RSS every 0.2 s in a thread, to attribute the peak to the trainer's own stages."""

    def __init__(self) -> None:
        self.samples: list[tuple[float, float]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.wait(0.2):
            self.samples.append((time.perf_counter(), _status_mb("VmRSS")))

    def __enter__(self) -> RssSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def peaks(self, start: float, stages: dict[str, float]) -> dict[str, float]:
        """Peak RSS within each stage, the stages laid end to end from `start`."""
        out, t = {}, start
        for name, seconds in stages.items():
            inside = [mb for ts, mb in self.samples if t <= ts < t + seconds]
            out[name] = max(inside, default=0.0)
            t += seconds
        return out


def stage(out: dict[str, Any], name: str, t0: float) -> None:
    out["stages"][name] = {"seconds": round(time.perf_counter() - t0, 1), "peak_rss_mb": round(_status_mb("VmHWM"))}
    print(f"  {name}: {out['stages'][name]}", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--users", type=int, default=5_000_000)
    ap.add_argument("--tracks", type=int, default=1_000_000)
    ap.add_argument("--plays-per-user", type=float, default=26.0, help="draws per user; ~20 distinct tracks remain")
    ap.add_argument("--pending", type=int, default=1_500_000, help="plays merged by one checkpoint (30 s at 50k/s)")
    ap.add_argument("--tune", action="store_true")
    ap.add_argument("--out", default="scale")
    args = ap.parse_args()
    out: dict[str, Any] = {"users": args.users, "tracks": args.tracks, "factors": 64, "stages": {}}
    workdir = tempfile.mkdtemp(prefix="encore-scale-")
    reset_peak()
    t0 = time.perf_counter()
    m = synthetic_matrix(args.users, args.tracks, args.plays_per_user)
    out["nnz"] = int(m.nnz)
    out["matrix_mb"] = (m.data.nbytes + m.indices.nbytes + m.indptr.nbytes) / 2**20
    out["factors_mb"] = 4 * 64 * (args.users + args.tracks) / 2**20
    stage(out, "generate", t0)

    reset_peak()
    t0 = time.perf_counter()
    pm = PlayMatrix(user_ids=[f"u{i}" for i in range(args.users)], track_ids=[f"t{i}" for i in range(args.tracks)])
    pm._base = m
    ckpt = Path(workdir) / "checkpoint.npz"
    pm.save(ckpt, time.time())
    out["checkpoint_mb"] = ckpt.stat().st_size / 2**20
    stage(out, "save", t0)

    reset_peak()
    t0 = time.perf_counter()
    rng = np.random.default_rng(1)
    us, ts = rng.integers(0, args.users, args.pending), rng.integers(0, args.tracks, args.pending)
    for off, (u, t) in enumerate(zip(us.tolist(), ts.tolist(), strict=True)):
        pm.add("bench", 0, off, f"u{u}", f"t{t}", 1.0)
    added = time.perf_counter()
    pm.matrix()
    out["compact_add_s"] = round(added - t0, 1)
    out["compact_merge_s"] = round(time.perf_counter() - added, 1)
    stage(out, "compact", t0)
    del pm, m, us, ts
    gc.collect()

    settings = Settings(data_dir=workdir, tune=args.tune)
    with EmbeddedServers.start() as servers:
        settings = settings.with_(redis_url=servers.redis_url, kafka_bootstrap=servers.kafka_bootstrap)
        reset_peak()
        with RssSampler() as sampler:
            t0 = time.perf_counter()
            root = Root(settings)
            trainer = root.trainer()  # loads the checkpoint
            stage(out, "checkpoint_load", t0)
            reset_peak()
            t1 = time.perf_counter()
            version = trainer.train_and_publish()
            stage(out, "train_and_publish", t1)
        r = redis.Redis.from_url(servers.redis_url)
        trainer_stages = json.loads(r.hget(root.keys.meta(version), "stage_seconds") or b"{}")
        out["trainer_stage_seconds"] = trainer_stages
        out["trainer_stage_peak_rss_mb"] = sampler.peaks(t1, trainer_stages)
        out["precision@10"] = float(r.hget(root.keys.meta(version), "precision@10") or "nan")
        mem = r.info("memory")
        out["redis"] = {
            "keys": int(r.dbsize()),
            "used_memory_mb": mem["used_memory"] / 2**20,
            "used_memory_peak_mb": mem["used_memory_peak"] / 2**20,
        }
        trainer.close()
        root.close()
    peak = max(s["peak_rss_mb"] for k, s in out["stages"].items() if k in ("checkpoint_load", "train_and_publish"))
    out["trainer_peak_rss_mb"] = peak
    out["trainer_peak_over_payload"] = peak / (out["matrix_mb"] + out["factors_mb"])
    print(json.dumps({k: v for k, v in out.items() if k != "stages"}, indent=1))
    write(args.out, out)


if __name__ == "__main__":
    main()
