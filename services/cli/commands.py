"""The `encore` subcommands: each takes Settings and its arguments and returns an exit code.

Every component comes from the composition root (`Root`); a component's `run` returns when a
signal asks it to stop, then `close` releases its clients.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import threading
from collections.abc import Callable
from typing import TYPE_CHECKING

from core.errors import ConfigError
from services.cli.data_commands import cmd_export, cmd_forget, require_servers
from services.cli.serve_command import cmd_serve
from services.infra.lifecycle import Component
from services.infra.settings import Settings

if TYPE_CHECKING:
    from services.cli.root import Root

log = logging.getLogger("encore")
Handler = Callable[[Settings, argparse.Namespace], int]


def stop_on_signals(stop: Callable[[], None]) -> None:
    def handler(signum: int, frame: object) -> None:
        log.info("signal %d: stopping", signum)
        stop()

    signal.signal(signal.SIGINT, handler)
    signal.signal(signal.SIGTERM, handler)


def _run_component(root: Root, component: Component, run: Callable[[], None]) -> int:
    """The one lifecycle of a long-running command: signals stop it, `close` always runs."""
    stop_on_signals(component.stop)
    try:
        run()
    finally:
        component.close()
        root.close()
    return 0


def cmd_config(s: Settings, args: argparse.Namespace) -> int:
    for name, value, doc in s.describe():
        print(f"{name}={value}    # {doc}")
    return 0


def cmd_embedded(s: Settings, args: argparse.Namespace) -> int:
    from services.infra.embedded import EmbeddedServers

    servers = EmbeddedServers.start()
    print(f"ENCORE_KAFKA_BOOTSTRAP={servers.kafka_bootstrap}", flush=True)
    print(f"ENCORE_REDIS_URL={servers.redis_url}", flush=True)
    done = threading.Event()
    stop_on_signals(done.set)
    done.wait()
    servers.stop()
    return 0


def cmd_produce(s: Settings, args: argparse.Namespace) -> int:
    from services.cli.produce import produce, read_plays_file, read_tracks_file, synthetic_stream
    from services.infra.clients import Clients
    from services.infra.play_publisher import PlayPublisher

    require_servers(s)
    tracks_file, n_tracks = (None, 1500) if args.synthetic else (args.tracks, 0)
    if args.synthetic and args.tracks is not None:
        try:
            n_tracks = int(args.tracks)
        except ValueError:
            raise ConfigError(f"--tracks {args.tracks!r}: with --synthetic it is a track count") from None
    if sum(map(bool, (args.file, args.synthetic, tracks_file))) != 1:
        raise ConfigError("give exactly one of --file PATH, --synthetic or --tracks FILE")
    for path in (args.file, tracks_file):
        if path and not os.path.isfile(path):
            raise ConfigError(f"{path}: no such file")
    clients = Clients(s)
    clients.ensure_topics()
    if tracks_file:
        source, topic = read_tracks_file(tracks_file), s.tracks_topic
    elif args.file:
        source, topic = read_plays_file(args.file), s.plays_topic
    else:
        source, topic = synthetic_stream(args.users, n_tracks, args.seed, args.limit, args.live), s.plays_topic
    stop = threading.Event()
    stop_on_signals(stop.set)
    pub = PlayPublisher(clients.producer(), topic)
    n = produce(pub, source, rate=args.rate, stop=stop)
    pub.close()
    print(json.dumps({"produced": n}))
    return 0


def foldin_sides(root: Root, s: Settings) -> list[Component]:
    """What runs beside the fold-in worker, each on a thread: the catalogue in Redis, and the
    online metrics per experiment arm unless `ENCORE_EXPERIMENT_JOIN=false` (the join reads and
    decodes every play once more, on the worker's interpreter; `encore join` runs it alone)."""
    sides: list[Component] = [root.catalogue_sync()]
    if s.experiment_join:
        sides.append(root.experiment_join())
    return sides


def cmd_foldin(s: Settings, args: argparse.Namespace) -> int:
    from services.cli.root import STARTUP_PATIENCE_S, Root
    from services.infra import metrics
    from services.infra.lifecycle import collect_less_often

    require_servers(s)
    metrics.serve_metrics(s.metrics_port)
    metrics.watch_gc()
    collect_less_often()
    root = Root(s, STARTUP_PATIENCE_S)
    worker = root.foldin_worker(args.group)
    sides = foldin_sides(root, s)
    threads = [threading.Thread(target=side.run, daemon=True, name=type(side).__name__) for side in sides]
    for t in threads:
        t.start()
    try:
        return _run_component(root, worker, worker.run)
    finally:
        for side in sides:
            side.stop()
        for t in threads:
            t.join(timeout=5)
        for side in sides:
            side.close()


def cmd_join(s: Settings, args: argparse.Namespace) -> int:
    from services.cli.root import STARTUP_PATIENCE_S, Root
    from services.infra import metrics
    from services.infra.lifecycle import collect_less_often

    require_servers(s)
    metrics.serve_metrics(s.metrics_port)
    collect_less_often()
    root = Root(s, STARTUP_PATIENCE_S)
    join = root.experiment_join(args.group)
    return _run_component(root, join, join.run)


def cmd_train(s: Settings, args: argparse.Namespace) -> int:
    from services.cli.root import STARTUP_PATIENCE_S, Root

    require_servers(s)
    root = Root(s, STARTUP_PATIENCE_S)
    trainer = root.trainer(args.engine, rebuild=args.rebuild, candidate=args.candidate)

    def once() -> None:
        print(json.dumps({"published": trainer.run_once()}))

    def run() -> None:
        if args.rebuild:
            trainer.rebuild()
        (once if args.once else trainer.run)()

    return _run_component(root, trainer, run)


def cmd_inspect(s: Settings, args: argparse.Namespace) -> int:
    from services.serving.client import EncoreClient

    require_servers(s)
    c = EncoreClient(s.redis_url, s.key_prefix, s.redis_timeout_s, settings=s)
    try:
        version = c.current_version()
        if args.kind == "user":
            vec = c.user_vector(args.id, version)
            out: dict[str, object] = {"user_id": args.id, "history": c.history(args.id)}
        else:
            vec = c.track_vector(args.id, version)
            out = {"track_id": args.id, "recent_listeners": c.recent_listeners(args.id)}
    finally:
        c.close()
    out.update({"model_version": version, "vector": None if vec is None else [float(x) for x in vec]})
    print(json.dumps(out, indent=2))
    return 0 if (vec is not None or out.get("history") or out.get("recent_listeners")) else 1


LISTED_METRICS = (
    "precision@10",
    "ndcg@10",
    "coverage@10",
    "novelty@10",
    "popularity_lift@10",
    "diversity@10",
    "artist_diversity@10",
)


def model_row(
    version: str, published_at: float, current: bool, candidate: bool, meta: dict[str, str]
) -> dict[str, object]:
    """One line of `encore model list`: holdout accuracy, beyond-accuracy and how it was chosen."""
    tuning = json.loads(meta["tuning"]) if "tuning" in meta else None
    return {
        "version": version,
        "current": current,
        "candidate": candidate,
        "published_at": published_at,
        **{m: float(meta[m]) for m in LISTED_METRICS if m in meta},
        "hyperparameters": json.loads(meta["hyperparameters"]) if "hyperparameters" in meta else None,
        "tuning_trials": len(tuning["trials"]) if tuning else 0,
        "in_redis": bool(meta),
    }


def cmd_model(s: Settings, args: argparse.Namespace) -> int:
    from services.cli.root import Root

    require_servers(s)
    root = Root(s)
    try:
        models = root.models()
        current, candidate = models.current_version(), models.candidate_version()
        if args.action == "list":
            for version, published_at in models.versions():
                meta = models.text_meta(version)
                print(json.dumps(model_row(version, published_at, version == current, version == candidate, meta)))
            return 0
        if args.action == "promote":
            models.promote(args.version)
        else:
            models.flip(args.version)
        print(json.dumps({"current": args.version, "previous": current}))
        return 0
    finally:
        root.close()


def cmd_up(s: Settings, args: argparse.Namespace) -> int:
    from services.cli.up import run_up

    return run_up(s, args)


def cmd_status(s: Settings, args: argparse.Namespace) -> int:
    import redis
    from kafka.errors import KafkaError

    from services.cli.root import Root
    from services.cli.status import gather, render

    require_servers(s)
    root = Root(s)
    try:
        report = gather(root)
    except (redis.RedisError, KafkaError, OSError) as exc:
        report = {"problems": [f"cannot reach Redis or Kafka: {type(exc).__name__}: {exc}"], "reachable": False}
        print(json.dumps(report) if args.json else f"PROBLEM    {report['problems'][0]}")
        return 2
    finally:
        root.close()
    print(json.dumps(report, indent=2) if args.json else render(report))
    return 1 if report["problems"] else 0


HANDLERS: dict[str, Handler] = {
    "up": cmd_up,
    "embedded": cmd_embedded,
    "produce": cmd_produce,
    "foldin": cmd_foldin,
    "join": cmd_join,
    "train": cmd_train,
    "serve": cmd_serve,
    "config": cmd_config,
    "inspect": cmd_inspect,
    "model": cmd_model,
    "status": cmd_status,
    "forget": cmd_forget,
    "export": cmd_export,
}
