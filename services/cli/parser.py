"""The `encore` command line: subcommands and their arguments (dispatch is in `commands`)."""

from __future__ import annotations

import argparse

COMMANDS = (
    "up",
    "embedded",
    "produce",
    "foldin",
    "join",
    "train",
    "serve",
    "config",
    "inspect",
    "model",
    "status",
    "forget",
    "export",
)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="encore", description="Streaming music recommender.")
    sub = p.add_subparsers(dest="command", required=True)
    up = sub.add_parser("up", help="the main job: servers (embedded if none set), demo plays, train, fold-in, API")
    up.add_argument("--rate", type=float, default=300.0, help="demo plays per second")
    up.add_argument("--users", type=int, default=3000)
    up.add_argument("--tracks", type=int, default=1500)
    up.add_argument("--duration", type=float, default=0.0, help="stop after this many seconds (0 = until Ctrl-C)")
    up.add_argument(
        "--secure", action="store_true", help="embedded servers with TLS, a Redis ACL user and API keys made at start"
    )
    sub.add_parser("embedded", help="start only the embedded broker and Redis")
    pr = sub.add_parser("produce", help="publish plays (a file or the synthetic generator) or a track catalogue")
    pr.add_argument("--file", help="plays: JSON lines or CSV user_id,track_id,ts[,ms_played,count]")
    pr.add_argument(
        "--tracks",
        metavar="FILE|N",
        help="a catalogue file to the tracks topic (JSON lines, or CSV with a header track_id,artist_id,...); "
        "with --synthetic: the generator's track count (default 1500)",
    )
    pr.add_argument("--synthetic", action="store_true", help="use the synthetic generator")
    pr.add_argument("--users", type=int, default=3000)
    pr.add_argument("--seed", type=int, default=0)
    pr.add_argument("--limit", type=int, default=None)
    pr.add_argument("--live", action="store_true", help="stamp synthetic plays with the current time")
    pr.add_argument("--rate", type=float, default=0.0, help="events per second (0 = as fast as possible)")
    fo = sub.add_parser("foldin", help="the speed-layer worker (consumer group encore-foldin)")
    fo.add_argument("--group", default="encore-foldin")
    jo = sub.add_parser(
        "join",
        help="the experiment join alone (group encore-experiments): for workers run with ENCORE_EXPERIMENT_JOIN=false",
    )
    jo.add_argument("--group", default="encore-experiments")
    tr = sub.add_parser("train", help="the batch-layer trainer")
    tr.add_argument("--once", action="store_true", help="read plays to their end, train, publish, exit")
    tr.add_argument("--engine", choices=("local", "spark"), default="local")
    tr.add_argument(
        "--candidate", action="store_true", help="publish as the candidate (for experiments), not as current"
    )
    tr.add_argument(
        "--rebuild", action="store_true", help="set the checkpoint aside and rebuild it from what the plays topic holds"
    )
    se = sub.add_parser("serve", help="the HTTP API")
    se.add_argument("--host")
    se.add_argument("--port", type=int)
    sub.add_parser("config", help="print the effective settings")
    ins = sub.add_parser("inspect", help="JSON: stored history, model version and vector")
    ins.add_argument("kind", choices=("user", "track"))
    ins.add_argument("id")
    st = sub.add_parser(
        "status", help="model, lag, stored vs Kafka offsets, retrains, replicas; exit 1 if a person is needed"
    )
    st.add_argument("--json", action="store_true", help="machine-readable output")
    fg = sub.add_parser("forget", help="right to erasure: forget a user everywhere Encore keeps them")
    fg.add_argument("kind", choices=("user",))
    fg.add_argument("id")
    ex = sub.add_parser("export", help="every user's top n from the current version, to .jsonl or .parquet")
    ex.add_argument("--n", type=int, default=50)
    ex.add_argument("--out", required=True, help="output file: .jsonl (a user a line) or .parquet (an item a row)")
    ex.add_argument("--users", help="file of user ids, one a line (default: every user with a vector)")
    ex.add_argument("--exclude", action="append", default=[], help="track ids to leave out (comma-separated)")
    ex.add_argument("--no-explicit", action="store_true", help="leave out tracks the catalogue marks explicit")
    ex.add_argument("--region", help="keep tracks available in this region")
    ex.add_argument("--tags", action="append", default=[], help="keep tracks with any of these tags")
    ex.add_argument("--max-per-artist", type=int, help="at most this many tracks per artist")
    ex.add_argument("--no-progress", action="store_true", help="no progress bar")
    mo = sub.add_parser("model", help="list model versions, roll back, or promote a candidate")
    mo_sub = mo.add_subparsers(dest="action", required=True)
    mo_sub.add_parser("list")
    rb = mo_sub.add_parser("rollback")
    rb.add_argument("version")
    pr = mo_sub.add_parser("promote", help="make a version (the candidate, usually) current")
    pr.add_argument("version")
    return p
