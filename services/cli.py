"""The `encore` console script: one entry point, subcommands per service."""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import sys
import threading
from collections.abc import Callable

from core.errors import EncoreError
from services.config import ConfigError, Settings, configure_logging

log = logging.getLogger("encore")
COMMANDS = ("up", "embedded", "produce", "foldin", "train", "serve", "config", "inspect", "model")


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="encore", description="Streaming music recommender.")
    sub = p.add_subparsers(dest="command", required=True)
    up = sub.add_parser("up", help="the main job: servers (embedded if none set), demo plays, train, fold-in, API")
    up.add_argument("--rate", type=float, default=300.0, help="demo plays per second")
    up.add_argument("--users", type=int, default=3000)
    up.add_argument("--tracks", type=int, default=1500)
    up.add_argument("--duration", type=float, default=0.0, help="stop after this many seconds (0 = until Ctrl-C)")
    sub.add_parser("embedded", help="start only the embedded broker and Redis")
    pr = sub.add_parser("produce", help="publish plays from a file or the synthetic generator")
    pr.add_argument("--file", help="JSON lines or CSV user_id,track_id,ts[,ms_played,count]")
    pr.add_argument("--synthetic", action="store_true", help="use the synthetic generator")
    pr.add_argument("--users", type=int, default=3000)
    pr.add_argument("--tracks", type=int, default=1500)
    pr.add_argument("--seed", type=int, default=0)
    pr.add_argument("--limit", type=int, default=None)
    pr.add_argument("--live", action="store_true", help="stamp synthetic plays with the current time")
    pr.add_argument("--rate", type=float, default=0.0, help="events per second (0 = as fast as possible)")
    fo = sub.add_parser("foldin", help="the speed-layer worker (consumer group encore-foldin)")
    fo.add_argument("--group", default="encore-foldin")
    tr = sub.add_parser("train", help="the batch-layer trainer")
    tr.add_argument("--once", action="store_true", help="read plays to their end, train, publish, exit")
    tr.add_argument("--engine", choices=("local", "spark"), default="local")
    se = sub.add_parser("serve", help="the HTTP API")
    se.add_argument("--host")
    se.add_argument("--port", type=int)
    sub.add_parser("config", help="print the effective settings")
    ins = sub.add_parser("inspect", help="JSON: stored history, model version and vector")
    ins.add_argument("kind", choices=("user", "track"))
    ins.add_argument("id")
    mo = sub.add_parser("model", help="list model versions or roll back")
    mo_sub = mo.add_subparsers(dest="action", required=True)
    mo_sub.add_parser("list")
    rb = mo_sub.add_parser("rollback")
    rb.add_argument("version")
    return p


def _stop_on_signals(stop: Callable[[], None]) -> None:
    def handler(signum: int, frame: object) -> None:
        log.info("signal %d: stopping", signum)
        stop()

    signal.signal(signal.SIGINT, handler)
    signal.signal(signal.SIGTERM, handler)


def _require_servers(s: Settings) -> None:
    if not s.kafka_bootstrap or not s.redis_url:
        raise ConfigError(
            "set ENCORE_KAFKA_BOOTSTRAP and ENCORE_REDIS_URL (or run `encore up`, "
            "which starts embedded servers, or `encore embedded` to get addresses)"
        )


def cmd_config(s: Settings, args: argparse.Namespace) -> int:
    for name, value, doc in s.describe():
        print(f"{name}={value}    # {doc}")
    return 0


def cmd_embedded(s: Settings, args: argparse.Namespace) -> int:
    from services.embedded import EmbeddedServers

    servers = EmbeddedServers.start()
    print(f"ENCORE_KAFKA_BOOTSTRAP={servers.kafka_bootstrap}", flush=True)
    print(f"ENCORE_REDIS_URL={servers.redis_url}", flush=True)
    done = threading.Event()
    _stop_on_signals(done.set)
    done.wait()
    servers.stop()
    return 0


