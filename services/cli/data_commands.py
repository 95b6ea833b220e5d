"""`encore forget` and `encore export`: commands over the stored data of users."""

from __future__ import annotations

import argparse
import json

from core.errors import ConfigError
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


def cmd_export(s: Settings, args: argparse.Namespace) -> int:
    raise ConfigError("export: not built yet")
