"""The chaos soak's view of serving: readiness, the version the workers serve, and what the
load generator saw, by status and by fault window (availability, p99 near faults)."""

from __future__ import annotations

import json
import urllib.request
from typing import Any

import numpy as np


def ready(port: int) -> bool:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/ready", timeout=2) as resp:
        return resp.status == 200


def serving_version(port: int, version: str, times: int) -> bool:
    """`times` answers of /ready in a row (spread over the workers) report `version` or a later one."""
    for _ in range(times):
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/ready", timeout=2) as resp:
            if json.loads(resp.read()).get("model_version", "") < version:
                return False
    return True


def serving_summary(res: Any, events: list[dict[str, Any]], t_load: float) -> dict[str, Any]:
    lat = np.array(res.all())
    total = len(lat)
    windows = [(e["at_s"], e["at_s"] + max(10.0, e["freshness_recovered_s"] or 10.0)) for e in events]
    during = [x for t, x in res.timeline if any(a <= t <= b for a, b in windows)]
    # Redis killed: requests needing it get 503 + Retry-After until it is back (by design)
    outages = [
        (e["at_s"], e["at_s"] + (e["freshness_recovered_s"] or 10.0)) for e in events if e["fault"] == "redis_kill"
    ]
    by_fault = {
        f"{e['fault']}@{e['at_s']}": sum(1 for t in res.failed_at if a <= t <= b)
        for e, (a, b) in zip(events, windows, strict=True)
    }
    return {
        "requests": total,
        "answered_200": total - res.errors,
        "availability": (total - res.errors) / max(1, total),
        "availability_outside_redis_outages": 1
        - sum(1 for t in res.failed_at if not any(a <= t <= b for a, b in outages)) / max(1, total),
        "answers_by_status": {str(k): v for k, v in sorted(res.statuses.items())},  # 0 = no answer
        "non_200_by_fault_window": by_fault,
        "non_200_seconds": sorted({round(t, 0) for t in res.failed_at}),
        "non_200_sample": [f for f in res.failures if f[1] != 503][:20],
        "errors_by_kind": res.error_kinds,
        "p99_ms": float(np.percentile(lat, 99) * 1000) if total else None,
        "p99_during_faults_ms": float(np.percentile(during, 99) * 1000) if during else None,
    }