def cmd_produce(s: Settings, args: argparse.Namespace) -> int:
    from services import kafka_io
    from services.produce import PlayPublisher, produce, read_plays_file, synthetic_stream

    _require_servers(s)
    kafka_io.ensure_topics(s)
    if bool(args.file) == bool(args.synthetic):
        raise ConfigError("give exactly one of --file PATH or --synthetic")
    source = (
        read_plays_file(args.file)
        if args.file
        else synthetic_stream(args.users, args.tracks, args.seed, args.limit, args.live)
    )
    stop = threading.Event()
    _stop_on_signals(stop.set)
    pub = PlayPublisher.connect(s.kafka_bootstrap, s.plays_topic)
    n = produce(pub, source, rate=args.rate, stop=stop)
    pub.close()
    print(json.dumps({"produced": n}))
    return 0


def cmd_foldin(s: Settings, args: argparse.Namespace) -> int:
    from services import foldin, metrics

    _require_servers(s)
    metrics.serve_metrics(s.metrics_port)
    worker = foldin.build(s, args.group)
    _stop_on_signals(worker.close)
    worker.run()
    worker.shutdown()
    return 0


def cmd_train(s: Settings, args: argparse.Namespace) -> int:
    from services import trainer

    _require_servers(s)
    t = trainer.build(s, args.engine)
    _stop_on_signals(t.close)
    try:
        if args.once:
            version = t.run_once()
            print(json.dumps({"published": version}))
        else:
            t.run()
    finally:
        t.consumer.close()
        t.producer.close()
    return 0


def cmd_serve(s: Settings, args: argparse.Namespace) -> int:
    import uvicorn

    from services.api import app_from_env, metrics_dir

    _require_servers(s)
    host, port = args.host or s.api_host, args.port or s.api_port
    workers = s.api_workers or os.cpu_count() or 1
    if workers == 1:
        uvicorn.run(app_from_env(), host=host, port=port, log_level="warning")
        return 0
    # Several processes on one port: no GIL shared between them. Each builds (or, once another
    # worker has saved it, loads) the index snapshot and follows factor-updates on its own.
    with metrics_dir():
        uvicorn.run(
            "services.api:app_from_env", factory=True, workers=workers, host=host, port=port, log_level="warning"
        )
    return 0


def cmd_inspect(s: Settings, args: argparse.Namespace) -> int:
    from services.client import EncoreClient

    _require_servers(s)
    c = EncoreClient(s.redis_url, s.key_prefix)
    version = c.current_version()
    if args.kind == "user":
        vec = c.user_vector(args.id, version)
        out: dict[str, object] = {"user_id": args.id, "history": c.history(args.id)}
    else:
        vec = c.track_vector(args.id, version)
        listeners = c.r.zrange(c.keys.listeners(args.id), 0, -1)
        out = {"track_id": args.id, "recent_listeners": [u.decode() for u in listeners]}
    out.update({"model_version": version, "vector": None if vec is None else [float(x) for x in vec]})
    print(json.dumps(out, indent=2))
    return 0 if (vec is not None or out.get("history") or out.get("recent_listeners")) else 1


def cmd_model(s: Settings, args: argparse.Namespace) -> int:
    import redis

    from services import model_store
    from services.keys import Keys

    _require_servers(s)
    r = redis.Redis.from_url(s.redis_url)
    keys = Keys(s.key_prefix)
    current = model_store.current_version(r, keys)
    if args.action == "list":
        for v, score in r.zrange(keys.versions, 0, -1, withscores=True):
            meta = r.hgetall(keys.meta(v.decode()))
            print(
                json.dumps(
                    {
                        "version": v.decode(),
                        "current": v.decode() == current,
                        "published_at": score,
                        "precision@10": float(meta.get(b"precision@10", b"nan")),
                        "in_redis": bool(meta),
                    }
                )
            )
        return 0
    if not r.exists(keys.meta(args.version)):
        raise EncoreError(f"version {args.version} is not in Redis (expired?); `encore model list`")
    model_store.flip(r, keys, args.version)
    print(json.dumps({"current": args.version, "previous": current}))
    return 0


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        settings = Settings.from_env()
    except ConfigError as exc:
        print(f"encore: configuration error: {exc}", file=sys.stderr)
        return 2
    configure_logging(settings.log_level)
    if args.command == "up":
        from services.up import cmd_up

        handler: Callable[[Settings, argparse.Namespace], int] = cmd_up
    else:
        handler = globals()[f"cmd_{args.command}"]
    try:
        return handler(settings, args)
    except EncoreError as exc:
        print(f"encore {args.command}: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
