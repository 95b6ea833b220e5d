"""Per-arm online metrics as the experiment join keeps them in Redis, read back for people:
`encore status`, the dashboard and Prometheus."""

from __future__ import annotations

import redis

from services.infra import metrics
from services.infra.keys import Keys


def arm_metrics(r: redis.Redis, keys: Keys) -> dict[str, dict[str, dict[str, float]]]:
    """experiment (`-` for answers outside one) → arm → impressions, converted, plays,
    conversion (share of impressions followed by a play of a recommended track) and
    plays_per_impression."""
    out: dict[str, dict[str, dict[str, float]]] = {}
    for field, value in r.hgetall(keys.experiment_metrics).items():
        exp, arm, what = field.decode().rsplit("|", 2)
        out.setdefault(exp or "-", {}).setdefault(arm, {})[what] = float(value)
    for arms in out.values():
        for m in arms.values():
            shown = m.get("impressions", 0.0)
            m["conversion"] = m.get("converted", 0.0) / shown if shown else 0.0
            m["plays_per_impression"] = m.get("plays", 0.0) / shown if shown else 0.0
    return out


def export_arm_gauges(r: redis.Redis, keys: Keys) -> None:
    """The per-arm figures as this process's Prometheus gauges (`encore_arm_*`)."""
    for exp, arms in arm_metrics(r, keys).items():
        for arm, m in arms.items():
            metrics.ARM_IMPRESSIONS.labels(exp, arm).set(m.get("impressions", 0.0))
            metrics.ARM_CONVERSION.labels(exp, arm).set(m["conversion"])
            metrics.ARM_PLAYS_PER_IMPRESSION.labels(exp, arm).set(m["plays_per_impression"])
