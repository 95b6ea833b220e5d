"""Shared bench helpers: data sets, peak-memory measurement in a child, JSON output."""

from __future__ import annotations

import json
import multiprocessing as mp
import os
import platform
import resource
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from core.synthetic import SyntheticMusic

RESULTS = Path(__file__).resolve().parent / "results"


def dataset(size: str, seed: int = 0) -> SyntheticMusic:
    """'large' ≈ 10M plays (500k users × 200k tracks); 'medium' ≈ 2M; 'small' ≈ 400k; 'tiny' for smoke runs."""
    shapes = {
        "large": (500_000, 200_000, 200),
        "medium": (100_000, 40_000, 80),
        "small": (20_000, 8_000, 40),
        "tiny": (2_000, 800, 20),
    }
    users, tracks, genres = shapes[size]
    return SyntheticMusic(n_users=users, n_tracks=tracks, mean_plays=45, n_genres=genres, seed=seed)


def status_kb(field: str = "VmRSS") -> int:
    """A memory field of /proc/self/status (VmRSS now, VmHWM the peak), in kB."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    return 0


def _child(fn: Callable[[], dict[str, Any]], q: Any) -> None:
    start = status_kb()
    t0 = time.perf_counter()
    out = fn()
    out["wall_s"] = time.perf_counter() - t0
    out["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    out["rss_at_start_mb"] = start / 1024
    q.put(out)


def in_child(fn: Callable[[], dict[str, Any]]) -> dict[str, Any]:
    """Run `fn` in a forked child so each contender's peak RSS is its own."""
    ctx = mp.get_context("fork")
    q = ctx.Queue()
    p = ctx.Process(target=_child, args=(fn, q))
    p.start()
    out = q.get()
    p.join()
    return out  # type: ignore[no-any-return]


def write(name: str, payload: dict[str, Any], folder: Path | None = None) -> Path:
    folder = folder or RESULTS
    folder.mkdir(parents=True, exist_ok=True)
    payload = {
        "machine": {
            "cpus": os.cpu_count(),
            "python": platform.python_version(),
            "when": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        },
        **payload,
    }
    path = folder / f"{name}.json"
    path.write_text(json.dumps(payload, indent=2))
    print(f"wrote {path}")
    return path
