"""`encore status`: one poll of everything an operator needs, as a table or JSON.

Model version, age and holdout metrics; per consumer group the offsets stored with the state
(Redis for fold-in, the checkpoint for the trainer) beside Kafka's committed and end offsets,
and the lag; pending re-solves and dead letters; the last retrain; the version each serving
replica has loaded; replay gaps. `problems` lists what needs a person; the exit code is 1 when
there is any, 2 when Redis or Kafka cannot be reached.
"""

from __future__ import annotations

import json
import time
from typing import Any

from kafka import TopicPartition

from core.experiments import Experiment
from services.batch.trainer import GROUP as TRAINER_GROUP
from services.cli.root import Root
from services.infra.experiment_metrics import arm_metrics
from services.speed.worker import GROUP as FOLDIN_GROUP

STALE_MODEL_INTERVALS = 3.0  # a model older than this many retrain intervals needs a look


def _kafka_offsets(root: Root, topic: str) -> tuple[dict[int, int], dict[int, int], dict[str, dict[int, int]]]:
    """(earliest, end) per partition, and each group's committed offsets."""
    c = root.clients.assigned_consumer(None)
    try:
        tps = [TopicPartition(topic, p) for p in sorted(c.partitions_for_topic(topic) or set())]
        low = {tp.partition: o for tp, o in c.beginning_offsets(tps).items()}
        end = {tp.partition: o for tp, o in c.end_offsets(tps).items()}
    finally:
        c.close()
    committed: dict[str, dict[int, int]] = {}
    for group in (FOLDIN_GROUP, TRAINER_GROUP):
        g = root.clients.assigned_consumer(group)  # not subscribed: reads the group's offsets, never joins
        try:
            committed[group] = {tp.partition: (g.committed(tp) or -1) for tp in tps}
        finally:
            g.close()
    return low, end, committed


def _group(state: dict[int, int], committed: dict[int, int], low: dict[int, int], end: dict[int, int]) -> dict:
    parts = {}
    for p in sorted(end):
        stored = state.get(p, -1)
        parts[str(p)] = {
            "state": stored,
            "committed": committed.get(p, -1),
            "earliest": low[p],
            "end": end[p],
            "lag": max(0, end[p] - (stored + 1)),
        }
    return {"lag": sum(x["lag"] for x in parts.values()), "partitions": parts}


def gather(root: Root) -> dict[str, Any]:
    s = root.settings
    models, board = root.models(), root.board()
    now = time.time()
    report: dict[str, Any] = {"time": now, "problems": []}
    problems: list[str] = report["problems"]
    version = models.current_version()
    if version is None:
        report["model"] = None
        problems.append("no model is published yet (is `encore train` running?)")
    else:
        published = dict(models.versions()).get(version, 0.0)
        meta = models.text_meta(version)
        age = now - published
        report["model"] = {
            "version": version,
            "age_s": round(age, 1),
            "engine": meta.get("engine"),
            "n_plays": int(meta.get("n_plays", 0)),
            "holdout": json.loads(meta.get("metrics", "{}")),
        }
        if age > STALE_MODEL_INTERVALS * s.retrain_interval_s:
            problems.append(f"model {version} is {age:.0f}s old (retrain interval {s.retrain_interval_s:.0f}s)")
    incarnation = root.clients.topic_incarnation(s.plays_topic)
    low, end, committed = _kafka_offsets(root, s.plays_topic)
    trainer = board.trainer()
    ckpt = {int(k.rsplit("|", 1)[1]): v for k, v in (trainer.get("checkpoint_offsets") or {}).items()}
    report["incarnation"] = incarnation
    report["groups"] = {
        FOLDIN_GROUP: _group(root.history_store().applied_offsets(incarnation), committed[FOLDIN_GROUP], low, end),
        TRAINER_GROUP: _group(
            ckpt if any(k.startswith(incarnation) for k in trainer.get("checkpoint_offsets") or {}) else {},
            committed[TRAINER_GROUP],
            low,
            end,
        ),
    }
    report["pending_resolves"], queued = root.history_store().backlog(list(end))
    report["dead_letters"] = {"queued": queued, "in_topic": _topic_size(root, s.dlq_topic)}
    report["trainer"] = trainer
    if trainer.get("last_retrain_outcome") in ("failed", "rejected"):
        problems.append(f"last retrain {trainer['last_retrain_outcome']}: {trainer.get('last_retrain_error', '')}")
    report["replicas"] = board.replicas()
    stale = [rid for rid, rep in report["replicas"].items() if version and rep.get("version") != version]
    if stale and report["model"] and report["model"]["age_s"] > s.version_grace_s:
        problems.append(f"replicas {stale} still serve an older version than {version}")
    experiment = Experiment.parse(s.experiment)
    report["experiment"] = {
        "running": experiment.name if experiment else None,
        "arms": {a: {"share": w, "version": models.resolve(a)} for a, w in experiment.arms} if experiment else {},
        "candidate": models.candidate_version(),
        "online": arm_metrics(root.redis, root.keys),
    }
    for arm, info in report["experiment"]["arms"].items():
        if info["version"] is None:
            problems.append(f"experiment arm {arm!r} names no model version (serving gives its users `current`)")
    report["gaps"] = board.gaps()
    for where, gap in report["gaps"].items():
        problems.append(f"replay gap {where}: {gap['lost']} messages no longer in Kafka (see README: recovery)")
    return report


def _topic_size(root: Root, topic: str) -> int:
    c = root.clients.assigned_consumer(None)
    try:
        tps = [TopicPartition(topic, p) for p in c.partitions_for_topic(topic) or set()]
        return sum(c.end_offsets(tps).values()) - sum(c.beginning_offsets(tps).values())
    finally:
        c.close()


def render(report: dict[str, Any]) -> str:
    """The readable table."""
    m = report["model"]
    lines = []
    if m:
        hold = ", ".join(f"{k} {v:.4f}" for k, v in m["holdout"].items() if k in ("precision@10", "ndcg@10"))
        lines.append(f"model      {m['version']}  age {m['age_s']:.0f}s  {m['n_plays']} plays  {hold}")
    else:
        lines.append("model      none")
    for group, g in report["groups"].items():
        lines.append(f"group      {group}: lag {g['lag']}")
        lines.append("           partition  state  committed  earliest  end")
        for p, x in g["partitions"].items():
            lines.append(f"           {p:>9}  {x['state']:>5}  {x['committed']:>9}  {x['earliest']:>8}  {x['end']:>5}")
    dl = report["dead_letters"]
    lines.append(f"pending    {report['pending_resolves']} users to re-solve; dead letters {dl['in_topic']} in topic")
    t = report["trainer"]
    if t.get("last_retrain_outcome"):
        lines.append(
            f"retrain    {t['last_retrain_outcome']} {time.time() - float(t['last_retrain_at']):.0f}s ago"
            f" {t.get('last_version', '')}"
        )
    for rid, rep in report["replicas"].items():
        lines.append(f"replica    {rid}: {rep.get('version')}")
    e = report["experiment"]
    if e["running"] or e["candidate"]:
        lines.append(f"experiment {e['running'] or 'none'}; candidate {e['candidate'] or 'none'}")
    for name, arms in e["online"].items():
        for arm, m in arms.items():
            lines.append(
                f"arm        {name}/{arm}: {m.get('impressions', 0):.0f} impressions, "
                f"conversion {m['conversion']:.4f}, plays/impression {m['plays_per_impression']:.4f}"
            )
    lines += [f"PROBLEM    {p}" for p in report["problems"]] or ["ok         nothing needs a person"]
    return "\n".join(lines)
