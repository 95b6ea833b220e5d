"""The `encore` console script: parse, load settings, dispatch, map domain errors to exit codes.

Exit codes: 0 success, 1 a command found nothing (e.g. `inspect` of an unknown id), 2 a user
error (bad setting, argument or state; the message says what to do), 3 a component stopped on
a fault retrying could not fix, 130 interrupted.
"""

from __future__ import annotations

import argparse
import os
import sys
from contextlib import ExitStack

import redis

from core.errors import EncoreError, FatalError
from services.cli.parser import COMMANDS, build_parser
from services.infra.metrics_dir import multiprocess_dir
from services.infra.settings import ConfigError, Settings, configure_logging

__all__ = ["COMMANDS", "build_parser", "main", "process_defaults"]


def process_defaults() -> None:
    """Process-wide settings, made at start-up rather than at import.

    numba's OpenMP threads spin-wait after each parallel region by default, taking the CPU that
    Redis and the broker on the same machine need (bench.freshness: one fold-in worker went from
    ~20k to ~23k plays/s with passive waiting). An explicit OMP_WAIT_POLICY wins. Benches call
    this too, so they measure what `encore` runs.
    """
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        settings = Settings.from_env()
    except ConfigError as exc:
        print(f"encore: configuration error: {exc}", file=sys.stderr)
        return 2
    process_defaults()
    configure_logging(settings.log_level)
    with ExitStack() as stack:
        if args.command == "serve" and settings.serve_workers > 1:
            stack.enter_context(multiprocess_dir())  # before prometheus_client is imported
        return _dispatch(settings, args)


def _dispatch(settings: Settings, args: argparse.Namespace) -> int:
    from services.cli.commands import HANDLERS

    try:
        return HANDLERS[args.command](settings, args)
    except FatalError as exc:
        print(f"encore {args.command}: stopped: {exc}", file=sys.stderr)
        return 3
    except EncoreError as exc:
        print(f"encore {args.command}: {exc}", file=sys.stderr)
        return 2
    except redis.ConnectionError as exc:  # at start-up, before any component retries on its own
        print(f"encore {args.command}: cannot reach Redis: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
