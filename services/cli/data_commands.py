"""`encore forget` and `encore export`: commands over the stored data of users."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from core.errors import ConfigError
from core.filters import TrackFilter
from services.infra.settings import Settings


def require_servers(s: Settings) -> None:
    """A command that needs both servers refuses to run without them, saying how to get them."""
    if not s.kafka_bootstrap or not s.redis_url:
        raise ConfigError(
            "set ENCORE_KAFKA_BOOTSTRAP and ENCORE_REDIS_URL (or run `encore up`, "
            "which starts embedded servers, or `encore embedded` to get addresses)"
        )


def cmd_forget(s: Settings, args: argparse.Namespace) -> int:
    from services.cli.root import Root

    require_servers(s)
    if not args.id.strip() or len(args.id) > 256:
        raise ConfigError("the user id must be 1..256 characters")
    root = Root(s)
    try:
        print(json.dumps(root.eraser().forget(args.id).to_dict()))
    finally:
        root.close()
    return 0


def export_filter(args: argparse.Namespace) -> TrackFilter:
    """The API's filter from `encore export`'s flags (same rules, same checks)."""
    if args.region is not None and (len(args.region) != 2 or not args.region.isalpha()):
        raise ConfigError(f"--region {args.region!r}: a two-letter region code")
    if args.max_per_artist is not None and args.max_per_artist < 1:
        raise ConfigError("--max-per-artist must be at least 1")
    from services.serving.filter_params import split_ids

    return TrackFilter(
        frozenset(split_ids(args.exclude)),
        not args.no_explicit,
        args.region.upper() if args.region else None,
        frozenset(t.lower() for t in split_ids(args.tags)),
        args.max_per_artist,
    )


def cmd_export(s: Settings, args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from core.catalogue import Catalogue
    from services.batch.export import Exporter, Served
    from services.cli.root import Root
    from services.serving.catalogue_feed import CatalogueFeed
    from services.serving.snapshots import SnapshotBuilder

    require_servers(s)
    if not 1 <= args.n <= 10_000:
        raise ConfigError("--n must be between 1 and 10000")
    out = Path(args.out)
    if out.suffix.lower() not in (".jsonl", ".parquet"):
        raise ConfigError(f"--out {out}: the file must end in .jsonl or .parquet")
    if out.suffix.lower() == ".parquet":
        try:
            import pyarrow  # noqa: F401
        except ImportError:
            raise ConfigError("--out .parquet needs pyarrow: pip install pyarrow (or write .jsonl)") from None
    if not out.parent.is_dir():
        raise ConfigError(f"--out {out}: no folder {out.parent}")
    if args.users and not Path(args.users).is_file():
        raise ConfigError(f"--users {args.users}: no such file")
    flt = export_filter(args)
    root = Root(s)
    try:
        models = root.models()
        version = models.current_version()
        if version is None:
            raise ConfigError("no model published yet: run `encore train --once` first")
        snap = SnapshotBuilder(s, models).build(version)
        feed = CatalogueFeed(Catalogue(), lambda: root.clients.topic_reader(s.tracks_topic))
        root.clients.ensure_topics()
        feed.catch_up()
        feed.close()
        served = Served(snap.version, snap.ip, snap.popular)
        exporter = Exporter(root.redis, root.keys, models, served, feed.catalogue)
        if args.users:
            users = [u.strip() for u in Path(args.users).read_text().splitlines() if u.strip()]
        else:
            users = list(exporter.all_users())
        with tqdm(total=len(users), unit="user", disable=args.no_progress, file=sys.stderr) as bar:
            stats = exporter.run(users, args.n, flt, out, bar)
    finally:
        root.close()
    rate = stats.users / max(stats.seconds, 1e-9)
    print(json.dumps({"out": str(out), "model_version": version, **vars(stats), "users_per_s": round(rate, 1)}))
    return 0
